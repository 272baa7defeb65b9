"""Resumable streamable-HTTP streams (SEP-1699): the SDK's `EventStore`, kept in memory, per session and owner.

Every message the transport sends on an SSE stream is stored here first, with an event id, so a client
whose connection dropped (or whose long-waiting stream the server closed with a `retry` hint) reconnects
with `Last-Event-ID` and receives what it missed, a waiting `poll_output`'s reply included.

The SDK hands one store to every session and names streams by JSON-RPC request id ("1", "2", ...), which
repeat across sessions. So each stored event is filed under the caller that produced it: the owner the
bearer middleware found and the transport session (`Mcp-Session-Id`). `CallerScope` (an ASGI middleware
inside the bearer check) puts both in a context variable for the request and the session's tasks; a
replay is served only to the same owner and session that stored the events, and an event id of any other
session replays nothing.

Bounded: at most `MAX_EVENTS_PER_SESSION` events and `MAX_BYTES_PER_SESSION` bytes per session (oldest
dropped first), and `MAX_BYTES` over all sessions: past it, the owner holding the most gives way first (its
least recently written session), so one owner's traffic never evicts another owner's missed replies.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import anyio
from mcp.server.mcpserver import Context
from mcp.server.streamable_http import EventCallback, EventId, EventMessage, EventStore, StreamId
from mcp_types import JSONRPCMessage
from pydantic import TypeAdapter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.auth import OWNER_SCOPE_KEY
from server.config import LOCAL_OWNER

log = logging.getLogger(__name__)

MAX_EVENTS_PER_SESSION = 1000
MAX_BYTES_PER_SESSION = 8 * 1024 * 1024
"""A session's missed replies are kept up to this size: a few large `poll_output` replies (1 MiB at most each)."""
MAX_BYTES = 64 * 1024 * 1024
"""All sessions together; past it the owner holding the most bytes gives way first."""
SESSION_HEADER = b"mcp-session-id"

_message_json: TypeAdapter[JSONRPCMessage] = TypeAdapter(JSONRPCMessage)


@dataclass(slots=True)
class Caller:
    """Who sends or resumes a stream: filled per HTTP request; `session` is learnt from the response
    when the request opens the session (initialize), and the session's own tasks inherit this object."""

    owner: str = LOCAL_OWNER
    session: str | None = None


current_caller: ContextVar[Caller | None] = ContextVar("offload_stream_caller", default=None)
"""The caller of this request, or of the session this task serves; set by `CallerScope`."""


