"""The run fence of distributed mode, against a real Redis: a worker's `run` of a job takes the task's fence
first, so a redelivered job never runs a command twice."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from server.config import Settings
from server.distributed import WorkerEngine, docket_name
from server.redis_store import RedisStore
from server.runtime import Runtime
from server.tasks import ErrorKind, Status, Task
from testkit.redis_server import RedisServer
from tools.context import JSON, ToolContext
from tools.registry import ToolSpec

pytestmark = pytest.mark.anyio


class ShellArgs(BaseModel):
    command: str


class ReadArgs(BaseModel):
    key: str


READS: list[str] = []


async def read(args: ReadArgs, ctx: ToolContext) -> JSON:
    """A cacheable read (as GitHub reads and HTTP GETs are): safe to run again."""
    READS.append(args.key)
    ctx.write_output(f"read {args.key}\n".encode())
    return {"key": args.key}


READ_TOOL = ToolSpec(name="test.read", description="a read", input_model=ReadArgs, handler=read, cacheable=True)


@pytest.fixture
async def worker(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[WorkerEngine]:
    settings = Settings(
        redis_url=redis_server.url, redis_namespace=f"t{secrets.token_hex(6)}", data_dir=tmp_path / "w", lease_s=2
    )
    async with Runtime.open(settings, role="worker", load_plugins=False, extra_tools=[READ_TOOL]) as runtime:
        store = runtime.executor.store
        assert isinstance(store, RedisStore)
        yield WorkerEngine(runtime.executor, store, settings, ["any"], "w-test")


def queued_by_another(
    worker: WorkerEngine, tmp_path: Path, command: str, tool: str = "shell"
) -> tuple[RedisStore, Task]:
    """A task recorded by another process (a front-end, as far as Redis can tell)."""
    settings = worker.settings
    assert settings.redis_url is not None
    other = RedisStore.open(settings.redis_url, tmp_path / "other", namespace=settings.redis_namespace, lease_s=2)
    task_id = secrets.token_urlsafe(16)
    task = Task(
        id=task_id,
        tool=tool,
        owner="local",
        created_at=1.0,
        ttl_s=60,
        output=other.new_output(task_id, 4096),
        arguments=ShellArgs(command=command) if tool == "shell" else ReadArgs(key=command),
    )
    other.add(task)
    return other, task


async def test_a_redelivered_task_whose_worker_died_is_settled_interrupted_naming_it(
    worker: WorkerEngine, tmp_path: Path
) -> None:
    side = tmp_path / "side"
    other, task = queued_by_another(worker, tmp_path, f"echo ran >> {side}")
    assert other.take_fence(task.id, "w-dead") == ("ok", "")  # the first delivery, on a worker that then dies
    other.close()  # its lease is gone
    await worker.run(task.id)  # the redelivery
    settled = worker.store.load(task.id, worker.executor.registry.get)
    assert settled is not None and settled.status is Status.FAILED
    assert settled.error is not None and settled.error.kind is ErrorKind.INTERRUPTED
    assert "w-dead" in settled.error.message and "not run again" in settled.error.message
    assert not side.exists()  # the command never ran here


async def test_a_redelivered_task_whose_worker_lives_is_left_to_it(worker: WorkerEngine, tmp_path: Path) -> None:
    side = tmp_path / "side"
    other, task = queued_by_another(worker, tmp_path, f"echo ran >> {side}")
    try:
        other.take_fence(task.id, "w-alive")
        await worker.run(task.id)
        still = worker.store.load(task.id, worker.executor.registry.get)
        assert still is not None and still.status is Status.QUEUED and not side.exists()
    finally:
        other.close()


async def test_a_task_runs_once_and_a_second_delivery_finds_it_finished(worker: WorkerEngine, tmp_path: Path) -> None:
    side = tmp_path / "side"
    other, task = queued_by_another(worker, tmp_path, f"echo ran >> {side}; echo out")
    try:
        await worker.run(task.id)
        await worker.run(task.id)
        done = worker.store.load(task.id, worker.executor.registry.get)
        assert done is not None and done.status is Status.COMPLETED, done
        assert done.output.read(0, 100).data == b"out\n"
        assert side.read_text() == "ran\n"
    finally:
        other.close()


async def test_a_task_cancelled_before_any_worker_took_it_never_starts(worker: WorkerEngine, tmp_path: Path) -> None:
    side = tmp_path / "side"
    other, task = queued_by_another(worker, tmp_path, f"echo ran >> {side}")
    try:
        assert other.request_cancel(task.id)  # nobody took it: the canceller holds the fence now
        await worker.run(task.id)
        assert not side.exists()
    finally:
        other.close()


async def test_a_read_of_a_dead_worker_runs_again_from_the_start(worker: WorkerEngine, tmp_path: Path) -> None:
    other, task = queued_by_another(worker, tmp_path, "k1", tool="test.read")
    other.new_output(task.id, 4096).write(b"half of the first run")
    assert other.take_fence(task.id, "w-dead") == ("ok", "")
    other.close()
    await worker.run(task.id)
    done = worker.store.load(task.id, worker.executor.registry.get)
    assert done is not None and done.status is Status.COMPLETED and done.result == {"key": "k1"}, done
    assert done.output.read(0, 100).data == b"read k1\n"  # the first run's bytes are gone
    assert READS.count("k1") == 1


async def test_a_job_from_another_queue_than_its_task_s_is_refused(worker: WorkerEngine, tmp_path: Path) -> None:
    """A job names a task; the worker runs it only if the record says it was queued on the job's queue."""
    side = tmp_path / "side"
    other, task = queued_by_another(worker, tmp_path, f"echo ran >> {side}")  # queued on `any`
    try:
        await worker.run(task.id, docket_name(worker.settings.redis_namespace, "elsewhere"))
        still = worker.store.load(task.id, worker.executor.registry.get)
        assert still is not None and still.status is Status.QUEUED and not side.exists()
        await worker.run(task.id, docket_name(worker.settings.redis_namespace, "any"))
        assert side.read_text() == "ran\n"
    finally:
        other.close()


async def test_a_record_the_owner_s_policy_refuses_never_runs_on_the_worker(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """What Redis holds is checked again on the worker: a record whose command the owner's policy refuses
    (written by anyone with Redis's password, or admitted under another policy) is settled refused."""
    settings = Settings(
        redis_url=redis_server.url,
        redis_namespace=f"t{secrets.token_hex(6)}",
        data_dir=tmp_path / "w",
        lease_s=2,
        shell_mode="deny-list",
        shell_deny=("touch",),
    )
    async with Runtime.open(settings, role="worker", load_plugins=False) as runtime:
        store = runtime.executor.store
        assert isinstance(store, RedisStore)
        engine = WorkerEngine(runtime.executor, store, settings, ["any"], "w-policy")
        side = tmp_path / "side"
        other, task = queued_by_another(engine, tmp_path, f"touch {side}")
        try:
            await engine.run(task.id, docket_name(settings.redis_namespace, "any"))
            settled = store.load(task.id, runtime.executor.registry.get)
            assert settled is not None and settled.status is Status.FAILED, settled
            assert settled.error is not None and settled.error.kind is ErrorKind.REFUSED, settled.error
            assert "policy" in settled.error.message and not side.exists()
        finally:
            other.close()
