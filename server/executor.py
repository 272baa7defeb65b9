"""Executor: fire / get / wait / cancel over one process-wide anyio task group.

`fire` is synchronous and cheap: it validates, records the task and schedules it; the work
starts on a later loop iteration, after the caller's reply is on its way. Each task runs
under its own cancel scope and `fail_after`, behind the global `CapacityLimiter` and its
tool's own limiter, so excess work waits as `queued`. Whatever a handler raises is recorded
on its task; nothing escapes into the task group.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup
from pydantic import ValidationError

from server.cache import Clock, FinishedTasks, result_key
from server.config import Settings
from server.errors import (
    ExpiredTaskError,
    InvalidArgumentsError,
    UnknownTaskError,
    UnknownToolError,
)
from server.output import OutputLog
from server.tasks import ErrorKind, Status, Task, TaskError, iso
from tools.context import JSON, TaskFailure, ToolContext
from tools.registry import Registry, ToolSpec

log = logging.getLogger(__name__)

ReturnWhen = Literal["all", "any"]
ProgressFn = Callable[[int, int], Awaitable[None]]


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


class Executor:
    def __init__(self, registry: Registry, settings: Settings, clock: Clock, task_group: TaskGroup) -> None:
        self.registry = registry
        self.settings = settings
        self.counters = Counters()
        self._clock = clock
        self._tg = task_group
        self._limiter = anyio.CapacityLimiter(settings.max_concurrency)
        self._tool_limiters = {
            spec.name: anyio.CapacityLimiter(limit)
            for spec in registry
            if (limit := settings.tool_concurrency.get(spec.name, spec.max_concurrency)) is not None
        }
        self._active: dict[str, Task] = {}
        self._by_age: dict[str, Task] = {}
        """Every task still kept, oldest first (insertion order), so listing never sorts."""
        self._finished = FinishedTasks(
            settings.finished_tasks_max, clock, settings.tombstones_max, on_drop=self._dropped
        )
        self._reuse: dict[str, str] = {}
        self._waiting = 0
        self._no_waiters = anyio.Event()
        self._no_waiters.set()

    def __repr__(self) -> str:
        c = self.counters
        return (
            f"<Executor active={len(self._active)} finished={len(self._finished)} fired={c.fired} "
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
        """Validates and schedules; raises RequestError subclasses before anything starts."""
        spec = self.registry.get(tool)
        if spec is None:
            raise UnknownToolError(tool, self.registry.names())
        try:
            parsed = spec.input_model.model_validate(arguments)
        except ValidationError as exc:
            raise InvalidArgumentsError(tool, _problems(exc)) from exc
        key = result_key(owner, tool, parsed) if spec.cacheable else None
        if key is not None and use_cache and (reused := self._reusable(key)) is not None:
            return reused
        task = Task(
            id=secrets.token_urlsafe(16),
            spec=spec,
            arguments=parsed,
            owner=owner,
            created_at=self._clock(),
            timeout_s=self._timeout(spec, timeout_s),
            ttl_s=self.settings.ttl_s if ttl_s is None else ttl_s,
            output=OutputLog(self.settings.output_max_bytes),
            cache_key=key,
        )
        self._active[task.id] = task
        self._by_age[task.id] = task
        if key is not None:
            self._reuse[key] = task.id
        self.counters.fired += 1
        self._tg.start_soon(self._run, task, name=f"offload task {spec.name} {task.id}")
        return Fired(task)

    def _timeout(self, spec: ToolSpec, asked_s: float | None) -> float:
        limit = self.settings.max_timeout_s
        if asked_s is not None and asked_s > limit:
            raise InvalidArgumentsError(spec.name, [f"timeout_s={asked_s} is above this server's maximum of {limit} s"])
        return asked_s or spec.default_timeout_s or self.settings.default_timeout_s

    def _reusable(self, key: str) -> Fired | None:
        task_id = self._reuse.get(key)
        if task_id is None:
            return None
        if (task := self._active.get(task_id)) is not None:
            self.counters.joined += 1
            return Fired(task, deduplicated=True)
        task = self._finished.get(task_id)
        if task is not None and task.status is Status.COMPLETED:
            self.counters.cache_hits += 1
            return Fired(task, cached=True)
        return None

    # ---- run ----

    async def _run(self, task: Task) -> None:
        # Let the reply to `fire` leave first: a process spawn ahead of it delays it.
        await anyio.lowlevel.checkpoint()
        try:
            with task.scope:
                tool_limiter = self._tool_limiters.get(task.tool)
                if self._limiter.available_tokens < 1 or (tool_limiter and tool_limiter.available_tokens < 1):
                    task.started.set()  # waiters learn it is queued
                async with self._limiter, tool_limiter or contextlib.nullcontext():
                    self._mark_running(task)
                    with anyio.fail_after(task.timeout_s):
                        result = await task.spec.handler(task.arguments, self._context(task))
                    self._finish(task, Status.COMPLETED, result=result)
            if not task.status.finished:
                reason = task.cancel_reason or ErrorKind.CANCELLED_BY_CLIENT
                self._finish(task, Status.CANCELLED, TaskError(kind=reason, message=_CANCEL_TEXT[reason]))
        except TimeoutError:
            message = f"timed out after {task.timeout_s:g} s (timeout_s); its process group was killed"
            self._finish(task, Status.FAILED, TaskError(kind=ErrorKind.TIMEOUT, message=message))
        except TaskFailure as failure:
            error = TaskError(kind=failure.kind, message=failure.message)
            self._finish(task, Status.FAILED, error, result=failure.result)
        except Exception as exc:
            log.exception("task %s (%s) raised", task.id, task.tool)
            error = TaskError(kind=ErrorKind.EXCEPTION, message=f"{type(exc).__name__}: {exc}")
            self._finish(task, Status.FAILED, error)
        finally:
            if not task.status.finished:  # the whole task group is going away
                error = TaskError(kind=ErrorKind.SHUTDOWN, message=_CANCEL_TEXT[ErrorKind.SHUTDOWN])
                self._finish(task, Status.CANCELLED, error)

    def _context(self, task: Task) -> ToolContext:
        def set_pid(pid: int) -> None:
            task.pid = pid
            task.started.set()

        return ToolContext(
            task_id=task.id,
            write_output=task.output.write,
            set_pid=set_pid,
            kill_grace_s=self.settings.kill_grace_s,
        )

    def _mark_running(self, task: Task) -> None:
        task.status = Status.RUNNING
        task.started_at = self._clock()

    def _finish(self, task: Task, status: Status, error: TaskError | None = None, result: JSON | None = None) -> None:
        """Synchronous on purpose: no await, so cancellation cannot interrupt the final write."""
        task.status = status
        task.error = error
        task.result = result
        task.finished_at = self._clock()
        self._active.pop(task.id, None)
        if status is Status.COMPLETED:
            self.counters.completed += 1
        elif status is Status.FAILED:
            self.counters.failed += 1
        else:
            self.counters.cancelled += 1
        if status is not Status.COMPLETED:
            self._forget_key(task)
        self._finished.add(task)
        task.started.set()
        task.done.set()
        for listener in task.listeners:
            listener.set()

    def _dropped(self, task: Task) -> None:
        self._by_age.pop(task.id, None)
        self._forget_key(task)

    def _forget_key(self, task: Task) -> None:
        if task.cache_key is not None and self._reuse.get(task.cache_key) == task.id:
            del self._reuse[task.cache_key]

    # ---- read ----

    def get(self, owner: str, task_id: str) -> Task:
        task = self._active.get(task_id) or self._finished.get(task_id)
        if task is not None and task.owner == owner:
            return task
        tomb = self._finished.tombstone(task_id)
        if tomb is not None and tomb.owner == owner:
            raise ExpiredTaskError(task_id, iso(tomb.at) or "", tomb.reason)
        raise UnknownTaskError(task_id)

    def tasks(self, owner: str) -> Iterator[Task]:
        """The caller's tasks still kept, newest first; lazy, so a listing stops at its limit.

        Consume it before the next await: the index may change at any await."""
        self._finished.expire()
        return (t for t in reversed(self._by_age.values()) if t.owner == owner)

    @property
    def active_count(self) -> int:
        return len(self._active)

    # ---- wait ----

    async def wait(
        self,
        tasks: Sequence[Task],
        timeout_s: float,
        return_when: ReturnWhen,
        on_progress: ProgressFn | None = None,
        heartbeat_s: float = 5.0,
    ) -> bool:
        """Waits on completion events; returns True if it gave up at `timeout_s`."""
        self._waiting += 1
        self._no_waiters = anyio.Event() if self._waiting == 1 else self._no_waiters
        try:
            with anyio.move_on_after(timeout_s):
                while not _satisfied(tasks, return_when):
                    await self._next_change(tasks, heartbeat_s)
                    if on_progress is not None:
                        await on_progress(sum(t.status.finished for t in tasks), len(tasks))
                return False
            return not _satisfied(tasks, return_when)
        finally:
            self._waiting -= 1
            if self._waiting == 0:
                self._no_waiters.set()

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

    # ---- cancel / shutdown ----

    async def cancel(self, owner: str, task_id: str) -> Task:
        task = self.get(owner, task_id)
        if not task.status.finished:
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
                await task.done.wait()


def _satisfied(tasks: Sequence[Task], return_when: ReturnWhen) -> bool:
    finished = [t.status.finished for t in tasks]
    return all(finished) if return_when == "all" else any(finished) or not tasks


_CANCEL_TEXT = {
    ErrorKind.CANCELLED_BY_CLIENT: "cancelled by cancel_task; its process group was terminated",
    ErrorKind.SHUTDOWN: "the server shut down while the task ran; its process group was terminated",
}


def _problems(exc: ValidationError) -> list[str]:
    problems = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "arguments"
        got = error.get("input")
        shown = repr(got) if len(repr(got)) <= 80 else repr(got)[:77] + "..."
        problems.append(f"{where}: {error['msg']} (got {shown})")
    return problems
