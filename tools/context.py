"""What a running tool may use, and how it reports a failure.

`tools/` never imports `server/`: the executor hands each handler a `ToolContext`
built from plain callables, so a tool can be tested or reused without the server.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, Protocol

import anyio

JSON = dict[str, Any]


class ErrorKind(StrEnum):
    """Every `error.kind` a task can carry, from the engine or from a tool: one list, so a client can
    branch on them and a reviewer can see them all. Defined here because `tools/` never imports `server/`."""

    TIMEOUT = "timeout"
    EXIT_STATUS = "exit_status"
    SIGNAL = "signal"
    EXCEPTION = "exception"
    INVALID_ARGUMENTS = "invalid_arguments"
    REFUSED = "refused"
    INTERRUPTED = "interrupted"
    SHUTDOWN = "shutdown"
    CANCELLED_BY_CLIENT = "cancelled_by_client"
    HTTP_STATUS = "http_status"
    RATE_LIMITED = "rate_limited"
    AUTH = "auth"
    NOT_FOUND = "not_found"
    CONNECTION = "connection"
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_EXITED = "upstream_exited"


class TaskFailure(Exception):
    """Raised by a tool to fail its task with an `error.kind` the model can act on.

    `result` keeps what is known anyway (a shell command's exit code, say), so a failed
    task still reports it.
    """

    def __init__(self, kind: ErrorKind | str, message: str, result: JSON | None = None) -> None:
        """`kind`: one of `ErrorKind`; a plugin may use a word of its own, which is kept as it is."""
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.result = result


class LeftRunning(Exception):
    """Raised by a tool whose work deliberately outlives this server (a detached command at
    shutdown): the task stays `running` in the store, to be followed again after a restart."""


class InputClosed(Exception):
    """Raised by a `Stdin` that can take no more input (the command closed it, exited, or was sent EOF)."""


class Stdin(Protocol):
    """A running command's input, kept open for `send_input` (`stdin: "pipe"`, or a terminal with `pty`)."""

    kind: Literal["pipe", "pty"]

    @property
    def open(self) -> bool: ...

    async def send(self, data: bytes, eof: bool) -> None:
        """Writes all of `data`; `eof` closes a pipe, or sends Ctrl-D to a terminal. Raises `InputClosed`."""


def _no_input(_stdin: Stdin | None) -> None:
    """A task run where nobody can send it input (a worker in distributed mode) keeps none."""


def _not_told() -> None:
    """Readiness nobody listens for."""


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """Enough to find a process group again after a restart, and never hit a recycled pid."""

    pid: int
    """Also the process group id: every command leads its own session."""
    start_ticks: int | None
    """Start time in clock ticks since boot (/proc/PID/stat field 22), or, when `boot_id` starts with
    "psutil:", psutil's create time in microseconds since the epoch; None where unknown."""
    boot_id: str | None
    """/proc's boot id, or "psutil:" + the boot time in epoch seconds (tools/process.py)."""


@dataclass(frozen=True, slots=True)
class Orphan:
    """What is known of a task whose server died while it ran: enough to find its processes."""

    process: ProcessInfo | None
    watcher: ProcessInfo | None
    """The capture process of a detached command."""
    detached: bool
    started_wall_s: float


@dataclass(frozen=True, slots=True)
class ToolContext:
    """The running task's handle on the outside world."""

    task_id: str
    write_output: Callable[[bytes], None]
    """Appends bytes to the task's output log: stored (absolute offsets, bounded) before it returns."""
    output_bytes: Callable[[], int]
    """Bytes of output so far, dropped ones included: what `output_bytes` in a result reports."""
    set_process: Callable[[ProcessInfo], None]
    """Records the process group the task started (committed before the handler goes on)."""
    set_watcher: Callable[[ProcessInfo], None]
    """Records the capture process that parents a detached command (what a restart follows)."""
    output_path: Path
    exit_path: Path
    """Where a detached command's capture process records its exit status."""
    capture_argv: Sequence[str]
    """The program that runs a detached command, writing its output to `output_path` in the
    server's log format and its exit status to `exit_path` (see `server/capture.py`)."""
    kill_grace_s: float
    """How long a cancelled process group gets between TERM and KILL."""
    shutting_down: Callable[[], bool]
    """True when the task is being cancelled because the server is stopping."""
    copy_turns: anyio.CapacityLimiter
    """Shared by every task's output copying, held while a chunk in hand is stored (never while
    waiting for one): each loop pass copies a bounded amount, so the protocol keeps its turns."""
    owner: str = ""
    """Whose task this is: the shell picks that owner's policy and sandbox ("" is the default owner)."""
    set_input: Callable[[Stdin | None], None] = _no_input
    """Hands the server the command's open input (None once it is gone), for `send_input`."""
    set_ready: Callable[[], None] = _not_told
    """The command printed what `ready_when` waits for: the task is ready (and keeps running)."""
