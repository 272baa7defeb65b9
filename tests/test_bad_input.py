"""Every bad input is an error result that names the problem and what to call instead."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import FakeClock, call, error_text
from mcp import Client

from server.app import OWN_TOOLS
from server.runtime import Runtime

pytestmark = pytest.mark.anyio


async def _error(client: Client, tool: str, arguments: dict[str, Any]) -> str:
    return error_text(await client.call_tool(tool, arguments))


async def test_unknown_tool(client: Client, runtime: Runtime) -> None:
    message = await _error(client, "fire_tool", {"tool": "shel", "arguments": {"command": "true"}})
    assert "'shel'" in message and "list_fireable_tools" in message and "shell" in message
    assert runtime.executor.counters.fired == 0


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({}, "command: Field required"),
        ({"command": ""}, "command: String should have at least 1 character"),
        ({"command": "true", "rm": "-rf"}, "rm: Extra inputs are not permitted"),
        ({"command": 42}, "command: Input should be a valid string (got 42)"),
        ({"command": "true", "cwd": "/definitely/missing"}, "'/definitely/missing' is not an existing directory"),
    ],
)
async def test_invalid_fire_arguments_start_nothing(
    client: Client, runtime: Runtime, arguments: dict[str, Any], expected: str
) -> None:
    message = await _error(client, "fire_tool", {"tool": "shell", "arguments": arguments})
    assert expected in message
    assert "Nothing was started" in message
    if "cwd" not in arguments:  # a missing cwd is refused by the policy check, after the owner's roots
        assert "list_fireable_tools" in message
    assert runtime.executor.counters.fired == 0
    assert (await call(client, "list_tasks"))["tasks"] == []


async def test_unknown_task_id_everywhere(client: Client) -> None:
    for tool, arguments in [
        ("get_cached_output", {"task_id": "nope"}),
        ("cancel_task", {"task_id": "nope"}),
    ]:
        message = await _error(client, tool, arguments)
        assert "Unknown task id 'nope'" in message and "list_tasks" in message, tool


async def test_poll_answers_the_known_ids_and_lists_the_unknown(client: Client, clock: FakeClock) -> None:
    known = await call(client, "fire_tool", tool="shell", arguments={"command": "echo here"}, wait_s=10)
    expired = await call(client, "fire_tool", tool="shell", arguments={"command": "true"}, ttl_s=1, wait_s=10)
    clock.advance(2)
    reply = await call(client, "poll_output", task_ids=["nope", known["task_id"], expired["task_id"]], timeout_s=5)
    assert [v["task_id"] for v in reply["done"]] == [known["task_id"]]
    assert reply["done"][0]["output"]["text"] == "here\n"
    assert reply["pending"] == [] and not reply["timed_out"]
    unknown = {u["task_id"]: u["message"] for u in reply["unknown"]}
    assert "Unknown task id 'nope'" in unknown["nope"] and "list_tasks" in unknown["nope"]
    assert "expired" in unknown[expired["task_id"]]


@pytest.mark.parametrize(
    ("tool", "arguments", "field"),
    [
        ("get_cached_output", {"task_id": "x", "offset": -1}, "offset"),
        ("get_cached_output", {"task_id": "x", "max_bytes": 0}, "max_bytes"),
        ("get_cached_output", {"task_id": "x", "tail_bytes": -5}, "tail_bytes"),
        ("poll_output", {"task_ids": []}, "task_ids"),
        ("poll_output", {"task_ids": ["x"], "timeout_s": 3600}, "timeout_s"),
        ("poll_output", {"task_ids": ["x"], "return_when": "some"}, "return_when"),
        ("fire_tool", {"tool": "shell", "arguments": {"command": "true"}, "timeout_s": -1}, "timeout_s"),
        ("fire_tool", {"tool": "shell", "arguments": {"command": "true"}, "wait_s": 600}, "wait_s"),
        ("fire_tool", {"tool": "shell", "arguments": "echo hi"}, "arguments"),
        ("run_shell_background", {"command": "true", "timeout_s": 0}, "timeout_s"),
        ("list_tasks", {"status": "done"}, "status"),
        ("list_tasks", {"limit": 0}, "limit"),
    ],
)
async def test_out_of_range_arguments(
    client: Client, runtime: Runtime, tool: str, arguments: dict[str, Any], field: str
) -> None:
    message = await _error(client, tool, arguments)
    assert field in message
    assert runtime.executor.counters.fired == 0


async def test_absurd_timeout_is_refused(client: Client, runtime: Runtime) -> None:
    arguments = {"tool": "shell", "arguments": {"command": "true"}, "timeout_s": 1e9}
    message = await _error(client, "fire_tool", arguments)
    assert "timeout_s=1000000000.0" in message and "maximum" in message
    assert runtime.executor.counters.fired == 0


async def test_tool_definitions_fit_the_context_budget(client: Client) -> None:
    tools = (await client.list_tools()).tools
    assert {t.name for t in tools} == OWN_TOOLS
    wire = [
        json.dumps(t.model_dump(mode="json", by_alias=True, exclude_none=True), separators=(",", ":")) for t in tools
    ]
    assert sum(len(w.encode()) for w in wire) < 8 * 1024  # as sent: compact JSON
    for tool in tools:
        assert tool.description and tool.annotations is not None, tool.name
        assert tool.output_schema is not None and tool.output_schema["type"] == "object", tool.name
        assert tool.annotations.read_only_hint is not None, tool.name
    by_name = {t.name: t for t in tools}
    assert by_name["get_cached_output"].annotations.read_only_hint is True  # type: ignore[union-attr]
    assert by_name["run_shell_background"].annotations.destructive_hint is True  # type: ignore[union-attr]


async def test_an_argument_a_tool_does_not_take_is_refused_by_name(client: Client, runtime: Runtime) -> None:
    """Found by review: the SDK dropped unknown arguments silently, so `target` without redis_url, or a typo
    like `timeout` for `timeout_s`, ran the task as if never said."""
    typo = error_text(await client.call_tool("run_shell_background", {"command": "true", "timeout": 5}))
    assert "run_shell_background takes no argument 'timeout'" in typo and "timeout_s" in typo
    target = error_text(
        await client.call_tool("fire_tool", {"tool": "test.gate", "arguments": {"key": "k"}, "target": "gpu"})
    )
    assert "takes no argument 'target'" in target and "redis_url" in target
    assert runtime.executor.counters.fired == 0


MODEL_FACING_MAX_BYTES = 4608
"""What a model reads of Offload's own tools (name, description, input schema; output schemas and annotations
are for the client): 3,651 bytes before issue 23 added send_input, pty, ready_when, wait_for, filter and
screen, 4,519 after. A ratchet: a new argument must make room, not raise it."""


async def test_what_the_model_reads_of_the_tools_stays_small(client: Client) -> None:
    tools = (await client.list_tools()).tools
    model_facing = [
        json.dumps(
            {"name": t.name, "description": t.description, "input_schema": t.input_schema}, separators=(",", ":")
        )
        for t in tools
    ]
    assert sum(len(m.encode()) for m in model_facing) <= MODEL_FACING_MAX_BYTES
