"""What a running tool may use, and how it reports a failure.

`tools/` never imports `server/`: the executor hands each handler a `ToolContext`
built from plain callables, so a tool can be tested or reused without the server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

JSON = dict[str, Any]


class TaskFailure(Exception):
    """Raised by a tool to fail its task with an `error.kind` the model can act on.

    `result` keeps what is known anyway (a shell command's exit code, say), so a failed
    task still reports it.
    """

    def __init__(self, kind: str, message: str, result: JSON | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.result = result


class LeftRunning(Exception):
    """Raised by a tool whose work deliberately outlives this server (a detached command at
    shutdown): the task stays `running` in the store, to be followed again after a restart."""


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """Enough to find a process group again after a restart, and never hit a recycled pid."""

    pid: int
    """Also the process group id: every command leads its own session."""
    start_ticks: int | None
    """Start time in clock ticks since boot (/proc/PID/stat field 22); None where unknown."""
    boot_id: str | None


@dataclass(frozen=True, slots=True)
class ToolContext:
    """The running task's handle on the outside world."""

    task_id: str
    write_output: Callable[[bytes], None]
    """Appends bytes to the task's output log (absolute offsets, bounded by the server)."""
    set_process: Callable[[ProcessInfo], None]
    """Records the process group the task started (committed before the handler goes on)."""
    use_output_file: Callable[[], None]
    """Says the task's output is written straight to `output_path` by its process (detached)."""
    output_path: Path
    exit_path: Path
    """Where a command's wrapper records its exit status, for recovery after a crash."""
    kill_grace_s: float
    """How long a cancelled process group gets between TERM and KILL."""
    shutting_down: Callable[[], bool]
    """True when the task is being cancelled because the server is stopping."""
    output_turns: anyio.CapacityLimiter
    """Shared by every task's output copying, so a flood of output cannot crowd the protocol
    out of the event loop: each loop pass does a bounded amount of it."""
    owner: str = ""
    """Whose task this is: the shell picks that owner's policy and sandbox ("" is the default owner)."""
