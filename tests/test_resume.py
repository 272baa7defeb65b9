"""Resumable streamable HTTP (SEP-1699) over real HTTP on 127.0.0.1: a `poll_output` whose connection
drops while it waits is resumed with `Last-Event-ID` and its reply arrives once; another session cannot
resume it; and a server that closes long-waiting streams with a `retry` hint still answers the SDK's client.

The event store is the real one; the test's subclass only tells the test when something was stored or
replayed, so it waits on events instead of sleeping."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from conftest import FakeClock, Gate, data, error_text
from mcp.server.streamable_http import EventCallback, EventId, StreamId
from mcp_types import JSONRPCMessage, JSONRPCResponse
from test_http import connect

from server.app import build_server
from server.auth import Credentials
from server.config import Settings
from server.events import Caller, SessionEvents, current_caller
from server.runtime import Runtime
from server.web import PATHS, web_app
from testkit.fakes import serve

pytestmark = pytest.mark.anyio

WAIT_S = 10.0
VERSION = "2025-11-25"


class ObservedEvents(SessionEvents):
    """The real store; it also sets an event when a response is stored and when a replay is served."""

    def __init__(self) -> None:
        super().__init__()
        self.responses: defaultdict[str, anyio.Event] = defaultdict(anyio.Event)
        self.replayed = anyio.Event()

    async def store_event(self, stream_id: StreamId, message: JSONRPCMessage | None) -> EventId:
        event_id = await super().store_event(stream_id, message)
        if isinstance(message, JSONRPCResponse):
            self.responses[stream_id].set()
        return event_id

    async def replay_events_after(self, last_event_id: EventId, send_callback: EventCallback) -> StreamId | None:
        stream_id = await super().replay_events_after(last_event_id, send_callback)
        if stream_id is not None:
            self.replayed.set()
        return stream_id


@asynccontextmanager
async def resumable_server(gate: Gate, events: SessionEvents, **settings: Any) -> AsyncIterator[str]:
    config = Settings(transport="http", kill_grace_s=0.5, **settings)
    async with Runtime.open(config, extra_tools=gate.specs(), clock=FakeClock(), load_plugins=False) as runtime:
        app = web_app(build_server(runtime), config, Credentials(), events=events)
        async with serve(app, lifespan="on") as (base, _):
            yield base + PATHS["http"]


class Session:
    """One MCP session spoken in raw HTTP, so the test decides exactly when a connection drops."""

    def __init__(self, http: httpx.AsyncClient, url: str) -> None:
        self.http = http
        self.url = url
        self.headers = {"Accept": "application/json, text/event-stream", "mcp-protocol-version": VERSION}

    async def open(self) -> None:
        params = {"protocolVersion": VERSION, "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}
        opening = _request(0, "initialize", params)
        async with self.http.stream("POST", self.url, json=opening, headers=self.headers) as response:
            self.headers["mcp-session-id"] = response.headers["mcp-session-id"]
            await _reply(response, 0)
        notified = await self.http.post(
            self.url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=self.headers
        )
        assert notified.status_code == 202

    async def call(self, request_id: int, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
        body = _request(request_id, "tools/call", {"name": tool, "arguments": arguments})
        async with self.http.stream("POST", self.url, json=body, headers=self.headers) as response:
            return await _reply(response, request_id)

    async def resume(self, last_event_id: str) -> list[tuple[str, dict[str, Any]]]:
        """GET with Last-Event-ID: the (id, message) events replayed, up to the new priming event."""
        headers = {**self.headers, "Accept": "text/event-stream", "Last-Event-ID": last_event_id}
        replayed = []
        async with self.http.stream("GET", self.url, headers=headers) as response:
            assert response.status_code == 200
            async for event_id, payload in _events(response):
                if payload == "":
                    return replayed  # the resumed stream's own priming event: the replay is over
                replayed.append((event_id, json.loads(payload)))
        return replayed  # the server ended the stream: nothing to resume


def _request(request_id: int, method: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}


async def _events(response: httpx.Response) -> AsyncIterator[tuple[str, str]]:
    """(id, data) of each SSE event."""
    event_id, payload = "", []
    async for line in response.aiter_lines():
        if line == "":
            if event_id or payload:
                yield event_id, "\n".join(payload)
            event_id, payload = "", []
        elif line.startswith("id:"):
            event_id = line[3:].strip()
        elif line.startswith("data:"):
            payload.append(line[5:].strip())


async def _reply(response: httpx.Response, request_id: int) -> dict[str, Any]:
    assert response.status_code == 200, response.status_code
    with anyio.fail_after(WAIT_S):
        async for _, payload in _events(response):
            if payload and (message := json.loads(payload)).get("id") == request_id:
                return dict(message["result"])
    raise AssertionError(f"the stream ended without the reply to request {request_id}")


async def test_a_dropped_poll_output_is_resumed_and_its_reply_arrives_once(gate: Gate) -> None:
    events = ObservedEvents()
    async with resumable_server(gate, events, stream_hold_s=0) as url, httpx.AsyncClient(timeout=WAIT_S) as http:
        session = Session(http, url)
        await session.open()
        fired = await session.call(1, "fire_tool", {"tool": "test.gate", "arguments": {"key": "k"}})
        task_id = fired["structuredContent"]["task_id"]

        # poll_output waits; the client reads the stream's priming event, then its connection drops.
        poll = _request(2, "tools/call", {"name": "poll_output", "arguments": {"task_ids": [task_id], "timeout_s": 50}})
        async with http.stream("POST", url, json=poll, headers=session.headers) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            with anyio.fail_after(WAIT_S):
                priming_id, payload = await anext(_events(response))
            assert priming_id and payload == ""
        # While nobody listens, the task finishes and poll_output answers into the store.
        gate.release("k")
        with anyio.fail_after(WAIT_S):
            await events.responses["2"].wait()

        # A different session cannot pick up this stream, even knowing the event id.
        stranger = Session(http, url)
        await stranger.open()
        assert await stranger.resume(priming_id) == []

        replayed = await session.resume(priming_id)
        replies = [(event_id, m) for event_id, m in replayed if m.get("id") == 2]
        assert len(replies) == 1, replayed
        reply_id, reply = replies[0]
        done = reply["result"]["structuredContent"]["done"]
        assert [(t["task_id"], t["status"]) for t in done] == [(task_id, "completed")]
        assert "gate k opened" in done[0]["output"]["text"]
        # Resuming after the reply replays nothing more: it was delivered once.
        assert await session.resume(reply_id) == []
        counts = events.counts()
        assert counts.replays == 2 and counts.refused_replays == 1, counts


async def test_a_long_wait_is_released_with_a_retry_hint_and_the_sdk_client_resumes(gate: Gate) -> None:
    """The server closes the waiting stream (after stream_hold_s); the SDK's own client reconnects after the
    `retry` hint with Last-Event-ID and gets the reply that was sent while it was away."""
    events = ObservedEvents()
    async with (
        resumable_server(gate, events, stream_hold_s=0.05, stream_retry_ms=10) as url,
        connect(url, era="legacy") as client,
    ):
        task_id = data(await client.call_tool("fire_tool", {"tool": "test.gate", "arguments": {"key": "slow"}}))[
            "task_id"
        ]
        replies: list[dict[str, Any]] = []

        async def wait() -> None:
            replies.append(data(await client.call_tool("poll_output", {"task_ids": [task_id], "timeout_s": 50})))

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            with anyio.fail_after(WAIT_S):
                await events.replayed.wait()  # the server let go of the stream and the client came back
            gate.release("slow")
        assert [t["status"] for t in replies[0]["done"]] == ["completed"], replies


async def test_the_event_store_is_bounded_per_session_and_in_all() -> None:
    """Oldest events go first past a session's count or size, and whole idle sessions past the total; an
    event that was dropped cannot be resumed from (the client is told nothing it could misread)."""
    events = SessionEvents(max_events_per_session=5, max_bytes_per_session=100_000, max_bytes=3_000)
    ping = JSONRPCResponse(jsonrpc="2.0", id=1, result={"pad": "x" * 100})
    first = [await events.store_event("1", ping) for _ in range(8)]
    counts = events.counts()
    assert (counts.sessions, counts.events) == (1, 5)
    replayed: list[str] = []

    async def keep(message: Any) -> None:
        replayed.append(message.event_id)

    assert await events.replay_events_after(first[0], keep) is None  # dropped
    assert await events.replay_events_after(first[5], keep) == "1"
    assert replayed == first[6:]
    other = current_caller.set(Caller("local", "another-session"))
    try:
        big = JSONRPCResponse(jsonrpc="2.0", id=2, result={"pad": "y" * 1_000})
        await events.store_event("1", big)
        await events.store_event("1", big)
    finally:
        current_caller.reset(other)
    counts = events.counts()
    assert (counts.sessions, counts.events) == (1, 2), counts  # the idle session went, whole
    assert counts.held_bytes <= 3_000, counts
    assert await events.replay_events_after(first[7], keep) is None


async def test_a_refusal_keeps_its_reason_on_a_releasable_stream(gate: Gate) -> None:
    """With wait_s (a stream the server may release), a refused fire still says why, plainly."""
    events = ObservedEvents()
    async with (
        resumable_server(gate, events, stream_hold_s=0.05, stream_retry_ms=10) as url,
        connect(url, era="legacy") as client,
    ):
        unknown = error_text(await client.call_tool("fire_tool", {"tool": "no.such.tool", "wait_s": 5}))
        assert "Unknown tool 'no.such.tool'" in unknown and "list_fireable_tools" in unknown
        invalid = error_text(await client.call_tool("fire_tool", {"tool": "shell", "arguments": {}, "wait_s": 5}))
        assert "Invalid arguments for 'shell'" in invalid and "Nothing was started" in invalid


async def test_one_owners_flood_never_evicts_another_owners_missed_reply() -> None:
    events = SessionEvents(max_events_per_session=1000, max_bytes_per_session=1_000_000, max_bytes=5_000)
    reply = JSONRPCResponse(jsonrpc="2.0", id=7, result={"done": "alice's poll_output"})

    async def as_caller(owner: str, session: str, stream: str, message: Any) -> str:
        token = current_caller.set(Caller(owner, session))
        try:
            return await events.store_event(stream, message)
        finally:
            current_caller.reset(token)

    priming = await as_caller("alice", "a1", "7", None)
    await as_caller("alice", "a1", "7", reply)
    flood = JSONRPCResponse(jsonrpc="2.0", id=1, result={"pad": "b" * 900})
    for i in range(60):
        await as_caller("bob", f"b{i % 6}", "1", flood)
    assert events.counts().held_bytes <= 5_000
    token = current_caller.set(Caller("alice", "a1"))
    try:
        got: list[Any] = []

        async def keep(message: Any) -> None:
            got.append(message.message)

        assert await events.replay_events_after(priming, keep) == "7"
        assert got == [reply]  # hers survived bob's flood; bob gave way
    finally:
        current_caller.reset(token)
