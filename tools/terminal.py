"""Input to a running command, and the terminal it may run in.

A command fired with `stdin: "pipe"` keeps its stdin pipe open; one fired with `pty: true` runs on the
slave side of a pseudo-terminal (its stdin, stdout and stderr, and its controlling terminal), so programs
that prompt or check `isatty` behave as in a terminal. Either way the server holds the writing end, in
memory only: a server that stops takes it with it, and the command's stdin is closed.

`ReadyWatch` scans output as it is copied for `ready_when`, across chunk boundaries, until it matches.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import struct
import sys
import termios
from typing import Literal

import anyio
from anyio.abc import ByteSendStream

from tools.context import InputClosed

READ_CHUNK_BYTES = 64 * 1024
READY_CARRY_BYTES = 4096
"""Output kept from the previous chunk while looking for `ready_when`: a match may straddle two reads."""
EOT = b"\x04"
"""Ctrl-D: end of input for a terminal in canonical mode (at the start of a line)."""

CONTROLLING_TTY = "import fcntl,os,sys,termios;fcntl.ioctl(0,termios.TIOCSCTTY,0);os.execvp(sys.argv[1],sys.argv[1:])"
"""Run in the command's new session before its program: the terminal on fd 0 becomes the session's
controlling terminal (what /dev/tty, job control and Ctrl-C need). subprocess offers no way to do it,
and a preexec_fn is unsafe with threads."""


def with_controlling_tty(argv: list[str]) -> list[str]:
    return [sys.executable, "-I", "-S", "-c", CONTROLLING_TTY, *argv]


def open_pty(rows: int, cols: int) -> tuple[int, int]:
    """A pseudo-terminal of `rows` x `cols`: (master, slave); the master is non-blocking."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    os.set_blocking(master, False)
    return master, slave


class PtyReader:
    """Reads the terminal's bytes; EOF once no process holds the slave side (the kernel says EIO)."""

    def __init__(self, master: int) -> None:
        self._master = master

    async def receive(self, max_bytes: int = READ_CHUNK_BYTES) -> bytes:
        while True:
            await anyio.wait_readable(self._master)
            try:
                data = os.read(self._master, max_bytes)
            except BlockingIOError:
                continue
            except OSError:  # EIO: the last holder of the slave side closed it
                raise anyio.EndOfStream from None
            if not data:
                raise anyio.EndOfStream
            return data


class PtyInput:
    """What `send_input` writes to a command running in a terminal: keystrokes, echoed like a terminal's."""

    kind: Literal["pipe", "pty"] = "pty"

    def __init__(self, master: int) -> None:
        self._master = master
        self._open = True

    @property
    def open(self) -> bool:
        return self._open

    def close(self) -> None:
        self._open = False

    async def send(self, data: bytes, eof: bool) -> None:
        if not self._open:
            raise InputClosed("the command's terminal is closed: the command has ended")
        view = memoryview(data + (EOT if eof else b""))
        while view:
            try:
                await anyio.wait_writable(self._master)
                if not self._open:
                    raise InputClosed("the command's terminal closed while input was being written")
                view = view[os.write(self._master, view) :]
            except BlockingIOError:
                continue
            except anyio.ClosedResourceError:
                raise InputClosed("the command's terminal closed while input was being written") from None
            except OSError as exc:
                self._open = False
                raise InputClosed(f"the command's terminal does not take input ({exc.strerror})") from None


class PipeInput:
    """What `send_input` writes to a command's stdin pipe; `eof` closes the pipe."""

    kind: Literal["pipe", "pty"] = "pipe"

    def __init__(self, stream: ByteSendStream) -> None:
        self._stream = stream
        self._open = True
        self._lock = anyio.Lock()

    @property
    def open(self) -> bool:
        return self._open

    async def close(self) -> None:
        self._open = False
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await self._stream.aclose()

    async def send(self, data: bytes, eof: bool) -> None:
        async with self._lock:  # two senders never interleave their texts
            if not self._open:
                raise InputClosed("the command's stdin is closed (it was sent eof, or the command ended)")
            try:
                if data:
                    await self._stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._open = False
                raise InputClosed("the command closed its stdin (it has stopped reading)") from None
            if eof:
                await self.close()


class ReadyWatch:
    """Looks for `ready_when` in output as it is copied; `seen` once it matched (it then stops looking)."""

    def __init__(self, pattern: str | None) -> None:
        self._pattern = None if pattern is None else re.compile(pattern)
        self._carry = ""
        self.seen = pattern is None

    def feed(self, data: bytes) -> bool:
        """True the first time the pattern is found."""
        if self.seen or self._pattern is None:
            return False
        text = self._carry + data.decode("utf-8", errors="replace")
        if self._pattern.search(text) is not None:
            self.seen, self._carry = True, ""
            return True
        self._carry = text[-READY_CARRY_BYTES:]
        return False
