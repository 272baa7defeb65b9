"""Masking at the edges (issue 12, item 8): no read returns any part of a known secret, neither at the live
end of a running task's output (held back until it is known) nor beside a dropped range (masked), and a
running command's half-written secret never reaches the client."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest
from conftest import FakeClock, Gate, call, finish, open_client

from server.config import Settings
from server.output import OutputLog
from server.redact import Redactor

pytestmark = pytest.mark.anyio

SECRET = "ghp_" + "e" * 12 + "dg3s" * 6  # 40 characters
REDACTOR = Redactor([SECRET])


def hidden(data: bytes) -> bool:
    """Bytes that are all mask: `[redacted]` padded with `*`, or `*` alone."""
    n = len(data)
    return n > 0 and data == (b"*" * n if n < 10 else b"[redacted" + b"*" * (n - 10) + b"]")


def test_a_half_written_secret_at_the_live_end_is_held_back(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "t.log", 1 << 20)
    log.write(b"building\n" + SECRET[:25].encode())
    chunk = REDACTOR.chunk(log, log.read(0, 4096), live=True)
    assert chunk.data == b"building\n" and chunk.next_offset == 9 and chunk.truncated
    log.write(SECRET[25:].encode() + b"\ndone\n")
    rest = REDACTOR.chunk(log, log.read(chunk.next_offset, 4096), live=True)
    assert SECRET[:4].encode() not in rest.data and rest.data.endswith(b"]\ndone\n")
    assert len(rest.data) == len(SECRET) + len("\ndone\n")  # masks keep offsets true


def test_a_partial_secret_at_a_final_end_is_masked(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "t.log", 1 << 20)
    log.write(b"exit\n" + SECRET[:25].encode())
    chunk = REDACTOR.chunk(log, log.read(0, 4096), live=False)
    assert chunk.next_offset == chunk.total_bytes and len(chunk.data) == 5 + 25
    assert chunk.data.startswith(b"exit\n") and hidden(chunk.data[5:])


def test_secrets_straddling_the_dropped_range_are_masked_on_both_sides(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "t.log", 2048)  # head 1024 bytes, tail 1024 bytes, middle dropped
    log.write(b"a" * 1014 + SECRET.encode() + b"c" * 500 + SECRET.encode() + b"d" * 994)
    head = log.read(0, 4096)
    assert head.dropped is not None and head.offset + len(head.data) == head.dropped[0]
    assert head.data.endswith(SECRET[:10].encode())  # the edge cuts the first secret...
    masked = REDACTOR.chunk(log, head, live=False)
    assert masked.data[:1014] == b"a" * 1014 and hidden(masked.data[1014:])  # ...and none of it is returned
    tail = log.read(head.next_offset, 4096)
    assert tail.offset == head.dropped[1] and tail.data.startswith(SECRET[10:].encode())
    masked = REDACTOR.chunk(log, tail, live=True)
    assert hidden(masked.data[:30]) and masked.data[30:] == b"d" * 994


async def test_a_running_commands_half_written_secret_never_reaches_the_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: FakeClock, gate: Gate
) -> None:
    monkeypatch.setenv("GITHUB_TOKEN", SECRET)
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    half = tmp_path / "half"
    half.write_text(SECRET[:30])
    rest = tmp_path / "rest"
    rest.write_text(SECRET[30:] + "\n")
    async with open_client(Settings(data_dir=tmp_path / "data"), clock, gate) as (_, client):
        command = f"echo start; cat {half}; read x < {fifo}; cat {rest}"
        task = (await call(client, "run_shell_background", command=command))["task_id"]
        with anyio.fail_after(10):
            while True:  # the output grows by the command's own writes; a bounded wait on them
                view = await call(client, "get_cached_output", task_id=task)
                if view["output"]["total_bytes"] == len("start\n") + 30:
                    break
                await anyio.sleep(0.02)
        assert view["output"]["text"] == "start\n" and view["output"]["next_offset"] == 6
        with open(fifo, "w") as release:  # the command is blocked reading it: this open returns at once
            release.write("go\n")
        done = await finish(client, task)
        assert SECRET[:4] not in done["output"]["text"] and "[redacted" in done["output"]["text"]
