"""Proxy mode: other MCP servers' tools fired through Offload, against real upstream processes.

Upstreams: `mcp-server-time` (PyPI, speaks 2026-07-28), `@modelcontextprotocol/server-everything`
(npm, installed by .ci/run, speaks 2025-11-25), and tests/upstream_fixture.py, which crashes, hangs,
ignores cancellation and changes its tool list on request. Upstream events reach the test through
a FIFO (`Events`), so every wait is on an event, bounded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from conftest import ERAS, FakeClock, Gate, call, error_text, finish, live_group_members, open_client
from mcp import Client
from pydantic import ValidationError
from test_inspector import inspect

from server.config import Settings, load_settings
from server.errors import ConfigError, RefusedError, UnknownTaskError
from server.runtime import Runtime
from server.upstreams import upstreams_config
from testkit.rawserver import npm_tool, start_server
from tools.upstream import BASE_ENV, arguments_model
from tools.upstream_lines import LineSplitter, Oversized, answered_id

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

FIXTURE = Path(__file__).with_name("upstream_fixture.py")


def fixture_server(*flags: str, **extra: Any) -> dict[str, Any]:
    return {"command": sys.executable, "args": [str(FIXTURE), *flags], **extra}


def time_server() -> dict[str, Any]:
    found = shutil.which("mcp-server-time") or str(Path(sys.executable).with_name("mcp-server-time"))
    if not Path(found).is_file():
        if os.environ.get("CI"):
            pytest.fail("mcp-server-time is not installed: `uv sync --extra dev` installs it")
        pytest.skip("mcp-server-time is not installed (uv sync --extra dev)")
    return {"command": found}


def everything_server() -> dict[str, Any]:
    binary = npm_tool("MCP_SERVER_EVERYTHING_BIN", "@modelcontextprotocol/server-everything")
    return {"command": str(binary), "args": ["stdio"], "env": {"PATH": f"{binary.parent}:{os.environ['PATH']}"}}


@asynccontextmanager
async def proxy(era: str = "modern", **config: Any) -> AsyncIterator[tuple[Runtime, Client]]:
    settings = Settings.model_validate({"kill_grace_s": 0.5, **config})
    async with open_client(settings, FakeClock(), Gate(), era) as pair:
        yield pair


class Events:
    """Lines an upstream tool writes to a FIFO: read as they come, waited on with a bound."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "events"
        os.mkfifo(self.path)
        self._read = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        self._keep = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)  # no EOF between the writers' lines
        self.seen = ""

    async def expect(self, line: str, timeout_s: float = 10) -> None:
        with anyio.fail_after(timeout_s):
            while f"{line}\n" not in self.seen:
                await anyio.wait_readable(self._read)
                try:
                    self.seen += os.read(self._read, 4096).decode()
                except BlockingIOError:
                    continue

    def close(self) -> None:
        os.close(self._read)
        os.close(self._keep)


@pytest.fixture
def events(tmp_path: Path) -> Iterator[Events]:
    found = Events(tmp_path)
    yield found
    found.close()


async def fired(client: Client, tool: str, wait_s: float = 0, **arguments: Any) -> dict[str, Any]:
    return await call(client, "fire_tool", tool=tool, arguments=arguments, wait_s=wait_s)


