"""Durability: results and output outlive the server process; recovery after a crash is truthful."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from conftest import FakeClock, Gate, call, error_text, finish, live_group_members, open_client

from server.config import LOCAL_OWNER, Settings
from server.errors import ConfigError
from server.runtime import Runtime
from server.store import WAL_KEEP_BYTES, Store
from server.tasks import ErrorKind, Status, Task, TaskError
from testkit.processes import gone
from testkit.rawserver import RawServer, start_server

pytestmark = pytest.mark.anyio


async def wait_for_exit(pid: int, timeout_s: float = 10) -> None:
    """Waits for a process that is not our child."""
    assert await gone(pid, timeout_s), f"process {pid} did not exit within {timeout_s} s"


async def kill_9(server: RawServer) -> None:
    server.process.kill()
    with anyio.fail_after(5):
        await server.process.wait()
    await server.process.aclose()


async def test_results_and_output_survive_kill_9(tmp_path: Path) -> None:
    server = await start_server(tmp_path)
    command = "for i in $(seq 1 2000); do echo line $i; done"
    done = await server.call("fire_tool", tool="shell", arguments={"command": command}, wait_s=20)
    assert done["status"] == "completed"
    running = await server.call("run_shell_background", command="sleep 300 & sleep 300; wait")
    await kill_9(server)
    assert live_group_members(running["pid"]), "kill -9 gives the server no chance to clean up"

    again = await start_server(tmp_path)  # same data dir
    async with again.process:
        view = await again.call("get_cached_output", task_id=done["task_id"], max_bytes=1024 * 1024)
        assert view["status"] == "completed"
        assert view["result"]["exit_code"] == 0
        expected = "".join(f"line {i}\n" for i in range(1, 2001))
        assert view["output"]["text"] == expected
        assert view["output"]["total_bytes"] == len(expected)

        interrupted = await again.call("get_cached_output", task_id=running["task_id"])
        assert interrupted["status"] == "failed"
        assert interrupted["error"]["kind"] == "interrupted"
        assert "killed" in interrupted["error"]["message"]
        assert live_group_members(running["pid"]) == []
        listed = await again.call("list_tasks")
        assert {t["task_id"] for t in listed["tasks"]} == {done["task_id"], running["task_id"]}
        await again.process.stdin.aclose()  # type: ignore[union-attr]
        await again.process.wait()


@pytest.mark.parametrize("flags", [(), ("--detach",)], ids=["attached", "detached"])
async def test_a_command_that_finished_while_the_server_was_dead(tmp_path: Path, flags: tuple[str, ...]) -> None:
    """Detached: its capture process recorded the real end. Attached: the server that captured its
    output died, so what it printed after that is lost and its end unknown: `interrupted`, said so."""
    server = await start_server(tmp_path, *flags)
    fired = await server.call("run_shell_background", command="echo before; sleep 0.5; exit 7")
    first = await server.call("get_cached_output", task_id=fired["task_id"])
    await kill_9(server)
    await wait_for_exit(fired["pid"])  # it finishes on its own, with nobody watching

    again = await start_server(tmp_path, *flags)
    async with again.process:
        # Detached, its capture process may still be recording the end: the new server follows it to there.
        view = (await again.call("poll_output", task_ids=[fired["task_id"]], timeout_s=10))["done"][0]
        assert view["status"] == "failed"
        assert view["output"]["text"].startswith(first["output"]["text"])  # nothing read before is lost
        if flags:
            assert view["error"]["kind"] == "exit_status"
            assert view["result"]["exit_code"] == 7
            assert view["output"]["text"] == "before\n"
        else:
            assert view["error"]["kind"] == "interrupted"
            assert "stopped before it finished" in view["error"]["message"]
        await again.process.stdin.aclose()  # type: ignore[union-attr]


async def test_detached_commands_outlive_the_server_and_are_followed_again(tmp_path: Path) -> None:
    server = await start_server(tmp_path, "--detach")
    quick = await server.call("run_shell_background", command="echo start; sleep 0.3; echo end")
    slow_gate = tmp_path / "gate"
    os.mkfifo(slow_gate)
    slow = await server.call(
        "run_shell_background",
        command=f"echo waiting; read line < {slow_gate}; echo $line; exit 4",
    )
    assert server.process.stdin is not None
    await server.process.stdin.aclose()  # a clean shutdown leaves detached commands running
    with anyio.fail_after(5):
        await server.process.wait()
    assert live_group_members(slow["pid"]), "detached commands are not killed at shutdown"
    await wait_for_exit(quick["pid"])  # finishes while no server runs

    again = await start_server(tmp_path, "--detach")
    async with again.process:
        view = await again.call("get_cached_output", task_id=quick["task_id"])
        assert view["status"] == "completed", view["error"]
        assert view["result"]["exit_code"] == 0
        assert view["output"]["text"] == "start\nend\n"

        still = await again.call("get_cached_output", task_id=slow["task_id"])
        assert still["status"] == "running"  # followed again, not called a failure
        assert still["output"]["text"] == "waiting\n"
        with anyio.fail_after(5):  # the open returns once the command has the FIFO open for reading
            await anyio.to_thread.run_sync(slow_gate.write_text, "free\n", abandon_on_cancel=True)
        polled = await again.call("poll_output", task_ids=[slow["task_id"]], timeout_s=20)
        assert polled["pending"] == []
        ended = polled["done"][0]
        assert ended["status"] == "failed"
        assert ended["result"]["exit_code"] == 4
        assert ended["output"]["text"] == "waiting\nfree\n"
        await again.process.stdin.aclose()  # type: ignore[union-attr]


@pytest.mark.parametrize("first", ["linux", "portable"])
async def test_a_detached_command_is_followed_across_a_switch_of_process_core(tmp_path: Path, first: str) -> None:
    """Found by review: a record of the other core cannot be confirmed by identity, and the running command
    was killed as a leftover. Its marker says it is the task's own: it is followed to its real end."""
    if first == "linux" and not Path("/proc/self/stat").exists():
        pytest.skip("the Linux process core needs /proc")
    cores = {"linux": {"OFFLOAD_PORTABLE_PROCESS": "0"}, "portable": {"OFFLOAD_PORTABLE_PROCESS": "1"}}
    other = "portable" if first == "linux" else "linux"
    server = await start_server(tmp_path, "--detach", env=cores[first])
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    slow = await server.call("run_shell_background", command=f"echo waiting; read line < {gate}; echo $line; exit 4")
    assert server.process.stdin is not None
    await server.process.stdin.aclose()  # a clean shutdown leaves detached commands running
    with anyio.fail_after(5):
        await server.process.wait()

    again = await start_server(tmp_path, "--detach", env=cores[other])
    async with again.process:
        still = await again.call("get_cached_output", task_id=slow["task_id"])
        assert still["status"] == "running", still
        with anyio.fail_after(5):
            await anyio.to_thread.run_sync(gate.write_text, "free\n", abandon_on_cancel=True)
        polled = await again.call("poll_output", task_ids=[slow["task_id"]], timeout_s=20)
        assert polled["done"][0]["result"]["exit_code"] == 4, polled
        assert polled["done"][0]["output"]["text"] == "waiting\nfree\n"
        await again.process.stdin.aclose()  # type: ignore[union-attr]


