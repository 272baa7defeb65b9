"""Executor: starts, runs (through a Runner), finishes, cancels and shuts down tasks.

`fire` is synchronous and cheap: admission checks the request, the task is committed to the store
and handed to the runner; the work starts on a later loop iteration, after the caller's reply is on
its way. Every status change is committed as it happens, synchronously, so no cancellation can come
between a change and its record, and is published on `changes`.
"""

from __future__ import annotations

import logging
import secrets
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import anyio
import anyio.to_thread
from anyio.abc import TaskGroup

from server.admission import Admission, Admitted
from server.cache import Clock
from server.changes import Changes
from server.config import Settings
from server.errors import DataDirGoneError, ForeignTaskError, RequestError
from server.lookup import Lookup
from server.output import OutputWriter
from server.reuse import Counters, Fired, Reuse
from server.runner import Lifecycle, LocalRunner, Runner
from server.store import TaskStore
from server.task_context import context_for
from server.tasks import ErrorKind, Status, Task, TaskError
from server.waiting import ProgressFn, ReturnWhen, Until, Waiters, finished
from tools.context import JSON, ToolContext
from tools.process import tend_orphans
from tools.registry import Handler, Registry

log = logging.getLogger(__name__)

RunnerFactory = Callable[[Lifecycle], Runner]
"""Builds the runner over the executor's lifecycle calls (distributed mode's `DocketRunner`)."""

COPY_TURNS = 1
"""Output chunks stored at once across all tasks (see ToolContext.copy_turns); a pump holds a turn
only with a chunk in hand, never while it waits for one."""


NOT_STARTED = "its start could not be recorded (the task store did not answer); nothing of it ran: fire it again"


def _lost(task: Task, now: float) -> Task:
    """A task whose record is gone from the store (Redis restarted without persistence): what it became
    cannot be known, and it must not count as running here for ever."""
    message = "its record is gone from Redis (restarted without persistence?): how it ended cannot be known"
    error = TaskError(kind=ErrorKind.INTERRUPTED, message=message)
    return replace(task, status=Status.FAILED, error=error, result=None, finished_at=now)


class ActiveTasks(dict[str, Task]):
    """The unfinished tasks this process runs or follows, by id, and how many each owner has."""

    def __init__(self) -> None:
        super().__init__()
        self.per_owner: Counter[str] = Counter()

    def hold(self, task: Task) -> Task:
        """Holds the task; one already held under its id stays, and is returned."""
        if (held := self.get(task.id)) is not None:
            return held
        self[task.id] = task
        self.per_owner[task.owner] += 1
        return task

    def drop(self, task: Task) -> None:
        if self.pop(task.id, None) is not None:
            self.per_owner[task.owner] -= 1
            if self.per_owner[task.owner] <= 0:
                del self.per_owner[task.owner]


