"""The MCP tools Offload serves, as a table: name → input model, annotations, and the Runtime call.

Each input model is the tool's argument schema; `register` turns a row into the function the SDK
wants (its signature made from the model's fields), so a tool is declared once, here.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations
from pydantic import BaseModel, ConfigDict, Field

from server.auth import owner_of_request
from server.client_log import ClientLog, limit_event
from server.errors import RequestError, TooManyTasksError
from server.events import released_after
from server.interactive import InputReply, send_input
from server.runtime import Runtime
from server.tasks import CancelledView, Catalog, FireReply, PollReply, ShellReply, Status, TaskList, TaskView
from tools.shell import ShellArgs

MAX_POLL_IDS = 500
MAX_POLL_TIMEOUT_S = 55.0
"""Clients cut a call off at about 60 s; a poll must answer before that."""

TaskId = Annotated[str, Field(min_length=1, max_length=64, description="Id returned by fire_tool.")]
TimeoutS = Annotated[float | None, Field(gt=0, description="Kill the task after this many seconds.")]


class _Args(BaseModel):
    model_config = ConfigDict(frozen=True)


class FireArgs(_Args):
    tool: Annotated[str, Field(min_length=1, description="Name from list_fireable_tools.")]
    arguments: Annotated[dict[str, Any], Field(description="The tool's arguments.")] = {}
    timeout_s: TimeoutS = None
    ttl_s: Annotated[
        float | None, Field(gt=0, le=7 * 86400, description="Keep the result this long (default 1800).")
    ] = None
    use_cache: Annotated[
        bool, Field(description="Reuse an identical call's result or join it while running (cacheable tools).")
    ] = True
    wait_s: Annotated[
        float, Field(ge=0, le=MAX_POLL_TIMEOUT_S, description="Wait up to this long; a finished task comes back whole.")
    ] = 0


class DistributedFireArgs(FireArgs):
    """fire_tool's arguments when `redis_url` is set: only then is there a queue to pick (and a schema
    byte to pay for it)."""

    target: Annotated[
        str | None, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Worker queue (default any).")
    ] = None


class GetArgs(_Args):
    task_id: TaskId
    offset: Annotated[int, Field(ge=0, description="Byte offset to read from (next_offset of the last read).")] = 0
    max_bytes: Annotated[int, Field(ge=1, le=1024 * 1024, description="Most bytes of output to return.")] = 16384
    tail_bytes: Annotated[int | None, Field(ge=1, description="Return only the last N bytes.")] = None
    filter: Annotated[str | None, Field(description="Regex: only matching lines.")] = None
    screen: Annotated[bool, Field(description="A pty's screen as text.")] = False


class PollArgs(_Args):
    task_ids: Annotated[list[TaskId], Field(min_length=1, max_length=MAX_POLL_IDS)]
    timeout_s: Annotated[float, Field(ge=0, le=MAX_POLL_TIMEOUT_S, description="Most seconds to wait.")] = 20
    return_when: Annotated[Literal["all", "any"], Field(description="Return when all or any are done.")] = "all"
    max_bytes: Annotated[
        int, Field(ge=0, le=1024 * 1024, description="Output budget shared by the returned tasks' tails.")
    ] = 32768
    wait_for: Annotated[str | None, Field(description="Regex: done when output matches (past last match/input).")] = (
        None
    )


class ShellToolArgs(ShellArgs):
    """The shell tool's own arguments (validated again, with its checks, when fired) plus a timeout."""

    timeout_s: TimeoutS = None


class ListArgs(_Args):
    status: Status | None = None
    tool: str | None = None
    limit: Annotated[int, Field(ge=1, le=500)] = 50


class CancelArgs(_Args):
    task_id: TaskId


class InputArgs(_Args):
    """Described by the tool's one line: every byte of tools/list is paid in every conversation."""

    task_id: Annotated[str, Field(min_length=1, max_length=64)]
    text: str
    eof: bool = False


class NoArgs(_Args):
    pass


