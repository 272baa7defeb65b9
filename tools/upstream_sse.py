"""The older SSE transport: one event stream carries every answer of the session, and the SDK reads at most
`SDK_EVENT_BYTES` an event, ending the whole session past it (every call in flight fails). This HTTP
transport filters that stream as it arrives: a `data:` line over the cap is dropped (only its ends are
kept, `tools/upstream_lines.py`) and an error answering the request it was for takes its place, so only
that call fails. The requests in flight are read from the session's POSTs (small JSON bodies)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable

import httpx2
import mcp_types as types

from tools.upstream_lines import MESSAGE_TOO_LARGE, LineSplitter, Oversized, answered_id, too_large

log = logging.getLogger(__name__)

SDK_EVENT_BYTES = 1024 * 1024
"""What the SDK's `sse_client` reads of one event (httpx2's default; `sse_client` does not let it be set)."""
ADVICE = (
    "Ask the tool for less (a smaller range, a page, a filter): the older SSE transport takes about 1 MiB a message"
)


class CappedSseTransport(httpx2.AsyncBaseTransport):
    def __init__(self, server: str, max_bytes: int) -> None:
        self.server = server
        self.max_bytes = min(max_bytes, SDK_EVENT_BYTES - 4096)  # under the SDK's cap, with room for the framing
        self.pending: set[types.RequestId] = set()
        self._inner = httpx2.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        if request.method == "POST":
            self._sent(request.content)
        response = await self._inner.handle_async_request(request)
        if request.method != "GET" or not response.headers.get("content-type", "").startswith("text/event-stream"):
            return response
        stream = response.stream
        assert isinstance(stream, httpx2.AsyncByteStream)
        filtered = _Filtered(stream, self)
        return httpx2.Response(
            response.status_code, headers=response.headers, stream=filtered, extensions=response.extensions
        )

    async def aclose(self) -> None:
        await self._inner.aclose()

    def _sent(self, body: bytes) -> None:
        try:
            message = json.loads(body)
        except ValueError:
            return
        if not isinstance(message, dict):
            return
        if "method" in message and isinstance(message.get("id"), int | str):
            self.pending.add(message["id"])
        elif message.get("method") == "notifications/cancelled":  # no answer is owed any more
            self.pending.discard((message.get("params") or {}).get("requestId", ""))

    def replace(self, line: bytes | Oversized) -> bytes:
        """One line of the stream as it goes on to the SDK."""
        if not isinstance(line, Oversized):
            if line.startswith(b"data:"):  # an answer: no longer pending (its id read from its ends, cheaply)
                self.pending.discard(answered_id(_data(Oversized.of(line)), self.pending, alone=False) or "")
            return line + b"\n"
        request_id = answered_id(_data(line), self.pending) if line.head.startswith(b"data:") else None
        if request_id is None:
            log.warning(
                "MCP server %r: dropped a %d-byte SSE line answering none of our requests", self.server, line.size_bytes
            )
            return b""
        self.pending.discard(request_id)
        message = too_large(self.server, line.size_bytes, self.max_bytes, ADVICE)
        log.warning("MCP server %r: request %r: %s", self.server, request_id, message)
        error = types.JSONRPCError(
            jsonrpc="2.0", id=request_id, error=types.ErrorData(code=MESSAGE_TOO_LARGE, message=message)
        )
        return b"data: " + error.model_dump_json(by_alias=True).encode() + b"\n"


def _data(line: Oversized) -> Oversized:
    """An SSE `data:` line's ends as the JSON message's ends."""
    head = line.head.removeprefix(b"data:").removeprefix(b" ")
    return Oversized(line.size_bytes, head, bytearray(line.tail.removesuffix(b"\r")))


class _Filtered(httpx2.AsyncByteStream):
    def __init__(self, inner: httpx2.AsyncByteStream, transport: CappedSseTransport) -> None:
        self._inner = inner
        self._transport = transport

    async def __aiter__(self) -> AsyncIterator[bytes]:
        lines = LineSplitter(self._transport.max_bytes)
        async for chunk in self._inner:
            out = b"".join(self._transport.replace(line) for line in lines.feed(chunk))
            if out:
                yield out

    async def aclose(self) -> None:
        await self._inner.aclose()


def capped_client_factory(server: str, max_bytes: int) -> Callable[..., httpx2.AsyncClient]:
    """An `httpx_client_factory` for `sse_client` whose clients filter the event stream."""

    def factory(
        headers: dict[str, str] | None = None,
        timeout: httpx2.Timeout | None = None,
        auth: httpx2.Auth | None = None,
    ) -> httpx2.AsyncClient:
        return httpx2.AsyncClient(
            headers=headers, timeout=timeout, auth=auth, transport=CappedSseTransport(server, max_bytes)
        )

    return factory
