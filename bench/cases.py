"""The benchmark cases. Each returns named figures; ratios are measured side by side in one run."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest.mock import patch

import anyio
import anyio.lowlevel
import httpx
from mcp import Client, StdioServerParameters
from pydantic import BaseModel

from server.config import Settings
from server.runtime import Runtime
from server.tasks import Task
from tools.context import JSON, ToolContext
from tools.registry import ToolSpec
from tools.sandbox import as_root, unprivileged_ids


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
async def stdio_client(
    mode: str = "legacy", *flags: str, env_extra: dict[str, str] | None = None
) -> AsyncIterator[Client]:
    """A real `offload-mcp` subprocess over stdio, on a fresh data directory."""
    with tempfile.TemporaryDirectory(prefix="offload-bench-") as data:
        env = {**os.environ, "OFFLOAD_LOG_LEVEL": "WARNING", "OFFLOAD_DATA_DIR": data, **(env_extra or {})}
        params = StdioServerParameters(command=sys.executable, args=["-m", "server", *flags], env=env)
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


async def http_fire_latency(quick: bool) -> CaseResult:
    """The same three calls over streamable HTTP (one connection, legacy era for ping), calls 5 ms apart."""
    n = 100 if quick else 500
    result = CaseResult("fire latency (streamable HTTP, 5 ms apart)")
    async with http_server() as url, Client(url, mode="legacy") as client:
        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "ping": client.send_ping,
            "no-op tools/call": lambda: client.call_tool("list_tasks", {"limit": 1, "status": "queued"}),
            "fire_tool": lambda: client.call_tool("fire_tool", {"tool": "shell", "arguments": {"command": "true"}}),
        }
        samples: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(20):
            for call in calls.values():
                await call()
        for _ in range(n):
            for name, call in calls.items():
                samples[name] += await _timed(call, 1)
                await anyio.sleep(0.005)
    for name, timings in samples.items():
        median, p99 = _quantiles_ms(timings)
        result.add(f"{name} median", median, "ms")
        result.add(f"{name} p99", p99, "ms")
    return result


@asynccontextmanager
async def http_server() -> AsyncIterator[str]:
    """`offload-mcp --transport http` on a free port; yields its /mcp URL once it listens."""
    import subprocess

    with tempfile.TemporaryDirectory(prefix="offload-bench-") as data:
        env = {**os.environ, "OFFLOAD_LOG_LEVEL": "INFO", "OFFLOAD_DATA_DIR": data}
        command = [sys.executable, "-m", "server", "--transport", "http", "--port", "0"]
        async with await anyio.open_process(
            command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        ) as process:
            from testkit.rawserver import served_log  # the tests' reader of the server's log

            url, _ = await served_log(process)
            async with anyio.create_task_group() as tg:
                tg.start_soon(_drain, process.stderr)  # a full pipe would stall the server's logging
                try:
                    yield url
                finally:
                    process.terminate()


async def _drain(stream: Any) -> None:
    async for _ in stream:
        pass


class _NoArgs(BaseModel):
    n: int = 0


async def _instant(args: _NoArgs, ctx: ToolContext) -> JSON:
    return {"n": args.n}


INSTANT = ToolSpec(name="bench.instant", description="returns at once", input_model=_NoArgs, handler=_instant)


async def inproc_fire(quick: bool) -> CaseResult:
    """`Executor.fire` alone: validate, record, schedule."""
    n = 2000 if quick else 20000
    result = CaseResult("in-process fire")
    async with bench_runtime(max_active_per_owner=n + 1) as runtime:
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
    return await _shell_fan_out(quick, concurrent=False)


async def shell_fan_out_parallel(quick: bool) -> CaseResult:
    return await _shell_fan_out(quick, concurrent=True)


async def _shell_fan_out(quick: bool, concurrent: bool) -> CaseResult:
    """N x `sleep 1` fired over stdio, then one poll_output(all).

    Sequential: each fire_tool waits for the previous reply. Concurrent: all calls in flight at
    once, as a client sends an assistant's parallel tool calls.
    """
    n = 50 if quick else 200
    result = CaseResult(f"shell fan-out ({n} x sleep 1, {'concurrent' if concurrent else 'one by one'})")
    async with stdio_client("legacy", "--max-concurrency", str(n)) as client:
        pid = server_pid()
        cpu_before = cpu_s(pid)
        started = time.perf_counter()
        ids: list[str] = []

        async def fire() -> None:
            ids.append(await _fire(client, "sleep 1"))

        async with anyio.create_task_group() as tg:
            for _ in range(n):
                if concurrent:
                    tg.start_soon(fire)
                else:
                    await fire()
        fired_s = time.perf_counter() - started
        poll = _data(await client.call_tool("poll_output", {"task_ids": ids, "timeout_s": 55, "max_bytes": 0}))
        total_s = time.perf_counter() - started
        cpu_per_command_ms = (cpu_s(pid) - cpu_before) / n * 1000
    ok = len(poll["done"]) == n and all(v["status"] == "completed" for v in poll["done"])
    result.add("all fired after", fired_s * 1000, "ms")
    result.add("all results in hand after", total_s, "s", "<= 1.3 s", total_s <= 1.3 and ok)
    result.add("server CPU per command", cpu_per_command_ms, "ms")
    return result


async def sleep_32(quick: bool) -> CaseResult:
    """32 x `sleep 1` fired one by one over stdio and collected: what Offload adds to 1 s of work."""
    result = CaseResult("32 x sleep 1 (one by one)")
    overheads_ms = []
    for _ in range(2 if quick else 5):
        async with stdio_client("legacy") as client:
            await _fire(client, "true")  # warm: the first spawn pays for imports
            started = time.perf_counter()
            ids = [await _fire(client, "sleep 1") for _ in range(32)]
            poll = _data(await client.call_tool("poll_output", {"task_ids": ids, "timeout_s": 30, "max_bytes": 0}))
            overheads_ms.append((time.perf_counter() - started - 1.0) * 1000)
            assert len(poll["done"]) == 32
            assert all(v["status"] == "completed" for v in poll["done"])
    median = statistics.median(overheads_ms)
    result.add("overhead (wall - 1 s) median", median, "ms", "<= 45 ms", median <= 45)
    result.add("overhead worst", max(overheads_ms), "ms")
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


# ---- helpers that read the server process from /proc ----


def server_pid() -> int:
    """The `python -m server` child this process started (the stdio client spawns it)."""
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == me and b"server" in cmdline:
            return int(entry.name)
    raise RuntimeError("no server child process found")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int | str = "self", field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for {pid}")


def _data(result: Any) -> dict[str, Any]:
    if result.is_error:
        raise RuntimeError(result.content[0].text)
    data: dict[str, Any] = result.structured_content
    return data


async def _fire(client: Client, command: str, **extra: Any) -> str:
    reply = await client.call_tool("fire_tool", {"tool": "shell", "arguments": {"command": command}, **extra})
    return str(_data(reply)["task_id"])


class _Seconds(BaseModel):
    seconds: float = 1.0


async def _sleep_tool(args: _Seconds, ctx: ToolContext) -> JSON:
    await anyio.sleep(args.seconds)
    return {"slept_s": args.seconds}


SLEEP = ToolSpec(name="bench.sleep", description="sleeps", input_model=_Seconds, handler=_sleep_tool)


@asynccontextmanager
async def bench_runtime(**settings: Any) -> AsyncIterator[Runtime]:
    with tempfile.TemporaryDirectory(prefix="offload-bench-") as data:
        config = Settings(data_dir=Path(data), **settings)
        async with Runtime.open(config, extra_tools=[INSTANT, SLEEP], load_plugins=False) as runtime:
            yield runtime


# ---- the cases ----


async def inproc_fan_out(quick: bool) -> CaseResult:
    """2,000 tasks of an async tool that takes 1 s, fired in-process, then awaited."""
    n = 500 if quick else 2000
    result = CaseResult(f"in-process fan-out ({n} x 1 s)")
    async with bench_runtime(max_concurrency=n, max_active_per_owner=n) as runtime:
        started = time.perf_counter()
        tasks = [runtime.executor.fire("local", "bench.sleep", {"seconds": 1.0}).task for _ in range(n)]
        fired_s = time.perf_counter() - started
        done, timed_out = await runtime.executor.wait(tasks, 30, "all")
        total_s = time.perf_counter() - started
    ok = not timed_out and all(t.status == "completed" for t in done)
    result.add("all fired after", fired_s * 1000, "ms")
    result.add("all done after", total_s, "s", "<= 1.3 s", ok and total_s <= 1.3)
    return result


async def idle_waiting(quick: bool) -> CaseResult:
    """500 running commands and a poll_output waiting: server CPU time while nothing happens."""
    n, wait_s = (100, 3.0) if quick else (500, 10.0)
    result = CaseResult(f"idle waiting ({n} running, {wait_s:g} s poll)")
    async with stdio_client("legacy", "--max-concurrency", str(n + 10)) as client:
        ids = [await _fire(client, "sleep 60") for _ in range(n)]
        pid = server_pid()
        while _data(await client.call_tool("list_tasks", {"status": "queued", "limit": 1}))["tasks"]:  # noqa: ASYNC110
            await anyio.sleep(0.1)  # until every command is spawned
        await anyio.sleep(0.5)
        before = cpu_s(pid)
        reply = _data(await client.call_tool("poll_output", {"task_ids": ids[:100], "timeout_s": wait_s}))
        used = cpu_s(pid) - before
        for task_id in ids:
            await client.call_tool("cancel_task", {"task_id": task_id})
    result.add("server CPU during the wait", used, "s", "<= 0.05 s", used <= 0.05 and reply["timed_out"])
    return result


async def output_capture(quick: bool) -> CaseResult:
    """A command writing 200 MB as fast as it can: capture rate and the server's peak memory."""
    size = 50_000_000 if quick else 200_000_000
    result = CaseResult(f"output capture ({size // 1_000_000} MB)")
    async with stdio_client("legacy") as client:
        pid = server_pid()
        base_mib = rss_mib(pid)
        started = time.perf_counter()
        task_id = await _fire(client, f"head -c {size} /dev/zero")
        view = _data(await client.call_tool("poll_output", {"task_ids": [task_id], "timeout_s": 55, "max_bytes": 0}))
        elapsed_s = time.perf_counter() - started
        peak_mib = rss_mib(pid, "VmHWM")
    captured = view["done"][0]["result"]["output_bytes"]
    rate = captured / elapsed_s / 1e6
    result.add("captured", captured / 1e6, "MB")
    result.add("rate", rate, "MB/s", ">= 200 MB/s", rate >= 200 and captured == size)
    result.add("server RSS before", base_mib, "MiB")
    result.add("server peak RSS", peak_mib, "MiB", "<= 150 MiB", peak_mib <= 150)
    return result


