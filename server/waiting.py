"""Waiting for tasks to finish: on each task's change events, never a sleep loop. A task another server
process runs sends no events to its Task object here: in distributed mode the change stream pokes its
id (`poke`); on a shared SQLite data directory it is read again every second."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Literal

import anyio

from server.tasks import Task

ReturnWhen = Literal["all", "any"]
ProgressFn = Callable[[int, int], Awaitable[None]]
Until = Callable[[Task], bool]
"""When a waited-on task counts as done; `watches_output` (if set and true): output wakes the wait too."""


def finished(task: Task) -> bool:
    return task.status.finished


FOREIGN_RECHECK_S = 1.0
"""Tasks of another server process send no events here: a wait re-reads them this often."""


class Waiters:
    def __init__(self, refresh: Callable[[Task], Task]) -> None:
        self._refresh = refresh
        self._waiting = 0
        self._no_waiters = anyio.Event()
        self._no_waiters.set()
        self._by_id: dict[str, set[anyio.Event]] = {}

    def poke(self, task_id: str) -> None:
        """The task changed somewhere (another process): wake whoever waits on it."""
        for event in self._by_id.get(task_id, ()):
            event.set()

    @property
    def count(self) -> int:
        return self._waiting

    async def wait(
        self,
        tasks: Sequence[Task],
        timeout_s: float,
        return_when: ReturnWhen,
        on_progress: ProgressFn | None = None,
        heartbeat_s: float = 5.0,
        until: Until = finished,
    ) -> tuple[list[Task], bool]:
        """Returns the tasks as they are now, and whether it timed out."""
        self._waiting += 1
        self._no_waiters = anyio.Event() if self._waiting == 1 else self._no_waiters
        current = list(tasks)
        on_output = bool(getattr(until, "watches_output", False))
        try:
            with anyio.move_on_after(timeout_s):
                while not satisfied(current, return_when, until):
                    beat = FOREIGN_RECHECK_S if any(not t.local for t in current) else heartbeat_s
                    await self._next_change([t for t in current if not until(t)], beat, on_output)
                    current = [self._refresh(t) for t in current]
                    if on_progress is not None:
                        await on_progress(sum(until(t) for t in current), len(current))
                return current, False
            return current, not satisfied(current, return_when, until)
        finally:
            self._waiting -= 1
            if self._waiting == 0:
                self._no_waiters.set()

    async def none_left(self) -> None:
        """Returns once no `wait` is in progress (tests use it to see a cancelled poll end)."""
        await self._no_waiters.wait()

    async def _next_change(self, tasks: Iterable[Task], heartbeat_s: float, on_output: bool = False) -> None:
        changed = anyio.Event()
        pending = [t for t in tasks if not t.status.finished]
        for task in pending:
            task.handle.listeners.add(changed)
            if on_output:
                task.handle.output_listeners.add(changed)
            self._by_id.setdefault(task.id, set()).add(changed)
        try:
            with anyio.move_on_after(heartbeat_s):
                await changed.wait()
        finally:
            for task in pending:
                task.handle.listeners.discard(changed)
                task.handle.output_listeners.discard(changed)
                waiting = self._by_id.get(task.id)
                if waiting is not None:
                    waiting.discard(changed)
                    if not waiting:
                        del self._by_id[task.id]


def satisfied(tasks: Sequence[Task], return_when: ReturnWhen, until: Until = finished) -> bool:
    done = [until(t) for t in tasks]
    return all(done) if return_when == "all" else any(done) or not tasks
