"""A worker's process table (server/process_table.py): what a killed worker left running on its machine is
ended by the next worker on its data directory, whoever settled its tasks; a live worker's commands never.

The table itself against real processes; then workers as separate processes (`testkit.cluster`) on the
session's real Redis, killed with SIGKILL mid-command."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import call, finish, live_group_members
from mcp import Client

from server.process_table import ProcessTable, end_left_behind
from testkit.cluster import connect, start_node, stop_nodes
from testkit.processes import gone, when_tree_runs
from testkit.redis_server import RedisServer
from tools.context import ProcessInfo
from tools.process import TASK_MARKER, identify, portable

pytestmark = pytest.mark.anyio

DIES_WITH_ROWS = """
import json, sys
from pathlib import Path
from server.process_table import ProcessTable
from tools.context import ProcessInfo
table = ProcessTable.open(Path(sys.argv[1]), sys.argv[2])
for task_id, pid, ticks, boot in json.loads(sys.argv[3]):
    table.add(task_id, ProcessInfo(pid, ticks, boot))
# exits holding its rows and never giving up its lock itself: a worker killed with its commands running
"""


@contextmanager
def sleepers(count: int, **options: Any) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`sleep 300` processes, each leading its own session as a command does; all ended at the end."""
    started = [subprocess.Popen(["sleep", "300"], start_new_session=True, **options) for _ in range(count)]
    try:
        yield started
    finally:
        for process in started:
            process.kill()
            process.wait()


async def test_the_rows_of_a_dead_instance_are_ended_never_a_recycled_pid_nor_a_live_instance(tmp_path: Path) -> None:
    marked_env = {**os.environ, TASK_MARKER: "t-left"}
    with sleepers(3) as (group, recycled, running), sleepers(1, env=marked_env) as (escaped,):
        real, moved = identify(group.pid), identify(recycled.pid)
        assert real.start_ticks is not None and moved.start_ticks is not None
        rows = [
            ("t-left", real.pid, real.start_ticks, real.boot_id),  # its group, and `escaped` left it with the marker
            ("t-recycled", moved.pid, moved.start_ticks + 1, moved.boot_id),  # that pid is another process now
        ]
        with ProcessTable.open(tmp_path, "live") as live, ProcessTable.open(tmp_path, "me") as me:
            live.add("t-live", identify(running.pid))
            await anyio.run_process([sys.executable, "-c", DIES_WITH_ROWS, str(tmp_path), "dead", json.dumps(rows)])
            left = me.left_behind()
            assert sorted(row.task_id for row in left) == ["t-left", "t-recycled"]
            assert await end_left_behind(left, grace_s=0.5) == 1
            assert await gone(group.pid) and await gone(escaped.pid)
            assert recycled.poll() is None and running.poll() is None
            me.forget(left)
            assert me.left_behind() == []
            live.remove("t-live")
            me.add("t-mine", ProcessInfo(running.pid, None, None))
        with ProcessTable.open(tmp_path, "later") as later:  # `me` closed with a row: it is left behind now
            assert [(row.instance, row.task_id) for row in later.left_behind()] == [("me", "t-mine")]


# ---- workers as processes ----


async def fire_until_running(client: Client, folder: Path, command: str, **fire: Any) -> tuple[str, Path]:
    """Fires `command`, which writes to {ready} once it runs, and returns the task id and a FIFO `go` the
    command may read from; returns once the command wrote: an event, bounded, no polling."""
    folder = Path(tempfile.mkdtemp(prefix="fifos-", dir=folder))
    ready, go = folder / "ready", folder / "go"
    os.mkfifo(ready)
    os.mkfifo(go)
    fd = os.open(ready, os.O_RDONLY | os.O_NONBLOCK)
    try:
        arguments = {"command": command.format(ready=ready, go=go)}
        fired = await call(client, "fire_tool", tool="shell", arguments=arguments, **fire)
        with anyio.fail_after(20):
            await anyio.wait_readable(fd)
    finally:
        os.close(fd)
    return fired["task_id"], go


async def group_of(client: Client, task_id: str) -> tuple[int, list[int]]:
    """The task's process group as its record names it, and the group's live members."""
    pgid = (await call(client, "get_cached_output", task_id=task_id))["pid"]
    assert pgid is not None
    members = live_group_members(pgid)
    assert members, f"the group {pgid} of task {task_id} runs nothing"
    return pgid, members