async def responsiveness(quick: bool) -> CaseResult:
    """fire_tool latency while 200 commands stream output and a CPU-heavy command runs."""
    streams, n = (50, 100) if quick else (200, 300)
    result = CaseResult(f"responsiveness ({streams} streaming + CPU hog)")
    async with stdio_client("legacy", "--max-concurrency", str(streams + n + 10)) as client:
        busy = [await _fire(client, "yes offload | head -c 20000000") for _ in range(streams)]
        busy.append(await _fire(client, f"{sys.executable} -c 'while True: pass'", timeout_s=60))
        samples = await _timed(
            lambda: client.call_tool("fire_tool", {"tool": "shell", "arguments": {"command": "true"}}), n
        )
        for task_id in busy:
            await client.call_tool("cancel_task", {"task_id": task_id})
    med_ms, p99_ms = _quantiles_ms(samples)
    result.add("fire_tool median", med_ms, "ms")
    result.add("fire_tool p99", p99_ms, "ms", "<= 10 ms", p99_ms <= 10)
    return result


async def memory(quick: bool) -> CaseResult:
    """Resident memory after 10k / 50k / 100k fire+finish cycles (in-process: this process is the server)."""
    marks = (2_000, 10_000, 20_000) if quick else (10_000, 50_000, 100_000)
    result = CaseResult("memory (fire + finish cycles)")
    async with bench_runtime() as runtime:
        executor = runtime.executor
        done = 0
        started = time.perf_counter()
        for mark in marks:
            while done < mark:
                batch = [executor.fire("local", "bench.instant", {"n": done + i}).task for i in range(500)]
                await executor.wait(batch, 30, "all")
                done += len(batch)
            result.add(f"RSS after {mark:,}", rss_mib(), "MiB")
        rate = done / (time.perf_counter() - started)
    first, last = result.figures[0].value, result.figures[-1].value
    result.add("growth first -> last mark", last - first, "MiB", "flat (< 10 MiB)", last - first < 10)
    result.add("cycles per second", rate, "/s")
    return result


