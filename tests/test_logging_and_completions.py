"""Log messages for clients (`logging/setLevel`, `notifications/message`) and `completion/complete` for the
task templates, through real MCP clients: in memory for the level filter, over real HTTP with two bearer
owners for who hears and who is offered what."""

from __future__ import annotations

import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx2
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream
from conftest import ERAS, FakeClock, Gate, data, error_text
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPDeprecationWarning
from mcp_types import LoggingLevel, LoggingMessageNotificationParams, PromptReference, ResourceTemplateReference
from test_http import ALICE, BOB, TOKENS, connect, web_server

from server.app import build_server
from server.config import Settings
from server.runtime import Runtime

pytestmark = pytest.mark.anyio

LOG_WAIT_S = 5.0


@asynccontextmanager
async def logged_client(
    settings: Settings, clock: FakeClock, gate: Gate
) -> AsyncIterator[tuple[Client, MemoryObjectReceiveStream[LoggingMessageNotificationParams]]]:
    """A 2025-11-25 client (the era with connection-wide logging) whose log messages arrive on a stream."""
    send, receive = anyio.create_memory_object_stream[LoggingMessageNotificationParams](100)

    async def on_log(params: LoggingMessageNotificationParams) -> None:
        await send.send(params)

    async with (
        send,
        receive,
        Runtime.open(settings, extra_tools=gate.specs(), clock=clock, load_plugins=False) as runtime,
        Client(build_server(runtime), mode=ERAS["legacy"], logging_callback=on_log) as client,
    ):
        yield client, receive


async def set_level(client: Client, level: LoggingLevel) -> None:
    with warnings.catch_warnings():  # the SDK marks logging deprecated from 2026-07-28 on; we speak 2025-11-25
        warnings.simplefilter("ignore", MCPDeprecationWarning)
        assert (await client.set_logging_level(level)).model_dump(exclude_none=True) == {}


async def next_log(receive: MemoryObjectReceiveStream[LoggingMessageNotificationParams]) -> dict[str, Any]:
    with anyio.fail_after(LOG_WAIT_S):
        params = await receive.receive()
    assert params.logger == "offload"
    return {"level": params.level, **params.data}


async def fire(client: Client, key: str, tool: str = "test.gate") -> str:
    return str(data(await client.call_tool("fire_tool", {"tool": tool, "arguments": {"key": key}}))["task_id"])


async def refused(client: Client, key: str) -> None:
    text = error_text(await client.call_tool("fire_tool", {"tool": "test.gate", "arguments": {"key": key}}))
    assert "tasks queued or running" in text


async def collect(client: Client, task_id: str) -> dict[str, Any]:
    reply = data(await client.call_tool("poll_output", {"task_ids": [task_id], "timeout_s": 10}))
    assert reply["pending"] == [], reply
    return dict(reply["done"][0])


async def test_set_level_filters_what_a_connection_hears(clock: FakeClock, gate: Gate) -> None:
    """At `warning` a finished task (info) is not heard, a refusal at the limit (warning) is; at `info`
    both are. Messages leave in order, so a warning received proves the info before it was filtered."""
    settings = Settings(kill_grace_s=0.5, max_active_per_owner=1)
    async with logged_client(settings, clock, gate) as (client, logs):
        await set_level(client, "warning")
        first = await fire(client, "a")
        await refused(client, "b")
        heard = await next_log(logs)
        assert heard["level"] == "warning" and "max_active_per_owner" in heard["message"], heard
        gate.release("a")
        assert (await collect(client, first))["status"] == "completed"  # its "completed" (info) is filtered out
        second = await fire(client, "c")
        await refused(client, "d")
        heard = await next_log(logs)  # the next message is this refusal, not the completion before it
        assert heard["level"] == "warning" and "task_id" not in heard, heard

        await set_level(client, "info")
        gate.release("c")
        await collect(client, second)
        heard = await next_log(logs)
        assert heard == {
            "level": "info",
            "message": f"task {second} (test.gate) completed",
            "task_id": second,
            "tool": "test.gate",
            "status": "completed",
        }
        failed = await fire(client, "e", tool="test.boom")
        heard = await next_log(logs)
        assert heard["level"] == "info" and heard["task_id"] == failed and heard["status"] == "failed", heard
        assert "exception: RuntimeError: boom e" in heard["message"]


