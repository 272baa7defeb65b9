"""MCP wiring only: the server object, its tool table (`server/mcp_tools.py`), resources and
subscriptions (`server/resources.py`), logging and completions, each calling one Runtime method.

Errors the model can correct (`RequestError`) become tool errors with their text intact.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.helper_types import ReadResourceContents
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp_types import (
    CallToolResult,
    CompleteRequestParams,
    CompleteResult,
    EmptyResult,
    InputRequiredResult,
    SetLevelRequestParams,
)
from mcp_types import Tool as MCPTool
from pydantic import AnyUrl, BaseModel, ValidationError

from server import __version__, mcp_tools, resources
from server.auth import owner_of_request
from server.client_log import ClientLog
from server.completions import complete
from server.errors import invalid_call
from server.mcp_tools import OWN_TOOLS as OWN_TOOLS
from server.mcp_tools import hints
from server.notify import Notifier
from server.runtime import Runtime
from server.schema import compact_schema
from server.sdk_compat import connection_of, lowlevel_of
from server.task_extension import TasksExtension
from tools.registry import ToolSpec

log = logging.getLogger(__name__)

INSTRUCTIONS = (
    "Offload runs slow tools in the background. fire_tool (or run_shell_background) returns a task_id "
    "at once; keep working, then collect with poll_output (waits for completion) or get_cached_output "
    "(never blocks; read output by offset). list_fireable_tools shows what can be fired. Each task is "
    "also the resource task://{task_id}: subscribe to it to be told when it finishes instead of polling."
)


class OffloadServer(MCPServer):
    """Lists compact schemas: every byte of tools/list is paid in every conversation's context."""

    exposed: Sequence[MCPTool] = ()
    """Fireable tools served as MCP tools too (`expose`); `TasksExtension` answers their calls."""
    own_inputs: Mapping[str, type[BaseModel]] = {}
    """Offload's own tools' input models (server/mcp_tools.py)."""
    notifier: Notifier | None = None
    """Tells this server's subscribed clients when a task changes."""

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
        """Parameter errors read as plain sentences naming the parameter and the value, not a pydantic dump;
        an argument the tool does not take is refused, not dropped."""
        model = self.own_inputs.get(name)
        if model is not None and (refusal := mcp_tools.unknown_arguments(name, model, arguments or {})):
            raise ToolError(refusal)
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
        token = resources.reader.set(owner_of_request(request))
        try:
            return await super().read_resource(uri, context)
        finally:
            resources.reader.reset(token)

    async def run_streams(self, read_stream: Any, write_stream: Any) -> None:
        """Serves one connection over streams we opened (`server.stdio`); the SDK's
        `run_stdio_async` always opens its own threaded ones."""
        lowlevel = lowlevel_of(self)
        await lowlevel.run(read_stream, write_stream, lowlevel.create_initialization_options())


def build_server(runtime: Runtime) -> OffloadServer:
    exposed = exposed_specs(runtime)
    server = OffloadServer(
        "offload",
        version=__version__,
        instructions=INSTRUCTIONS,
        subscriptions=False,  # served in server/resources.py, per owner
        extensions=[TasksExtension(runtime, exposed)],
    )
    server.exposed = [_as_mcp_tool(spec) for spec in exposed]
    client_log = ClientLog(runtime.redactor, lambda run: runtime.start_background(run, "offload client log"))
    runtime.subscribe(client_log.task_changed)
    notifier = Notifier(lambda run: runtime.start_background(run, "offload notifications"))
    server.notifier = notifier
    runtime.subscribe(notifier.task_changed)
    runtime.at_close(notifier.close)
    server.own_inputs = mcp_tools.register(server, runtime, client_log)
    resources.add_resources(server, runtime, notifier)
    resources.add_subscriptions(server, runtime, notifier)
    _add_logging_and_completions(server, runtime, client_log)
    return server


def exposed_specs(runtime: Runtime) -> list[ToolSpec]:
    patterns = runtime.settings.expose
    specs = runtime.tools()
    names = [spec.name for spec in specs]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            log.warning("expose = %r matches no fireable tool; they are: %s", pattern, ", ".join(names))
    chosen = []
    for spec in specs:
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
        annotations=hints(
            read_only=spec.cacheable and not spec.destructive,
            destructive=spec.destructive,
            idempotent=spec.cacheable,
            open_world=spec.open_world,
        ),
    )


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
