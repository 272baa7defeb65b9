"""One upstream message too big to take: skipped without ending the session, and the call it answers failed.

A stdio upstream writes one JSON-RPC message a line. A line over the cap (`max_message_bytes`) is not kept:
only its size, its first and its last `KEEP_BYTES`, from which `answered_id` reads the top-level `"id"`
(servers write it near the start, `{"jsonrpc":"2.0","id":5,"result":…}`, or near the end, as the
TypeScript SDK does, `{"result":…,"jsonrpc":"2.0","id":5}`). The request it answers is then failed by a
JSON-RPC error of our own (`MESSAGE_TOO_LARGE`) in its place; every other call on the session goes on.
"""

from __future__ import annotations

import json
from collections.abc import Set
from dataclasses import dataclass, field
from typing import Any

import mcp_types as types

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""The default cap on one message from an upstream (`[mcp_servers.NAME] max_message_bytes`)."""
KEEP_BYTES = 16 * 1024
"""How much of the start and of the end of an over-cap line is kept to find its id."""
MESSAGE_TOO_LARGE = -32_050
"""The JSON-RPC error code Offload answers a request with when the upstream's answer was over the cap."""
_WS = " \t\r\n"


@dataclass(slots=True)
class Oversized:
    """A line that was over the cap: its size and its two ends, never the whole."""

    size_bytes: int
    head: bytes
    tail: bytearray = field(default_factory=bytearray)

    def add(self, piece: bytes) -> None:
        self.size_bytes += len(piece)
        self.tail += piece[-KEEP_BYTES:]
        del self.tail[:-KEEP_BYTES]

    @classmethod
    def of(cls, line: bytes | bytearray) -> Oversized:
        found = cls(0, bytes(line[:KEEP_BYTES]))
        found.add(bytes(line[-KEEP_BYTES:]))
        found.size_bytes = len(line)
        return found


class LineSplitter:
    """Stdout bytes → lines, without quadratic copies; a line over `max_bytes` comes out as `Oversized`
    once its end is seen, and at most `max_bytes` (+ one read) is ever held."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._buffer = bytearray()
        self._skipping: Oversized | None = None

    def feed(self, chunk: bytes) -> list[bytes | Oversized]:
        lines: list[bytes | Oversized] = []
        if self._skipping is not None:
            end = chunk.find(b"\n")
            self._skipping.add(chunk if end < 0 else chunk[:end])
            if end < 0:
                return lines
            lines.append(self._skipping)
            self._skipping, chunk = None, chunk[end + 1 :]
        start = len(self._buffer)
        self._buffer += chunk
        while (end := self._buffer.find(b"\n", start)) >= 0:
            line, start = self._buffer[:end], 0
            del self._buffer[: end + 1]
            lines.append(bytes(line) if len(line) <= self.max_bytes else Oversized.of(line))
        if len(self._buffer) > self.max_bytes:
            self._skipping, self._buffer = Oversized.of(self._buffer), bytearray()
        return lines


def answered_id(line: Oversized, pending: Set[types.RequestId], *, alone: bool = True) -> types.RequestId | None:
    """Which of our `pending` requests an over-cap message answers: its top-level `"id"`, read from either
    end, or, when neither end holds one, the only request pending; None for a notification or a request
    of the server's (they have a `"method"`), or when it cannot be told. `alone=False`: never the guess."""
    head, tail = line.head.decode("utf-8", "replace"), line.tail.decode("utf-8", "replace")
    fields = {**_tail_fields(tail), **_head_fields(head)}
    if "method" in fields:
        return None
    if "id" not in fields:
        return next(iter(pending)) if alone and len(pending) == 1 else None
    found = fields["id"]
    return found if isinstance(found, int | str) and not isinstance(found, bool) and found in pending else None


def _head_fields(text: str) -> dict[str, Any]:
    """The top-level `"key": scalar` pairs from the start of an object, up to its first object or array."""
    fields: dict[str, Any] = {}
    decoder = json.JSONDecoder()
    try:
        at = _skip(text, 0)
        if text[at] != "{":
            return fields
        at += 1
        while text[at := _skip(text, at)] == '"':
            key, at = decoder.raw_decode(text, at)
            at = _skip(text, at)
            if text[at] != ":" or text[at := _skip(text, at + 1)] in "{[":
                return fields
            fields[key], at = decoder.raw_decode(text, at)
            if text[at := _skip(text, at)] != ",":
                return fields
            at += 1
    except (ValueError, IndexError):  # the head ends inside a value: what was read so far
        pass
    return fields


def _tail_fields(text: str) -> dict[str, Any]:
    """The top-level `"key": scalar` pairs from the end of an object back to its last object or array."""
    fields: dict[str, Any] = {}
    try:
        at = _rskip(text, len(text) - 1)
        if text[at] != "}":
            return fields
        at = _rskip(text, at - 1)
        while text[at] not in "{}[]":
            start = _rstring_start(text, at) if text[at] == '"' else _rscalar_start(text, at)
            value = json.loads(text[start : at + 1])
            colon = _rskip(text, start - 1)
            key_end = _rskip(text, colon - 1)
            if text[colon] != ":" or text[key_end] != '"':
                return fields
            key_start = _rstring_start(text, key_end)
            fields.setdefault(json.loads(text[key_start : key_end + 1]), value)
            comma = _rskip(text, key_start - 1)
            if text[comma] != ",":
                return fields
            at = _rskip(text, comma - 1)
    except (ValueError, IndexError):  # the tail starts inside a value: what was read so far
        pass
    return fields


def _skip(text: str, at: int) -> int:
    while text[at] in _WS:
        at += 1
    return at


def _rskip(text: str, at: int) -> int:
    while at >= 0 and text[at] in _WS:
        at -= 1
    if at < 0:
        raise IndexError(at)
    return at


def _rstring_start(text: str, end: int) -> int:
    """Where the string ending with the quote at `end` starts: the first quote before it that an even
    number of backslashes precedes (inside a valid string every quote has an odd number)."""
    at = end - 1
    while True:
        at = text.rindex('"', 0, at + 1)
        slashes = 0
        while at - slashes > 0 and text[at - slashes - 1] == "\\":
            slashes += 1
        if slashes % 2 == 0:
            return at
        at -= 1


def _rscalar_start(text: str, end: int) -> int:
    at = end
    while at > 0 and text[at - 1] not in _WS + ":,{[":
        at -= 1
    return at


def too_large(server: str, size_bytes: int | None, max_bytes: int, advice: str | None = None) -> str:
    """The error a call gets when the upstream's answer to it was over the cap."""
    size = f"was {size_bytes:,} bytes" if size_bytes is not None else "was bigger than that"
    advice = advice or (
        "Ask the tool for less (a smaller range, a page, a filter), or raise max_message_bytes in "
        f"[mcp_servers.{server}]"
    )
    return (
        f"the answer of the MCP server {server!r} to this call {size}, over the {max_bytes:,}-byte cap on one "
        f"message from an upstream, so Offload dropped it (the upstream's session goes on, its other calls "
        f"too). {advice}"
    )
