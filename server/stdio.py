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
import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

from mcp.server.stdio import stdio_server

MAX_LINE_BYTES = 64 * 1024 * 1024
"""One JSON-RPC message per line; the SDK's default reader has no limit either."""


class _Lines:
    """Enough of `anyio.AsyncFile[str]` for the SDK's reader: async iteration over lines."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader

    def __aiter__(self) -> _Lines:
        return self

    async def __anext__(self) -> str:
        line = await self._reader.readline()
        if not line:
            raise StopAsyncIteration
        return line.decode("utf-8", errors="replace")


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
async def loop_stdio_server() -> AsyncIterator[tuple[Any, Any]]:
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
    reader = asyncio.StreamReader(limit=MAX_LINE_BYTES)
    read_transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(in_fd, "rb", buffering=0)
    )
    write_transport, write_protocol = await loop.connect_write_pipe(_FlowControl, os.fdopen(out_fd, "wb", buffering=0))
    writer = asyncio.StreamWriter(write_transport, write_protocol, None, loop)
    try:
        async with stdio_server(cast(Any, _Lines(reader)), cast(Any, _Writer(writer))) as streams:
            yield streams
    finally:
        read_transport.close()
        write_transport.close()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)


class _FlowControl(asyncio.streams.FlowControlMixin, asyncio.Protocol):
    """The protocol `StreamWriter.drain()` needs on a write-only pipe."""
