"""Distributed mode for real: a redis-server, two workers and two front-ends as separate processes
(`testkit.cluster`), spoken to by the SDK's streamable HTTP client. Docket's memory backend is never used."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import warnings
from collections.abc import AsyncIterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
import redis
from conftest import ERAS, data, error_text, live_group_members
from mcp import Client
from mcp_types import ResourceUpdatedNotification

from server.config import Settings, load_settings
from server.distributed import docket_name
from server.errors import ConfigError
from server.runtime import Runtime
from testkit.cluster import Node, cluster, connect, start_node, stop_nodes
from testkit.processes import gone
from testkit.redis_server import RedisServer, free_port, until_redis

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture
async def nodes(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[list[Node]]:
    """Two workers (queues w0/w1 and `any`) and two front-ends, on the session's Redis; one preset, pinned
    to the queue w1, configured on all of them."""
    config = tmp_path / "offload.toml"
    config.write_text('[presets.pinned]\ncommand = "echo $PPID"\nqueue = "w1"\n')
    async with cluster(tmp_path, redis_server.url, config=config) as started:
        yield started


async def tool(client: Client, name: str, **arguments: Any) -> dict[str, Any]:
    return data(await client.call_tool(name, arguments))


async def until_running(client: Client, command: str, **fire: Any) -> tuple[dict[str, Any], Path]:
    """Fires `command` (which writes to $READY once running) and returns its fire reply once it runs:
    a FIFO turns readable when the command writes it. An event, bounded; no polling."""
    folder = Path(tempfile.mkdtemp(prefix="offload-dist-"))
    fifo = folder / "ready"
    os.mkfifo(fifo)
    os.mkfifo(folder / "gate")  # for a command that waits for the test: `read line < $GATE`
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        arguments = {"command": command.replace("$READY", str(fifo)).replace("$GATE", str(folder / "gate"))}
        fired = await tool(client, "fire_tool", tool="shell", arguments=arguments, **fire)
        with anyio.fail_after(20):
            await anyio.wait_readable(fd)
    finally:
        os.close(fd)
    return fired, folder


async def test_front_ends_share_tasks_workers_run_them_and_cancel_reaches_across(nodes: list[Node]) -> None:
    workers = [n for n in nodes if n.role == "worker"]
    front_ends = [n for n in nodes if n.role == "front-end"]
    async with connect(front_ends[0].url, ERAS["modern"]) as one, connect(front_ends[1].url, ERAS["legacy"]) as two:
        # fired on one front-end, collected on the other
        fired = await tool(one, "fire_tool", tool="shell", arguments={"command": "echo hello; echo from a worker"})
        polled = await tool(two, "poll_output", task_ids=[fired["task_id"]], timeout_s=20)
        assert polled["pending"] == [] and polled["unknown"] == [], polled
        view = polled["done"][0]
        assert view["status"] == "completed" and view["result"]["exit_code"] == 0, view
        assert view["output"]["text"] == "hello\nfrom a worker\n"
        again = await tool(one, "get_cached_output", task_id=fired["task_id"])
        assert again["output"]["text"] == "hello\nfrom a worker\n"
        assert fired["task_id"] in {t["task_id"] for t in (await tool(two, "list_tasks"))["tasks"]}

        # target routes to a queue: the command's parent is that worker
        for queue, worker in (("w1", workers[1]), ("w0", workers[0])):
            done = await tool(
                one, "fire_tool", tool="shell", arguments={"command": "echo $PPID"}, target=queue, wait_s=20
            )
            assert done["status"] == "completed", done
            assert done["task"]["output"]["text"] == f"{worker.process.pid}\n"
        pinned = await tool(one, "fire_tool", tool="pinned", arguments={}, wait_s=20)
        assert pinned["task"]["output"]["text"] == f"{workers[1].process.pid}\n"  # the preset's own queue

        # cancel on the other front-end stops the command on its worker
        running, _ = await until_running(one, "sleep 300 & echo ready > $READY; wait")
        pgid = (await tool(one, "get_cached_output", task_id=running["task_id"]))["pid"]
        assert pgid is not None and live_group_members(pgid)
        cancelled = await tool(two, "cancel_task", task_id=running["task_id"])
        assert cancelled["status"] == "cancelled", cancelled
        assert cancelled["error"]["kind"] == "cancelled_by_client"
        assert live_group_members(pgid) == []
        heard = await tool(one, "poll_output", task_ids=[running["task_id"]], timeout_s=10)
        assert heard["done"][0]["status"] == "cancelled"

        # visibility: the live workers and their queues; stats name the queue depths
        shown = json.loads((await one.read_resource("offload://workers")).contents[0].text)  # type: ignore[union-attr]
        by_pid = {w["pid"]: w for w in shown["workers"]}
        assert set(by_pid) == {w.process.pid for w in workers}
        assert by_pid[workers[1].process.pid]["queues"] == ["w1", "any"]
        waiting = await tool(one, "fire_tool", tool="shell", arguments={"command": "true"}, target="nobody")
        stats = json.loads((await two.read_resource("offload://stats")).contents[0].text)  # type: ignore[union-attr]
        assert stats["server"]["queues"] == {"nobody": 1}  # no worker takes that queue

        # cancelled before any worker took it: settled by the front-end that cancels, never started
        never = await tool(two, "cancel_task", task_id=waiting["task_id"])
        assert never["status"] == "cancelled" and "never started" in never["error"]["message"], never
        heard = await tool(one, "poll_output", task_ids=[waiting["task_id"]], timeout_s=10)
        assert heard["done"][0]["status"] == "cancelled"


async def test_a_cancel_sent_while_the_worker_was_not_subscribed_still_stops_the_command(
    nodes: list[Node], redis_server: RedisServer
) -> None:
    """Redis dropped every subscriber (an output-buffer limit, a failover) just before the cancel: the
    message is lost, the flag is not; the worker sees it once it subscribes again."""
    front_end = next(n for n in nodes if n.role == "front-end")
    async with connect(front_end.url) as client:
        fired, _ = await until_running(client, "echo > $READY; sleep 300")
        dropped = redis.Redis.from_url(redis_server.url).client_kill_filter(_type="pubsub")
        assert dropped >= 2  # the workers' cancel channels at least
        await client.call_tool("cancel_task", {"task_id": fired["task_id"]})
        polled = await tool(client, "poll_output", task_ids=[fired["task_id"]], timeout_s=20)
    assert polled["pending"] == [], polled
    view = polled["done"][0]
    assert (view["status"], view["error"]["kind"]) == ("cancelled", "cancelled_by_client"), view
    assert live_group_members(view["pid"]) == []


async def test_a_subscriber_on_one_front_end_hears_of_a_task_fired_on_the_other(nodes: list[Node]) -> None:
    front_ends = [n for n in nodes if n.role == "front-end"]
    finished = anyio.Event()
    uri = ""

    async def on_message(message: object) -> None:
        if isinstance(message, ResourceUpdatedNotification) and message.params.uri == uri:
            finished.set()

    async with (
        connect(front_ends[0].url) as one,
        connect(front_ends[1].url, ERAS["legacy"], message_handler=on_message) as two,
    ):
        go = Path(tempfile.mkdtemp(prefix="offload-dist-")) / "go"
        os.mkfifo(go)
        hold, _ = await until_running(one, f"echo ready > $READY; read line < {go}")
        uri = hold["resource"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # resources/subscribe is the 2025-11-25 era's way
            await two.subscribe_resource(uri)
        await anyio.to_thread.run_sync(go.write_text, "go\n")
        with anyio.fail_after(20):
            while True:  # an update may be another change: the finish is the one wanted
                await finished.wait()
                finished = anyio.Event()
                if (await tool(two, "get_cached_output", task_id=hold["task_id"]))["status"] == "completed":
                    break


async def test_kill_9_a_front_end_then_a_worker_nothing_is_lost_or_run_twice(nodes: list[Node], tmp_path: Path) -> None:
    front_ends = [n for n in nodes if n.role == "front-end"]
    side = tmp_path / "side-effect"
    async with connect(front_ends[0].url) as one:
        collected, _ = await until_running(one, "echo ready > $READY; echo still here")
        interrupted, _ = await until_running(one, f"echo ran >> {side}; sleep 300 & echo ready > $READY; wait")
        pgid = (await tool(one, "get_cached_output", task_id=interrupted["task_id"]))["pid"]
    await front_ends[0].kill_9()  # its tasks go on, and are collected on the other front-end
    async with connect(front_ends[1].url) as two:
        polled = await tool(two, "poll_output", task_ids=[collected["task_id"]], timeout_s=20)
        assert polled["done"][0]["status"] == "completed", polled
        assert "still here" in polled["done"][0]["output"]["text"]

        runner = next(n for n in nodes if n.role == "worker" and _runs(n, pgid))
        await runner.kill_9()  # mid-command: the task settles, and is never run again
        polled = await tool(two, "poll_output", task_ids=[interrupted["task_id"]], timeout_s=15)
    assert polled["pending"] == [], polled
    settled = polled["done"][0]
    assert settled["status"] == "failed" and settled["error"]["kind"] == "interrupted", settled
    assert side.read_text() == "ran\n"
    assert live_group_members(pgid) == []  # the surviving worker killed what the dead one left


async def test_a_front_end_stopped_with_sigterm_leaves_its_tasks_running_for_the_others(nodes: list[Node]) -> None:
    front_ends = [n for n in nodes if n.role == "front-end"]
    async with connect(front_ends[0].url) as one:
        fired, folder = await until_running(one, "echo ready > $READY; read line < $GATE; echo got $line")
    front_ends[0].process.terminate()
    with anyio.fail_after(5):  # its tasks run on workers: nothing of its own to stop and wait for
        await front_ends[0].process.wait()
    with open(folder / "gate", "w") as gate:  # the command's read is waiting: no block
        gate.write("on\n")
    async with connect(front_ends[1].url) as two:
        polled = await tool(two, "poll_output", task_ids=[fired["task_id"]], timeout_s=20)
    assert polled["done"][0]["status"] == "completed", polled
    assert polled["done"][0]["output"]["text"] == "got on\n"


async def test_with_every_worker_dead_a_front_end_settles_their_tasks_naming_the_worker(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with cluster(tmp_path, redis_server.url, front_ends=1, workers=1) as started:
        worker, front_end = started
        async with connect(front_end.url) as client:
            fired, _ = await until_running(client, "sleep 300 & echo ready > $READY; wait")
            await worker.kill_9()  # the only worker: no other is left to settle its task
            polled = await tool(client, "poll_output", task_ids=[fired["task_id"]], timeout_s=15)
    assert polled["pending"] == [], front_end.log.decode()[-3000:]
    error = polled["done"][0]["error"]
    assert error["kind"] == "interrupted", error
    assert f"#{worker.process.pid}" in error["message"], error  # which worker stopped
    assert "no worker is left" in error["message"], error


async def test_a_front_end_started_with_worker_runs_tasks_fired_on_any_front_end(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with anyio.create_task_group() as tg:
        both = await start_node(tg, tmp_path, "front-end", redis_server.url, "f0", "--worker")
        plain = await start_node(tg, tmp_path, "front-end", redis_server.url, "f1")
        try:
            async with connect(plain.url) as client:
                fired = await tool(client, "fire_tool", tool="shell", arguments={"command": "echo $PPID"})
                polled = await tool(client, "poll_output", task_ids=[fired["task_id"]], timeout_s=20)
                assert polled["done"][0]["status"] == "completed", polled
                shell_parent = int(polled["done"][0]["output"]["text"])
                assert shell_parent == both.process.pid  # the front-end with --worker ran it: no worker runs
                waiting, _ = await until_running(client, "sleep 300 & echo ready > $READY; wait")
                await stop_nodes([both])  # its own task is stopped and settled, not left running
                polled = await tool(client, "poll_output", task_ids=[waiting["task_id"]], timeout_s=20)
            assert polled["done"][0]["status"] in ("cancelled", "failed"), polled
            assert live_group_members(polled["done"][0]["pid"]) == []
        finally:
            await stop_nodes([both, plain])
            tg.cancel_scope.cancel()
            for node in (both, plain):
                await node.process.aclose()


async def test_an_identical_get_on_the_other_front_end_joins_the_one_in_flight(nodes: list[Node]) -> None:
    """A cacheable call (an HTTP GET) fired on two front-ends while it runs reaches its server once."""
    hits: list[str] = []
    reached, release = threading.Event(), threading.Event()

    class Slow(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            reached.set()
            release.wait(30)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"slow answer")

        def log_message(self, *_args: object) -> None:
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    fire = {"tool": "http.request", "arguments": {"url": f"http://127.0.0.1:{http.server_port}/slow"}}
    front_ends = [n for n in nodes if n.role == "front-end"]
    try:
        async with connect(front_ends[0].url) as one, connect(front_ends[1].url) as two:
            first = await tool(one, "fire_tool", **fire)
            assert await anyio.to_thread.run_sync(reached.wait, 20)  # the worker's request is at the server
            joined = await tool(two, "fire_tool", **fire)
            assert (joined["task_id"], joined["deduplicated"]) == (first["task_id"], True)
            to_any = await tool(two, "fire_tool", **fire, target="any")  # the queue it went to anyway
            assert (to_any["task_id"], to_any["deduplicated"]) == (first["task_id"], True)
            release.set()
            polled = await tool(two, "poll_output", task_ids=[joined["task_id"]], timeout_s=20)
            assert polled["done"][0]["status"] == "completed", polled
            again = await tool(two, "fire_tool", **fire)
            assert (again["task_id"], again["cached"]) == (first["task_id"], True)
    finally:
        release.set()
        http.shutdown()
        http.server_close()
    assert hits == ["/slow"]


async def test_a_task_settled_while_its_paused_worker_held_it_never_starts_there(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A worker paused past its lease holds A (running) and B (taken, waiting for a slot). A front-end
    settles both `interrupted` and a client reads that. When the worker resumes, B must not start (it was
    reported as never run), what is left of A is stopped, and neither outcome may flip."""
    side = tmp_path / "side"
    async with anyio.create_task_group() as tg:
        flags = ("--queue", "any", "--queue", "q1", "--max-concurrency", "1")
        worker = await start_node(tg, tmp_path, "worker", redis_server.url, "w0", *flags)
        front_end = await start_node(tg, tmp_path, "front-end", redis_server.url, "f0")
        try:
            async with connect(front_end.url) as client:
                a, _ = await until_running(client, f"echo A >> {side}; echo > $READY; read line < $GATE")
                b = await tool(
                    client, "fire_tool", tool="shell", arguments={"command": f"echo B >> {side}"}, target="q1"
                )
                await worker.wait_for_log(b"offload_run")  # Docket handed B to the worker: it waits for a slot
                worker.process.send_signal(signal.SIGSTOP)
                settled = await tool(client, "poll_output", task_ids=[a["task_id"], b["task_id"]], timeout_s=20)
                assert settled["pending"] == [], settled
                before = {v["task_id"]: (v["status"], v["error"]["kind"]) for v in settled["done"]}
                assert set(before.values()) == {("failed", "interrupted")}, before
                worker.process.send_signal(signal.SIGCONT)  # it learns both were settled: stops A, never starts B
                a_pid = next(v["pid"] for v in settled["done"] if v["task_id"] == a["task_id"])
                assert await gone(a_pid, timeout_s=20)  # what was left of A is stopped
                await until_redis(lambda: _running(redis_server, tmp_path) == [0], redis_server.url)  # B is done with
                after = await tool(client, "poll_output", task_ids=[a["task_id"], b["task_id"]], timeout_s=0)
            assert {v["task_id"]: (v["status"], v["error"]["kind"]) for v in after["done"]} == before
            assert side.read_text() == "A\n"  # B never ran
        finally:
            worker.process.send_signal(signal.SIGCONT)
            await stop_nodes([worker, front_end])
            tg.cancel_scope.cancel()
            for node in (worker, front_end):
                await node.process.aclose()


