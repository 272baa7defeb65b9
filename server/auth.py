"""Bearer tokens for the HTTP transports: who is calling, and so whose tasks they see.

Each configured token is an owner. With no token (a loopback-only server) every connection
is the one local owner, so a task fired on one connection is collected on another.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import anyio
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from starlette.authentication import AuthCredentials
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.config import LOCAL_OWNER, Settings
from server.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_OWNER = "default"
"""The owner behind the single token of `auth_token_env`."""
MIN_TOKEN_CHARS = 16
OWNER_SCOPE_KEY = "offload.owner"
"""Where the middleware leaves the caller's owner in the ASGI scope, for the tools to read."""


@dataclass(frozen=True, slots=True)
class Credentials:
    tokens: tuple[tuple[str, bytes], ...] = ()
    """(owner, token) pairs."""

    @classmethod
    def load(cls, settings: Settings, environ: Mapping[str, str]) -> Credentials:
        """Tokens from the variables the settings name; a named but empty or short variable is a
        ConfigError (a typo must not silently turn authentication off)."""
        named = settings.owner_tokens()
        if settings.auth_token_env in environ or not named:
            named.setdefault(DEFAULT_OWNER, settings.auth_token_env)
        tokens = []
        for owner, variable in named.items():
            value = environ.get(variable, "")
            if not value and owner == DEFAULT_OWNER and not settings.owner_tokens():
                continue  # no token at all: the loopback-only case, checked by `check_bind`
            if len(value) < MIN_TOKEN_CHARS:
                raise ConfigError(
                    f"the token of owner {owner!r} (environment variable {variable}) is "
                    f"{'missing' if not value else 'too short'}: set it to a random string of at least "
                    f"{MIN_TOKEN_CHARS} characters, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
                )
            tokens.append((owner, value.encode()))
        if len({token for _, token in tokens}) < len(tokens):
            raise ConfigError("two owners have the same bearer token: give each owner its own, or they are one owner")
        return cls(tuple(tokens))

    def __bool__(self) -> bool:
        return bool(self.tokens)

    def owner_of(self, authorization: bytes | None) -> str | None:
        """The owner whose token `Authorization: Bearer …` carries, compared in constant time."""
        if not self.tokens:
            return LOCAL_OWNER
        scheme, _, presented = (authorization or b"").partition(b" ")
        if scheme.lower() != b"bearer":
            presented = b""
        found = None
        for owner, token in self.tokens:  # every token compared: timing says nothing about which matched
            if hmac.compare_digest(presented.strip(), token):
                found = owner
        return found


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, credentials: Credentials, token_env: str) -> None:
    if not credentials and not is_loopback(host):
        raise ConfigError(
            f"refusing to listen on {host!r} without a bearer token: anyone who can reach it could run commands. "
            f"Set {token_env} (or --auth-token-env NAME, or [auth_tokens] in the config file), "
            "or bind 127.0.0.1"
        )


