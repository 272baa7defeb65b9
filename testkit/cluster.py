"""Distributed mode as separate processes: front-ends (`offload-mcp --transport http`) and workers
(`offload-mcp worker`) on one real Redis, each with its own data directory, as on separate machines."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
from anyio.abc import Process, TaskGroup
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from testkit.rawserver import server_env

READY = {
    "front-end": rb"serving MCP \(\w+\) on (http://\S+)",
    "worker": rb"worker (\S+) on queues",
}


class Node:
    """One process of the cluster: its role, where it listens (front-ends), its name (workers)."""

    def __init__(self, role: str, process: Process, found: str) -> None:
        self.role = role
        self.process = process
        self.found = found
        self.log = b""
        self._grew = anyio.Event()

    @property
    def url(self) -> str:
        return self.found

    async def wait_for_log(self, pattern: bytes, timeout_s: float = 20.0) -> None:
        """Returns once the node's log (stderr) holds `pattern`: an event on each piece the drain reads."""
        with anyio.fail_after(timeout_s):
            while pattern not in self.log:
                await self._grew.wait()

    def grew(self, piece: bytes) -> None:
        self.log += piece
        self._grew.set()
        self._grew = anyio.Event()

    async def kill_9(self) -> None:
        self.process.kill()
        with anyio.fail_after(5):
            await self.process.wait()


async def start_node(
    tg: TaskGroup,
    tmp_path: Path,
    role: str,
    redis_url: str,
    name: str,
    *flags: str,
    lease_s: float = 2.0,
    config: Path | None = None,
    extra_env: dict[str, str] | None = None,
) -> Node:
    """Starts a front-end or a worker (its data directory `tmp_path/name`) and returns once it says it is
    up; its log is read on (drained) for as long as it runs. `extra_env` adds to its environment."""
    argv = ["worker", *flags] if role == "worker" else ["--transport", "http", "--port", "0", *flags]
    env = {
        **server_env(tmp_path, tmp_path / name),
        "OFFLOAD_REDIS_URL": redis_url,
        "OFFLOAD_LEASE_S": str(lease_s),
        "OFFLOAD_KILL_GRACE_S": "0.5",
        "OFFLOAD_LOG_LEVEL": "INFO",
        "OFFLOAD_REDIS_NAMESPACE": tmp_path.name[-60:],  # one Redis per test session; each test its own keys
        **({} if config is None else {"OFFLOAD_CONFIG": str(config)}),
        **(extra_env or {}),
    }
    process = await anyio.open_process(
        [sys.executable, "-m", "server", *argv],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    seen = b""
    with anyio.fail_after(30):
        async for piece in process.stderr:
            seen += piece
            if found := re.search(READY[role], seen):
                node = Node(role, process, found.group(1).decode())
                node.log = seen
                tg.start_soon(_drain, node)
                return node
    raise AssertionError(f"the {role} never said it was up: {seen.decode(errors='replace')!r}")


async def _drain(node: Node) -> None:
    assert node.process.stderr is not None
    async for piece in node.process.stderr:
        node.grew(piece)


@asynccontextmanager
async def cluster(
    tmp_path: Path,
    redis_url: str,
    *,
    front_ends: int = 2,
    workers: int = 2,
    lease_s: float = 2.0,
    worker_flags: tuple[str, ...] = (),
    config: Path | None = None,
) -> AsyncIterator[list[Node]]:
    """Workers `w0`… (each on its own queue and `any`) and front-ends `f0`…, started at once; the workers
    first in the list. All are stopped at the end (TERM, then KILL)."""
    specs = [("worker", f"w{i}", ("--queue", f"w{i}", "--queue", "any", *worker_flags)) for i in range(workers)]
    specs += [("front-end", f"f{i}", ()) for i in range(front_ends)]
    slots: list[Node | None] = [None] * len(specs)
    try:
        async with anyio.create_task_group() as tg:

            async def start(index: int) -> None:
                role, name, flags = specs[index]
                slots[index] = await start_node(
                    tg, tmp_path, role, redis_url, name, *flags, lease_s=lease_s, config=config
                )

            try:
                async with anyio.create_task_group() as starting:
                    for index in range(len(specs)):
                        starting.start_soon(start, index)
                yield [node for node in slots if node is not None]
            finally:
                await stop_nodes([node for node in slots if node is not None])
                tg.cancel_scope.cancel()  # the log drains
    finally:
        for node in slots:
            if node is not None:
                await node.process.aclose()


async def stop_nodes(nodes: list[Node], timeout_s: float = 10) -> None:
    """TERM, a bounded wait for each to exit, then KILL what is left."""
    for node in nodes:
        if node.process.returncode is None:
            node.process.terminate()
    with anyio.move_on_after(timeout_s):
        for node in nodes:
            await node.process.wait()
    for node in nodes:
        if node.process.returncode is None:
            node.process.kill()
            await node.process.wait()


@asynccontextmanager
async def connect(url: str, era: str = "auto", **client_options: Any) -> AsyncIterator[Client]:
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(httpx2.AsyncClient(timeout=httpx2.Timeout(30, read=120)))
        transport = streamable_http_client(url, http_client=http)
        client = await stack.enter_async_context(Client(transport, mode=era, **client_options))
        yield client
