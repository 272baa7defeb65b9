"""Result reuse: an identical call of a cacheable tool joins the running task or gets its result.

Three places can hold a result key's task: the running tasks, the hot tier of finished ones (in
memory, bounded, expiring with each task), and the store (any server's finished task on this data
directory, or any front-end's in distributed mode: a running one there is joined too). Only completed
tasks are reused; a failure or cancellation frees the key at once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from server.cache import Clock, FinishedTasks
from server.tasks import Status, Task


@dataclass(frozen=True, slots=True)
class Fired:
    task: Task
    cached: bool = False
    deduplicated: bool = False


@dataclass(slots=True)
class Counters:
    fired: int = 0
    outcomes: Counter[Status] = field(default_factory=Counter)
    cache_hits: int = 0
    joined: int = 0
    cache_lookups: Counter[str] = field(default_factory=Counter)
    cache_reuses: Counter[str] = field(default_factory=Counter)


class Reuse:
    def __init__(self, finished_max: int, clock: Clock) -> None:
        self.counters = Counters()
        self.hot = FinishedTasks(finished_max, clock, on_drop=self.forget)
        self._holders: dict[str, str] = {}
        """result key → id of the task that holds it (running, or finished and hot)."""

    def find(self, key: str, active: Mapping[str, Task], stored: Callable[[str], Task | None]) -> Fired | None:
        """The running task to join, or the completed one to reuse, for this key; None: run it anew.
        `stored(key)` looks the key up in the store."""
        task_id = self._holders.get(key)
        if task_id is not None and (task := active.get(task_id)) is not None:
            self.counters.joined += 1
            self.counters.cache_reuses[task.tool] += 1
            return Fired(task, deduplicated=True)
        found = self.hot.get(task_id) if task_id is not None else None
        found = found or stored(key)
        if found is None or (found.status.finished and found.status is not Status.COMPLETED):
            return None
        self.counters.cache_reuses[found.tool] += 1
        if not found.status.finished:  # running in another process (a front-end's, or a server's on the data dir)
            self.counters.joined += 1
            return Fired(found, deduplicated=True)
        self.counters.cache_hits += 1
        return Fired(found, cached=True)

    def hold(self, task: Task) -> None:
        if task.cache_key is not None:
            self._holders[task.cache_key] = task.id

    def finished(self, task: Task) -> None:
        """Counts the outcome and keeps the task hot; only a completed task keeps its key."""
        self.counters.outcomes[task.status] += 1
        if task.status is not Status.COMPLETED:
            self.forget(task)
        self.hot.add(task)

    def forget(self, task: Task) -> None:
        if task.cache_key is not None and self._holders.get(task.cache_key) == task.id:
            del self._holders[task.cache_key]