async def test_a_server_module_in_the_commands_cwd_never_replaces_the_capture_process(tmp_path: Path) -> None:
    """Found by review: `python -m server.capture` put the command's cwd first on sys.path."""
    project = tmp_path / "project"
    (project / "server").mkdir(parents=True)
    (project / "server.py").write_text("print('hijacked')\n")
    (project / "server" / "__init__.py").write_text("print('hijacked')\n")
    (project / "server" / "capture.py").write_text("print('hijacked')\n")
    server = await start_server(tmp_path, "--detach", env={"PYTHONPATH": str(project)})
    async with server.process:
        fired = await server.call("run_shell_background", command="echo ran; exit 3", cwd=str(project))
        polled = await server.call("poll_output", task_ids=[fired["task_id"]], timeout_s=20)
        done = polled["done"][0]
        assert done["output"]["text"] == "ran\n" and done["result"]["exit_code"] == 3, done
        await server.process.stdin.aclose()  # type: ignore[union-attr]


async def test_expiry_across_restarts(settings: Settings, clock: FakeClock, gate: Gate) -> None:
    async with open_client(settings, clock, gate) as (_, client):
        fired = await call(client, "fire_tool", tool="shell", arguments={"command": "echo kept"}, wait_s=10, ttl_s=100)
    clock.advance(50)
    async with open_client(settings, clock, gate) as (_, client):
        view = await call(client, "get_cached_output", task_id=fired["task_id"])
        assert view["output"]["text"] == "kept\n"
    clock.advance(51)
    async with open_client(settings, clock, gate) as (runtime, client):  # the start-up sweep expires it
        message = error_text(await client.call_tool("get_cached_output", {"task_id": fired["task_id"]}))
        assert "expired at" in message
        assert (await call(client, "list_tasks"))["tasks"] == []
        assert not runtime.executor.store.output_path(fired["task_id"]).exists()


