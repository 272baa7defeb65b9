"""An upstream MCP server (stdio) that misbehaves on request, for tests/test_proxy.py.

Tools that take `events` write lines to that path (a FIFO the test reads): "started NAME" once the
call runs, "cancelled NAME" when `notifications/cancelled` reaches it. Run with `--fail-at-start`
it writes to stderr and exits 3 before speaking MCP; with `--id-last` it writes each answer's id
last, as servers built on the TypeScript SDK do; with `--hold-start FIFO` it speaks only once it has read a
line from FIFO.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import warnings
from typing import Annotated, Any

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.stdio import stdio_server
from mcp_types import ToolAnnotations
from pydantic import Field

warnings.simplefilter("ignore")  # the SDK's deprecation notes would fill the stderr tail the tests read
server = MCPServer("fixture")


def _tell(events: str | None, line: str) -> None:
    if events:
        with open(events, "a", encoding="utf-8") as sink:
            sink.write(line + "\n")


@server.tool(annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True))
async def add(a: int, b: Annotated[int, Field(ge=0)]) -> int:
    """Adds two numbers (b at least 0)."""
    return a + b


@server.tool()
async def counter(key: str) -> str:
    """Not annotated read-only: never reused unless configured cacheable. Counts its calls per key."""
    counts[key] = counts.get(key, 0) + 1
    return f"{key} {counts[key]}"


counts: dict[str, int] = {}


@server.tool()
async def steps(count: int, ctx: Context) -> str:
    """Reports progress `count` times and logs once, then returns."""
    await ctx.info("stepping")
    for step in range(1, count + 1):
        await ctx.report_progress(step, count, f"step {step}")
    return f"did {count} steps"


@server.tool()
async def fail(reason: str) -> str:
    """Fails with isError."""
    raise ToolError(reason)


@server.tool()
async def crash(code: int, events: str | None = None) -> str:
    """Dies mid-call, after a word on stderr."""
    _tell(events, "started crash")
    sys.stderr.write(f"fixture: crashing with {code} on purpose\n")
    sys.stderr.flush()
    os._exit(code)


@server.tool()
async def hang(events: str | None = None) -> str:
    """Never returns, but honours cancellation (and says so)."""
    _tell(events, "started hang")
    try:
        await anyio.sleep_forever()
    finally:
        _tell(events, "cancelled hang")
    return "unreachable"


@server.tool()
async def stubborn(events: str | None = None) -> str:
    """Ignores cancellation for an hour."""
    _tell(events, "started stubborn")
    with anyio.CancelScope(shield=True):
        await anyio.sleep_forever()  # until the process is stopped
    return "unreachable"


@server.tool()
async def freeze(events: str | None = None) -> str:
    """Blocks the whole server until it is stopped (a wait in the event loop's thread): it answers nothing,
    health checks included."""
    _tell(events, "started freeze")
    threading.Event().wait()
    return "unreachable"


@server.tool()
async def big(size: int) -> str:
    """Returns `size` bytes of text."""
    return "x" * size


@server.tool()
async def held(release: str, events: str | None = None) -> str:
    """Returns the first line it reads from the FIFO `release` (the test writes it when it is done)."""
    _tell(events, "started held")
    line = await anyio.to_thread.run_sync(_first_line, release)
    return f"released: {line}"


def _first_line(path: str) -> str:
    with open(path, encoding="utf-8") as source:
        return source.readline().strip()


@server.tool()
async def environment() -> dict[str, Any]:
    """The variables this process was given."""
    return {"names": sorted(os.environ)}


@server.tool()
async def grow(ctx: Context) -> str:
    """Adds the tool `added` and tells the client its tool list changed."""

    async def added() -> str:
        """A tool that did not exist at start."""
        return "I was added"

    server.add_tool(added)
    await ctx.notify_tools_changed()  # 2026-07-28 clients hear it on their subscriptions/listen stream
    await ctx.session.send_tool_list_changed()  # earlier ones as a plain notification
    return "grown"


class _IdLast:
    """stdout for `--id-last`: each answer written with its id last, as the TypeScript SDK writes it
    (`{"result":…,"jsonrpc":"2.0","id":5}`)."""

    def __init__(self) -> None:
        self._out = anyio.wrap_file(open(sys.stdout.fileno(), "w", encoding="utf-8", closefd=False))  # noqa: SIM115

    async def write(self, text: str) -> None:
        message = json.loads(text)
        if "result" in message:
            message = {"result": message.pop("result"), **message}
        await self._out.write(json.dumps(message) + "\n")

    async def flush(self) -> None:
        await self._out.flush()


async def _serve_id_last() -> None:
    lowlevel = server._lowlevel_server
    async with stdio_server(stdout=_IdLast()) as (read, write):  # type: ignore[arg-type]
        await lowlevel.run(read, write, lowlevel.create_initialization_options())


if __name__ == "__main__":
    if "--fail-at-start" in sys.argv:
        sys.stderr.write("fixture: refusing to start: the configuration is wrong\n")
        sys.exit(3)
    if "--hold-start" in sys.argv:  # a server slow to start: until the test writes a line to this FIFO
        _first_line(sys.argv[sys.argv.index("--hold-start") + 1])
    if "--id-last" in sys.argv:
        anyio.run(_serve_id_last)
    else:
        server.run("stdio")
