"""ClientPool: one long-lived client per kind and credential, built on first use, closed at shutdown.

Reuse is the point: on loopback one shared httpx client served a request in ~0.7 ms against
~22 ms for a client per request (building one loads the CA bundle). githubkit keeps its
pooled client in a ContextVar only inside `async with gh:`, so calls made from tasks created
elsewhere would each open a new connection; here every GitHub client shares one transport (one
connection pool) that the per-call clients cannot close. Counted, so stats show the reuse.
"""

from __future__ import annotations

import hashlib
import importlib.util
import ipaddress
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import httpx

from tools.context import ErrorKind, TaskFailure

if TYPE_CHECKING:  # imported when first built: anthropic alone takes ~1.7 s to import
    from anthropic import AsyncAnthropic
    from githubkit import GitHub

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ClientsConfig:
    """What the operator decides about the network clients; built by the server from Settings."""

    http_max_connections: int = 100
    http_max_keepalive: int = 20
    http_timeout_s: float = 30.0
    github_token_env: str = "GITHUB_TOKEN"  # noqa: S105 - the name of a variable, not a secret
    github_base_url: str | None = None
    anthropic_key_env: str = "ANTHROPIC_API_KEY"
    anthropic_base_url: str | None = None
    anthropic_model: str = "claude-sonnet-5-5"
    anthropic_max_retries: int = 2
    http_private_networks: bool = True
    """False: `http.request` refuses hosts that resolve to loopback, private or link-local addresses."""
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)

    def secret(self, name: str) -> str | None:
        return self.environ.get(name) or None


@dataclass(slots=True)
class ClientStats:
    kind: str
    requests: int = 0
    tasks: int = 0


class _SharedTransport(httpx.AsyncBaseTransport):
    """Lends one connection pool to many short-lived clients, none of which may close it."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        """Closed by the pool at shutdown, not by whoever borrowed it."""


class ClientPool:
    def __init__(self, config: ClientsConfig) -> None:
        self.config = config
        self._clients: dict[tuple[str, str], Any] = {}
        self._stats: dict[tuple[str, str], ClientStats] = {}
        self._transports: list[httpx.AsyncBaseTransport] = []

    def __repr__(self) -> str:
        return f"<ClientPool {', '.join(f'{s.kind}: {s.requests} requests' for s in self._stats.values())}>"

    # ---- the clients ----

    def http(self) -> httpx.AsyncClient:
        client: httpx.AsyncClient = self._get(("http", ""), self._build_http)
        return client

    def github(self) -> GitHub[Any]:
        token = self.config.secret(self.config.github_token_env) or ""
        client: GitHub[Any] = self._get(("github", _fingerprint(token)), lambda: self._build_github(token))
        return client

    def anthropic(self) -> AsyncAnthropic:
        key = self.config.secret(self.config.anthropic_key_env)
        if key is None:
            env = self.config.anthropic_key_env
            raise TaskFailure(ErrorKind.AUTH, f"no Anthropic API key: {env} is not set in the server's environment")
        client: AsyncAnthropic = self._get(("anthropic", _fingerprint(key)), lambda: self._build_anthropic(key))
        return client

    def served(self, kind: str) -> None:
        """Counts a task served by a client of this kind (requests are counted by the clients' hooks)."""
        for (k, _), stats in self._stats.items():
            if k == kind:
                stats.tasks += 1

    def stats(self) -> list[dict[str, Any]]:
        return [{"kind": s.kind, "requests": s.requests, "tasks": s.tasks} for s in self._stats.values()]

    async def aclose(self) -> None:
        for key, client in list(self._clients.items()):
            close = getattr(client, "aclose", None) or getattr(client, "close", None)
            if close is None:  # a GitHub client: its connections are in the transports closed below
                continue
            try:
                await close()
            except Exception:
                log.exception("closing the %s client failed", key[0])
        for transport in self._transports:
            await transport.aclose()
        self._clients.clear()

    # ---- building ----

    def _get(self, key: tuple[str, str], build: Any) -> Any:
        if key not in self._clients:
            self._stats[key] = ClientStats(key[0])
            self._clients[key] = build()
            log.info("built the shared %s client", key[0])
        return self._clients[key]

    def _counting_hook(self, kind: str) -> Any:
        async def count(_request: httpx.Request) -> None:
            for (k, _), stats in self._stats.items():
                if k == kind:
                    stats.requests += 1

        return count

    def _limits(self) -> httpx.Limits:
        return httpx.Limits(
            max_connections=self.config.http_max_connections,
            max_keepalive_connections=self.config.http_max_keepalive,
        )

    def _build_http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            limits=self._limits(),
            timeout=self.config.http_timeout_s,
            http2=_h2_installed(),
            follow_redirects=True,
            event_hooks={
                "request": [
                    self._counting_hook("http"),
                    *([] if self.config.http_private_networks else [refuse_private_addresses]),
                ]
            },
        )

    def _build_github(self, token: str) -> GitHub[Any]:
        from githubkit import GitHub
        from githubkit.cache import MemCacheStrategy
        from githubkit.retry import RetryServerError

        transport = httpx.AsyncHTTPTransport(limits=self._limits(), http2=_h2_installed())
        self._transports.append(transport)
        return GitHub(
            token or None,
            base_url=self.config.github_base_url,
            async_transport=_SharedTransport(transport),
            async_event_hooks={"request": [self._counting_hook("github")]},
            cache_strategy=MemCacheStrategy(),  # one ETag cache per client: revalidations cost no rate limit
            http_cache=True,
            auto_retry=RetryServerError(max_retry=2),  # rate limits become task failures, not long sleeps
            timeout=self.config.http_timeout_s,
        )

    def _build_anthropic(self, key: str) -> AsyncAnthropic:
        from anthropic import AsyncAnthropic

        return AsyncAnthropic(
            api_key=key,
            base_url=self.config.anthropic_base_url,
            max_retries=self.config.anthropic_max_retries,
            timeout=self.config.http_timeout_s * 4,
        )


def _fingerprint(secret: str) -> str:
    """Keys the pool by credential without keeping the credential itself as a key."""
    return hashlib.sha256(secret.encode()).hexdigest()[:16]


class PrivateAddressError(Exception):
    """The URL's host is not a public address and the operator has `http_private_networks = false`."""


async def refuse_private_addresses(request: httpx.Request) -> None:
    """Runs for every request, redirects included. A guard-rail: a host whose DNS answer changes between
    this lookup and the connection gets through; a firewall is the real fence."""
    host = request.url.host
    try:
        infos = await anyio.getaddrinfo(host, request.url.port or 443, type=socket.SOCK_STREAM)
    except OSError:
        return  # the connection will fail with the resolver's own error
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0])
        if not address.is_global:
            raise PrivateAddressError(
                f"{host} resolves to {address}, a non-public address, and this server has http_private_networks = false"
            )


def _h2_installed() -> bool:
    return importlib.util.find_spec("h2") is not None
