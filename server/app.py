"""MCP wiring only: each MCP tool parses its arguments and calls one Runtime method.

Errors the model can correct (`RequestError`) become tool errors with their text intact.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Annotated, Any, Literal

from mcp.server.lowlevel.helper_types import ReadResourceContents
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import InputRequiredResult, ToolAnnotations
from mcp_types import Tool as MCPTool
from pydantic import AnyUrl, Field

from server import __version__
from server.auth import LOCAL_OWNER, owner_of_request
from server.errors import RequestError
from server.runtime import Runtime
from server.tasks import Catalog, FireReply, PollReply, ShellReply, Status, TaskList, TaskView

MAX_POLL_IDS = 500
MAX_POLL_TIMEOUT_S = 55.0
"""Clients cut a call off at about 60 s; a poll must answer before that."""

INSTRUCTIONS = (
    "Offload runs slow tools in the background. fire_tool (or run_shell_background) returns a task_id "
    "at once; keep working, then collect with poll_output (waits for completion) or get_cached_output "
    "(never blocks; read output by offset). list_fireable_tools shows what can be fired."
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

    async def list_tools(self) -> list[MCPTool]:
        return [
            tool.model_copy(
                update={
                    "input_schema": compact_schema(tool.input_schema),
                    "output_schema": None if tool.output_schema is None else compact_schema(tool.output_schema),
                }
            )
            for tool in await super().list_tools()
        ]

    async def read_resource(
        self, uri: AnyUrl | str, context: Context[Any, Any] | None = None
    ) -> Iterable[ReadResourceContents] | InputRequiredResult:
        """The SDK gives static resources no Context: the reader's owner reaches them through a ContextVar."""
        request = None if context is None or context._request_context is None else context.request_context.request
        token = _reader.set(owner_of_request(request))
        try:
            return await super().read_resource(uri, context)
        finally:
            _reader.reset(token)

    async def run_streams(self, read_stream: Any, write_stream: Any) -> None:
        """Serves one connection over streams we opened (`server.stdio`); the SDK's
        `run_stdio_async` always opens its own threaded ones."""
        lowlevel = self._lowlevel_server
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
    server = OffloadServer("offload", version=__version__, instructions=INSTRUCTIONS)

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
        with _as_tool_errors(runtime):
            return await runtime.fire(
                tool,
                arguments,
                timeout_s=timeout_s,
                ttl_s=ttl_s,
                use_cache=use_cache,
                wait_s=wait_s,
                owner=_owner(ctx),
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
        with _as_tool_errors(runtime):
            return await runtime.run_shell(arguments, timeout_s=timeout_s, owner=_owner(ctx))

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

    @server.resource(
        "offload://stats",
        name="stats",
        mime_type="application/json",
        description="Tasks by status, queue depth, cache hit rates, shared clients, memory held.",
    )
    async def stats() -> str:
        return json.dumps(runtime.stats(owner=_reader.get()), indent=1)

    return server