async def test_cached_results_are_reused_after_a_restart(settings: Settings, clock: FakeClock, gate: Gate) -> None:
    gate.release("r")
    async with open_client(settings, clock, gate) as (_, client):
        first = await call(client, "fire_tool", tool="test.gate", arguments={"key": "r"}, wait_s=10)
    async with open_client(settings, clock, gate) as (_, client):
        again = await call(client, "fire_tool", tool="test.gate", arguments={"key": "r"})
        assert again["cached"] is True
        assert again["task_id"] == first["task_id"]
    assert gate.calls["r"] == 1


async def test_a_corrupt_database_is_moved_aside(
    settings: Settings, clock: FakeClock, gate: Gate, caplog: pytest.LogCaptureFixture
) -> None:
    data = Path(settings.data_dir or "")
    data.mkdir(parents=True)
    (data / "offload.db").write_bytes(b"this is not a database" * 100)
    async with open_client(settings, clock, gate) as (_, client):
        fired = await call(client, "fire_tool", tool="shell", arguments={"command": "echo fresh"}, wait_s=10)
        assert fired["status"] == "completed"
    assert [p.name for p in data.glob("offload.db.corrupt-*")]
    assert "unreadable" in caplog.text


async def test_an_unwritable_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"cannot be written.*--data-dir"):
        async with Runtime.open(Settings(data_dir=blocker / "data")):
            pass


async def test_readers_see_committed_tasks_while_the_server_writes(
    settings: Settings, clock: FakeClock, gate: Gate
) -> None:
    async with open_client(settings, clock, gate) as (runtime, client):
        reader = sqlite3.connect(runtime.executor.store.root / "offload.db", timeout=1)
        ids = []
        for i in range(50):
            ids.append((await call(client, "fire_tool", tool="shell", arguments={"command": f"echo {i}"}))["task_id"])
            seen = {row[0] for row in reader.execute("SELECT id FROM tasks")}
            assert ids[-1] in seen  # committed before fire_tool answered
        reply = await call(client, "poll_output", task_ids=ids, timeout_s=30)
        assert len(reply["done"]) == 50
        statuses = dict(reader.execute("SELECT id, status FROM tasks"))
        assert {statuses[i] for i in ids} == {"completed"}
        reader.close()


async def test_an_identical_call_on_another_server_joins_the_running_one(
    settings: Settings, clock: FakeClock, gate: Gate
) -> None:
    async with open_client(settings, clock, gate) as (_, first), open_client(settings, clock, gate) as (_, second):
        fired = await call(first, "fire_tool", tool="test.gate", arguments={"key": "shared"})
        await gate.wait_entered("shared")
        joined = await call(second, "fire_tool", tool="test.gate", arguments={"key": "shared"})
        assert (joined["task_id"], joined["deduplicated"]) == (fired["task_id"], True)
        gate.release("shared")
        reply = await call(second, "poll_output", task_ids=[joined["task_id"]], timeout_s=10)
        assert reply["done"][0]["result"] == {"key": "shared", "call": 1}
        assert gate.calls == {"shared": 1}  # ran once, for both servers' callers
        again = await call(second, "fire_tool", tool="test.gate", arguments={"key": "shared"})
        assert (again["task_id"], again["cached"]) == (fired["task_id"], True)


