"""Output byte accounting: memory then file, head and ring past the file cap, exact offsets."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.output import FileLog, OutputLog


def _stream(n: int) -> bytes:
    return bytes(65 + i % 26 for i in range(n))


def test_small_output_stays_in_memory_until_finished(tmp_path: Path) -> None:
    path = tmp_path / "t.log"
    log = OutputLog(path, memory_max_bytes=100, file_max_bytes=1000)
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
    assert log.held_bytes == 11
    assert not path.exists()
    log.finish()  # durable from here on
    assert path.read_bytes() == b"hello world"
    assert log.held_bytes == 0
    assert log.read(6, 100).data == b"world"


def test_spill_to_file_past_the_memory_cap(tmp_path: Path) -> None:
    path = tmp_path / "t.log"
    log = OutputLog(path, memory_max_bytes=10, file_max_bytes=1000)
    log.write(b"0123456789")
    assert not path.exists()
    log.write(b"abc")
    assert path.read_bytes() == b"0123456789abc"
    assert log.held_bytes == 0
    assert log.read(8, 4).data == b"89ab"


@pytest.mark.parametrize("write_size", [1, 7, 100, 5000])
def test_past_the_file_cap_head_and_tail_survive(tmp_path: Path, write_size: int) -> None:
    path = tmp_path / "t.log"
    log = OutputLog(path, memory_max_bytes=64, file_max_bytes=1000)
    stream = _stream(20_011)
    for i in range(0, len(stream), write_size):
        log.write(stream[i : i + write_size])
        assert log.held_bytes <= 64
    assert path.stat().st_size <= 1000
    assert log.total_bytes == len(stream)
    head = log.read(0, 1000)
    assert head.data == stream[:500]
    assert head.dropped == (500, len(stream) - 500)
    assert head.next_offset == len(stream) - 500
    tail = log.read(head.next_offset, 1000)
    assert tail.data == stream[-500:]
    assert tail.next_offset == len(stream)
    assert log.read(700, 10).offset == len(stream) - 500  # a read in the gap starts at its end
    assert log.read(len(stream) - 7, 5).data == stream[-7:-2]  # across the ring's wrap point too


def test_reopened_after_a_restart_reads_the_same(tmp_path: Path) -> None:
    path = tmp_path / "t.log"
    log = OutputLog(path, memory_max_bytes=64, file_max_bytes=1000)
    stream = _stream(3333)
    log.write(stream)
    log.finish()
    again = OutputLog.reopen(path, log.layout())
    assert again.read(0, 10_000) == log.read(0, 10_000)
    assert again.read(again.tail(100), 100).data == stream[-100:]


def test_disk_full_ends_capture_but_counts_bytes() -> None:
    log = OutputLog(Path("/dev/full"), memory_max_bytes=8, file_max_bytes=1000)
    log.write(b"12345678")
    log.write(b"9" * 100)  # spilling fails: ENOSPC
    log.write(b"more")
    assert log.total_bytes == 112
    assert log.dropped == (8, 112)
    chunk = log.read(0, 1000)
    assert (chunk.data, chunk.next_offset, chunk.dropped) == (b"12345678", 112, (8, 112))


def test_tail_offset_lands_on_a_character_start(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "t.log", memory_max_bytes=1024, file_max_bytes=4096)
    log.write("aé€😀".encode())
    assert log.read(log.tail(4), 100).data.decode() == "😀"
    assert log.read(log.tail(5), 100).data.decode() == "😀"
    assert log.read(log.tail(7), 100).data.decode() == "€😀"


def test_a_read_smaller_than_a_character_still_progresses(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "t.log", memory_max_bytes=1024, file_max_bytes=4096)
    log.write("😀x".encode())
    assert log.read(0, 2).next_offset > 0


def test_file_log_follows_a_growing_file(tmp_path: Path) -> None:
    path = tmp_path / "detached.log"
    log = FileLog(path)
    assert log.read(0, 10).total_bytes == 0
    path.write_bytes(b"first\n")
    assert log.read(0, 100).data == b"first\n"
    with path.open("ab") as f:
        f.write(b"second\n")
    chunk = log.read(6, 100)
    assert (chunk.data, chunk.next_offset, chunk.total_bytes) == (b"second\n", 13, 13)
