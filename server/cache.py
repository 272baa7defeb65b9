"""Result keys and the hot tier of finished tasks.

Finished tasks live in a cachetools `TLRUCache`: bounded by `maxsize` (least recently used
goes first) and by each task's own `expires_at` (a per-task `ttl_s` needs the TLRU variant
of `TTLCache`). The timer is the injectable clock, so tests expire tasks by moving it.
A task that leaves, by expiry or eviction, leaves a bounded tombstone behind so its id gets
"expired at …" instead of "unknown".
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from cachetools import TLRUCache
from pydantic import BaseModel

from server.tasks import Task

Clock = Callable[[], float]
"""Seconds since the epoch; `time.time` in production, a movable fake in tests."""


def result_key(owner: str, tool: str, arguments: BaseModel) -> str:
    """Identical calls (same owner, tool and canonical JSON arguments) share a key."""
    canonical = json.dumps(arguments.model_dump(mode="json", by_alias=True), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{owner}\x00{tool}\x00{canonical}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Tombstone:
    owner: str
    at: float
    reason: str
    """"expired" or "was evicted"; read as `Task X {reason} at …`."""


class _TaskCache(TLRUCache[str, Task]):
    def __init__(self, maxsize: int, clock: Clock, on_drop: Callable[[Task, str], None]) -> None:
        super().__init__(maxsize, ttu=_expiry, timer=clock)
        self._on_drop = on_drop

    def expire(self, time: Any = None) -> list[tuple[str, Task]]:
        expired: list[tuple[str, Task]] = list(super().expire(time))
        for _, task in expired:
            self._on_drop(task, "expired")
        return expired

    def popitem(self) -> tuple[str, Task]:
        key, task = super().popitem()
        self._on_drop(task, "was evicted (the server keeps a bounded number of finished tasks)")
        return key, task


def _expiry(_key: str, task: Task, _now: float) -> float:
    assert task.expires_at is not None, "only finished tasks enter the hot tier"
    return task.expires_at


class FinishedTasks:
    """The hot tier: finished tasks by id, with tombstones for those that left."""

    def __init__(self, maxsize: int, clock: Clock, tombstones_max: int, on_drop: Callable[[Task], None]) -> None:
        self._clock = clock
        self._cache = _TaskCache(maxsize, clock, self._dropped)
        self._tombstones: OrderedDict[str, Tombstone] = OrderedDict()
        self._tombstones_max = tombstones_max
        self._on_drop = on_drop

    def add(self, task: Task) -> None:
        self._cache[task.id] = task

    def get(self, task_id: str) -> Task | None:
        self._cache.expire()
        return self._cache.get(task_id)

    def expire(self) -> None:
        self._cache.expire()

    def tombstone(self, task_id: str) -> Tombstone | None:
        self._cache.expire()
        return self._tombstones.get(task_id)

    def __iter__(self) -> Iterator[Task]:
        self._cache.expire()
        return iter(list(self._cache.values()))

    def __len__(self) -> int:
        return len(self._cache)

    def _dropped(self, task: Task, reason: str) -> None:
        at = task.expires_at if reason == "expired" and task.expires_at is not None else self._clock()
        self._tombstones[task.id] = Tombstone(task.owner, at, reason)
        while len(self._tombstones) > self._tombstones_max:
            self._tombstones.popitem(last=False)
        self._on_drop(task)
