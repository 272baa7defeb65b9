"""The HTTP transports, served for real on 127.0.0.1 and spoken to by the SDK's own HTTP and SSE clients:
tasks outlive connections, bearer tokens are owners that cannot see each other's tasks, and the
server refuses what it must (401, bad Host/Origin, oversize bodies, a non-loopback bind without a token)."""

from __future__ import annotations

import json
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import pytest
from conftest import ERAS, FakeClock, Gate, data, error_text, live_group_members, when_tree_runs
from mcp import Client, StdioServerParameters
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

from server.app import build_server
from server.auth import Credentials, check_bind
from server.cache import Clock
from server.config import LOCAL_OWNER, Settings
from server.errors import ConfigError
from server.runtime import Runtime
from server.web import PATHS, web_app
from testkit.fakes import serve
from testkit.rawserver import served_log, server_env

ALICE = "alice-token-" + "a" * 20
BOB = "bob-token-" + "b" * 20
TOKENS = {"ALICE_TOKEN": ALICE, "BOB_TOKEN": BOB}
TRANSPORTS = ["http", "sse"]

pytestmark = pytest.mark.anyio

MCP_POST_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
PING = {"jsonrpc": "2.0", "id": 1, "method": "ping"}


@asynccontextmanager
async def web_server(
    gate: Gate, transport: str, environ: dict[str, str] | None = None, clock: Clock | None = None, **settings: Any
) -> AsyncIterator[str]:
    """A real Offload HTTP server in this process (so `gate` steers its tasks); yields the endpoint URL. Its
    clock is a FakeClock unless given one (a real one where other processes share its records)."""
    config = Settings(transport=transport, kill_grace_s=0.5, **settings)  # type: ignore[arg-type]
    credentials = Credentials.load(config, environ or {})
    clock = FakeClock() if clock is None else clock
    async with Runtime.open(config, extra_tools=gate.specs(), clock=clock, load_plugins=False) as runtime:
        app = web_app(build_server(runtime), config, credentials)
        async with serve(app, lifespan="on") as (base, _):
            yield base + PATHS[transport]


@asynccontextmanager
async def connect(url: str, token: str | None = None, era: str = "modern") -> AsyncIterator[Client]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    if url.endswith(PATHS["sse"]):
        async with Client(sse_client(url, headers=headers), mode=ERAS[era]) as client:
            yield client
        return
    async with (
        httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=120)) as http,
        Client(streamable_http_client(url, http_client=http), mode=ERAS[era]) as client,
    ):
        yield client


async def tool(client: Client, name: str, **arguments: Any) -> dict[str, Any]:
    return data(await client.call_tool(name, arguments))


