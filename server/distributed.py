"""Distributed mode: front-ends queue task ids through Docket (pydocket) on Redis; workers run them.

- A front-end (`offload-mcp --transport http` with `redis_url`) admits and records a task in Redis like any
  server, then its `DocketRunner` adds one Docket job to the task's queue (`target`, default `any`) whose
  only argument is the task id: Docket pickles payloads, so a command never travels through it.
- A worker (`offload-mcp worker`) runs a Docket worker per queue. Each job takes the task's run fence
  first (`RedisStore.take_fence`, set once): a command never runs twice. A job redelivered after its
  worker died finds the fence taken, and settles the task `interrupted`, naming that worker, instead of
  running it again. Docket renews a live worker's lease, so a long command is never redelivered.
- Every change is published on the store's change channel; front-ends follow it (`follow_changes`), so a
  task finished on any worker wakes the waiters and notifications on every front-end.
- Cancel from any front-end: a flag and a message on the cancel channel; the worker running the task stops
  it (TERM the group, grace, KILL) and writes the final status. A task no worker took yet is fenced by the
  canceller and settled there.
- A worker that dies: any live worker settles its tasks once its lease lapses (`claim_orphans` in the lease
  loop, or `_take_over` on a redelivery), killing what is left only when the process identity matches,
  that is on the same machine. So each worker also keeps a process table in its data directory
  (`server/process_table.py`: a row per command it runs, an flock for its life). A worker starting on that
  data directory, and every live one there in its loop, finds the rows of dead instances, ends their
  leases at once (their unfinished tasks are then settled here, through the same lease logic), and ends
  what their commands left running, identity checked and by task marker, even when a worker on another
  machine settled the task first. What a dead worker left runs on until a worker runs again on its data
  directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections import Counter
from contextvars import ContextVar
from datetime import timedelta
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import redis.asyncio as aioredis
import redis.exceptions
from anyio.abc import TaskGroup
from docket import CurrentDocket, Docket, Worker

from server import docket_guard
from server.config import DEFAULT_QUEUE, Settings
from server.errors import StoreUnreachableError
from server.executor import Executor
from server.process_table import end_left_behind
from server.recovery import recover
from server.redis_store import CANCEL_FENCE, STATUS_CHANGED, UNFINISHED, RedisStore
from server.runner import REPLY_HOPS, Lifecycle, cancel_error
from server.tasks import ErrorKind, Status, Task, TaskError
from tools.process import kill_left_behind
from tools.registry import Handler

log = logging.getLogger(__name__)

RECONNECT_S = 1.0
STOP_S = 5.0
"""How long a stopping worker's Docket workers have to stop their way before they are cancelled."""
WORKER_SEEN_LEASES = 3
"""A worker not heard from for this many leases is no longer listed in offload://workers."""

_ENGINE: ContextVar[WorkerEngine] = ContextVar("offload_worker_engine")

docket_guard.install()  # before any Docket here reads a stream: what it unpickles is plain data only


def docket_name(namespace: str, queue: str) -> str:
    """`:` is in neither name (both are `[A-Za-z0-9_.-]`), so two namespaces never share a Docket."""
    return f"{namespace}:queue:{queue}"


async def offload_run(task_id: str, docket: Docket = CurrentDocket()) -> None:  # noqa: B008 - Docket's way
    """The one Docket job: its only argument is a task id (Docket pickles payloads: never a command; and
    `docket_guard` refuses any other job). `docket` (filled in by Docket) says which queue it came from."""
    await _ENGINE.get().run(task_id, docket.name)


# ---- the front-end side ----


MAX_QUEUES = 64
"""Queues one front-end keeps open: each holds Redis connections for the front-end's life, so `target`
names beyond this are refused (an owner firing and cancelling to fresh names exhausted Redis)."""