@dataclass(frozen=True, slots=True)
class Call:
    """One MCP tool call as the table's rows see it."""

    runtime: Runtime
    ctx: Context
    client_log: ClientLog

    @property
    def owner(self) -> str:
        """The bearer token's owner over HTTP, the local owner otherwise."""
        return owner_of_request(self.ctx.request_context.request)


async def _fire(call: Call, args: FireArgs) -> FireReply:
    hold_s = call.runtime.settings.stream_hold_s if args.wait_s > 0 else 0
    with _reporting_limits(call):
        async with released_after(call.ctx, hold_s):
            return await call.runtime.fire(
                args.tool,
                args.arguments,
                timeout_s=args.timeout_s,
                ttl_s=args.ttl_s,
                use_cache=args.use_cache,
                wait_s=args.wait_s,
                target=args.target if isinstance(args, DistributedFireArgs) else None,
                owner=call.owner,
            )


async def _get(call: Call, args: GetArgs) -> TaskView:
    return call.runtime.get_output(
        args.task_id,
        offset=args.offset,
        max_bytes=args.max_bytes,
        tail_bytes=args.tail_bytes,
        owner=call.owner,
        filter=args.filter,
        view="screen" if args.screen else "bytes",
    )


async def _poll(call: Call, args: PollArgs) -> PollReply:
    async def progress(done: int, total: int) -> None:
        await call.ctx.report_progress(done, total, f"{done}/{total} tasks finished")

    async with released_after(call.ctx, call.runtime.settings.stream_hold_s):
        return await call.runtime.poll(
            args.task_ids,
            timeout_s=args.timeout_s,
            return_when=args.return_when,
            max_bytes=args.max_bytes,
            on_progress=progress,
            owner=call.owner,
            wait_for=args.wait_for,
        )


async def _shell(call: Call, args: ShellToolArgs) -> ShellReply:
    arguments = args.model_dump(exclude={"timeout_s"}, exclude_unset=True)
    with _reporting_limits(call):
        return await call.runtime.run_shell(arguments, timeout_s=args.timeout_s, owner=call.owner)


async def _list(call: Call, args: ListArgs) -> TaskList:
    return call.runtime.list_tasks(status=args.status, tool=args.tool, limit=args.limit, owner=call.owner)


async def _cancel(call: Call, args: CancelArgs) -> CancelledView:
    return CancelledView.model_construct(**dict(await call.runtime.cancel(args.task_id, owner=call.owner)))


async def _send_input(call: Call, args: InputArgs) -> InputReply:
    task = call.runtime.task(args.task_id, owner=call.owner)  # another owner's reads as unknown
    return await send_input(task, args.text, args.eof)


async def _catalog(call: Call, _args: NoArgs) -> Catalog:
    return await call.runtime.catalog(owner=call.owner)


@contextmanager
def _reporting_limits(call: Call) -> Iterator[None]:
    """A refusal at the owner's task limit is also a warning in the owner's clients' logs."""
    try:
        yield
    except TooManyTasksError as exc:
        call.client_log.emit(limit_event(call.owner, exc.limit))
        raise


def hints(*, read_only: bool, destructive: bool = False, idempotent: bool, open_world: bool) -> ToolAnnotations:
    """The destructive and idempotent hints only mean something for tools that are not read-only."""
    if read_only:
        return ToolAnnotations(read_only_hint=True, open_world_hint=open_world)
    return ToolAnnotations(
        read_only_hint=False, destructive_hint=destructive, idempotent_hint=idempotent, open_world_hint=open_world
    )


READS = hints(read_only=True, idempotent=True, open_world=False)
STARTS = hints(read_only=False, destructive=True, idempotent=False, open_world=True)


@dataclass(frozen=True, slots=True)
class McpTool:
    name: str
    description: str
    input: type[BaseModel]
    output: type[BaseModel]
    annotations: ToolAnnotations
    call: Callable[[Call, Any], Awaitable[BaseModel]]


