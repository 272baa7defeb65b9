"""Chaos: a real server under a mixed workload, killed with -9 at random moments, restarted.

After every restart, on the same data directory:
1. no task is `running` unless something runs it (a detached command whose capture process lives);
2. every task reads without error, alone and all together in one `poll_output`;
3. every byte a client read before the crash is still there, at the same offsets;
4. a finished task never changes;
and at the end no process of any task is left anywhere.

CI runs `CHAOS_ROUNDS` rounds (default 6); set CHAOS_ROUNDS for a longer run.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import anyio
import pytest

from testkit.processes import gone
from testkit.processes import marked_processes as marked_with
from testkit.rawserver import RawServer, start_server
from tools.process import TASK_MARKER

pytestmark = pytest.mark.anyio

CHAOS_ROUNDS = int(os.environ.get("CHAOS_ROUNDS", "6"))

WORKLOAD = [
    {"command": "sleep 30"},  # quiet
    {"command": "seq 1 20000; sleep 30"},  # chatty, then quiet
    {"command": "for i in $(seq 1 200); do echo line $i; sleep 0.01; done"},  # trickles out
    {"command": "trap 'echo cleanup; echo summary; exit 3' TERM; echo started; sleep 30 & wait"},  # last words
    {"command": "cat; echo; echo fed", "stdin": "x" * 50_000},  # stdin
    {"command": "printf 'euro \\342\\202'; sleep 0.05; printf '\\254\\n'"},  # a character split over writes
    {"command": "echo quick"},
    {"command": "setsid sleep 30 & echo escaped"},  # leaves its group
]


def marked_processes(task_ids: set[str]) -> list[int]:
    return marked_with(TASK_MARKER, task_ids)


class Checker:
    def __init__(self) -> None:
        self.seen: dict[str, str] = {}  # task id → output text read so far (from offset 0)
        self.final: dict[str, dict[str, Any]] = {}
        self.detached: set[str] = set()

    async def read_all(self, server: RawServer) -> None:
        for task_id in list(self.seen):
            view = await server.call("get_cached_output", task_id=task_id, max_bytes=1024 * 1024)
            text = view["output"]["text"]
            assert text.startswith(self.seen[task_id]), (task_id, self.seen[task_id][-80:], text[-80:])
            self.seen[task_id] = text
            if view["status"] in ("completed", "failed", "cancelled"):
                outcome = {k: view[k] for k in ("status", "result", "error", "finished_at")}
                assert self.final.setdefault(task_id, outcome) == outcome, "a finished task changed"

    async def check_after_restart(self, server: RawServer) -> None:
        await self.read_all(server)
        if not self.seen:
            return
        together = await server.call("poll_output", task_ids=list(self.seen), timeout_s=0, max_bytes=0)
        assert together["unknown"] == []
        for task_id in together["pending"]:
            assert task_id in self.detached, f"{task_id} is running though nothing runs it any more"


@pytest.mark.timeout(60 + 10 * CHAOS_ROUNDS)  # its budget grows with its rounds, as the distributed chaos test's does
async def test_kill_9_at_random_moments_keeps_every_promise(tmp_path: Path) -> None:
    chance = random.Random(os.environ.get("CHAOS_SEED", "offload"))
    data = tmp_path / "data"
    checker = Checker()
    for round_ in range(CHAOS_ROUNDS):
        detached = round_ % 3 == 2
        flags = ("--detach",) if detached else ()
        server = await start_server(tmp_path, *flags, data_dir=data)
        await checker.check_after_restart(server)
        for arguments in chance.sample(WORKLOAD, k=5):
            fired = await server.call("run_shell_background", **arguments)
            checker.seen.setdefault(fired["task_id"], "")
            if detached:
                checker.detached.add(fired["task_id"])
        for _ in range(chance.randint(1, 6)):  # a random moment, counted in reads the workload runs beside
            await checker.read_all(server)
        server.process.kill()
        with anyio.fail_after(5):
            await server.process.wait()
        await server.process.aclose()

    last = await start_server(tmp_path, data_dir=data)
    async with last.process:
        await checker.check_after_restart(last)
        for task_id in (await last.call("poll_output", task_ids=list(checker.seen), timeout_s=0))["pending"]:
            await last.call("cancel_task", task_id=task_id)
        await checker.read_all(last)
        assert all(
            v["status"] != "running" for v in [await last.call("get_cached_output", task_id=t) for t in checker.seen]
        )
        assert last.process.stdin is not None
        await last.process.stdin.aclose()
        with anyio.fail_after(10):
            await last.process.wait()
    with anyio.fail_after(10):  # a process just killed may still be on its way out: wait for each one's exit
        for pid in marked_processes(set(checker.seen)):
            await exited(pid)
    assert marked_processes(set(checker.seen)) == []


async def exited(pid: int) -> None:
    assert await gone(pid, timeout_s=30), f"process {pid} is still alive"
