"""Task changes as a stream: the executor publishes each change (started, finished, queued behind a
full limit); the face subscribes (MCP notifications, client log lines) without the engine knowing it.

Delivery is synchronous and must not block: a subscriber that has slow work queues it. A
subscriber's bug is logged and never breaks the task's bookkeeping.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from server.tasks import Task

log = logging.getLogger(__name__)

Subscriber = Callable[[Task], None]


class Changes:
    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Returns the call that unsubscribes."""
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber)

    def publish(self, task: Task) -> None:
        for subscriber in list(self._subscribers):
            try:
                subscriber(task)
            except Exception:
                log.exception("task change subscriber %r raised", subscriber)