class DocketRunner:
    """A Runner whose tasks run on workers: `run` queues the id, `cancel` reaches any worker."""

    reaches_everywhere = True

    def __init__(self, task_group: TaskGroup, settings: Settings, store: RedisStore, lifecycle: Lifecycle) -> None:
        assert settings.redis_url is not None
        self._tg = task_group
        self._url = settings.redis_url
        self._namespace = settings.redis_namespace
        self._store = store
        self._lifecycle = lifecycle
        self._dockets: dict[str, Docket] = {}
        self._ready: dict[str, anyio.Event] = {}
        self._scopes: dict[str, anyio.CancelScope] = {}
        self._busy: Counter[str] = Counter()
        """Tasks being queued on each queue now: a busy queue is never closed to make room."""
        self._an_idle_queue = anyio.Event()
        self._queueing: set[str] = set()
        self._all_queued = anyio.Event()
        self._all_queued.set()

    def __repr__(self) -> str:
        return f"<DocketRunner {self._store.where} queues={sorted(self._dockets)}>"

    def run(self, task: Task, handler: Handler) -> None:
        if not self._queueing:
            self._all_queued = anyio.Event()
        self._queueing.add(task.id)
        self._tg.start_soon(self._enqueue, task, name=f"offload queue {task.id}")

    def cancel(self, task: Task) -> None:
        if self._store.request_cancel(task.id):  # no worker had taken it: it never starts; settled here
            self._lifecycle.finish(task, Status.CANCELLED, cancel_error(task))

    async def drain(self) -> None:
        """Returns once every task fired here is in its queue (or failed to get there): a front-end that
        stops never drops a task whose fire it answered."""
        await self._all_queued.wait()

    async def _enqueue(self, task: Task) -> None:
        try:
            await self._queue(task)
        finally:
            self._queueing.discard(task.id)
            if not self._queueing:
                self._all_queued.set()

    async def _queue(self, task: Task) -> None:
        for _ in range(REPLY_HOPS):  # the reply to fire leaves first, as with a local run
            await anyio.lowlevel.checkpoint()
        queue = task.queue or DEFAULT_QUEUE
        if queue not in self._ready and len(self._ready) >= MAX_QUEUES and not await self._make_room():
            message = (  # never another owner's queue names
                f"this front-end holds {MAX_QUEUES} queues open, every one of them busy queueing; fire again "
                "in a moment, or without target"
            )
            self._lifecycle.finish(task, Status.FAILED, TaskError(kind=ErrorKind.REFUSED, message=message))
            return
        self._busy[queue] += 1
        try:
            docket = await self._docket(queue)
            await docket.add(offload_run, key=task.id)(task.id)
            self._store.hand_off(task)  # the queue holds it now: this front-end's death no longer settles it
        except (redis.exceptions.RedisError, OSError) as exc:
            message = (
                f"could not queue the task on {queue!r}: Redis at redis_url={self._store.where} failed "
                f"({type(exc).__name__}); nothing of it ran. Fire again once Redis answers"
            )
            log.warning("%s", message)
            self._lifecycle.finish(task, Status.FAILED, TaskError(kind=ErrorKind.CONNECTION, message=message))
        finally:
            self._busy[queue] -= 1
            if not self._busy[queue]:
                self._an_idle_queue.set()
                self._an_idle_queue = anyio.Event()

    async def _make_room(self) -> bool:
        """Room for one more queue: an idle one closed, waiting (bounded) for one to become idle."""
        with anyio.move_on_after(STOP_S):
            while not self._close_idle_queue():
                await self._an_idle_queue.wait()
            return True
        return False

    def _close_idle_queue(self) -> bool:
        """Closes the least recently used queue that is not queueing anything now: room for a new one."""
        for queue in self._ready:  # oldest use first
            scope = self._scopes.get(queue)
            if scope is not None and not self._busy[queue]:
                del self._ready[queue]
                scope.cancel()
                return True
        return False

    async def _docket(self, queue: str) -> Docket:
        ready = self._ready.pop(queue, None)  # back in at the end: the most recently used
        if ready is None:
            ready = anyio.Event()
            self._tg.start_soon(self._hold_docket, queue, ready, name=f"offload docket {queue}")
        self._ready[queue] = ready
        await ready.wait()
        docket = self._dockets.get(queue)
        if docket is None:
            raise redis.exceptions.ConnectionError(f"the Docket of queue {queue!r} could not be opened")
        return docket

    async def _hold_docket(self, queue: str, ready: anyio.Event) -> None:
        """Keeps the queue's Docket open for as long as the Runtime lives (opened on first use); then closes
        it shielded, within STOP_S (cancelled mid-close, it would leave its connections behind)."""
        try:
            docket = await Docket(name=docket_name(self._namespace, queue), url=self._url).__aenter__()
            try:
                self._dockets[queue] = docket
                ready.set()
                with anyio.CancelScope() as self._scopes[queue]:  # cancelled to make room (`_close_idle_queue`)
                    await anyio.sleep_forever()
            finally:
                if self._dockets.get(queue) is docket:
                    del self._dockets[queue], self._scopes[queue]
                with anyio.CancelScope(shield=True), anyio.move_on_after(STOP_S):
                    await docket.__aexit__(None, None, None)
        except (redis.exceptions.RedisError, OSError) as exc:
            log.warning("could not open queue %r in Redis at %s: %s", queue, self._store.where, exc)
        finally:
            if self._ready.get(queue) is ready:  # not a newer opening of the same queue
                del self._ready[queue]
            ready.set()