@pytest.mark.parametrize("era", list(ERAS))
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_task_outlives_its_connection(gate: Gate, transport: str, era: str) -> None:
    async with web_server(gate, transport) as url:
        async with connect(url, era=era) as first:
            fired = await tool(first, "fire_tool", tool="test.gate", arguments={"key": "k"})
            await gate.wait_entered("k")
        # The first client is gone; its task is still running, then finishes with nobody connected.
        gate.release("k")
        async with connect(url, era=era) as second:
            reply = await tool(second, "poll_output", task_ids=[fired["task_id"]], timeout_s=10)
            assert reply["done"][0]["status"] == "completed"
            assert reply["done"][0]["result"] == {"key": "k", "call": 1}
            assert "gate k opened" in reply["done"][0]["output"]["text"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_owners_cannot_see_each_others_tasks(gate: Gate, transport: str) -> None:
    tokens = {"alice": "ALICE_TOKEN", "bob": "BOB_TOKEN"}
    async with (
        web_server(gate, transport, TOKENS, auth_tokens=tokens) as url,
        connect(url, ALICE) as alice,
        connect(url, BOB) as bob,
    ):
        task_id = (await tool(alice, "fire_tool", tool="test.gate", arguments={"key": "mine"}))["task_id"]
        await gate.wait_entered("mine")
        never = secrets.token_urlsafe(16)
        for name, arguments in [
            ("get_cached_output", {"task_id": "{id}"}),
            ("poll_output", {"task_ids": ["{id}"], "timeout_s": 0}),
            ("cancel_task", {"task_id": "{id}"}),
        ]:
            theirs = _answer(await bob.call_tool(name, _with_id(arguments, task_id)))
            unknown = _answer(await bob.call_tool(name, _with_id(arguments, never)))
            assert theirs.replace(task_id, "ID") == unknown.replace(never, "ID"), name
            assert "Unknown task id" in theirs, name
        assert (await tool(bob, "list_tasks"))["tasks"] == []
        # The same call by Bob is his own task: results are never shared across owners.
        bobs = await tool(bob, "fire_tool", tool="test.gate", arguments={"key": "mine"})
        assert bobs["task_id"] != task_id and not bobs["deduplicated"] and not bobs["cached"]
        assert [t["task_id"] for t in (await tool(bob, "list_tasks"))["tasks"]] == [bobs["task_id"]]
        assert [t["task_id"] for t in (await tool(alice, "list_tasks"))["tasks"]] == [task_id]
        # Bob's attempts changed nothing: Alice's task is still hers and still running.
        assert (await tool(alice, "get_cached_output", task_id=task_id))["status"] == "running"
        gate.release("mine")
        assert (await tool(alice, "poll_output", task_ids=[task_id]))["done"][0]["status"] == "completed"


def _answer(result: Any) -> str:
    """An error's text, or a reply's JSON (poll_output lists unknown ids instead of failing)."""
    return error_text(result) if result.is_error else json.dumps(result.structured_content, sort_keys=True)


def _with_id(arguments: dict[str, Any], task_id: str) -> dict[str, Any]:
    return {k: [task_id] if v == ["{id}"] else task_id if v == "{id}" else v for k, v in arguments.items()}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_requests_without_the_right_token_get_401(gate: Gate, transport: str) -> None:
    environ = {"OFFLOAD_AUTH_TOKEN": ALICE}
    async with web_server(gate, transport, environ) as url, httpx.AsyncClient() as http:
        method = http.post if transport == "http" else http.get
        for headers in [{}, {"Authorization": "Bearer wrong-" + ALICE}, {"Authorization": ALICE}]:
            response = await method(url, headers=headers)
            assert response.status_code == 401, headers
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert ALICE not in response.text
        async with connect(url, ALICE) as client:  # the right token gets through
            assert (await tool(client, "list_tasks"))["tasks"] == []


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_foreign_host_and_origin_are_rejected(gate: Gate, transport: str) -> None:
    """DNS-rebinding protection: a page on evil.example that resolves to 127.0.0.1 gets nowhere."""
    async with web_server(gate, transport) as url, httpx.AsyncClient() as http:
        for headers, refused in [({"Host": "evil.example"}, 421), ({"Origin": "http://evil.example"}, 403)]:
            if transport == "http":
                response = await http.post(url, json=PING, headers={**MCP_POST_HEADERS, **headers})
            else:
                response = await http.get(url, headers=headers)
            assert response.status_code == refused, headers


async def test_oversize_request_bodies_are_refused(gate: Gate) -> None:
    async with web_server(gate, "http", max_request_body_bytes=64 * 1024) as url, httpx.AsyncClient() as http:
        body = b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"pad":"' + b"x" * 100_000 + b'"}}'
        response = await http.post(url, content=body, headers=MCP_POST_HEADERS)
        assert response.status_code == 413


def test_a_public_bind_without_a_token_refuses_to_start() -> None:
    with pytest.raises(ConfigError, match=r"refusing to listen on '0\.0\.0\.0' without a bearer token"):
        check_bind("0.0.0.0", Credentials(), "OFFLOAD_AUTH_TOKEN")
    check_bind("0.0.0.0", Credentials((("default", ALICE.encode()),)), "OFFLOAD_AUTH_TOKEN")
    check_bind("::1", Credentials(), "OFFLOAD_AUTH_TOKEN")


def test_a_named_token_that_is_missing_or_short_is_an_error() -> None:
    with pytest.raises(ConfigError, match="BOB_TOKEN\\) is missing"):
        Credentials.load(Settings(auth_tokens={"bob": "BOB_TOKEN"}), {})
    with pytest.raises(ConfigError, match="too short"):
        Credentials.load(Settings(), {"OFFLOAD_AUTH_TOKEN": "short"})
    with pytest.raises(ConfigError, match="the same bearer token"):
        Credentials.load(Settings(auth_tokens={"a": "ALICE_TOKEN", "b": "SAME"}), {**TOKENS, "SAME": ALICE})
    loaded = Credentials.load(Settings(auth_tokens={"bob": "BOB_TOKEN"}), TOKENS)
    assert loaded.owner_of(f"Bearer {BOB}".encode()) == "bob"
    assert loaded.owner_of(f"Bearer {ALICE}".encode()) is None