async def run(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    """Fires and returns the finished task."""
    reply = await fired(client, tool, **arguments)
    return await finish(client, reply["task_id"])


# ---- configuration ----


def test_upstream_settings_are_checked_by_name(tmp_path: Path) -> None:
    path = tmp_path / "offload.toml"
    path.write_text('[mcp_servers.fx]\ncommand = "x"\ntimout_s = 3\n')
    with pytest.raises(ConfigError, match=re.escape("unknown setting 'mcp_servers.fx.timout_s'")):
        load_settings(path, environ={})
    path.write_text('[mcp_servers.fx]\ncommand = "x"\nurl = "http://127.0.0.1:1/mcp"\n')
    with pytest.raises(ConfigError, match="give either command"):
        load_settings(path, environ={})
    with pytest.raises(ConfigError, match="unknown environment setting OFFLOAD_MCP_SERVERS"):
        load_settings(None, environ={"OFFLOAD_MCP_SERVERS": "x"})
    with pytest.raises(ConfigError, match=re.escape("[mcp_servers.github] has the name of Offload's own tools")):
        anyio.run(_open, Settings.model_validate({"mcp_servers": {"github": {"command": "x"}}}))
    desktop = tmp_path / "claude.json"
    desktop.write_text(json.dumps({"mcpServers": {"fx": {"command": "x", "disabled": True}}}))
    settings = load_settings(None, environ={"OFFLOAD_MCP_SERVERS_FILE": str(desktop)})
    with pytest.raises(ConfigError, match=re.escape("mcpServers.fx: disabled: unknown key")):
        upstreams_config(settings)


async def _open(settings: Settings) -> None:
    async with Runtime.open(settings, load_plugins=False):
        pass


# ---- stdio upstreams end to end ----


@pytest.mark.parametrize("era", list(ERAS))
async def test_an_upstream_tool_fires_and_collects_like_any_task(era: str) -> None:
    async with proxy(era, mcp_servers={"fx": fixture_server()}) as (_rt, client):
        catalog = {t["name"]: t for t in (await call(client, "list_fireable_tools"))["tools"]}
        assert "fx.*" not in catalog  # lazy, and started by the listing: its tools are listed by name

        done = await run(client, "fx.add", a=2, b=3)
        assert done["status"] == "completed", done
        assert done["result"]["content"] == [{"type": "text", "text": "5"}]
        assert done["result"]["structured_content"] == {"result": 5}

        assert catalog["fx.add"]["description"] == "Adds two numbers (b at least 0)."
        assert catalog["fx.add"]["input_schema"]["properties"]["b"]["minimum"] == 0  # the upstream's own schema
        assert "cacheable" in catalog["fx.add"]["flags"]


async def test_progress_and_log_messages_become_output_lines() -> None:
    async with proxy(mcp_servers={"fx": fixture_server()}) as (_rt, client):
        done = await run(client, "fx.steps", count=3)
        assert done["status"] == "completed"
        assert done["output"]["text"] == (
            "[info] stepping\nprogress 1/3: step 1\nprogress 2/3: step 2\nprogress 3/3: step 3\n"
        )
        assert done["result"]["content"][0]["text"] == "did 3 steps"


async def test_mcp_server_time_over_the_2026_protocol() -> None:
    async with proxy(mcp_servers={"time": time_server()}) as (rt, client):
        done = await run(client, "time.get_current_time", timezone="UTC")
        assert done["status"] == "completed", done
        assert done["result"]["structured_content"]["timezone"] == "UTC"
        upstream = rt.upstreams.upstreams["time"]  # type: ignore[union-attr]
        assert upstream.current is not None
        assert upstream.current.client.protocol_version == "2026-07-28"

        refused = error_text(await client.call_tool("fire_tool", {"tool": "time.get_current_time", "arguments": {}}))
        assert "Invalid arguments for 'time.get_current_time'" in refused
        assert "'timezone' is a required property" in refused


async def test_server_everything_over_the_2025_protocol() -> None:
    async with proxy(mcp_servers={"every": everything_server()}) as (rt, client):
        long_run = await run(client, "every.trigger-long-running-operation", duration=0.3, steps=3)
        assert long_run["status"] == "completed", long_run
        lines = long_run["output"]["text"].splitlines()
        assert [line.split(":")[0] for line in lines if line.startswith("progress")] == [
            "progress 1/3",
            "progress 2/3",
            "progress 3/3",
        ]
        echoed = await run(client, "every.echo", message="hello upstream")
        assert "hello upstream" in echoed["result"]["content"][0]["text"]
        first = await fired(client, "every.get-sum", wait_s=10, a=2, b=40)
        again = await fired(client, "every.get-sum", wait_s=10, a=2, b=40)
        assert "42" in first["task"]["result"]["content"][0]["text"]
        assert (again["cached"], again["task_id"]) == (True, first["task_id"])  # readOnlyHint + idempotentHint
        upstream = rt.upstreams.upstreams["every"]  # type: ignore[union-attr]
        assert upstream.current is not None and upstream.current.client.protocol_version == "2025-11-25"


# ---- bad input ----


async def test_unknown_servers_and_tools_name_the_fireable_ones() -> None:
    async with proxy(mcp_servers={"fx": fixture_server()}) as (_rt, client):
        unknown_server = error_text(await client.call_tool("fire_tool", {"tool": "nosuch.add", "arguments": {}}))
        assert "Unknown tool 'nosuch.add'" in unknown_server and "fx.*" in unknown_server
        unknown_tool = error_text(await client.call_tool("fire_tool", {"tool": "fx.nope", "arguments": {}}))
        assert "Unknown tool 'fx.nope'" in unknown_tool
        assert "fx.add" in unknown_tool and "fx.hang" in unknown_tool and "shell" not in unknown_tool
        bad = error_text(await client.call_tool("fire_tool", {"tool": "fx.add", "arguments": {"a": 1, "b": -1}}))
        assert "-1 is less than the minimum of 0" in bad and "Nothing was started" in bad
        assert (await call(client, "list_tasks"))["tasks"] == []


async def test_a_server_that_fails_to_start_reports_its_status_and_stderr_then_is_given_up() -> None:
    async with proxy(mcp_servers={"bad": fixture_server("--fail-at-start")}) as (_rt, client):
        messages = [
            error_text(await client.call_tool("fire_tool", {"tool": "bad.add", "arguments": {"a": 1, "b": 1}}))
            for _ in range(3)
        ]
        for message in messages:
            assert "exit status 3" in message, message
            assert "fixture: refusing to start: the configuration is wrong" in message
            assert "Nothing was started" in message
        assert "given up on after 3 failed starts" in messages[-1]
        catalog = {t["name"]: t for t in (await call(client, "list_fireable_tools"))["tools"]}
        assert "given up" in catalog["bad.*"]["note"]


async def test_an_upstreams_environment_is_its_config_not_offloads_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROXY_TEST_SECRET_TOKEN", "hunter2")
    monkeypatch.setenv("PROXY_TEST_PASSED", "on purpose")
    server = fixture_server(env={"GIVEN": "yes", "PASSED": "${PROXY_TEST_PASSED}"})
    async with proxy(mcp_servers={"fx": server}) as (_rt, client):
        names = set((await run(client, "fx.environment"))["result"]["structured_content"]["names"])
    assert {"GIVEN", "PASSED", "PATH"} <= names
    assert "PROXY_TEST_SECRET_TOKEN" not in names and "PROXY_TEST_PASSED" not in names
    assert names <= {"GIVEN", "PASSED", *BASE_ENV}


# ---- failures while running ----


async def test_an_upstream_that_dies_mid_call_fails_the_task_with_its_stderr_and_is_restarted() -> None:
    async with proxy(mcp_servers={"fx": fixture_server()}) as (_rt, client):
        crashed = await run(client, "fx.crash", code=7)
        assert crashed["status"] == "failed"
        assert crashed["error"]["kind"] == "upstream_exited"
        assert "exit status 7" in crashed["error"]["message"]
        assert "fixture: crashing with 7 on purpose" in crashed["error"]["message"]
        assert "not retried" in crashed["error"]["message"]
        again = await run(client, "fx.add", a=1, b=1)  # a new session, after the backoff
        assert again["status"] == "completed" and again["pid"] != crashed["pid"]


async def test_an_upstream_that_stops_answering_is_restarted(events: Events) -> None:
    async with proxy(mcp_servers={"fx": fixture_server(health_check_s=0.5)}) as (_rt, client):
        frozen = await fired(client, "fx.freeze", events=str(events.path))
        await events.expect("started freeze")
        view = await finish(client, frozen["task_id"])
        assert view["status"] == "failed" and view["error"]["kind"] == "upstream_exited"
        assert "failed a health check (tools/list: no answer within 1 s)" in view["error"]["message"]
        again = await run(client, "fx.add", a=1, b=1)
        assert again["status"] == "completed" and again["pid"] != view["pid"]


async def test_is_error_fails_the_task_as_upstream_error() -> None:
    async with proxy(mcp_servers={"fx": fixture_server()}) as (_rt, client):
        failed = await run(client, "fx.fail", reason="no such row")
        assert failed["status"] == "failed"
        assert failed["error"]["kind"] == "upstream_error"
        assert "no such row" in failed["error"]["message"]


async def test_cancel_sends_notifications_cancelled_upstream(events: Events) -> None:
    async with proxy(mcp_servers={"fx": fixture_server()}) as (_rt, client):
        task = await fired(client, "fx.hang", events=str(events.path))
        await events.expect("started hang")
        view = await call(client, "cancel_task", task_id=task["task_id"])
        assert view["status"] == "cancelled"
        assert view["error"]["kind"] == "cancelled_by_client"
        await events.expect("cancelled hang")  # the upstream heard it


async def test_a_task_is_cancelled_even_if_the_upstream_ignores_it(events: Events) -> None:
    async with proxy(mcp_servers={"fx": fixture_server()}) as (_rt, client):
        task = await fired(client, "fx.stubborn", events=str(events.path))
        await events.expect("started stubborn")
        view = await call(client, "cancel_task", task_id=task["task_id"])
        assert view["status"] == "cancelled"
        assert (await run(client, "fx.add", a=1, b=2))["status"] == "completed"  # the session goes on


async def test_the_tasks_timeout_applies_not_a_request_timeout(events: Events) -> None:
    async with proxy(mcp_servers={"fx": fixture_server()}) as (_rt, client):
        task = await call(client, "fire_tool", tool="fx.hang", arguments={"events": str(events.path)}, timeout_s=0.5)
        view = await finish(client, task["task_id"])
        assert view["status"] == "failed" and view["error"]["kind"] == "timeout"
        await events.expect("cancelled hang")


# ---- caching, tool list changes, owners, shutdown ----


async def test_only_read_only_idempotent_or_configured_tools_reuse_results() -> None:
    servers = {"fx": fixture_server(), "fy": fixture_server(cacheable=["count*"])}
    async with proxy(mcp_servers=servers) as (_rt, client):
        first = await fired(client, "fx.add", wait_s=10, a=1, b=2)
        assert (await fired(client, "fx.add", wait_s=10, a=1, b=2))["cached"] is True
        counts = [(await fired(client, "fx.counter", wait_s=10, key="k"))["task"] for _ in range(2)]
        assert [c["result"]["content"][0]["text"] for c in counts] == ["k 1", "k 2"]  # ran twice
        configured = [await fired(client, "fy.counter", wait_s=10, key="k") for _ in range(2)]
        assert configured[1]["cached"] is True and configured[1]["task_id"] == configured[0]["task_id"]
        assert first["task"]["status"] == "completed"


async def test_a_changed_tool_list_is_listed_again() -> None:
    async with proxy(mcp_servers={"fx": fixture_server()}) as (rt, client):
        changed = anyio.Event()
        assert rt.upstreams is not None
        rt.upstreams.on_tools_changed.append(changed.set)
        assert (await run(client, "fx.grow"))["status"] == "completed"
        with anyio.fail_after(10):
            await changed.wait()
        names = {t["name"] for t in (await call(client, "list_fireable_tools"))["tools"]}
        assert "fx.added" in names
        assert (await run(client, "fx.added"))["result"]["content"][0]["text"] == "I was added"


async def test_owners_may_be_limited_to_some_upstreams() -> None:
    config = {"mcp_servers": {"fx": fixture_server()}, "owners": {"alice": {"mcp_servers": ["time*"]}}}
    async with proxy(**config) as (rt, _client):
        with pytest.raises(RefusedError, match="owner 'alice' may not use the MCP server 'fx'"):
            await rt.fire(
                "fx.add", {"a": 1, "b": 1}, timeout_s=None, ttl_s=None, use_cache=True, wait_s=0, owner="alice"
            )
        with pytest.raises(RefusedError, match="owner 'alice' may not use the MCP server 'fx'"):
            await rt.start("fx.add", {"a": 1, "b": 1}, owner="alice")  # the tasks extension's way in
        reply = await rt.fire(
            "fx.add", {"a": 1, "b": 1}, timeout_s=None, ttl_s=None, use_cache=True, wait_s=10, owner="local"
        )
        assert reply.status == "completed"


async def test_one_session_serves_every_owner_but_results_stay_owner_scoped() -> None:
    config = {"mcp_servers": {"fx": fixture_server()}, "owners": {"a": {}, "b": {}}}
    async with proxy(**config) as (rt, _client):
        options: dict[str, Any] = {"timeout_s": None, "ttl_s": None, "use_cache": True, "wait_s": 10}
        mine = await rt.fire("fx.add", {"a": 1, "b": 1}, **options, owner="a")
        theirs = await rt.fire("fx.add", {"a": 1, "b": 1}, **options, owner="b")
        assert not theirs.cached and theirs.task_id != mine.task_id  # a's result is not b's to reuse
        assert mine.task is not None and theirs.task is not None and mine.task.pid == theirs.task.pid
        with pytest.raises(UnknownTaskError):
            rt.get_output(mine.task_id, offset=0, max_bytes=100, tail_bytes=None, owner="b")


async def test_max_concurrency_holds_calls_to_one_upstream(events: Events) -> None:
    async with proxy(mcp_servers={"fx": fixture_server(max_concurrency=1)}) as (_rt, client):
        blocking = await fired(client, "fx.stubborn", events=str(events.path))
        await events.expect("started stubborn")
        waiting = await fired(client, "fx.add", a=1, b=1)
        still = await call(client, "poll_output", task_ids=[waiting["task_id"]], timeout_s=0.3)
        assert still["pending"] == [waiting["task_id"]]
        await call(client, "cancel_task", task_id=blocking["task_id"])
        assert (await finish(client, waiting["task_id"]))["status"] == "completed"


async def test_eager_upstreams_start_with_offload_and_stop_with_it(events: Events) -> None:
    async with proxy(mcp_servers={"fx": fixture_server(start="eager")}) as (rt, client):
        upstream = rt.upstreams.upstreams["fx"]  # type: ignore[union-attr]
        assert upstream.current is not None and upstream.current.process is not None  # before any fire
        pid = upstream.current.process.pid
        await fired(client, "fx.stubborn", events=str(events.path))
        await events.expect("started stubborn")
    assert live_group_members(pid) == []  # stopped although a call was still running in it


async def test_in_flight_upstream_calls_are_settled_interrupted_after_a_kill_9(tmp_path: Path, events: Events) -> None:
    config = tmp_path / "offload.toml"
    config.write_text(
        f"[mcp_servers.fx]\ncommand = {json.dumps(sys.executable)}\nargs = [{json.dumps(str(FIXTURE))}]\n",
        encoding="utf-8",
    )
    server = await start_server(tmp_path, "--config", str(config))
    task = await server.call("fire_tool", tool="fx.stubborn", arguments={"events": str(events.path)})
    await events.expect("started stubborn")
    view = await server.call("get_cached_output", task_id=task["task_id"])
    upstream_pid = view["pid"]
    server.process.kill()
    with anyio.fail_after(5):
        await server.process.wait()
    await server.process.aclose()

    again = await start_server(tmp_path, "--config", str(config))
    async with again.process:
        settled = await again.call("get_cached_output", task_id=task["task_id"])
        assert settled["status"] == "failed"
        assert settled["error"]["kind"] == "interrupted"
        assert live_group_members(upstream_pid) == []  # its stdin closed; what was left was killed
        assert again.process.stdin is not None
        await again.process.stdin.aclose()
        await again.process.wait()


async def test_a_claude_desktop_config_file_is_read_as_it_is(tmp_path: Path) -> None:
    desktop = tmp_path / "claude_desktop_config.json"
    desktop.write_text(json.dumps({"mcpServers": {"fx": {"command": sys.executable, "args": [str(FIXTURE)]}}}))
    async with proxy(mcp_servers_file=str(desktop)) as (_rt, client):
        assert (await run(client, "fx.add", a=20, b=22))["result"]["structured_content"] == {"result": 42}


# ---- streamable HTTP upstreams ----


@asynccontextmanager
async def everything_over_http(mode: str) -> AsyncIterator[str]:
    """server-everything on a free loopback port; yields its endpoint once it says it listens."""
    stdio = everything_server()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, **stdio["env"], "PORT": str(port)}
    process = await anyio.open_process([stdio["command"], mode], env=env, stderr=subprocess.PIPE)
    async with process:
        assert process.stderr is not None
        seen = b""
        with anyio.fail_after(20):
            async for piece in process.stderr:
                seen += piece
                if f"port {port}".encode() in seen:
                    break
        try:
            yield f"http://127.0.0.1:{port}/{'sse' if mode == 'sse' else 'mcp'}"
        finally:
            process.terminate()
            await process.wait()


