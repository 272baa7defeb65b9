"""OutputLog byte accounting: offsets stay absolute, memory stays bounded, the gap is reported."""

from __future__ import annotations

import pytest

from server.output import OutputLog


def test_small_output_reads_back_exactly() -> None:
    log = OutputLog(1024)
    log.write(b"hello ")
    log.write(b"world")
    chunk = log.read(0, 100)
    assert (chunk.data, chunk.offset, chunk.next_offset, chunk.total_bytes, chunk.dropped) == (
        b"hello world",
        0,
        11,
        11,
        None,
    )
    assert not chunk.truncated


@pytest.mark.parametrize("write_size", [1, 7, 100, 5000])
def test_past_the_cap_head_and_tail_survive(write_size: int) -> None:
    cap = 1000
    log = OutputLog(cap)
    stream = bytes(65 + i % 26 for i in range(20_000))
    for i in range(0, len(stream), write_size):
        log.write(stream[i : i + write_size])
        assert log.held_bytes <= cap * 1.5
    assert log.total_bytes == len(stream)
    head = log.read(0, cap)
    assert head.data == stream[:500]
    assert head.dropped == (500, len(stream) - 500)
    assert head.next_offset == len(stream) - 500
    tail = log.read(head.next_offset, cap)
    assert tail.data == stream[-500:]
    assert tail.next_offset == len(stream)
    inside_gap = log.read(700, 10)
    assert inside_gap.offset == len(stream) - 500  # a read in the gap starts at its end


def test_tail_offset_lands_on_a_character_start() -> None:
    log = OutputLog(1024)
    log.write("aé€😀".encode())
    assert log.read(log.tail(4), 100).data.decode() == "😀"
    assert log.read(log.tail(5), 100).data.decode() == "😀"
    assert log.read(log.tail(7), 100).data.decode() == "€😀"


def test_a_read_smaller_than_a_character_still_progresses() -> None:
    log = OutputLog(1024)
    log.write("😀x".encode())
    chunk = log.read(0, 2)
    assert chunk.next_offset > 0
