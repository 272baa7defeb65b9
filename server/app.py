"""MCP wiring only: each MCP tool parses its arguments and calls one Runtime method.

Errors the model can correct (`RequestError`) become tool errors with their text intact.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Annotated, Any, Literal

from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.helper_types import ReadResourceContents
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError, UnexpectedToolError
from mcp.shared.exceptions import MCPError
from mcp_types import (
    INVALID_PARAMS,
    CallToolResult,
    CompleteRequestParams,
    CompleteResult,
    EmptyResult,
    InputRequiredResult,
    SetLevelRequestParams,
    SubscribeRequestParams,
    SubscriptionsListenRequestParams,
    ToolAnnotations,
    UnsubscribeRequestParams,
)
from mcp_types import Tool as MCPTool
from pydantic import AnyUrl, Field, ValidationError

from server import __version__
from server.auth import LOCAL_OWNER, owner_of_request
from server.client_log import ClientLog, limit_event
from server.completions import complete
from server.errors import RequestError, TooManyTasksError, invalid_call
from server.events import released_after
from server.notify import RECENT_URI
from server.runtime import Runtime
from server.sdk_compat import connection_of, lowlevel_of
from server.task_extension import TasksExtension
from server.tasks import Catalog, FireReply, PollReply, ShellReply, Status, TaskList, TaskView
from tools.registry import ToolSpec

log = logging.getLogger(__name__)

OWN_TOOLS = frozenset(
    {
        "fire_tool",
        "get_cached_output",
        "poll_output",
        "run_shell_background",
        "list_tasks",
        "cancel_task",
        "list_fireable_tools",
    }
)
TASK_URI = re.compile(r"task://([A-Za-z0-9_-]{1,64})(?:/output)?")
TASK_TAIL_BYTES = 4096
"""Output tail in the `task://{id}` view; the whole output is `task://{id}/output`."""
OUTPUT_RESOURCE_BYTES = 64 * 1024
MAX_POLL_IDS = 500
MAX_POLL_TIMEOUT_S = 55.0
"""Clients cut a call off at about 60 s; a poll must answer before that."""

INSTRUCTIONS = (
    "Offload runs slow tools in the background. fire_tool (or run_shell_background) returns a task_id "
    "at once; keep working, then collect with poll_output (waits for completion) or get_cached_output "
    "(never blocks; read output by offset). list_fireable_tools shows what can be fired. Each task is "
    "also the resource task://{task_id}: subscribe to it to be told when it finishes instead of polling."
)

TaskId = Annotated[str, Field(min_length=1, max_length=64, description="Id returned by fire_tool.")]
TimeoutS = Annotated[float | None, Field(gt=0, description="Kill the task after this many seconds.")]


@contextmanager
def _as_tool_errors(runtime: Runtime) -> Iterator[None]:
    try:
        yield
    except RequestError as exc:
        raise ToolError(runtime.redactor.text(str(exc))) from exc


_reader: ContextVar[str] = ContextVar("offload_resource_reader", default=LOCAL_OWNER)


def _owner(ctx: Context) -> str:
    """Whose tasks this request may see: the bearer token's owner over HTTP, the local owner otherwise."""
    return owner_of_request(ctx.request_context.request)


def _hints(*, read_only: bool, destructive: bool = False, idempotent: bool, open_world: bool) -> ToolAnnotations:
    """The destructive and idempotent hints only mean something for tools that are not read-only."""
    if read_only:
        return ToolAnnotations(read_only_hint=True, open_world_hint=open_world)
    return ToolAnnotations(
        read_only_hint=False,
        destructive_hint=destructive,
        idempotent_hint=idempotent,
        open_world_hint=open_world,
    )


