"""The stdio transport's byte pipes, read and written on the event loop instead of in threads.

The SDK's default `stdio_server()` reads stdin and writes stdout through worker threads:
two thread hops per reply (write, then flush), a reply that waits behind any loop work
scheduled meanwhile (a process spawn, say), and a stdin read that no cancellation can
interrupt, so a SIGTERM would wait for the client to close stdin. Here both ends are asyncio
pipe transports: a reply is on the wire as soon as the writer task runs.

As the SDK does, fd 0 and fd 1 are claimed for the protocol: while serving, fd 0 reads
/dev/null and fd 1 points at stderr, so nothing else (a plugin's print, a child) can
corrupt the protocol stream.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import re
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

from mcp.server.stdio import stdio_server

log = logging.getLogger(__name__)

HEAD_BYTES = 4096
"""Of a message over the size limit, this much is kept to find its id and answer it."""


class _Lines:
    """Enough of `anyio.AsyncFile[str]` for the SDK's reader: async iteration over lines. A line over
    the limit is skipped, never held whole, and its request answered with an error saying why."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_bytes: int) -> None:
        self._reader = reader
        self._writer = writer
        self._max_bytes = max_bytes

    def __aiter__(self) -> _Lines:
        return self

    async def __anext__(self) -> str:
        while True:
            try:
                line = await self._reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:
                if not exc.partial:
                    raise StopAsyncIteration from None
                line = exc.partial
            except asyncio.LimitOverrunError:
                await self._refuse_long_line()
                continue
            return line.decode("utf-8", errors="replace")

    async def _refuse_long_line(self) -> None:
        head = await self._reader.read(HEAD_BYTES)
        size = len(head)
        while True:
            try:
                size += len(await self._reader.readuntil(b"\n"))
                break
            except asyncio.LimitOverrunError as exc:
                size += len(await self._reader.read(max(exc.consumed, HEAD_BYTES)))
            except asyncio.IncompleteReadError as exc:
                size += len(exc.partial)
                break
        message = f"message of {size} bytes is above this server's limit of {self._max_bytes} (max_request_body_bytes)"
        log.warning("stdio: dropped a %s", message)
        request_id = top_level_id(head)
        if request_id is not None:
            error = {"code": -32600, "message": f"Invalid request: {message}; send smaller arguments"}
            reply = {"jsonrpc": "2.0", "id": request_id, "error": error}
            self._writer.write(json.dumps(reply).encode() + b"\n")
            await self._writer.drain()


def top_level_id(head: bytes) -> str | int | None:
    """The `id` member of the JSON object `head` begins, if it appears (at depth 1) within `head`."""
    text = head.decode("utf-8", errors="replace")
    depth, i = 0, 0
    while i < len(text):
        char = text[i]
        if char == '"':
            end = _string_end(text, i)
            if end < 0:
                return None
            if depth == 1 and text[i : end + 1] == '"id"':
                found = _ID_VALUE.match(text, end + 1)
                return json.loads(found.group(1)) if found else None
            i = end
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
        i += 1
    return None


_ID_VALUE = re.compile(r'\s*:\s*("(?:[^"\\]|\\.)*"|-?\d+)')


def _string_end(text: str, start: int) -> int:
    i = start + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == '"':
            return i
        i += 1
    return -1


class _Writer:
    """Enough of `anyio.AsyncFile[str]` for the SDK's writer: `write` then `flush`."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    async def write(self, text: str) -> None:
        self._writer.write(text.encode("utf-8"))

    async def flush(self) -> None:
        await self._writer.drain()


def _is_pipe_like(fd: int) -> bool:
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode)


@asynccontextmanager
async def loop_stdio_server(max_message_bytes: int) -> AsyncIterator[tuple[Any, Any]]:
    """Like `mcp.server.stdio.stdio_server()`, with the pipes on the event loop when they are pipes."""
    if not (_is_pipe_like(0) and _is_pipe_like(1)):
        async with stdio_server() as streams:  # regular files: the SDK's threaded path works
            yield streams
        return
    in_fd = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 3)
    out_fd = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, 3)
    saved = {0: os.dup(0), 1: os.dup(1)}
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=max_message_bytes)
    read_transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(in_fd, "rb", buffering=0)
    )
    write_transport, write_protocol = await loop.connect_write_pipe(_FlowControl, os.fdopen(out_fd, "wb", buffering=0))
    writer = asyncio.StreamWriter(write_transport, write_protocol, None, loop)
    try:
        async with stdio_server(
            cast(Any, _Lines(reader, writer, max_message_bytes)), cast(Any, _Writer(writer))
        ) as streams:
            yield streams
    finally:
        read_transport.close()
        write_transport.close()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)


class _FlowControl(asyncio.streams.FlowControlMixin, asyncio.Protocol):
    """The protocol `StreamWriter.drain()` needs on a write-only pipe."""
