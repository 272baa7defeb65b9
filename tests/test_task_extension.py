"""The tasks extension (SEP-2663), driven by a client nobody here wrote: `fastmcp-tasks` from PyPI.

The server is a real Offload on 127.0.0.1 (streamable HTTP) with test tools exposed; the task a
task-aware client gets is checked to be the very task the portable tools and resources see."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import mcp_types
import pytest
from conftest import Gate, call
from fastmcp import Client as FastMCPClient
from fastmcp_tasks.client import call_tool_task
from fastmcp_tasks.client_models import ClientGetTaskResult, GetTaskRequest, GetTaskRequestParams
from mcp import Client
from mcp.shared.exceptions import MCPError
from pydantic import ConfigDict, Field
from test_http import connect, web_server

pytestmark = pytest.mark.anyio

EXPOSED = ("test.*", "shell")


@asynccontextmanager
async def offload(gate: Gate, **settings: Any) -> AsyncIterator[tuple[FastMCPClient[Any], Client, str]]:
    """A task-aware client (fastmcp-tasks) and a plain one (the SDK's), on one server."""
    async with (
        web_server(gate, "http", expose=EXPOSED, **settings) as url,
        FastMCPClient(url) as aware,
        connect(url) as plain,
    ):
        yield aware, plain, url


async def test_a_task_aware_client_gets_a_task_and_never_polls_output(gate: Gate) -> None:
    async with offload(gate) as (aware, plain, _):
        handle = await call_tool_task(aware, "test.gate", {"key": "slow"})  # returns at once: nothing released
        await gate.wait_entered("slow")
        assert handle.create_result.status == "working" and handle.create_result.poll_interval_ms == 1000
        assert (await handle.status()).status == "working"
        # One task system: the portable tools see the same task, by the same id.
        view = await call(plain, "get_cached_output", task_id=handle.task_id)
        assert view["status"] == "running" and view["tool"] == "test.gate"
        gate.release("slow")
        result = await handle.result()
        assert result.structured_content is not None
        assert result.structured_content["result"] == {"key": "slow", "call": 1}
        assert (await handle.status()).status == "completed"
        listed = await call(plain, "list_tasks")
        assert [t["task_id"] for t in listed["tasks"]] == [handle.task_id]


async def test_cancel_through_the_extension_cancels_the_task(gate: Gate) -> None:
    async with offload(gate) as (aware, plain, _):
        handle = await call_tool_task(aware, "shell", {"command": "sleep 300"})
        await handle.cancel()
        final = await handle.wait(timeout=10)
        assert final.status == "cancelled" and final.status_message is not None
        view = await call(plain, "get_cached_output", task_id=handle.task_id)
        assert view["status"] == "cancelled" and view["error"]["kind"] == "cancelled_by_client"


async def test_a_tool_failure_is_a_completed_task_whose_result_is_an_error(gate: Gate) -> None:
    async with offload(gate) as (aware, _, _):
        handle = await call_tool_task(aware, "test.boom", {"key": "k"}, raise_on_error=False)
        final = await handle.wait(timeout=10)
        assert final.status == "completed"  # SEP-2663: `failed` is only for JSON-RPC errors
        assert final.result is not None and final.result["isError"] is True
        assert "boom k" in final.result["structuredContent"]["error"]["message"]
        assert (await handle.result()).is_error


async def test_a_client_without_the_extension_gets_the_result_inline(gate: Gate) -> None:
    async with offload(gate) as (_, plain, _):
        result = await plain.call_tool("shell", {"command": "echo inline"})
        assert not result.is_error and result.structured_content is not None
        assert result.structured_content["output"]["text"] == "inline\n"
        failed = await plain.call_tool("shell", {"command": "exit 3"})
        assert failed.is_error and failed.structured_content["result"]["exit_code"] == 3  # type: ignore[index]


async def test_the_inline_wait_is_bounded_and_says_how_to_collect(gate: Gate) -> None:
    async with offload(gate, expose_wait_s=0) as (_, plain, _):
        result = await plain.call_tool("test.gate", {"key": "later"})
        text = result.content[0].text  # type: ignore[union-attr]
        task_id = result.structured_content["task_id"]  # type: ignore[index]
        assert text.startswith("Still running after the inline wait") and f"poll_output(task_ids=['{task_id}'])" in text
        gate.release("later")
        reply = await call(plain, "poll_output", task_ids=[task_id])
        assert reply["done"][0]["status"] == "completed"


async def test_bad_arguments_to_an_exposed_tool_are_a_clear_tool_error(gate: Gate) -> None:
    async with offload(gate) as (aware, plain, _):
        for client_result in [await plain.call_tool("shell", {"nope": 1}), await aware.call_tool_mcp("shell", {})]:
            assert client_result.is_error
            assert "Invalid arguments for 'shell'" in client_result.content[0].text  # type: ignore[union-attr]


class _TaskId(mcp_types.RequestParams):
    model_config = ConfigDict(populate_by_name=True)
    task_id: str = Field(serialization_alias="taskId")


class _GetTask(mcp_types.Request[_TaskId, Literal["tasks/get"]]):
    method: Literal["tasks/get"] = "tasks/get"
    params: _TaskId


async def test_tasks_methods_need_the_extension_and_a_known_id(gate: Gate) -> None:
    async with offload(gate) as (aware, plain, _):
        fired = await call(plain, "fire_tool", tool="test.gate", arguments={"key": "k"})
        with pytest.raises(MCPError) as missing:
            await plain.session.send_request(_GetTask(params=_TaskId(task_id=fired["task_id"])), mcp_types.Result)
        assert missing.value.error.code == -32021
        # A task fired with fire_tool is a task for tasks/get too; an unknown id is invalid params.
        got = await aware.session.send_request(
            GetTaskRequest(params=GetTaskRequestParams(task_id=fired["task_id"])), ClientGetTaskResult
        )
        assert got.status == "working" and got.task_id == fired["task_id"]
        with pytest.raises(MCPError) as unknown:
            await aware.session.send_request(
                GetTaskRequest(params=GetTaskRequestParams(task_id="nope")), ClientGetTaskResult
            )
        assert unknown.value.error.code == -32602 and "Unknown task id 'nope'" in unknown.value.error.message
        gate.release("k")


async def test_exposed_tools_are_listed_with_their_own_schemas(gate: Gate) -> None:
    async with offload(gate) as (_, plain, _):
        tools = {t.name: t for t in (await plain.list_tools()).tools}
        assert {"shell", "test.gate", "test.boom", "fire_tool"} <= set(tools)
        assert tools["shell"].input_schema["required"] == ["command"]
        assert "Task-capable" in (tools["shell"].description or "")


async def test_an_expose_pattern_that_matches_nothing_is_reported(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from conftest import FakeClock, open_client

    from server.config import Settings

    settings = Settings(data_dir=tmp_path / "d", expose=("gihtub.*", "shell"))
    async with open_client(settings, FakeClock(), Gate()) as (_, client):
        names = {t.name for t in (await client.list_tools()).tools}
        assert "shell" in names and not any(n.startswith("github.") for n in names)
        stats = await client.read_resource("offload://stats")
        assert '"notifications"' in stats.contents[0].text  # type: ignore[union-attr]
    assert "expose = 'gihtub.*' matches no fireable tool" in caplog.text