class OffloadServer(MCPServer):
    """Lists compact schemas: every byte of tools/list is paid in every conversation's context."""

    exposed: Sequence[MCPTool] = ()
    """Fireable tools served as MCP tools too (`expose`); `TasksExtension` answers their calls."""

    async def list_tools(self) -> list[MCPTool]:
        own = [
            tool.model_copy(
                update={
                    "input_schema": compact_schema(tool.input_schema),
                    "output_schema": None if tool.output_schema is None else compact_schema(tool.output_schema),
                }
            )
            for tool in await super().list_tools()
        ]
        return [*own, *self.exposed]

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context[Any, Any] | None = None
    ) -> CallToolResult | InputRequiredResult:
        """Parameter errors read as plain sentences naming the parameter and the value, not a pydantic dump."""
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            if isinstance(exc.__cause__, ValidationError) and not isinstance(exc, UnexpectedToolError):
                raise ToolError(invalid_call(name, exc.__cause__)) from exc.__cause__
            raise

    async def read_resource(
        self, uri: AnyUrl | str, context: Context[Any, Any] | None = None
    ) -> Iterable[ReadResourceContents] | InputRequiredResult:
        """The SDK gives static resources no Context: the reader's owner reaches them through a ContextVar."""
        try:
            request = None if context is None else context.request_context.request
        except ValueError:  # a Context made outside a request
            request = None
        token = _reader.set(owner_of_request(request))
        try:
            return await super().read_resource(uri, context)
        finally:
            _reader.reset(token)

    async def run_streams(self, read_stream: Any, write_stream: Any) -> None:
        """Serves one connection over streams we opened (`server.stdio`); the SDK's
        `run_stdio_async` always opens its own threaded ones."""
        lowlevel = lowlevel_of(self)
        await lowlevel.run(read_stream, write_stream, lowlevel.create_initialization_options())


def compact_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The same schema without pydantic's noise: definitions inlined (ours are not recursive), no
    titles, `null` folded into `type`, no null defaults."""
    defs = schema.get("$defs", {})
    compacted: dict[str, Any] = _compact(_inline(schema, defs))
    compacted.pop("$defs", None)
    return compacted


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_inline(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        return _inline(defs[ref.removeprefix("#/$defs/")], defs)
    return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}


def _compact(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_compact(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _compact(v) for k, v in schema.items() if k != "title" or not isinstance(v, str)}
    if "properties" in schema:  # property names may be "title": keep them
        out["properties"] = {k: _compact(v) for k, v in schema["properties"].items()}
    if out.get("default", ...) is None:
        del out["default"]
    if out.get("additionalProperties") is True:
        del out["additionalProperties"]
    options = out.get("anyOf")
    if isinstance(options, list) and len(options) == 2 and {"type": "null"} in options:
        other = next(o for o in options if o != {"type": "null"})
        if isinstance(other.get("type"), str):
            del out["anyOf"]
            out.update({**other, "type": [other["type"], "null"]})
    return out


def build_server(runtime: Runtime) -> OffloadServer:
    """Every tool is `async def`: the SDK runs plain functions in a worker thread, a hop per call."""
    exposed = exposed_specs(runtime)
    server = OffloadServer(
        "offload",
        version=__version__,
        instructions=INSTRUCTIONS,
        subscriptions=False,  # served below, per owner
        extensions=[TasksExtension(runtime, exposed)],
    )
    server.exposed = [_as_mcp_tool(spec) for spec in exposed]
    client_log = ClientLog(runtime.redactor, lambda run: runtime.start_background(run, "offload client log"))
    runtime.executor.watchers.append(client_log.task_changed)
    _add_tools(server, runtime, client_log)
    _add_resources(server, runtime)
    _add_subscriptions(server, runtime)
    _add_logging_and_completions(server, runtime, client_log)
    return server


def exposed_specs(runtime: Runtime) -> list[ToolSpec]:
    patterns = runtime.settings.expose
    names = runtime.executor.registry.names()
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            log.warning("expose = %r matches no fireable tool; they are: %s", pattern, ", ".join(names))
    chosen = []
    for spec in runtime.executor.registry:
        if not any(fnmatch.fnmatchcase(spec.name, pattern) for pattern in patterns):
            continue
        if spec.name in OWN_TOOLS or spec.unavailable is not None:
            log.warning("not exposing %r: %s", spec.name, spec.unavailable or "an Offload tool has that name")
            continue
        chosen.append(spec)
    return chosen


def _as_mcp_tool(spec: ToolSpec) -> MCPTool:
    return MCPTool(
        name=spec.name,
        description=f"{spec.description} Task-capable: with the tasks extension the call returns a task at once.",
        input_schema=compact_schema(spec.input_schema),
        annotations=_hints(
            read_only=spec.cacheable and not spec.destructive,
            destructive=spec.destructive,
            idempotent=spec.cacheable,
            open_world=spec.open_world,
        ),
    )


@contextmanager
def _reporting_limits(client_log: ClientLog, owner: str) -> Iterator[None]:
    """A refusal at the owner's task limit is also a warning in the owner's clients' logs."""
    try:
        yield
    except TooManyTasksError as exc:
        client_log.emit(limit_event(owner, exc.limit))
        raise


