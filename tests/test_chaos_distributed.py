"""Chaos in distributed mode: two workers and two front-ends on a real Redis, under a mixed workload; at a
random moment of each round one node is killed (-9, or stopped with SIGTERM) and started again on its own
data directory, as a service manager would.

After every restart, read through a random live front-end:
1. every byte a client read before is still there, at the same offsets;
2. a finished task never changes;
3. no task stays `running` once its command's process group is gone (it settles, within a bounded wait);
and at the end: every command ran at most once (a side-effect file per task), a completed one exactly once,
and no process of any task is left anywhere.

CI runs `CHAOS_ROUNDS` rounds (default 6); set CHAOS_ROUNDS (and CHAOS_SEED) for a longer run.
"""

from __future__ import annotations

import os
import random
import secrets
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import data, live_group_members
from mcp import Client

from testkit.cluster import Node, connect, start_node, stop_nodes
from testkit.processes import gone, marked_processes
from testkit.redis_server import RedisServer
from tools.process import TASK_MARKER

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

CHAOS_ROUNDS = int(os.environ.get("CHAOS_ROUNDS", "6"))
FINISHED = ("completed", "failed", "cancelled")

WORKLOAD = [
    {"command": "sleep 30"},  # quiet
    {"command": "seq 1 20000; sleep 30"},  # chatty, then quiet
    {"command": "for i in $(seq 1 100); do echo line $i; sleep 0.01; done"},  # trickles out
    {"command": "trap 'echo cleanup; exit 3' TERM; echo started; sleep 30 & wait"},  # last words
    {"command": "cat; echo; echo fed", "stdin": "x" * 20_000},  # stdin
    {"command": "echo quick"},
    {"command": "setsid sleep 30 & echo escaped"},  # leaves its group
]
SPECS = {
    "w0": ("worker", ("--queue", "w0", "--queue", "any")),
    "w1": ("worker", ("--queue", "w1", "--queue", "any")),
    "f0": ("front-end", ()),
    "f1": ("front-end", ()),
}


class Checker:
    def __init__(self, side: Path) -> None:
        self.side = side
        self.seen: dict[str, str] = {}  # task id → output text read so far (from offset 0)
        self.final: dict[str, dict[str, Any]] = {}
        self.tokens: dict[str, str] = {}  # task id → its side-effect file's name

    async def fire(self, client: Client, arguments: dict[str, Any]) -> None:
        token = secrets.token_hex(6)
        command = f"echo ran >> {self.side / token}; {arguments['command']}"
        fire = {"tool": "shell", "arguments": {**arguments, "command": command}}
        task_id = data(await client.call_tool("fire_tool", fire))["task_id"]
        self.seen[task_id], self.tokens[task_id] = "", token

    async def read_all(self, client: Client) -> list[dict[str, Any]]:
        views = []
        for task_id in list(self.seen):
            view = data(await client.call_tool("get_cached_output", {"task_id": task_id, "max_bytes": 1 << 20}))
            text = view["output"]["text"]
            assert text.startswith(self.seen[task_id]), (task_id, self.seen[task_id][-80:], text[-80:])
            self.seen[task_id] = text
            if view["status"] in FINISHED:
                outcome = {k: view[k] for k in ("status", "result", "error", "finished_at")}
                assert self.final.setdefault(task_id, outcome) == outcome, "a finished task changed"
            views.append(view)
        return views

    async def check(self, client: Client) -> None:
        views = await self.read_all(client)
        orphaned = [
            v["task_id"]
            for v in views
            if v["status"] == "running" and v.get("pid") and not live_group_members(v["pid"])
        ]
        if orphaned:  # its command is gone: the task settles (at the worker's restart, or within a lease)
            settled = data(await client.call_tool("poll_output", {"task_ids": orphaned, "timeout_s": 20}))
            assert settled["pending"] == [], f"running though nothing runs them: {settled['pending']}"
            await self.read_all(client)

    def check_ran_once(self) -> None:
        for task_id, token in self.tokens.items():
            path = self.side / token
            runs = len(path.read_text().splitlines()) if path.exists() else 0
            assert runs <= 1, f"task {task_id} ran {runs} times"
            if self.final.get(task_id, {}).get("status") == "completed":
                assert runs == 1, f"task {task_id} completed without running"


async def restart(tg: Any, tmp_path: Path, url: str, name: str) -> Node:
    role, flags = SPECS[name]
    return await start_node(tg, tmp_path, role, url, name, *flags)


@pytest.mark.timeout(60 + 20 * CHAOS_ROUNDS)
async def test_killing_workers_and_front_ends_at_random_moments_keeps_every_promise(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    chance = random.Random(os.environ.get("CHAOS_SEED", "offload-distributed"))
    side = tmp_path / "side"
    side.mkdir()
    checker = Checker(side)
    async with anyio.create_task_group() as tg:
        nodes = {name: await restart(tg, tmp_path, redis_server.url, name) for name in SPECS}
        try:
            for _ in range(CHAOS_ROUNDS):
                async with connect(nodes[chance.choice(["f0", "f1"])].url) as client:
                    for arguments in chance.sample(WORKLOAD, k=4):
                        await checker.fire(client, arguments)
                    for _ in range(chance.randint(1, 4)):  # a random moment, counted in reads
                        await checker.read_all(client)
                victim = chance.choice(sorted(SPECS))
                if chance.random() < 0.7:
                    await nodes[victim].kill_9()
                else:
                    await stop_nodes([nodes[victim]])
                await nodes[victim].process.aclose()
                nodes[victim] = await restart(tg, tmp_path, redis_server.url, victim)
                async with connect(nodes[chance.choice(["f0", "f1"])].url) as client:
                    await checker.check(client)

            async with connect(nodes["f0"].url) as client:
                pending = data(await client.call_tool("poll_output", {"task_ids": list(checker.seen), "timeout_s": 0}))[
                    "pending"
                ]
                for task_id in pending:
                    await client.call_tool("cancel_task", {"task_id": task_id})
                if pending:
                    done = data(await client.call_tool("poll_output", {"task_ids": pending, "timeout_s": 30}))
                    assert done["pending"] == [], done["pending"]
                views = await checker.read_all(client)
            assert all(v["status"] in FINISHED for v in views)
            checker.check_ran_once()
        finally:
            await stop_nodes(list(nodes.values()))
            for node in nodes.values():
                await node.process.aclose()
            tg.cancel_scope.cancel()
    with anyio.fail_after(15):  # a process just killed may still be on its way out: wait for each one's exit
        for pid in marked_processes(TASK_MARKER, set(checker.seen)):
            assert await gone(pid, timeout_s=15), f"process {pid} of a task is still alive"
