"""Descriptor exhaustion (issue 22, item 5): the server raises its soft RLIMIT_NOFILE to the hard limit at
start, and where the hard limit itself is low it sheds connections before accept would fail, so an
owner with a token still gets in and runs a tool while someone holds more half-open sockets than the
server has descriptors. A real `offload-mcp --transport http` subprocess under a low limit set in the
child, real sockets on 127.0.0.1 (bounded in count and time), the SDK's client."""

from __future__ import annotations

import re
import resource
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import anyio
import pytest
from anyio.abc import ByteStream, Process
from test_http import ALICE, connect, tool

from testkit.rawserver import served_log, server_env

pytestmark = pytest.mark.anyio

HALF_OPEN = 320
"""More sockets than the child's 256 descriptors."""


def limited(soft: int, hard: int) -> list[str]:
    """`offload-mcp --transport http` started with RLIMIT_NOFILE (soft, hard), set in the child before exec."""
    start = (
        "import os, resource, sys; "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard})); "
        "os.execv(sys.executable, [sys.executable, '-m', 'server', '--transport', 'http', '--port', '0'])"
    )
    return [sys.executable, "-c", start]


@asynccontextmanager
async def limited_server(tmp_path: Path, soft: int, hard: int) -> AsyncIterator[tuple[Process, str, bytearray]]:
    """(process, MCP URL, its log so far and as it comes)."""
    env = {**server_env(tmp_path), "OFFLOAD_AUTH_TOKEN": ALICE, "OFFLOAD_LOG_LEVEL": "INFO"}
    process = await anyio.open_process(
        limited(soft, hard), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    log = bytearray()

    async def drain() -> None:
        assert process.stderr is not None
        async for piece in process.stderr:
            log.extend(piece)

    try:
        url, seen = await served_log(process)
        log += seen.encode()
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain)
            yield process, url, log
            process.terminate()
            with anyio.fail_after(15):
                await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
        await process.aclose()


def open_files_limit(pid: int) -> tuple[int, int]:
    found = re.search(r"Max open files\s+(\d+)\s+(\d+)", Path(f"/proc/{pid}/limits").read_text())
    assert found is not None
    return int(found.group(1)), int(found.group(2))


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="reads /proc/PID/limits (Linux)")
async def test_the_soft_limit_is_raised_to_the_hard_limit_at_start(tmp_path: Path) -> None:
    async with limited_server(tmp_path, 256, 512) as (process, _, log):
        assert open_files_limit(process.pid) == (512, 512)
        assert "RLIMIT_NOFILE) raised from 256 to 512" in log.decode()


@pytest.mark.slow
@pytest.mark.skipif(resource.getrlimit(resource.RLIMIT_NOFILE)[0] < HALF_OPEN + 200, reason="the test's own limit")
async def test_an_owner_gets_in_while_more_half_open_sockets_than_descriptors_are_held(tmp_path: Path) -> None:
    async with limited_server(tmp_path, 256, 256) as (process, url, log), AsyncExitStack() as held:
        port = int(re.findall(r":(\d+)/", url)[0])
        sockets: list[ByteStream] = []
        with anyio.fail_after(30):
            for index in range(HALF_OPEN):  # half of them send part of a request, half nothing at all
                stream = await held.enter_async_context(await anyio.connect_tcp("127.0.0.1", port))
                if index % 2:
                    await stream.send(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                sockets.append(stream)
        with anyio.fail_after(30):
            async with connect(url, ALICE) as client:
                fired = await tool(client, "fire_tool", tool="shell", arguments={"command": "echo ran"}, wait_s=10)
        assert fired["status"] == "completed" and fired["task"]["output"]["text"] == "ran\n", fired
        assert process.returncode is None
        text = log.decode()
        assert "max_connections = 512 lowered to 96" in text, text
        assert "Too many open files" not in text and "out of system resource" not in text, text