def _add_tools(server: OffloadServer, runtime: Runtime, client_log: ClientLog) -> None:
    hold_s = runtime.settings.stream_hold_s

    @server.tool(annotations=_hints(read_only=False, destructive=True, idempotent=False, open_world=True))
    async def fire_tool(
        tool: Annotated[str, Field(min_length=1, description="Name from list_fireable_tools.")],
        arguments: Annotated[dict[str, Any], Field(description="The tool's arguments.")] = {},  # noqa: B006
        timeout_s: TimeoutS = None,
        ttl_s: Annotated[
            float | None, Field(gt=0, le=7 * 86400, description="Keep the result this long (default 1800).")
        ] = None,
        use_cache: Annotated[
            bool, Field(description="Reuse an identical call's result or join it while running (cacheable tools).")
        ] = True,
        wait_s: Annotated[
            float,
            Field(ge=0, le=MAX_POLL_TIMEOUT_S, description="Wait up to this long; a finished task comes back whole."),
        ] = 0,
        *,
        ctx: Context,
    ) -> FireReply:
        """Start a tool in the background and return its task_id at once."""
        owner = _owner(ctx)
        with _as_tool_errors(runtime), _reporting_limits(client_log, owner):
            async with released_after(ctx, hold_s if wait_s > 0 else 0):
                return await runtime.fire(
                    tool,
                    arguments,
                    timeout_s=timeout_s,
                    ttl_s=ttl_s,
                    use_cache=use_cache,
                    wait_s=wait_s,
                    owner=owner,
                )

    @server.tool(annotations=_hints(read_only=True, idempotent=True, open_world=False))
    async def get_cached_output(
        task_id: TaskId,
        offset: Annotated[int, Field(ge=0, description="Byte offset to read from (next_offset of the last read).")] = 0,
        max_bytes: Annotated[int, Field(ge=1, le=1024 * 1024, description="Most bytes of output to return.")] = 16384,
        tail_bytes: Annotated[int | None, Field(ge=1, description="Return only the last N bytes.")] = None,
        *,
        ctx: Context,
    ) -> TaskView:
        """A task's status, result or error, and output from an offset. Never blocks."""
        with _as_tool_errors(runtime):
            return runtime.get_output(
                task_id, offset=offset, max_bytes=max_bytes, tail_bytes=tail_bytes, owner=_owner(ctx)
            )

    @server.tool(annotations=_hints(read_only=True, idempotent=True, open_world=False))
    async def poll_output(
        task_ids: Annotated[list[TaskId], Field(min_length=1, max_length=MAX_POLL_IDS)],
        ctx: Context,
        timeout_s: Annotated[float, Field(ge=0, le=MAX_POLL_TIMEOUT_S, description="Most seconds to wait.")] = 20,
        return_when: Annotated[Literal["all", "any"], Field(description="Return when all or any are done.")] = "all",
        max_bytes: Annotated[
            int, Field(ge=0, le=1024 * 1024, description="Output budget shared by the returned tasks' tails.")
        ] = 32768,
    ) -> PollReply:
        """Wait for tasks to finish; returns the finished ones whole and the ids still pending."""

        async def progress(done: int, total: int) -> None:
            await ctx.report_progress(done, total, f"{done}/{total} tasks finished")

        with _as_tool_errors(runtime):
            async with released_after(ctx, hold_s):
                return await runtime.poll(
                    task_ids,
                    timeout_s=timeout_s,
                    return_when=return_when,
                    max_bytes=max_bytes,
                    on_progress=progress,
                    owner=_owner(ctx),
                )

    @server.tool(annotations=_hints(read_only=False, destructive=True, idempotent=False, open_world=True))
    async def run_shell_background(
        command: Annotated[str, Field(min_length=1, description="Run with bash -c in its own process group.")],
        cwd: Annotated[str | None, Field(description="Working directory.")] = None,
        env: Annotated[dict[str, str] | None, Field(description="Extra environment variables.")] = None,
        timeout_s: TimeoutS = None,
        stdin: Annotated[str | None, Field(description="Text fed to stdin, which is then closed.")] = None,
        *,
        ctx: Context,
    ) -> ShellReply:
        """Start a shell command in the background; returns task_id and pid at once."""
        arguments = {"command": command, "cwd": cwd, "env": env, "stdin": stdin}
        owner = _owner(ctx)
        with _as_tool_errors(runtime), _reporting_limits(client_log, owner):
            return await runtime.run_shell(arguments, timeout_s=timeout_s, owner=owner)

    @server.tool(annotations=_hints(read_only=True, idempotent=True, open_world=False))
    async def list_tasks(
        status: Status | None = None,
        tool: str | None = None,
        limit: Annotated[int, Field(ge=1, le=500)] = 50,
        *,
        ctx: Context,
    ) -> TaskList:
        """Your tasks, newest first."""
        return runtime.list_tasks(status=status, tool=tool, limit=limit, owner=_owner(ctx))

    @server.tool(annotations=_hints(read_only=False, destructive=True, idempotent=True, open_world=False))
    async def cancel_task(task_id: TaskId, ctx: Context) -> TaskView:
        """Cancel a task: its process group gets TERM, then KILL after a grace period."""
        with _as_tool_errors(runtime):
            return await runtime.cancel(task_id, owner=_owner(ctx))

    @server.tool(annotations=_hints(read_only=True, idempotent=True, open_world=False))
    async def list_fireable_tools() -> Catalog:
        """Tools fire_tool accepts, with their argument schemas and flags."""
        return runtime.catalog()


