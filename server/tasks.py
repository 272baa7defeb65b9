"""The task record the executor keeps, and the immutable views the MCP tools return."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

import anyio
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from server.output import Chunk, OutputLog
from tools.registry import ToolSpec


class Status(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (Status.COMPLETED, Status.FAILED, Status.CANCELLED)


class ErrorKind(StrEnum):
    TIMEOUT = "timeout"
    EXIT_STATUS = "exit_status"
    EXCEPTION = "exception"
    INVALID_ARGUMENTS = "invalid_arguments"
    INTERRUPTED = "interrupted"
    SHUTDOWN = "shutdown"
    CANCELLED_BY_CLIENT = "cancelled_by_client"


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---- views (what the MCP tools return; their JSON schemas are the tools' output schemas) ----


class _View(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True)


class TaskError(_View):
    kind: str
    message: str


class DroppedRange(_View):
    from_: int = Field(alias="from")
    to: int


class OutputView(_View):
    text: str
    offset: int
    next_offset: int
    total_bytes: int
    truncated: bool
    dropped: DroppedRange | None = None


class TaskView(_View):
    task_id: str
    tool: str
    status: Status
    result: dict[str, Any] | None = None
    error: TaskError | None = None
    output: OutputView | None = None
    pid: int | None = None
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    expires_at: str | None = None


class TaskSummary(_View):
    task_id: str
    tool: str
    status: Status
    error_kind: str | None = None
    created_at: str
    finished_at: str | None = None


_SAME_AS_GET = "a task view, as get_cached_output returns"


class FireReply(_View):
    task_id: str
    tool: str
    status: Status
    cached: bool
    deduplicated: bool
    task: Annotated[
        TaskView | None, WithJsonSchema({"type": ["object", "null"], "description": f"If finished: {_SAME_AS_GET}"})
    ] = None


class ShellReply(_View):
    task_id: str
    pid: int | None
    status: Status


class PollReply(_View):
    done: Annotated[
        list[TaskView], WithJsonSchema({"type": "array", "items": {"type": "object"}, "description": _SAME_AS_GET})
    ]
    pending: list[str]
    timed_out: bool


class TaskList(_View):
    tasks: list[TaskSummary]


class FireableTool(_View):
    name: str
    description: str
    input_schema: dict[str, Any]
    flags: list[str]
    default_timeout_s: float | None = None
    note: str | None = None


class Catalog(_View):
    tools: list[FireableTool]


# ---- the record ----


@dataclass(eq=False, slots=True)
class Task:
    """Mutable while it runs; only the executor writes it."""

    id: str
    spec: ToolSpec
    arguments: BaseModel
    owner: str
    created_at: float
    timeout_s: float | None
    ttl_s: float
    output: OutputLog
    cache_key: str | None = None
    status: Status = Status.QUEUED
    started_at: float | None = None
    finished_at: float | None = None
    result: dict[str, Any] | None = None
    error: TaskError | None = None
    pid: int | None = None
    cancel_reason: ErrorKind | None = None
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    done: anyio.Event = field(default_factory=anyio.Event)
    started: anyio.Event = field(default_factory=anyio.Event)
    """Set once the task has a pid, or has left `queued` without one."""
    listeners: set[anyio.Event] = field(default_factory=set)

    @property
    def tool(self) -> str:
        return self.spec.name

    @property
    def expires_at(self) -> float | None:
        return None if self.finished_at is None else self.finished_at + self.ttl_s

    def view(self, chunk: Chunk | None = None) -> TaskView:
        return TaskView(
            task_id=self.id,
            tool=self.tool,
            status=self.status,
            result=self.result,
            error=self.error,
            output=None if chunk is None else output_view(chunk),
            pid=self.pid,
            created_at=iso(self.created_at) or "",
            started_at=iso(self.started_at),
            finished_at=iso(self.finished_at),
            expires_at=iso(self.expires_at),
        )

    def summary(self) -> TaskSummary:
        return TaskSummary(
            task_id=self.id,
            tool=self.tool,
            status=self.status,
            error_kind=None if self.error is None else self.error.kind,
            created_at=iso(self.created_at) or "",
            finished_at=iso(self.finished_at),
        )


def output_view(chunk: Chunk) -> OutputView:
    dropped = (
        None
        if chunk.dropped is None
        else DroppedRange.model_validate({"from": chunk.dropped[0], "to": chunk.dropped[1]})
    )
    return OutputView(
        text=chunk.data.decode("utf-8", errors="replace"),
        offset=chunk.offset,
        next_offset=chunk.next_offset,
        total_bytes=chunk.total_bytes,
        truncated=chunk.truncated,
        dropped=dropped,
    )
