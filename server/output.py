"""Task output: one byte stream per task, in one file, read by absolute offsets, bounded on disk.

Invariants:
- Every byte is in the file (page cache, no fsync) before any reader can see it: a reader learns
  how many bytes exist only from the file's header, which is rewritten after the bytes it counts.
  So what any reader saw survives a `kill -9` of the writer, and every process on the data
  directory reads the same bytes.
- Offsets are absolute and never shift. Past `file_max_bytes` the file keeps the head (its first
  half) and a ring of the most recent bytes (the other half): the middle is dropped, reads say
  which one range is gone, and a reader's `next_offset` stays valid.
- A read costs the size of the range read, not of the log, and never splits a UTF-8 character,
  at the live end of a running task included.
- A failing disk (ENOSPC, say) ends the capture: later bytes are counted, reported as dropped,
  and the task's status stays its own.

The file is self-describing (a fixed header, then head and ring), so a log written by another
process — a detached command's capture process, a server that died — reads like any other.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, runtime_checkable

log = logging.getLogger(__name__)

MAGIC = b"OFFLOG02"
HEADER = struct.Struct("<8sQQQqBQ15x")
"""magic, head bytes, ring bytes, total bytes, lost-from (-1: none), finished flag, reach; 64 bytes."""
READ_RETRIES = 4
"""A read races a writer wrapping the ring over the bytes it read at most this often before
reporting those bytes as dropped."""


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
    """Where a log's bytes are: what the file header says."""

    total_bytes: int
    head_bytes: int
    ring_bytes: int
    lost_from: int | None = None
    """Set when writing failed: bytes from here on were never stored."""
    finished: bool = False
    """The writer closed the log: no byte will follow."""
    data_at: int = 64
    """File position of absolute offset 0 (0 for a plain file of Offload 0.1)."""
    reach: int = 0
    """How far the writer may already have written into the ring (>= total_bytes): it announces a
    write that overwrites ring bytes before making it, so a reader knows which bytes it cannot trust."""

    @property
    def kept_from(self) -> int:
        """The oldest ring offset still holding its own byte, whatever the writer is doing now."""
        return max(self.total_bytes, self.reach) - self.ring_bytes

    @property
    def dropped(self) -> tuple[int, int] | None:
        """The one range of absolute offsets whose bytes are gone, if any."""
        if self.ring_bytes == 0:  # a plain file of an older version: everything or nothing
            return None if self.lost_from is None else (self.lost_from, self.total_bytes)
        ring_start = self.kept_from if self.lost_from is None else self.lost_from - self.ring_bytes
        if self.lost_from is None:
            return (self.head_bytes, ring_start) if ring_start > self.head_bytes else None
        if ring_start > self.head_bytes:  # the ring had wrapped too: only the head is sure
            return (self.head_bytes, self.total_bytes)
        return (self.lost_from, self.total_bytes) if self.total_bytes > self.lost_from else None

    def file_ranges(self, start: int, end: int) -> list[tuple[int, int]]:
        """File (position, length) pieces holding absolute bytes [start, end)."""
        if self.ring_bytes == 0:
            return [(self.data_at + start, end - start)] if end > start else []
        pieces = []
        if start < self.head_bytes:
            stop = min(end, self.head_bytes)
            pieces.append((self.data_at + start, stop - start))
            start = stop
        while start < end:
            slot = (start - self.head_bytes) % self.ring_bytes
            length = min(end - start, self.ring_bytes - slot)
            pieces.append((self.data_at + self.head_bytes + slot, length))
            start += length
        return pieces


EMPTY = Layout(0, 0, 0)


class Output(Protocol):
    """A task's log: written here (`OutputLog`) or by someone else (`StoredLog`); read alike."""

    @property
    def total_bytes(self) -> int: ...
    def read(self, offset: int, max_bytes: int) -> Chunk: ...
    def tail(self, tail_bytes: int) -> int: ...


@runtime_checkable
class OutputWriter(Output, Protocol):
    """A log this process writes (`OutputLog` on disk; `RedisLog` in distributed mode)."""

    def write(self, data: bytes) -> None: ...
    def finish(self) -> None: ...
    def close(self) -> None: ...


