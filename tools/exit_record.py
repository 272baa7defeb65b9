"""How a command's exit status outlives the server: its capture process records it as JSON beside the
output (`write`, atomically), and whoever follows the task next reads it (`read`): the server that
watched it, or the one that settles it after a crash. `outcome` turns a status into a task result."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

from tools.context import JSON, ErrorKind, TaskFailure
from tools.process import signal_name


def write(path: Path, record: Mapping[str, object]) -> None:
    """Atomic: a reader sees the whole record or none, even if the writer is killed midway."""
    partial = path.with_suffix(".exit-partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps(record).encode())
    finally:
        os.close(fd)
    os.replace(partial, path)


def read(path: Path) -> JSON | None:
    """What a capture process recorded, or None if the command never finished under it."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return None
    if isinstance(record, int):  # Offload 0.1 wrote the bare exit status
        return {"exit_code": record}
    return record if isinstance(record, dict) else None


def outcome_from(exit_path: Path, started_wall_s: float | None) -> JSON:
    """The result of a detached command, from its capture process's record."""
    record = read(exit_path)
    if record is None:
        raise TaskFailure(
            ErrorKind.INTERRUPTED,
            "the command's capture process ended without recording how the command ended; what was left of "
            "the command was ended",
        )
    duration_s = record.get("duration_s")
    if duration_s is None and started_wall_s is not None:
        with contextlib.suppress(OSError):
            duration_s = max(exit_path.stat().st_mtime - started_wall_s, 0.0)
    signum = record.get("signal")
    returncode = -int(signum) if signum else int(record.get("exit_code", 0))
    return outcome(returncode, float(duration_s or 0.0), int(record.get("output_bytes", 0)))


def outcome(returncode: int | None, duration_s: float, output_bytes: int) -> JSON:
    """exit_code for an exit; signal and signal_name for a death by signal, real-time ones included."""
    code = returncode if returncode is not None and returncode >= 0 else None
    signum = -returncode if returncode is not None and returncode < 0 else None
    result: JSON = {
        "exit_code": code,
        "signal": signum,
        "signal_name": None if signum is None else signal_name(signum),
        "duration_s": round(duration_s, 3),
        "output_bytes": output_bytes,
    }
    if code == 0:
        return result
    readable = f"its {output_bytes} bytes of output are readable" if output_bytes else "it wrote no output"
    if signum is not None:
        raise TaskFailure(
            ErrorKind.SIGNAL, f"command was killed by {result['signal_name']} (signal {signum}); {readable}", result
        )
    raise TaskFailure(ErrorKind.EXIT_STATUS, f"command exited with code {code}; {readable}", result)
