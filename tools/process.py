"""Process groups: signal, alive, identity, wait, and the processes that leave their group.

Every command leads its own session, so its whole tree shares one process group that can be
signalled at once. Two things get past a group: a process that calls `setsid` (or `set -m` job
control) and a recycled pid. The first is found by the marker every command's environment
carries (`OFFLOAD_TASK`) among the server's children — the server is a child subreaper, so an
orphan that left its group is reparented to it, not to init — and the second by identity
(pid + start time + boot id).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Collection, Iterator
from pathlib import Path

import anyio

from tools.context import ProcessInfo

log = logging.getLogger(__name__)

TASK_MARKER = "OFFLOAD_TASK"
"""Environment variable naming the task a process belongs to; inherited by its descendants."""
_PROC = Path("/proc")
_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Orphans of our commands come to us instead of init, where we can find and end them (Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def signal_name(number: int) -> str:
    """SIGTERM, SIGRTMIN+6, or SIG40 for a number the platform does not name."""
    with contextlib.suppress(ValueError):
        return signal.Signals(number).name
    rtmin, rtmax = getattr(signal, "SIGRTMIN", 0), getattr(signal, "SIGRTMAX", -1)
    if rtmin <= number <= rtmax:
        return f"SIGRTMIN+{number - rtmin}" if number - rtmin <= rtmax - number else f"SIGRTMAX-{rtmax - number}"
    return f"SIG{number}"


# ---- groups ----


def group_alive(pgid: int) -> bool:
    """True while any process of the group is alive; zombies do not count.

    An orphaned child that died stays a zombie until it is reaped, and in a container init may
    never do so: `killpg(pgid, 0)` alone would call such a group alive forever.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _PROC.is_dir() or any(_live_in_group(stat, pgid) for stat in _PROC.glob("[0-9]*/stat"))


def _live_in_group(stat_path: Path, pgid: int) -> bool:
    fields = _stat_fields(stat_path)
    return fields is not None and int(fields[2]) == pgid and fields[0] not in ("Z", "X")


def _stat_fields(stat_path: Path) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state is [0], ppid [1], pgrp [2])."""
    try:
        return stat_path.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None  # gone while we looked


def signal_group(pgid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


async def stop_group(pgid: int, grace_s: float, leader_exit: Callable[[], Awaitable[object]]) -> None:
    """TERM the whole group, give it `grace_s`, then KILL whatever is left.

    Shielded by the caller: this must finish even when the task is being cancelled.
    """
    if not group_alive(pgid):
        return
    signal_group(pgid, signal.SIGTERM)
    with anyio.move_on_after(grace_s):
        await leader_exit()
        # Grandchildren are not ours to wait for: no exit event reaches us, so look, bounded by grace_s.
        while group_alive(pgid):  # noqa: ASYNC110 - there is no event to wait on
            await anyio.sleep(0.02)
    signal_group(pgid, signal.SIGKILL)
    await leader_exit()


# ---- identity: never signal a recycled pid ----


def start_ticks(pid: int) -> int | None:
    """Process start time in clock ticks since boot, or None if it is gone or unknowable."""
    fields = _stat_fields(_PROC / str(pid) / "stat")
    try:
        return None if fields is None else int(fields[19])
    except (IndexError, ValueError):
        return None


@functools.cache
def boot_id() -> str | None:
    try:
        return (_PROC / "sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def identify(pid: int) -> ProcessInfo:
    return ProcessInfo(pid, start_ticks(pid), boot_id())


def is_same_process(info: ProcessInfo) -> bool:
    """True if `info.pid` is still the process we started (not a recycled pid)."""
    if info.boot_id is None or info.boot_id != boot_id():
        return False
    return info.start_ticks is not None and start_ticks(info.pid) == info.start_ticks


def group_is_ours(info: ProcessInfo) -> bool:
    """May the group `info.pid` be signalled? Yes while its leader is the process we started,
    or, once the leader is gone, while members remain: Linux does not hand out a pid that is
    still some group's id, so those members are the ones our command left behind."""
    if info.boot_id is None or info.boot_id != boot_id() or not group_alive(info.pid):
        return False
    leader = start_ticks(info.pid)
    return leader is None or leader == info.start_ticks


async def kill_left_behind(info: ProcessInfo, grace_s: float) -> bool:
    """TERM then KILL a group an earlier server run left behind; returns whether it did."""
    if not group_is_ours(info):
        return False
    signal_group(info.pid, signal.SIGTERM)
    with anyio.move_on_after(grace_s):
        while group_alive(info.pid):  # noqa: ASYNC110 - not our children: no exit event reaches us
            await anyio.sleep(0.02)
    if group_alive(info.pid):
        signal_group(info.pid, signal.SIGKILL)
    return True


