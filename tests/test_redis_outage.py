"""A Redis outage in distributed mode loses nothing silently: against a real redis-server reached through a
loopback proxy the test cuts (connections reset, new ones refused) while Redis runs on. What the store
and its logs could not write is held and written once Redis answers again; output the ring moved past
meanwhile is reported as `dropped`. Whatever is checked is read through a second store connected
directly, never through the proxy."""

from __future__ import annotations

import logging
import random
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from pydantic import BaseModel
from redis.backoff import NoBackoff
from redis.retry import Retry

from server.redis_store import RedisLog, RedisStore
from server.tasks import Status, Task
from testkit.redis_server import RedisServer
from testkit.tcp_proxy import TcpProxy
from tools.context import ProcessInfo

NOW = 1_800_000_000.0
WAIT_S = 5.0
"""The most a test waits for a message on the change channel."""


class Args(BaseModel):
    n: int


@dataclass
class Pair:
    """A store whose Redis the test can cut (`through`, behind `proxy`), and one that always reaches it."""

    proxy: TcpProxy
    through: RedisStore
    direct: RedisStore


@pytest.fixture
def pair(redis_server: RedisServer, tmp_path: Path) -> Iterator[Pair]:
    namespace = f"test-{secrets.token_hex(6)}"
    with TcpProxy(redis_server.port, userinfo=redis_server.userinfo) as proxy:
        # No retries inside the client: a cut fails the call at once (the default retries for seconds).
        client = redis.Redis.from_url(proxy.url(), socket_connect_timeout=2.0, retry=Retry(NoBackoff(), 0))
        through = RedisStore(client, proxy.url(), tmp_path / "through", namespace=namespace)
        through.heartbeat(NOW)
        direct = RedisStore.open(redis_server.url, tmp_path / "direct", namespace=namespace, now=NOW)
        yield Pair(proxy, through, direct)
        proxy.restore()
        through.close()
        direct.close()


def text(length: int) -> bytes:
    """Printable ASCII in no period, so a byte read from the wrong offset shows (and no read is cut short
    to keep a character whole)."""
    return bytes(random.Random(length).choices(range(33, 127), k=length))


def write_in(writer: RedisLog, data: bytes, size: int) -> None:
    for at in range(0, len(data), size):
        writer.write(data[at : at + size])


def stream_length(pair: Pair, task_id: str) -> int:
    return int(pair.direct.redis.xlen(pair.direct.key("out", task_id)))


def finished_flag(pair: Pair, task_id: str) -> bytes | None:
    value: bytes | None = pair.direct.redis.hget(pair.direct.key("outmeta", task_id), "finished")
    return value


# ---- output ----


@pytest.mark.parametrize("write_size", [1, 7, 300])
def test_output_written_before_during_and_after_a_cut_reads_back_whole(pair: Pair, write_size: int) -> None:
    data = text(3000)
    writer = pair.through.new_output("t1", 1 << 20)
    reader = pair.direct.new_output("t1", 1024)
    write_in(writer, data[:1000], write_size)
    assert reader.total_bytes == 1000
    pair.proxy.cut()
    write_in(writer, data[1000:2000], write_size)
    assert reader.total_bytes == 1000  # a reader never counts a byte Redis does not hold
    assert pair.through.flush() == 1  # the log still holds its bytes
    pair.proxy.restore()
    write_in(writer, data[2000:], write_size)  # still held: the next flush or the finish writes them
    writer.finish()
    whole = reader.read(0, 10_000)
    assert (whole.data, whole.offset, whole.next_offset, whole.total_bytes) == (data, 0, 3000, 3000)
    assert whole.dropped is None and not whole.truncated
    middle = reader.read(1500, 100)
    assert (middle.data, middle.offset, middle.next_offset) == (data[1500:1600], 1500, 1600)
    assert finished_flag(pair, "t1") == b"1"
    assert pair.through.flush() == 0


def test_a_finish_during_a_cut_is_marked_by_the_heartbeat_after_it(pair: Pair) -> None:
    data = text(500)
    writer = pair.through.new_output("t2", 1 << 20)
    writer.write(data[:200])
    pair.proxy.cut()
    writer.write(data[200:])
    writer.finish()
    assert finished_flag(pair, "t2") is None  # not finished while bytes are held
    pair.proxy.restore()
    pair.through.heartbeat(NOW + 1)
    assert finished_flag(pair, "t2") == b"1"
    chunk = pair.direct.new_output("t2", 1024).read(0, 1000)
    assert (chunk.data, chunk.total_bytes, chunk.dropped) == (data, 500, None)
    assert pair.through.flush() == 0