async def test_two_servers_share_a_data_dir(settings: Settings, clock: FakeClock, gate: Gate) -> None:
    async with open_client(settings, clock, gate) as (_, first), open_client(settings, clock, gate) as (_, second):
        fired = await call(first, "run_shell_background", command="sleep 300")
        seen = await call(second, "get_cached_output", task_id=fired["task_id"])
        assert seen["status"] == "running"  # the other server does not take over a live server's task
        message = error_text(await second.call_tool("cancel_task", {"task_id": fired["task_id"]}))
        assert "another Offload server process" in message
        assert (await call(first, "cancel_task", task_id=fired["task_id"]))["status"] == "cancelled"
        after = await call(second, "get_cached_output", task_id=fired["task_id"])
        assert after["status"] == "cancelled"


async def test_a_server_taken_for_dead_never_flips_the_outcome_another_recorded(
    settings: Settings, clock: FakeClock, gate: Gate
) -> None:
    """A server paused past its lease wakes and finishes a task a live server has already settled: the
    settled outcome stands, on the late server too, and the cached result is not offered for reuse."""
    async with open_client(settings, clock, gate) as (_, client):
        fired = await call(client, "fire_tool", tool="test.gate", arguments={"key": "late"})
        await gate.wait_entered("late")
        settler = Store.open(settings.data_dir, lease_s=settings.lease_s)  # another server on the data dir
        try:
            task = settler.load(fired["task_id"], lambda _name: None)
            assert task is not None and task.status is Status.RUNNING
            task.status, task.finished_at = Status.FAILED, clock()
            task.error = TaskError(kind=ErrorKind.INTERRUPTED, message="its server was taken for dead")
            assert settler.record_outcome(task)
        finally:
            settler.close()
        gate.release("late")
        reply = await call(client, "poll_output", task_ids=[fired["task_id"]], timeout_s=10)
        view = reply["done"][0]
        assert (view["status"], view["error"]["kind"], view["result"]) == ("failed", "interrupted", None)
        again = await call(client, "fire_tool", tool="test.gate", arguments={"key": "late"})
        assert again["task_id"] != fired["task_id"] and not again["cached"]
        gate.release("late")


async def test_a_call_whose_server_died_mid_call_is_never_reported_as_not_run(
    settings: Settings, clock: FakeClock, gate: Gate
) -> None:
    """A task with no process of its own (an HTTP call, a GitHub write) that was running when its server
    died may have reached its service: the message must not say nothing ran (an assistant would repeat
    a write), and a queued one truly never started."""
    gone_server = Store.open(settings.data_dir, lease_s=settings.lease_s)
    running, queued = (
        Task(
            id=f"t-{name}",
            tool="test.gate",
            owner=LOCAL_OWNER,
            created_at=clock(),
            ttl_s=60,
            output=gone_server.new_output(f"t-{name}", 4096),
        )
        for name in ("running", "queued")
    )
    for task in (running, queued):
        gone_server.add(task)
    running.status, running.started_at = Status.RUNNING, clock()
    assert gone_server.record_running(running)
    gone_server.close()  # its server is gone
    async with open_client(settings, clock, gate) as (_, client):
        ran = await call(client, "get_cached_output", task_id=running.id)
        never = await call(client, "get_cached_output", task_id=queued.id)
    assert (ran["status"], ran["error"]["kind"]) == ("failed", "interrupted")
    assert "whether it had any effect is unknown" in ran["error"]["message"], ran["error"]
    assert "nothing of it" not in ran["error"]["message"]
    assert "before it started; nothing of it runs" in never["error"]["message"], never["error"]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(kill_grace_s=0.5, data_dir=tmp_path / "data")


async def test_a_detached_command_can_still_be_cancelled(tmp_path: Path, clock: FakeClock, gate: Gate) -> None:
    settings = Settings(kill_grace_s=0.5, data_dir=tmp_path / "data", detach=True)
    async with open_client(settings, clock, gate) as (_, client):
        fired = await call(client, "run_shell_background", command="echo hi; sleep 300 & sleep 300", stdin="ignored")
        view = await call(client, "cancel_task", task_id=fired["task_id"])
        assert view["status"] == "cancelled"
        assert live_group_members(fired["pid"]) == []
        reply = await call(
            client, "fire_tool", tool="shell", arguments={"command": "cat; exit 2", "stdin": "in"}, wait_s=10
        )
        assert reply["task"]["status"] == "failed"
        assert reply["task"]["result"]["exit_code"] == 2
        assert reply["task"]["output"]["text"] == "in"


