"""Process groups: signal, alive, identity, wait, and the processes that leave their group.

Every command leads its own session, so its whole tree shares one process group that can be
signalled at once. Two things get past a group: a process that calls `setsid` (or `set -m` job
control) and a recycled pid. The first is found by the marker every command's environment
carries (`OFFLOAD_TASK`) among the server's children — the server is a child subreaper, so an
orphan that left its group is reparented to it, not to init — and the second by identity
(pid + start time + boot id).

Two cores behind one surface. On Linux (the default there) identity is /proc's start ticks and
boot id, and a process that is not our child is awaited by pidfd. Where /proc or pidfd is absent
(macOS), or when forced (`OFFLOAD_PORTABLE_PROCESS`, the `portable_process` setting: how CI runs the
macOS paths on Linux), identity is psutil's create time + boot time, a non-child is awaited by
kqueue (NOTE_EXIT) or, without kqueue, a bounded psutil poll, and there is no subreaper: orphans
go to init/launchd, so what left a group is found by scanning this user's processes for the
marker. A record keeps its kind (`boot_id` "psutil:..." or a /proc boot id), so identities stored
by one core are checked by the same rule after a restart under the other; one that cannot be
confirmed (a /proc record, no /proc) is never signalled.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Collection, Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import psutil

from tools.context import ProcessInfo

log = logging.getLogger(__name__)

TASK_MARKER = "OFFLOAD_TASK"
"""Environment variable naming the task a process belongs to; inherited by its descendants."""
_PROC = Path("/proc")
_PR_SET_CHILD_SUBREAPER = 36
PORTABLE_ENV = "OFFLOAD_PORTABLE_PROCESS"
"""Set to 1 (or the `portable_process` setting): use the portable core even where Linux's is there."""
_PSUTIL_BOOT = "psutil:"
"""Prefix of a `boot_id` recorded by the portable core: "psutil:" + boot time (epoch seconds)."""
_BOOT_DRIFT_S = 2.0
"""Boot times read apart by at most this are one boot (a clock step moves them; a reboot takes longer)."""
POLL_MAX_S = 0.05
"""The longest pause of the psutil poll that waits for a process where neither pidfd nor kqueue exists."""