class CallerScope:
    """ASGI middleware (inside `BearerAuth`, around the streamable HTTP app): sets the caller for the event store."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        session = dict(scope["headers"]).get(SESSION_HEADER)
        caller = Caller(str(scope.get(OWNER_SCOPE_KEY, LOCAL_OWNER)), session.decode() if session else None)
        token = current_caller.set(caller)
        try:
            await self.app(scope, receive, send if session else _learning_session(caller, send))
        finally:
            current_caller.reset(token)


def _learning_session(caller: Caller, send: Send) -> Send:
    async def learning(message: Message) -> None:
        if message["type"] == "http.response.start" and caller.session is None:
            opened = dict(message.get("headers", [])).get(SESSION_HEADER)
            if opened:
                caller.session = opened.decode()
        await send(message)

    return learning


@dataclass(slots=True)
class _Event:
    stream_id: str
    message: JSONRPCMessage | None
    """None for a priming event: a position in the stream, nothing to replay."""
    size_bytes: int


@dataclass(slots=True)
class _SessionLog:
    events: OrderedDict[str, _Event] = field(default_factory=OrderedDict)
    size_bytes: int = 0


@dataclass(frozen=True, slots=True)
class EventCounts:
    sessions: int
    events: int
    held_bytes: int
    replays: int
    refused_replays: int


class SessionEvents(EventStore):
    """The event store; one per HTTP server. Methods never block (the awaits are the SDK's interface)."""

    def __init__(
        self,
        *,
        max_events_per_session: int = MAX_EVENTS_PER_SESSION,
        max_bytes_per_session: int = MAX_BYTES_PER_SESSION,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        self._max_events_per_session = max_events_per_session
        self._max_bytes_per_session = max_bytes_per_session
        self._max_bytes = max_bytes
        self._logs: OrderedDict[tuple[str, str | None], _SessionLog] = OrderedDict()
        """(owner, session) → its events, least recently written first."""
        self._where: dict[str, tuple[str, str | None]] = {}
        """event id → the (owner, session) that holds it."""
        self._size_bytes = 0
        self._replays = 0
        self._refused = 0

    def __repr__(self) -> str:
        c = self.counts()
        return f"<SessionEvents sessions={c.sessions} events={c.events} bytes={c.held_bytes} replays={c.replays}>"

    def counts(self) -> EventCounts:
        return EventCounts(len(self._logs), len(self._where), self._size_bytes, self._replays, self._refused)

    async def store_event(self, stream_id: StreamId, message: JSONRPCMessage | None) -> EventId:
        key = _key()
        size_bytes = 64 if message is None else 64 + len(_message_json.dump_json(message, by_alias=True))
        # Random alone: unguessable, and no counter that tells how much other sessions sent.
        event_id = secrets.token_urlsafe(12)
        held = self._logs.get(key)
        if held is None:
            held = self._logs[key] = _SessionLog()
        else:
            self._logs.move_to_end(key)
        held.events[event_id] = _Event(stream_id, message, size_bytes)
        held.size_bytes += size_bytes
        self._size_bytes += size_bytes
        self._where[event_id] = key
        while len(held.events) > self._max_events_per_session or held.size_bytes > self._max_bytes_per_session:
            self._drop_oldest(held)
        while self._size_bytes > self._max_bytes and not self._make_room(key):
            pass
        return event_id

    def _make_room(self, key: tuple[str, str | None]) -> bool:
        """Drops from the owner holding the most bytes (its least recently written session; its oldest
        events if that is the one writing now): one owner's flood never evicts another's missed replies.
        True when nothing more can go."""
        per_owner: dict[str, int] = {}
        for (owner, _), held in self._logs.items():
            per_owner[owner] = per_owner.get(owner, 0) + held.size_bytes
        heaviest = max(per_owner, key=per_owner.__getitem__)
        victim = next(k for k in self._logs if k[0] == heaviest)
        if victim != key:
            self._drop_session(victim)
            return False
        held = self._logs[key]
        if len(held.events) <= 1:
            return True
        self._drop_oldest(held)
        return False

    async def replay_events_after(self, last_event_id: EventId, send_callback: EventCallback) -> StreamId | None:
        """Sends the events of `last_event_id`'s stream stored after it; None when this caller cannot resume
        from it (an unknown or dropped event, or another session's: they look the same)."""
        key = _key()
        held = self._logs.get(key) if self._where.get(last_event_id) == key else None
        if held is None:
            self._refused += 1
            log.warning("a client asked to resume after an event this session does not hold (dropped or unknown)")
            return None
        self._replays += 1
        stream_id = held.events[last_event_id].stream_id
        sent_through = last_event_id
        # Re-read after every send: an event stored while one is sent is replayed too, not lost between
        # this replay and the live stream the SDK attaches once it returns.
        while missed := _after(held, sent_through, stream_id):
            for event_id, message in missed:
                await send_callback(EventMessage(message, event_id))
                sent_through = event_id
        return stream_id

    def _drop_oldest(self, held: _SessionLog) -> None:
        event_id, event = held.events.popitem(last=False)
        held.size_bytes -= event.size_bytes
        self._size_bytes -= event.size_bytes
        del self._where[event_id]

    def _drop_session(self, key: tuple[str, str | None]) -> None:
        held = self._logs.pop(key)
        for event_id in held.events:
            del self._where[event_id]
        self._size_bytes -= held.size_bytes


def _after(held: _SessionLog, event_id: str, stream_id: str) -> list[tuple[str, JSONRPCMessage]]:
    """The messages of `stream_id` stored after `event_id` (none if it has been dropped meanwhile)."""
    if event_id not in held.events:
        return []
    later = itertools.dropwhile(lambda item: item[0] != event_id, held.events.items())
    next(later)
    return [(i, e.message) for i, e in later if e.stream_id == stream_id and e.message is not None]


def _key() -> tuple[str, str | None]:
    caller = current_caller.get()
    return (LOCAL_OWNER, None) if caller is None else (caller.owner, caller.session)


@asynccontextmanager
async def released_after(ctx: Context, hold_s: float) -> AsyncIterator[None]:
    """Closes the current request's SSE stream each time it has waited `hold_s`, instead of holding the
    connection: the client reconnects after the priming event's `retry` with `Last-Event-ID`, and the
    reply (stored meanwhile) reaches it then. A no-op where the transport cannot resume (stdio, SSE,
    streamable HTTP before 2025-11-25), and with `hold_s` 0."""
    if hold_s <= 0 or ctx.request_context.close_sse_stream is None:
        yield
        return

    async def release() -> None:
        while True:  # a resumed stream is closed again after as long
            await anyio.sleep(hold_s)
            await ctx.close_sse_stream()

    error: BaseException | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(release)
        try:
            yield
        except BaseException as exc:
            error = exc
        finally:
            tg.cancel_scope.cancel()
    if error is not None:
        raise error