@pytest.mark.slow
def test_the_cli_refuses_a_public_bind_without_a_token(tmp_path: Path) -> None:
    env = {k: v for k, v in server_env(tmp_path).items() if k != "OFFLOAD_AUTH_TOKEN"}
    done = subprocess.run(
        [sys.executable, "-m", "server", "--transport", "http", "--host", "0.0.0.0", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "refusing to listen on '0.0.0.0' without a bearer token" in done.stderr
    assert done.stdout == ""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("transport", "signum"), [("http", signal.SIGTERM), ("sse", signal.SIGTERM), ("http", signal.SIGINT)]
)
async def test_a_signal_stops_an_http_server_and_its_commands(tmp_path: Path, transport: str, signum: int) -> None:
    """A real server process: a command tree started over HTTP dies with the server, which exits 0."""
    process = await anyio.open_process(
        [sys.executable, "-m", "server", "--transport", transport, "--port", "0", "--log-level", "INFO"],
        env=server_env(tmp_path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        url, log = await served_log(process)
        assert f"no shell_roots for {LOCAL_OWNER!r}: their shell commands may run in any directory" in log
        async with connect(url) as client:
            reply = await when_tree_runs(
                lambda command: tool(client, "run_shell_background", command=command), timeout_s=10
            )
        pgid = reply["pid"]
        assert len(live_group_members(pgid)) == 3
        process.send_signal(signum)
        with anyio.fail_after(10):
            assert await process.wait() == 0
        assert live_group_members(pgid) == []
        # The store was flushed: the next server on the same data dir knows how the task ended.
        params = StdioServerParameters(command=sys.executable, args=["-m", "server"], env=server_env(tmp_path))
        async with Client(params) as client:
            view = await tool(client, "get_cached_output", task_id=reply["task_id"])
            assert view["status"] == "cancelled" and view["error"]["kind"] == "shutdown", view
    finally:
        if process.returncode is None:
            process.kill()
        await process.aclose()


INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}},
}
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_session_belongs_to_the_owner_who_opened_it(gate: Gate, transport: str) -> None:
    """Knowing another owner's session id gets you nothing: the server answers as for no such session."""
    tokens = {"alice": "ALICE_TOKEN", "bob": "BOB_TOKEN"}
    as_alice, as_bob = ({"Authorization": f"Bearer {t}"} for t in (ALICE, BOB))
    async with web_server(gate, transport, TOKENS, auth_tokens=tokens) as url, httpx.AsyncClient() as http:
        if transport == "http":
            opened = await http.post(url, json=INITIALIZE, headers={**MCP_POST_HEADERS, **as_alice})
            session = {"mcp-session-id": opened.headers["mcp-session-id"]}
            theirs = await http.post(url, json=INITIALIZED, headers={**MCP_POST_HEADERS, **as_bob, **session})
            unknown = {"mcp-session-id": secrets.token_hex(16)}
            nobodys = await http.post(url, json=INITIALIZED, headers={**MCP_POST_HEADERS, **as_bob, **unknown})
            mine = await http.post(url, json=INITIALIZED, headers={**MCP_POST_HEADERS, **as_alice, **session})
        else:
            async with http.stream("GET", url, headers=as_alice) as stream:
                reader = stream.aiter_text()  # kept: a collected reader closes the stream, and the session
                first = await anext(reader)
                endpoint = re.search(r"data: (\S+)", first)
                assert endpoint is not None, first
                posts = url.removesuffix("/sse") + endpoint.group(1)
                theirs = await http.post(posts, json=INITIALIZE, headers=as_bob)
                nobodys = await http.post(
                    re.sub("session_id=[0-9a-f]+", "session_id=" + "0" * 32, posts), json=INITIALIZE, headers=as_bob
                )
                mine = await http.post(posts, json=INITIALIZE, headers=as_alice)
        assert theirs.status_code == 404 and (theirs.status_code, theirs.text) == (nobodys.status_code, nobodys.text)
        assert mine.status_code in (200, 202), mine.text


def test_host_checks_follow_the_bind() -> None:
    from server.web import security

    loopback = security(Settings(transport="http"))
    assert loopback.enable_dns_rebinding_protection and "127.0.0.1:*" in loopback.allowed_hosts
    listed = security(Settings(transport="http", host="0.0.0.0", allowed_hosts=("offload.lan:*",)))
    assert listed.enable_dns_rebinding_protection and listed.allowed_hosts == ["offload.lan:*"]
    public = security(Settings(transport="http", host="0.0.0.0"))
    assert not public.enable_dns_rebinding_protection


async def test_the_task_limit_is_per_owner(gate: Gate) -> None:
    """One owner at its limit of queued + running tasks is refused clearly; another owner is not held up."""
    tokens = {"alice": "ALICE_TOKEN", "bob": "BOB_TOKEN"}
    async with (
        web_server(gate, "http", TOKENS, auth_tokens=tokens, max_active_per_owner=2) as url,
        connect(url, ALICE) as alice,
        connect(url, BOB) as bob,
    ):
        for key in ("a1", "a2"):
            await tool(alice, "fire_tool", tool="test.gate", arguments={"key": key})
        refused = error_text(await alice.call_tool("fire_tool", {"tool": "test.gate", "arguments": {"key": "a3"}}))
        assert "You already have 2 tasks queued or running" in refused and "cancel_task" in refused, refused
        bobs = await tool(bob, "fire_tool", tool="test.gate", arguments={"key": "b1"})
        assert bobs["status"] in ("queued", "running")
        gate.release("a1")
        await tool(alice, "poll_output", task_ids=[(await tool(alice, "list_tasks"))["tasks"][-1]["task_id"]])
        assert (await tool(alice, "fire_tool", tool="test.gate", arguments={"key": "a3"}))["task_id"]
        for key in ("a2", "a3", "b1"):
            gate.release(key)
