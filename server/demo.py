"""`offload-mcp demo`: the product in thirty seconds, through a real MCP client over stdio.

It starts `offload-mcp` as a subprocess the way Claude Desktop does, fires shell tasks of
known length at once, keeps working while they run, shows progress, collects everything in
one `poll_output`, and compares the wall time with the sum of the task lengths.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from mcp import Client, StdioServerParameters

JOBS = [("build", 3.0), ("tests", 2.5), ("lint", 1.5), ("docs", 2.0)]


def _command(name: str, seconds: float) -> str:
    steps = 5
    return (
        f'for i in $(seq 1 {steps}); do echo "{name}: step $i/{steps}"; sleep {seconds / steps:.2f}; done; '
        f'echo "{name}: done"'
    )


def _say(text: str) -> None:
    """The demo is the client, in a process of its own: its stdout is the user's terminal. The server it
    starts is another process, whose stdout is the protocol."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


async def run_demo(server_argv: list[str]) -> int:
    params = StdioServerParameters(command=sys.executable, args=["-m", "server", *server_argv])
    async with Client(params) as client:
        _say(f"Connected to offload over stdio ({client.protocol_version}).")
        started = time.perf_counter()
        ids: dict[str, str] = {}
        for name, seconds in JOBS:
            reply = await client.call_tool(
                "fire_tool", {"tool": "shell", "arguments": {"command": _command(name, seconds)}}
            )
            task_id = _structured(reply)["task_id"]
            ids[task_id] = name
            fired_ms = (time.perf_counter() - started) * 1000
            _say(f"  fired {name:<6} ({seconds:.1f} s of work) -> task {task_id[:8]}…  at +{fired_ms:.0f} ms")

        _say("Meanwhile the assistant keeps working; a peek at one running task:")
        peek = _structured(await client.call_tool("get_cached_output", {"task_id": next(iter(ids))}))
        _say(
            f"  {ids[peek['task_id']]}: status={peek['status']}, {peek['output']['total_bytes']} bytes of output so far"
        )

        async def progress(progress: float, total: float | None, message: str | None) -> None:
            _say(f"  progress: {message}")

        _say("Collecting everything with one poll_output:")
        poll = _structured(
            await client.call_tool("poll_output", {"task_ids": list(ids), "timeout_s": 30}, progress_callback=progress)
        )
        wall_s = time.perf_counter() - started
        for view in poll["done"]:
            last = view["output"]["text"].strip().splitlines()[-1]
            _say(
                f"  {ids[view['task_id']]:<6} {view['status']:<9} exit={view['result']['exit_code']}  "
                f"{view['result']['duration_s']:.2f} s  last line: {last!r}"
            )
        serial_s = sum(seconds for _, seconds in JOBS)
        _say(
            f"All {len(poll['done'])} tasks took {wall_s:.2f} s together; one after another they take "
            f"{serial_s:.1f} s ({serial_s / wall_s:.1f}x faster)."
        )
        return 0 if not poll["pending"] and all(v["status"] == "completed" for v in poll["done"]) else 1


def _structured(result: Any) -> dict[str, Any]:
    if result.is_error:
        raise RuntimeError(result.content[0].text)
    data: dict[str, Any] = result.structured_content
    return data
