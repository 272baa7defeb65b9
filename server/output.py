"""Task output: one byte stream per task, read by absolute offsets, bounded in memory and on disk.

`OutputLog` keeps output in memory up to `memory_max_bytes`, then spills it to a file and
appends there. Past `file_max_bytes` the file keeps the head (its first half) and a ring of
the most recent bytes (the other half): the middle is dropped, reads say which range is gone,
and offsets never shift, so a reader's `next_offset` stays valid. Any read costs the size of
the range read, not of the log. A failing disk (ENOSPC, say) ends the capture: the bytes
after that point are counted, reported as dropped, and the task's status stays its own.

`FileLog` is the read-only view of a file another process appends to (a detached command).
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Chunk:
    """One read: `data` starts at absolute `offset`; `dropped` is the lost range, if any."""

    data: bytes
    offset: int
    next_offset: int
    total_bytes: int
    dropped: tuple[int, int] | None

    @property
    def truncated(self) -> bool:
        """More bytes exist after this chunk."""
        return self.next_offset < self.total_bytes


@dataclass(frozen=True, slots=True)
class Layout:
    """Where an `OutputLog`'s bytes are, enough to reopen it after a restart."""

    total_bytes: int
    head_bytes: int
    ring_bytes: int
    lost_from: int | None = None
    """Set when writing failed: bytes from here on were never stored."""


class Output(Protocol):
    @property
    def total_bytes(self) -> int: ...
    @property
    def held_bytes(self) -> int: ...
    def read(self, offset: int, max_bytes: int) -> Chunk: ...
    def tail(self, tail_bytes: int) -> int: ...
    def layout(self) -> Layout: ...