async def test_a_crashed_servers_task_is_settled_by_a_live_one(tmp_path: Path, clock: FakeClock, gate: Gate) -> None:
    """Two servers on one data dir; one is killed -9 mid-output. The other settles its task (lease
    lapsed), and that task then reads, polls and lists like any other, with every byte read before."""
    data = tmp_path / "data"
    crashing = await start_server(tmp_path, data_dir=data)
    fired = await crashing.call("run_shell_background", command="echo compiled 12 files; sleep 300")
    settings = Settings(kill_grace_s=0.5, data_dir=data, lease_s=1.5)
    async with open_client(settings, clock, gate) as (_, survivor):
        seen = await call(survivor, "get_cached_output", task_id=fired["task_id"])
        while seen["output"]["total_bytes"] < 18:  # the echo is on its way: read again on the next event
            reply = await call(survivor, "poll_output", task_ids=[fired["task_id"]], timeout_s=1)
            assert reply["pending"] == [fired["task_id"]]
            seen = await call(survivor, "get_cached_output", task_id=fired["task_id"])
        assert (seen["status"], seen["output"]["text"]) == ("running", "compiled 12 files\n")
        await kill_9(crashing)
        cancelled = await call(survivor, "cancel_task", task_id=fired["task_id"])  # not "ask the dead server"
        assert (cancelled["status"], cancelled["error"]["kind"]) == ("failed", "interrupted")
        reply = await call(survivor, "poll_output", task_ids=[fired["task_id"]], timeout_s=15)
        assert reply["pending"] == [], "a live server settles a dead one's task within the lease"
        view = reply["done"][0]
        assert (view["status"], view["error"]["kind"]) == ("failed", "interrupted")
        assert view["output"]["text"] == "compiled 12 files\n"
        assert live_group_members(fired["pid"]) == []
        assert (await call(survivor, "cancel_task", task_id=fired["task_id"]))["status"] == "failed"
        listed = await call(survivor, "list_tasks")
        assert [t["status"] for t in listed["tasks"]] == ["failed"]

    again = await start_server(tmp_path, data_dir=data)  # and from any server, after any restart
    async with again.process:
        view = await again.call("get_cached_output", task_id=fired["task_id"])
        assert (view["status"], view["output"]["text"]) == ("failed", "compiled 12 files\n")
        await again.process.stdin.aclose()  # type: ignore[union-attr]


