"""Distributed mode behind every face a client may use: an SSE front-end, and the tasks extension
(`fastmcp-tasks` as the client) on a streamable HTTP one, with the tasks run by a worker on a real Redis.
The front-end and the worker run in this process (the worker with the test's gate tool, so the test steers
its tasks); they share nothing but Redis."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import FakeClock, Gate, call
from fastmcp import Client as FastMCPClient
from fastmcp_tasks.client import call_tool_task
from test_http import connect, web_server

from server.cache import Clock
from server.config import LOCAL_OWNER, Settings
from server.distributed import MAX_QUEUES, WorkerEngine
from server.redis_store import RedisStore
from server.runtime import Runtime
from server.tasks import ErrorKind, Status
from testkit.redis_server import RedisServer, until_redis

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def worker(gate: Gate, settings: Settings) -> AsyncIterator[WorkerEngine]:
    async with (
        Runtime.open(settings, role="worker", extra_tools=gate.specs(), load_plugins=False) as runtime,
        anyio.create_task_group() as tg,
    ):
        store = runtime.executor.store
        assert isinstance(store, RedisStore)
        engine = WorkerEngine(runtime.executor, store, settings, ["any"], f"w-{secrets.token_hex(3)}")
        tg.start_soon(engine.serve)
        yield engine
        tg.cancel_scope.cancel()


@asynccontextmanager
async def distributed(
    gate: Gate, redis_server: RedisServer, tmp_path: Path, transport: str, clock: Clock = time.time, **extra: Any
) -> AsyncIterator[str]:
    shared: dict[str, Any] = {
        "redis_url": redis_server.url,
        "redis_namespace": f"t{secrets.token_hex(6)}",
        "lease_s": 2.0,
    }
    worker_settings = Settings(data_dir=tmp_path / "worker", kill_grace_s=0.5, **shared)
    async with (
        worker(gate, worker_settings),
        web_server(gate, transport, clock=clock, data_dir=tmp_path / "front", **shared, **extra) as url,
    ):
        yield url


async def test_an_sse_front_end_fires_collects_and_cancels_tasks_a_worker_runs(
    gate: Gate, redis_server: RedisServer, tmp_path: Path
) -> None:
    async with distributed(gate, redis_server, tmp_path, "sse") as url, connect(url) as client:
        fired = await call(client, "fire_tool", tool="test.gate", arguments={"key": "sse"})
        await gate.wait_entered("sse")  # the worker runs it
        gate.release("sse")
        polled = await call(client, "poll_output", task_ids=[fired["task_id"]], timeout_s=10)
        assert polled["done"], (polled, await call(client, "get_cached_output", task_id=fired["task_id"]))
        done = polled["done"][0]
        assert (done["status"], done["result"]) == ("completed", {"key": "sse", "call": 1})
        assert done["output"]["text"] == "gate sse opened\n"

        sleeping = await call(client, "fire_tool", tool="shell", arguments={"command": "sleep 300"})
        cancelled = await call(client, "cancel_task", task_id=sleeping["task_id"])
        if cancelled["status"] != "cancelled":  # the worker confirms; the front-end then reports it
            polled = await call(client, "poll_output", task_ids=[sleeping["task_id"]], timeout_s=10)
            cancelled = polled["done"][0]
        assert cancelled["status"] == "cancelled" and cancelled["error"]["kind"] == "cancelled_by_client"


async def test_the_tasks_extension_on_a_distributed_front_end_follows_a_worker_run_task(
    gate: Gate, redis_server: RedisServer, tmp_path: Path
) -> None:
    async with (
        distributed(gate, redis_server, tmp_path, "http", expose=("test.*", "shell")) as url,
        FastMCPClient(url) as aware,
        connect(url) as plain,
    ):
        handle = await call_tool_task(aware, "test.gate", {"key": "ext"})
        await gate.wait_entered("ext")
        assert (await handle.status()).status == "working"
        view = await call(plain, "get_cached_output", task_id=handle.task_id)  # one task system
        assert view["status"] == "running"
        gate.release("ext")
        result = await handle.result()
        assert result.structured_content is not None
        assert result.structured_content["result"] == {"key": "ext", "call": 1}

        sleeping = await call_tool_task(aware, "shell", {"command": "sleep 300"})
        await sleeping.cancel()
        final = await sleeping.wait(timeout=15)
        assert final.status == "cancelled", final
        view = await call(plain, "get_cached_output", task_id=sleeping.task_id)
        assert view["status"] == "cancelled" and view["error"]["kind"] == "cancelled_by_client"


async def test_a_front_end_past_its_queue_cap_closes_idle_queues_instead_of_refusing_new_ones(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """One owner firing to many fresh `target` names must not lock everyone out of new queues on that
    front-end (nor learn other owners' queue names from a refusal): idle queues are closed to make room."""
    settings = Settings(
        redis_url=redis_server.url, redis_namespace=f"t{secrets.token_hex(6)}", data_dir=tmp_path / "front"
    )
    async with Runtime.open(settings, load_plugins=False) as runtime:
        store = runtime.executor.store
        assert isinstance(store, RedisStore)
        fired = []
        for index in range(MAX_QUEUES + 8):  # no worker: every task just waits in its queue
            reply = await runtime.fire(
                "shell",
                {"command": "true"},
                timeout_s=None,
                ttl_s=None,
                use_cache=True,
                wait_s=0,
                owner=LOCAL_OWNER,
                target=f"junk{index}",
            )
            fired.append(reply.task_id)

        def all_queued() -> bool:
            records = [store.load(task_id, lambda _name: None) for task_id in fired]
            return all(r is not None and r.status.value == "queued" for r in records) and not any(
                store.redis.hget(store.key("task", task_id), "instance") != b'""' for task_id in fired
            )

        await until_redis(all_queued, redis_server.url)  # every one handed to its queue: none refused


async def test_tasks_whose_records_a_redis_restart_lost_end_instead_of_running_for_ever(tmp_path: Path) -> None:
    """Redis restarted without persistence forgets every task: a front-end that fired some must not show
    them `running` for ever (nor count them against the owner's cap); they end `interrupted`, saying why."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        settings = Settings(
            redis_url=server.url, redis_namespace="restart", data_dir=tmp_path / "front", max_active_per_owner=2
        )
        async with Runtime.open(settings, load_plugins=False) as runtime:
            fire = {"timeout_s": None, "ttl_s": None, "use_cache": True, "wait_s": 0, "owner": LOCAL_OWNER}
            fired = [(await runtime.fire("shell", {"command": "true"}, **fire)).task_id for _ in range(2)]
            server.stop()
            server.start()  # the same port, empty
            polled = await runtime.poll(fired, timeout_s=20, return_when="all", max_bytes=0, owner=LOCAL_OWNER)
            assert polled.pending == [], polled
            for view in polled.done:
                assert view.status is Status.FAILED and view.error is not None
                assert view.error.kind == ErrorKind.INTERRUPTED and "record is gone" in view.error.message
            again = await runtime.fire("shell", {"command": "true"}, **fire)  # the cap counts them no more
            assert again.task_id not in fired
    finally:
        server.stop()


async def test_a_task_that_expired_before_its_front_end_heard_it_ended_reads_as_it_ended(
    gate: Gate, redis_server: RedisServer, tmp_path: Path
) -> None:
    """A front-end that hears of a finished task only after its TTL ran out (a short `ttl_s`, a pause, a
    dropped subscription; here its clock runs ahead) reads it as expired, not as lost to a Redis restart."""
    async with distributed(gate, redis_server, tmp_path, "http", clock=FakeClock()) as url, connect(url) as client:
        fired = await call(client, "fire_tool", tool="test.gate", arguments={"key": "late"})
        await gate.wait_entered("late")
        gate.release("late")
        polled = await call(client, "poll_output", task_ids=[fired["task_id"]], timeout_s=10)
    assert polled["done"] == [] and "expired at" in polled["unknown"][0]["message"], polled  # not "gone"
