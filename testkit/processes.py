"""Process helpers the tests and the bench share: a command tree that says when it runs, and the live
members of a process group."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import anyio

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
    """Processes (not zombies) in a process group, read from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry))
    return members