async def test_detached_commands_have_attached_parity(tmp_path: Path, clock: FakeClock, gate: Gate) -> None:
    """Group kill at the end, output caps, truthful status when the reported pid is killed."""
    settings = Settings(kill_grace_s=0.5, data_dir=tmp_path / "data", detach=True, output_file_max_bytes=4096)
    async with open_client(settings, clock, gate) as (runtime, client):
        left = await call(
            client, "fire_tool", tool="shell", arguments={"command": "echo x; sleep 300 & echo $!"}, wait_s=20
        )
        assert left["status"] == "completed"
        assert live_group_members(int(left["task"]["output"]["text"].split()[-1])) == []

        big = "head -c 5000000 /dev/zero | tr '\\0' a; echo END"
        capped = await call(client, "fire_tool", tool="shell", arguments={"command": big}, wait_s=30)
        output = capped["task"]["output"]
        assert capped["task"]["result"]["output_bytes"] == output["total_bytes"] == 5_000_004
        assert output["dropped"] == {"from": 2048, "to": 5_000_004 - 2048}
        assert output["text"].endswith("aEND\n")
        assert runtime.executor.store.output_path(capped["task_id"]).stat().st_size <= 4096 + 64

        fired = await call(client, "run_shell_background", command="sleep 300; echo never")
        os.kill(fired["pid"], 15)
        view = (await call(client, "poll_output", task_ids=[fired["task_id"]], timeout_s=10))["done"][0]
        assert (view["status"], view["error"]["kind"], view["result"]["signal_name"]) == ("failed", "signal", "SIGTERM")
        assert live_group_members(fired["pid"]) == []


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB filesystem (tmpfs), to fill up; mounting needs root, as CI has."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_a_full_disk_takes_down_neither_the_server_nor_a_task(
    small_disk: Path, clock: FakeClock, gate: Gate
) -> None:
    settings = Settings(kill_grace_s=0.5, data_dir=small_disk / "data", lease_s=1.0)
    async with open_client(settings, clock, gate) as (runtime, client):
        quiet = await call(client, "run_shell_background", command="echo quiet; sleep 300")
        big = "head -c 6000000 /dev/zero | tr '\\0' z; echo tail-marker"
        flood = await call(client, "fire_tool", tool="shell", arguments={"command": big}, wait_s=30)
        view = flood["task"]
        assert view["status"] == "completed", view  # its own status, though its output could not all be kept
        assert view["output"]["total_bytes"] == view["result"]["output_bytes"] == 6_000_012
        assert view["output"]["dropped"] is not None
        assert (await call(client, "get_cached_output", task_id=quiet["task_id"]))["status"] == "running"
        refused = await client.call_tool("fire_tool", {"tool": "shell", "arguments": {"command": "echo more"}})
        if refused.is_error:  # the row itself did not fit: refused, plainly, nothing started
            assert "could not be recorded" in error_text(refused) and "Free some disk space" in error_text(refused)
        await anyio.run_process(["mount", "-o", "remount,size=16m", str(small_disk)])
        db = sqlite3.connect(runtime.executor.store.root / "offload.db")
        with anyio.fail_after(10):  # the held status change is written once there is room again
            while db.execute("SELECT status FROM tasks WHERE id = ?", (flood["task_id"],)).fetchone()[0] != "completed":
                await call(client, "list_tasks")
        db.close()
        assert (await call(client, "cancel_task", task_id=quiet["task_id"]))["output"]["text"] == "quiet\n"


async def test_a_detached_commands_deadline_holds_across_a_restart(tmp_path: Path) -> None:
    """timeout_s counts from the task's start, not from the restart that followed it again."""
    server = await start_server(tmp_path, "--detach")
    ready = tmp_path / "past-deadline"
    os.mkfifo(ready)
    fd = os.open(ready, os.O_RDONLY | os.O_NONBLOCK)
    try:
        fired = await server.call("run_shell_background", command=f"sleep 2.5; echo > {ready}; sleep 300", timeout_s=2)
        await kill_9(server)
        with anyio.fail_after(10):
            await anyio.wait_readable(fd)  # the command is past its deadline now: no server watched it
    finally:
        os.close(fd)
    again = await start_server(tmp_path, "--detach")
    async with again.process:
        reply = await again.call("poll_output", task_ids=[fired["task_id"]], timeout_s=1.5)
        assert reply["pending"] == [], "past its deadline, it is ended at once, not given timeout_s again"
        view = reply["done"][0]
        assert (view["status"], view["error"]["kind"]) == ("failed", "timeout")
        assert live_group_members(fired["pid"]) == []
        await again.process.stdin.aclose()  # type: ignore[union-attr]


async def test_a_detached_command_never_runs_on_unwatched(tmp_path: Path, clock: FakeClock, gate: Gate) -> None:
    """Its capture process killed, or a timeout while the capture process is still starting: either
    way nothing of the command is left running."""
    settings = Settings(kill_grace_s=0.5, data_dir=tmp_path / "data", detach=True)
    async with open_client(settings, clock, gate) as (_, client):
        orphaned = await call(client, "run_shell_background", command="echo hi; kill -9 $PPID; sleep 305")
        view = (await call(client, "poll_output", task_ids=[orphaned["task_id"]], timeout_s=10))["done"][0]
        assert (view["status"], view["error"]["kind"]) == ("failed", "interrupted")
        assert live_group_members(orphaned["pid"]) == []
        early = [
            (await call(client, "fire_tool", tool="shell", arguments={"command": f"sleep 30{i}"}, timeout_s=0.05))
            for i in range(5)
        ]
        reply = await call(client, "poll_output", task_ids=[f["task_id"] for f in early], timeout_s=15)
        assert [v["error"]["kind"] for v in reply["done"]] == ["timeout"] * 5
        for view in reply["done"]:
            assert view["pid"] is not None
            assert live_group_members(view["pid"]) == []


