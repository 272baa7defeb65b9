"""Limits of the HTTP server below the ASGI app: a connection cap and a header read timeout.

uvicorn keeps a connection that never finishes its request headers open for ever, and accepts as many
connections as there are descriptors: 1,100 half-sent requests made a server with a 1,024-descriptor
limit unreachable (issue 12). Here a connection whose headers do not arrive within `header_timeout_s` is
closed, and a connection past `max_connections` displaces the oldest one still waiting for its headers;
only when every connection is being served is the newcomer answered 503 and closed. So connections that
never finish a request (no token needed to open them) cannot lock real clients out: a client that sends
its request at once is served. (Bodies that stop arriving are the middleware's: `server.auth`.)
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

MACOS_OPEN_MAX = 10240
DESCRIPTORS_KEPT_FREE = 64
"""For the store, output files and the commands' pipes, whatever the connections do."""
_BUSY_BODY = (
    b'{"error": "too_many_connections", "error_description": "the server is at its connection cap '
    b'(max_connections); try again shortly"}'
)
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: " + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY
)


def raise_descriptor_limit() -> None:
    """Raises this process's soft RLIMIT_NOFILE to its hard limit, so connections, output files and the
    commands' pipes have every descriptor the system allows (the soft default of 1,024 let 1,100
    half-open connections lock everyone out, issue 22). Commands inherit the raised limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    targets = [hard] if hard != resource.RLIM_INFINITY else []
    targets.append(MACOS_OPEN_MAX)  # macOS refuses more than OPEN_MAX for an unlimited hard limit
    for target in targets:
        if soft != resource.RLIM_INFINITY and target <= soft:
            return
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            continue
        log.info("descriptor limit (RLIMIT_NOFILE) raised from %d to %d, the hard limit", soft, target)
        return
    log.warning("descriptor limit (RLIMIT_NOFILE) stays at %d: raising it to %d was refused", soft, hard)


def connection_cap(asked: int) -> int:
    """`asked`, lowered to leave descriptors free under this process's RLIMIT_NOFILE."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return asked
    room = max(soft - DESCRIPTORS_KEPT_FREE, 1) // 2  # a connection may hold a command's pipe too
    if asked > room:
        log.warning("max_connections = %d lowered to %d: the descriptor limit is %d", asked, room, soft)
        return room
    return asked


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a connection cap and a header read timeout."""

    class GuardedH11(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _opened_at: float = 0.0

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._opened_at = time.monotonic()
            live = [c for c in self.connections if isinstance(c, GuardedH11) and not c.transport.is_closing()]
            if len(live) > max_connections and not self._displace_a_waiting_one(live):
                transport.write(_BUSY)
                transport.close()
                return
            self._arm()

        def _displace_a_waiting_one(self, live: list[GuardedH11]) -> bool:
            """Closes the oldest connection still waiting for its request headers; False if none is. Only
            open ones count: in a burst of accepts, connections closed a moment ago are still in the set
            (their `connection_lost` comes on a later turn of the loop), and closing one of them again
            would shed nothing (issue 22: 320 half-open sockets grew past a 96-connection cap)."""
            waiting = [c for c in live if c is not self and c._header_timer is not None]
            if not waiting:
                return False
            oldest = min(waiting, key=lambda c: c._opened_at)
            oldest._disarm()
            oldest.transport.close()
            return True

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            """A timer runs while the request line and headers are incomplete, from the first byte awaited."""
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                if self._header_timer is None:
                    self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)
            else:
                self._disarm()

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11


def uvicorn_options(header_timeout_s: float, max_connections: int) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.Config`."""
    cap = connection_cap(max_connections)
    return {"http": guarded_protocol(header_timeout_s, cap), "limit_concurrency": cap + 1}