@pytest.mark.parametrize("write_size", [1, 100, 700])
def test_held_pieces_the_ring_moves_past_are_reported_dropped_and_the_bytes_around_them_are_exact(
    pair: Pair, write_size: int
) -> None:
    data = text(3600)
    writer = pair.through.new_output("t3", 1000)  # head 500, ring 500
    writer.write(data[:600])  # the head, and a ring entry at 500
    pair.proxy.cut()
    write_in(writer, data[600:], write_size)  # the ring moves past 500.. and past the first held piece
    pair.proxy.restore()
    writer.finish()
    reader = pair.direct.new_output("t3", 1024)
    head = reader.read(0, 10_000)
    assert head.data == data[:500] and head.dropped == (500, 3100) and head.next_offset == 3100
    rest = reader.read(head.next_offset, 10_000)
    assert (rest.data, rest.offset, rest.total_bytes, rest.truncated) == (data[3100:], 3100, 3600, False)
    assert reader.read(1000, 10).offset == 3100  # a read inside the gap starts after it
    assert stream_length(pair, "t3") == 2  # the head entry and one ring entry: nothing left behind


def test_a_retry_after_a_lost_exec_reply_counts_the_entries_already_stored(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    writer = pair.through.new_output("t4", 1 << 20)
    pair.proxy.cut()
    writer.write(b"abc")  # sent, failed
    # ... but say the EXEC reached Redis and only its reply was lost: what it wrote is there.
    direct = pair.direct.redis
    direct.xadd(pair.direct.key("out", "t4"), {"d": b"abc"}, id="0-1")
    direct.hset(pair.direct.key("outmeta", "t4"), mapping={"head": 1 << 19, "total": 3, "ring_from": 3})
    writer.write(b"def")
    pair.proxy.restore()
    with caplog.at_level(logging.WARNING, logger="server.redis_store"):
        writer.finish()  # its XADD of 0-1 is refused: "equal or smaller than the target stream top item"
    assert not [r for r in caplog.records if "refused" in r.getMessage()]
    chunk = pair.direct.new_output("t4", 1024).read(0, 100)
    assert (chunk.data, chunk.total_bytes, chunk.dropped) == (b"abcdef", 6, None)
    assert stream_length(pair, "t4") == 2
    assert finished_flag(pair, "t4") == b"1"
    assert pair.through.flush() == 0


def test_a_piece_a_lost_exec_stored_is_deleted_once_the_ring_moves_past_it(pair: Pair) -> None:
    data = text(3600)
    writer = pair.through.new_output("t5", 1000)  # head 500, ring 500
    writer.write(data[:600])
    pair.proxy.cut()
    writer.write(data[600:700])  # sent, failed; say it was stored and only the reply lost
    direct = pair.direct.redis
    direct.xadd(pair.direct.key("out", "t5"), {"d": data[600:700]}, id="600-1")
    direct.hset(pair.direct.key("outmeta", "t5"), mapping={"total": 700})
    write_in(writer, data[700:], 100)
    pair.proxy.restore()
    writer.finish()
    reader = pair.direct.new_output("t5", 1024)
    head = reader.read(0, 10_000)
    assert head.data == data[:500] and head.dropped == (500, 3100)
    assert reader.read(3100, 10_000).data == data[3100:]
    assert stream_length(pair, "t5") == 2  # 600-1 went with the ring's entry at 500


# ---- task records (a Task needs an event loop: its cancel scope) ----


def new_task(store: RedisStore, **kw: object) -> Task:
    task_id = secrets.token_urlsafe(16)
    task = Task(
        id=task_id,
        tool="t",
        owner="alice",
        created_at=NOW,
        ttl_s=60.0,
        output=store.new_output(task_id, 4096),
        arguments=Args(n=1),
        timeout_s=30.0,
        **kw,  # type: ignore[arg-type]
    )
    store.add(task)
    return task


def run(store: RedisStore, task: Task) -> None:
    task.status, task.started_at = Status.RUNNING, NOW
    store.record_running(task)


def complete(store: RedisStore, task: Task) -> None:
    task.status, task.finished_at, task.result = Status.COMPLETED, NOW + 1, {"answer": 42}
    store.record_outcome(task)


@pytest.mark.anyio
async def test_an_outcome_recorded_during_a_cut_is_written_and_published_at_the_next_heartbeat(pair: Pair) -> None:
    task = new_task(pair.through, cache_key="key-1")
    run(pair.through, task)
    direct = pair.direct
    pubsub = direct.redis.pubsub()
    try:
        pubsub.subscribe(direct.changes_channel)
        confirmed = pubsub.get_message(timeout=WAIT_S)
        assert confirmed is not None and confirmed["type"] == "subscribe"
        pair.proxy.cut()
        complete(pair.through, task)  # held: the task goes on
        assert pair.through.flush() == 1
        loaded = direct.load(task.id, lambda _: None)
        assert loaded is not None and loaded.status is Status.RUNNING
        pair.proxy.restore()
        pair.through.heartbeat(NOW + 2)
        loaded = direct.load(task.id, lambda _: None)
        assert loaded is not None and (loaded.status, loaded.result) == (Status.COMPLETED, {"answer": 42})
        assert not direct.redis.sismember(f"{direct.ns}:unfinished", task.id)
        assert direct.redis.zscore(f"{direct.ns}:expiring", task.id) == NOW + 61
        assert direct.reusable("key-1", NOW + 2) == task.id
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=WAIT_S)
        assert message is not None and message["data"] == f"{task.id} status".encode()
    finally:
        pubsub.close()
    assert pair.through.flush() == 0


