"""The task record the executor keeps, and the immutable views the MCP tools return."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import anyio
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from server.output import Chunk, Output, OutputLog, StoredLog
from tools.context import Orphan, ProcessInfo
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
    """Every `error.kind` a task can carry, from the engine or from a tool (`TaskFailure.kind`)."""

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
    resource: str
    tool: str
    status: Status
    cached: bool
    deduplicated: bool
    task: Annotated[
        TaskView | None, WithJsonSchema({"type": ["object", "null"], "description": f"If finished: {_SAME_AS_GET}"})
    ] = None


class ShellReply(_View):
    task_id: str
    resource: str
    pid: int | None
    status: Status


class UnknownTask(_View):
    task_id: str
    message: str


class PollReply(_View):
    done: Annotated[
        list[TaskView], WithJsonSchema({"type": "array", "items": {"type": "object"}, "description": _SAME_AS_GET})
    ]
    pending: list[str]
    unknown: Annotated[
        list[UnknownTask],
        WithJsonSchema({"type": "array", "items": {"type": "object"}, "description": "ids not known: why, each"}),
    ] = []
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

Row = Mapping[str, Any] | sqlite3.Row


@dataclass(eq=False, slots=True)
class Task:
    """Mutable while it runs; only the executor writes it (and commits each change to the store)."""

    id: str
    tool: str
    owner: str
    created_at: float
    ttl_s: float
    output: Output
    spec: ToolSpec | None = None
    """None for a task read back from the store whose tool is no longer configured."""
    arguments: BaseModel | None = None
    timeout_s: float | None = None
    time_left_s: float | None = None
    """The deadline this run enforces: `timeout_s` when fired; less, or none, when followed after a restart."""
    cache_key: str | None = None
    status: Status = Status.QUEUED
    started_at: float | None = None
    finished_at: float | None = None
    result: dict[str, Any] | None = None
    error: TaskError | None = None
    process: ProcessInfo | None = None
    watcher: ProcessInfo | None = None
    """The capture process of a detached command (what a restart follows)."""
    detached: bool = False
    local: bool = True
    """Run by this server process; False for a task another server on the same data dir runs."""
    cancel_reason: ErrorKind | None = None
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    done: anyio.Event = field(default_factory=anyio.Event)
    started: anyio.Event = field(default_factory=anyio.Event)
    """Set once the task has a pid, or has finished without one."""
    queued: anyio.Event = field(default_factory=anyio.Event)
    """Set when the task has to wait for a concurrency limit (it stays `queued` meanwhile)."""
    listeners: set[anyio.Event] = field(default_factory=set)
    released: anyio.Event = field(default_factory=anyio.Event)
    """Set when this server stops running the task: finished, or left running on purpose."""

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

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

    def row(self, instance: str) -> dict[str, Any]:
        """Every column the store keeps, as of now."""
        process = self.process
        return {
            "id": self.id,
            "owner": self.owner,
            "tool": self.tool,
            "arguments": "{}" if self.arguments is None else self.arguments.model_dump_json(by_alias=True),
            "instance": instance,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "ttl_s": self.ttl_s,
            "timeout_s": self.timeout_s,
            "cache_key": self.cache_key,
            "pid": None if process is None else process.pid,
            "start_ticks": None if process is None else process.start_ticks,
            "boot_id": None if process is None else process.boot_id,
            "detached": int(self.detached),
            **self.final_columns(),
        }

    def final_columns(self) -> dict[str, Any]:
        """What changes when a task finishes: its outcome and how much output it wrote."""
        return {
            "status": self.status.value,
            "finished_at": self.finished_at,
            "expires_at": self.expires_at,
            "result": None if self.result is None else json.dumps(self.result, separators=(",", ":")),
            "error_kind": None if self.error is None else self.error.kind,
            "error_message": None if self.error is None else self.error.message,
            "output_total": self.output.total_bytes,
        }

    def orphan(self) -> Orphan:
        return Orphan(self.process, self.watcher, self.detached, self.started_at or self.created_at)

    @classmethod
    def from_row(cls, row: Row, output_path: Path, spec: ToolSpec | None, local: bool) -> Task:
        if row["output_inline"] is not None and not output_path.exists():
            _write_inline(output_path, row["output_inline"])  # a small output Offload 0.1 kept in its row
        error = None if row["error_kind"] is None else TaskError(kind=row["error_kind"], message=row["error_message"])
        return cls(
            id=row["id"],
            tool=row["tool"],
            owner=row["owner"],
            created_at=row["created_at"],
            ttl_s=row["ttl_s"],
            output=StoredLog(output_path),
            spec=spec,
            timeout_s=row["timeout_s"],
            time_left_s=row["timeout_s"],
            cache_key=row["cache_key"],
            status=Status(row["status"]),
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            result=None if row["result"] is None else json.loads(row["result"]),
            error=error,
            process=_process(row["pid"], row["start_ticks"], row["boot_id"]),
            watcher=_process(row["watcher_pid"], row["watcher_ticks"], row["boot_id"]),
            detached=bool(row["detached"]),
            local=local,
        )


def _process(pid: int | None, ticks: int | None, boot_id: str | None) -> ProcessInfo | None:
    return None if pid is None else ProcessInfo(pid, ticks, boot_id)


def _write_inline(path: Path, data: bytes) -> None:
    log = OutputLog(path, max(len(data), 2) * 2)
    log.write(data)
    log.finish()


def task_uri(task_id: str) -> str:
    """The task as an MCP resource: read it for its view, subscribe to it to hear when it changes."""
    return f"task://{task_id}"


def summary_of(row: Row) -> TaskSummary:
    return TaskSummary(
        task_id=row["id"],
        tool=row["tool"],
        status=Status(row["status"]),
        error_kind=row["error_kind"],
        created_at=iso(row["created_at"]) or "",
        finished_at=iso(row["finished_at"]),
    )


def output_view(chunk: Chunk) -> OutputView:
    dropped = None
    if chunk.dropped is not None:
        dropped = DroppedRange.model_validate({"from": chunk.dropped[0], "to": chunk.dropped[1]})
    return OutputView(
        text=chunk.data.decode("utf-8", errors="replace"),
        offset=chunk.offset,
        next_offset=chunk.next_offset,
        total_bytes=chunk.total_bytes,
        truncated=chunk.truncated,
        dropped=dropped,
    )
