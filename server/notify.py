"""Tells subscribed clients when a task changes: starts running, or finishes however it finishes.

Two protocol eras, two routes. 2026-07-28 clients open `subscriptions/listen`, served by the SDK's
`ListenHandler` over a subscription bus of the caller's owner: one bus per owner, so no client
hears of another owner's tasks (not even that `tasks://recent` changed). 2025-11-25 clients send
`resources/subscribe` and receive `notifications/resources/updated` on their connection's standalone
stream. The executor reports a change synchronously; delivery happens in `run`, so a slow client
never holds up a task. Changes waiting for delivery are coalesced per task (the news is "task X
changed": reading it shows how), so news is never dropped however far behind delivery falls.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import anyio
from mcp.server.connection import Connection
from mcp.server.context import ServerRequestContext
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler, ResourceUpdated
from mcp_types import SubscriptionsListenRequestParams, SubscriptionsListenResult

from server.auth import owner_of_request
from server.errors import TooManySubscriptionsError
from server.tasks import Status, Task, task_uri

log = logging.getLogger(__name__)

RECENT_URI = "tasks://recent"
SEND_TIMEOUT_S = 5.0
MAX_SUBSCRIPTIONS = 1000
"""Resources one connection may be subscribed to at once."""


def uris_of(task_id: str) -> list[str]:
    """What changes when a task does: its view, its output, and the recent list."""
    return [task_uri(task_id), f"{task_uri(task_id)}/output", RECENT_URI]


@dataclass(eq=False)
class _Subscriber:
    connection: Connection
    owner: str
    uris: set[str] = field(default_factory=set)


Start = Callable[[Callable[[], Coroutine[Any, Any, None]]], None]
"""Runs the delivery loop for as long as the tasks it reports on (`Runtime.start_background`)."""


class Notifier:
    def __init__(self, start: Start | None = None) -> None:
        self._start = start
        self._listeners: dict[str, tuple[InMemorySubscriptionBus, ListenHandler]] = {}
        self._subscribers: dict[Connection, _Subscriber] = {}
        self._pending: dict[str, str] = {}
        """task id → owner: tasks changed since the last delivery."""
        self._wake = anyio.Event()
        self._closed = False

    def task_changed(self, task: Task) -> None:
        if task.status is Status.QUEUED:
            return  # waiting behind a limit: nothing a subscriber reads has changed
        if not self._closed:  # shutting down: nobody is left to tell
            self._pending[task.id] = task.owner
            self._wake.set()
            start, self._start = self._start, None
            if start is not None:  # the first change starts delivery, on the event loop
                start(self.run)

    async def listen(
        self, ctx: ServerRequestContext[Any, Any], params: SubscriptionsListenRequestParams
    ) -> SubscriptionsListenResult:
        """`subscriptions/listen`: one stream, for as long as the client keeps it open."""
        owner = owner_of_request(ctx.request)
        if owner not in self._listeners:
            bus = InMemorySubscriptionBus()
            self._listeners[owner] = (bus, ListenHandler(bus))
        return await self._listeners[owner][1](ctx, params)

    def subscribe(self, connection: Connection, owner: str, uri: str) -> None:
        """Raises TooManySubscriptionsError past MAX_SUBSCRIPTIONS for one connection."""
        subscriber = self._subscribers.get(connection)
        if subscriber is None:
            subscriber = self._subscribers[connection] = _Subscriber(connection, owner)
            connection.exit_stack.callback(self._subscribers.pop, connection, None)
        if uri not in subscriber.uris and len(subscriber.uris) >= MAX_SUBSCRIPTIONS:
            raise TooManySubscriptionsError(MAX_SUBSCRIPTIONS)
        subscriber.uris.add(uri)

    def unsubscribe(self, connection: Connection, uri: str) -> None:
        subscriber = self._subscribers.get(connection)
        if subscriber is not None:
            subscriber.uris.discard(uri)

    def close(self) -> None:
        """Ends every listen stream gracefully (each sends its final result) and stops taking changes."""
        for _, handler in self._listeners.values():
            handler.close()
        self._closed = True  # `run` delivers what is pending, then returns
        self._wake.set()

    def stats(self) -> dict[str, int]:
        return {
            "subscribed_connections": len(self._subscribers),
            "subscribed_resources": sum(len(s.uris) for s in self._subscribers.values()),
            "owners_listening": len(self._listeners),
        }

    async def run(self) -> None:
        """Delivers changes until closed (or cancelled)."""
        while not (self._closed and not self._pending):
            await self._wake.wait()
            self._wake = anyio.Event()
            batch, self._pending = self._pending, {}
            for task_id, owner in batch.items():
                await self._deliver(task_id, owner)

    async def _deliver(self, task_id: str, owner: str) -> None:
        uris = uris_of(task_id)
        if owner in self._listeners:
            bus = self._listeners[owner][0]
            for uri in uris:
                await bus.publish(ResourceUpdated(uri))
        for subscriber in list(self._subscribers.values()):
            if subscriber.owner == owner:  # another owner's task does not exist for them
                for uri in subscriber.uris.intersection(uris):
                    await self._tell(subscriber.connection, uri)

    @staticmethod
    async def _tell(connection: Connection, uri: str) -> None:
        with anyio.move_on_after(SEND_TIMEOUT_S) as scope:
            await connection.send_resource_updated(uri)
        if scope.cancelled_caught:
            log.warning("a client did not take a resource update within %g s; skipped it", SEND_TIMEOUT_S)
