"""Leases across a Redis outage, and the outcome that stays: in distributed mode every lease lives in Redis,
so an outage longer than `lease_s` lets every live process's lease lapse at once. Nobody may then be taken
for dead (and its command killed, its task settled `interrupted`) just because Redis was away; and a
process that was taken for dead (paused past its lease) never flips an outcome already recorded.

The outage is real: the processes reach Redis through a `TcpProxy` that the test cuts (connections reset,
new ones refused) while Redis, and every key's expiry, runs on."""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest
import redis
from conftest import data
from mcp import Client

from server.errors import StoreUnreachableError
from server.redis_store import RedisStore
from server.tasks import Status, Task
from testkit.cluster import Node, cluster, connect, start_node, stop_nodes
from testkit.redis_server import RedisServer, until_redis
from testkit.tcp_proxy import TcpProxy
from tools.registry import ToolSpec

pytestmark = pytest.mark.anyio

LEASE_S = 2.0


def _spec_of(name: str) -> ToolSpec | None:
    return None


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[TcpProxy]:
    with TcpProxy(redis_server.port, userinfo=redis_server.userinfo) as opened:
        yield opened


def _task(store: RedisStore) -> Task:
    task_id = secrets.token_urlsafe(12)
    return Task(
        id=task_id, tool="t", owner="alice", created_at=time.time(), ttl_s=60, output=store.new_output(task_id, 4096)
    )


async def test_after_an_outage_no_lease_is_trusted_until_this_process_had_redis_for_a_whole_lease(
    proxy: TcpProxy, redis_server: RedisServer, tmp_path: Path
) -> None:
    namespace = f"t{secrets.token_hex(6)}"
    holder = RedisStore.open(redis_server.url, tmp_path / "a", namespace=namespace, lease_s=LEASE_S)
    watcher = RedisStore.open(proxy.url(), tmp_path / "b", namespace=namespace, lease_s=LEASE_S)
    try:
        task = _task(holder)
        holder.add(task)
        holder.close()  # its lease is gone: its task is an orphan
        now = time.time()

        proxy.cut()
        with pytest.raises(StoreUnreachableError):
            watcher.heartbeat(now)
        proxy.restore()
        watcher.heartbeat(now + 1)  # Redis answers again from here

        assert watcher.claim_orphans(now + 1, _spec_of) == []  # every lease may have lapsed in the outage
        assert watcher.claim_if_orphan(task.id, _spec_of, now + 1 + LEASE_S - 0.01) is None
        claimed = watcher.claim_orphans(now + 1 + LEASE_S, _spec_of)  # a whole lease later: dead is dead
        assert [t.id for t in claimed] == [task.id]
    finally:
        watcher.close()