_forced_portable = os.environ.get(PORTABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def force_portable(on: bool = True) -> None:
    """Use (or stop forcing) the portable core; the server calls it at start from its settings."""
    global _forced_portable
    _forced_portable = on


def portable() -> bool:
    """True where the portable core is in use: forced, or no /proc or pidfd on this platform."""
    return _forced_portable or not _LINUX_CORE


_LINUX_CORE = hasattr(os, "pidfd_open") and (_PROC / "self/stat").exists()


def become_subreaper() -> bool:
    """Orphans of our commands come to us instead of init, where we can find and end them (Linux).
    Not under the portable core: macOS has nothing like it, and the portable core is what runs there."""
    if sys.platform == "linux" and not portable():
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
        except (OSError, AttributeError):
            return False
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
    if portable():
        return any(_pgid(pid) == pgid and _state(pid) not in (None, "Z") for pid in psutil.pids())
    return any(_live_in_group(stat, pgid) for stat in _PROC.glob("[0-9]*/stat"))


def _live_in_group(stat_path: Path, pgid: int) -> bool:
    fields = _stat_fields(stat_path)
    return fields is not None and int(fields[2]) == pgid and fields[0] not in ("Z", "X")


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _state(pid: int) -> str | None:
    """ "Z" for a zombie, "R" for any other live process, None once it is gone (or unknowable)."""
    if not portable():
        fields = _stat_fields(_PROC / str(pid) / "stat")
        return None if fields is None or fields[0] == "X" else fields[0]
    try:
        return "Z" if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE else "R"
    except psutil.Error:
        return None


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
    """Process start time in clock ticks since boot, or None if it is gone or unknowable (/proc)."""
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


def _boot_time() -> float | None:
    try:
        return psutil.boot_time()
    except (psutil.Error, OSError, RuntimeError):
        return None


def _created_us(pid: int) -> int | None:
    """psutil's create time in microseconds since the epoch, or None if it is gone or unknowable."""
    try:
        return round(psutil.Process(pid).create_time() * 1_000_000)
    except psutil.Error:
        return None


def identify(pid: int) -> ProcessInfo:
    if not portable():
        return ProcessInfo(pid, start_ticks(pid), boot_id())
    booted = _boot_time()
    return ProcessInfo(pid, _created_us(pid), None if booted is None else f"{_PSUTIL_BOOT}{booted:.6f}")


def _same_boot(info: ProcessInfo) -> bool:
    """Is `info` from this boot? Checked by the rule of the core that recorded it; a /proc record
    cannot be confirmed without /proc, so under the portable core it is taken for another boot."""
    if info.boot_id is None or info.start_ticks is None:
        return False
    if info.boot_id.startswith(_PSUTIL_BOOT):
        now = _boot_time()
        return now is not None and abs(now - _recorded_boot(info)) <= _BOOT_DRIFT_S
    return not portable() and info.boot_id == boot_id()


def _recorded_boot(info: ProcessInfo) -> float:
    try:
        return float((info.boot_id or "").removeprefix(_PSUTIL_BOOT))
    except ValueError:
        return float("nan")


def _started_as_recorded(info: ProcessInfo) -> bool | None:
    """Does the process now at `info.pid` have the recorded start? None when no process has that pid.
    A psutil record matches on the create time, or on the time since boot (both move with a clock
    step on Linux, where psutil derives one from the other)."""
    if info.boot_id is not None and info.boot_id.startswith(_PSUTIL_BOOT):
        created, booted = _created_us(info.pid), _boot_time()
        if created is None or booted is None or info.start_ticks is None:
            return None
        since_boot = created - round(booted * 1_000_000)
        return info.start_ticks in (created, since_boot + round(_recorded_boot(info) * 1_000_000))
    ticks = start_ticks(info.pid)
    return None if ticks is None else ticks == info.start_ticks


def is_same_process(info: ProcessInfo) -> bool:
    """True if `info.pid` is still the process we started (not a recycled pid)."""
    return _same_boot(info) and _started_as_recorded(info) is True


def carries_marker(pid: int, task_id: str) -> bool:
    """True if `pid` carries this task's marker: it is that task's own process whatever its recorded identity
    says (a record of the other process core, or a boot time moved by a clock step)."""
    try:
        return psutil.Process(pid).environ().get(TASK_MARKER) == task_id
    except (psutil.Error, OSError):
        return False


def group_is_ours(info: ProcessInfo) -> bool:
    """May the group `info.pid` be signalled? Yes while its leader is the process we started,
    or, once the leader is gone, while members remain: Linux (and the BSDs, macOS) do not hand
    out a pid that is still some group's id, so those members are the ones our command left behind."""
    if not _same_boot(info) or not group_alive(info.pid):
        return False
    return _started_as_recorded(info) is not False


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
    """Waits for a process that may not be our child: a pidfd turns readable when it exits (Linux),
    a kqueue NOTE_EXIT fires (macOS, BSD); elsewhere a psutil poll, backing off to `POLL_MAX_S`.
    A zombie counts as exited."""
    if not portable():
        try:
            fd = _pidfd_open(pid)
        except ProcessLookupError:
            return
        try:
            await anyio.wait_readable(fd)
        finally:
            os.close(fd)
    elif _KQUEUE:
        await _wait_kqueue(pid)
    else:
        await _wait_polling(pid)


_KQUEUE = sys.platform == "darwin" and hasattr(select, "kqueue")
"""kqueue process events: used on macOS (the BSDs have them too; nothing else is built for here)."""


def _pidfd_open(pid: int) -> int:
    """`os.pidfd_open`, which only Linux has; the portable core never calls it."""
    if sys.platform == "linux":
        return os.pidfd_open(pid)
    raise OSError(errno.ENOSYS, "no pidfd on this platform")


async def _wait_kqueue(pid: int) -> None:
    if sys.platform == "darwin":
        kq = select.kqueue()
        try:
            exit_event = select.kevent(
                pid,
                filter=select.KQ_FILTER_PROC,
                flags=select.KQ_EV_ADD | select.KQ_EV_ONESHOT,
                fflags=select.KQ_NOTE_EXIT,
            )
            try:
                kq.control([exit_event], 0, 0)
            except ProcessLookupError:
                return  # gone already
            except PermissionError:  # not ours to watch (another user's): look instead
                await _wait_polling(pid)
                return
            if _state(pid) in (None, "Z"):
                return  # a zombie: exited, though still registered
            await anyio.wait_readable(kq.fileno())
        finally:
            kq.close()


async def _wait_polling(pid: int) -> None:
    try:
        process = psutil.Process(pid)  # remembers the create time: a recycled pid is not taken for it
    except psutil.Error:
        return
    pause_s = 0.001
    while _runs(process):
        await anyio.sleep(pause_s)
        pause_s = min(pause_s * 2, POLL_MAX_S)


def _runs(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@contextlib.contextmanager
def exit_notice(child: subprocess.Popen[bytes]) -> Iterator[int]:
    """A descriptor that turns readable once our `child` has exited: its pidfd on Linux; elsewhere
    a pipe that a thread writes to once it has waited for the child (then reaped: `child.wait()`
    returns its status at once)."""
    if not portable():
        pidfd = _pidfd_open(child.pid)
        try:
            yield pidfd
        finally:
            os.close(pidfd)
        return
    read_fd, write_fd = os.pipe()

    def wait_then_tell() -> None:
        child.wait()
        os.write(write_fd, b"x")
        os.close(write_fd)

    waiter = threading.Thread(target=wait_then_tell, name=f"wait-{child.pid}", daemon=True)
    waiter.start()
    try:
        yield read_fd
    finally:
        if child.returncode is not None:
            waiter.join()
            os.close(read_fd)
        # else the waiter still writes to its pipe once the child exits: both ends stay open until then


# ---- processes that left their group ----


def escaped(task_id: str) -> list[int]:
    """Live children of this server (orphans handed to us as subreaper) that belong to `task_id`.
    Cheap when nothing escaped: one read of our children list; the rest are ours already."""
    found = []
    for pid in _children(os.getpid()) if not portable() else _own_processes():
        if pid in _SPAWNED:
            continue
        if _state(pid) not in (None, "Z") and _marker_of(pid) == task_id:
            found.append(pid)
    return found


def leftovers(task_id: str | None) -> list[int]:
    """What a command left behind, seen from the process that ran it: its live children (orphans
    come to a subreaper), and without a subreaper every other process carrying the task's marker."""
    found = [pid for pid in _children(os.getpid()) if _state(pid) not in (None, "Z")]
    if portable() and task_id is not None:
        found += [pid for pid in _marked(task_id) if pid not in found]
    return found


def _own_processes() -> list[int]:
    """Every process but this one (another user's environment is unreadable to us, so their markers
    never match): where orphans go to init, the only place to look for them."""
    me = os.getpid()
    return [pid for pid in psutil.pids() if pid != me]


def _children(pid: int) -> list[int]:
    if portable():
        try:
            return [child.pid for child in psutil.Process(pid).children()]
        except psutil.Error:
            return []
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
        pids = await anyio.to_thread.run_sync(escaped, task_id) if portable() else escaped(task_id)
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
    if portable():
        return [pid for pid in _own_processes() if _marker_of(pid) == task_id]
    return [int(entry.name) for entry in _PROC.glob("[0-9]*") if _marker_of(int(entry.name)) == task_id]


async def end_marked(task_id: str, grace_s: float) -> int:
    """Ends every process, anywhere, carrying the task's marker: after a crash the orphans of a
    dead server went to init, not to us. Scans all of /proc, so it is for recovery only."""
    pids = await anyio.to_thread.run_sync(_marked, task_id)
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
        state = _state(pid)
        if state is None:
            continue
        if state == "Z":
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
    if portable():
        try:
            return psutil.Process(pid).environ().get(TASK_MARKER)
        except psutil.Error:
            return None
    try:
        environ = (_PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return None
    prefix = f"{TASK_MARKER}=".encode()
    return next((e[len(prefix) :].decode(errors="replace") for e in environ.split(b"\0") if e.startswith(prefix)), None)