def _add_resources(server: OffloadServer, runtime: Runtime) -> None:
    @server.resource(
        "offload://stats",
        name="stats",
        mime_type="application/json",
        description="Tasks by status, queue depth, cache hit rates, shared clients, memory held.",
    )
    async def stats() -> str:
        return json.dumps(runtime.stats(owner=_reader.get()), indent=1)

    @server.resource(
        "task://{task_id}",
        name="task",
        mime_type="application/json",
        description="A task's status, result or error, and its output's tail. Subscribe to hear when it finishes.",
    )
    async def task(task_id: str, ctx: Context) -> str:
        with _as_resource_errors(runtime):
            view = runtime.get_output(
                task_id, offset=0, max_bytes=TASK_TAIL_BYTES, tail_bytes=TASK_TAIL_BYTES, owner=_owner(ctx)
            )
        return view.model_dump_json(indent=1, exclude_none=True)

    @server.resource(
        "task://{task_id}/output",
        name="task output",
        mime_type="text/plain",
        description=f"A task's output, its last {OUTPUT_RESOURCE_BYTES // 1024} KiB; earlier bytes by offset "
        "with get_cached_output.",
    )
    async def output(task_id: str, ctx: Context) -> str:
        with _as_resource_errors(runtime):
            view = runtime.get_output(
                task_id,
                offset=0,
                max_bytes=OUTPUT_RESOURCE_BYTES,
                tail_bytes=OUTPUT_RESOURCE_BYTES,
                owner=_owner(ctx),
            )
        shown = view.output
        assert shown is not None
        if shown.offset == 0:
            return shown.text
        return (
            f"[offload: bytes {shown.offset}-{shown.next_offset} of {shown.total_bytes}; read the rest with "
            f"get_cached_output(task_id={task_id!r}, offset=0)]\n{shown.text}"
        )

    @server.resource(
        RECENT_URI,
        name="recent tasks",
        mime_type="application/json",
        description="Your 50 most recent tasks, newest first.",
    )
    async def recent() -> str:
        listed = runtime.list_tasks(status=None, tool=None, limit=50, owner=_reader.get())
        return listed.model_dump_json(indent=1, exclude_none=True)