async def follow_changes(executor: Executor, store: RedisStore, url: str) -> None:
    """Front-end: hears every task change any process publishes, and wakes what waits on it here. After a
    (re)connection every task fired here is read again, so a change missed meanwhile is not lost."""
    while True:
        client = aioredis.Redis.from_url(url)
        try:
            async with client.pubsub() as pubsub:
                await pubsub.subscribe(store.changes_channel)
                for task in executor.active_tasks():
                    executor.remote_change(task.id)
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        task_id, _, what = _text(message["data"]).partition(" ")
                        executor.remote_change(task_id, status_changed=what == STATUS_CHANGED)
        except (redis.exceptions.RedisError, OSError, StoreUnreachableError) as exc:
            log.warning("lost the change stream of Redis at %s (%s); reconnecting", store.where, exc)
        finally:
            await client.aclose()
        await anyio.sleep(RECONNECT_S)


def live_workers(store: RedisStore, now: float) -> list[dict[str, Any]]:
    """What offload://workers shows: each live worker, its queues, running count and last heartbeat."""
    found = []
    for name, raw in store.redis.hgetall(f"{store.ns}:workers").items():
        record = json.loads(raw)
        if record["heartbeat_at"] >= now - WORKER_SEEN_LEASES * store.lease_s:
            found.append({"name": _text(name), **record})
    return sorted(found, key=lambda w: str(w["name"]))


def queue_depths(store: RedisStore) -> dict[str, int]:
    """Tasks waiting for a worker, per queue."""
    ids = [_text(i) for i in store.redis.smembers(f"{store.ns}:unfinished")]
    depths: dict[str, int] = {}
    pipe = store.redis.pipeline(transaction=False)
    for task_id in ids:
        pipe.hmget(store.key("task", task_id), ["status", "queue"])
    for status, queue in pipe.execute():
        if status is not None and json.loads(status) == Status.QUEUED.value:
            name = json.loads(queue) if queue is not None else None
            depths[name or DEFAULT_QUEUE] = depths.get(name or DEFAULT_QUEUE, 0) + 1
    return depths


# ---- the worker side ----