class OutputLog:
    def __init__(self, path: Path, memory_max_bytes: int, file_max_bytes: int) -> None:
        if file_max_bytes < 2 or memory_max_bytes < 0:
            raise ValueError("file_max_bytes must be at least 2 and memory_max_bytes not negative")
        self.path = path
        self._memory_max = min(memory_max_bytes, file_max_bytes)
        self._head = file_max_bytes // 2
        self._ring = file_max_bytes - self._head
        self._memory = bytearray()
        self._fd: int | None = None
        self._in_file = False
        """Bytes live in the file (spilled, finished, or reopened), not in `_memory`."""
        self._total = 0
        self._lost_from: int | None = None

    @classmethod
    def reopen(cls, path: Path, layout: Layout) -> OutputLog:
        """The log of a finished task from an earlier run, read from its file."""
        opened = cls(path, 0, layout.head_bytes + layout.ring_bytes)
        opened._head, opened._ring = layout.head_bytes, layout.ring_bytes
        opened._total, opened._lost_from = layout.total_bytes, layout.lost_from
        opened._in_file = True
        return opened

    # ---- writing ----

    @property
    def total_bytes(self) -> int:
        return self._total

    @property
    def held_bytes(self) -> int:
        """Bytes held in memory (the rest is on disk)."""
        return len(self._memory)

    def write(self, data: bytes) -> None:
        if not data:
            return
        start = self._total
        self._total += len(data)
        if self._lost_from is not None:
            return
        if self._fd is None and self._total <= self._memory_max:
            self._memory += data
            return
        try:
            if self._fd is None:
                self._open_for_append()
            self._store(start, data)
        except OSError as exc:
            self._lose(start, exc)

    @classmethod
    def inline(cls, path: Path, data: bytes) -> OutputLog:
        """The log of a finished task whose small output was stored with its record."""
        log = cls(path, len(data), max(len(data), 2))
        log._memory, log._total = bytearray(data), len(data)
        return log

    def inline_bytes(self) -> bytes | None:
        """The whole output, if it never left memory (small enough to store with the task's record)."""
        return None if self._in_file or self._lost_from is not None else bytes(self._memory)

    def finish(self, inline_max_bytes: int = 0) -> None:
        """Makes the output durable and closes the file; output of at most `inline_max_bytes`
        stays in memory, for the caller to store with the task's record."""
        if not self._in_file and len(self._memory) <= inline_max_bytes:
            return
        try:
            if self._memory and self._lost_from is None:
                self._open_for_append()
        except OSError as exc:
            self._memory = bytearray()  # what is not on disk would not survive a restart either
            self._lose(0, exc)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def layout(self) -> Layout:
        return Layout(self._total, self._head, self._ring, self._lost_from)

    def _open_for_append(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        if self._memory:
            _pwrite_all(self._fd, bytes(self._memory), 0)
        self._memory = bytearray()
        self._in_file = True

    def _store(self, start: int, data: bytes) -> None:
        """Writes `data` (absolute offset `start`) into the head and the ring."""
        assert self._fd is not None
        if start < self._head:
            part = data[: self._head - start]
            _pwrite_all(self._fd, part, start)
            start, data = start + len(part), data[len(part) :]
        if len(data) > self._ring:  # only the last ring's worth can survive
            start, data = start + len(data) - self._ring, data[-self._ring :]
        while data:
            slot = (start - self._head) % self._ring
            part = data[: self._ring - slot]
            _pwrite_all(self._fd, part, self._head + slot)
            start, data = start + len(part), data[len(part) :]

    def _lose(self, at: int, exc: OSError) -> None:
        self._lost_from = at
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        reason = "the disk is full" if exc.errno == errno.ENOSPC else str(exc)
        log.warning("output of %s stops being stored at byte %d: %s", self.path.name, at, reason)

    # ---- reading ----

    @property
    def dropped(self) -> tuple[int, int] | None:
        """The one range of absolute offsets whose bytes are gone, if any."""
        kept_until = self._total if self._lost_from is None else self._lost_from
        ring_start = kept_until - self._ring
        if self._lost_from is None:
            return (self._head, ring_start) if ring_start > self._head else None
        if ring_start > self._head:  # the ring had wrapped too: keep it simple, only the head is sure
            return (self._head, self._total)
        return (self._lost_from, self._total) if self._total > self._lost_from else None

    def read(self, offset: int, max_bytes: int) -> Chunk:
        """Up to `max_bytes` from `offset`, ending on a UTF-8 character boundary when it can."""
        start = min(max(offset, 0), self._total)
        gap = self.dropped
        if gap is not None and gap[0] <= start < gap[1]:
            start = gap[1]
        end = min(start + max_bytes, self._total)
        if gap is not None and start < gap[0] < end:
            end = gap[0]
        data = self._bytes(start, end)
        if end < self._total:
            data = _cut_to_boundary(data)
        next_offset = start + len(data)
        if gap is not None and next_offset == gap[0]:
            next_offset = gap[1]  # the next read continues after the gap
        return Chunk(data, start, next_offset, self._total, gap)

    def tail(self, tail_bytes: int) -> int:
        """The offset to read from to get (about) the last `tail_bytes`, on a character start."""
        start = max(self._total - tail_bytes, 0)
        gap = self.dropped
        if gap is not None and gap[0] <= start < gap[1]:
            start = gap[1]
        probe = self._bytes(start, min(start + 4, self._total))
        skip = next((i for i, byte in enumerate(probe) if not _is_continuation(byte)), len(probe))
        return start + skip

    def _bytes(self, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        if not self._in_file:
            return bytes(self._memory[start:end])
        return _read_file(self.path, self._file_ranges(start, end))

    def _file_ranges(self, start: int, end: int) -> list[tuple[int, int]]:
        """File (position, length) pieces holding absolute bytes [start, end)."""
        pieces = []
        if start < self._head:
            stop = min(end, self._head)
            pieces.append((start, stop - start))
            start = stop
        while start < end:
            slot = (start - self._head) % self._ring
            length = min(end - start, self._ring - slot)
            pieces.append((self._head + slot, length))
            start += length
        return pieces


class FileLog:
    """Output written to a file by someone else (a detached command); reads see it as it grows."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def total_bytes(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    @property
    def held_bytes(self) -> int:
        return 0

    def read(self, offset: int, max_bytes: int) -> Chunk:
        total = self.total_bytes
        start = min(max(offset, 0), total)
        end = min(start + max_bytes, total)
        data = _read_file(self.path, [(start, end - start)]) if end > start else b""
        if end < total:
            data = _cut_to_boundary(data)
        return Chunk(data, start, start + len(data), total, None)

    def tail(self, tail_bytes: int) -> int:
        total = self.total_bytes
        start = max(total - tail_bytes, 0)
        probe = _read_file(self.path, [(start, min(4, total - start))]) if total > start else b""
        return start + next((i for i, byte in enumerate(probe) if not _is_continuation(byte)), len(probe))

    def layout(self) -> Layout:
        return Layout(self.total_bytes, 0, 0)


def _pwrite_all(fd: int, data: bytes, position: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, position)
        view, position = view[written:], position + written


def _read_file(path: Path, pieces: list[tuple[int, int]]) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return b""
    try:
        return b"".join(os.pread(fd, length, position) for position, length in pieces)
    finally:
        os.close(fd)


def _is_continuation(byte: int) -> bool:
    return byte & 0xC0 == 0x80


def _cut_to_boundary(data: bytes) -> bytes:
    """Drops a multi-byte character split at the end, so the next read starts on it whole."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if not _is_continuation(byte):
            width = 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4
            if width <= back or back == len(data):
                return data  # complete, or a lone character wider than the read: send what there is
            return data[:-back]
    return data
