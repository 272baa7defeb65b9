"""`python -m server.capture`: the parent of a detached command, which outlives the server.

A detached command must keep running, keep its output bounded and readable, and leave a
truthful exit status when no server is watching. So it runs under this small process, in its
own session: it reads the command's output into the task's log (the same format and caps as
an attached command's), waits for the command as its parent (so a death by signal is seen as
one), ends what the command leaves behind (its group, and orphans handed to this subreaper),
then writes the exit record. The server follows this process, not the command.

Protocol with the server: argv `--log PATH --exit PATH --file-max N --grace S [--stdin PATH]
-- ARGV...`; the command's pid as one line on stdout, which is then closed; the record as JSON
(`exit_code` or `signal`, `duration_s`, `output_bytes`) written atomically once the log is final.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from server.output import OutputLog
from tools import exit_record
from tools.process import (
    TASK_MARKER,
    become_subreaper,
    exit_notice,
    force_portable,
    group_alive,
    leftovers,
    signal_group,
)

READ_CHUNK_BYTES = 64 * 1024
DRAIN_AFTER_EXIT_S = 0.5


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.capture")
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--exit", type=Path, required=True)
    parser.add_argument("--file-max", type=int, required=True)
    parser.add_argument("--grace", type=float, required=True)
    parser.add_argument("--stdin", type=Path)
    parser.add_argument("--portable", action="store_true", help="the portable process core (no pidfd, no /proc)")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if args.portable:
        force_portable()
    become_subreaper()
    started = time.monotonic()
    log = OutputLog(args.log, args.file_max)
    read_fd, write_fd = os.pipe()
    with contextlib.ExitStack() as files:
        stdin = files.enter_context(open(args.stdin, "rb")) if args.stdin else subprocess.DEVNULL
        child = subprocess.Popen(command, stdin=stdin, stdout=write_fd, stderr=write_fd, start_new_session=True)
    os.close(write_fd)
    _announce(child.pid)
    status = _capture(child, read_fd, log, args.grace)
    log.finish()
    record = {**status, "duration_s": round(time.monotonic() - started, 3), "output_bytes": log.total_bytes}
    exit_record.write(args.exit, record)
    return 0


def _announce(pid: int) -> None:
    """Tells the server the command's pid, then lets go of the server's pipe for good."""
    with contextlib.suppress(OSError):
        os.write(1, f"{pid}\n".encode())
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)


def _capture(child: subprocess.Popen[bytes], read_fd: int, log: OutputLog, grace_s: float) -> dict[str, int]:
    """Copies output until the command exits and the pipe drains (bounded), then ends the rest."""
    with exit_notice(child) as exited:
        deadline: float | None = None
        open_pipe = True
        while open_pipe:
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0)
            ready, _, _ = select.select([read_fd] + ([exited] if deadline is None else []), [], [], timeout)
            if read_fd in ready:
                open_pipe = _copy(read_fd, log)
            if exited in ready:
                deadline = time.monotonic() + DRAIN_AFTER_EXIT_S
            if not ready and deadline is not None:
                break  # a background child holds the pipe: end it below
        returncode = child.wait()
        _end_leftovers(child.pid, read_fd, log, grace_s)
    return {"signal": -returncode} if returncode < 0 else {"exit_code": returncode}


def _copy(read_fd: int, log: OutputLog) -> bool:
    data = os.read(read_fd, READ_CHUNK_BYTES)
    if not data:
        return False
    log.write(data)
    return True


def _end_leftovers(pgid: int, read_fd: int, log: OutputLog, grace_s: float) -> None:
    """TERM the group and our other children, keep reading through the grace, KILL, drain."""
    targets = _our_children()
    if group_alive(pgid) or targets:
        signal_group(pgid, signal.SIGTERM)
        for pid in targets:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        _read_for(read_fd, log, grace_s, until=lambda: not group_alive(pgid) and not _our_children())
        signal_group(pgid, signal.SIGKILL)
        for pid in _our_children():
            with contextlib.suppress(OSError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)
                os.kill(pid, signal.SIGKILL)
    _read_for(read_fd, log, 0.1, until=lambda: False)
    os.close(read_fd)
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def _read_for(read_fd: int, log: OutputLog, seconds: float, until: Callable[[], bool]) -> None:
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        ready, _, _ = select.select([read_fd], [], [], min(left, 0.02))
        if ready and not _copy(read_fd, log):
            return
        if until():
            return


def _our_children() -> list[int]:
    """What the command left: our children (orphans come to this subreaper), or, with the portable
    core, every process still carrying the task's marker (this one carries it too, and is left out)."""
    return leftovers(os.environ.get(TASK_MARKER))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