@pytest.mark.parametrize(("mode", "kind"), [("streamableHttp", "http"), ("sse", "sse")])
async def test_http_upstreams(mode: str, kind: str) -> None:
    async with (
        everything_over_http(mode) as url,
        proxy(mcp_servers={"web": {"url": url, "type": kind}}) as (_rt, client),
    ):
        long_run = await run(client, "web.trigger-long-running-operation", duration=0.3, steps=2)
        assert long_run["status"] == "completed", long_run
        assert "progress 2/2" in long_run["output"]["text"]
        summed = await run(client, "web.get-sum", a=1, b=2)
        assert "3" in summed["result"]["content"][0]["text"]
        assert summed["pid"] is None  # no process of ours


# ---- a client nobody here wrote: the MCP Inspector CLI ----


@pytest.mark.parametrize("era", ["legacy", "modern"])
async def test_the_inspector_fires_an_upstream_tool_and_calls_an_exposed_one(tmp_path: Path, era: str) -> None:
    config = tmp_path / "offload.toml"
    config.write_text(
        'expose = ["fx.add"]\n'
        f"[mcp_servers.fx]\ncommand = {json.dumps(sys.executable)}\nargs = [{json.dumps(str(FIXTURE))}]\n"
        'start = "eager"\n',  # exposed tools are those known when Offload starts
        encoding="utf-8",
    )
    server = ["--", sys.executable, "-m", "server", "--data-dir", str(tmp_path / "data"), "--config", str(config)]

    async def tools_call(tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
        args = ["--protocol-era", era, "--method", "tools/call", "--tool-name", tool]
        result = await inspect(tmp_path, *args, "--tool-args-json", json.dumps(arguments), *server)
        assert not result.get("isError"), result
        structured: dict[str, Any] = result["structuredContent"]
        return structured

    fired_tool = await tools_call("fire_tool", {"tool": "fx.add", "arguments": {"a": 2, "b": 2}, "wait_s": 20})
    assert fired_tool["task"]["result"]["structured_content"] == {"result": 4}
    if era == "modern":  # as a task of the tasks extension (the legacy era gets the inline answer)
        exposed = await tools_call("fx.add", {"a": 3, "b": 3})
        assert exposed["status"] == "completed" and exposed["result"]["structured_content"] == {"result": 6}


async def test_an_upstream_command_is_found_on_the_path_commands_get(tmp_path: Path) -> None:
    """On macOS Claude Desktop starts Offload with launchd's PATH: an upstream's command (npx, uvx…) must be
    found on the login shell's PATH, or `shell_path`, as a shell command would be."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "my-time-server").symlink_to(time_server()["command"])
    servers = {"time": {"command": "my-time-server"}}
    async with proxy(mcp_servers=servers, shell_path=f"{bin_dir}:/usr/bin:/bin") as (_rt, client):
        done = await run(client, "time.get_current_time", timezone="UTC")
        assert done["status"] == "completed", done


# ---- what the adversarial review of proxy mode found ----


async def test_a_remote_ref_in_an_upstream_schema_is_never_fetched() -> None:
    """An upstream's schema must not make Offload send a request (or wait forever on one)."""
    hits: list[str] = []

    async def handle(stream: anyio.abc.SocketStream) -> None:
        hits.append("connected")
        await stream.aclose()

    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        schema = {"type": "object", "properties": {"a": {"$ref": f"http://127.0.0.1:{port}/evil.json"}}}
        model = arguments_model("fx.remote", schema)
        with pytest.raises(ValidationError, match="does not fetch"):
            model.model_validate({"a": 1})
        tg.cancel_scope.cancel()
    assert hits == []


async def test_an_upstreams_log_lines_never_reach_another_owners_output(events: Events) -> None:
    options: dict[str, Any] = {"timeout_s": None, "ttl_s": None, "use_cache": False}
    async with proxy(mcp_servers={"fx": fixture_server()}) as (rt, _client):
        bob = await rt.fire("fx.hang", {"events": str(events.path)}, **options, wait_s=0, owner="bob")
        await events.expect("started hang")
        alice = await rt.fire("fx.steps", {"count": 1}, **options, wait_s=20, owner="alice")
        assert alice.status == "completed"
        seen = rt.get_output(alice.task_id, offset=0, max_bytes=10_000, tail_bytes=None, owner="alice").output
        assert seen is not None and "progress 1/1" in seen.text and "stepping" not in seen.text
        await rt.cancel(bob.task_id, owner="bob")
        theirs = rt.get_output(bob.task_id, offset=0, max_bytes=10_000, tail_bytes=None, owner="bob").output
        assert theirs is not None and "stepping" not in theirs.text


async def test_calls_that_crash_a_ready_upstream_do_not_switch_it_off_for_everyone() -> None:
    async with proxy(mcp_servers={"fx": fixture_server()}) as (_rt, client):
        for _ in range(4):
            crashed = await run(client, "fx.crash", code=7)
            assert crashed["error"]["kind"] == "upstream_exited", crashed
        done = await run(client, "fx.add", a=1, b=2)
        assert done["status"] == "completed", done


async def test_a_huge_upstream_result_is_kept_in_the_output_not_in_every_reply() -> None:
    async with proxy(mcp_servers={"fx": fixture_server()}) as (_rt, client):
        done = await run(client, "fx.big", size=3_000_000)
        assert done["status"] == "completed", done
        assert done["result"]["truncated"] is True and done["result"]["result_bytes"] > 3_000_000
        assert len(json.dumps(done)) < 100_000
        assert done["output"]["total_bytes"] > 3_000_000


async def test_secrets_handed_to_an_upstream_are_masked_and_unusable_upstreams_are_not_listed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FX_DB_PASSWORD", "hunter2-but-longer-0123")
    servers = {"fx": fixture_server(env={"DB": "postgres://u:${FX_DB_PASSWORD}@db"}), "time": time_server()}
    config = {"mcp_servers": servers, "owners": {"alice": {"mcp_servers": ["time"]}}}
    async with proxy(**config) as (rt, _client):
        assert "hunter2-but-longer-0123" not in rt.redactor.text("pass: hunter2-but-longer-0123")
        mine = {tool.name for tool in (await rt.catalog(owner="alice")).tools}
        assert not any(name.startswith("fx.") for name in mine)
        assert any(name.startswith("fx.") for name in (tool.name for tool in (await rt.catalog(owner="local")).tools))


# ---- one answer over the message cap (issue 22, item 9) ----


class Release:
    """A FIFO an upstream tool (`fx.held`) reads one line from: the test writes it when the tool may return."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "release"
        os.mkfifo(self.path)
        self._read = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)  # so the write end opens; never read
        self._write = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)

    def send(self, line: str) -> None:
        os.write(self._write, f"{line}\n".encode())

    def close(self) -> None:
        os.close(self._read)
        os.close(self._write)


@pytest.fixture
def release(tmp_path: Path) -> Iterator[Release]:
    found = Release(tmp_path)
    yield found
    found.close()


async def oversized_answer_beside_a_call(
    client: Client, events: Events, release: Release, size: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """`fx.big` answering over the cap while `fx.held` is in flight on the same session: both tasks, finished."""
    held = await fired(client, "fx.held", release=str(release.path), events=str(events.path))
    await events.expect("started held")
    big = await run(client, "fx.big", size=size)
    release.send("go")
    return big, await finish(client, held["task_id"])


@pytest.mark.parametrize("tool", ["fx", "ts"])
async def test_an_answer_over_the_message_cap_fails_only_its_own_call(
    events: Events, release: Release, tool: str
) -> None:
    """The fixture (Python SDK) writes the id first; `--id-last` writes it last, as the TypeScript SDK does."""
    flags = ("--id-last",) if tool == "ts" else ()
    server = fixture_server(*flags, max_message_bytes=1024 * 1024)
    async with proxy(mcp_servers={"fx": server}) as (_rt, client):
        big, held = await oversized_answer_beside_a_call(client, events, release, 2_000_000)
        assert big["status"] == "failed" and big["error"]["kind"] == "upstream_error", big
        message = big["error"]["message"]
        assert re.search(r"was 4,0\d\d,\d\d\d bytes, over the 1,048,576-byte cap", message), message
        assert "the upstream's session goes on" in message and "Ask the tool for less" in message
        assert held["status"] == "completed", held
        assert held["result"]["content"] == [{"type": "text", "text": "released: go"}]
        again = await run(client, "fx.add", a=1, b=2)
        assert again["status"] == "completed" and again["pid"] == big["pid"] == held["pid"]  # never restarted


async def test_a_50_mb_answer_under_the_default_cap_fails_only_its_own_call(events: Events, release: Release) -> None:
    """The real size once: 50 MB of text is a ~100 MB message (content + structured content)."""
    async with proxy(mcp_servers={"fx": fixture_server()}) as (_rt, client):
        big, held = await oversized_answer_beside_a_call(client, events, release, 50_000_000)
        assert big["error"]["kind"] == "upstream_error", big
        assert re.search(r"was 100,000,\d{3} bytes, over the 67,108,864-byte cap", big["error"]["message"]), big
        assert held["status"] == "completed" and held["pid"] == big["pid"], held


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ('{"jsonrpc":"2.0","id":5,"result":{"text":"BIG"}}', 5),
        ('{"result":{"content":[{"id":9,"text":"BIG"}]},"jsonrpc":"2.0","id":7}', 7),  # TypeScript's order
        ('{"result":{"text":"BIG"},"jsonrpc":"2.0", "id" : "a\\"b\\\\" }', 'a"b\\'),
        ('{"result":{"text":"BIG","id":9}}', 3),  # no top-level id: the only request pending
        ('{"jsonrpc":"2.0","method":"notifications/message","params":{"data":"BIG"}}', None),
        ('{"jsonrpc":"2.0","id":8,"result":{"text":"BIG"}}', None),  # not one of ours
        ('{"jsonrpc":"2.0","id":true,"result":{"text":"BIG"}}', None),
    ],
)
def test_the_request_an_over_cap_answer_answers_is_read_from_either_end(message: str, expected: object) -> None:
    splitter = LineSplitter(max_bytes=4096)
    data = (message.replace("BIG", "x" * 100_000) + "\n{}\n").encode()
    lines = [line for at in range(0, len(data), 5000) for line in splitter.feed(data[at : at + 5000])]
    assert len(lines) == 2 and lines[1] == b"{}"
    oversized = lines[0]
    assert isinstance(oversized, Oversized) and oversized.size_bytes == len(data) - 4
    pending: set[int | str] = {3} if expected == 3 else {5, 7, 'a"b\\', 1}
    assert answered_id(oversized, pending) == expected


async def test_http_upstream_answers_are_capped_at_max_message_bytes_not_the_sdks_1_mib() -> None:
    async with everything_over_http("streamableHttp") as url:
        servers = {"web": {"url": url, "max_message_bytes": 64 * 1024}}
        async with proxy(mcp_servers=servers, max_argument_bytes=4 * 1024 * 1024) as (_rt, client):
            long_run = await fired(client, "web.trigger-long-running-operation", duration=3, steps=3)
            refused = await run(client, "web.echo", message="y" * 100_000)
            assert refused["error"]["kind"] == "upstream_error", refused
            assert "was bigger than that, over the 65,536-byte cap" in refused["error"]["message"]
            meanwhile = await call(client, "get_cached_output", task_id=long_run["task_id"])
            assert meanwhile["status"] == "running"  # in flight on the same session all along
            done = await finish(client, long_run["task_id"])
            assert done["status"] == "completed", done
        async with proxy(mcp_servers={"web": {"url": url}}, max_argument_bytes=4 * 1024 * 1024) as (_rt, client):
            echoed = await run(client, "web.echo", message="z" * 2_000_000)  # over the SDK's 1 MiB SSE event cap
            assert echoed["status"] == "completed", echoed
            assert echoed["result"]["truncated"] is True and echoed["output"]["total_bytes"] > 2_000_000


# ---- a listing names a lazy upstream's tools (issue 22, item 14) ----


async def test_a_listing_starts_the_owners_lazy_upstreams_and_names_their_tools(release: Release) -> None:
    servers = {"time": time_server(), "fx": fixture_server(), "slow": fixture_server("--hold-start", str(release.path))}
    config = {"mcp_servers": servers, "owners": {"alice": {"mcp_servers": ["time"]}, "bob": {"mcp_servers": ["slow"]}}}
    async with proxy(**config) as (rt, _client):
        assert rt.upstreams is not None
        upstreams = rt.upstreams.upstreams
        alices = {tool.name: tool for tool in (await rt.catalog(owner="alice")).tools}
        assert "time.*" not in alices and "time.convert_time" in alices
        current = alices["time.get_current_time"]
        assert "current time" in current.description.lower()
        assert "timezone" in current.input_schema["properties"]
        assert upstreams["fx"].attempts == upstreams["slow"].attempts == 0  # not alice's: never started

        rt.upstreams.list_wait_s = 0.5
        bobs = {tool.name: tool for tool in (await rt.catalog(owner="bob")).tools}
        assert bobs["slow.*"].note is not None and bobs["slow.*"].note.startswith("starting; call list_fireable_tools")
        release.send("go")
        await upstreams["slow"].ready()
        bobs = {tool.name: tool for tool in (await rt.catalog(owner="bob")).tools}
        assert "slow.*" not in bobs and bobs["slow.add"].description == "Adds two numbers (b at least 0)."


async def test_an_answer_over_the_sse_transports_1_mib_fails_only_its_own_call() -> None:
    """The older SSE transport's one stream carries every answer: one too big for the SDK ended the session."""
    async with (
        everything_over_http("sse") as url,
        proxy(mcp_servers={"web": {"url": url, "type": "sse"}}, max_argument_bytes=4 * 1024 * 1024) as (_rt, client),
    ):
        long_run = await fired(client, "web.trigger-long-running-operation", duration=3, steps=3)
        refused = await run(client, "web.echo", message="y" * 2_000_000)
        assert refused["error"]["kind"] == "upstream_error", refused
        assert re.search(r"was 2,000,\d{3} bytes, over the 1,04\d,\d{3}-byte cap", refused["error"]["message"])
        assert "the older SSE transport takes about 1 MiB a message" in refused["error"]["message"]
        assert (await call(client, "get_cached_output", task_id=long_run["task_id"]))["status"] == "running"
        assert (await finish(client, long_run["task_id"]))["status"] == "completed"
        assert (await run(client, "web.echo", message="small"))["status"] == "completed"
