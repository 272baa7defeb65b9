"""The process core in both of its forms: identity and waiting, with real children and non-children.

`core` runs each test under the Linux core (/proc, pidfd) and the portable one (psutil, kqueue on
macOS, a bounded poll elsewhere), the one macOS runs; the Linux one is skipped where it is absent.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator

import anyio
import pytest

from testkit.processes import gone, live_group_members, when_tree_runs
from tools import process
from tools.process import (
    TASK_MARKER,
    end_marked,
    exit_notice,
    force_portable,
    group_alive,
    identify,
    is_same_process,
    kill_left_behind,
    portable,
    reap,
    wait_for_exit,
)

pytestmark = pytest.mark.anyio

LINUX_CORE = process._LINUX_CORE
WAIT_S = 10


@pytest.fixture(params=["linux", "portable"])
def core(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "linux" and not LINUX_CORE:
        pytest.skip("the Linux core needs /proc and pidfd")
    was = process._forced_portable
    force_portable(request.param == "portable")
    try:
        yield request.param
    finally:
        force_portable(was)


def blocked_child(**kwargs: object) -> subprocess.Popen[bytes]:
    """A child that runs until its stdin closes: it ends when the test says so, not after a time."""
    return subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE,
        **kwargs,  # type: ignore[call-overload]
    )


def blocked_grandchild(env: dict[str, str] | None = None) -> tuple[int, int]:
    """A process that is not our child (its parent exits at once), in a session of its own, running
    until the returned pipe end is closed. Returns (pid, write end of its stdin)."""
    read_fd, write_fd = os.pipe()
    launcher = (
        "import subprocess, sys; "
        "p = subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.read()'], stdin=sys.stdin, "
        "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True); print(p.pid)"
    )
    out = subprocess.run(
        [sys.executable, "-c", launcher], stdin=read_fd, capture_output=True, check=True, env=env, timeout=WAIT_S
    )
    os.close(read_fd)
    return int(out.stdout), write_fd


async def still_waiting(pid: int) -> bool:
    """wait_for_exit has not returned within a short bound (what a live process must look like)."""
    with anyio.move_on_after(0.2):
        await wait_for_exit(pid)
        return False
    return True


def test_the_core_in_use(core: str) -> None:
    info = identify(os.getpid())
    assert portable() is (core == "portable")
    assert info.start_ticks is not None and info.boot_id is not None
    assert info.boot_id.startswith("psutil:") is (core == "portable")
    assert is_same_process(info)


def test_identity_tells_a_recycled_pid_and_another_boot(core: str) -> None:
    child = blocked_child()
    try:
        info = identify(child.pid)
        assert is_same_process(info)
        assert info.start_ticks is not None
        assert not is_same_process(dataclasses.replace(info, start_ticks=info.start_ticks + 10_000_000))
        other_boot = "psutil:1000.000000" if core == "portable" else "00000000-0000-0000-0000-000000000000"
        assert not is_same_process(dataclasses.replace(info, boot_id=other_boot))
        assert not is_same_process(dataclasses.replace(info, start_ticks=None))
    finally:
        child.communicate(timeout=WAIT_S)
    assert not is_same_process(info)  # exited and reaped


def test_a_record_of_either_core_is_checked_by_its_own_rule() -> None:
    """A restart may switch cores: a portable record is confirmed by either; a /proc record cannot be
    confirmed without /proc, so the portable core never signals what it describes."""
    if not LINUX_CORE:
        pytest.skip("the Linux core needs /proc and pidfd")
    was = process._forced_portable
    child = blocked_child(start_new_session=True)
    try:
        force_portable(True)
        portable_record = identify(child.pid)
        force_portable(False)
        proc_record = identify(child.pid)
        assert is_same_process(portable_record) and is_same_process(proc_record)
        force_portable(True)
        assert is_same_process(portable_record) and not is_same_process(proc_record)
        assert not anyio.run(kill_left_behind, proc_record, 0.1)
        assert child.poll() is None
    finally:
        force_portable(was)
        child.communicate(timeout=WAIT_S)


async def test_waiting_for_a_process_that_is_not_our_child(core: str) -> None:
    pid, stdin = blocked_grandchild()
    try:
        assert await still_waiting(pid)
    finally:
        os.close(stdin)
    with anyio.fail_after(WAIT_S):
        await wait_for_exit(pid)
    reap(pid)  # if it was handed to us (a subreaper from an earlier test)


async def test_a_zombie_child_counts_as_exited(core: str) -> None:
    child = blocked_child()
    assert await still_waiting(child.pid)
    assert child.stdin is not None
    child.stdin.close()
    with anyio.fail_after(WAIT_S):
        await wait_for_exit(child.pid)  # not reaped yet: a zombie
    assert child.wait(timeout=WAIT_S) == 0
    await wait_for_exit(child.pid)  # gone altogether


def test_exit_notice_turns_readable_when_the_child_exits(core: str) -> None:
    child = blocked_child()
    with exit_notice(child) as exited:
        assert not _readable(exited, 0.1)
        assert child.stdin is not None
        child.stdin.close()
        assert _readable(exited, WAIT_S)
        assert child.wait(timeout=WAIT_S) == 0


def _readable(fd: int, timeout_s: float) -> bool:
    import select

    return bool(select.select([fd], [], [], timeout_s)[0])


async def test_a_group_left_behind_is_killed_after_its_identity_is_checked(core: str) -> None:
    async def spawn(command: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["sh", "-c", command], stdin=subprocess.DEVNULL, start_new_session=True)  # noqa: ASYNC220

    leader = await when_tree_runs(spawn)  # returns once every process of the tree exists (a FIFO says so)
    members = live_group_members(leader.pid)
    info = identify(leader.pid)
    assert not await kill_left_behind(dataclasses.replace(info, start_ticks=(info.start_ticks or 0) + 1), 0.5)
    assert group_alive(leader.pid)
    assert await kill_left_behind(info, 0.5)
    leader.communicate(timeout=WAIT_S)
    assert leader.returncode != 0
    for pid in members:  # the backgrounded member too: an exit event each (a pidfd, or psutil), bounded
        assert await gone(pid, WAIT_S)
    process.tend_orphans(())  # reaps it if it became our child
    assert not group_alive(leader.pid)


async def test_marked_processes_are_found_anywhere(core: str) -> None:
    task = f"test-{os.getpid()}-{core}"
    pid, stdin = blocked_grandchild({**os.environ, TASK_MARKER: task})
    try:
        with anyio.fail_after(WAIT_S):
            assert await end_marked(task, WAIT_S) == 1
            await wait_for_exit(pid)
    finally:
        os.close(stdin)
        reap(pid)