class OutputLog:
    """The writer of one task's log (and a reader of it, like any other)."""

    def __init__(self, path: Path, file_max_bytes: int) -> None:
        if file_max_bytes < 2:
            raise ValueError("file_max_bytes must be at least 2")
        self.path = path
        head = file_max_bytes // 2
        self._layout = Layout(0, head, file_max_bytes - head)
        self._fd: int | None = None

    @property
    def total_bytes(self) -> int:
        return self._layout.total_bytes

    def layout(self) -> Layout:
        return self._layout

    def write(self, data: bytes) -> None:
        """Stores `data`, then counts it in the header: a reader never sees a byte not yet stored."""
        if not data:
            return
        layout = self._layout
        start = layout.total_bytes
        self._layout = replace(layout, total_bytes=start + len(data))
        if layout.lost_from is not None:
            return
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                _write_header(self._fd, layout)  # before any data: a reader never takes the file for a plain one
            if start + len(data) > layout.head_bytes + layout.ring_bytes:  # overwrites ring bytes a reader may want
                _write_header(self._fd, replace(layout, reach=start + len(data)))
            self._store(start, data)
            self._layout = replace(self._layout, reach=self._layout.total_bytes)
            _write_header(self._fd, self._layout)
        except OSError as exc:
            self._lose(start, exc)

    def finish(self) -> None:
        """No byte follows: says so in the header (readers stop waiting for a character's end)."""
        self._layout = replace(self._layout, finished=True)
        if self._fd is None and self._layout.total_bytes == 0:
            return  # no output, no file
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            _write_header(self._fd, self._layout)
        except OSError as exc:
            log.warning("could not mark the output of %s finished: %s", self.path.name, exc)
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def read(self, offset: int, max_bytes: int) -> Chunk:
        return read_log(self.path, offset, max_bytes, self._layout)

    def tail(self, tail_bytes: int) -> int:
        return tail_offset(self.path, tail_bytes, self._layout)

    def _store(self, start: int, data: bytes) -> None:
        """Writes `data` (absolute offset `start`) into the head and the ring."""
        head = self._layout.head_bytes
        view = memoryview(data)
        if start < head:
            part = view[: head - start]
            self._pwrite_range(start, part)
            start, view = start + len(part), view[len(part) :]
        ring = self._layout.ring_bytes
        if len(view) > ring:  # only the last ring's worth can survive
            start, view = start + len(view) - ring, view[len(view) - ring :]
        if view:
            self._pwrite_range(start, view)

    def _pwrite_range(self, start: int, data: memoryview) -> None:
        assert self._fd is not None
        index = 0
        for position, length in self._layout.file_ranges(start, start + len(data)):
            _pwrite_all(self._fd, data[index : index + length], position)
            index += length

    def _lose(self, at: int, exc: OSError) -> None:
        self._layout = replace(self._layout, lost_from=at)
        if self._fd is not None:
            with contextlib.suppress(OSError):  # rewriting the header in place needs no new block
                _write_header(self._fd, self._layout)
        reason = "the disk is full" if exc.errno == errno.ENOSPC else str(exc)
        log.warning("output of %s stops being stored at byte %d: %s", self.path.name, at, reason)


# ---- reading (any process, any time) ----


class StoredLog:
    """A log written by someone else (another server, a capture process, an earlier run)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def total_bytes(self) -> int:
        return read_layout(self.path).total_bytes

    def layout(self) -> Layout:
        return read_layout(self.path)

    def read(self, offset: int, max_bytes: int) -> Chunk:
        return read_log(self.path, offset, max_bytes)

    def tail(self, tail_bytes: int) -> int:
        return tail_offset(self.path, tail_bytes)


def read_layout(path: Path) -> Layout:
    """The header of a log file; an absent file is an empty log."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return EMPTY
    try:
        return _header(fd)
    finally:
        os.close(fd)


