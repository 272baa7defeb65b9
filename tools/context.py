"""What a running tool may use, and how it reports a failure.

`tools/` never imports `server/`: the executor hands each handler a `ToolContext`
built from plain callables, so a tool can be tested or reused without the server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True, slots=True)
class ToolContext:
    """The running task's handle on the outside world."""

    task_id: str
    write_output: Callable[[bytes], None]
    """Appends bytes to the task's output log (absolute offsets, bounded by the server)."""
    set_pid: Callable[[int], None]
    """Records the pid (and process group) of a process the task started."""
    kill_grace_s: float
    """How long a cancelled process group gets between TERM and KILL."""