async def store_fire(quick: bool) -> CaseResult:
    """`Executor.fire` with the store on disk, on tmpfs, and the SQL insert alone."""
    n = 2000 if quick else 10000
    result = CaseResult("fire with the durable store")
    medians: dict[str, float] = {}
    for label, where in (("disk", None), ("tmpfs", "/dev/shm")):
        with tempfile.TemporaryDirectory(prefix="offload-bench-", dir=where) as data:
            settings = Settings(data_dir=Path(data), max_active_per_owner=n + 1)
            async with Runtime.open(settings, extra_tools=[INSTANT], load_plugins=False) as runtime:
                samples = []
                for i in range(n):
                    began = time.perf_counter()
                    runtime.executor.fire("local", "bench.instant", {"n": i})
                    samples.append(time.perf_counter() - began)
                    if i % 100 == 99:
                        await anyio.lowlevel.checkpoint()
                medians[label] = _quantiles_ms(samples)[0] * 1000
                result.add(
                    f"fire median, data dir on {label}", medians[label], "µs", "<= 100 µs", medians[label] <= 100
                )
    return result


async def shutdown(quick: bool) -> CaseResult:
    """stdin closed → server exited, with five running command trees to kill."""
    runs = 3 if quick else 10
    result = CaseResult("shutdown on stdin EOF")
    from testkit.rawserver import start_server  # the tests' raw JSON-RPC speaker

    timings = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="offload-bench-") as data:
            server = await start_server(Path(data))
            async with server.process:
                for _ in range(5):
                    await server.call("run_shell_background", command="sleep 300 & sleep 300; wait")
                began = time.perf_counter()
                assert server.process.stdin is not None
                await server.process.stdin.aclose()
                await server.process.wait()
                timings.append(time.perf_counter() - began)
    med_ms, worst_ms = statistics.median(timings) * 1000, max(timings) * 1000
    result.add("median", med_ms, "ms")
    result.add("worst", worst_ms, "ms", "<= 2000 ms", worst_ms <= 2000)
    return result