async def all_gone(pids: list[int]) -> bool:
    """True once every one of `pids` has exited, each awaited for at most 10 s."""
    return all([await gone(pid, timeout_s=10) for pid in pids])


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_the_next_worker_on_a_data_directory_ends_what_a_killed_one_left_and_not_what_a_live_one_runs(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Two workers share a data directory; one is killed mid-command. Its lease in Redis would hold for a
    minute, so only the table can end its command at once; the other's command runs on untouched."""
    url = redis_server.url
    async with anyio.create_task_group() as tg:
        # the live one's own loop (every lease_s / 3) stays out of the way: the successor is the one tested
        live = await start_node(tg, tmp_path, "worker", url, "shared", "--queue", "a", lease_s=600)
        doomed = await start_node(tg, tmp_path, "worker", url, "shared", "--queue", "b", lease_s=60)
        front_end = await start_node(tg, tmp_path, "front-end", url, "f")
        nodes = [live, doomed, front_end]
        try:
            async with connect(front_end.url) as client:
                command = "echo ready > {ready}; read line < {go}; echo released"
                kept, go = await fire_until_running(client, tmp_path, command, target="a")
                _, kept_members = await group_of(client, kept)
                left = await when_tree_runs(lambda command: _fire(client, command, target="b"))
                pgid, left_members = await group_of(client, left)
                await doomed.kill_9()
                assert live_group_members(pgid) == left_members  # nothing else ends it

                nodes.append(await start_node(tg, tmp_path, "worker", url, "shared", "--queue", "b", lease_s=60))
                assert await all_gone(left_members)  # by its start, before it took any task
                settled = await finish(client, left)
                assert settled["status"] == "failed" and settled["error"]["kind"] == "interrupted", settled
                assert "what was left of it was killed" in settled["error"]["message"]

                assert all(live_group_members(pid) for pid in kept_members)  # the live worker's command runs on
                release = os.open(go, os.O_WRONLY | os.O_NONBLOCK)  # fails at once if nothing reads it any more
                os.write(release, b"go\n")
                os.close(release)
                done = await finish(client, kept)
                assert done["status"] == "completed" and done["output"]["text"] == "released\n", done
        finally:
            await stop_nodes(nodes)
            tg.cancel_scope.cancel()


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.skipif(portable(), reason="stands another machine in by the portable core, so needs the /proc one here")
async def test_a_task_settled_where_its_processes_are_out_of_reach_has_them_ended_by_the_next_worker_here(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """The case of a worker on another machine settling a killed worker's task: its identity check refuses
    the process (recorded under another boot) and its marker scan finds nothing there. Stood in for here by
    a worker on the portable process core (it cannot confirm a /proc identity, so refuses it as another
    boot's) and a command that drops its task marker; the killed worker's successor on its data directory
    then ends the command through its table."""
    url = redis_server.url
    async with anyio.create_task_group() as tg:
        doomed = await start_node(tg, tmp_path, "worker", url, "w0", "--queue", "w0")
        elsewhere = await start_node(
            tg, tmp_path, "worker", url, "w1", "--queue", "w1", extra_env={"OFFLOAD_PORTABLE_PROCESS": "1"}
        )
        front_end = await start_node(tg, tmp_path, "front-end", url, "f")
        nodes = [doomed, elsewhere, front_end]
        try:
            async with connect(front_end.url) as client:

                async def fire_unmarked(command: str) -> str:
                    return await _fire(client, f"exec env -u {TASK_MARKER} bash -c {shlex.quote(command)}", target="w0")

                left = await when_tree_runs(fire_unmarked)
                pgid, members = await group_of(client, left)
                await doomed.kill_9()
                settled = await finish(client, left)  # by `elsewhere`, once the lease lapsed
                assert settled["status"] == "failed" and settled["error"]["kind"] == "interrupted", settled
                assert "nothing of it was still running" in settled["error"]["message"]  # what it could see
                assert live_group_members(pgid) == members  # and so it runs on, as it did before the table

                successor = await start_node(tg, tmp_path, "worker", url, "w0", "--queue", "w0")
                nodes.append(successor)
                assert await all_gone(members)
                assert f"ended what task {left} left running".encode() in successor.log
        finally:
            await stop_nodes(nodes)
            tg.cancel_scope.cancel()


async def _fire(client: Client, command: str, **fire: Any) -> str:
    return str((await call(client, "fire_tool", tool="shell", arguments={"command": command}, **fire))["task_id"])
