"""A server subprocess spoken to in raw JSON-RPC, line by line, so every stdout byte is checked."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process

from testkit.processes import live_group_members, when_tree_runs


def server_env(tmp_path: Path, data_dir: Path | None = None) -> dict[str, str]:
    return {
        **os.environ,
        "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
        "OFFLOAD_DATA_DIR": str(data_dir or tmp_path / "data"),
        "OFFLOAD_LOG_LEVEL": "WARNING",
    }


async def start_server(
    tmp_path: Path, *flags: str, data_dir: Path | None = None, env: dict[str, str] | None = None
) -> RawServer:
    process = await anyio.open_process(
        [sys.executable, "-m", "server", *flags],
        env={**server_env(tmp_path, data_dir), **(env or {})},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    server = RawServer(process)
    await server.handshake()
    return server


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
        """Starts a command with two background children; returns its pid once all of them exist."""
        task = await when_tree_runs(lambda command: self.call("run_shell_background", command=command))
        assert len(live_group_members(task["pid"])) == 3
        return int(task["pid"])

    async def call(self, mcp_tool: str, **arguments: Any) -> dict[str, Any]:
        reply = await self.request("tools/call", {"name": mcp_tool, "arguments": arguments})
        result: dict[str, Any] = reply["result"]["structuredContent"]
        return result


async def served_log(process: anyio.abc.Process) -> tuple[str, str]:
    """Reads the server's log (stderr) until it says where it listens: that URL, and the log so far."""
    assert process.stderr is not None
    seen = b""
    with anyio.fail_after(20):
        async for piece in process.stderr:
            seen += piece
            if found := re.search(rb"serving MCP \(\w+\) on (http://\S+)", seen):
                return found.group(1).decode(), seen.decode()
    raise AssertionError(f"the server never said where it listens: {seen.decode()!r}")


def npm_tool(variable: str, what: str) -> Path:
    """A client nobody here wrote, installed from npm by `.ci/run` (which names it in `variable` and sets
    REQUIRE_`variable`'s stem so its absence fails CI); elsewhere the test is skipped, saying how to get it."""
    found = os.environ.get(variable)
    if found and Path(found).is_file():
        return Path(found)
    required = "REQUIRE_" + variable.removesuffix("_BIN")
    if os.environ.get(required):
        pytest.fail(f"{required} is set but {variable} ({found!r}) is not the {what}")
    pytest.skip(f"{what} not installed (.ci/run installs it and sets {variable})")


def npm_tool_env(tmp_path: Path, tool: Path) -> dict[str, str]:
    """The server's test environment, with the tool's own `node` (22) first on PATH and a private HOME."""
    return {
        **server_env(tmp_path),
        "PATH": f"{tool.parent}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path / "home"),
    }