async def test_the_first_outcome_recorded_stays_and_the_late_one_is_refused(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    namespace = f"t{secrets.token_hex(6)}"
    paused = RedisStore.open(redis_server.url, tmp_path / "a", namespace=namespace, lease_s=LEASE_S)
    settler = RedisStore.open(redis_server.url, tmp_path / "b", namespace=namespace, lease_s=LEASE_S)
    try:
        task = _task(paused)
        paused.add(task)
        other = settler.load(task.id, _spec_of)
        assert other is not None
        other.status, other.finished_at = Status.FAILED, time.time()
        assert settler.record_outcome(other)

        task.status, task.finished_at, task.result = Status.COMPLETED, time.time(), {"late": True}
        assert not paused.record_outcome(task)
        stored = settler.load(task.id, _spec_of)
        assert stored is not None and stored.status is Status.FAILED and stored.result is None
    finally:
        paused.close()
        settler.close()


# ---- the whole cluster through an outage ----


@pytest.fixture
async def nodes(tmp_path: Path, proxy: TcpProxy) -> AsyncIterator[list[Node]]:
    async with cluster(tmp_path, proxy.url(), front_ends=1, lease_s=LEASE_S) as started:
        yield started


async def _fire_gated(client: Client, target: str, folder: Path) -> tuple[str, Path]:
    """A command on `target`'s worker that says it runs (a FIFO turns readable), then waits for its gate."""
    ready, gate, side = folder / f"ready-{target}", folder / f"gate-{target}", folder / f"ran-{target}"
    os.mkfifo(ready)
    os.mkfifo(gate)
    command = f"echo ran >> {side}; echo up > {ready}; read line < {gate}; echo finished $line"
    fd = os.open(ready, os.O_RDONLY | os.O_NONBLOCK)
    try:
        fired = data(
            await client.call_tool("fire_tool", {"tool": "shell", "arguments": {"command": command}, "target": target})
        )
        with anyio.fail_after(20):
            await anyio.wait_readable(fd)
    finally:
        os.close(fd)
    return str(fired["task_id"]), gate


@pytest.mark.slow
async def test_an_outage_longer_than_the_lease_kills_nothing_and_every_command_ends_as_it_really_did(
    nodes: list[Node], proxy: TcpProxy, redis_server: RedisServer, tmp_path: Path
) -> None:
    direct = redis.Redis.from_url(redis_server.url)
    namespace = tmp_path.name[-60:]
    front_end = next(n for n in nodes if n.role == "front-end")
    folder = Path(tempfile.mkdtemp(prefix="offload-outage-"))
    async with connect(front_end.url) as client:
        fired = [await _fire_gated(client, target, folder) for target in ("w0", "w1")]

    proxy.cut()  # until every process's lease has lapsed in Redis
    await until_redis(lambda: not direct.keys(f"{namespace}:instance:*"), redis_server.url)  # every lease lapsed
    restored_at = time.time()
    proxy.restore()

    def steady() -> bool:  # both workers heard from a whole lease after Redis came back
        beats = [json.loads(raw)["heartbeat_at"] for raw in direct.hvals(f"{namespace}:workers")]
        return len(beats) == 2 and min(beats) >= restored_at + LEASE_S

    await until_redis(steady, redis_server.url)
    for _, gate in fired:
        with open(gate, "w") as f:  # a FIFO whose reader waits: no block
            f.write("ok\n")
    async with connect(front_end.url) as client:
        polled = data(await client.call_tool("poll_output", {"task_ids": [t for t, _ in fired], "timeout_s": 30}))
    assert polled["pending"] == [], polled
    for view in polled["done"]:
        assert view["status"] == "completed", view  # not interrupted, not killed
        assert "finished ok" in view["output"]["text"], view
    for target in ("w0", "w1"):
        assert (folder / f"ran-{target}").read_text() == "ran\n"  # and never run twice
    assert b"another server had already settled it" not in b"".join(n.log for n in nodes)


def test_a_stalled_redis_fails_a_call_well_inside_a_lease_and_a_refusing_one_at_once(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The client is synchronous: a call held past a lease would let this process be taken for dead, and
    redis-py's default retries with backoff hold the event loop for seconds while Redis refuses."""
    store = RedisStore.open(redis_server.url, tmp_path / "s", namespace=f"t{secrets.token_hex(6)}", lease_s=6.0)
    try:
        options = store.redis.connection_pool.connection_kwargs
        assert options["socket_timeout"] <= 6.0 / 3 and options["socket_connect_timeout"] <= 6.0 / 3
        retry = store.redis.get_retry()
        assert retry is not None and retry.get_retries() == 1
    finally:
        store.close()


async def test_a_task_is_its_front_ends_until_queued_and_a_worker_that_took_it_keeps_it(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A front-end killed between recording a task and queueing its job leaves no task queued forever: until
    `hand_off` the task is the front-end's, settled when it dies. And a hand-off that comes after a worker
    took the task never takes it from that worker (whose death must settle it)."""
    namespace = f"t{secrets.token_hex(6)}"

    def store(name: str) -> RedisStore:
        return RedisStore.open(redis_server.url, tmp_path / name, namespace=namespace, lease_s=LEASE_S)

    front, worker, survivor = store("front"), store("worker"), store("survivor")
    try:
        never_queued, taken = _task(front), _task(front)
        front.add(never_queued)
        front.add(taken)
        assert worker.take_fence(taken.id, "w-test") == ("ok", "")
        front.hand_off(taken)  # late: the worker holds it
        front.close()  # killed before queueing `never_queued`
        claimed = survivor.claim_orphans(time.time(), _spec_of)
        assert [t.id for t in claimed] == [never_queued.id]
        worker.close()
        assert [t.id for t in survivor.claim_orphans(time.time(), _spec_of)] == [taken.id]
    finally:
        survivor.close()


@pytest.mark.slow
async def test_commands_that_end_during_a_short_outage_are_recorded_whole_once_redis_answers(
    tmp_path: Path, proxy: TcpProxy, redis_server: RedisServer
) -> None:
    """Only the worker loses Redis, for less than a lease, while a silent and a loud command end: it holds
    their outcomes and output, writes them once Redis answers, and lives on (a silent command's end
    asked Redis for its output's size and took the whole worker down)."""
    folder = Path(tempfile.mkdtemp(prefix="offload-blip-"))
    fifos = {name: folder / name for name in ("ready1", "ready2", "gate", "done1", "done2")}
    for fifo in fifos.values():
        os.mkfifo(fifo)
    silent = f"echo > {fifos['ready1']}; read line < {fifos['gate']}; echo > {fifos['done1']}"
    loud = f"echo one; echo > {fifos['ready2']}; read line < {fifos['gate']}; echo two; echo > {fifos['done2']}"
    async with anyio.create_task_group() as tg:
        worker = await start_node(tg, tmp_path, "worker", proxy.url(), "w0", lease_s=10)
        front_end = await start_node(tg, tmp_path, "front-end", redis_server.url, "f0", lease_s=10)
        try:
            async with connect(front_end.url) as client:
                fired = []
                for command, ready in ((silent, "ready1"), (loud, "ready2")):
                    fire = {"tool": "shell", "arguments": {"command": command}}
                    fired.append(data(await client.call_tool("fire_tool", fire))["task_id"])
                    await _read_fifo(fifos[ready])
                proxy.cut()
                with open(fifos["gate"], "w") as gate:  # both commands wait at their read: no block
                    gate.write("go\ngo\n")
                await _read_fifo(fifos["done1"])
                await _read_fifo(fifos["done2"])
                await worker.wait_for_log(b"holding task changes")  # they ended while Redis was away
                proxy.restore()
                polled = data(await client.call_tool("poll_output", {"task_ids": fired, "timeout_s": 30}))
            assert polled["pending"] == [], polled
            views = {view["task_id"]: view for view in polled["done"]}
            assert [views[t]["status"] for t in fired] == ["completed", "completed"], views
            assert views[fired[1]]["output"]["text"] == "one\ntwo\n"
            assert worker.process.returncode is None  # and the worker lives on
        finally:
            await stop_nodes([worker, front_end])
            tg.cancel_scope.cancel()
            for node in (worker, front_end):
                await node.process.aclose()


async def _read_fifo(path: Path, timeout_s: float = 20.0) -> None:
    """Waits, bounded, for a command to write a line to the FIFO (opened without blocking the loop)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with anyio.fail_after(timeout_s):
            await anyio.wait_readable(fd)
    finally:
        os.close(fd)


@pytest.mark.slow
async def test_a_task_whose_start_redis_cannot_take_never_starts(
    tmp_path: Path, proxy: TcpProxy, redis_server: RedisServer
) -> None:
    """A worker cut from Redis would start a task the cluster may already report as never started (its
    lease lapsing meanwhile): a start Redis did not take is no start. The task fails saying nothing ran."""
    folder = Path(tempfile.mkdtemp(prefix="offload-start-"))
    side, ready, gate = folder / "side", folder / "ready", folder / "gate"
    os.mkfifo(ready)
    os.mkfifo(gate)
    async with anyio.create_task_group() as tg:
        flags = ("--queue", "any", "--queue", "q1", "--max-concurrency", "1")
        worker = await start_node(tg, tmp_path, "worker", proxy.url(), "w0", *flags, lease_s=10)
        front_end = await start_node(tg, tmp_path, "front-end", redis_server.url, "f0", lease_s=10)
        try:
            async with connect(front_end.url) as client:
                a_command = f"echo A >> {side}; echo > {ready}; read line < {gate}"
                fire = {"tool": "shell", "arguments": {"command": a_command}}
                a = data(await client.call_tool("fire_tool", fire))["task_id"]
                await _read_fifo(ready)
                fire = {"tool": "shell", "arguments": {"command": f"echo B >> {side}"}, "target": "q1"}
                b = data(await client.call_tool("fire_tool", fire))["task_id"]
                await worker.wait_for_log(f"{{{b}}}".encode())  # Docket handed B over: it waits for A's slot
                proxy.cut()
                with open(gate, "w") as opened:  # A's read waits: no block
                    opened.write("go\n")
                await worker.wait_for_log(b"does not start")  # A ended; B's start was not recorded
                proxy.restore()
                polled = data(await client.call_tool("poll_output", {"task_ids": [a, b], "timeout_s": 30}))
            views = {view["task_id"]: view for view in polled["done"]}
            assert views[a]["status"] == "completed", views
            assert views[b]["status"] == "failed" and "nothing of it ran" in views[b]["error"]["message"], views
            assert side.read_text() == "A\n"  # B never ran
        finally:
            await stop_nodes([worker, front_end])
            tg.cancel_scope.cancel()
            for node in (worker, front_end):
                await node.process.aclose()
