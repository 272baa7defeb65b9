"""Fixtures: a real Runtime, the real MCP server over it, and a real MCP client on both eras.

The only test-specific parts are two small fireable tools registered through the public
registry interface: `test.gate` (cacheable; each key finishes when the test releases it) and
`test.boom` (raises), so concurrency, caching and crash isolation can be driven without sleeps.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp_types import CallToolResult
from pydantic import BaseModel

from server.app import build_server
from server.config import Settings
from server.runtime import Runtime
from testkit.processes import live_group_members, when_tree_runs
from testkit.redis_server import RedisServer
from tools.context import JSON, ToolContext
from tools.process import portable
from tools.registry import ToolSpec

__all__ = ["live_group_members", "when_tree_runs"]  # the tests import them from here too

ERAS = {"modern": "auto", "legacy": "legacy"}

needs_subreaper = pytest.mark.skipif(
    portable(),
    reason="the portable process core (macOS, OFFLOAD_PORTABLE_PROCESS=1) has no subreaper: a process that leaves "
    "its group and drops the task's marker goes to init/launchd, where nothing ties it to its task",
)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto` (the default, pyproject.toml): half again as many workers as cores. Most tests wait on
    subprocesses, servers and timers far more than they compute, so a core per worker would leave them idle.
    PYTEST_XDIST_AUTO_NUM_WORKERS overrides it; `-n 0` runs everything in one process."""
    if chosen := os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return int(chosen)
    return max(2, (os.cpu_count() or 1) * 3 // 2)


# Tests that each run a cluster (front-ends and workers on Redis, leases of a few seconds): one xdist worker runs
# them one after another, as the serial suite did. Two clusters side by side on two cores starve each other's
# heartbeats past their leases, which the tests then (rightly) report as dead nodes.
CLUSTER_MODULES = {
    "test_chaos_distributed",
    "test_distributed",
    "test_distributed_auth",
    "test_redis_leases",
    "test_worker_table",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.stem in CLUSTER_MODULES:
            item.add_marker(pytest.mark.xdist_group("cluster"))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def private_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test reads the user's config or writes to the user's state directory."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return tmp_path / "state" / "offload"


class FakeClock:
    """Epoch seconds that move only when a test says so."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class GateArgs(BaseModel):
    key: str


class Gate:
    """A cacheable tool whose calls block until the test releases their key."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self._released: dict[str, anyio.Event] = {}
        self.entered: dict[str, anyio.Event] = {}

    def _event(self, table: dict[str, anyio.Event], key: str) -> anyio.Event:
        return table.setdefault(key, anyio.Event())

    def release(self, key: str) -> None:
        self._event(self._released, key).set()

    async def wait_entered(self, key: str, timeout_s: float = 5.0) -> None:
        with anyio.fail_after(timeout_s):
            await self._event(self.entered, key).wait()

    async def handler(self, args: GateArgs, ctx: ToolContext) -> JSON:
        self.calls[args.key] = self.calls.get(args.key, 0) + 1
        self._event(self.entered, args.key).set()
        await self._event(self._released, args.key).wait()
        ctx.write_output(f"gate {args.key} opened\n".encode())
        return {"key": args.key, "call": self.calls[args.key]}

    def specs(self) -> list[ToolSpec]:
        async def boom(args: GateArgs, ctx: ToolContext) -> JSON:
            raise RuntimeError(f"boom {args.key}")

        return [
            ToolSpec(
                name="test.gate",
                description="waits for the test",
                input_model=GateArgs,
                handler=self.handler,
                cacheable=True,
            ),
            ToolSpec(name="test.boom", description="raises", input_model=GateArgs, handler=boom),
        ]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session (loopback, free port, no persistence). Without the binary
    the tests that need it skip, except in CI (`CI` set), where they fail: .ci/run installs it."""
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing in CI: .ci/run installs the Debian package redis-server")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def gate() -> Gate:
    return Gate()


@pytest.fixture
def settings() -> Settings:
    return Settings(kill_grace_s=0.5)


@pytest.fixture
async def runtime(settings: Settings, clock: FakeClock, gate: Gate) -> AsyncIterator[Runtime]:
    async with Runtime.open(settings, extra_tools=gate.specs(), clock=clock, load_plugins=False) as rt:
        yield rt


@pytest.fixture(params=list(ERAS))
async def client(request: pytest.FixtureRequest, runtime: Runtime) -> AsyncIterator[Client]:
    async with Client(build_server(runtime), mode=ERAS[request.param]) as c:
        yield c


@asynccontextmanager
async def open_client(
    settings: Settings, clock: FakeClock, gate: Gate, era: str = "modern"
) -> AsyncIterator[tuple[Runtime, Client]]:
    """For tests that need their own settings."""
    async with (
        Runtime.open(settings, extra_tools=gate.specs(), clock=clock, load_plugins=False) as rt,
        Client(build_server(rt), mode=ERAS[era]) as c,
    ):
        yield rt, c


def data(result: CallToolResult) -> dict[str, Any]:
    """The structured result of a call that must have succeeded."""
    assert not result.is_error, result.content
    assert result.structured_content is not None
    # The text content carries the same JSON, for clients that ignore structured content.
    assert json.loads(result.content[0].text) == result.structured_content  # type: ignore[union-attr]
    return result.structured_content


def error_text(result: CallToolResult) -> str:
    assert result.is_error, result.structured_content
    return result.content[0].text  # type: ignore[union-attr]


async def call(client: Client, mcp_tool: str, **arguments: Any) -> dict[str, Any]:
    return data(await client.call_tool(mcp_tool, arguments))


async def finish(client: Client, task_id: str, timeout_s: float = 20) -> dict[str, Any]:
    """Polls one task to its end and returns its view."""
    reply = await call(client, "poll_output", task_ids=[task_id], timeout_s=timeout_s)
    assert reply["pending"] == [], reply
    return reply["done"][0]


async def start_tree(client: Client, **arguments: Any) -> tuple[str, int]:
    """Starts the tree command; returns (task_id, pgid) once its whole process tree is running."""
    reply = await when_tree_runs(lambda command: call(client, "run_shell_background", command=command, **arguments))
    assert len(live_group_members(reply["pid"])) == 3  # the command shell, two sleeps
    return reply["task_id"], reply["pid"]