def _add_subscriptions(server: OffloadServer, runtime: Runtime) -> None:
    """2025-11-25 clients subscribe per resource, 2026-07-28 clients listen; both kept per owner."""

    async def subscribe(ctx: ServerRequestContext[Any, Any], params: SubscribeRequestParams) -> EmptyResult:
        owner = owner_of_request(ctx.request)
        try:
            _check_subscribable(runtime, params.uri, owner)
            runtime.notifier.subscribe(connection_of(ctx), owner, params.uri)
        except RequestError as exc:
            raise MCPError(INVALID_PARAMS, runtime.redactor.text(str(exc))) from exc
        return EmptyResult()

    async def unsubscribe(ctx: ServerRequestContext[Any, Any], params: UnsubscribeRequestParams) -> EmptyResult:
        runtime.notifier.unsubscribe(connection_of(ctx), params.uri)
        return EmptyResult()

    lowlevel = lowlevel_of(server)
    lowlevel.add_request_handler("subscriptions/listen", SubscriptionsListenRequestParams, runtime.notifier.listen)
    lowlevel.add_request_handler("resources/subscribe", SubscribeRequestParams, subscribe)
    lowlevel.add_request_handler("resources/unsubscribe", UnsubscribeRequestParams, unsubscribe)


def _add_logging_and_completions(server: OffloadServer, runtime: Runtime, client_log: ClientLog) -> None:
    """Declared by registering: the SDK advertises `logging` and `completions` for the handlers it has."""

    async def set_level(ctx: ServerRequestContext[Any, Any], params: SetLevelRequestParams) -> EmptyResult:
        client_log.set_level(connection_of(ctx), owner_of_request(ctx.request), params.level)
        return EmptyResult()

    async def completion(ctx: ServerRequestContext[Any, Any], params: CompleteRequestParams) -> CompleteResult:
        return CompleteResult(completion=complete(runtime, owner_of_request(ctx.request), params.ref, params.argument))

    lowlevel = lowlevel_of(server)
    lowlevel.add_request_handler("logging/setLevel", SetLevelRequestParams, set_level)
    lowlevel.add_request_handler("completion/complete", CompleteRequestParams, completion)


def _check_subscribable(runtime: Runtime, uri: str, owner: str) -> None:
    """Only resources that can change; a task of another owner reads like an unknown one."""
    if uri == RECENT_URI:
        return
    found = TASK_URI.fullmatch(uri)
    if found is None:
        raise MCPError(
            INVALID_PARAMS,
            f"cannot subscribe to {uri!r}: only task://{{task_id}}, task://{{task_id}}/output and {RECENT_URI} change",
        )
    runtime.executor.get(owner, found.group(1))


@contextmanager
def _as_resource_errors(runtime: Runtime) -> Iterator[None]:
    try:
        yield
    except RequestError as exc:
        raise ResourceNotFoundError(runtime.redactor.text(str(exc))) from exc
