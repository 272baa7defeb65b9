"""A read from any byte offset returns whole characters, in both logs (a file; a Redis stream): a start
inside a character moves past it, and the read says where it started; bytes that are not UTF-8 read as
they are; a start just past the dropped range skips the remains of a character the gap cut. Found by the
distributed model test (a read at an arbitrary offset returned U+FFFD for a character's last byte)."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from server.output import OutputLog, OutputWriter
from server.redis_store import RedisStore
from testkit.redis_server import RedisServer

TEXT = "aé€😀b→ñ".encode()
Writer = Callable[[int], OutputWriter]


@pytest.fixture(params=["file", "redis"])
def new_log(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Writer]:
    if request.param == "file":
        yield lambda cap: OutputLog(tmp_path / f"{secrets.token_hex(4)}.log", cap)
        return
    redis: RedisServer = request.getfixturevalue("redis_server")
    store = RedisStore.open(redis.url, tmp_path / "local", namespace=f"t{secrets.token_hex(6)}")
    yield lambda cap: store.new_output(secrets.token_hex(6), cap)
    store.close()


def starts(data: bytes) -> list[int]:
    return [i for i in range(len(data) + 1) if i == len(data) or data[i] & 0xC0 != 0x80]


@pytest.mark.parametrize("finished", [True, False])
def test_a_read_from_any_offset_starts_on_the_next_character_and_holds_its_bytes_exactly(
    new_log: Writer, finished: bool
) -> None:
    log = new_log(1 << 20)
    log.write(TEXT)
    if finished:
        log.finish()
    for offset in range(len(TEXT) + 1):
        for max_bytes in (1, 2, 3, 5, 100):
            chunk = log.read(offset, max_bytes)
            assert chunk.offset == min(s for s in starts(TEXT) if s >= offset), (offset, chunk)
            assert chunk.data == TEXT[chunk.offset : chunk.next_offset], (offset, max_bytes, chunk)
            chunk.data.decode()  # whole characters: never U+FFFD for a piece of one


def test_bytes_that_are_not_utf8_read_as_they_are(new_log: Writer) -> None:
    binary = b"\x80\x81\xff\xfe\x80abc"
    log = new_log(1 << 20)
    log.write(binary)
    log.finish()
    for offset in range(len(binary)):
        chunk = log.read(offset, 100)
        assert (chunk.offset, chunk.data) == (offset, binary[offset:])


def test_a_read_just_past_the_dropped_range_skips_what_the_gap_left_of_a_character(new_log: Writer) -> None:
    log = new_log(1000)  # head 500, ring 500
    data = "€".encode() * 2000  # 6000 bytes: the ring's start lands anywhere in a character
    for at in range(0, len(data), 7):
        log.write(data[at : at + 7])
    log.finish()
    head = log.read(0, 10_000)
    assert head.dropped is not None and head.data.decode() == "€" * (len(head.data) // 3)
    at, texts = head.next_offset, [head.data]
    while at < len(data):  # what the gap cut of a character at either end goes with it
        chunk = log.read(at, 10_000)
        assert chunk.next_offset > at
        texts.append(chunk.data)
        at = chunk.next_offset
    assert all(text.decode() == "€" * (len(text) // 3) for text in texts)
    assert len(texts[-1]) >= 500 - 3 and len(texts[-1]) % 3 == 0
    for past in range(4):  # a start just past the gap: the bytes before it are gone too
        chunk = log.read(head.dropped[1] + past, 10)
        assert chunk.data == data[chunk.offset : chunk.next_offset] and chunk.offset % 3 == 0, (past, chunk)
        chunk.data.decode()
