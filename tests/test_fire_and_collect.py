"""The four core tools through a real MCP client, on both protocol eras."""

from __future__ import annotations

import anyio
import pytest
from conftest import FakeClock, Gate, call, data, error_text, finish, open_client
from mcp import Client

from server.config import Settings
from server.runtime import Runtime

pytestmark = pytest.mark.anyio


async def test_fire_get_poll_shell_task(client: Client, gate: Gate) -> None:
    fired = await call(client, "fire_tool", tool="shell", arguments={"command": "echo start; read x; echo got $x"})
    assert fired["status"] == "queued"
    assert fired["cached"] is False and fired["deduplicated"] is False
    assert len(fired["task_id"]) >= 20

    # No stdin was given, so `read` sees EOF at once; still, the first read can see it running or done.
    view = await finish(client, fired["task_id"])
    assert view["status"] == "completed"
    assert view["result"]["exit_code"] == 0
    assert view["output"]["text"] == "start\ngot\n"
    assert view["created_at"] <= view["started_at"] <= view["finished_at"] < view["expires_at"]

    again = await call(client, "get_cached_output", task_id=fired["task_id"])
    assert again["status"] == "completed"
    assert again["output"]["text"] == "start\ngot\n"
    assert again["output"]["next_offset"] == again["output"]["total_bytes"] == 10


async def test_get_never_blocks_and_shows_running(client: Client, gate: Gate) -> None:
    fired = await call(client, "fire_tool", tool="test.gate", arguments={"key": "slow"})
    await gate.wait_entered("slow")
    view = await call(client, "get_cached_output", task_id=fired["task_id"])
    assert view["status"] == "running"
    assert view["finished_at"] is None and view["result"] is None
    gate.release("slow")
    done = await finish(client, fired["task_id"])
    assert done["result"] == {"key": "slow", "call": 1}
    assert done["output"]["text"] == "gate slow opened\n"


async def test_wait_s_returns_a_fast_task_whole(client: Client) -> None:
    reply = await call(client, "fire_tool", tool="shell", arguments={"command": "echo quick"}, wait_s=20)
    assert reply["status"] == "completed"
    assert reply["task"]["output"]["text"] == "quick\n"
    assert reply["task"]["result"]["exit_code"] == 0


async def test_wait_s_returns_the_handle_when_the_task_is_slower(client: Client, gate: Gate) -> None:
    reply = await call(client, "fire_tool", tool="test.gate", arguments={"key": "w"}, wait_s=0.05)
    assert reply["status"] == "running"
    assert reply["task"] is None
    gate.release("w")


async def test_poll_any_returns_at_the_first_finish(client: Client, gate: Gate) -> None:
    first = await call(client, "fire_tool", tool="test.gate", arguments={"key": "a"})
    second = await call(client, "fire_tool", tool="test.gate", arguments={"key": "b"})
    gate.release("b")
    reply = await call(client, "poll_output", task_ids=[first["task_id"], second["task_id"]], return_when="any")
    assert [v["task_id"] for v in reply["done"]] == [second["task_id"]]
    assert reply["pending"] == [first["task_id"]]
    assert reply["timed_out"] is False
    gate.release("a")
    everything = await call(client, "poll_output", task_ids=[first["task_id"], second["task_id"]])
    assert {v["task_id"] for v in everything["done"]} == {first["task_id"], second["task_id"]}
    assert everything["pending"] == []


async def test_poll_timeout_returns_pending_ids(client: Client, gate: Gate) -> None:
    fired = await call(client, "fire_tool", tool="test.gate", arguments={"key": "never"})
    reply = await call(client, "poll_output", task_ids=[fired["task_id"]], timeout_s=0.1)
    assert reply == {"done": [], "pending": [fired["task_id"]], "unknown": [], "timed_out": True}
    gate.release("never")


async def test_poll_sends_progress_while_waiting(client: Client, gate: Gate) -> None:
    ids = [(await call(client, "fire_tool", tool="test.gate", arguments={"key": k}))["task_id"] for k in "xyz"]
    seen: list[tuple[float, float | None]] = []

    async def progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total))
        gate.release("xyz"[len(seen) - 1])  # each notification lets one more task finish

    result = await client.call_tool("poll_output", {"task_ids": ids, "timeout_s": 20}, progress_callback=progress)
    assert len(data(result)["done"]) == 3
    assert seen[0] == (0, 3)
    assert seen[-1] == (3, 3)