def read_log(path: Path, offset: int, max_bytes: int, known: Layout | None = None) -> Chunk:
    """Up to `max_bytes` from `offset`, never ending inside a UTF-8 character unless that character
    is wider than the read or the log is finished and it will never be whole.

    `known` is the writer's own layout (no race with it: it writes on this thread); without it the
    header is read, and the read repeated if the writer wrapped the ring over it meanwhile."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = -1
    if known is not None:
        try:
            return _read_once(fd, known, offset, max_bytes)[0]
        finally:
            if fd >= 0:
                os.close(fd)
    if fd < 0:
        return Chunk(b"", 0, 0, 0, None)
    try:
        layout = _header(fd)
        for _ in range(READ_RETRIES):
            chunk, start = _read_once(fd, layout, offset, max_bytes)
            after = _header(fd)
            if after.reach <= layout.reach or not _overwritten(after, start):
                return chunk
            layout = after  # the ring wrapped over what we read: read again
        # The writer lapped the ring during every read: no byte read can be trusted, so none is returned.
        # The read starts where the newest header says readable bytes start; the caller reads on from there.
        start = plan_read(offset, 0, layout.total_bytes, layout.dropped).start
        return Chunk(b"", start, start, layout.total_bytes, layout.dropped)
    finally:
        os.close(fd)


def tail_offset(path: Path, tail_bytes: int, known: Layout | None = None) -> int:
    """The offset to read from to get (about) the last `tail_bytes`, on a character start."""
    layout = known or read_layout(path)
    start = max(layout.total_bytes - tail_bytes, 0)
    gap = layout.dropped
    if gap is not None and gap[0] <= start < gap[1]:
        start = gap[1]
    probe = _pread(path, layout, start, min(start + 4, layout.total_bytes))
    skip = next((i for i, byte in enumerate(probe) if not is_continuation(byte)), len(probe))
    return start + skip


def _read_once(fd: int, layout: Layout, offset: int, max_bytes: int) -> tuple[Chunk, int]:
    """The chunk, and where the bytes it was cut from begin (what the writer must not have overwritten)."""
    plan = plan_read(offset, max_bytes, layout.total_bytes, layout.dropped)
    raw = _pread_fd(fd, layout, plan.lo, plan.hi)
    return chunk_of(plan, raw, total=layout.total_bytes, finished=layout.finished, gap=layout.dropped), plan.lo


@dataclass(frozen=True, slots=True)
class ReadPlan:
    """What a read from an offset fetches, in one go, from either log (file or Redis): bytes [lo, hi). `lo`
    reaches up to 3 bytes back (a start inside a character moves past it), `hi` far enough past `end` for
    the first whole character when no whole one fits the read."""

    start: int
    end: int
    limit: int
    """Where readable bytes stop: the total, or the dropped range's start."""
    lo: int
    hi: int
    cut: bool
    """The bytes before `start` were cut by the dropped range: a character's start there is unknown."""


def plan_read(offset: int, max_bytes: int, total: int, gap: tuple[int, int] | None) -> ReadPlan:
    start = min(max(offset, 0), total)
    if gap is not None and gap[0] <= start < gap[1]:
        start = gap[1]
    limit = gap[0] if gap is not None and start < gap[0] else total
    floor = gap[1] if gap is not None and start >= gap[1] else 0
    lo = max(start - 3, floor)
    end = min(start + max_bytes, limit)
    return ReadPlan(start, end, limit, lo, max(end, min(start + 7, limit)), floor > 0 and lo == floor)


def chunk_of(plan: ReadPlan, raw: bytes, *, total: int, finished: bool, gap: tuple[int, int] | None) -> Chunk:
    """The read `plan` asked for, out of its bytes `raw` ([lo, hi)): never ending inside a UTF-8 character
    unless that character is wider than the read or the log is finished and it will never be whole."""
    start = plan.start + character_start(raw[: plan.start - plan.lo], raw[plan.start - plan.lo :], cut=plan.cut)
    data = raw[start - plan.lo : plan.end - plan.lo]
    if plan.end < total or not finished:
        data = cut_to_boundary(data)
    if not data and start < plan.limit:  # a character wider than the read, or cut by the dropped range
        window = raw[start - plan.lo : min(start + 4, plan.limit) - plan.lo]
        live, cut = plan.limit == total and not finished, gap is not None and plan.limit == gap[0]
        data = first_character(window, live=live, cut=cut)
    next_offset = start + len(data)
    if gap is not None and (next_offset == gap[0] or (not data and start < plan.limit == gap[0])):
        next_offset = gap[1]  # the next read continues after the gap (with what it cut of a character)
    return Chunk(data, start, next_offset, total, gap)


