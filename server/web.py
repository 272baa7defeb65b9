"""The HTTP transports: SSE (`/sse`) and streamable HTTP (`/mcp`), behind bearer auth.

The Runtime is opened before the web server and closed after it, never per connection: the
SDK runs a server session (and the MCP lifespan) per SSE connection, and a client that
disconnects must not take its running tasks along.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
from collections.abc import Iterator
from typing import Literal

import anyio
import uvicorn
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import ASGIApp

from server import __version__
from server.app import OffloadServer, build_server
from server.auth import BearerAuth, Credentials, Limits, check_bind, check_isolation, is_loopback
from server.config import LOCAL_OWNER, Settings
from server.events import CallerScope, SessionEvents
from server.limits import uvicorn_options
from server.runtime import Runtime
from server.sdk_compat import sessions_held
from server.signals import stop_on_signal
from server.worker import worker_beside

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 1
"""Open SSE streams never end on their own: at shutdown they get this long, then are closed."""
PATHS = {"sse": "/sse", "http": "/mcp"}


def security(settings: Settings) -> TransportSecuritySettings:
    """Host/Origin checks (DNS-rebinding protection): on for loopback binds, and wherever hosts are listed."""
    if settings.allowed_hosts:
        return TransportSecuritySettings(
            allowed_hosts=list(settings.allowed_hosts), allowed_origins=list(settings.allowed_origins)
        )
    if is_loopback(settings.host):
        return TransportSecuritySettings(
            allowed_hosts=["127.0.0.1:*", "localhost:*", "[::1]:*"],
            allowed_origins=["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*", *settings.allowed_origins],
        )
    log.warning(
        "Host/Origin checks are off: %s is not a loopback address and no allowed_hosts are configured",
        settings.host,
    )
    return TransportSecuritySettings(enable_dns_rebinding_protection=False)


def web_app(
    server: OffloadServer, settings: Settings, credentials: Credentials, events: SessionEvents | None = None
) -> ASGIApp:
    """Streamable HTTP streams are resumable: `events` (a fresh store unless given) keeps what each session
    was sent, so a client reconnecting with Last-Event-ID gets what it missed."""
    transport: Literal["sse", "http"] = "sse" if settings.transport == "sse" else "http"
    if transport == "sse":
        app: ASGIApp = server.sse_app(
            max_request_body_size=settings.max_request_body_bytes,
            transport_security=security(settings),
            host=settings.host,
        )
    else:
        app = CallerScope(
            server.streamable_http_app(
                max_request_body_size=settings.max_request_body_bytes,
                transport_security=security(settings),
                host=settings.host,
                event_store=SessionEvents() if events is None else events,
                retry_interval=settings.stream_retry_ms,
            )
        )
    limits = Limits(settings.max_sessions_per_owner, settings.max_streams_per_owner, settings.http_body_timeout_s)
    held = functools.partial(sessions_held, server.session_manager) if transport == "http" else None
    return BearerAuth(app, credentials, limits, held)  # issue 12: per-owner caps, body timeout


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class _Uvicorn(uvicorn.Server):
    """Signals are ours: uvicorn's handlers re-raise the signal when it stops, which would kill the
    process before the Runtime has stopped the tasks and flushed the store."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve_http(settings: Settings, credentials: Credentials, worker_queues: list[str] | None = None) -> None:
    """Serves until SIGTERM/SIGINT; then stops taking requests, cancels every task and kills their groups."""
    check_bind(settings.host, credentials, settings.auth_token_env)
    check_isolation(settings, credentials)  # issue 12: several owners need confined shells
    if settings.http_private_networks and not is_loopback(settings.host):
        log.warning("http.request may reach this host's private networks; set http_private_networks = false to refuse")
    shell = settings.shell_config()
    owners = [owner for owner, _ in credentials.tokens] or [LOCAL_OWNER]
    unrooted = [owner for owner in owners if not shell.for_owner(owner).policy.roots]
    if unrooted:
        log.warning(
            "no shell_roots for %s: their shell commands may run in any directory this user can reach",
            ", ".join(map(repr, unrooted)),
        )
    sock = bind(settings.host, settings.port)
    async with Runtime.open(settings) as runtime, worker_beside(settings, worker_queues):
        server = build_server(runtime)
        config = uvicorn.Config(
            web_app(server, settings, credentials),
            log_config=None,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
            **uvicorn_options(settings.http_header_timeout_s, settings.max_connections),  # issue 12
        )
        web = _Uvicorn(config)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        log.info(
            "offload-mcp %s serving MCP (%s) on http://%s:%d%s%s",
            __version__,
            settings.transport,
            shown,
            port,
            PATHS[settings.transport],
            " with bearer auth" if credentials else "",
        )

        def stop() -> None:
            web.should_exit = True

        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_on_signal, stop)
            await web.serve(sockets=[sock])
            tg.cancel_scope.cancel()
        log.info("web server stopped; shutting down the tasks")
