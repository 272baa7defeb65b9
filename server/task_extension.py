"""The tasks extension (`io.modelcontextprotocol/tasks`, SEP-2663) over Offload's one task system.

With `expose = [...]` configured, fireable tools are MCP tools too. A client that declares the
extension on its `tools/call` gets a task handle at once (`resultType: "task"`) and follows it with
`tasks/get` (the result inlined once done) and `tasks/cancel`; a client without it gets the result
inline, after at most `expose_wait_s`. Either way the task is the same one `get_cached_output`,
`poll_output`, `cancel_task`, the `task://` resources and the notifications see: same id, owner,
TTL and durability.

Replies are plain mappings: the SDK has no result model for a task, and a typed one trips its
result validation.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.extension import Extension, MethodBinding
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS, CallToolRequestParams, CallToolResult, RequestParams, TextContent
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import ConfigDict, Field

from server.auth import owner_of_request
from server.errors import RequestError
from server.runtime import FIRE_REPLY_BYTES, Runtime
from server.tasks import Status, Task, TaskView, iso
from tools.registry import ToolSpec

log = logging.getLogger(__name__)

TASKS_EXTENSION = "io.modelcontextprotocol/tasks"
MISSING_CAPABILITY = -32021
POLL_INTERVAL_MS = 1000
STATUS = {
    Status.QUEUED: "working",
    Status.RUNNING: "working",
    Status.COMPLETED: "completed",
    Status.FAILED: "completed",  # a tool-level failure is a completed task whose result has isError
    Status.CANCELLED: "cancelled",
}


class TaskIdParams(RequestParams):
    model_config = ConfigDict(populate_by_name=True)

    task_id: str = Field(alias="taskId", min_length=1, max_length=200)


class UpdateTaskParams(TaskIdParams):
    input_responses: dict[str, Any] = Field(default_factory=dict, alias="inputResponses")


class TasksExtension(Extension):
    identifier = TASKS_EXTENSION

    def __init__(self, runtime: Runtime, exposed: Sequence[ToolSpec]) -> None:
        self._runtime = runtime
        self._exposed = {spec.name: spec for spec in exposed}

    def methods(self) -> Sequence[MethodBinding]:
        return [
            MethodBinding("tasks/get", TaskIdParams, self._get),
            MethodBinding("tasks/update", UpdateTaskParams, self._update),
            MethodBinding("tasks/cancel", TaskIdParams, self._cancel),
        ]

    async def intercept_tool_call(
        self, params: CallToolRequestParams, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        if params.name not in self._exposed:
            return await call_next(ctx)
        runtime = self._runtime
        try:
            task = await runtime.start(params.name, dict(params.arguments or {}), owner=owner_of_request(ctx.request))
        except RequestError as exc:
            return _tool_error(runtime.redactor.text(str(exc)))
        if declared(ctx):
            log.debug("tools/call %s answered with the task handle %s", params.name, task.id)
            return {"resultType": "task", **self._fields(task)}
        return self._call_result(await runtime.settled(task, runtime.settings.expose_wait_s))

    # ---- methods ----

    async def _get(self, ctx: ServerRequestContext[Any, Any], params: TaskIdParams) -> HandlerResult:
        task = self._task(ctx, params.task_id)
        log.debug("tasks/get %s: %s", task.id, task.status.value)
        detailed = self._fields(task)
        if detailed["status"] == "completed":
            detailed["result"] = self._call_result(task).model_dump(by_alias=True, mode="json", exclude_none=True)
        return {"resultType": "complete", **detailed}

    async def _update(self, ctx: ServerRequestContext[Any, Any], params: UpdateTaskParams) -> HandlerResult:
        """No Offload task asks for input, so there is never an outstanding request to answer: ack."""
        self._task(ctx, params.task_id)
        return {"resultType": "complete"}

    async def _cancel(self, ctx: ServerRequestContext[Any, Any], params: TaskIdParams) -> HandlerResult:
        self._task(ctx, params.task_id)
        try:
            await self._runtime.cancel(params.task_id, owner=owner_of_request(ctx.request))
        except RequestError as exc:
            raise MCPError(INVALID_PARAMS, f"Failed to cancel task: {self._runtime.redactor.text(str(exc))}") from exc
        return {"resultType": "complete"}

    # ---- shapes ----

    def _task(self, ctx: ServerRequestContext[Any, Any], task_id: str) -> Task:
        require_extension(ctx)
        try:
            return self._runtime.task(task_id, owner=owner_of_request(ctx.request))
        except RequestError as exc:
            raise MCPError(INVALID_PARAMS, f"Failed to retrieve task: {self._runtime.redactor.text(str(exc))}") from exc

    def _fields(self, task: Task) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "taskId": task.id,
            "status": STATUS[task.status],
            "createdAt": _iso(task.created_at),
            "lastUpdatedAt": _iso(task.finished_at or task.started_at or task.created_at),
            "ttlMs": None if task.expires_at is None else round((task.expires_at - task.created_at) * 1000),
            "pollIntervalMs": POLL_INTERVAL_MS,
        }
        if task.error is not None:
            fields["statusMessage"] = self._runtime.redactor.text(task.error.message)
        return fields

    def _call_result(self, task: Task) -> CallToolResult:
        view = self._runtime.output_view(task, 0, FIRE_REPLY_BYTES, FIRE_REPLY_BYTES)
        return call_tool_result(view)


def call_tool_result(view: TaskView) -> CallToolResult:
    """What the exposed tool returns inline: the task's view, an error if the task failed."""
    text = view.model_dump_json(indent=1, exclude_none=True)
    if not view.status.finished:
        text = (
            f"Still running after the inline wait. Collect it with poll_output(task_ids=[{view.task_id!r}]) "
            f"or get_cached_output(task_id={view.task_id!r}).\n{text}"
        )
    return CallToolResult(
        content=[TextContent(type="text", text=text)],
        structured_content=view.model_dump(mode="json", exclude_none=True),
        is_error=view.status is Status.FAILED,
    )


def declared(ctx: ServerRequestContext[Any, Any]) -> bool:
    """Whether this request's client declared the extension (per request on 2026-07-28). Tasks are an
    extension of the 2026-07-28 protocol only: a 2025-11-25 client declaring it (some do, harmlessly)
    cannot take a task result there, where tools/call must answer a CallToolResult."""
    if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
        return False
    capabilities = ctx.session.client_capabilities
    extensions: Mapping[str, Any] | None = capabilities.extensions if capabilities is not None else None
    return bool(extensions) and TASKS_EXTENSION in (extensions or {})


def require_extension(ctx: ServerRequestContext[Any, Any]) -> None:
    if not declared(ctx):
        raise MCPError(
            MISSING_CAPABILITY,
            "Missing required client capability",
            {"requiredCapabilities": {"extensions": {TASKS_EXTENSION: {}}}},
        )


def _tool_error(text: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=text)], is_error=True)


def _iso(timestamp: float) -> str:
    return iso(timestamp) or ""