TABLE = (
    McpTool(
        "fire_tool",
        "Start a tool in the background and return its task_id at once.",
        FireArgs,
        FireReply,
        STARTS,
        _fire,
    ),
    McpTool(
        "get_cached_output",
        "A task's status, result or error, and output from an offset. Never blocks.",
        GetArgs,
        TaskView,
        READS,
        _get,
    ),
    McpTool(
        "poll_output",
        "Wait for tasks to finish; returns the finished ones whole and the ids still pending.",
        PollArgs,
        PollReply,
        READS,
        _poll,
    ),
    McpTool(
        "run_shell_background",
        "Start a shell command in the background; returns task_id and pid at once.",
        ShellToolArgs,
        ShellReply,
        STARTS,
        _shell,
    ),
    McpTool("list_tasks", "Your tasks, newest first.", ListArgs, TaskList, READS, _list),
    McpTool(
        "cancel_task",
        "Cancel a task: its process group gets TERM, then KILL after a grace period.",
        CancelArgs,
        CancelledView,
        hints(read_only=False, destructive=True, idempotent=True, open_world=False),
        _cancel,
    ),
    McpTool(
        "send_input",
        "Type text into a task's stdin (pipe or pty; \\n is Enter); eof then closes it (pty: ^D).",
        InputArgs,
        InputReply,
        ToolAnnotations(read_only_hint=False, open_world_hint=False),  # destructive, not idempotent: the defaults
        _send_input,
    ),
    McpTool(
        "list_fireable_tools",
        "Tools fire_tool accepts, with their argument schemas and flags.",
        NoArgs,
        Catalog,
        READS,
        _catalog,
    ),
)
OWN_TOOLS = frozenset(tool.name for tool in TABLE)


def register(server: MCPServer, runtime: Runtime, client_log: ClientLog) -> dict[str, type[BaseModel]]:
    """Every tool is `async def`: the SDK runs plain functions in a worker thread, a hop per call. Returns
    each tool's input model: what the server checks for arguments it does not take."""
    inputs: dict[str, type[BaseModel]] = {}
    distributed = runtime.settings.redis_url is not None
    for tool in TABLE:
        if distributed and tool.input is FireArgs:
            tool = replace(tool, input=DistributedFireArgs)  # the same tool, with target
        inputs[tool.name] = tool.input
        server.add_tool(
            _function(tool, runtime, client_log),
            name=tool.name,
            description=tool.description,
            annotations=tool.annotations,
        )
    return inputs


def unknown_arguments(name: str, model: type[BaseModel], arguments: dict[str, Any]) -> str | None:
    """A plain refusal naming arguments a tool does not take (the SDK would drop them silently)."""
    unknown = sorted(set(arguments) - set(model.model_fields))
    if not unknown:
        return None
    takes = ", ".join(model.model_fields) or "none"
    hint = " (target is for distributed mode: set redis_url)" if unknown == ["target"] else ""
    return f"{name} takes no argument {', '.join(map(repr, unknown))}{hint}; its arguments are: {takes}"


def _function(tool: McpTool, runtime: Runtime, client_log: ClientLog) -> Callable[..., Awaitable[BaseModel]]:
    """The SDK reads a tool's schema from its function's signature: this one's is the input model's fields."""

    async def handle(ctx: Context, **arguments: Any) -> BaseModel:
        try:
            return await tool.call(Call(runtime, ctx, client_log), tool.input.model_construct(**arguments))
        except RequestError as exc:
            raise ToolError(runtime.redactor.text(str(exc))) from exc

    parameters = [_parameter(name, field) for name, field in tool.input.model_fields.items()]
    context = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=Context)
    handle.__signature__ = inspect.Signature([*parameters, context], return_annotation=tool.output)  # type: ignore[attr-defined]
    handle.__annotations__ = {p.name: p.annotation for p in [*parameters, context]} | {"return": tool.output}
    handle.__name__ = tool.name
    return handle


def _parameter(name: str, field: Any) -> inspect.Parameter:
    annotated = Annotated[(field.annotation, *field.metadata, Field(description=field.description))]
    default = inspect.Parameter.empty if field.is_required() else field.default
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotated)
