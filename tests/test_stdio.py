"""The server as MCP clients run it: a subprocess speaking JSON-RPC on stdin/stdout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process
from conftest import TREE, call, finish, live_group_members
from mcp import Client, StdioServerParameters

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def server_env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
        "OFFLOAD_DATA_DIR": str(tmp_path / "data"),
        "OFFLOAD_LOG_LEVEL": "WARNING",
    }


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


class RawServer:
    """A server subprocess spoken to line by line, so every stdout byte is checked."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self._buffer = b""
        self._next_id = 0

    async def send(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send(json.dumps(message).encode() + b"\n")

    async def receive(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            self._buffer += await self.process.stdout.receive()
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)  # anything but JSON-RPC on stdout fails here

    async def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self._next_id += 1
        await self.send({"jsonrpc": "2.0", "id": self._next_id, "method": method, "params": params})
        while True:
            message = await self.receive()
            if message.get("id") == self._next_id:
                return message

    async def handshake(self) -> None:
        reply = await self.request(
            "initialize",
            {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "raw-test", "version": "0"},
            },
        )
        assert reply["result"]["serverInfo"]["name"] == "offload"
        await self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    async def start_tree(self) -> int:
        """Starts a command with two background children; returns its pid once all three exist."""
        reply = await self.request(
            "tools/call",
            {
                "name": "run_shell_background",
                "arguments": {"command": TREE},
            },
        )
        task = reply["result"]["structuredContent"]
        with anyio.fail_after(5):
            while "ready" not in (await self.call("get_cached_output", task_id=task["task_id"]))["output"]["text"]:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        assert len(live_group_members(task["pid"])) == 4
        return int(task["pid"])

    async def call(self, tool: str, **arguments: Any) -> dict[str, Any]:
        reply = await self.request("tools/call", {"name": tool, "arguments": arguments})
        result: dict[str, Any] = reply["result"]["structuredContent"]
        return result


async def _start(tmp_path: Path) -> RawServer:
    process = await anyio.open_process(
        [sys.executable, "-m", "server"],
        env=server_env(tmp_path),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    return RawServer(process)


async def test_stdin_eof_stops_the_server_and_its_processes(tmp_path: Path) -> None:
    server = await _start(tmp_path)
    async with server.process:
        await server.handshake()
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
    server = await _start(tmp_path)
    async with server.process:
        await server.handshake()
        pgid = await server.start_tree()
        server.process.send_signal(signal.SIGTERM)
        with anyio.fail_after(5):
            await server.process.wait()
    assert live_group_members(pgid) == []


async def test_stdin_eof_during_a_long_poll_still_exits_promptly(tmp_path: Path) -> None:
    server = await _start(tmp_path)
    async with server.process:
        await server.handshake()
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
