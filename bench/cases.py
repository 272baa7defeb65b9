"""The benchmark cases. Each returns named figures; ratios are measured side by side in one run."""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
from mcp import Client, StdioServerParameters
from pydantic import BaseModel

from server.config import Settings
from server.runtime import Runtime
from tools.context import JSON, ToolContext
from tools.registry import ToolSpec


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    target: str = ""
    met: bool | None = None


@dataclass
class CaseResult:
    case: str
    figures: list[Figure] = field(default_factory=list)

    def add(self, name: str, value: float, unit: str, target: str = "", met: bool | None = None) -> None:
        self.figures.append(Figure(name, value, unit, target, met))


def _quantiles_ms(samples_s: list[float]) -> tuple[float, float]:
    ordered = sorted(samples_s)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return statistics.median(ordered) * 1000, p99 * 1000


@asynccontextmanager
async def stdio_client(mode: str = "legacy") -> AsyncIterator[Client]:
    env = {**os.environ, "OFFLOAD_LOG_LEVEL": "WARNING"}
    params = StdioServerParameters(command=sys.executable, args=["-m", "server"], env=env)
    async with Client(params, mode=mode) as client:
        yield client


async def _timed(call: Callable[[], Awaitable[Any]], n: int) -> list[float]:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return samples


async def fire_latency(quick: bool) -> CaseResult:
    return await _fire_latency(quick, gap_s=0.0)


async def fire_latency_idle(quick: bool) -> CaseResult:
    return await _fire_latency(quick, gap_s=0.005)


async def _fire_latency(quick: bool, gap_s: float) -> CaseResult:
    """fire_tool (a real shell spawn each) against ping and a no-op tools/call, interleaved on one
    stdio connection (2025-11-25 era: ping is gone from 2026-07-28).

    Back to back (`gap_s=0`), the spawn a fire starts after its reply lands on the next call;
    with a gap (an assistant thinks for seconds between calls) each call meets an idle server.
    """
    n = 200 if quick else 1000
    result = CaseResult("fire latency (stdio" + (f", {gap_s * 1000:g} ms apart)" if gap_s else ", back to back)"))
    async with stdio_client("legacy") as client:
        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "ping": client.send_ping,
            "no-op tools/call": lambda: client.call_tool("list_tasks", {"limit": 1, "status": "queued"}),
            "fire_tool": lambda: client.call_tool("fire_tool", {"tool": "shell", "arguments": {"command": "true"}}),
        }
        samples: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(50):  # warm up every path
            for call in calls.values():
                await call()
        for _ in range(n):
            for name, call in calls.items():
                samples[name] += await _timed(call, 1)
                if gap_s:
                    await anyio.sleep(gap_s)
    medians = {}
    for name, timings in samples.items():
        medians[name], p99 = _quantiles_ms(timings)
        target = "<= 2 ms" if name == "fire_tool" else ""
        result.add(f"{name} median", medians[name], "ms", target, medians[name] <= 2.0 if target else None)
        result.add(f"{name} p99", p99, "ms")
    ratio = medians["fire_tool"] / medians["ping"]
    result.add("fire_tool / ping", ratio, "x", "<= 1.3", ratio <= 1.3)
    result.add("no-op tools/call / ping", medians["no-op tools/call"] / medians["ping"], "x")
    result.add("fire_tool / no-op tools/call", medians["fire_tool"] / medians["no-op tools/call"], "x")
    return result


class _NoArgs(BaseModel):
    n: int = 0


async def _instant(args: _NoArgs, ctx: ToolContext) -> JSON:
    return {"n": args.n}


INSTANT = ToolSpec(name="bench.instant", description="returns at once", input_model=_NoArgs, handler=_instant)


async def inproc_fire(quick: bool) -> CaseResult:
    """`Executor.fire` alone: validate, record, schedule."""
    n = 2000 if quick else 20000
    result = CaseResult("in-process fire")
    async with Runtime.open(Settings(), extra_tools=[INSTANT], load_plugins=False) as runtime:
        executor = runtime.executor
        samples = []
        for i in range(n):
            started = time.perf_counter()
            executor.fire("local", "bench.instant", {"n": i})
            samples.append(time.perf_counter() - started)
            if i % 100 == 99:
                await anyio.lowlevel.checkpoint()  # let the scheduled tasks run, as a server between requests would
    med_ms, p99_ms = _quantiles_ms(samples)
    result.add("fire median", med_ms * 1000, "µs", "<= 100 µs", med_ms * 1000 <= 100)
    result.add("fire p99", p99_ms * 1000, "µs")
    return result


async def shell_fan_out(quick: bool) -> CaseResult:
    """N x `sleep 1` fired over stdio, then one poll_output(all)."""
    n = 50 if quick else 200
    result = CaseResult(f"shell fan-out ({n} x sleep 1)")
    async with stdio_client("legacy") as client:
        started = time.perf_counter()
        ids = []
        for _ in range(n):
            reply = await client.call_tool("fire_tool", {"tool": "shell", "arguments": {"command": "sleep 1"}})
            ids.append(reply.structured_content["task_id"])  # type: ignore[index]
        fired_s = time.perf_counter() - started
        poll = await client.call_tool("poll_output", {"task_ids": ids, "timeout_s": 55, "max_bytes": 0})
        total_s = time.perf_counter() - started
        done = poll.structured_content["done"]  # type: ignore[index]
    ok = len(done) == n and all(v["status"] == "completed" for v in done)
    result.add("all fired after", fired_s * 1000, "ms")
    result.add("all results in hand after", total_s, "s", "<= 1.5 s", total_s <= 1.5 and ok)
    return result


async def naive_vs_fire(quick: bool) -> CaseResult:
    """20 x 1 s commands: one blocking call after another, against fire-all-then-collect."""
    n = 5 if quick else 20
    result = CaseResult(f"vs the naive way ({n} x 1 s)")
    async with stdio_client("legacy") as client:
        started = time.perf_counter()
        for _ in range(n):  # the naive way: each call blocks until its command is done
            await client.call_tool("fire_tool", {"tool": "shell", "arguments": {"command": "sleep 1"}, "wait_s": 30})
        naive_s = time.perf_counter() - started
        started = time.perf_counter()
        ids = []
        for _ in range(n):
            reply = await client.call_tool("fire_tool", {"tool": "shell", "arguments": {"command": "sleep 1"}})
            ids.append(reply.structured_content["task_id"])  # type: ignore[index]
        await client.call_tool("poll_output", {"task_ids": ids, "timeout_s": 55})
        offload_s = time.perf_counter() - started
    speedup = naive_s / offload_s
    result.add("one after another", naive_s, "s")
    result.add("fire all, then collect", offload_s, "s")
    result.add("speed-up", speedup, "x", ">= 15" if n == 20 else "", speedup >= 15 if n == 20 else None)
    return result


CASES: dict[str, Callable[[bool], Awaitable[CaseResult]]] = {
    "fire_latency": fire_latency,
    "fire_latency_idle": fire_latency_idle,
    "inproc_fire": inproc_fire,
    "shell_fan_out": shell_fan_out,
    "naive": naive_vs_fire,
}
