"""Output as a Redis stream (`RedisLog`), against a real redis-server: absolute offsets, head + ring
past the cap with the one dropped range reported, reads by offset from another reader, whole characters."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.redis_store import RedisLog, RedisStore
from testkit.redis_server import RedisServer


@pytest.fixture
def store(redis_server: RedisServer, tmp_path: Path) -> Iterator[RedisStore]:
    opened = RedisStore.open(redis_server.url, tmp_path / "local", namespace=f"test-{secrets.token_hex(6)}")
    yield opened
    opened.close()


def reader_of(store: RedisStore, task_id: str) -> RedisLog:
    return store.new_output(task_id, 1024)  # a reader never writes: its own sizes do not matter


@pytest.mark.parametrize("write_size", [1, 7, 100, 3000])
def test_past_the_cap_the_head_and_the_recent_ring_are_kept_and_the_gap_is_reported(
    store: RedisStore, write_size: int
) -> None:
    writer = store.new_output("t1", 1000)  # head 500, ring 500
    data = bytes(97 + i % 26 for i in range(5000))
    for at in range(0, len(data), write_size):
        writer.write(data[at : at + write_size])
    writer.finish()
    reader = reader_of(store, "t1")
    assert reader.total_bytes == 5000
    head = reader.read(0, 10_000)
    assert head.data == data[:500] and head.dropped is not None and head.dropped[0] == 500
    gap_end = head.dropped[1]
    assert head.next_offset == gap_end and 4500 - write_size <= gap_end <= 4500
    rest = reader.read(head.next_offset, 10_000)
    assert rest.offset == gap_end and rest.data == data[gap_end:] and not rest.truncated
    inside = reader.read(600, 10)
    assert inside.offset == gap_end  # a read inside the gap starts after it
    middle = reader.read(4800, 50)
    assert middle.data == data[4800:4850] and middle.next_offset == 4850


def test_a_live_read_never_ends_inside_a_character_and_tail_starts_on_one(store: RedisStore) -> None:
    writer = store.new_output("t2", 1 << 20)
    text = "héllo wörld ✓".encode()
    writer.write(text[:2])  # "h" and the first byte of "é"
    reader = reader_of(store, "t2")
    first = reader.read(0, 100)
    assert first.data == b"h" and first.next_offset == 1
    writer.write(text[2:])
    assert reader.read(1, 100).data == text[1:]
    assert reader.read(0, 2).data == b"h"  # two bytes would split "é"
    assert text[reader.tail(4) :].decode() == " ✓"
    assert reader.tail(2) == len(text)  # inside "✓": on to the next character's start
    writer.finish()
    assert reader.read(0, 1000).data == text


def test_an_absent_log_reads_empty(store: RedisStore) -> None:
    chunk = reader_of(store, "none").read(0, 100)
    assert (chunk.data, chunk.total_bytes, chunk.dropped) == (b"", 0, None)
