"""Nothing lost, nothing misreported: scenarios that mix tasks the way a real session does.

Each test here is one of the ways a user broke the promises (issue 11): a quiet task beside chatty
ones, a trap's last words on cancel and timeout, deaths by signal, a background child holding the
pipe or stdin, a huge command, processes that leave their group, a live read inside a character.
Every wait is on an event (a FIFO, a poll) with a bound; nothing sleeps to synchronise.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from conftest import FakeClock, Gate, call, data, error_text, finish, needs_subreaper, open_client
from mcp import Client

from server.config import Settings
from server.logs import RepeatFilter
from server.runtime import Runtime
from server.tasks import Task
from testkit.processes import gone

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def fifo() -> AsyncIterator[tuple[Path, int]]:
    """A FIFO a command writes to when it reaches a point; its read end turns readable then."""
    with tempfile.TemporaryDirectory(prefix="offload-fifo-") as folder:
        path = Path(folder) / "ready"
        os.mkfifo(path)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            yield path, fd
        finally:
            os.close(fd)


async def reached(fd: int, timeout_s: float = 10) -> None:
    with anyio.fail_after(timeout_s):
        await anyio.wait_readable(fd)


async def test_a_quiet_task_neither_stalls_nor_drops_a_chatty_one(client: Client) -> None:
    quiet = await call(client, "run_shell_background", command="sleep 30")
    echo = await call(client, "fire_tool", tool="shell", arguments={"command": "echo hello; echo world"})
    seq = await call(client, "fire_tool", tool="shell", arguments={"command": "seq 1 100000"})
    reply = await call(client, "poll_output", task_ids=[echo["task_id"], seq["task_id"]], timeout_s=20, max_bytes=0)
    assert reply["pending"] == []
    views = {v["task_id"]: v for v in reply["done"]}
    assert views[echo["task_id"]]["result"]["output_bytes"] == 12
    whole = await call(client, "get_cached_output", task_id=seq["task_id"], max_bytes=1024 * 1024)
    assert whole["output"]["text"] == "".join(f"{i}\n" for i in range(1, 100_001))
    assert whole["result"]["output_bytes"] == whole["output"]["total_bytes"]
    echoed = await call(client, "get_cached_output", task_id=echo["task_id"])
    assert echoed["output"]["text"] == "hello\nworld\n"
    assert (await call(client, "get_cached_output", task_id=quiet["task_id"]))["status"] == "running"
    await call(client, "cancel_task", task_id=quiet["task_id"])


TRAP = "trap 'echo cleanup; echo summary; exit 3' TERM; echo started; echo > {fifo}; sleep 300 & wait"


async def test_cancel_keeps_what_a_trap_prints_on_term(client: Client) -> None:
    async with fifo() as (path, fd):
        fired = await call(client, "run_shell_background", command=TRAP.format(fifo=path))
        await reached(fd)
    view = await call(client, "cancel_task", task_id=fired["task_id"])
    assert view["status"] == "cancelled"
    assert view["output"]["text"] == "started\ncleanup\nsummary\n"
    assert "terminated" in view["error"]["message"]


async def test_timeout_keeps_what_a_trap_prints_on_term(client: Client) -> None:
    async with fifo() as (path, fd):
        fired = await call(client, "run_shell_background", command=TRAP.format(fifo=path), timeout_s=1)
        await reached(fd)
    view = await finish(client, fired["task_id"])
    assert (view["status"], view["error"]["kind"]) == ("failed", "timeout")
    assert view["output"]["text"] == "started\ncleanup\nsummary\n"


@pytest.mark.parametrize(
    ("command", "kind", "exit_code", "signum", "name"),
    [
        ("exit 3", "exit_status", 3, None, None),
        ("kill -9 $$", "signal", None, 9, "SIGKILL"),
        ("kill -s TERM $$", "signal", None, 15, "SIGTERM"),
        (f"kill -s {signal.SIGRTMIN + 6} $$", "signal", None, signal.SIGRTMIN + 6, "SIGRTMIN+6"),
    ],
)
async def test_exits_and_signals_are_the_commands_own(
    client: Client, command: str, kind: str, exit_code: int | None, signum: int | None, name: str | None
) -> None:
    reply = await call(client, "fire_tool", tool="shell", arguments={"command": f"echo x; {command}"}, wait_s=10)
    view = reply["task"]
    assert (view["status"], view["error"]["kind"]) == ("failed", kind)
    result = view["result"]
    assert (result["exit_code"], result["signal"], result["signal_name"]) == (exit_code, signum, name)
    assert "2 bytes of output are readable" in view["error"]["message"]


async def test_a_background_child_holding_the_pipe_is_ended_and_counted(client: Client) -> None:
    reply = await call(
        client, "fire_tool", tool="shell", arguments={"command": "echo 12345678; sleep 300 & echo $!"}, wait_s=10
    )
    view = reply["task"]
    assert view["status"] == "completed"
    assert view["result"]["output_bytes"] == view["output"]["total_bytes"]
    child = int(view["output"]["text"].split()[-1])
    assert await gone(child)


async def test_stdin_nobody_reads_does_not_hold_the_task(client: Client) -> None:
    command = "sleep 300 <&0 & echo leader done"
    reply = await call(
        client, "fire_tool", tool="shell", arguments={"command": command, "stdin": "x" * 200_000}, wait_s=20
    )
    assert reply["status"] == "completed", reply
    assert reply["task"]["output"]["text"] == "leader done\n"


async def test_a_command_past_the_kernels_argument_limit_runs(clock: FakeClock, gate: Gate) -> None:
    settings = Settings(max_argument_bytes=1024 * 1024)
    command = f": '{'x' * 140_000}'; echo ok"
    async with open_client(settings, clock, gate) as (_, client):
        reply = await call(client, "fire_tool", tool="shell", arguments={"command": command}, wait_s=20)
        assert (reply["status"], reply["task"]["output"]["text"]) == ("completed", "ok\n")


@pytest.mark.parametrize(
    ("env", "expected"),
    [({"A=B": "x"}, "env name 'A=B'"), ({"": "x"}, "env name ''"), ({"OK": "a\x00b"}, "NUL")],
)
async def test_an_unpassable_environment_is_refused_up_front(
    client: Client, env: dict[str, str], expected: str
) -> None:
    message = error_text(
        await client.call_tool("fire_tool", {"tool": "shell", "arguments": {"command": "true", "env": env}})
    )
    assert expected in message and "Nothing was started" in message
    assert (await call(client, "list_tasks"))["tasks"] == []


async def test_a_preset_whose_cwd_is_missing_is_refused_up_front(clock: FakeClock, gate: Gate, tmp_path: Path) -> None:
    settings = Settings.model_validate({"presets": {"build": {"command": "make", "cwd": str(tmp_path / "gone")}}})
    async with open_client(settings, clock, gate) as (_, client):
        message = error_text(await client.call_tool("fire_tool", {"tool": "build", "arguments": {}}))
        assert "is not an existing directory" in message and "Nothing was started" in message
        assert (await call(client, "list_tasks"))["tasks"] == []


@pytest.mark.parametrize(
    "escape",
    [
        "setsid sleep 300 & echo $!",
        "set -m; sleep 300 & echo $!",
        pytest.param(  # leaves the group and drops its marker
            "setsid env -u OFFLOAD_TASK sleep 300 & echo $!", marks=needs_subreaper
        ),
        pytest.param(  # a double fork with an empty environment
            "( ( exec setsid env -i /bin/sleep 300 ) & echo $! )", marks=needs_subreaper
        ),
    ],
)
async def test_processes_that_leave_the_group_end_with_the_task(client: Client, escape: str) -> None:
    reply = await call(client, "fire_tool", tool="shell", arguments={"command": escape}, wait_s=20)
    assert reply["status"] == "completed"
    escaped = int(reply["task"]["output"]["text"].split()[-1])
    assert os.getpgid(os.getpid()) != escaped
    assert await gone(escaped)


async def test_an_escaped_process_ends_when_its_task_is_cancelled(client: Client) -> None:
    async with fifo() as (path, fd):
        fired = await call(
            client, "run_shell_background", command=f"setsid sleep 300 & echo $!; echo > {path}; sleep 300"
        )
        await reached(fd)
    view = await call(client, "cancel_task", task_id=fired["task_id"])
    assert view["status"] == "cancelled"
    assert await gone(int(view["output"]["text"].split()[0]))


async def test_a_live_read_never_splits_a_character(client: Client) -> None:
    async with fifo() as (path, fd):
        gate_path = Path(tempfile.mkdtemp(prefix="offload-gate-")) / "gate"
        os.mkfifo(gate_path)
        command = f"printf 'price: \\342\\202'; echo > {path}; read x < {gate_path}; printf '\\254 5\\n'"
        fired = await call(client, "run_shell_background", command=command)
        await reached(fd)
    with anyio.fail_after(5):  # printed is not yet captured: each round trip gives the server a turn
        while (live := await call(client, "get_cached_output", task_id=fired["task_id"]))["output"]["total_bytes"] < 9:
            pass
    assert (live["output"]["text"], live["output"]["next_offset"], live["output"]["total_bytes"]) == (
        "price: ",
        7,
        9,
    )
    with anyio.fail_after(5):
        await anyio.to_thread.run_sync(gate_path.write_text, "go\n", abandon_on_cancel=True)
    view = await finish(client, fired["task_id"])
    assert view["output"]["text"] == "price: € 5\n"
    rest = await call(client, "get_cached_output", task_id=fired["task_id"], offset=live["output"]["next_offset"])
    assert rest["output"]["text"] == "€ 5\n"


async def test_a_cancelled_queued_task_says_it_never_started(clock: FakeClock, gate: Gate) -> None:
    async with open_client(Settings(max_concurrency=1), clock, gate) as (_, client):
        first = await call(client, "fire_tool", tool="test.gate", arguments={"key": "hold"})
        await gate.wait_entered("hold")
        second = await call(client, "fire_tool", tool="test.gate", arguments={"key": "later"})
        view = await call(client, "cancel_task", task_id=second["task_id"])
        assert view["status"] == "cancelled"
        assert "never started" in view["error"]["message"]
        gate.release("hold")
        assert (await finish(client, first["task_id"]))["status"] == "completed"


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"tool": "shell", "arguments": {"command": "true"}, "wait_s": 56}, "wait_s"),
        ({"tool": "shell", "arguments": {"command": "true"}, "timeout_s": 0}, "timeout_s"),
    ],
)
async def test_parameter_errors_are_plain_sentences(client: Client, arguments: dict[str, object], field: str) -> None:
    message = error_text(await client.call_tool("fire_tool", arguments))
    assert message.startswith(f"Invalid arguments for fire_tool: {field}: ")
    assert "https://" not in message and "Nothing was done" in message
    offset = error_text(await client.call_tool("get_cached_output", {"task_id": "x", "offset": -1}))
    assert "offset: Input should be greater than or equal to 0 (got -1)" in offset and "https://" not in offset


def test_repeated_warnings_are_rate_limited_and_counted() -> None:
    clock = FakeClock(0)
    repeat = RepeatFilter(interval_s=60, clock=clock)

    def passes(message: str, *args: object, level: int = logging.WARNING) -> bool:
        return repeat.filter(logging.LogRecord("offload.x", level, __file__, 1, message, args, None))

    assert passes("output of %s stops: %s", "a", "disk full")
    assert not any(passes("output of %s stops: %s", str(i), "disk full") for i in range(1000))
    assert passes("something else")  # another kind of warning is not held back
    assert all(passes("task %s done", str(i), level=logging.INFO) for i in range(10))  # info is never limited
    clock.advance(61)
    record = logging.LogRecord("offload.x", logging.WARNING, __file__, 1, "output of %s stops: %s", ("b", "x"), None)
    assert repeat.filter(record)
    assert "1000 more like this" in record.getMessage()


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"command": "true", "cwd": "~nosuchuser-offload/x"}, "cannot be used"),
        ({"command": "true", "cwd": "/" + "x" * 5000}, "cannot be used"),
        ({"command": "true", "cwd": "/no/such/dir"}, "is not an existing directory"),
    ],
)
async def test_a_bad_cwd_is_a_plain_refusal(client: Client, arguments: dict[str, str], expected: str) -> None:
    for reply in (
        await client.call_tool("run_shell_background", arguments),
        await client.call_tool("fire_tool", {"tool": "shell", "arguments": arguments}),
    ):
        message = error_text(reply)
        assert expected in message and "Value error" not in message and "Nothing was started" in message
    assert (await call(client, "list_tasks"))["tasks"] == []


async def test_a_nul_in_preset_arguments_is_refused_up_front(clock: FakeClock, gate: Gate) -> None:
    settings = Settings.model_validate({"presets": {"echoer": {"command": "echo"}}})
    async with open_client(settings, clock, gate) as (_, client):
        message = error_text(await client.call_tool("fire_tool", {"tool": "echoer", "arguments": {"args": ["x\x00y"]}}))
        assert "NUL" in message and "Nothing was started" in message
        assert (await call(client, "list_tasks"))["tasks"] == []


@needs_subreaper
async def test_shutdown_ends_what_left_the_group_without_its_marker(clock: FakeClock, gate: Gate) -> None:
    async with fifo() as (path, fd), open_client(Settings(kill_grace_s=0.5), clock, gate) as (_, client):
        command = f"setsid env -u OFFLOAD_TASK sleep 300 & echo $!; echo > {path}; sleep 300"
        fired = await call(client, "run_shell_background", command=command)
        await reached(fd)
        with anyio.fail_after(5):
            while not (view := await call(client, "get_cached_output", task_id=fired["task_id"]))["output"]["text"]:
                pass
        escaped = int(view["output"]["text"].split()[0])
    assert await gone(escaped)


async def test_a_cwd_outside_the_roots_reads_alike_whether_it_exists(
    clock: FakeClock, gate: Gate, tmp_path: Path
) -> None:
    """A refusal never tells whether a path outside one's roots exists (another owner's files, say)."""
    (tmp_path / "work").mkdir()
    (tmp_path / "theirs" / "project").mkdir(parents=True)
    settings = Settings(shell_roots=(str(tmp_path / "work"),), data_dir=tmp_path / "data")
    async with open_client(settings, clock, gate) as (_, client):
        answers = []
        for name in ("project", "nothing-here"):
            path = str(tmp_path / "theirs" / name)
            message = error_text(await client.call_tool("run_shell_background", {"command": "true", "cwd": path}))
            answers.append(message.replace(path, "PATH"))
        assert answers[0] == answers[1] and "outside the allowed roots" in answers[0]


async def test_a_ttl_ending_during_a_poll_lists_the_task_as_expired(
    runtime: Runtime, client: Client, clock: FakeClock, gate: Gate
) -> None:
    """Found by review (issue 22, item 10): a result whose TTL ended between the wait and the read came
    back in `done` as `completed` with no text; it is listed with the ids that are gone, as a read says."""
    fired = await call(client, "fire_tool", tool="test.gate", arguments={"key": "brief"}, ttl_s=10)
    await gate.wait_entered("brief")

    def past_ttl(task: Task) -> None:
        if task.id == fired["task_id"] and task.status.finished:
            clock.advance(11)  # the TTL ends after the task finished, before the poll reads it

    async def release_once_polling(done: float, total: float | None, message: str | None) -> None:
        gate.release("brief")  # the poll has read the task (unfinished) and waits on it now

    unsubscribe = runtime.subscribe(past_ttl)
    try:
        result = await client.call_tool(
            "poll_output", {"task_ids": [fired["task_id"]], "timeout_s": 20}, progress_callback=release_once_polling
        )
    finally:
        unsubscribe()
    reply = data(result)
    assert reply["done"] == [] and reply["pending"] == [], reply
    assert [u["task_id"] for u in reply["unknown"]] == [fired["task_id"]]
    assert "expired at" in reply["unknown"][0]["message"]
    read = error_text(await client.call_tool("get_cached_output", {"task_id": fired["task_id"]}))
    assert "expired at" in read
