"""Process helpers the tests and the bench share: a command tree that says when it runs, the live
members of a process group, waiting for a process that is not our child, and finding marked processes.

Portable: pidfd where Linux has it (an event), else psutil (macOS; a bounded wait in a thread)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import anyio
import anyio.to_thread
import psutil

T = TypeVar("T")


async def when_tree_runs(start: Callable[[str], Awaitable[T]], timeout_s: float = 5) -> T:
    """Starts, through `start(command)`, a command with two background children, and returns once
    all its processes exist: the command says so by writing to a FIFO, whose read end turns readable
    then. An event, bounded by `timeout_s`; no polling."""
    with tempfile.TemporaryDirectory(prefix="offload-tree-") as folder:
        fifo = Path(folder) / "ready"
        os.mkfifo(fifo)
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # held open first, so the writer never blocks
        try:
            started = await start(f"sleep 300 & sleep 300 & echo ready; echo ready > {fifo}; wait")
            with anyio.fail_after(timeout_s):
                await anyio.wait_readable(fd)
        finally:
            os.close(fd)
    return started


def live_group_members(pgid: int) -> list[int]:
    """Processes (not zombies) in a process group."""
    members = []
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(process.pid)
        except (ProcessLookupError, PermissionError):
            continue
    return members


async def gone(pid: int, timeout_s: float = 10) -> bool:
    """True once `pid` (not our child) has exited, within the bound."""
    if not hasattr(os, "pidfd_open"):
        return await anyio.to_thread.run_sync(_psutil_gone, pid, timeout_s)
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        with anyio.move_on_after(timeout_s):
            await anyio.wait_readable(fd)  # a pidfd turns readable when its process exits
            return True
        return False
    finally:
        os.close(fd)


def _psutil_gone(pid: int, timeout_s: float) -> bool:
    try:
        psutil.Process(pid).wait(timeout_s)
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        return False
    return True


def marked_processes(marker: str, values: set[str]) -> list[int]:
    """Processes whose environment has `marker` set to one of `values` (ours to read: the same user)."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(marker) in values:
                found.append(process.pid)
        except (psutil.Error, OSError):
            continue
    return found