async def test_a_cancelled_poll_stops_waiting(client: Client, runtime: Runtime, gate: Gate) -> None:
    fired = await call(client, "fire_tool", tool="test.gate", arguments={"key": "held"})
    waiting = anyio.Event()

    async def progress(progress: float, total: float | None, message: str | None) -> None:
        waiting.set()

    async with anyio.create_task_group() as tg:

        async def poll() -> None:
            await client.call_tool(
                "poll_output", {"task_ids": [fired["task_id"]], "timeout_s": 50}, progress_callback=progress
            )

        tg.start_soon(poll)
        with anyio.fail_after(5):
            await waiting.wait()
        tg.cancel_scope.cancel()
    with anyio.fail_after(5):  # the server-side wait ends promptly, long before its 50 s
        await runtime.executor.no_waiters()
    view = await call(client, "get_cached_output", task_id=fired["task_id"])
    assert view["status"] == "running"  # cancelling the poll does not cancel the task
    gate.release("held")


async def test_cacheable_tool_joins_in_flight_then_serves_cached(client: Client, gate: Gate) -> None:
    first = await call(client, "fire_tool", tool="test.gate", arguments={"key": "k"})
    joined = await call(client, "fire_tool", tool="test.gate", arguments={"key": "k"})
    assert joined["task_id"] == first["task_id"]
    assert joined["deduplicated"] is True and joined["cached"] is False
    gate.release("k")
    await finish(client, first["task_id"])

    cached = await call(client, "fire_tool", tool="test.gate", arguments={"key": "k"})
    assert cached["task_id"] == first["task_id"]
    assert cached["cached"] is True and cached["status"] == "completed"
    assert gate.calls["k"] == 1

    fresh = await call(client, "fire_tool", tool="test.gate", arguments={"key": "k"}, use_cache=False)
    assert fresh["task_id"] != first["task_id"] and fresh["cached"] is False
    assert (await finish(client, fresh["task_id"]))["result"]["call"] == 2


async def test_shell_is_never_reused(client: Client) -> None:
    one = await call(client, "fire_tool", tool="shell", arguments={"command": "echo same"}, wait_s=10)
    two = await call(client, "fire_tool", tool="shell", arguments={"command": "echo same"}, wait_s=10)
    assert one["task_id"] != two["task_id"]
    assert not two["cached"] and not two["deduplicated"]


async def test_failed_results_are_not_reused(client: Client) -> None:
    one = await call(client, "fire_tool", tool="test.boom", arguments={"key": "x"}, wait_s=10)
    assert one["status"] == "failed"
    assert one["task"]["error"] == {"kind": "exception", "message": "RuntimeError: boom x"}
    two = await call(client, "fire_tool", tool="test.boom", arguments={"key": "x"}, wait_s=10)
    assert two["task_id"] != one["task_id"]


async def test_a_crashing_task_harms_nothing_else(client: Client, gate: Gate) -> None:
    survivor = await call(client, "fire_tool", tool="test.gate", arguments={"key": "s"})
    boom = await call(client, "fire_tool", tool="test.boom", arguments={"key": "b"})
    assert (await finish(client, boom["task_id"]))["status"] == "failed"
    gate.release("s")
    assert (await finish(client, survivor["task_id"]))["status"] == "completed"
    assert (await call(client, "list_fireable_tools"))["tools"]


async def test_excess_work_is_queued_then_runs(clock: FakeClock, gate: Gate) -> None:
    async with open_client(Settings(max_concurrency=1), clock, gate) as (runtime, client):
        await call(client, "fire_tool", tool="test.gate", arguments={"key": "1"})
        second = await call(client, "fire_tool", tool="test.gate", arguments={"key": "2"})
        await gate.wait_entered("1")
        assert (await call(client, "get_cached_output", task_id=second["task_id"]))["status"] == "queued"
        gate.release("1")
        await gate.wait_entered("2")
        assert (await call(client, "get_cached_output", task_id=second["task_id"]))["status"] == "running"
        gate.release("2")
        await finish(client, second["task_id"])
        # Slots are all given back: a third task starts at once.
        gate.release("3")
        third = await call(client, "fire_tool", tool="test.gate", arguments={"key": "3"}, wait_s=10)
        assert third["status"] == "completed"
        assert runtime.executor.active_tasks() == []


