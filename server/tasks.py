"""The task record, the runtime handle the executor keeps beside it, and the immutable views the MCP
tools return. How a record is stored is the store's business (`server/store.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

import anyio
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from server.output import Chunk, Output
from tools.context import ErrorKind as ErrorKind
from tools.context import Orphan, ProcessInfo, Stdin
from tools.registry import ToolSpec
from tools.shell import interaction_of


class Status(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (Status.COMPLETED, Status.FAILED, Status.CANCELLED)


def error_kind(value: object) -> ErrorKind | str:
    """A stored or tool-given kind: ours as the enum; a plugin's own kind (a plain word) kept as it is, so
    the model still reads what the plugin meant; anything else (None, an object) reads as `exception`."""
    if isinstance(value, ErrorKind):
        return value
    if isinstance(value, str) and value:
        try:
            return ErrorKind(value)
        except ValueError:
            return value[:64]
    return ErrorKind.EXCEPTION


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---- views (what the MCP tools return; their JSON schemas are the tools' output schemas) ----


class _View(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True)


Kind = Annotated[ErrorKind | str, Field(union_mode="left_to_right"), WithJsonSchema({"type": "string"})]
"""One of `ErrorKind`, or a plugin's own kind. Listed in the README, not in every tool's output schema:
tools/list bytes are paid in every conversation."""


ViewStatus = Annotated[Status, WithJsonSchema({"type": "string"})]
"""A status in a reply: one of `Status` (listed in list_tasks' input schema and the README, not in every
reply's schema)."""


class TaskError(_View):
    kind: Kind
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
    line_offsets: Annotated[list[int] | None, WithJsonSchema({"type": ["array", "null"]})] = None
    """With `filter`: where each returned line starts."""


class TaskView(_View):
    task_id: str
    tool: str
    status: ViewStatus
    result: dict[str, Any] | None = None
    error: TaskError | None = None
    output: OutputView | None = None
    pid: int | None = None
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    expires_at: str | None = None
    interactive: Annotated[dict[str, Any] | None, WithJsonSchema({"type": ["object", "null"]})] = None
    """Only for a command fired with stdin "pipe", pty or ready_when (see `Task.interactive`)."""


class TaskSummary(_View):
    task_id: str
    tool: str
    status: ViewStatus
    error_kind: Annotated[
        ErrorKind | str | None, Field(union_mode="left_to_right"), WithJsonSchema({"type": ["string", "null"]})
    ] = None
    created_at: str
    finished_at: str | None = None


_SAME_AS_GET = "a task view, as get_cached_output returns"


class FireReply(_View):
    task_id: str
    resource: str
    tool: str
    status: ViewStatus
    cached: bool
    deduplicated: bool
    task: Annotated[
        TaskView | None, WithJsonSchema({"type": ["object", "null"], "description": f"If finished: {_SAME_AS_GET}"})
    ] = None


class CancelledView(TaskView):
    """cancel_task's reply: a task view whose schema points at get_cached_output's instead of repeating it
    (tools/list bytes are paid in every conversation)."""

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> dict[str, Any]:
        return {"type": "object", "description": _SAME_AS_GET}


class ShellReply(_View):
    task_id: str
    resource: str
    pid: int | None
    status: ViewStatus


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


@dataclass(eq=False, slots=True)
class Handle:
    """What only the running server has of a task: its cancel scope and the events waiters wait on."""

    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    cancel_reason: ErrorKind | None = None
    done: anyio.Event = field(default_factory=anyio.Event)
    started: anyio.Event = field(default_factory=anyio.Event)
    """Set once the task has a pid, or has finished without one."""
    queued: anyio.Event = field(default_factory=anyio.Event)
    """Set when the task has to wait for a concurrency limit (it stays `queued` meanwhile)."""
    listeners: set[anyio.Event] = field(default_factory=set)
    """Set (each) whenever the task changes: what a `poll_output` waits on."""
    released: anyio.Event = field(default_factory=anyio.Event)
    """Set when this server stops running the task: finished, or left running on purpose."""
    stdin: Stdin | None = None
    """The command's open input (`send_input`), held in memory only: it goes with the server."""
    output_listeners: set[anyio.Event] = field(default_factory=set)
    """Set (each) whenever output arrives: what `poll_output(wait_for=...)` waits on."""
    screen: object = None
    input_offset: int | None = None
    """The output's size when `send_input` last wrote: `wait_for` looks from there."""
    watched_to: int = 0
    """The end of the last line a `wait_for` matched: the next one looks past it."""
    """The terminal emulator the `screen` view keeps fed (server/interactive.py)."""


@dataclass(eq=False, slots=True)
class Task:
    """The record: mutable while it runs; only the executor writes it (and commits each change)."""

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
    queue: str | None = None
    """The worker queue it was fired to (distributed mode's `target`); None: the default."""
    local: bool = True
    """Run by this server process; False for a task another server on the same data dir runs."""
    holder: str | None = None
    """Who ran it before this process claimed it (a server or worker taken for dead): named in its error."""
    handle: Handle = field(default_factory=Handle)
    ready_at: float | None = None
    """When the output first matched `ready_when` (this server's memory: not stored)."""

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
            interactive=self.interactive(),
        )

    def interactive(self) -> dict[str, Any] | None:
        """Its input (`open`, `closed`, or `elsewhere`: held by another server, or by one that stopped) and
        readiness; known while this server holds the record it fired (a stored record has no arguments)."""
        talks = interaction_of(self.arguments)
        if talks is None or not (talks.keeps_input or talks.ready_when):
            return None
        shown: dict[str, Any] = {}
        if talks.keeps_input:
            stdin = self.handle.stdin
            held = "open" if stdin is not None and stdin.open else "closed"
            shown["input"] = "pty" if talks.pty else "pipe"
            shown["stdin"] = held if self.local or self.status.finished else "elsewhere"
        if talks.ready_when:
            shown["ready"] = self.ready_at is not None
            if self.ready_at is not None:
                shown["ready_at"] = iso(self.ready_at)
        return shown

    def orphan(self) -> Orphan:
        return Orphan(self.process, self.watcher, self.detached, self.started_at or self.created_at)


def task_uri(task_id: str) -> str:
    """The task as an MCP resource: read it for its view, subscribe to it to hear when it changes."""
    return f"task://{task_id}"


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
