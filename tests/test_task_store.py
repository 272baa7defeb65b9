"""The TaskStore contract: what the engine relies on from wherever task records live.

Written against the interface, with the store made by the `task_stores` fixture: a second store (Redis,
in distributed mode) joins the parametrization and must pass the same tests.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from server.output import OutputWriter
from server.redis_store import RedisStore
from server.store import DB_NAME, Store, TaskStore
from server.tasks import ErrorKind, Status, Task, TaskError
from testkit.redis_server import RedisServer
from tools.context import ProcessInfo
from tools.registry import ToolSpec

pytestmark = pytest.mark.anyio

NOW = 1_800_000_000.0

OpenStore = Callable[[], TaskStore]
"""Opens one more store on the same shared place (another server process, as far as the store can tell)."""


class Args(BaseModel):
    n: int


def _spec_of(name: str) -> ToolSpec | None:
    return None


@pytest.fixture(params=["sqlite", "redis"])
def task_stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenStore]:
    opened: list[TaskStore] = []
    namespace = f"test-{secrets.token_hex(6)}"  # one Redis for the session; each test its own keys

    def open_store() -> TaskStore:
        if request.param == "sqlite":
            store: TaskStore = Store.open(tmp_path / "data", lease_s=10.0, now=NOW)
        else:
            redis: RedisServer = request.getfixturevalue("redis_server")
            store = RedisStore.open(redis.url, tmp_path / "local", namespace=namespace, lease_s=10.0, now=NOW)
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        store.close()


@pytest.fixture
def store(task_stores: OpenStore) -> TaskStore:
    return task_stores()


def new_task(store: TaskStore, *, owner: str = "alice", tool: str = "t", created_at: float = NOW, **kw: object) -> Task:
    task_id = secrets.token_urlsafe(16)
    return Task(
        id=task_id,
        tool=tool,
        owner=owner,
        created_at=created_at,
        ttl_s=60.0,
        output=store.new_output(task_id, 4096),
        arguments=Args(n=1),
        timeout_s=30.0,
        **kw,  # type: ignore[arg-type]
    )


def finish(store: TaskStore, task: Task, status: Status, at: float, **kw: object) -> None:
    task.status, task.finished_at = status, at
    for name, value in kw.items():
        setattr(task, name, value)
    store.record_outcome(task)


async def test_a_task_reads_back_as_it_was_recorded_at_each_step(store: TaskStore) -> None:
    task = new_task(store, cache_key="k1")
    store.add(task)
    loaded = store.load(task.id, _spec_of)
    assert loaded is not None and loaded.status is Status.QUEUED and loaded.owner == "alice"
    assert loaded.local is False and loaded.cache_key == "k1" and loaded.timeout_s == 30.0

    task.status, task.started_at = Status.RUNNING, NOW + 1
    store.record_running(task)
    task.process = ProcessInfo(4242, 777, "boot-a")
    store.record_process(task)
    task.watcher = ProcessInfo(4243, 778, "boot-a")
    store.record_watcher(task)
    running = store.load(task.id, _spec_of)
    assert running is not None and running.status is Status.RUNNING and running.started_at == NOW + 1
    assert running.process == ProcessInfo(4242, 777, "boot-a") and running.watcher == ProcessInfo(4243, 778, "boot-a")
    assert running.detached

    assert isinstance(task.output, OutputWriter)
    task.output.write(b"hello\n")
    task.output.finish()
    error = TaskError(kind=ErrorKind.EXIT_STATUS, message="exited 3")
    finish(store, task, Status.FAILED, NOW + 2, error=error, result={"exit_code": 3})
    done = store.load(task.id, _spec_of)
    assert done is not None and done.status is Status.FAILED and done.error == error
    assert done.result == {"exit_code": 3} and done.expires_at == NOW + 2 + 60.0
    assert done.output.read(0, 100).data == b"hello\n"


async def test_an_unknown_id_loads_as_none(store: TaskStore) -> None:
    assert store.load("no-such-task", _spec_of) is None


async def test_summaries_are_the_owners_own_unexpired_tasks_newest_first(store: TaskStore) -> None:
    mine = [new_task(store, created_at=NOW + i, tool="a" if i % 2 else "b") for i in range(5)]
    theirs = new_task(store, owner="bob", created_at=NOW + 10)
    for task in [*mine, theirs]:
        store.add(task)
    finish(store, mine[0], Status.COMPLETED, NOW + 5)  # expires at NOW + 65
    finish(store, mine[1], Status.FAILED, NOW + 5, error=TaskError(kind=ErrorKind.TIMEOUT, message="slow"))

    listed = store.summaries("alice", NOW + 20, None, None, 50)
    assert [s.task_id for s in listed] == [t.id for t in reversed(mine)]
    assert [s.task_id for s in store.summaries("alice", NOW + 20, None, None, 2)] == [mine[4].id, mine[3].id]
    assert [s.task_id for s in store.summaries("alice", NOW + 20, Status.COMPLETED, None, 50)] == [mine[0].id]
    assert {s.task_id for s in store.summaries("alice", NOW + 20, None, "a", 50)} == {mine[1].id, mine[3].id}
    assert store.summaries("alice", NOW + 20, Status.FAILED, None, 50)[0].error_kind is ErrorKind.TIMEOUT
    assert mine[0].id not in {s.task_id for s in store.summaries("alice", NOW + 100, None, None, 50)}
    assert [s.task_id for s in store.summaries("bob", NOW + 20, None, None, 50)] == [theirs.id]
    assert store.count_by_status("alice", NOW + 20) == {"completed": 1, "failed": 1, "queued": 3}


async def test_a_completed_unexpired_task_is_reused_else_a_running_one_is_joined_never_a_failed_one(
    store: TaskStore,
) -> None:
    failed, older, newer = (new_task(store, cache_key="same", created_at=NOW + i / 10) for i in range(3))
    for task in (failed, older, newer):
        store.add(task)
    assert store.reusable("same", NOW) == newer.id  # none finished yet: the newest running one, to join
    finish(store, failed, Status.FAILED, NOW + 1, error=TaskError(kind=ErrorKind.EXCEPTION, message="x"))
    assert store.reusable("same", NOW + 2) == newer.id
    finish(store, older, Status.COMPLETED, NOW + 2)
    assert store.reusable("same", NOW + 2) == older.id  # a result at once beats joining a running one
    finish(store, newer, Status.COMPLETED, NOW + 3)
    assert store.reusable("same", NOW + 4) == newer.id
    assert store.reusable("same", NOW + 1000) is None  # both expired
    assert store.reusable("other", NOW + 4) is None


async def test_a_swept_task_leaves_a_tombstone_of_its_owner_and_its_files_can_go(store: TaskStore) -> None:
    task = new_task(store)
    store.add(task)
    assert isinstance(task.output, OutputWriter)
    task.output.write(b"x" * 10)
    task.output.finish()
    finish(store, task, Status.COMPLETED, NOW)
    keep = new_task(store)
    store.add(keep)

    assert store.sweep(NOW + 59, tombstones_max=10) == []
    assert store.sweep(NOW + 61, tombstones_max=10) == [task.id]
    assert store.load(task.id, _spec_of) is None
    tomb = store.tombstone(task.id)
    assert tomb is not None and tomb.owner == "alice" and tomb.at == NOW + 60
    store.remove_files([task.id])
    assert not store.output_path(task.id).exists()
    assert store.load(keep.id, _spec_of) is not None  # an unfinished task never expires


async def test_tombstones_are_bounded_newest_kept(store: TaskStore) -> None:
    tasks = [new_task(store) for _ in range(5)]
    for i, task in enumerate(tasks):
        store.add(task)
        finish(store, task, Status.COMPLETED, NOW + i)
    store.sweep(NOW + 1000, tombstones_max=2)
    assert [store.tombstone(t.id) is not None for t in tasks] == [False, False, False, True, True]


async def test_the_unfinished_tasks_of_a_store_that_closed_are_claimed_once(task_stores: OpenStore) -> None:
    first, second, third = task_stores(), task_stores(), task_stores()
    queued, running, done = new_task(first), new_task(first), new_task(first)
    for task in (queued, running, done):
        first.add(task)
    running.status = Status.RUNNING
    first.record_running(running)
    finish(first, done, Status.COMPLETED, NOW)
    assert second.claim_orphans(NOW, _spec_of) == []  # its server is alive

    first.close()  # its server is gone
    claimed = second.claim_orphans(NOW, _spec_of)
    assert {t.id for t in claimed} == {queued.id, running.id}
    assert {t.status for t in claimed} == {Status.QUEUED, Status.RUNNING}
    assert third.claim_orphans(NOW, _spec_of) == []  # claimed already: settled by exactly one server


async def test_an_error_kind_this_version_does_not_know_reads_as_written(tmp_path: Path) -> None:
    """SQLite only: a row as a later version (or a plugin's own kind) might have written it."""
    store = Store.open(tmp_path / "data", now=NOW)
    try:
        task = new_task(store)
        store.add(task)
        finish(store, task, Status.FAILED, NOW, error=TaskError(kind=ErrorKind.EXCEPTION, message="m"))
        _write_row(tmp_path / "data", task.id, error_kind="from_a_newer_plugin")
        loaded = store.load(task.id, _spec_of)
        assert loaded is not None and loaded.error is not None and loaded.error.kind == "from_a_newer_plugin"
        _write_row(tmp_path / "data", task.id, status="failed", error_kind="timeout")
        again = store.load(task.id, _spec_of)
        assert again is not None and again.error is not None and again.error.kind is ErrorKind.TIMEOUT
    finally:
        store.close()


def _write_row(data_dir: Path, task_id: str, **values: str) -> None:
    """A row as another version wrote it, beside the store (which never changes a settled record)."""
    db = sqlite3.connect(data_dir / DB_NAME)
    try:
        assignments = ", ".join(f"{name} = ?" for name in values)
        db.execute(f"UPDATE tasks SET {assignments} WHERE id = ?", (*values.values(), task_id))
        db.commit()
    finally:
        db.close()


async def test_a_late_write_to_a_record_the_store_lost_leaves_nothing_readable_and_expiry_goes_on(
    store: TaskStore,
) -> None:
    """Found by review: Redis restarted without persistence, a running task then finished; its outcome made a
    partial record that crashed every front-end reading it and every sweep after."""
    task = new_task(store)
    store.add(task)
    if isinstance(store, Store):
        store._db.execute("DELETE FROM tasks WHERE id = ?", (task.id,))
    else:
        assert isinstance(store, RedisStore)
        store.redis.delete(store._key("task", task.id))
    finish(store, task, Status.COMPLETED, NOW)
    assert store.load(task.id, _spec_of) is None
    assert store.sweep(NOW + 1000, tombstones_max=10) == []
    assert store.load(task.id, _spec_of) is None


async def test_the_first_outcome_recorded_is_final_a_late_one_is_refused(task_stores: OpenStore) -> None:
    """A server taken for dead (paused past its lease) that wakes and finishes must not flip what the
    server that settled its task recorded: readers may already have collected that."""
    paused, settler = task_stores(), task_stores()
    task = new_task(paused)
    paused.add(task)
    task.status = Status.RUNNING
    paused.record_running(task)
    settled = settler.load(task.id, _spec_of)
    assert settled is not None
    error = TaskError(kind=ErrorKind.INTERRUPTED, message="its server stopped")
    settled.status, settled.finished_at, settled.error = Status.FAILED, NOW + 1, error
    assert settler.record_outcome(settled)

    task.started_at = NOW + 1.5  # it waited for a slot there, and would start now: it must not
    assert not paused.record_running(task)
    task.process = ProcessInfo(4242, 777, "boot-a")
    paused.record_process(task)  # nor may any later detail change the settled record
    task.status, task.finished_at, task.result = Status.COMPLETED, NOW + 2, {"exit_code": 0}
    assert not paused.record_outcome(task)
    stored = settler.load(task.id, _spec_of)
    assert stored is not None and stored.status is Status.FAILED and stored.error == error
    assert stored.result is None and stored.finished_at == NOW + 1 and stored.process is None
