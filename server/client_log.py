"""Log messages for MCP clients (`notifications/message`): what an operator's or an assistant's client
would show about the caller's own tasks, never anyone else's.

- info: a task finished (completed, failed, cancelled);
- warning: a task is queued behind a full concurrency limit, or `fire_tool` was refused at the owner's limit;
- error: a task lost the server or upstream it depended on (`interrupted`, `connection`, `upstream_*`).

A connection opts in with `logging/setLevel` (2025-11-25 and earlier; the 2026-07-28 revision drops
connection-wide logging, SEP-2577, so those connections get none) and receives its owner's messages at
that level and above, on its standalone stream. Each connection is rate-limited (a token bucket; what is
dropped is counted in the next message delivered). Texts pass through the server's redactor, and these
messages never touch stdout other than as protocol messages on the stdio transport.

The engine reports task changes synchronously; delivery happens in `run`, so a slow client never holds
up a task.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, get_args

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp.server.connection import Connection, allowed_log_levels
from mcp_types import LoggingLevel

from server.redact import Redactor
from server.tasks import Status, Task

log = logging.getLogger(__name__)

LEVELS: tuple[LoggingLevel, ...] = get_args(LoggingLevel)
"""Ascending severity (RFC 5424), as the protocol orders them."""
LOGGER = "offload"
RATE_PER_S = 5.0
BURST = 20
"""A connection gets a burst of this many messages, then `RATE_PER_S` a second."""
MAX_PENDING = 10_000
SEND_TIMEOUT_S = 5.0
MAX_TEXT_CHARS = 500
LOST_KINDS = frozenset({"interrupted", "connection", "upstream_exited", "upstream_error"})
"""Failure kinds that mean a worker or an upstream went away, not that the work itself failed."""


@dataclass(frozen=True, slots=True)
class ClientLogEvent:
    owner: str
    level: LoggingLevel
    text: str
    task_id: str | None = None
    tool: str | None = None
    status: str | None = None


def task_event(task: Task) -> ClientLogEvent | None:
    """What a task's change is worth telling its owner; None for news a client would not show (it runs)."""

    def event(level: LoggingLevel, text: str) -> ClientLogEvent:
        return ClientLogEvent(task.owner, level, text, task.id, task.tool, task.status.value)

    name = f"task {task.id} ({task.tool})"
    if task.status is Status.QUEUED:
        return event(
            "warning",
            f"{name} is queued: the concurrency limit (max_concurrency or tool_concurrency) is full; it starts "
            "when a running task finishes",
        )
    if not task.status.finished:
        return None
    if task.error is None:
        return event("info", f"{name} {task.status.value}")
    reason = f"{task.error.kind}: {task.error.message}"
    if task.error.kind in LOST_KINDS:
        return event("error", f"{name} {task.status.value}, its worker or upstream was lost: {reason}")
    return event("info", f"{name} {task.status.value}: {reason}")


def limit_event(owner: str, limit: int) -> ClientLogEvent:
    return ClientLogEvent(
        owner,
        "warning",
        f"fire_tool refused: {limit} tasks are queued or running, the most one owner may have (max_active_per_owner)",
    )


@dataclass(eq=False, slots=True)
class _Listener:
    connection: Connection
    owner: str
    level: LoggingLevel
    tokens: float
    refilled_at: float
    dropped: int = 0

    def wants(self, level: LoggingLevel) -> bool:
        return LEVELS.index(level) >= LEVELS.index(self.level)

    def take(self, now: float) -> bool:
        """One message's worth of the token bucket; False (and counted) when empty."""
        self.tokens = min(BURST, self.tokens + (now - self.refilled_at) * RATE_PER_S)
        self.refilled_at = now
        if self.tokens < 1:
            self.dropped += 1
            return False
        self.tokens -= 1
        return True


Start = Callable[[Callable[[], Coroutine[Any, Any, None]]], None]
"""Runs a delivery loop in the background for as long as the server lives (`Runtime.start_background`)."""


class ClientLog:
    def __init__(self, redactor: Redactor, start: Start, clock: Callable[[], float] = time.monotonic) -> None:
        self._redactor = redactor
        self._start = start
        self._clock = clock
        self._listeners: dict[Connection, _Listener] = {}
        self._send: MemoryObjectSendStream[ClientLogEvent] | None = None
        self._receive: MemoryObjectReceiveStream[ClientLogEvent] | None = None

    def __repr__(self) -> str:
        return f"<ClientLog listeners={len(self._listeners)}>"

    def set_level(self, connection: Connection, owner: str, level: LoggingLevel) -> None:
        """`logging/setLevel`: this connection hears its owner's messages at `level` and above. Ignored where
        the protocol has no connection-wide logging (2026-07-28 connections)."""
        if level not in allowed_log_levels(connection.protocol_version, None):
            return
        if self._send is None:  # the first listener starts delivery (from a request, so on the server's loop)
            self._send, self._receive = anyio.create_memory_object_stream[ClientLogEvent](MAX_PENDING)
            self._start(self.run)
        listener = self._listeners.get(connection)
        if listener is None:
            self._listeners[connection] = _Listener(connection, owner, level, BURST, self._clock())
            connection.exit_stack.callback(self._listeners.pop, connection, None)
        else:
            listener.level = level

    def task_changed(self, task: Task) -> None:
        """An executor watcher: synchronous, never raises."""
        event = task_event(task)
        if event is not None:
            self.emit(event)

    def emit(self, event: ClientLogEvent) -> None:
        if self._send is None or not any(listener.owner == event.owner for listener in self._listeners.values()):
            return  # nobody of this owner listens: not even queued
        try:
            self._send.send_nowait(event)
        except anyio.ClosedResourceError:
            pass  # shutting down
        except anyio.WouldBlock:
            log.warning("client log messages are %d behind; dropped one", MAX_PENDING)

    async def run(self) -> None:
        """Delivers messages until cancelled (when the Runtime closes)."""
        assert self._send is not None
        assert self._receive is not None
        async with self._send, self._receive:
            async for event in self._receive:
                for listener in list(self._listeners.values()):
                    if listener.owner == event.owner and listener.wants(event.level) and listener.take(self._clock()):
                        await self._deliver(listener, event)

    async def _deliver(self, listener: _Listener, event: ClientLogEvent) -> None:
        data: dict[str, Any] = {"message": self._redactor.text(event.text)[:MAX_TEXT_CHARS]}
        for name in ("task_id", "tool", "status"):
            if (value := getattr(event, name)) is not None:
                data[name] = value
        if listener.dropped:
            data["dropped_before"] = listener.dropped  # the rate limit's casualties, so the gap is visible
            listener.dropped = 0
        params = {"level": event.level, "logger": LOGGER, "data": data}
        with anyio.move_on_after(SEND_TIMEOUT_S) as scope:
            await listener.connection.notify("notifications/message", params)
        if scope.cancelled_caught:
            log.warning("a client did not take a log message within %g s; skipped it", SEND_TIMEOUT_S)
