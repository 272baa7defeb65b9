"""Output byte accounting: written through to one self-describing file, head and ring past the cap,
exact offsets, the same bytes for the writer and for any other reader."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.output import OutputLog, StoredLog, read_layout


def _stream(n: int) -> bytes:
    return bytes(65 + i % 26 for i in range(n))


def test_every_byte_is_on_disk_before_the_write_returns(tmp_path: Path) -> None:
    path = tmp_path / "t.log"
    log = OutputLog(path, file_max_bytes=1000)
    assert not path.exists()  # no output, no file
    log.write(b"hello ")
    log.write(b"world")
    other = StoredLog(path)  # another process's view: the file alone
    for view in (log, other):
        chunk = view.read(0, 100)
        assert (chunk.data, chunk.offset, chunk.next_offset, chunk.total_bytes, chunk.dropped) == (
            b"hello world",
            0,
            11,
            11,
            None,
        )
        assert not chunk.truncated
    assert other.read(6, 100).data == b"world"


def test_a_killed_writer_leaves_what_any_reader_saw(tmp_path: Path) -> None:
    """The writer is a real process killed with SIGKILL right after a write returned."""
    path = tmp_path / "t.log"
    code = (
        "import os, sys; from pathlib import Path; from server.output import OutputLog\n"
        f"log = OutputLog(Path({str(path)!r}), 1000)\n"
        "log.write(b'compiled 12 files\\n'); print('written', flush=True); os.kill(os.getpid(), 9)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=Path(__file__).parents[1])
    assert done.returncode == -9 and done.stdout == b"written\n"
    chunk = StoredLog(path).read(0, 100)
    assert chunk.data == b"compiled 12 files\n" and chunk.total_bytes == 18
    assert not read_layout(path).finished


@pytest.mark.parametrize("write_size", [1, 7, 100, 5000])
def test_past_the_file_cap_head_and_tail_survive(tmp_path: Path, write_size: int) -> None:
    path = tmp_path / "t.log"
    log = OutputLog(path, file_max_bytes=1000)
    stream = _stream(20_011)
    for i in range(0, len(stream), write_size):
        log.write(stream[i : i + write_size])
    assert path.stat().st_size <= 1000 + 64  # the data plus the header
    for view in (log, StoredLog(path)):
        assert view.total_bytes == len(stream)
        head = view.read(0, 1000)
        assert head.data == stream[:500]
        assert head.dropped == (500, len(stream) - 500)
        assert head.next_offset == len(stream) - 500
        tail = view.read(head.next_offset, 1000)
        assert tail.data == stream[-500:]
        assert tail.next_offset == len(stream)
        assert view.read(700, 10).offset == len(stream) - 500  # a read in the gap starts at its end
        assert view.read(len(stream) - 7, 5).data == stream[-7:-2]  # across the ring's wrap point too


def test_finished_logs_read_the_same_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "t.log"
    log = OutputLog(path, file_max_bytes=1000)
    stream = _stream(3333)
    log.write(stream)
    log.finish()
    again = StoredLog(path)
    assert read_layout(path).finished
    assert again.read(0, 10_000) == log.read(0, 10_000)
    assert again.read(again.tail(100), 100).data == stream[-100:]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux) to make every write fail")
def test_disk_full_ends_capture_but_counts_bytes() -> None:
    log = OutputLog(Path("/dev/full"), file_max_bytes=1000)
    log.write(b"12345678")  # ENOSPC at once
    log.write(b"more")
    assert log.total_bytes == 12
    chunk = log.read(0, 1000)
    assert (chunk.data, chunk.next_offset, chunk.dropped) == (b"", 12, (0, 12))


def test_tail_offset_lands_on_a_character_start(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "t.log", file_max_bytes=4096)
    log.write("aé€😀".encode())
    log.finish()
    assert log.read(log.tail(4), 100).data.decode() == "😀"
    assert log.read(log.tail(5), 100).data.decode() == "😀"
    assert log.read(log.tail(7), 100).data.decode() == "€😀"


def test_a_read_smaller_than_a_character_still_progresses(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "t.log", file_max_bytes=4096)
    log.write("😀x".encode())
    assert log.read(0, 2).next_offset > 0


def test_the_live_end_never_splits_a_character(tmp_path: Path) -> None:
    path = tmp_path / "t.log"
    log = OutputLog(path, file_max_bytes=4096)
    log.write(b"price: \xe2\x82")  # the euro sign's last byte is still to come
    for view in (log, StoredLog(path)):
        chunk = view.read(0, 100)
        assert (chunk.data, chunk.next_offset, chunk.total_bytes) == (b"price: ", 7, 9)
        assert view.read(7, 100).data == b""  # nothing but the partial character: wait for it
    log.write(b"\xac 5\n")
    assert log.read(7, 100).data.decode() == "€ 5\n"
    log.write(b"\xe2")
    log.finish()  # it will never be whole now: send what there is
    assert log.read(13, 100).data == b"\xe2"


def test_a_plain_file_of_an_older_version_reads_whole(tmp_path: Path) -> None:
    path = tmp_path / "old.log"
    path.write_bytes(b"from offload 0.1\n")
    chunk = StoredLog(path).read(0, 100)
    assert (chunk.data, chunk.total_bytes) == (b"from offload 0.1\n", 17)


def test_a_reader_racing_a_wrapping_writer_never_returns_overwritten_bytes(tmp_path: Path) -> None:
    """Every byte of the stream encodes its own offset, so a byte from the wrong place shows."""
    path = tmp_path / "t.log"
    log = OutputLog(path, file_max_bytes=256)
    reader = StoredLog(path)

    def byte_at(offset: int) -> int:
        return (offset * 7 + offset // 251) % 256

    offset = 0
    for _ in range(400):
        log.write(bytes(byte_at(offset + i) for i in range(37)))
        offset += 37
        chunk = reader.read(max(offset - 200, 0), 64)
        assert all(b == byte_at(chunk.offset + i) for i, b in enumerate(chunk.data))


def test_files_are_private(tmp_path: Path) -> None:
    path = tmp_path / "t.log"
    OutputLog(path, file_max_bytes=100).write(b"x")
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_a_reader_in_another_process_never_gets_bytes_from_the_wrong_offset(tmp_path: Path) -> None:
    """A writer process wraps a small ring as fast as it can; this process reads where the ring is
    oldest (the bytes the writer overwrites next). Each 16-byte line holds its own index, so a byte
    from another offset shows."""
    path = tmp_path / "t.log"
    code = (
        "from pathlib import Path; from server.output import OutputLog\n"
        f"log = OutputLog(Path({str(path)!r}), 8192)\n"
        "for i in range(0, 400_000, 64): log.write(b''.join(b'%015d\\n' % j for j in range(i, i + 64)))\n"
        "log.finish()"
    )
    writer = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parents[1])
    reader = StoredLog(path)
    checked = 0
    try:
        while writer.poll() is None or checked == 0:
            layout = read_layout(path)
            offset = layout.dropped[1] if layout.dropped else 0
            chunk = reader.read(offset, 256)
            first = -(-chunk.offset // 16) * 16  # the first whole line in the chunk
            for at in range(first, chunk.offset + len(chunk.data) - 15, 16):
                line = chunk.data[at - chunk.offset : at - chunk.offset + 16]
                assert line == b"%015d\n" % (at // 16), (at, line, chunk)
                checked += 1
    finally:
        writer.wait(timeout=60)
    assert checked > 1000


@pytest.mark.parametrize("max_bytes", [1, 2, 3, 5])
def test_paging_with_any_max_bytes_never_splits_a_character(tmp_path: Path, max_bytes: int) -> None:
    log = OutputLog(tmp_path / "t.log", file_max_bytes=4096)
    text = "€uro😀x é"
    log.write(text.encode() + b"\xff!")  # and a byte that starts no character: it still moves on
    log.finish()
    pieces, offset = [], 0
    while offset < log.total_bytes:
        chunk = log.read(offset, max_bytes)
        assert chunk.next_offset > offset
        pieces.append(chunk.data)
        offset = chunk.next_offset
    assert all(p.decode() for p in pieces[:-2])  # every piece but the invalid tail decodes alone
    assert b"".join(pieces) == text.encode() + b"\xff!"
