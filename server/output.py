"""OutputLog: a task's output as one byte stream read by absolute offsets, bounded in memory.

Bytes are kept as a head (the first `max_bytes // 2`) and a tail (the most recent bytes up
to the rest of the cap; it may briefly hold twice that, so memory stays under 1.5 times
the cap). When a command prints more than the cap, the middle is dropped and
reads say which range is gone; offsets never shift, so a reader's `next_offset` stays valid.
"""

from __future__ import annotations

from dataclasses import dataclass

_TAIL_SLACK = 2
"""The tail may grow to this multiple of its cap before it is trimmed, so trimming is amortised O(1)."""


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


class OutputLog:
    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 2:
            raise ValueError(f"max_bytes must be at least 2, got {max_bytes}")
        self._head_cap = max_bytes // 2
        self._tail_cap = max_bytes - self._head_cap
        self._head = bytearray()
        self._tail = bytearray()
        self._tail_start = 0
        self._total = 0

    @property
    def total_bytes(self) -> int:
        return self._total

    @property
    def held_bytes(self) -> int:
        return len(self._head) + len(self._tail)

    @property
    def dropped(self) -> tuple[int, int] | None:
        head_end = len(self._head)
        return (head_end, self._tail_start) if self._tail_start > head_end else None

    def write(self, data: bytes) -> None:
        room = self._head_cap - len(self._head)
        if room > 0 and self._total == len(self._head):
            self._head += data[:room]
            data = data[room:]
            self._total = len(self._head)
            self._tail_start = self._total
        if not data:
            return
        self._tail += data
        self._total += len(data)
        if len(self._tail) > self._tail_cap * _TAIL_SLACK:
            cut = len(self._tail) - self._tail_cap
            del self._tail[:cut]
            self._tail_start += cut

    def read(self, offset: int, max_bytes: int) -> Chunk:
        """Up to `max_bytes` from `offset`, ending on a UTF-8 character boundary when it can."""
        self._trim()
        start = min(max(offset, 0), self._total)
        head_end = len(self._head)
        if head_end <= start < self._tail_start:
            start = self._tail_start
        if start < head_end:
            data = bytes(self._head[start : min(head_end, start + max_bytes)])
        else:
            base = start - self._tail_start
            data = bytes(self._tail[base : base + max_bytes])
        end = start + len(data)
        if end < self._total:
            data = _cut_to_boundary(data)
            end = start + len(data)
        if end == head_end and self._tail_start > head_end:
            end = self._tail_start  # the next read continues after the gap
        return Chunk(data, start, end, self._total, self.dropped)

    def tail(self, tail_bytes: int) -> int:
        """The offset to read from to get (about) the last `tail_bytes`, on a character start."""
        self._trim()
        start = max(self._total - tail_bytes, 0)
        if start < self._tail_start and start >= len(self._head):
            start = self._tail_start
        while start < self._total and _is_continuation(self._byte_at(start)):
            start += 1
        return start

    def _byte_at(self, offset: int) -> int:
        if offset < len(self._head):
            return self._head[offset]
        return self._tail[offset - self._tail_start]

    def _trim(self) -> None:
        if len(self._tail) > self._tail_cap:
            cut = len(self._tail) - self._tail_cap
            del self._tail[:cut]
            self._tail_start += cut


def _is_continuation(byte: int) -> bool:
    return byte & 0xC0 == 0x80


def _cut_to_boundary(data: bytes) -> bytes:
    """Drops a multi-byte character split at the end, so the next read starts on it whole."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if not _is_continuation(byte):
            width = 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4
            if width <= back or back == len(data):
                return data  # complete, or a lone character wider than the read: send it whole-ish
            return data[:-back]
    return data
