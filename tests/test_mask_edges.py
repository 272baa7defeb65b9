"""Masking at the edges (issue 12, item 8): a running command's half-written secret never reaches the client
(the live end is held back, whatever it holds), whole secrets are masked wherever they are, and what comes
back never tells whether a printed guess begins a secret."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest
from conftest import FakeClock, Gate, call, finish, open_client

from server.config import Settings
from server.output import OutputLog
from server.redact import Redactor, mask_url, url_secrets

pytestmark = pytest.mark.anyio

SECRET = "ghp_" + "e" * 12 + "dg3s" * 6  # 40 characters
REDACTOR = Redactor([SECRET])


def hidden(data: bytes) -> bool:
    """Bytes that are all mask: `[redacted]` padded with `*`, or `*` alone."""
    n = len(data)
    return n > 0 and data == (b"*" * n if n < 10 else b"[redacted" + b"*" * (n - 10) + b"]")


def test_the_live_end_is_held_back_whatever_it_holds(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "t.log", 1 << 20)
    log.write(b"building\n" * 10 + SECRET[:25].encode())
    chunk = REDACTOR.chunk(log, log.read(0, 4096), live=True)
    assert SECRET[:4].encode() not in chunk.data
    assert chunk.next_offset == chunk.total_bytes - REDACTOR.margin and chunk.truncated
    log.write(SECRET[25:].encode() + b"\ndone\n")
    log.finish()
    rest = REDACTOR.chunk(log, log.read(chunk.next_offset, 4096), live=False)
    assert SECRET[:4].encode() not in rest.data and rest.data.endswith(b"]\ndone\n")
    assert rest.next_offset == rest.total_bytes  # masks keep offsets true


@pytest.mark.parametrize("live", [True, False])
def test_masking_answers_no_guesses(tmp_path: Path, live: bool) -> None:
    """A command printing guesses learns nothing from what comes back: a true prefix of the secret and
    a wrong one of the same length read alike (apart from the guess itself)."""
    seen = []
    for guess in (SECRET[:12], SECRET[:11] + "X", SECRET[:30], SECRET[:29] + "X"):
        log = OutputLog(tmp_path / f"{guess}.log", 1 << 20)
        log.write(b"hello " * 20 + guess.encode())
        chunk = REDACTOR.chunk(log, log.read(0, 4096), live=live)
        seen.append((len(guess), chunk.next_offset, len(chunk.data), chunk.data[: len(chunk.data) - len(guess)]))
    assert seen[0] == seen[1] and seen[2] == seen[3]


def test_whole_secrets_are_masked_on_both_sides_of_the_dropped_range(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "t.log", 2048)  # head 1024 bytes, tail 1024 bytes, middle dropped
    log.write(b"a" * 900 + SECRET.encode() + b"b" * 500 + SECRET.encode() + b"d" * 900)
    log.finish()
    head = REDACTOR.chunk(log, log.read(0, 4096), live=False)
    assert head.dropped is not None and SECRET.encode() not in head.data and hidden(head.data[900:940])
    tail = REDACTOR.chunk(log, log.read(head.next_offset, 4096), live=False)
    assert SECRET.encode() not in tail.data and tail.data.endswith(b"]" + b"d" * 900)


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
        with anyio.fail_after(10):  # printed is not yet captured: each round trip gives the server a turn
            while (view := await call(client, "get_cached_output", task_id=task))["output"]["total_bytes"] < 36:
                pass
        assert SECRET[:4] not in view["output"]["text"] and view["output"]["next_offset"] == 0  # all held back
        with open(fifo, "w") as release:  # the command is blocked reading it: this open returns at once
            release.write("go\n")
        done = await finish(client, task)
        assert SECRET[:4] not in done["output"]["text"] and "[redacted" in done["output"]["text"]


@pytest.mark.parametrize(
    ("url", "masked", "secrets"),
    [
        ("redis://:s3cret@h:6379/0", "redis://***@h:6379/0", ["s3cret"]),
        ("redis://h:6379/0?password=S3cret&db=1", "redis://h:6379/0?password=***&db=1", ["S3cret"]),
        ("redis://:s3cr#et@h:6379/0", "redis://***@h:6379/0", ["s3cr#et"]),  # unencoded: urlsplit stops at #
        ("redis://:a/b?c1@h:1/0?ssl_password=KEYPASS", "redis://***@h:1/0?ssl_password=***", ["a/b?c1", "KEYPASS"]),
        ("redis://:p%40ss@h/0", "redis://***@h/0", ["p%40ss", "p@ss"]),
        ("redis://h/0", "redis://h/0", []),
    ],
)
def test_a_redis_url_never_shows_its_secrets_however_they_are_written(
    url: str, masked: str, secrets: list[str]
) -> None:
    """Found by review: `?password=`, an unencoded `#`, `/` or `?` in the password, and `ssl_password=`
    (all read by redis-py) went into messages and logs as typed."""
    assert mask_url(url) == masked
    assert url_secrets(url) == secrets