def fill(disk: Path) -> Path:
    """Fills a small filesystem to the last byte; removing the file returned frees it again."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (64 * 1024, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


async def test_a_result_held_through_a_full_disk_is_written_at_a_clean_shutdown(
    small_disk: Path, clock: FakeClock, gate: Gate
) -> None:
    """Found by review (issue 22, item 8): `close` did not flush the outcome the full disk made it hold,
    so after a restart the task read `interrupted`. No heartbeat comes first here (lease_s is long)."""
    settings = Settings(kill_grace_s=0.5, data_dir=small_disk / "data", lease_s=600)
    db_path = small_disk / "data" / "offload.db"
    async with open_client(settings, clock, gate) as (_, client):
        fired = await call(client, "fire_tool", tool="test.gate", arguments={"key": "held"})
        await gate.wait_entered("held")
        filler = fill(small_disk)
        gate.release("held")
        assert (await finish(client, fired["task_id"]))["status"] == "completed"
        peer = sqlite3.connect(db_path)
        held = peer.execute("SELECT status FROM tasks WHERE id = ?", (fired["task_id"],)).fetchone()[0]
        peer.close()
        assert held == "running", "the disk is full: the outcome is held, not written"
        filler.unlink()  # room again, but nothing writes before the shutdown
    async with open_client(settings, clock, gate) as (_, client):
        view = await call(client, "get_cached_output", task_id=fired["task_id"])
        assert (view["status"], view["result"]) == ("completed", {"key": "held", "call": 1})


async def test_a_change_still_unwritable_at_shutdown_is_named_in_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store.open(tmp_path / "data")
    task = Task(
        id="t-held",
        tool="test.gate",
        owner=LOCAL_OWNER,
        created_at=1.0,
        ttl_s=60,
        output=store.new_output("t-held", 4096),
    )
    store.add(task)
    store._db.execute("PRAGMA busy_timeout = 50")  # the lock below is held past it at once, not after 5 s
    peer = sqlite3.connect(tmp_path / "data" / "offload.db", isolation_level=None)
    peer.execute("BEGIN IMMEDIATE")  # another writer holds the database past the timeout
    task.status, task.finished_at = Status.COMPLETED, 2.0
    assert store.record_outcome(task)  # held, not lost
    store.close()
    peer.execute("ROLLBACK")
    peer.close()
    assert "could not write the changes of 1 tasks before shutting down" in caplog.text


@pytest.mark.parametrize("how", ["deleted", "replaced"])
async def test_a_data_dir_removed_under_a_running_server_is_refused_plainly(
    tmp_path: Path, clock: FakeClock, gate: Gate, how: str
) -> None:
    """Found by review (issue 22, item 11): with its data directory deleted, reads looped at
    `next_offset 0` and new fires "succeeded" into a database nobody could open again."""
    settings = Settings(kill_grace_s=0.5, data_dir=tmp_path / "data")
    async with open_client(settings, clock, gate) as (_, client):
        running = await call(client, "fire_tool", tool="test.gate", arguments={"key": "on"})
        await gate.wait_entered("on")
        finished = await call(client, "fire_tool", tool="shell", arguments={"command": "echo kept"}, wait_s=10)
        shutil.rmtree(tmp_path / "data")
        if how == "replaced":  # another server (or the user) made a fresh one in its place
            Store.open(tmp_path / "data").close()
        for tool, arguments in [
            ("fire_tool", {"tool": "shell", "arguments": {"command": "echo lost"}}),
            ("run_shell_background", {"command": "echo lost"}),
            ("get_cached_output", {"task_id": running["task_id"]}),
            ("get_cached_output", {"task_id": finished["task_id"]}),
            ("poll_output", {"task_ids": [running["task_id"]], "timeout_s": 1}),
            ("list_tasks", {}),
        ]:
            message = error_text(await client.call_tool(tool, arguments))
            assert "data directory" in message and "Restart the Offload server" in message, (tool, message)
        assert gate.calls == {"on": 1}
        if how == "replaced":
            fresh = Store.open(tmp_path / "data")
            assert fresh.summaries(LOCAL_OWNER, clock(), None, None, 10) == []  # nothing written into it
            fresh.close()


async def test_the_wal_shrinks_back_after_a_burst_of_tasks(tmp_path: Path, clock: FakeClock, gate: Gate) -> None:
    """Found by review (issue 22, item 12): the WAL kept the size of the largest burst for as long as the
    server ran (274 MB after 6,000 tasks). Checkpoints every few seconds cut it back to WAL_KEEP_BYTES."""
    settings = Settings(kill_grace_s=0.5, data_dir=tmp_path / "data", lease_s=1.5)
    wal = tmp_path / "data" / "offload.db-wal"
    async with open_client(settings, clock, gate) as (_, client):
        peak = 0
        for batch in range(6):
            ids = []
            for i in range(50):
                gate.release(f"k{batch}-{i}")
                fired = await call(client, "fire_tool", tool="test.gate", arguments={"key": f"k{batch}-{i}"})
                ids.append(fired["task_id"])
            assert (await call(client, "poll_output", task_ids=ids, timeout_s=20, max_bytes=0))["pending"] == []
            peak = max(peak, wal.stat().st_size)
        assert peak > 2 * WAL_KEEP_BYTES  # the burst grew it well past what is kept
        deadline = anyio.current_time() + 15  # the upkeep loop's next checkpoints, and the next write
        while (size := wal.stat().st_size) > WAL_KEEP_BYTES:
            assert anyio.current_time() < deadline, f"the WAL is still {size} bytes"
            await call(client, "list_tasks", limit=1)


async def test_cancels_from_two_servers_of_a_dead_ones_tasks_leave_nothing_running(tmp_path: Path) -> None:
    """Found by review (issue 22, item 7): three servers on a data dir, one killed -9; the other two cancel
    its tasks at once. A cancel that reached a task while a live server was settling it (TERM sent, the
    grace running) cancelled the settling itself: the KILL never came, and a command that outlives TERM
    ran on for good though its cancel answered `cancelled`. Every one is dead within the grace now.
    Real server processes: the dead one's commands go to init, not to a subreaper that would tend them."""
    data = tmp_path / "data"
    env = {"OFFLOAD_KILL_GRACE_S": "2", "OFFLOAD_LEASE_S": "1.5"}
    crashing = await start_server(tmp_path, data_dir=data, env=env)
    fired = [
        await crashing.call("run_shell_background", command=f"trap '' TERM; echo {i}; sleep 300") for i in range(3)
    ]
    one = await start_server(tmp_path, data_dir=data, env=env)
    two = await start_server(tmp_path, data_dir=data, env=env)
    async with one.process, two.process:
        await kill_9(crashing)
        db = sqlite3.connect(data / "offload.db")
        dead = {row[0] for row in db.execute("SELECT instance FROM tasks")}
        with anyio.fail_after(10):  # a live server claims them (its lease loop) and starts ending them
            while {row[0] for row in db.execute("SELECT instance FROM tasks")} & dead:
                await one.call("list_tasks", limit=1)
        db.close()
        async with anyio.create_task_group() as tg:  # while they are being settled: TERM sent, grace running
            for server in (one, two):
                tg.start_soon(cancel_all, server, [f["task_id"] for f in fired])
        for f in fired:
            assert await gone(f["pid"], timeout_s=10), f"the command of {f['task_id']} is still running"
            assert live_group_members(f["pid"]) == []
            view = await one.call("get_cached_output", task_id=f["task_id"])
            assert view["status"] in ("failed", "cancelled"), view
        for server in (one, two):
            await server.process.stdin.aclose()  # type: ignore[union-attr]


async def cancel_all(server: RawServer, task_ids: list[str]) -> None:
    """Sends every cancel at once, then reads the answers (whatever they are)."""
    for n, task_id in enumerate(task_ids):
        call_ = {"name": "cancel_task", "arguments": {"task_id": task_id}}
        await server.send({"jsonrpc": "2.0", "id": f"cancel-{n}", "method": "tools/call", "params": call_})
    answered: set[str] = set()
    with anyio.fail_after(20):
        while len(answered) < len(task_ids):
            message = await server.receive()
            if str(message.get("id", "")).startswith("cancel-"):
                answered.add(message["id"])
