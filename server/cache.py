"""Result keys and the hot tier of finished tasks.

Finished tasks live in a cachetools `TLRUCache` in front of the store: bounded by `maxsize`
(least recently used goes first) and by each task's own `expires_at` (a per-task `ttl_s` needs
the TLRU variant of `TTLCache`). The timer is the injectable clock, so tests expire tasks by
moving it. A task that leaves the hot tier is still in the store until it expires there.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

from cachetools import TLRUCache
from pydantic import BaseModel

from server.tasks import Task

Clock = Callable[[], float]
"""Seconds since the epoch; `time.time` in production, a movable fake in tests."""


def result_key(owner: str, tool: str, arguments: BaseModel) -> str:
    """Identical calls (same owner, tool and canonical JSON arguments) share a key."""
    canonical = json.dumps(arguments.model_dump(mode="json", by_alias=True), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{owner}\x00{tool}\x00{canonical}".encode()).hexdigest()


class _TaskCache(TLRUCache[str, Task]):
    def __init__(self, maxsize: int, clock: Clock, on_drop: Callable[[Task], None]) -> None:
        super().__init__(maxsize, ttu=_expiry, timer=clock)
        self._on_drop = on_drop

    def expire(self, time: float | None = None) -> list[tuple[str, Task]]:
        expired: list[tuple[str, Task]] = list(super().expire(time))
        for _, task in expired:
            self._on_drop(task)
        return expired

    def popitem(self) -> tuple[str, Task]:
        key, task = super().popitem()
        self._on_drop(task)
        return key, task


def _expiry(_key: str, task: Task, _now: float) -> float:
    assert task.expires_at is not None, "only finished tasks enter the hot tier"
    return task.expires_at


class FinishedTasks:
    """The hot tier: finished tasks by id; `on_drop` hears of each one that leaves."""

    def __init__(self, maxsize: int, clock: Clock, on_drop: Callable[[Task], None]) -> None:
        self._cache = _TaskCache(maxsize, clock, on_drop)

    def add(self, task: Task) -> None:
        self._cache[task.id] = task

    def get(self, task_id: str) -> Task | None:
        self._cache.expire()
        return self._cache.get(task_id)

    def expire(self) -> None:
        self._cache.expire()

    def __len__(self) -> int:
        return len(self._cache)