def check_isolation(settings: Settings, credentials: Credentials) -> None:
    """Several owners on one server: each one's shell must be confined, or one reads the others' tokens
    and tasks through it (the server's environment, the data directory). Refuses to start otherwise."""
    owners = [owner for owner, _ in credentials.tokens]
    if len(owners) < 2:
        return
    shell = settings.shell_config()
    open_shells = [owner for owner in owners if not shell.for_owner(owner).confined]
    if open_shells:
        first = open_shells[0]
        raise ConfigError(
            f"refusing to serve {len(owners)} owners while the shell of {', '.join(map(repr, open_shells))} is "
            "unconfined: through it one owner could read the server's environment (every token) and the data "
            "directory (every task). Set shell_sandbox = 'bwrap' (or [owners." + first + "] sandbox = 'bwrap'), "
            "or shell_mode = 'allow-list', or [owners." + first + "] shell_mode = 'disabled'"
        )


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-owner caps and read timeouts of the HTTP transports (see Settings for each)."""

    sessions_per_owner: int = 64
    streams_per_owner: int = 16
    body_timeout_s: float = 30.0


class BearerAuth:
    """ASGI middleware: 401 unless the request carries a known token; 400 for a duplicated credential or
    session id (the parts of a stack must not each read a different one).

    The owner goes into the scope twice: under OWNER_SCOPE_KEY for our tools, and as the authenticated
    user the SDK's transports compare with the one that opened a session, so another owner's session id,
    however spelt, is "not found" (both transports; the SDK normalises SSE ids before it compares).
    """

    def __init__(
        self,
        app: ASGIApp,
        credentials: Credentials,
        limits: Limits | None = None,
        open_sessions: Callable[[str], int] | None = None,
    ) -> None:
        self.app = app
        self.credentials = credentials
        self.limits = limits or Limits()
        self.open_sessions = open_sessions
        """Streamable HTTP sessions an owner holds open (from the SDK's session manager)."""
        self.streams: Counter[str] = Counter()
        """Open GET streams (SSE connections, streamable HTTP standalone streams) per owner."""
        self.opening: Counter[str] = Counter()
        """Requests per owner that may open a session, not answered yet."""
        _quiet_session_ids()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name in (b"authorization", b"mcp-session-id"):
            count = sum(1 for key, _ in scope["headers"] if key == name)
            if count > 1:
                await _refuse(send, 400, "invalid_request", f"{count} {name.decode()} headers; send exactly one")
                return
        query = parse_qs(scope.get("query_string", b"").decode(errors="replace"), keep_blank_values=True)
        if len(query.get("session_id", [])) > 1:
            await _refuse(send, 400, "invalid_request", "several session_id parameters; send exactly one")
            return
        headers = dict(scope["headers"])
        header = headers.get(b"authorization")
        owner = self.credentials.owner_of(header)
        if owner is None:
            await _refuse(
                send, 401, "invalid_token", "missing bearer token" if header is None else "invalid bearer token"
            )
            return
        scope[OWNER_SCOPE_KEY] = owner
        scope["user"] = AuthenticatedUser(AccessToken(token=f"offload-owner:{owner}", client_id=owner, scopes=[]))
        scope["auth"] = AuthCredentials([])
        deadline = _BodyDeadline(receive, send, self.limits.body_timeout_s)
        receive, send = deadline.receive, deadline.send
        if scope["method"] == "GET":
            await self._stream(owner, scope, receive, send)
        elif scope["method"] == "POST" and b"mcp-session-id" not in headers and not _sse_message(scope, query):
            await self._opening(owner, scope, receive, send)
        else:
            await self.app(scope, receive, send)
        await deadline.answer()

    async def _stream(self, owner: str, scope: Scope, receive: Receive, send: Send) -> None:
        if self.streams[owner] >= self.limits.streams_per_owner:
            await _refuse(
                send,
                429,
                "too_many_streams",
                f"this owner has {self.streams[owner]} streams open (max_streams_per_owner = "
                f"{self.limits.streams_per_owner}); close one before opening another",
            )
            return
        self.streams[owner] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.streams[owner] -= 1

    async def _opening(self, owner: str, scope: Scope, receive: Receive, send: Send) -> None:
        """A POST without a session id may open a streamable HTTP session: at most sessions_per_owner each."""
        held = (self.open_sessions(owner) if self.open_sessions else 0) + self.opening[owner]
        if self.open_sessions is not None and held >= self.limits.sessions_per_owner:
            await _refuse(
                send,
                429,
                "too_many_sessions",
                f"this owner has {held} sessions open (max_sessions_per_owner = {self.limits.sessions_per_owner}); "
                "end one with DELETE (the client's close does so) or reuse an open session",
            )
            return
        self.opening[owner] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.opening[owner] -= 1


class _BodyDeadline:
    """A body that stops arriving for `timeout_s` reads as a client disconnect to the app, so no handler waits
    on it for ever, and the client gets 408 with `connection: close` in place of whatever the app answers.
    Once the body is complete, `receive` waits as long as the response lasts (SSE streams)."""

    def __init__(self, receive: Receive, send: Send, timeout_s: float) -> None:
        self._receive, self._send, self.timeout_s = receive, send, timeout_s
        self.complete = False
        self.timed_out = False
        self.answered = False

    async def receive(self) -> Message:
        if self.complete:
            return await self._receive()
        with anyio.move_on_after(self.timeout_s):
            message = await self._receive()
            self.complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message
        self.complete = self.timed_out = True
        log.info("a request body stopped arriving for %g s; answering 408 and closing", self.timeout_s)
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if not self.timed_out:
            await self._send(message)
        elif not self.answered:
            await self.answer()

    async def answer(self) -> None:
        """The 408, once (also when the app ends without answering at all)."""
        if self.timed_out and not self.answered:
            self.answered = True
            said = f"the request body stopped arriving for {self.timeout_s:g} s (http_body_timeout_s); send it whole"
            await _refuse(self._send, 408, "request_timeout", said)


_SESSION_ID = re.compile(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}")
"""A session id as the SDK's transports write it (uuid4 hex, or hyphenated); no word boundaries, so an id
run together with other characters (`0x…`, `…_x`) is masked too."""
SDK_SESSION_LOGGERS = ("mcp.server.streamable_http_manager", "mcp.server.streamable_http", "mcp.server.sse")


class SessionIdFilter(logging.Filter):
    """Session ids are bearer-like (whoever holds one of your sessions may try it): above DEBUG, the SDK's
    log lines show them as `[session]`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG:
            message = record.getMessage()
            masked = _SESSION_ID.sub("[session]", message)
            if masked != message:
                record.msg, record.args = masked, None
        return True


def _sse_message(scope: Scope, query: dict[str, list[str]]) -> bool:
    """A message posted into an open SSE session (`/messages/?session_id=…`); any other POST without a
    session header opens a streamable HTTP session, however its query string reads."""
    return "session_id" in query and not str(scope.get("path", "")).rstrip("/").endswith("/mcp")


def _quiet_session_ids() -> None:
    for name in SDK_SESSION_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, SessionIdFilter) for f in logger.filters):
            logger.addFilter(SessionIdFilter())


def owner_of_request(request: Any) -> str:
    """The owner the middleware found; stdio and in-memory connections are the local owner."""
    scope = getattr(request, "scope", None)
    if isinstance(scope, dict):
        return str(scope.get(OWNER_SCOPE_KEY, LOCAL_OWNER))
    return LOCAL_OWNER


async def _refuse(send: Send, status: int, error: str, reason: str) -> None:
    body = json.dumps({"error": error, "error_description": reason}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 408:
        headers.append((b"connection", b"close"))
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="offload", error="invalid_token"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