NOTIFY_COMMAND = "sleep 0.05; date +%s.%N"
"""The command's last act is to print the wall-clock time: the figures are from then to the client knowing."""


async def notify_latency(quick: bool) -> CaseResult:
    """How soon after a command ends does the client know, over stdio: a resource subscription
    (2025-11-25), a listen stream (2026-07-28), a waiting poll_output, and the tasks extension
    (fastmcp-tasks, which polls tasks/get with a backoff)."""
    runs = 5 if quick else 30
    result = CaseResult("completion news (stdio)")
    ways = {
        "subscribe (2025-11-25)": _via_subscription,
        "listen (2026-07-28)": _via_listen,
        "poll_output waiting": _via_poll,
        "tasks extension (fastmcp-tasks)": _via_tasks_extension,
    }
    for name, way in ways.items():
        lags = [lag for lag in await way(runs) if lag is not None]
        med_ms, _ = _quantiles_ms(lags)
        result.add(f"{name} median", med_ms, "ms")
        result.add(f"{name} worst", max(lags) * 1000, "ms")
    return result


def _lag(output: str) -> float:
    return time.time() - float(output.strip().splitlines()[-1])


async def _via_subscription(runs: int) -> list[float]:
    """Each command waits on a FIFO until the subscription is in place, then finishes."""
    import warnings

    from mcp_types import ResourceUpdatedNotification

    heard: dict[str, anyio.Event] = {}

    async def on_message(message: Any) -> None:
        if isinstance(message, ResourceUpdatedNotification) and message.params.uri in heard:
            heard[message.params.uri].set()

    lags = []
    with tempfile.TemporaryDirectory(prefix="offload-bench-") as data:
        env = {**os.environ, "OFFLOAD_LOG_LEVEL": "WARNING", "OFFLOAD_DATA_DIR": data}
        params = StdioServerParameters(command=sys.executable, args=["-m", "server"], env=env)
        async with Client(params, mode="legacy", message_handler=on_message) as client:
            for run in range(runs):
                fifo = Path(data) / f"hold-{run}"
                os.mkfifo(fifo)
                command = f"head -c 1 {fifo} >/dev/null; {NOTIFY_COMMAND}"
                reply = _data(await client.call_tool("run_shell_background", {"command": command}))
                uri = reply["resource"]
                heard[uri] = anyio.Event()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    await client.subscribe_resource(uri)
                await anyio.to_thread.run_sync(fifo.write_text, "x")
                while True:  # an update may be the start; the finish is the one wanted
                    with anyio.fail_after(30):
                        await heard[uri].wait()
                    received = time.time()
                    heard[uri] = anyio.Event()
                    if (lag := await _lag_if_done(client, reply["task_id"], received)) is not None:
                        lags.append(lag)
                        break
    return lags


