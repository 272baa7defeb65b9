"""The official MCP Inspector (npm `@modelcontextprotocol/inspector`, CLI mode) as a client nobody here wrote.

`.ci/run` installs it (and Node 22 from the npm registry) and sets MCP_INSPECTOR_BIN; without it these
tests skip locally, and fail in CI, where REQUIRE_MCP_INSPECTOR is set.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from testkit.rawserver import npm_tool, npm_tool_env, served_log, server_env

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


def inspector_path() -> Path:
    return npm_tool("MCP_INSPECTOR_BIN", "MCP Inspector")


async def inspect(tmp_path: Path, *args: str) -> dict[str, Any]:
    """One Inspector run (one connection); its JSON result."""
    inspector = inspector_path()
    env = {**npm_tool_env(tmp_path, inspector), "MCP_CATALOG_PATH": str(tmp_path / "catalog.json")}
    with anyio.fail_after(60):
        done = await anyio.run_process([str(inspector), "--cli", "--format", "json", "-q", *args], env=env, check=False)
    assert done.returncode == 0, (done.returncode, done.stdout.decode(), done.stderr.decode())
    result: dict[str, Any] = json.loads(done.stdout)["result"]
    return result


@asynccontextmanager
async def http_server(tmp_path: Path, **env: str) -> AsyncIterator[str]:
    process = await anyio.open_process(
        [sys.executable, "-m", "server", "--transport", "http", "--port", "0", "--log-level", "INFO"],
        env={**server_env(tmp_path), **env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    async with process:
        try:
            yield (await served_log(process))[0]
        finally:
            process.terminate()
            with anyio.fail_after(10):
                await process.wait()


@pytest.mark.parametrize("era", ["legacy", "modern"])
async def test_inspector_lists_the_tools_over_stdio(tmp_path: Path, era: str) -> None:
    server = [sys.executable, "-m", "server", "--data-dir", str(tmp_path / "data")]
    listed = await inspect(tmp_path, "--protocol-era", era, "--cwd", str(ROOT), "--method", "tools/list", "--", *server)
    names = {tool["name"] for tool in listed["tools"]}
    assert {"fire_tool", "get_cached_output", "poll_output", "run_shell_background", "cancel_task"} <= names


@pytest.mark.parametrize("era", ["legacy", "modern"])
async def test_inspector_fires_then_collects_on_later_connections(tmp_path: Path, era: str) -> None:
    async with http_server(tmp_path) as url:

        async def call(tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
            args = ["--protocol-era", era, "--method", "tools/call", "--tool-name", tool]
            result = await inspect(tmp_path, url, *args, "--tool-args-json", json.dumps(arguments))
            assert not result.get("isError"), result
            structured: dict[str, Any] = result["structuredContent"]
            return structured

        fired = await call("fire_tool", {"tool": "shell", "arguments": {"command": "echo from the inspector"}})
        polled = await call("poll_output", {"task_ids": [fired["task_id"]], "timeout_s": 30})
        assert polled["pending"] == []
        got = await call("get_cached_output", {"task_id": fired["task_id"]})
        assert got["status"] == "completed"
        assert got["output"]["text"] == "from the inspector\n"
        assert got["result"]["exit_code"] == 0


async def test_the_inspector_runs_an_exposed_tool_as_a_task(tmp_path: Path) -> None:
    """With no inline wait at all, only a client that took the task handle and followed it with
    tasks/get can come back with the finished result: the Inspector (2026-07-28) does; on the
    2025-11-25 era it has no tasks extension and gets the "still running" answer instead."""
    async with http_server(tmp_path, OFFLOAD_EXPOSE="shell", OFFLOAD_EXPOSE_WAIT_S="0") as url:
        command = json.dumps({"command": "sleep 0.5; echo done as a task"})
        args = ["--method", "tools/call", "--tool-name", "shell", "--tool-args-json", command]
        modern = await inspect(tmp_path, url, "--protocol-era", "modern", *args)
        assert not modern.get("isError"), modern
        assert modern["structuredContent"]["status"] == "completed"
        assert modern["structuredContent"]["output"]["text"] == "done as a task\n"
        legacy = await inspect(tmp_path, url, "--protocol-era", "legacy", *args)
        assert legacy["structuredContent"]["status"] in ("queued", "running")
        assert legacy["content"][0]["text"].startswith("Still running after the inline wait")