async def test_a_task_queued_behind_a_full_limit_is_a_warning(clock: FakeClock, gate: Gate) -> None:
    async with logged_client(Settings(kill_grace_s=0.5, max_concurrency=1), clock, gate) as (client, logs):
        await set_level(client, "warning")
        running = await fire(client, "runs")
        await gate.wait_entered("runs")
        queued = await fire(client, "waits")
        heard = await next_log(logs)
        assert heard["level"] == "warning" and heard["task_id"] == queued and heard["status"] == "queued", heard
        assert "concurrency limit" in heard["message"]
        gate.release("runs")
        gate.release("waits")
        for task_id in (running, queued):
            assert (await collect(client, task_id))["status"] == "completed"


async def test_nothing_is_sent_before_set_level(clock: FakeClock, gate: Gate) -> None:
    """Opt-in: a connection that never asked hears nothing, then hears what follows its request."""
    async with logged_client(Settings(kill_grace_s=0.5), clock, gate) as (client, logs):
        gate.release("before")
        await collect(client, await fire(client, "before"))
        await set_level(client, "info")
        gate.release("after")
        after = await fire(client, "after")
        await collect(client, after)
        assert (await next_log(logs))["task_id"] == after


async def test_log_messages_and_completions_stay_with_their_owner(gate: Gate) -> None:
    """Over real HTTP with two bearer owners: each hears of and is offered only their own tasks."""
    send, bobs_logs = anyio.create_memory_object_stream[LoggingMessageNotificationParams](100)

    async def on_bobs_log(params: LoggingMessageNotificationParams) -> None:
        await send.send(params)

    tokens = {"alice": "ALICE_TOKEN", "bob": "BOB_TOKEN"}
    async with (
        send,
        bobs_logs,
        web_server(gate, "http", TOKENS, auth_tokens=tokens) as url,
        connect(url, ALICE, era="legacy") as alice,
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {BOB}"}) as http,
        Client(streamable_http_client(url, http_client=http), mode="legacy", logging_callback=on_bobs_log) as bob,
    ):
        await set_level(bob, "debug")
        await set_level(alice, "debug")  # so Alice's news is queued for delivery too, to her alone
        alices = [await fire(alice, f"a{i}") for i in range(3)]
        first = await fire(bob, "b0")
        for key in ("a0", "a1", "a2", "b0"):
            gate.release(key)
        for task_id in alices:
            await collect(alice, task_id)
        await collect(bob, first)
        gate.release("b1")
        last = await fire(bob, "b1")
        await collect(bob, last)
        # Messages leave in order: everything Bob was sent before his last task's news is what he heard.
        heard = [(await next_log(bobs_logs))["task_id"] for _ in range(2)]
        assert sorted(heard) == sorted([first, last]), heard

        template = ResourceTemplateReference(type="ref/resource", uri="task://{task_id}")
        output = ResourceTemplateReference(type="ref/resource", uri="task://{task_id}/output")

        async def offered(client: Client, ref: Any, value: str, name: str = "task_id") -> list[str]:
            return list((await client.complete(ref, {"name": name, "value": value})).completion.values)

        assert await offered(alice, template, "") == alices[::-1]  # newest first
        assert await offered(alice, output, "") == alices[::-1]
        assert await offered(bob, template, "") == [last, first]
        assert await offered(alice, template, alices[1][:6]) == [alices[1]]
        assert await offered(alice, template, first) == []  # typing Bob's whole id reveals nothing
        assert set(await offered(bob, template, alices[0][:3])) <= {first, last}
        assert await offered(alice, template, "", name="other") == []
        assert await offered(alice, PromptReference(type="ref/prompt", name="x"), "") == []
