"""The server as MCP clients run it: a subprocess speaking JSON-RPC on stdin/stdout."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import anyio
import pytest
from conftest import call, finish, live_group_members
from mcp import Client, StdioServerParameters

from testkit.rawserver import server_env, start_server

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.mark.parametrize("era", ["auto", "legacy"])
async def test_fire_and_collect_over_stdio(tmp_path: Path, era: str) -> None:
    params = StdioServerParameters(command=sys.executable, args=["-m", "server"], env=server_env(tmp_path))
    async with Client(params, mode=era) as client:
        fired = await call(client, "fire_tool", tool="shell", arguments={"command": "echo over stdio"})
        assert (await call(client, "list_tasks"))["tasks"]  # the connection stays usable while the task runs
        view = await finish(client, fired["task_id"])
        assert view["status"] == "completed"
        assert view["output"]["text"] == "over stdio\n"
        got = await call(client, "get_cached_output", task_id=fired["task_id"], tail_bytes=6)
        assert got["output"]["text"] == "stdio\n"


async def test_stdin_eof_stops_the_server_and_its_processes(tmp_path: Path) -> None:
    server = await start_server(tmp_path)
    async with server.process:
        pgid = await server.start_tree()
        closed_at = time.monotonic()
        assert server.process.stdin is not None
        await server.process.stdin.aclose()
        with anyio.fail_after(5):
            code = await server.process.wait()
        elapsed_s = time.monotonic() - closed_at
    assert code == 0
    assert elapsed_s < 2.0, elapsed_s
    assert live_group_members(pgid) == []


async def test_sigterm_stops_the_server_and_its_processes(tmp_path: Path) -> None:
    server = await start_server(tmp_path)
    async with server.process:
        pgid = await server.start_tree()
        server.process.send_signal(signal.SIGTERM)
        with anyio.fail_after(5):
            await server.process.wait()
    assert live_group_members(pgid) == []


async def test_stdin_eof_during_a_long_poll_still_exits_promptly(tmp_path: Path) -> None:
    server = await start_server(tmp_path)
    async with server.process:
        pgid = await server.start_tree()
        fired = await server.request(
            "tools/call", {"name": "fire_tool", "arguments": {"tool": "shell", "arguments": {"command": "sleep 300"}}}
        )
        task_id = fired["result"]["structuredContent"]["task_id"]
        await server.send(
            {
                "jsonrpc": "2.0",
                "id": 99,
                "method": "tools/call",
                "params": {"name": "poll_output", "arguments": {"task_ids": [task_id], "timeout_s": 50}},
            }
        )
        assert server.process.stdin is not None
        await server.process.stdin.aclose()
        with anyio.fail_after(5):
            await server.process.wait()
    assert live_group_members(pgid) == []


async def test_an_oversize_message_is_answered_with_an_error_and_skipped(tmp_path: Path) -> None:
    """Never read whole, never a crash: the request gets an error naming the limit; the next one works."""
    server = await start_server(tmp_path, "--log-level", "ERROR")
    async with server.process:
        huge = "x" * (2 * 1024 * 1024)  # the default limit is 1 MiB
        reply = await server.request("tools/call", {"name": "fire_tool", "arguments": {"tool": huge}})
        assert reply["error"]["code"] == -32600
        assert "above this server's limit of 1048576" in reply["error"]["message"]
        listed = await server.call("list_tasks")
        assert listed["tasks"] == []
        await server.process.stdin.aclose()  # type: ignore[union-attr]
        with anyio.fail_after(5):
            assert await server.process.wait() == 0


async def test_malformed_calls_are_answered_and_the_server_keeps_serving(tmp_path: Path) -> None:
    """What the SDK's client would never send, a raw speaker can: each gets an answer, none a crash."""
    server = await start_server(tmp_path, "--log-level", "ERROR")
    async with server.process:
        for params in [
            {"name": "fire_tool", "arguments": "not an object"},
            {"name": "fire_tool", "arguments": [1, 2]},
            {"name": "poll_output", "arguments": None},
            {"name": 5, "arguments": {}},
            {"name": "no_such_tool", "arguments": {}},
            {"arguments": {"tool": "shell"}},
        ]:
            reply = await server.request("tools/call", params)
            assert "error" in reply or reply["result"].get("isError"), (params, reply)
        # Params that are not an object: the SDK drops such a message unanswered; what matters here
        # is that the server goes on answering the next ones.
        await server.send({"jsonrpc": "2.0", "id": 99, "method": "tools/call", "params": "garbage"})
        assert (await server.call("list_tasks"))["tasks"] == []
        await server.process.stdin.aclose()  # type: ignore[union-attr]
        with anyio.fail_after(5):
            assert await server.process.wait() == 0
