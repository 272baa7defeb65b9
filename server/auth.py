"""Bearer tokens for the HTTP transports: who is calling, and so whose tasks they see.

Each configured token is an owner. With no token (a loopback-only server) every connection
is the one local owner, so a task fired on one connection is collected on another.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from cachetools import LRUCache
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.config import Settings
from server.errors import ConfigError

LOCAL_OWNER = "local"
DEFAULT_OWNER = "default"
"""The owner behind the single token of `auth_token_env`."""
MIN_TOKEN_CHARS = 16
OWNER_SCOPE_KEY = "offload.owner"
MAX_SESSIONS_KEPT = 100_000
_SSE_SESSION = re.compile(rb"event: endpoint\r?\ndata: [^\r\n]*[?&]session_id=([0-9a-fA-F-]{8,64})")
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


class BearerAuth:
    """ASGI middleware: 401 unless the request carries a known token; the owner goes into the scope."""

    def __init__(self, app: ASGIApp, credentials: Credentials) -> None:
        self.app = app
        self.credentials = credentials
        self.sessions: LRUCache[str, str] = LRUCache(MAX_SESSIONS_KEPT)
        """Transport session id → the owner that opened it, so no other owner can use it."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        header = headers.get(b"authorization")
        owner = self.credentials.owner_of(header)
        if owner is None:
            await _refuse(
                send, 401, "invalid_token", "missing bearer token" if header is None else "invalid bearer token"
            )
            return
        session = _session_of(scope, headers)
        if session is not None and self.sessions.get(session, owner) != owner:
            await _refuse(send, 404, "unknown_session", "no such session")  # what the transport says of a stranger's
            return
        scope[OWNER_SCOPE_KEY] = owner
        await self.app(scope, receive, self._noting_sessions(send, owner) if session is None else send)

    def _noting_sessions(self, send: Send, owner: str) -> Send:
        """Records the session a response opens: the `mcp-session-id` header (streamable HTTP) or the
        endpoint the first SSE event names."""

        first_body = True

        async def noting(message: Message) -> None:
            nonlocal first_body
            opened = None
            if message["type"] == "http.response.start":
                opened = dict(message.get("headers", [])).get(b"mcp-session-id")
            elif message["type"] == "http.response.body" and first_body:  # later events are task data
                first_body = False
                found = _SSE_SESSION.match(message.get("body", b""))
                opened = found.group(1) if found else None
            if opened:
                self.sessions.setdefault(opened.decode(), owner)  # never re-owned
            await send(message)

        return noting


def _session_of(scope: Scope, headers: dict[bytes, bytes]) -> str | None:
    if session := headers.get(b"mcp-session-id"):
        return session.decode()
    query = parse_qs(scope.get("query_string", b"").decode())
    return query["session_id"][0] if "session_id" in query else None


def owner_of_request(request: Any) -> str:
    """The owner the middleware found; stdio and in-memory connections are the local owner."""
    scope = getattr(request, "scope", None)
    if isinstance(scope, dict):
        return str(scope.get(OWNER_SCOPE_KEY, LOCAL_OWNER))
    return LOCAL_OWNER


async def _refuse(send: Send, status: int, error: str, reason: str) -> None:
    body = json.dumps({"error": error, "error_description": reason}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="offload", error="invalid_token"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