async def _via_listen(runs: int) -> list[float]:
    lags = []
    async with stdio_client("auto") as client:
        for _ in range(runs):
            async with client.listen(resources_list_changed=False, resource_subscriptions=["tasks://recent"]) as sub:
                task_id = await _fire(client, NOTIFY_COMMAND)
                with anyio.fail_after(30):
                    async for _event in sub:
                        received = time.time()
                        if (lag := await _lag_if_done(client, task_id, received)) is not None:
                            lags.append(lag)
                            break
    return lags


async def _lag_if_done(client: Client, task_id: str, received: float) -> float | None:
    """Seconds from the command's printed end to `received`, once the task is complete (news may be its start)."""
    view = _data(await client.call_tool("get_cached_output", {"task_id": task_id}))
    if view["status"] != "completed":
        return None
    return received - float(view["output"]["text"].strip())


async def _via_poll(runs: int) -> list[float]:
    lags = []
    async with stdio_client() as client:
        for _ in range(runs):
            task_id = await _fire(client, NOTIFY_COMMAND)
            reply = _data(await client.call_tool("poll_output", {"task_ids": [task_id], "timeout_s": 30}))
            lags.append(_lag(reply["done"][0]["output"]["text"]))
    return lags


async def _via_tasks_extension(runs: int) -> list[float]:
    from fastmcp import Client as FastMCPClient
    from fastmcp.client.transports import StdioTransport
    from fastmcp_tasks.client import call_tool_task

    lags = []
    with tempfile.TemporaryDirectory(prefix="offload-bench-") as data:
        env = {**os.environ, "OFFLOAD_LOG_LEVEL": "WARNING", "OFFLOAD_DATA_DIR": data, "OFFLOAD_EXPOSE": "shell"}
        transport = StdioTransport(command=sys.executable, args=["-m", "server"], env=env)
        async with FastMCPClient(transport) as client:
            for _ in range(runs):
                handle = await call_tool_task(client, "shell", {"command": NOTIFY_COMMAND})
                done = await handle.result()
                lags.append(_lag(done.structured_content["output"]["text"]))  # type: ignore[index]
    return lags


async def client_reuse(quick: bool) -> CaseResult:
    """500 `http.request` tasks: the shared client against a fresh client per request; and 200 GitHub
    reads fired then collected against the same reads made one after another. Local servers."""
    from testkit.fakes import GITHUB_TOKEN, SlowReads, github_app, plain_app, serve  # the tests' local servers

    n_http, n_github = (100, 20) if quick else (500, 200)
    result = CaseResult("client reuse (local servers)")
    with patch.dict(os.environ, {"GITHUB_TOKEN": GITHUB_TOKEN}):  # the environment is restored after
        async with (
            serve(plain_app()) as (web, _),
            serve(github_app(SlowReads(until=lambda: anyio.sleep(0.2)))) as (gh_url, gh_traffic),  # 200 ms upstream
            bench_runtime(github_base_url=gh_url, max_concurrency=256, max_active_per_owner=1000) as runtime,
        ):
            executor = runtime.executor
            started = time.perf_counter()
            tasks = [executor.fire("local", "http.request", {"url": f"{web}/hello?i={i}"}).task for i in range(n_http)]
            await executor.wait(tasks, 60, "all")
            shared_s = time.perf_counter() - started

            started = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for i in range(n_http):
                    tg.start_soon(_fresh_client_get, f"{web}/hello?i={i}")
            fresh_s = time.perf_counter() - started

            def read(i: int) -> Task:
                arguments = {"owner": "o", "repo": "slow", "number": i}
                return executor.fire("local", "github.get_issue", arguments, use_cache=False).task

            started = time.perf_counter()
            await executor.wait([read(i) for i in range(1, n_github + 1)], 60, "all")
            concurrent_s = time.perf_counter() - started
            started = time.perf_counter()
            for i in range(1, n_github + 1):
                await executor.wait([read(i)], 60, "all")
            sequential_s = time.perf_counter() - started
    result.add(f"{n_http} GETs, shared client", shared_s * 1000, "ms")
    result.add(f"{n_http} GETs, a client per request", fresh_s * 1000, "ms")
    result.add("per-request / shared", fresh_s / shared_s, "x")
    result.add(f"{n_github} GitHub reads (200 ms each), fired then collected", concurrent_s, "s")
    result.add(f"{n_github} GitHub reads, one after another", sequential_s, "s")
    result.add("sequential / concurrent (GitHub limit: 8 at once)", sequential_s / concurrent_s, "x")
    result.add("TCP connections the GitHub server saw", len(gh_traffic.connections), "")
    return result


