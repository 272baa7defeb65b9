"""Executor: fire / get / wait / cancel over one process-wide anyio task group.

`fire` is synchronous and cheap: it validates, commits the task to the store and schedules
it; the work starts on a later loop iteration, after the caller's reply is on its way. Each
task runs under its own cancel scope and `fail_after`, behind the global `CapacityLimiter`
and its tool's own limiter, so excess work waits as `queued`. Whatever a handler raises is
recorded on its task; nothing escapes into the task group. Every status change is committed
as it happens, synchronously, so no cancellation can come between a change and its record.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import anyio.lowlevel
import anyio.to_thread
from anyio.abc import TaskGroup
from pydantic import ValidationError

from server.cache import Clock, FinishedTasks, result_key
from server.config import Settings
from server.errors import (
    ExpiredTaskError,
    ForeignTaskError,
    InvalidArgumentsError,
    RefusedError,
    TooLargeError,
    TooManyTasksError,
    UnavailableToolError,
    UnknownTaskError,
    UnknownToolError,
    plain_problems,
)
from server.output import OutputLog, StoredLog
from server.store import Store
from server.tasks import ErrorKind, Status, Task, TaskError, iso
from tools.context import JSON, LeftRunning, ProcessInfo, TaskFailure, ToolContext
from tools.process import tend_orphans
from tools.registry import Handler, Registry, ToolSpec

log = logging.getLogger(__name__)

ReturnWhen = Literal["all", "any"]
ProgressFn = Callable[[int, int], Awaitable[None]]
COPY_TURNS = 1
"""Output chunks stored at once across all tasks (see ToolContext.copy_turns); a pump holds a turn
only with a chunk in hand, never while it waits for one."""
REPLY_HOPS = 6
"""Loop passes a new task yields before starting: a reply crosses a few tasks (the handler's, the
session writer's, the HTTP response's) on its way to the socket."""
FOREIGN_RECHECK_S = 1.0
"""Tasks of another server process send no events here: a wait re-reads them this often."""


@dataclass(frozen=True, slots=True)
class Fired:
    task: Task
    cached: bool = False
    deduplicated: bool = False


@dataclass(slots=True)
class Counters:
    fired: int = 0
    cache_hits: int = 0
    joined: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    cache_lookups: Counter[str] = field(default_factory=Counter)
    cache_reuses: Counter[str] = field(default_factory=Counter)


class Executor:
    def __init__(
        self, registry: Registry, settings: Settings, clock: Clock, task_group: TaskGroup, store: Store
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.store = store
        self.counters = Counters()
        self._clock = clock
        self._tg = task_group
        self._limiter = anyio.CapacityLimiter(settings.max_concurrency)
        self._tool_limiters: dict[str, anyio.CapacityLimiter] = {}
        for spec in registry:
            group = spec.limit_group or spec.name
            limit = settings.tool_concurrency.get(group, settings.tool_concurrency.get(spec.name, spec.max_concurrency))
            if limit is not None and group not in self._tool_limiters:
                self._tool_limiters[group] = anyio.CapacityLimiter(limit)
        self._active: dict[str, Task] = {}
        self._copy_turns = anyio.CapacityLimiter(COPY_TURNS)
        self._owner_limiters: dict[str, anyio.CapacityLimiter | None] = {}
        self._active_per_owner: Counter[str] = Counter()
        self._finished = FinishedTasks(settings.finished_tasks_max, clock, on_drop=self._forget_key)
        self._reuse: dict[str, str] = {}
        self.watchers: list[Callable[[Task], None]] = []
        """Called (synchronously, must not raise or block) when a task starts running or finishes, and when it
        waits queued behind a full limit (status still QUEUED; issue 17)."""
        """result key → id of the task that holds it (running, or finished and hot)."""
        self._waiting = 0
        self._no_waiters = anyio.Event()
        self._no_waiters.set()

    def __repr__(self) -> str:
        c = self.counters
        return (
            f"<Executor active={len(self._active)} hot={len(self._finished)} fired={c.fired} "
            f"completed={c.completed} failed={c.failed} cancelled={c.cancelled} "
            f"cache_hits={c.cache_hits} joined={c.joined} waiting={self._waiting}>"
        )

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
    ) -> Fired:
        """Validates, commits and schedules; raises RequestError subclasses before anything starts."""
        spec = self.registry.get(tool)
        if spec is None:
            raise UnknownToolError(tool, self.registry.names())
        if spec.unavailable is not None:
            raise UnavailableToolError(tool, spec.unavailable)
        size_bytes = len(json.dumps(arguments, separators=(",", ":"), default=str))
        if size_bytes > self.settings.max_argument_bytes:
            raise TooLargeError(f"the arguments of {tool!r}", size_bytes, self.settings.max_argument_bytes)
        try:
            parsed = spec.input_model.model_validate(arguments)
        except ValidationError as exc:
            raise InvalidArgumentsError(tool, plain_problems(exc)) from exc
        if spec.check is not None:
            try:
                spec.check(parsed, owner)  # issue 12: per-owner policy
            except ValueError as exc:
                raise RefusedError(tool, str(exc)) from exc
        timeout = self._timeout(spec, timeout_s)
        key = result_key(owner, tool, parsed) if spec.is_cacheable(parsed) else None
        if key is not None:
            self.counters.cache_lookups[tool] += 1
        if key is not None and use_cache and (reused := self._reusable(key)) is not None:
            return reused
        if self._active_per_owner[owner] >= (most := self.settings.max_active_for(owner)):  # issue 12: per owner
            raise TooManyTasksError(most)
        task_id = secrets.token_urlsafe(16)
        task = Task(
            id=task_id,
            tool=spec.name,
            owner=owner,
            created_at=self._clock(),
            ttl_s=self.settings.ttl_s if ttl_s is None else ttl_s,
            output=OutputLog(self.store.output_path(task_id), self.settings.output_file_max_bytes),
            spec=spec,
            arguments=parsed,
            timeout_s=timeout,
            time_left_s=timeout,
            cache_key=key,
        )
        self.store.insert(task.row(self.store.instance))  # on disk before the id is returned
        self._start(task, spec.handler)
        self.counters.fired += 1
        return Fired(task)

    def _start(self, task: Task, handler: Handler) -> None:
        self._active[task.id] = task
        self._active_per_owner[task.owner] += 1
        if task.cache_key is not None:
            self._reuse[task.cache_key] = task.id
        self._tg.start_soon(self._run, task, handler, name=f"offload task {task.tool} {task.id}")

    def _timeout(self, spec: ToolSpec, asked_s: float | None) -> float:
        limit = self.settings.max_timeout_s
        if asked_s is not None and asked_s > limit:
            raise InvalidArgumentsError(spec.name, [f"timeout_s={asked_s} is above this server's maximum of {limit} s"])
        return asked_s or spec.default_timeout_s or self.settings.default_timeout_s

    def _reusable(self, key: str) -> Fired | None:
        task_id = self._reuse.get(key)
        if task_id is not None and (task := self._active.get(task_id)) is not None:
            self.counters.joined += 1
            self.counters.cache_reuses[task.tool] += 1
            return Fired(task, deduplicated=True)
        task = self._finished.get(task_id) if task_id is not None else None
        if task is None and (stored_id := self.store.reusable(key, self._clock())) is not None:
            task = self._load(stored_id)
        if task is not None and task.status is Status.COMPLETED:
            self.counters.cache_hits += 1
            self.counters.cache_reuses[task.tool] += 1
            return Fired(task, cached=True)
        return None

    # ---- run ----

    async def _run(self, task: Task, handler: Handler) -> None:
        # Let the reply to `fire` leave first: a process spawn ahead of it delays it.
        for _ in range(REPLY_HOPS):
            await anyio.lowlevel.checkpoint()
        try:
            with task.scope:
                tool_limiter = self._tool_limiters.get(_limit_key(task))
                owner_limiter = self._owner_limiter(task.owner)  # no owner runs past its share
                limiters = [owner_limiter, self._limiter, tool_limiter]
                if any(limiter is not None and limiter.available_tokens < 1 for limiter in limiters):
                    task.queued.set()  # waiters learn it is queued
                    self._tell_watchers(task)  # watchers hear "queued behind a full limit"
                async with (
                    owner_limiter or contextlib.nullcontext(),
                    self._limiter,
                    tool_limiter or contextlib.nullcontext(),
                ):
                    self._mark_running(task)
                    with anyio.fail_after(task.time_left_s):
                        result = await handler(task.arguments, self._context(task))
                    self._finish(task, Status.COMPLETED, result=result)
            if not task.status.finished:
                self._finish(task, Status.CANCELLED, _cancel_error(task))
        except TimeoutError:
            message = f"timed out after {task.timeout_s:g} s (timeout_s); its process group was killed"
            self._finish(task, Status.FAILED, TaskError(kind=ErrorKind.TIMEOUT, message=message))
        except TaskFailure as failure:
            self._finish(task, Status.FAILED, TaskError(kind=failure.kind, message=failure.message), failure.result)
        except LeftRunning as left:
            log.info("task %s left running on purpose: %s", task.id, left)
            self._release(task)
        except Exception as exc:
            log.exception("task %s (%s) raised", task.id, task.tool)
            error = TaskError(kind=ErrorKind.EXCEPTION, message=f"{type(exc).__name__}: {exc}")
            self._finish(task, Status.FAILED, error)
        finally:
            if task.id in self._active:  # the whole task group is going away
                task.cancel_reason = ErrorKind.SHUTDOWN
                self._finish(task, Status.CANCELLED, _cancel_error(task))

    def _owner_limiter(self, owner: str) -> anyio.CapacityLimiter | None:
        if owner not in self._owner_limiters:
            slots = self.settings.slots_for(owner)
            self._owner_limiters[owner] = None if slots is None else anyio.CapacityLimiter(slots)
        return self._owner_limiters[owner]

    def _context(self, task: Task) -> ToolContext:
        output = task.output

        def set_process(info: ProcessInfo) -> None:
            task.process = info
            task.detached = self.settings.detach or task.watcher is not None
            self.store.update(
                task.id, pid=info.pid, start_ticks=info.start_ticks, boot_id=info.boot_id, detached=int(task.detached)
            )
            task.started.set()

        def set_watcher(info: ProcessInfo) -> None:
            task.watcher, task.detached = info, True
            if isinstance(task.output, OutputLog):
                task.output.close()
                task.output = StoredLog(task.output.path)  # the capture process writes it from now on
            self.store.update(
                task.id, watcher_pid=info.pid, watcher_ticks=info.start_ticks, boot_id=info.boot_id, detached=1
            )

        path = self.store.output_path(task.id)
        return ToolContext(
            task_id=task.id,
            write_output=output.write if isinstance(output, OutputLog) else _no_output,
            output_bytes=lambda: task.output.total_bytes,
            set_process=set_process,
            set_watcher=set_watcher,
            output_path=path,
            exit_path=self.store.exit_path(task.id),
            capture_argv=self._capture_argv(task.id),
            kill_grace_s=self.settings.kill_grace_s,
            shutting_down=lambda: task.cancel_reason is ErrorKind.SHUTDOWN,
            copy_turns=self._copy_turns,
            owner=task.owner,
        )

    def _capture_argv(self, task_id: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "server.capture",
            "--log",
            str(self.store.output_path(task_id)),
            "--exit",
            str(self.store.exit_path(task_id)),
            "--file-max",
            str(self.settings.output_file_max_bytes),
            "--grace",
            str(self.settings.kill_grace_s),
        ]

    def _mark_running(self, task: Task) -> None:
        task.status = Status.RUNNING
        task.started_at = task.started_at or self._clock()
        self.store.update(task.id, status=task.status.value, started_at=task.started_at)
        self._tell_watchers(task)

    def _finish(self, task: Task, status: Status, error: TaskError | None = None, result: JSON | None = None) -> None:
        """Synchronous on purpose: no await, so cancellation cannot come between a change and its record."""
        if isinstance(task.output, OutputLog):
            task.output.finish()
        task.status, task.error, task.result = status, error, result
        task.finished_at = self._clock()
        self.store.update(task.id, **task.final_columns())
        self._release(task)
        setattr(self.counters, status.value, getattr(self.counters, status.value) + 1)
        if status is not Status.COMPLETED:
            self._forget_key(task)
        self._finished.add(task)
        if task.process is not None:
            tend_orphans(self._active)  # what its command left outside the group, marked or not
        task.done.set()
        for listener in task.listeners:
            listener.set()
        self._tell_watchers(task)

    def _tell_watchers(self, task: Task) -> None:
        for watcher in self.watchers:
            try:
                watcher(task)
            except Exception:  # a watcher's bug must not break the task's bookkeeping
                log.exception("task watcher %r raised", watcher)

    def _release(self, task: Task) -> None:
        if self._active.pop(task.id, None) is not None:
            self._active_per_owner[task.owner] -= 1
            if self._active_per_owner[task.owner] <= 0:
                del self._active_per_owner[task.owner]
        task.started.set()
        task.released.set()

    def _forget_key(self, task: Task) -> None:
        if task.cache_key is not None and self._reuse.get(task.cache_key) == task.id:
            del self._reuse[task.cache_key]

    # ---- recovery of tasks an earlier run left unfinished ----

    def adopt(self, task: Task, handler: Handler, *, following: bool) -> None:
        """Runs `handler` as the task of a dead server this one claimed: `following` what still runs
        (it keeps its deadline, counted from when it started), or settling it (no deadline: nothing
        of it runs), with the same bookkeeping, notifications and limits as any task."""
        task.local = True
        if not following:
            task.time_left_s = None
        elif task.timeout_s is not None and task.started_at is not None:
            task.time_left_s = max(task.timeout_s - (self._clock() - task.started_at), 0.0)
        self._start(task, handler)

    def settle(self, task: Task, status: Status, error: TaskError | None, result: JSON | None) -> None:
        """Records the truthful end of a claimed task of a dead server, nothing of which runs."""
        task.local = True
        self._active[task.id] = task
        self._active_per_owner[task.owner] += 1
        self._finish(task, status, error, result)

    # ---- read ----

    def get(self, owner: str, task_id: str) -> Task:
        """The caller's task, through both tiers; another owner's task reads exactly like an unknown id."""
        task = self._active.get(task_id) or self._finished.get(task_id)
        if task is None and (row := self.store.row(task_id)) is not None and row["owner"] == owner:
            if row["expires_at"] is not None and row["expires_at"] <= self._clock():
                raise ExpiredTaskError(task_id, iso(row["expires_at"]) or "", "expired")
            task = self._from_row(row)
        if task is not None and task.owner == owner:
            return task
        tomb = self.store.tombstone(task_id)
        if tomb is not None and tomb.owner == owner:
            raise ExpiredTaskError(task_id, iso(tomb.at) or "", "expired")
        raise UnknownTaskError(task_id)

    def _load(self, task_id: str) -> Task | None:
        """Reads an unexpired task through to the store."""
        row = self.store.row(task_id)
        if row is None or (row["expires_at"] is not None and row["expires_at"] <= self._clock()):
            return None
        return self._from_row(row)

    def _from_row(self, row: Any) -> Task:
        task = Task.from_row(row, self.store.output_path(row["id"]), self.registry.get(row["tool"]), local=False)
        if task.status.finished:
            self._finished.add(task)  # finished tasks never change: keep them hot
        return task

    def now(self) -> float:
        return self._clock()

    @property
    def active_count(self) -> int:
        return len(self._active)

    def active_tasks(self) -> list[Task]:
        return list(self._active.values())

    # ---- wait ----

    async def wait(
        self,
        tasks: Sequence[Task],
        timeout_s: float,
        return_when: ReturnWhen,
        on_progress: ProgressFn | None = None,
        heartbeat_s: float = 5.0,
    ) -> tuple[list[Task], bool]:
        """Waits on completion events; returns the tasks as they are now, and whether it timed out."""
        self._waiting += 1
        self._no_waiters = anyio.Event() if self._waiting == 1 else self._no_waiters
        current = list(tasks)
        try:
            with anyio.move_on_after(timeout_s):
                while not _satisfied(current, return_when):
                    beat = FOREIGN_RECHECK_S if any(not t.local for t in current) else heartbeat_s
                    await self._next_change(current, beat)
                    current = [self._refresh(t) for t in current]
                    if on_progress is not None:
                        await on_progress(sum(t.status.finished for t in current), len(current))
                return current, False
            return current, not _satisfied(current, return_when)
        finally:
            self._waiting -= 1
            if self._waiting == 0:
                self._no_waiters.set()

    def _refresh(self, task: Task) -> Task:
        if task.local or task.status.finished:
            return task
        return self._load(task.id) or task

    async def _next_change(self, tasks: Iterable[Task], heartbeat_s: float) -> None:
        changed = anyio.Event()
        pending = [t for t in tasks if not t.status.finished]
        for task in pending:
            task.listeners.add(changed)
        try:
            with anyio.move_on_after(heartbeat_s):
                await changed.wait()
        finally:
            for task in pending:
                task.listeners.discard(changed)

    async def no_waiters(self) -> None:
        """Returns once no `wait` is in progress (tests use it to see a cancelled poll end)."""
        await self._no_waiters.wait()

    # ---- cancel / shutdown / upkeep ----

    async def cancel(self, owner: str, task_id: str) -> Task:
        task = self.get(owner, task_id)
        if task.status.finished:
            return task
        if not task.local:
            raise ForeignTaskError(task_id)
        task.cancel_reason = ErrorKind.CANCELLED_BY_CLIENT
        task.scope.cancel()
        with anyio.move_on_after(self.settings.kill_grace_s + 2.0):
            await task.done.wait()
        return task

    async def shutdown(self) -> None:
        """Cancels every task (process groups TERM, then KILL) and waits, bounded, for them."""
        active = list(self._active.values())
        for task in active:
            task.cancel_reason = ErrorKind.SHUTDOWN
            task.scope.cancel()
        with anyio.move_on_after(self.settings.shutdown_timeout_s):
            for task in active:
                await task.released.wait()

    async def sweep(self) -> int:
        """Expires old results in both tiers and deletes their files (in a worker thread); returns how many."""
        self._finished.expire()
        expired = self.store.sweep(self._clock(), self.settings.tombstones_max)
        if expired:
            await anyio.to_thread.run_sync(self.store.remove_files, expired)
        return len(expired)

    async def upkeep_forever(self) -> None:
        """Expires old results and checkpoints the store's WAL, off the commit path."""
        while True:
            await anyio.sleep(self.settings.sweep_interval_s)
            try:
                await self.sweep()
                await anyio.to_thread.run_sync(self.store.checkpoint)
            except Exception:
                log.exception("store upkeep failed; will try again")


def _limit_key(task: Task) -> str:
    spec = task.spec
    return spec.limit_group or spec.name if spec is not None else task.tool


def _no_output(_data: bytes) -> None:
    """A task whose process writes its output file itself gets nothing through the server."""


def _satisfied(tasks: Sequence[Task], return_when: ReturnWhen) -> bool:
    finished = [t.status.finished for t in tasks]
    return all(finished) if return_when == "all" else any(finished) or not tasks


def _cancel_error(task: Task) -> TaskError:
    reason = task.cancel_reason or ErrorKind.CANCELLED_BY_CLIENT
    who = "cancelled by cancel_task" if reason is ErrorKind.CANCELLED_BY_CLIENT else "the server shut down"
    if task.status is Status.QUEUED:
        return TaskError(kind=reason, message=f"{who} while the task was queued; it never started")
    ended = "its process group was terminated (TERM, then KILL)" if task.process is not None else "it was stopped"
    return TaskError(kind=reason, message=f"{who} while the task ran; {ended}")
