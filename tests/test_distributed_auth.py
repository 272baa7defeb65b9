"""Distributed mode's Redis is useless to commands (issue 22, item 2): a server refuses to start on a Redis a
command could use; commands never get its password; and a worker runs only jobs Offload enqueued, so what
anyone writes into a Docket stream is refused, never unpickled into code, never fatal."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
from conftest import data
from docket import Docket
from mcp import Client

from server.config import Settings, load_settings
from server.distributed import docket_name
from server.errors import ConfigError
from server.redis_auth import ACL_RULES
from server.runtime import Runtime
from testkit.cluster import Node, connect, start_node, stop_nodes
from testkit.redis_server import ACL_USER, RedisServer, until_redis

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


class _RunsOnLoad:
    """What an attacker queues: unpickling it runs a shell command (here: creates a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _job(key: str, args: bytes, function: str = "offload_run") -> dict[str, Any]:
    """A message shaped like Docket's `Execution.as_message`."""
    return {
        "key": key,
        "when": datetime.now(UTC).isoformat(),
        "function": function,
        "args": args,
        "kwargs": pickle.dumps({}),
        "attempt": "1",
        "generation": "0",
    }


async def test_forged_and_malformed_jobs_are_dead_lettered_never_run_and_the_worker_lives_on(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    marker, strike_marker = tmp_path / "job-ran", tmp_path / "strike-ran"
    queue = Docket(name=docket_name(tmp_path.name[-60:], "any"), url=redis_server.url)
    direct = redis.Redis.from_url(redis_server.url)
    bad = [
        {"garbage": "no fields Docket reads"},  # does not decode
        _job("Xy3-forged-task-id-012", pickle.dumps((_RunsOnLoad(marker),))),  # code on load
        _job("Xy3-forged-task-id-012", pickle.dumps(("Xy3-forged-task-id-012",)), function="os.system"),
        {**_job("k", pickle.dumps(("k",))), "when": "not a time"},  # decodes, but Docket cannot read it
    ]
    async with anyio.create_task_group() as tg:
        worker = await start_node(tg, tmp_path, "worker", redis_server.url, "w0", "--queue", "any")
        front_end = await start_node(tg, tmp_path, "front-end", redis_server.url, "f0")
        nodes = [worker, front_end]
        try:
            for message in bad:
                direct.xadd(queue.stream_key, message)
            direct.xadd(
                f"{queue.prefix}:strikes",
                {"direction": "strike", "operator": "==", "value": pickle.dumps(_RunsOnLoad(strike_marker))},
            )
            async with connect(front_end.url) as client:
                await _fire_and_collect(client, "echo real")
            await until_redis(lambda: _unhandled(direct, queue) == 0, redis_server.url)
            await until_redis(lambda: _dead_letters(direct, tmp_path.name[-60:]) == [len(bad)], redis_server.url)
            assert b"refused message" in worker.log  # once: repeats of a warning are rate-limited
            assert worker.process.returncode is None  # alive
            await stop_nodes([worker])  # a restart meets none of them again (and reads the strike again)
            nodes[0] = worker = await start_node(tg, tmp_path, "worker", redis_server.url, "w0", "--queue", "any")
            async with connect(front_end.url) as client:
                await _fire_and_collect(client, "echo after restart")
            assert _dead_letters(direct, tmp_path.name[-60:]) == [0]
        finally:
            await stop_nodes(nodes)
            tg.cancel_scope.cancel()
    for node in nodes:
        await node.process.aclose()
    assert not marker.exists() and not strike_marker.exists()
    direct.close()


async def tool(client: Client, name: str, **arguments: Any) -> dict[str, Any]:
    return data(await client.call_tool(name, arguments))


async def _fire_and_collect(client: Client, command: str) -> None:
    fired = await tool(client, "fire_tool", tool="shell", arguments={"command": command})
    polled = await tool(client, "poll_output", task_ids=[fired["task_id"]], timeout_s=30)
    assert polled["done"] and polled["done"][0]["status"] == "completed", polled
    assert polled["done"][0]["output"]["text"] == f"{command.removeprefix('echo ')}\n"


def _dead_letters(client: redis.Redis, namespace: str) -> list[int]:
    """What each live worker's heartbeat (offload://workers) counts of the jobs it refused."""
    return [json.loads(raw)["dead_letters"] for raw in client.hgetall(f"{namespace}:workers").values()]


def _unhandled(client: redis.Redis, queue: Docket) -> int:
    """Messages of the queue's stream no worker has read yet (its group's lag) or read and not acknowledged."""
    (group,) = [g for g in client.xinfo_groups(queue.stream_key) if g["name"] == queue.worker_group_name.encode()]
    return int(group["lag"] or 0) + int(group["pending"])


async def test_a_server_refuses_to_start_on_redis_without_credentials_when_commands_reach_the_network(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    settings = Settings(redis_url=redis_server.open_url, data_dir=tmp_path / "data")
    with pytest.raises(ConfigError, match=r"has no password, and commands can reach the network") as caught:
        async with Runtime.open(settings, role="worker", load_plugins=False):
            pass
    assert "ACL SETUSER offload" in str(caught.value) and "the default shell (no sandbox)" in str(caught.value)


async def test_a_password_on_a_redis_that_lets_anyone_in_is_refused(tmp_path: Path) -> None:
    """The default user left on without a password: the password in redis_url would protect nothing."""
    server = RedisServer(
        tmp_path / "redis", auth=False, extra_args=("--user", ACL_USER, "on", ">pw-of-offload", "~*", "&*", "+@all")
    )
    server.start()
    try:
        url = f"redis://{ACL_USER}:pw-of-offload@127.0.0.1:{server.port}/0"
        settings = Settings(redis_url=url, data_dir=tmp_path / "data")
        with pytest.raises(ConfigError, match=r"lets in a client that gives no password") as caught:
            async with Runtime.open(settings, load_plugins=False):
                pass
        assert "pw-of-offload" not in str(caught.value) and "ACL SETUSER default off" in str(caught.value)
    finally:
        server.stop()


@pytest.mark.skipif(shutil.which("bwrap") is None and not os.environ.get("CI"), reason="bubblewrap is not installed")
async def test_every_shell_sandboxed_without_network_needs_no_password(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", auth=False)
    server.start()
    try:
        settings = Settings(
            redis_url=server.url, data_dir=tmp_path / "data", shell_sandbox="bwrap", shell_network=False
        )
        async with Runtime.open(settings, role="worker", load_plugins=False):
            pass
    finally:
        server.stop()


@pytest.mark.parametrize("sandbox", ["none", "bwrap"])
async def test_a_command_never_gets_the_redis_password_and_redis_refuses_it(
    tmp_path: Path, redis_server: RedisServer, sandbox: str
) -> None:
    """Whatever variable carries it (OFFLOAD_REDIS_URL, or another name the operator set), the password is
    not in a command's environment, and Redis, which the command can reach, answers it NOAUTH."""
    if sandbox == "bwrap" and shutil.which("bwrap") is None and not os.environ.get("CI"):
        pytest.skip("bubblewrap is not installed")
    half = len(redis_server.password) // 2
    find = f'P="$(printf %s {redis_server.password[:half]!r}){redis_server.password[half:]}"'
    command = (
        f'{find}; if env | grep -qF -- "$P"; then echo FOUND; else echo CLEAN; fi; '
        f"exec 3<>/dev/tcp/127.0.0.1/{redis_server.port}; printf 'GET x\\r\\n' >&3; "
        'read -r -t 5 line <&3; echo "$line"'
    )
    extra = {"OFFLOAD_SHELL_SANDBOX": sandbox, "CACHE_DSN": redis_server.url}
    async with anyio.create_task_group() as tg:
        nodes: list[Node] = []
        try:
            nodes.append(
                await start_node(tg, tmp_path, "worker", redis_server.url, "w0", "--queue", "any", extra_env=extra)
            )
            nodes.append(await start_node(tg, tmp_path, "front-end", redis_server.url, "f0", extra_env=extra))
            async with connect(nodes[1].url) as client:
                fired = await tool(client, "fire_tool", tool="shell", arguments={"command": command})
                polled = await tool(client, "poll_output", task_ids=[fired["task_id"]], timeout_s=30)
        finally:
            await stop_nodes(nodes)
            tg.cancel_scope.cancel()
    for node in nodes:
        await node.process.aclose()
    text = polled["done"][0]["output"]["text"]
    assert text.startswith("CLEAN\n"), text
    assert "NOAUTH" in text, text


def test_a_password_in_a_config_file_sandboxed_commands_can_read_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "conf" / "offload.toml"
    config.parent.mkdir()
    url = "redis://offload:pw-in-the-file@127.0.0.1:6379/0"
    config.write_text(f'redis_url = "{url}"\nshell_sandbox = "bwrap"\n')
    with pytest.raises(ConfigError, match="sandboxed commands with network can read that file") as caught:
        load_settings(config, environ={})
    assert "pw-in-the-file" not in str(caught.value)
    config.write_text(f'redis_url = "{url}"\nshell_sandbox = "bwrap"\nshell_sandbox_hide = ["{config.parent}"]\n')
    assert load_settings(config, environ={}).redis_url == url  # hidden from every sandbox: fine
    config.write_text('shell_sandbox = "bwrap"\n')
    assert load_settings(config, environ={"OFFLOAD_REDIS_URL": url}).redis_url == url  # commands never get it


async def test_the_acl_user_the_readme_sets_up_is_enough_to_run_and_cancel(tmp_path: Path) -> None:
    """The README's `ACL SETUSER offload ... -@dangerous` line, exactly: a task runs, a cancel reaches it."""
    server = RedisServer(tmp_path / "redis", acl_rules=ACL_RULES)
    server.start()
    extra = {"OFFLOAD_REDIS_NAMESPACE": "offload"}
    try:
        async with anyio.create_task_group() as tg:
            nodes: list[Node] = []
            try:
                nodes.append(
                    await start_node(tg, tmp_path, "worker", server.url, "w0", "--queue", "any", extra_env=extra)
                )
                nodes.append(await start_node(tg, tmp_path, "front-end", server.url, "f0", extra_env=extra))
                async with connect(nodes[1].url) as client:
                    await _fire_and_collect(client, "echo under the acl")
                    fired = await tool(client, "fire_tool", tool="shell", arguments={"command": "sleep 300"})
                    await tool(client, "cancel_task", task_id=fired["task_id"])
                    polled = await tool(client, "poll_output", task_ids=[fired["task_id"]], timeout_s=30)
                assert polled["done"][0]["status"] == "cancelled", polled
            finally:
                await stop_nodes(nodes)
                tg.cancel_scope.cancel()
        for node in nodes:
            await node.process.aclose()
            assert b"NOPERM" not in node.log, node.log.decode()[-3000:]
    finally:
        server.stop()
