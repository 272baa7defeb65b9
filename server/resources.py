"""The resources Offload serves (`task://…`, `tasks://recent`, `offload://stats`) and the two protocol
eras' subscriptions to them, kept per owner."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError
from mcp.shared.exceptions import MCPError
from mcp_types import (
    INVALID_PARAMS,
    EmptyResult,
    SubscribeRequestParams,
    SubscriptionsListenRequestParams,
    UnsubscribeRequestParams,
)

from server.auth import owner_of_request
from server.config import LOCAL_OWNER
from server.errors import RequestError
from server.notify import RECENT_URI, Notifier
from server.runtime import Runtime
from server.sdk_compat import connection_of, lowlevel_of

TASK_URI = re.compile(r"task://([A-Za-z0-9_-]{1,64})(?:/output)?")
TASK_TAIL_BYTES = 4096
"""Output tail in the `task://{id}` view; the whole output is `task://{id}/output`."""
OUTPUT_RESOURCE_BYTES = 64 * 1024

reader: ContextVar[str] = ContextVar("offload_resource_reader", default=LOCAL_OWNER)
"""The SDK gives static resources no Context: the reader's owner reaches them through this."""


def _owner(ctx: Context) -> str:
    return owner_of_request(ctx.request_context.request)


def add_resources(server: MCPServer, runtime: Runtime, notifier: Notifier) -> None:
    @server.resource(
        "offload://stats",
        name="stats",
        mime_type="application/json",
        description="Tasks by status, queue depth, cache hit rates, shared clients, memory held.",
    )
    async def stats() -> str:
        owner = reader.get()
        shown = runtime.stats(owner=owner)
        if runtime.settings.is_admin(owner):
            shown["notifications"] = notifier.stats()
        return json.dumps(shown, indent=1)

    if runtime.settings.redis_url is not None:

        @server.resource(
            "offload://workers",
            name="workers",
            mime_type="application/json",
            description="Distributed mode: live workers, their queues, running counts, last heartbeat.",
        )
        async def workers() -> str:
            if not runtime.settings.is_admin(reader.get()):  # server-wide: other owners' work shows in it
                return json.dumps({"workers": None, "note": "server-wide figures are shown to admin owners only"})
            return json.dumps({"workers": runtime.workers()}, indent=1)

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
        return _output_text(runtime, task_id, _owner(ctx))

    @server.resource(
        RECENT_URI,
        name="recent tasks",
        mime_type="application/json",
        description="Your 50 most recent tasks, newest first.",
    )
    async def recent() -> str:
        listed = runtime.list_tasks(status=None, tool=None, limit=50, owner=reader.get())
        return listed.model_dump_json(indent=1, exclude_none=True)


def _output_text(runtime: Runtime, task_id: str, owner: str) -> str:
    with _as_resource_errors(runtime):
        view = runtime.get_output(
            task_id, offset=0, max_bytes=OUTPUT_RESOURCE_BYTES, tail_bytes=OUTPUT_RESOURCE_BYTES, owner=owner
        )
    shown = view.output
    assert shown is not None
    if shown.offset == 0:
        return shown.text
    return (
        f"[offload: bytes {shown.offset}-{shown.next_offset} of {shown.total_bytes}; read the rest with "
        f"get_cached_output(task_id={task_id!r}, offset=0)]\n{shown.text}"
    )


def add_subscriptions(server: MCPServer, runtime: Runtime, notifier: Notifier) -> None:
    """2025-11-25 clients subscribe per resource, 2026-07-28 clients listen; both kept per owner."""

    async def subscribe(ctx: ServerRequestContext[Any, Any], params: SubscribeRequestParams) -> EmptyResult:
        owner = owner_of_request(ctx.request)
        try:
            _check_subscribable(runtime, params.uri, owner)
            notifier.subscribe(connection_of(ctx), owner, params.uri)
        except RequestError as exc:
            raise MCPError(INVALID_PARAMS, runtime.redactor.text(str(exc))) from exc
        return EmptyResult()

    async def unsubscribe(ctx: ServerRequestContext[Any, Any], params: UnsubscribeRequestParams) -> EmptyResult:
        notifier.unsubscribe(connection_of(ctx), params.uri)
        return EmptyResult()

    lowlevel = lowlevel_of(server)
    lowlevel.add_request_handler("subscriptions/listen", SubscriptionsListenRequestParams, notifier.listen)
    lowlevel.add_request_handler("resources/subscribe", SubscribeRequestParams, subscribe)
    lowlevel.add_request_handler("resources/unsubscribe", UnsubscribeRequestParams, unsubscribe)


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
    runtime.task(found.group(1), owner=owner)


@contextmanager
def _as_resource_errors(runtime: Runtime) -> Iterator[None]:
    try:
        yield
    except RequestError as exc:
        raise ResourceNotFoundError(runtime.redactor.text(str(exc))) from exc