async def wait_for_exit(pid: int) -> None:
    """Waits for a process that may not be our child. A pidfd turns readable when it exits."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await anyio.wait_readable(fd)
    finally:
        os.close(fd)


# ---- processes that left their group ----


def escaped(task_id: str) -> list[int]:
    """Live children of this server (orphans handed to us as subreaper) that belong to `task_id`.
    Cheap when nothing escaped: one read of our children list; the rest are ours already."""
    found = []
    for pid in _children(os.getpid()):
        if pid in _SPAWNED:
            continue
        fields = _stat_fields(_PROC / str(pid) / "stat")
        if fields is not None and fields[0] not in ("Z", "X") and _marker_of(pid) == task_id:
            found.append(pid)
    return found


def _children(pid: int) -> list[int]:
    children: list[int] = []
    for task in _PROC.glob(f"{pid}/task/*/children"):
        with contextlib.suppress(OSError):
            children.extend(int(child) for child in task.read_text().split())
    return children


async def end_escaped(task_id: str, grace_s: float) -> int:
    """Ends what a task's command left outside its group; each one's own group goes with it.
    Repeated because a killed escapee's own children are handed to us in turn."""
    ended = 0
    for _ in range(8):
        pids = escaped(task_id)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(OSError):
                pgid = os.getpgid(pid)
                if pgid != os.getpgrp():
                    signal_group(pgid, signal.SIGKILL)
                os.kill(pid, signal.SIGKILL)
            ended += 1
        for pid in pids:
            with anyio.move_on_after(grace_s):
                await wait_for_exit(pid)
            reap(pid)
            _ORPHANS.pop(pid, None)
    if ended:
        log.info("task %s: ended %d process(es) that had left the command's process group", task_id, ended)
    return ended


def _marked(task_id: str) -> list[int]:
    return [int(entry.name) for entry in _PROC.glob("[0-9]*") if _marker_of(int(entry.name)) == task_id]


async def end_marked(task_id: str, grace_s: float) -> int:
    """Ends every process, anywhere, carrying the task's marker: after a crash the orphans of a
    dead server went to init, not to us. Scans all of /proc, so it is for recovery only."""
    pids = _marked(task_id)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        with anyio.move_on_after(grace_s):
            await wait_for_exit(pid)
    return len(pids)


def reap(pid: int) -> None:
    """Collects an orphan handed to us once it is dead (it is not asyncio's to wait for)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


_SPAWNED: set[int] = set()
"""Children we started ourselves (command leaders, capture processes): their waiters reap them."""
_ORPHANS: dict[int, set[str]] = {}
"""Orphans of our commands handed to us → the tasks they may belong to (their marker's task, or,
for one that dropped its marker, every task running when it was first seen)."""


_SPAWNING = 0
"""Spawns under way: their child exists (and may even have exited) before its pid is tracked."""


@contextlib.contextmanager
def spawning() -> Iterator[None]:
    """Wrap every spawn of ours: orphans are not looked for meanwhile, so a child that exits before
    it is tracked is never taken for an orphan and reaped behind its waiter's back."""
    global _SPAWNING
    _SPAWNING += 1
    try:
        yield
    finally:
        _SPAWNING -= 1


def track(pid: int) -> None:
    _SPAWNED.add(pid)


def untrack(pid: int) -> None:
    _SPAWNED.discard(pid)


def tend_orphans(running: Collection[str]) -> int:
    """Ends orphans of our commands whose tasks have all ended, and reaps the dead ones; returns
    how many it ended. An orphan is a child we did not spawn, in a session other than ours (every
    command leads its own): a child some library starts in our session is never touched. One that
    dropped its marker (`env -i setsid ...`) belongs to one of the tasks running when it appeared:
    it is ended once all of those have."""
    if _SPAWNING:
        return 0  # the next call looks
    ended = 0
    own_session = os.getsid(0)
    for pid in _children(os.getpid()):
        if pid in _SPAWNED:
            continue
        fields = _stat_fields(_PROC / str(pid) / "stat")
        if fields is None:
            continue
        if fields[0] == "Z":
            if _ORPHANS.pop(pid, None) is not None or _session(pid) not in (None, own_session):
                reap(pid)
            continue
        if pid not in _ORPHANS:
            if _session(pid) in (None, own_session):
                continue
            marker = _marker_of(pid)
            _ORPHANS[pid] = {marker} if marker is not None else set(running)
        _ORPHANS[pid] &= set(running)
        if not _ORPHANS[pid]:
            _kill_orphan(pid)
            ended += 1
    return ended


def end_orphans() -> int:
    """At shutdown: every orphan of our commands goes (a detached command is not our child)."""
    return tend_orphans(())


def _kill_orphan(pid: int) -> None:
    with contextlib.suppress(OSError):
        pgid = os.getpgid(pid)
        if pgid != os.getpgrp():
            signal_group(pgid, signal.SIGKILL)
        os.kill(pid, signal.SIGKILL)
    log.info("ended process %d, left behind by a finished task outside its process group", pid)


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _marker_of(pid: int) -> str | None:
    try:
        environ = (_PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return None
    prefix = f"{TASK_MARKER}=".encode()
    return next((e[len(prefix) :].decode(errors="replace") for e in environ.split(b"\0") if e.startswith(prefix)), None)