class WorkerEngine:
    """What a worker process runs: Docket workers on its queues, each job through the run fence into the
    executor (with its limits, process groups and output to Redis), the cancel channel, its heartbeat."""

    def __init__(self, executor: Executor, store: RedisStore, settings: Settings, queues: list[str], name: str) -> None:
        assert settings.redis_url is not None
        self.executor = executor
        self.store = store
        self.settings = settings
        self.queues = queues
        self.name = name
        self.running = 0
        self.ran = 0
        self._stopping = anyio.Event()
        self._url = settings.redis_url

    def __repr__(self) -> str:
        return f"<WorkerEngine {self.name} queues={self.queues} running={self.running} ran={self.ran}>"

    async def serve(self) -> None:
        """Until cancelled: a Docket worker per queue, the cancel channel and the heartbeat."""
        _ENGINE.set(self)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._follow_cancels, name="offload worker cancels")
                tg.start_soon(self._advertise, name="offload worker heartbeat")
                tg.start_soon(self._tend_left_behind_forever, name="offload worker process table")
                for queue in self.queues:
                    tg.start_soon(self._work, queue, name=f"offload worker queue {queue}")
                try:
                    await anyio.sleep_forever()
                finally:
                    self._stopping.set()  # the Docket workers stop their way, not cancelled mid-write
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(redis.exceptions.RedisError):
                await anyio.to_thread.run_sync(self.store.redis.hdel, f"{self.store.ns}:workers", self.name)

    async def run(self, task_id: str, docket: str | None = None) -> None:
        """Runs the task the job names, only if its record is one this worker can verify: a task queued on
        the queue the job came from (`docket`: its Docket's name), not finished, not taken."""
        if docket is not None and not self._queued_on(task_id, docket):
            return
        verdict, detail = self.store.take_fence(task_id, self.name)
        if verdict == "taken" and detail != CANCEL_FENCE:
            await self._take_over(task_id, holder=detail)
        if verdict != "ok":
            return  # gone, finished, cancelled before it started, or someone else's
        task = self.store.load(task_id, self.executor.registry.get)
        if task is not None and self._prepare(task):
            await self._run_prepared(task)

    def _queued_on(self, task_id: str, docket: str) -> bool:
        """Whether the task's record says it was queued on the queue of this Docket (a job found on another
        queue is not this worker's to run: it is refused and logged, the task left as it is)."""
        raw = self.store.redis.hget(self.store.key("task", task_id), "queue")
        if raw is None:
            return False  # no record (expired, swept, or never one): nothing to run, as the fence would say
        if docket == docket_name(self.settings.redis_namespace, json.loads(raw) or DEFAULT_QUEUE):
            return True
        log.warning("refused a job for task %s on %s: no task queued there has that id; nothing ran", task_id, docket)
        return False

    def _prepare(self, task: Task) -> bool:
        """The task's tool and arguments as this worker has them, checked against the owner's policy as the
        front-end did at admission; False (and the task failed) without."""
        if task.spec is None:
            message = f"the tool {task.tool!r} is not configured on worker {self.name}; nothing ran"
            self.executor.settle(task, Status.FAILED, TaskError(kind=ErrorKind.REFUSED, message=message), None)
            return False
        try:
            task.arguments = task.spec.input_model.model_validate_json(self.store.arguments_json(task.id) or "{}")
        except ValueError as exc:  # a worker configured unlike the front-end that admitted it
            message = f"worker {self.name} cannot read the task's arguments ({exc}); nothing ran"
            error = TaskError(kind=ErrorKind.INVALID_ARGUMENTS, message=message)
            self.executor.settle(task, Status.FAILED, error, None)
            return False
        if task.spec.check is not None:
            try:
                task.spec.check(task.arguments, task.owner)  # a record Redis holds is not trusted blindly
            except ValueError as exc:
                message = f"worker {self.name} refuses it under the owner's policy ({exc}); nothing ran"
                self.executor.settle(task, Status.FAILED, TaskError(kind=ErrorKind.REFUSED, message=message), None)
                return False
        task.output = self.store.new_output(task.id, self.settings.output_file_max_bytes, writing=True)
        return True

    async def _run_prepared(self, task: Task) -> None:
        self.running += 1
        try:
            self.executor.run_here(task)
            if self.store.cancel_requested(task.id):  # cancelled between the fence and here
                self.stop(task.id)
            async with anyio.create_task_group() as tg:  # a stopping worker's shutdown ends and records it
                for event in (task.handle.released, self._stopping):
                    tg.start_soon(_cancel_on, event, tg.cancel_scope)
        finally:
            self.running -= 1
            self.ran += 1

    def check_running(self) -> None:
        """What a lost message or a pause may have hidden from this worker: a cancel, a task settled elsewhere
        meanwhile (this worker taken for dead), or one whose record is gone. It stops here (TERM, grace, KILL)."""
        tasks = self.executor.active_tasks()
        for task, (cancel, status) in zip(tasks, self.store.run_flags([t.id for t in tasks]), strict=True):
            if cancel or status not in UNFINISHED:  # None: its record is gone (a Redis restart): nobody collects it
                self.stop(task.id)

    def stop(self, task_id: str) -> None:
        """Cancels the task if this worker runs it: TERM the group, grace, KILL; the outcome is written here."""
        for task in self.executor.active_tasks():
            if task.id == task_id:
                task.handle.cancel_reason = ErrorKind.CANCELLED_BY_CLIENT
                task.handle.scope.cancel()

    async def _take_over(self, task_id: str, holder: str) -> None:
        """A redelivered job whose fence a worker took. If that worker lives, it still runs the task: nothing
        to do. If it died, the task is settled `interrupted` (naming it) and never run again, except a read
        that is safe to repeat (a cacheable call: GitHub reads, HTTP GET), which runs again here."""
        task = self.store.claim_if_orphan(task_id, self.executor.registry.get, time.time())
        if task is None:
            return
        killed = task.process is not None and await kill_left_behind(task.process, self.settings.kill_grace_s)
        spec = task.spec
        if spec is not None and spec.cacheable and self._prepare(task) and spec.is_cacheable(task.arguments):
            log.info("task %s (%s) of dead worker %s runs again here: it is a read", task_id, task.tool, holder)
            self.store.take_over_fence(task_id, self.name)
            task.output = self.store.restart_output(task_id, self.settings.output_file_max_bytes)
            await self._run_prepared(task)
            return
        if task.status.finished:
            return  # _prepare settled it
        what = "what was left of it was killed" if killed else "nothing of it runs here"
        message = (
            f"the worker {holder} running it stopped before it finished; a command runs at most once, so it was "
            f"not run again ({what})"
        )
        self.executor.settle(task, Status.FAILED, TaskError(kind=ErrorKind.INTERRUPTED, message=message), None)

    async def end_left_behind(self) -> int:
        """Ends what workers that died on this data directory left running (their process table rows): each
        one's lease in Redis ends at once (its lock says it died), so the lease logic claims and settles its
        unfinished tasks here, killing what it can reach; then whatever of their commands still runs is
        ended, the tasks another machine settled included. Returns how many commands this path ended."""
        table = self.store.process_table
        left = [] if table is None else table.left_behind()
        if table is None or not left:
            return 0
        try:
            for instance in {row.instance for row in left}:
                self.store.end_lease(instance)
            await recover(self.executor)
        except (StoreUnreachableError, redis.exceptions.RedisError) as exc:  # what runs here is ended anyway
            log.warning("could not settle the tasks of dead workers in Redis at %s now: %s", self.store.where, exc)
        ended = await end_left_behind(left, self.settings.kill_grace_s)
        table.forget(left)
        return ended

    async def tend_left_behind(self) -> None:
        """`end_left_behind`, never raising: at start, and every lease_s / 3 while `serve` runs."""
        try:
            await self.end_left_behind()
        except Exception:
            log.exception("ending what dead workers on this data directory left failed; will try again")

    async def _tend_left_behind_forever(self) -> None:
        while True:
            await anyio.sleep(self.settings.lease_s / 3)
            await self.tend_left_behind()

    async def _work(self, queue: str) -> None:
        """A Docket worker on the queue. Shielded: once the engine stops, it stops the way Docket stops a
        worker (its jobs return, its connections close), within STOP_S, never cancelled mid-write."""
        with anyio.CancelScope(shield=True) as scope:
            async with (
                Docket(name=docket_name(self.settings.redis_namespace, queue), url=self._url) as docket,
                anyio.create_task_group() as tg,
            ):
                docket.register(offload_run)
                async with Worker(
                    docket,
                    name=f"{self.name}/{queue}",
                    concurrency=self.settings.max_concurrency,
                    redelivery_timeout=timedelta(seconds=self.settings.lease_s),
                    schedule_automatic_tasks=False,
                ) as worker:
                    tg.start_soon(worker.run_forever)
                    await anyio.lowlevel.checkpoint()  # it starts (and clears its stop flag) before any stop
                    await self._stopping.wait()
                    scope.deadline = anyio.current_time() + STOP_S

    async def _follow_cancels(self) -> None:
        while True:
            client = aioredis.Redis.from_url(self._url)
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(self.store.cancel_channel)
                    self.check_running()  # a cancel sent while this was not subscribed is seen now
                    async for message in pubsub.listen():
                        if message["type"] == "message":
                            self.stop(_text(message["data"]))
            except (redis.exceptions.RedisError, OSError) as exc:
                log.warning("lost the cancel channel of Redis at %s (%s); reconnecting", self.store.where, exc)
            finally:
                await client.aclose()
            await anyio.sleep(RECONNECT_S)

    async def _advertise(self) -> None:
        while True:
            record = {
                "queues": self.queues,
                "running": self.running,
                "ran": self.ran,
                "max_concurrency": self.settings.max_concurrency,
                "dead_letters": docket_guard.dead_letters,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "heartbeat_at": time.time(),
            }
            try:
                self.store.redis.hset(f"{self.store.ns}:workers", self.name, json.dumps(record))
                self.check_running()
            except redis.exceptions.RedisError as exc:
                log.warning("could not send this worker's heartbeat to Redis at %s: %s", self.store.where, exc)
            await anyio.sleep(self.settings.lease_s / 3)


async def _cancel_on(event: anyio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def worker_name() -> str:
    return f"{socket.gethostname()}#{os.getpid()}"


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)