async def test_a_worker_front_end_killed_mid_command_ends_it_when_it_starts_again(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A front-end with `--worker` keeps its process table as a worker does: killed -9 mid-command and
    started again on its data directory, it ends what it left running (its commands outlived it)."""
    async with anyio.create_task_group() as tg:
        both = await start_node(tg, tmp_path, "front-end", redis_server.url, "f0", "--worker")
        async with connect(both.url) as client:
            fired, _ = await until_running(client, "sleep 300 & echo > $READY; wait")
            pid = (await tool(client, "get_cached_output", task_id=fired["task_id"]))["pid"]
        await both.kill_9()
        await both.process.aclose()
        assert live_group_members(pid), "kill -9 leaves its command running"
        again = await start_node(tg, tmp_path, "front-end", redis_server.url, "f0", "--worker")
        try:
            assert await gone(pid, timeout_s=20)
            async with connect(again.url) as client:
                polled = await tool(client, "poll_output", task_ids=[fired["task_id"]], timeout_s=20)
            assert (polled["done"][0]["status"], polled["done"][0]["error"]["kind"]) == ("failed", "interrupted")
            assert live_group_members(pid) == []
        finally:
            await stop_nodes([again])
            tg.cancel_scope.cancel()
            await again.process.aclose()


async def test_a_command_whose_record_a_redis_restart_lost_is_stopped_by_its_worker(tmp_path: Path) -> None:
    """Nobody can collect a task whose record Redis forgot (restarted without persistence): its worker
    stops the command instead of letting it run out its course unseen."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        async with cluster(tmp_path, server.url, front_ends=1, workers=1) as (_, front_end):
            async with connect(front_end.url) as client:
                fired, _ = await until_running(client, "sleep 300 & echo > $READY; wait")
                pid = (await tool(client, "get_cached_output", task_id=fired["task_id"]))["pid"]
            server.stop()
            server.start()  # the same port, empty
            assert await gone(pid, timeout_s=20)
            assert live_group_members(pid) == []
    finally:
        server.stop()


async def test_an_owners_cap_on_unfinished_tasks_holds_across_front_ends(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """`max_active_per_owner` was counted per front-end: an owner behind a load balancer had twice its
    cap. No worker runs here, so every fired task stays queued (unfinished)."""
    cap = {"OFFLOAD_MAX_ACTIVE_PER_OWNER": "2"}
    async with anyio.create_task_group() as tg:
        one = await start_node(tg, tmp_path, "front-end", redis_server.url, "f0", extra_env=cap)
        two = await start_node(tg, tmp_path, "front-end", redis_server.url, "f1", extra_env=cap)
        try:
            async with connect(one.url) as first, connect(two.url) as second:
                fired = [await tool(first, "fire_tool", tool="shell", arguments={"command": "true"}) for _ in "ab"]
                refused = await second.call_tool("fire_tool", {"tool": "shell", "arguments": {"command": "true"}})
                assert "You already have 2 tasks queued or running" in error_text(refused), error_text(refused)
                await tool(second, "cancel_task", task_id=fired[0]["task_id"])  # room again, on any front-end
                assert (await tool(second, "fire_tool", tool="shell", arguments={"command": "true"}))["task_id"]
        finally:
            await stop_nodes([one, two])
            tg.cancel_scope.cancel()
            for node in (one, two):
                await node.process.aclose()


def _running(redis_server: RedisServer, tmp_path: Path) -> list[int]:
    """What each worker's heartbeat says it runs (their namespace is the test's, see testkit.cluster)."""
    namespace = tmp_path.name[-60:]
    raw = redis.Redis.from_url(redis_server.url).hvals(f"{namespace}:workers")
    return [json.loads(value)["running"] for value in raw]


def _runs(worker: Node, pgid: int) -> bool:
    """Is `pgid` a child of this worker's process (the command's shell is the worker's child)?"""
    try:
        with open(f"/proc/{pgid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1]) == worker.process.pid
    except OSError:
        return False


@pytest.mark.parametrize("where", ["address", "query"])
async def test_redis_down_fire_names_redis_url_with_the_password_masked(tmp_path: Path, where: str) -> None:
    """The password of redis_url is masked wherever the URL carries it: `redis://:PW@host` or `?password=PW`
    (which redis-py reads too, and which leaked into every message)."""
    secret = "s3cret-pa55word"
    server = RedisServer(tmp_path / "redis", auth=False, extra_args=("--requirepass", secret))
    server.start()
    address = f"127.0.0.1:{server.port}/0"
    url = f"redis://:{secret}@{address}" if where == "address" else f"redis://{address}?password={secret}"
    masked = f"redis://***@{address}" if where == "address" else f"redis://{address}?password=***"
    try:
        async with anyio.create_task_group() as tg:
            front_end = await start_node(tg, tmp_path, "front-end", url, "f")
            try:
                async with connect(front_end.url) as client:
                    done = await tool(client, "fire_tool", tool="shell", arguments={"command": "true"})
                    assert done["status"] in ("queued", "running", "completed")
                    server.stop()
                    result = await client.call_tool("fire_tool", {"tool": "shell", "arguments": {"command": "true"}})
                    text = error_text(result)
                    assert f"redis_url={masked}" in text, text
                    assert secret not in text
                    server.start()  # back: fire works again
                    again = await tool(client, "fire_tool", tool="shell", arguments={"command": "true"})
                    assert again["task_id"]
            finally:
                await stop_nodes([front_end])
                tg.cancel_scope.cancel()
        await front_end.process.aclose()
        assert secret.encode() not in front_end.log
    finally:
        server.stop()


async def test_a_front_end_without_redis_refuses_to_start_naming_redis_url(tmp_path: Path) -> None:
    url = f"redis://:hunter2hunter2@127.0.0.1:{free_port()}/0"
    with pytest.raises(ConfigError, match=r"redis_url=redis://\*\*\*@127\.0\.0\.1:\d+/0 does not answer") as caught:
        async with Runtime.open(Settings(redis_url=url, data_dir=tmp_path / "data"), load_plugins=False):
            pass
    assert "hunter2" not in str(caught.value)


def test_distributed_settings_are_checked_and_never_echo_the_password() -> None:
    with pytest.raises(ConfigError, match=r"redis_url = 'http://\*\*\*@h': .*redis:// or rediss://") as caught:
        load_settings(environ={"OFFLOAD_REDIS_URL": "http://u:hunter2hunter2@h"})
    assert "hunter2" not in str(caught.value)
    with pytest.raises(ConfigError, match="presets pinned name a worker queue, which needs distributed mode"):
        load_settings(overrides={"presets": {"pinned": {"command": "make", "queue": "w1"}}})
    with pytest.raises(ConfigError, match="detach"):
        load_settings(environ={"OFFLOAD_REDIS_URL": "redis://h/0", "OFFLOAD_DETACH": "true"})


def test_two_namespaces_never_share_a_docket_queue() -> None:
    """`tenA` + queue `x-queue-build` and `tenA-queue-x` + queue `build` were one Docket (its jobs run by
    the other deployment's workers, the sender's task queued for ever)."""
    assert docket_name("tenA", "x-queue-build") != docket_name("tenA-queue-x", "build")
