"""A stdio upstream's process: spawned in a session (process group) of its own with only the environment
its config gives, spoken to line by line, its stderr tail kept for error messages, and stopped by
closing its stdin, then TERM and KILL to its whole group."""

from __future__ import annotations

import contextlib
import logging
import math
import subprocess
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import mcp_types as types
from anyio.streams.memory import MemoryObjectSendStream
from anyio.streams.text import TextReceiveStream
from mcp.shared.message import SessionMessage

from tools.context import ProcessInfo
from tools.process import identify, signal_name, spawning, stop_group, track, untrack
from tools.upstream_lines import MAX_MESSAGE_BYTES, MESSAGE_TOO_LARGE, LineSplitter, Oversized, answered_id, too_large

log = logging.getLogger(__name__)

TransportStreams = tuple[Any, Any]
"""An MCP transport's (read, write) streams; the SDK's own alias lives in a private module."""
_ANSWERS = (types.JSONRPCResponse, types.JSONRPCError)
PIPE_ENDS = (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream, OSError)
"""A pipe closed under a read or write (the process died, or we are stopping) ends that loop quietly."""


class UpstreamUnavailable(Exception):
    """The upstream cannot serve calls now (it failed to start, or was given up on); says why."""


class StdioProcess:
    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: dict[str, str],
        cwd: str | None,
        kill_grace_s: float,
        stderr: deque[str],
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = env
        self.cwd = cwd
        self.kill_grace_s = kill_grace_s
        self.stderr = stderr
        """Shared with the upstream: its last lines, for error messages."""
        self.exit_status: str | None = None
        self.max_message_bytes = max_message_bytes
        self._pending: set[types.RequestId] = set()
        """Our requests not answered yet: an over-cap answer without a readable id is the only one's."""

    @asynccontextmanager
    async def open(self, exited: anyio.Event) -> AsyncIterator[tuple[ProcessInfo | None, TransportStreams]]:
        try:
            with spawning():
                process = await anyio.open_process(
                    self.argv,
                    env=self.env,
                    cwd=self.cwd,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    start_new_session=True,
                )
                track(process.pid)  # ours to reap: never taken for an orphan of a command
        except OSError as exc:
            raise UpstreamUnavailable(f"cannot run {self.argv[0]!r}: {exc}") from exc
        info = identify(process.pid)
        stderr_done = anyio.Event()
        read_in, read_out = anyio.create_memory_object_stream[SessionMessage | Exception](0)
        write_in, write_out = anyio.create_memory_object_stream[SessionMessage](0)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._read_stdout, process, read_in, exited, stderr_done)
                tg.start_soon(self._write_stdin, process, write_out)
                tg.start_soon(self._read_stderr, process, stderr_done)
                tg.start_soon(self._watch_exit, process, exited, stderr_done)
                try:
                    yield info, (read_out, write_in)
                finally:
                    with anyio.CancelScope(shield=True):
                        await self._stop(process, write_in, stderr_done)
                    tg.cancel_scope.cancel()
        finally:
            untrack(process.pid)
            for stream in (read_in, read_out, write_in, write_out):
                stream.close()

    async def _read_stdout(
        self,
        process: anyio.abc.Process,
        sink: anyio.abc.ObjectSendStream[SessionMessage | Exception],
        exited: anyio.Event,
        stderr_done: anyio.Event,
    ) -> None:
        """Messages, line by line. Its end ends the session even if the process lives on (a wrapper whose
        server died): the connection is gone either way. A line over the cap fails only the call it answers."""
        assert process.stdout is not None
        lines = LineSplitter(self.max_message_bytes)
        async with sink:
            with contextlib.suppress(*PIPE_ENDS):
                async for chunk in process.stdout:
                    for line in lines.feed(chunk):
                        if isinstance(line, Oversized):
                            await self._refuse(line, sink)
                        elif line.strip():
                            message = _parse(line)
                            if isinstance(message, SessionMessage) and isinstance(message.message, _ANSWERS):
                                self._pending.discard(message.message.id)
                            await sink.send(message)
        await self._settle(process, exited, stderr_done, self.kill_grace_s)

    async def _refuse(self, line: Oversized, sink: anyio.abc.ObjectSendStream[SessionMessage | Exception]) -> None:
        """An over-cap message: the request it answers gets an error of ours in its place; anything else
        (a notification, a request of the server's, an answer whose id is in neither end) is dropped."""
        request_id = answered_id(line, self._pending)
        if request_id is None:
            note = f"[offload] dropped a {line.size_bytes}-byte message (over {self.max_message_bytes}) on stdout"
            self.stderr.append(note)
            log.warning("MCP server %r: %s answering none of our requests", self.name, note)
            return
        self._pending.discard(request_id)
        message = too_large(self.name, line.size_bytes, self.max_message_bytes)
        log.warning("MCP server %r: request %r: %s", self.name, request_id, message)
        error = types.ErrorData(code=MESSAGE_TOO_LARGE, message=message)
        await sink.send(SessionMessage(types.JSONRPCError(jsonrpc="2.0", id=request_id, error=error)))

    async def _write_stdin(
        self, process: anyio.abc.Process, source: anyio.abc.ObjectReceiveStream[SessionMessage]
    ) -> None:
        assert process.stdin is not None
        async with source:
            with contextlib.suppress(*PIPE_ENDS):
                async for message in source:
                    sent = message.message
                    if isinstance(sent, types.JSONRPCRequest):
                        self._pending.add(sent.id)
                    elif isinstance(sent, types.JSONRPCNotification) and sent.method == "notifications/cancelled":
                        self._pending.discard((sent.params or {}).get("requestId", ""))  # no answer is owed now
                    data = sent.model_dump_json(by_alias=True, exclude_unset=True)
                    await process.stdin.send(data.encode() + b"\n")

    async def _read_stderr(self, process: anyio.abc.Process, done: anyio.Event) -> None:
        assert process.stderr is not None
        try:
            with contextlib.suppress(*PIPE_ENDS):
                async for text in TextReceiveStream(process.stderr, errors="replace"):
                    for line in text.splitlines():
                        if line.strip():
                            self.stderr.append(line[:500])
                            log.debug("MCP server %r stderr: %s", self.name, line)
        finally:
            done.set()

    async def _watch_exit(self, process: anyio.abc.Process, exited: anyio.Event, stderr_done: anyio.Event) -> None:
        await self._settle(process, exited, stderr_done, math.inf)

    async def _settle(
        self, process: anyio.abc.Process, exited: anyio.Event, stderr_done: anyio.Event, wait_s: float
    ) -> None:
        """Records the exit status (waiting `wait_s` for it) and the last stderr lines, then ends the session."""
        with anyio.move_on_after(wait_s):
            code = await process.wait()
            self.exit_status = f"exit status {code}" if code >= 0 else f"killed by {signal_name(-code)}"
        with anyio.move_on_after(0.5):  # its last stderr lines, unless a child still holds the pipe
            await stderr_done.wait()
        exited.set()

    async def _stop(
        self,
        process: anyio.abc.Process,
        stdin: MemoryObjectSendStream[SessionMessage],
        stderr_done: anyio.Event,
    ) -> None:
        """Closes stdin (most servers exit), then TERM and KILL to its whole process group."""
        stdin.close()
        if process.stdin is not None:
            with contextlib.suppress(*PIPE_ENDS):
                await process.stdin.aclose()
        grace_s = self.kill_grace_s
        with anyio.move_on_after(grace_s):
            await process.wait()
        await stop_group(process.pid, grace_s, process.wait)
        with anyio.move_on_after(0.5):
            await stderr_done.wait()


def _parse(line: bytes) -> SessionMessage | Exception:
    try:
        return SessionMessage(types.jsonrpc_message_adapter.validate_json(line, by_name=False))
    except ValueError as exc:
        return exc