def character_start(before: bytes, after: bytes, *, cut: bool) -> int:
    """How far a read moves its start to begin on a character: past the rest of a character begun in
    `before` (the up to 3 bytes stored just before the start). Where those are all continuation bytes and
    fewer than 3 because the dropped range `cut` them, the character's start is unknown: its continuation
    bytes are skipped (at most 3 in all). 0 on a character's first byte, and in bytes that are not UTF-8
    (binary output reads as it is)."""
    rest = 3 - len(before) if cut else 0
    for back in range(1, len(before) + 1):
        byte = before[-back]
        if not is_continuation(byte):
            rest = max(_width(byte) - back, 0) if 0xC2 <= byte <= 0xF4 else 0  # a lead byte of UTF-8
            break
    skip = 0
    while skip < min(rest, len(after)) and is_continuation(after[skip]):
        skip += 1
    return skip


def first_character(data: bytes, *, live: bool, cut: bool = False) -> bytes:
    """The first character of `data` whole; a byte that starts no valid character goes alone (so a
    read always moves on). An incomplete one waits for its last bytes at the live end (b""), and where
    the dropped range `cut` it, goes with that range (b"": the read moves on past the gap)."""
    if not data:
        return b""
    width = _width(data[0])
    if width <= len(data) and all(is_continuation(b) for b in data[1:width]):
        return data[:width]
    if (live or cut) and len(data) < width and all(is_continuation(b) for b in data[1:]):
        return b""
    return data[:1]


def _pread_fd(fd: int, layout: Layout, start: int, end: int) -> bytes:
    if fd < 0 or end <= start:
        return b""
    return b"".join(os.pread(fd, length, position) for position, length in layout.file_ranges(start, end))


def _width(byte: int) -> int:
    return 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4


def _overwritten(after: Layout, start: int) -> bool:
    """Could the writer have overwritten bytes from `start` on since the first header was read?"""
    if after.ring_bytes == 0:
        return False
    return after.kept_from > max(start, after.head_bytes)


def _pread(path: Path, layout: Layout, start: int, end: int) -> bytes:
    if end <= start:
        return b""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return b""
    try:
        return b"".join(os.pread(fd, length, position) for position, length in layout.file_ranges(start, end))
    finally:
        os.close(fd)


def _header(fd: int) -> Layout:
    raw = os.pread(fd, HEADER.size, 0)
    if len(raw) < HEADER.size or raw[:8] != MAGIC:
        return _legacy(fd, raw)
    _magic, head, ring, total, lost_from, finished, reach = HEADER.unpack(raw)
    return Layout(total, head, ring, None if lost_from < 0 else lost_from, bool(finished), reach=max(reach, total))


def _legacy(fd: int, raw: bytes) -> Layout:
    """A file whose header is not written yet is empty; a plain file of Offload 0.1 (a detached
    command's, or a log that never wrapped) is read whole, as a finished log."""
    if (len(raw) < len(MAGIC) and MAGIC.startswith(raw)) or not raw.strip(b"\0"):
        return EMPTY
    return Layout(os.fstat(fd).st_size, 0, 0, finished=True, data_at=0)


def _write_header(fd: int, layout: Layout) -> None:
    lost = -1 if layout.lost_from is None else layout.lost_from
    os.pwrite(
        fd,
        HEADER.pack(
            MAGIC,
            layout.head_bytes,
            layout.ring_bytes,
            layout.total_bytes,
            lost,
            layout.finished,
            max(layout.reach, layout.total_bytes),
        ),
        0,
    )


def _pwrite_all(fd: int, data: bytes | memoryview, position: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, position)
        view, position = view[written:], position + written


def is_continuation(byte: int) -> bool:
    return byte & 0xC0 == 0x80


def cut_to_boundary(data: bytes) -> bytes:
    """Drops a multi-byte character split at the end, so the next read starts on it whole."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if not is_continuation(byte):
            return data if _width(byte) <= back else data[:-back]
    return data
