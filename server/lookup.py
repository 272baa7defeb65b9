"""Reading a task by id, through the running tasks, the hot tier and the store, with the owner rules:
another owner's task reads exactly like an unknown id, an expired one names when it expired."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from server.cache import Clock, FinishedTasks
from server.errors import ExpiredTaskError, UnknownTaskError
from server.store import TaskStore
from server.tasks import Task, iso
from tools.registry import Registry

log = logging.getLogger(__name__)


class Lookup:
    def __init__(
        self, store: TaskStore, registry: Registry, clock: Clock, active: Mapping[str, Task], hot: FinishedTasks
    ) -> None:
        self._store = store
        self._registry = registry
        self._clock = clock
        self._active = active
        self._hot = hot

    def get(self, owner: str, task_id: str) -> Task:
        self._store.ensure_present()  # a task held here reads nothing once its data directory is gone
        task = self._active.get(task_id) or self._hot.get(task_id)
        if task is None:
            stored = self._store.load(task_id, self._registry.get)
            if stored is not None and stored.owner == owner:
                if self._expired(stored):
                    raise ExpiredTaskError(task_id, iso(stored.expires_at) or "")
                task = self._keep(stored)
        if task is not None and task.owner == owner:
            return task
        tomb = self._store.tombstone(task_id)
        if tomb is not None and tomb.owner == owner:
            raise ExpiredTaskError(task_id, iso(tomb.at) or "")
        raise UnknownTaskError(task_id)

    def load(self, task_id: str) -> Task | None:
        """An unexpired task as the store has it now (another server may be running it)."""
        stored = self._store.load(task_id, self._registry.get)
        return None if stored is None or self._expired(stored) else self._keep(stored)

    def take_stored_outcome(self, task: Task) -> None:
        """Another process settled the task first (it took this one for dead): its outcome stands, here too."""
        stored = self._store.load(task.id, self._registry.get)
        if stored is None or not stored.status.finished:
            return
        log.warning(
            "task %s ended here as %s, but another server had already settled it as %s; that outcome stands",
            task.id,
            task.status.value,
            stored.status.value,
        )
        task.status, task.error, task.result = stored.status, stored.error, stored.result
        task.finished_at = stored.finished_at

    def reusable(self, cache_key: str) -> Task | None:
        task_id = self._store.reusable(cache_key, self._clock())
        return None if task_id is None else self.load(task_id)

    def refresh(self, task: Task) -> Task:
        """Another server's unfinished task sends no events here: read it again."""
        if task.local or task.status.finished:
            return task
        return self.load(task.id) or task

    def _expired(self, task: Task) -> bool:
        return task.expires_at is not None and task.expires_at <= self._clock()

    def _keep(self, task: Task | None) -> Task | None:
        if task is not None and task.status.finished:
            self._hot.add(task)  # finished tasks never change: keep them hot
        return task