class Executor:
    def __init__(
        self,
        registry: Registry,
        settings: Settings,
        clock: Clock,
        task_group: TaskGroup,
        store: TaskStore,
        make_runner: RunnerFactory | None = None,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.store = store
        self.changes = Changes()
        self.clock = clock
        self._active = ActiveTasks()
        self._copy_turns = anyio.CapacityLimiter(COPY_TURNS)
        self._admission = Admission(registry, settings)
        self._reuse = Reuse(settings.finished_tasks_max, clock)
        self._lookup = Lookup(store, registry, clock, self._active, self._reuse.hot)
        self._waiters = Waiters(self._lookup.refresh)
        self._runner: Runner = (
            LocalRunner(task_group, settings, registry, self) if make_runner is None else make_runner(self)
        )
        self.runs_here = not self._runner.reaches_everywhere  # False on a distributed front-end

    def __repr__(self) -> str:
        c = self.counters
        return (
            f"<Executor active={len(self._active)} hot={len(self._reuse.hot)} fired={c.fired} "
            f"outcomes={dict(c.outcomes)} cache_hits={c.cache_hits} joined={c.joined} waiting={self._waiters.count}>"
        )

    @property
    def counters(self) -> Counters:
        return self._reuse.counters

    # ---- fire ----

    def fire(
        self,
        owner: str,
        tool: str,
        arguments: dict[str, Any],
        *,
        timeout_s: float | None = None,
        ttl_s: float | None = None,
        use_cache: bool = True,
        target: str | None = None,
    ) -> Fired:
        """Admits, commits and schedules; raises RequestError subclasses before anything starts."""
        if target is not None and not self._runner.reaches_everywhere:
            raise RequestError(f"target={target!r} needs distributed mode (redis_url): fire again without target")
        admitted = self._admission.admit(owner, tool, arguments, timeout_s=timeout_s, ttl_s=ttl_s, target=target)
        key = admitted.cache_key
        if key is not None:
            self.counters.cache_lookups[tool] += 1
            if use_cache and (reused := self._reuse.find(key, self._active, self._lookup.reusable)) is not None:
                return reused
        across = self.store.unfinished(owner)  # distributed mode: counted across front-ends
        self._admission.check_room(owner, self._active.per_owner[owner] if across is None else across)
        task = self._new_task(admitted)
        task.queue = admitted.queue
        self.store.add(task)  # on disk before the id is returned
        self._start(task, admitted.spec.handler)
        self.counters.fired += 1
        return Fired(task)

    def _new_task(self, admitted: Admitted) -> Task:
        task_id = secrets.token_urlsafe(16)
        return Task(
            id=task_id,
            tool=admitted.spec.name,
            owner=admitted.owner,
            created_at=self.clock(),
            ttl_s=admitted.ttl_s,
            output=self.store.new_output(task_id, self.settings.output_file_max_bytes),
            spec=admitted.spec,
            arguments=admitted.arguments,
            timeout_s=admitted.timeout_s,
            time_left_s=admitted.timeout_s,
            cache_key=admitted.cache_key,
        )

    def _start(self, task: Task, handler: Handler) -> None:
        self._active.hold(task)
        self._reuse.hold(task)
        self._runner.run(task, handler)

    # ---- the runner's lifecycle calls (each synchronous: committed at once) ----

    def queued(self, task: Task) -> None:
        task.handle.queued.set()  # waiters learn it is queued
        self.changes.publish(task)  # subscribers hear "queued behind a full limit"

    def running(self, task: Task) -> bool:
        """False when it must not start: another process settled it while it waited here (it took this one
        for dead), or its start could not be recorded (Redis away: it might be settled meanwhile)."""
        task.status = Status.RUNNING
        task.started_at = task.started_at or self.clock()
        if not self.store.record_running(task):  # settled elsewhere (that outcome stands), or not recorded
            self.finish(task, Status.FAILED, TaskError(kind=ErrorKind.CONNECTION, message=NOT_STARTED))
            return False
        self.changes.publish(task)
        return True

    def context(self, task: Task) -> ToolContext:
        return context_for(task, self.store, self.settings, self._copy_turns, lambda: self._announce(task))

    def finish(self, task: Task, status: Status, error: TaskError | None = None, result: JSON | None = None) -> None:
        """Synchronous on purpose: no await, so cancellation cannot come between a change and its record."""
        if isinstance(task.output, OutputWriter):
            task.output.finish()
        task.status, task.error, task.result = status, error, result
        task.finished_at = self.clock()
        if not self.store.record_outcome(task):  # another process settled it first: that outcome stands
            self._lookup.take_stored_outcome(task)
        self._end(task)

    def _end(self, task: Task, *, tend: bool = True) -> None:
        self.release(task)
        if tend and task.process is not None and self.runs_here:
            tend_orphans(self._active)  # what its command left outside the group, marked or not
        self._reuse.finished(task)
        task.handle.done.set()
        self._announce(task)

    def _announce(self, task: Task) -> None:
        for listener in task.handle.listeners:
            listener.set()
        self.changes.publish(task)

    def release(self, task: Task) -> None:
        self._active.drop(task)
        task.handle.started.set()
        task.handle.released.set()

    # ---- recovery of tasks an earlier run left unfinished ----

    def adopt(self, task: Task, handler: Handler, *, following: bool) -> None:
        """Runs `handler` as the task of a dead server this one claimed: `following` what still runs
        (it keeps its deadline, counted from when it started), or settling it (no deadline: nothing
        of it runs), with the same bookkeeping, notifications and limits as any task."""
        task.local = True
        if not following:
            task.time_left_s = None
        elif task.timeout_s is not None and task.started_at is not None:
            task.time_left_s = max(task.timeout_s - (self.clock() - task.started_at), 0.0)
        self._start(task, handler)

    def settle(self, task: Task, status: Status, error: TaskError | None, result: JSON | None) -> None:
        """Records the truthful end of a claimed task of a dead server, nothing of which runs. A task this
        process follows (a front-end's, run by a worker that died) ends through the record its waiters hold."""
        task = self._active.hold(task)
        task.local = True
        self.finish(task, status, error, result)

    # ---- read and wait ----

    def get(self, owner: str, task_id: str) -> Task:
        """The caller's task; another owner's task reads exactly like an unknown id."""
        return self._lookup.get(owner, task_id)

    def active_tasks(self) -> list[Task]:
        return list(self._active.values())

    async def wait(
        self,
        tasks: Sequence[Task],
        timeout_s: float,
        return_when: ReturnWhen,
        on_progress: ProgressFn | None = None,
        until: Until = finished,
    ) -> tuple[list[Task], bool]:
        """Waits on completion events (or `until`); returns the tasks as they are now, and whether it timed out."""
        return await self._waiters.wait(tasks, timeout_s, return_when, on_progress, until=until)

    async def no_waiters(self) -> None:
        await self._waiters.none_left()

    # ---- cancel / shutdown / upkeep ----

    async def cancel(self, owner: str, task_id: str) -> Task:
        task = self.get(owner, task_id)
        if task.status.finished:
            return task
        if not task.local and not self._runner.reaches_everywhere:
            raise ForeignTaskError(task_id)
        task.handle.cancel_reason = ErrorKind.CANCELLED_BY_CLIENT
        self._runner.cancel(task)
        if self._runner.reaches_everywhere:  # the worker confirms through the change stream
            return (await self.wait([task], self.settings.kill_grace_s + 5.0, "all"))[0][0]
        with anyio.move_on_after(self.settings.kill_grace_s + 2.0):
            await task.handle.done.wait()
        return task

    # ---- distributed mode ----

    def remote_change(self, task_id: str, *, status_changed: bool = True) -> None:
        """A task changed in another process: one fired here takes the stored state (and finishes here if it
        finished there); another's is published when its status changed; waiters wake."""
        task = self._active.get(task_id)
        if task is not None and self._runner.reaches_everywhere:
            self._take_state(task, self.store.load(task_id, self.registry.get) or _lost(task, self.clock()))
        elif status_changed and self._runner.reaches_everywhere:
            stored = self._lookup.load(task_id)
            if stored is not None:
                self.changes.publish(stored)
        self._waiters.poke(task_id)

    def peer_changed(self, task_id: str) -> None:
        """A peer server's task on the shared data dir changed (`PeerFeed`): published to subscribers here."""
        if task_id not in self._active and (stored := self._lookup.load(task_id)) is not None:
            self.changes.publish(stored)
        self._waiters.poke(task_id)

    def _take_state(self, task: Task, stored: Task) -> None:
        task.status, task.started_at, task.process = stored.status, stored.started_at, stored.process
        task.output = stored.output
        if task.process is not None:
            task.handle.started.set()
        if not task.status.finished:
            self._announce(task)
            return
        task.error, task.result, task.finished_at = stored.error, stored.result, stored.finished_at
        self._end(task, tend=False)  # run elsewhere: nothing of it is this process's to tend

    def run_here(self, task: Task) -> None:
        assert task.spec is not None  # a worker runs a queued task with its own limits and bookkeeping
        task.local = True
        self._start(task, task.spec.handler)

    async def shutdown(self) -> None:
        """Cancels the tasks run here (TERM, grace, KILL), waits for them; a front-end's go on (queued first)."""
        active = list(self._active.values()) if self.runs_here else []
        for task in active:
            task.handle.cancel_reason = ErrorKind.SHUTDOWN
            task.handle.scope.cancel()
        with anyio.move_on_after(self.settings.shutdown_timeout_s):
            await self._runner.drain()
            for task in active:
                await task.handle.released.wait()

    async def sweep(self) -> int:
        """Expires old results in both tiers and deletes their files (in a worker thread); returns how many."""
        self._reuse.hot.expire()
        expired = self.store.sweep(self.clock(), self.settings.tombstones_max)
        if expired:
            await anyio.to_thread.run_sync(self.store.remove_files, expired)
        return len(expired)


CHECKPOINT_INTERVAL_S = 2.0
"""How often the store's WAL is checkpointed (in a worker thread): a burst of tasks grows it by ~45 KB a
task, ~8 MB a second at full speed, and a checkpoint lets it start over (truncated, see `WAL_KEEP_BYTES`)."""


async def upkeep_forever(executor: Executor) -> None:
    """Checkpoints the store's WAL every few seconds and expires old results every `sweep_interval_s`,
    off the commit path."""
    interval_s = executor.settings.sweep_interval_s
    sweep_at = anyio.current_time() + interval_s
    while True:
        await anyio.sleep(min(CHECKPOINT_INTERVAL_S, interval_s))
        try:
            if anyio.current_time() >= sweep_at:
                sweep_at = anyio.current_time() + interval_s
                await executor.sweep()
            await anyio.to_thread.run_sync(executor.store.checkpoint)
        except DataDirGoneError:
            pass  # said once, by the store
        except Exception:
            log.exception("store upkeep failed; will try again")