async def test_per_tool_limit_queues_only_that_tool(clock: FakeClock, gate: Gate) -> None:
    settings = Settings(tool_concurrency={"test.gate": 1})
    async with open_client(settings, clock, gate) as (_, client):
        await call(client, "fire_tool", tool="test.gate", arguments={"key": "p"})
        queued = await call(client, "fire_tool", tool="test.gate", arguments={"key": "q"})
        await gate.wait_entered("p")
        assert (await call(client, "get_cached_output", task_id=queued["task_id"]))["status"] == "queued"
        other = await call(client, "fire_tool", tool="shell", arguments={"command": "echo free"}, wait_s=10)
        assert other["status"] == "completed"
        gate.release("p")
        gate.release("q")
        assert (await finish(client, queued["task_id"]))["status"] == "completed"


async def test_results_expire_and_leave_a_tombstone(client: Client, clock: FakeClock) -> None:
    fired = await call(client, "fire_tool", tool="shell", arguments={"command": "echo x"}, wait_s=10, ttl_s=60)
    assert fired["status"] == "completed"
    clock.advance(59)
    assert (await call(client, "get_cached_output", task_id=fired["task_id"]))["status"] == "completed"
    clock.advance(2)
    message = error_text(await client.call_tool("get_cached_output", {"task_id": fired["task_id"]}))
    assert "expired at" in message and fired["task_id"] in message
    assert (await call(client, "list_tasks"))["tasks"] == []


async def test_default_ttl_is_thirty_minutes(client: Client, clock: FakeClock, gate: Gate) -> None:
    gate.release("t")
    fired = await call(client, "fire_tool", tool="test.gate", arguments={"key": "t"}, wait_s=10)
    clock.advance(1799)
    assert (await call(client, "fire_tool", tool="test.gate", arguments={"key": "t"}))["cached"] is True
    clock.advance(2)
    again = await call(client, "fire_tool", tool="test.gate", arguments={"key": "t"}, wait_s=10)
    assert again["task_id"] != fired["task_id"] and again["cached"] is False
    assert gate.calls["t"] == 2


async def test_list_tasks_newest_first_with_filters(client: Client, gate: Gate, clock: FakeClock) -> None:
    gate.release("l")
    ids = []
    for command in ("true", "false"):
        ids.append(
            (await call(client, "fire_tool", tool="shell", arguments={"command": command}, wait_s=10))["task_id"]
        )
        clock.advance(1)
    ids.append((await call(client, "fire_tool", tool="test.gate", arguments={"key": "l"}, wait_s=10))["task_id"])
    listed = (await call(client, "list_tasks"))["tasks"]
    assert [t["task_id"] for t in listed] == ids[::-1]
    failed = (await call(client, "list_tasks", status="failed"))["tasks"]
    assert [(t["task_id"], t["error_kind"]) for t in failed] == [(ids[1], "exit_status")]
    assert [t["task_id"] for t in (await call(client, "list_tasks", tool="shell", limit=1))["tasks"]] == [ids[1]]


async def test_catalog_lists_fireable_tools_with_schemas(client: Client) -> None:
    catalog = {t["name"]: t for t in (await call(client, "list_fireable_tools"))["tools"]}
    assert {"shell", "test.gate", "test.boom"} <= set(catalog)
    assert catalog["shell"]["input_schema"]["required"] == ["command"]
    assert "destructive" in catalog["shell"]["flags"]
    assert catalog["test.gate"]["flags"] == ["cacheable"]


async def test_presets_are_fireable_by_name(clock: FakeClock, gate: Gate, tmp_path: anyio.Path) -> None:
    settings = Settings.model_validate(
        {
            "presets": {
                "build": {
                    "command": "pwd; echo building",
                    "cwd": str(tmp_path),
                    "timeout_s": 30,
                    "description": "Build the project",
                    "args": "any",
                    "allow_options": True,
                }
            }
        }
    )
    async with open_client(settings, clock, gate, era="legacy") as (_, client):
        catalog = {t["name"]: t for t in (await call(client, "list_fireable_tools"))["tools"]}
        assert catalog["build"]["description"] == "Build the project"
        assert catalog["build"]["default_timeout_s"] == 30
        reply = await call(client, "fire_tool", tool="build", arguments={"args": ["--fast", "a:b"]}, wait_s=10)
        assert reply["task"]["output"]["text"] == f"{tmp_path}\nbuilding --fast a:b\n"
        echo = await call(client, "fire_tool", tool="build", arguments={}, wait_s=10)
        assert echo["status"] == "completed"