async def _fresh_client_get(url: str) -> None:
    async with httpx.AsyncClient() as client:
        (await client.get(url)).raise_for_status()


async def sandbox(quick: bool) -> CaseResult:
    """The bubblewrap sandbox's cost (issue 12): a fire's reply, a fire until its `true` is done, and 32 x
    `sleep 1` fired at once then collected, each with shell_sandbox = "bwrap" against "none"."""
    n = 50 if quick else 300
    result = CaseResult("sandbox: bwrap against none (stdio)")
    figures: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="offload-bench-root-") as root:
        if as_root():  # a root server's sandboxed commands run as nobody, who must be able to write the root
            os.chown(root, *unprivileged_ids())
        for kind in ("none", "bwrap"):
            env = {"OFFLOAD_SHELL_SANDBOX": kind, "OFFLOAD_SHELL_ROOTS": root}
            async with stdio_client("legacy", env_extra=env) as client:
                fire = lambda: client.call_tool("fire_tool", {"tool": "shell", "arguments": {"command": "true"}})  # noqa: E731
                done = lambda: client.call_tool(  # noqa: E731
                    "fire_tool", {"tool": "shell", "arguments": {"command": "true"}, "wait_s": 10}
                )
                for _ in range(20):
                    await fire()
                    await done()
                replies, finishes = [], []
                for _ in range(n):
                    replies += await _timed(fire, 1)
                    await anyio.sleep(0.005)
                    finishes += await _timed(done, 1)
                fan_s = []
                for _ in range(1 if quick else 3):
                    started = time.perf_counter()
                    ids: list[str] = []

                    async def one(into: list[str] = ids) -> None:
                        into.append(await _fire(client, "sleep 1"))

                    async with anyio.create_task_group() as tg:
                        for _ in range(32):
                            tg.start_soon(one)
                    poll = _data(await client.call_tool("poll_output", {"task_ids": ids, "timeout_s": 55}))
                    if len(poll["done"]) != 32 or any(v["status"] != "completed" for v in poll["done"]):
                        raise RuntimeError(f"the fan-out did not complete: {poll}")
                    fan_s.append(time.perf_counter() - started)
            figures[kind] = {
                "reply": _quantiles_ms(replies)[0],
                "done": _quantiles_ms(finishes)[0],
                "fan_out": statistics.median(fan_s),
            }
            result.add(f"{kind}: fire_tool reply median", figures[kind]["reply"], "ms")
            result.add(f"{kind}: fire until `true` done median", figures[kind]["done"], "ms")
            result.add(f"{kind}: 32 x sleep 1, all results after", figures[kind]["fan_out"], "s")
    result.add("reply, bwrap / none", figures["bwrap"]["reply"] / figures["none"]["reply"], "x")
    result.add("fire until done, bwrap / none", figures["bwrap"]["done"] / figures["none"]["done"], "x")
    overhead = {kind: figures[kind]["fan_out"] - 1.0 for kind in figures}
    ratio = overhead["bwrap"] / max(overhead["none"], 1e-3)
    result.add("fan-out overhead (past 1 s), bwrap / none", ratio, "x", "<= 1.5", ratio <= 1.5)
    return result