@pytest.mark.anyio
@pytest.mark.parametrize("restored_before_the_outcome", [True, False])
async def test_an_older_held_change_never_overwrites_a_newer_one(pair: Pair, restored_before_the_outcome: bool) -> None:
    task = new_task(pair.through)
    pair.proxy.cut()
    run(pair.through, task)  # held: status running
    task.process = ProcessInfo(4242, 7, "boot")
    pair.through.record_process(task)  # held too, merged after it
    if restored_before_the_outcome:
        pair.proxy.restore()
    complete(pair.through, task)  # written (or held) together with the held changes, after them
    pair.proxy.restore()
    pair.through.heartbeat(NOW + 2)
    assert pair.through.flush() == 0
    loaded = pair.direct.load(task.id, lambda _: None)
    assert loaded is not None and (loaded.status, loaded.started_at) == (Status.COMPLETED, NOW)
    assert loaded.process == ProcessInfo(4242, 7, "boot")


@pytest.mark.anyio
async def test_an_outage_is_warned_about_once_not_per_change(pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    first, second = new_task(pair.through), new_task(pair.through)
    with caplog.at_level(logging.INFO, logger="server.redis_store"):
        for _ in range(2):  # two outages
            pair.proxy.cut()
            run(pair.through, first)
            run(pair.through, second)
            complete(pair.through, first)
            pair.proxy.restore()
            pair.through.heartbeat(NOW + 2)
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "holding task changes" in m]) == 2
    assert len([m for m in messages if "answers again" in m]) == 2


@pytest.mark.anyio
async def test_close_writes_what_is_held(pair: Pair) -> None:
    task = new_task(pair.through)
    pair.proxy.cut()
    complete(pair.through, task)
    pair.proxy.restore()
    pair.through.close()
    loaded = pair.direct.load(task.id, lambda _: None)
    assert loaded is not None and loaded.status is Status.COMPLETED


@pytest.mark.anyio
async def test_a_held_outcome_never_overwrites_one_another_process_recorded_meanwhile(pair: Pair) -> None:
    """Held through an outage long enough for this process to be taken for dead: the outcome the live
    process recorded meanwhile (read by clients already) stands when Redis answers again."""
    task = new_task(pair.through, cache_key="key-2")
    run(pair.through, task)
    pair.proxy.cut()
    complete(pair.through, task)  # held
    settled = pair.direct.load(task.id, lambda _: None)
    assert settled is not None
    settled.status, settled.finished_at = Status.FAILED, NOW + 1
    assert pair.direct.record_outcome(settled)
    pair.proxy.restore()
    pair.through.heartbeat(NOW + 2)
    assert pair.through.flush() == 0
    loaded = pair.direct.load(task.id, lambda _: None)
    assert loaded is not None and (loaded.status, loaded.result) == (Status.FAILED, None)
    assert pair.direct.reusable("key-2", NOW + 2) is None  # a failure is never offered for reuse
