"""Runner: where a task runs. Today, the process-wide anyio task group (`LocalRunner`).

A run waits behind the owner's fair share, the global `CapacityLimiter` and its tool's own limit
(queued meanwhile), then runs the handler under the task's cancel scope and deadline. Whatever the
handler raises becomes the task's outcome through `Lifecycle.finish`; nothing escapes into the task
group, so one task's crash never takes down the server or another task.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Protocol

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

from server.config import Settings
from server.tasks import ErrorKind, Status, Task, TaskError, error_kind
from tools.context import JSON, LeftRunning, TaskFailure, ToolContext
from tools.registry import Handler, Registry

log = logging.getLogger(__name__)

REPLY_HOPS = 6
"""Loop passes a new task yields before starting: a reply crosses a few tasks (the handler's, the
session writer's, the HTTP response's) on its way to the socket."""


class SettledElsewhere(Exception):
    """The task must not start here: settled by another process while it waited (this one was taken for
    dead), or its start could not be recorded."""


class Lifecycle(Protocol):
    """What the executor does at each step of a run (each call synchronous, committed at once)."""

    def queued(self, task: Task) -> None: ...
    def running(self, task: Task) -> bool: ...
    def finish(
        self, task: Task, status: Status, error: TaskError | None = None, result: JSON | None = None
    ) -> None: ...
    def release(self, task: Task) -> None: ...
    def context(self, task: Task) -> ToolContext: ...


class Runner(Protocol):
    reaches_everywhere: bool
    """True when `cancel` reaches a task whoever runs it (distributed mode); False: only this process's."""

    def run(self, task: Task, handler: Handler) -> None:
        """Starts the task on a later loop iteration and returns at once."""

    def cancel(self, task: Task) -> None:
        """Asks whatever runs the task to stop it (TERM the group, grace, KILL); returns at once. The
        final status is written by whoever runs it (or here, when nothing had started it)."""

    async def drain(self) -> None:
        """Returns once every task `run` was given is in the hands of what runs it (at shutdown)."""


class LocalRunner:
    reaches_everywhere = False

    def __init__(self, task_group: TaskGroup, settings: Settings, registry: Registry, lifecycle: Lifecycle) -> None:
        self._tg = task_group
        self._settings = settings
        self._lifecycle = lifecycle
        self._limiter = anyio.CapacityLimiter(settings.max_concurrency)
        self._tool_limiters = _tool_limiters(registry, settings)
        self._owner_limiters: dict[str, anyio.CapacityLimiter | None] = {}

    async def drain(self) -> None:
        """Nothing to hand over: this process runs its tasks (shutdown stops them)."""

    def run(self, task: Task, handler: Handler) -> None:
        self._tg.start_soon(self._run, task, handler, name=f"offload task {task.tool} {task.id}")

    def cancel(self, task: Task) -> None:
        task.handle.scope.cancel()

    async def _run(self, task: Task, handler: Handler) -> None:
        try:
            await self._run_and_record(task, handler)
        except Exception:  # recording its end failed (the store away): this task ends, the server goes on
            log.exception("task %s (%s): its end could not be recorded", task.id, task.tool)
            self._lifecycle.release(task)

    async def _run_and_record(self, task: Task, handler: Handler) -> None:
        # Let the reply to `fire` leave first: a process spawn ahead of it delays it.
        for _ in range(REPLY_HOPS):
            await anyio.lowlevel.checkpoint()
        lifecycle = self._lifecycle
        try:
            with task.handle.scope:
                result = await self._limited(task, handler)
                lifecycle.finish(task, Status.COMPLETED, result=result)
            if not task.status.finished:
                lifecycle.finish(task, Status.CANCELLED, cancel_error(task))
        except TimeoutError:
            message = f"timed out after {task.timeout_s:g} s (timeout_s); its process group was killed"
            lifecycle.finish(task, Status.FAILED, TaskError(kind=ErrorKind.TIMEOUT, message=message))
        except TaskFailure as failure:
            message = failure.message if isinstance(failure.message, str) else "the tool failed without saying why"
            error = TaskError(kind=error_kind(failure.kind), message=message)
            lifecycle.finish(task, Status.FAILED, error, failure.result if _is_json_object(failure.result) else None)
        except LeftRunning as left:
            log.info("task %s left running on purpose: %s", task.id, left)
            lifecycle.release(task)
        except SettledElsewhere:
            log.warning("task %s does not start: settled elsewhere meanwhile, or its start went unrecorded", task.id)
        except Exception as exc:
            log.exception("task %s (%s) raised", task.id, task.tool)
            error = TaskError(kind=ErrorKind.EXCEPTION, message=f"{type(exc).__name__}: {exc}")
            lifecycle.finish(task, Status.FAILED, error)
        finally:
            if not task.handle.released.is_set():  # the whole task group is going away
                task.handle.cancel_reason = ErrorKind.SHUTDOWN
                lifecycle.finish(task, Status.CANCELLED, cancel_error(task))

    async def _limited(self, task: Task, handler: Handler) -> JSON:
        tool_limiter = self._tool_limiters.get(_limit_key(task))
        owner_limiter = self._owner_limiter(task.owner)  # no owner runs past its share
        limiters = [owner_limiter, self._limiter, tool_limiter]
        if any(limiter is not None and limiter.available_tokens < 1 for limiter in limiters):
            self._lifecycle.queued(task)
        async with (
            owner_limiter or contextlib.nullcontext(),
            self._limiter,
            tool_limiter or contextlib.nullcontext(),
        ):
            if not self._lifecycle.running(task):
                raise SettledElsewhere(task.id)
            with anyio.fail_after(task.time_left_s):
                result = await handler(task.arguments, self._lifecycle.context(task))
            if not _is_json_object(result):  # a plugin's slip must fail its task, not the server
                raise TypeError(f"the tool returned {type(result).__name__}, not a JSON object")
            return result

    def _owner_limiter(self, owner: str) -> anyio.CapacityLimiter | None:
        if owner not in self._owner_limiters:
            slots = self._settings.slots_for(owner)
            self._owner_limiters[owner] = None if slots is None else anyio.CapacityLimiter(slots)
        return self._owner_limiters[owner]


def _is_json_object(value: object) -> bool:
    """What a result must be to be stored and returned."""
    if not isinstance(value, dict):
        return False
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _tool_limiters(registry: Registry, settings: Settings) -> dict[str, anyio.CapacityLimiter]:
    """One limiter per tool, or per group of tools sharing one (every github.* tool counts against GitHub's)."""
    limiters: dict[str, anyio.CapacityLimiter] = {}
    for spec in registry:
        group = spec.limit_group or spec.name
        limit = settings.tool_concurrency.get(group, settings.tool_concurrency.get(spec.name, spec.max_concurrency))
        if limit is not None and group not in limiters:
            limiters[group] = anyio.CapacityLimiter(limit)
    return limiters


def _limit_key(task: Task) -> str:
    spec = task.spec
    return spec.limit_group or spec.name if spec is not None else task.tool


def cancel_error(task: Task) -> TaskError:
    reason = task.handle.cancel_reason or ErrorKind.CANCELLED_BY_CLIENT
    who = "cancelled by cancel_task" if reason is ErrorKind.CANCELLED_BY_CLIENT else "the server shut down"
    if task.status is Status.QUEUED:
        return TaskError(kind=reason, message=f"{who} while the task was queued; it never started")
    ended = "its process group was terminated (TERM, then KILL)" if task.process is not None else "it was stopped"
    return TaskError(kind=reason, message=f"{who} while the task ran; {ended}")