async def proxy(quick: bool) -> CaseResult:
    """Proxy mode (issue 15): `time.get_current_time` of `mcp-server-time`, warm, called directly and fired
    through an `offload-mcp` subprocess (fire_tool with wait_s, so the reply carries the result), one after
    another; then 50 at once on the one upstream session, both ways. Same run, same machine."""
    n = 30 if quick else 200
    result = CaseResult("proxy (mcp-server-time)")
    command = shutil.which("mcp-server-time") or str(Path(sys.executable).with_name("mcp-server-time"))
    upstream = StdioServerParameters(command=command, args=[])
    arguments = {"timezone": "UTC"}
    with tempfile.TemporaryDirectory(prefix="offload-bench-") as folder:
        config = Path(folder) / "offload.toml"
        config.write_text(f'[mcp_servers.time]\ncommand = {json.dumps(command)}\nstart = "eager"\n')
        async with Client(upstream, mode="auto") as direct, stdio_client("auto", "--config", str(config)) as offload:

            async def call_direct() -> None:
                assert not (await direct.call_tool("get_current_time", arguments)).is_error

            async def call_through() -> None:
                reply = await offload.call_tool(
                    "fire_tool",
                    {"tool": "time.get_current_time", "arguments": arguments, "use_cache": False, "wait_s": 10},
                )
                assert reply.structured_content is not None
                assert reply.structured_content["status"] == "completed"

            await _timed(call_direct, 5)
            await _timed(call_through, 5)  # warm: sessions started, code paths run once
            direct_s, through_s = [], []
            for _ in range(n // 10):  # interleaved, so drift on a shared machine hits both alike
                direct_s += await _timed(call_direct, 10)
                through_s += await _timed(call_through, 10)

            async def at_once(call: Callable[[], Awaitable[None]]) -> float:
                started = time.perf_counter()
                async with anyio.create_task_group() as tg:
                    for _ in range(50):
                        tg.start_soon(call)
                return time.perf_counter() - started

            fifty_direct_s = await at_once(call_direct)
            fifty_through_s = await at_once(call_through)
    engine_direct_s, engine_s = await _proxy_engine(n, command, arguments)
    direct_ms, _ = _quantiles_ms(direct_s)
    through_ms, through_p99_ms = _quantiles_ms(through_s)
    overhead_ms = through_ms - direct_ms
    result.add("direct call median", direct_ms, "ms")
    result.add("through Offload median", through_ms, "ms")
    result.add("through Offload p99", through_p99_ms, "ms")
    result.add("overhead", overhead_ms, "ms", "<= +2 ms", overhead_ms <= 2)
    result.add("through / direct", through_ms / direct_ms, "x")
    result.add("50 at once, direct", fifty_direct_s * 1000, "ms")
    result.add("50 at once, through Offload", fifty_through_s * 1000, "ms")
    engine_direct_ms, engine_ms = _quantiles_ms(engine_direct_s)[0], _quantiles_ms(engine_s)[0]
    result.add("in-process: session call median", engine_direct_ms, "ms")
    result.add("in-process: fire + wait median", engine_ms, "ms")
    result.add("in-process: engine overhead", engine_ms - engine_direct_ms, "ms")
    return result


async def _proxy_engine(n: int, command: str, arguments: dict[str, Any]) -> tuple[list[float], list[float]]:
    """The engine alone, without the MCP hop to Offload: `Executor.fire` + `wait` against a call on the very
    session the fired task uses."""
    servers = {"time": {"command": command, "start": "eager"}}
    async with bench_runtime(mcp_servers=servers, max_active_per_owner=10 * n) as runtime:
        executor = runtime.executor
        upstream = runtime.upstreams.upstreams["time"] if runtime.upstreams else None
        assert upstream is not None
        assert upstream.current is not None
        session = upstream.current.client

        async def direct() -> None:
            await session.call_tool("get_current_time", arguments)

        async def through() -> None:
            task = executor.fire("local", "time.get_current_time", arguments, use_cache=False).task
            await executor.wait([task], 10, "all")

        await _timed(direct, 5)
        await _timed(through, 5)
        direct_s, through_s = [], []
        for _ in range(n // 10):
            direct_s += await _timed(direct, 10)
            through_s += await _timed(through, 10)
    return direct_s, through_s


async def input_round_trip(quick: bool) -> CaseResult:
    """send_input to a running `cat`, then poll_output(wait_for=its echo): until the answer is readable, over
    stdio, with stdin "pipe" and in a terminal (pty)."""
    n = 50 if quick else 300
    result = CaseResult("input round trip (stdio: send_input -> echo readable)")
    async with stdio_client("legacy") as client:
        for mode, extra in (("pipe", {"stdin": "pipe"}), ("pty", {"pty": True})):
            task_id = await _fire_shell(client, "stty -echo 2>/dev/null; cat", extra)
            samples = []
            for i in range(n + 10):
                started = time.perf_counter()
                await client.call_tool("send_input", {"task_id": task_id, "text": f"line {i}\n"})
                reply = _data(await client.call_tool("poll_output", {"task_ids": [task_id], "wait_for": f"^line {i}$"}))
                assert not reply["pending"], reply
                if i >= 10:  # the first ones warm up
                    samples.append(time.perf_counter() - started)
            await client.call_tool("cancel_task", {"task_id": task_id})
            median, p99 = _quantiles_ms(samples)
            result.add(f"{mode} median", median, "ms", "<= 10 ms", median <= 10.0)
            result.add(f"{mode} p99", p99, "ms")
    return result


async def _fire_shell(client: Client, command: str, extra: dict[str, Any]) -> str:
    reply = _data(await client.call_tool("run_shell_background", {"command": command, **extra}))
    return str(reply["task_id"])


CASES: dict[str, Callable[[bool], Awaitable[CaseResult]]] = {
    "fire_latency": fire_latency,
    "fire_latency_idle": fire_latency_idle,
    "http_fire_latency": http_fire_latency,
    "inproc_fire": inproc_fire,
    "sleep_32": sleep_32,
    "shell_fan_out": shell_fan_out,
    "shell_fan_out_parallel": shell_fan_out_parallel,
    "naive": naive_vs_fire,
    "inproc_fan_out": inproc_fan_out,
    "idle_waiting": idle_waiting,
    "output_capture": output_capture,
    "responsiveness": responsiveness,
    "memory": memory,
    "store_fire": store_fire,
    "shutdown": shutdown,
    "client_reuse": client_reuse,
    "notify_latency": notify_latency,
    "sandbox": sandbox,
    "proxy": proxy,
    "input_round_trip": input_round_trip,
}


# ---- distributed mode (redis_url): front-ends and workers through Docket on Redis ----


async def distributed(quick: bool) -> CaseResult:
    """Distributed mode on this machine: a real redis-server, two workers (`offload-mcp worker`) and a
    front-end (`--transport http`), against a single-process HTTP server in the same run."""
    import shutil

    from testkit.cluster import cluster
    from testkit.redis_server import RedisServer

    result = CaseResult("distributed (Redis, 2 workers)")
    if shutil.which("redis-server") is None:
        result.add("skipped: redis-server missing", 0, "")
        return result
    n = 50 if quick else 300
    sleeps, trues, news = (40, 200, 5) if quick else (200, 2000, 30)
    with tempfile.TemporaryDirectory(prefix="offload-bench-") as folder:
        redis = RedisServer(Path(folder) / "redis")
        redis.start()
        try:
            async with http_server() as url, Client(url, mode="legacy") as single:
                single_ms = await _fire_median_ms(single, n)
                single_sleeps_s = await _fire_and_collect(single, "sleep 1", sleeps)
            flags = ("--max-concurrency", "128")
            async with (
                cluster(Path(folder), redis.url, front_ends=1, workers=2, worker_flags=flags) as nodes,
                Client(nodes[-1].url, mode="legacy") as client,
            ):
                distributed_ms = await _fire_median_ms(client, n)
                ratio = distributed_ms / single_ms
                result.add("fire_tool median, single", single_ms, "ms")
                result.add("fire_tool median, distributed", distributed_ms, "ms")
                result.add("fire_tool ratio", ratio, "x", "<= 2", ratio <= 2)
                took = await _fire_and_collect(client, "sleep 1", sleeps)
                result.add(f"{sleeps} x sleep 1 collected, single", single_sleeps_s, "s")
                result.add(f"{sleeps} x sleep 1 collected", took, "s", "<= 1.5", took <= 1.5 if not quick else None)
                took = await _fire_and_collect(client, "true", trues)
                result.add(f"{trues} x true", trues / took, "/s")
                lags = []
                for _ in range(news):
                    task_id = await _fire(client, NOTIFY_COMMAND)
                    reply = _data(await client.call_tool("poll_output", {"task_ids": [task_id], "timeout_s": 30}))
                    lags.append(_lag(reply["done"][0]["output"]["text"]))
                median, _ = _quantiles_ms(lags)
                result.add("completion news median", median, "ms", "<= 10", median <= 10)
        finally:
            redis.stop()
    return result


async def _fire_median_ms(client: Client, n: int) -> float:
    fire = {"tool": "shell", "arguments": {"command": "true"}}
    for _ in range(20):
        await client.call_tool("fire_tool", fire)
    samples: list[float] = []
    for _ in range(n):
        samples += await _timed(lambda: client.call_tool("fire_tool", fire), 1)
        await anyio.sleep(0.005)
    return _quantiles_ms(samples)[0]


async def _fire_and_collect(client: Client, command: str, count: int) -> float:
    """Seconds from the first fire to the last result collected (fired 8 at a time, polled 500 ids a call)."""
    started = time.perf_counter()
    ids: list[str] = []
    lanes = 8

    async def lane(share: int) -> None:
        ids.extend([await _fire(client, command) for _ in range(share)])

    async with anyio.create_task_group() as tg:
        for index in range(lanes):
            tg.start_soon(lane, count // lanes + (index < count % lanes))
    for at in range(0, len(ids), 500):
        reply = _data(await client.call_tool("poll_output", {"task_ids": ids[at : at + 500], "timeout_s": 55}))
        assert not reply["pending"], f"{len(reply['pending'])} still pending"
    return time.perf_counter() - started


CASES["distributed"] = distributed
