"""Per-owner shares and stats over real HTTP with two owners: bob's long tasks cannot take alice's share of
max_concurrency, and offload://stats shows each owner its own work, server-wide figures only to an admin."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import FakeClock, Gate, call, open_client
from mcp import Client
from test_http import ALICE, BOB, TOKENS, connect, tool, web_server

from server.config import Settings

pytestmark = pytest.mark.anyio


async def stats(client: Client) -> dict[str, Any]:
    read = await client.read_resource("offload://stats")
    found: dict[str, Any] = json.loads(read.contents[0].text)  # type: ignore[union-attr]
    return found


async def status(client: Client, task_id: str) -> str:
    return str((await tool(client, "get_cached_output", task_id=task_id))["status"])


async def test_no_owner_runs_past_its_share_while_others_wait(gate: Gate) -> None:
    owners = {"alice": {"token_env": "ALICE_TOKEN", "admin": True}, "bob": {"token_env": "BOB_TOKEN"}}
    async with (
        web_server(gate, "http", TOKENS, owners=owners, max_concurrency=4) as url,
        connect(url, ALICE) as alice,
        connect(url, BOB) as bob,
    ):
        # Two owners, no share set: each may run half of max_concurrency (2 of 4).
        his = [
            (await tool(bob, "fire_tool", tool="test.gate", arguments={"key": f"b{i}"}))["task_id"] for i in range(4)
        ]
        for key in ("b0", "b1"):
            await gate.wait_entered(key)
        hers = (await tool(alice, "fire_tool", tool="test.gate", arguments={"key": "a0"}))["task_id"]
        await gate.wait_entered("a0")  # she starts at once, although bob has work waiting
        assert [await status(bob, t) for t in his] == ["running", "running", "queued", "queued"]
        assert await status(alice, hers) == "running"

        mine, theirs = await stats(alice), await stats(bob)
        assert (theirs["running"], theirs["queue_depth"]) == (2, 2)
        assert set(theirs) == {"tasks_by_status", "queue_depth", "running"}  # no server figures
        assert (mine["running"], mine["queue_depth"]) == (1, 0)
        assert mine["server"]["running"] == 3 and mine["server"]["queue_depth"] == 2 and "data_dir" in mine

        gate.release("b0")
        await gate.wait_entered("b2")  # his freed slot goes to his next task
        for key in ("a0", "b1", "b2", "b3"):
            gate.release(key)
        done = await tool(bob, "poll_output", task_ids=his, timeout_s=20)
        assert done["pending"] == []


async def test_an_owners_own_max_active_and_share_apply_to_it_alone(gate: Gate) -> None:
    owners = {
        "alice": {"token_env": "ALICE_TOKEN", "max_active": 2, "share": 0.25},
        "bob": {"token_env": "BOB_TOKEN"},
    }
    async with (
        web_server(gate, "http", TOKENS, owners=owners, max_concurrency=4) as url,
        connect(url, ALICE) as alice,
        connect(url, BOB) as bob,
    ):
        hers = [
            (await tool(alice, "fire_tool", tool="test.gate", arguments={"key": f"a{i}"}))["task_id"] for i in range(2)
        ]
        await gate.wait_entered("a0")
        assert [await status(alice, t) for t in hers] == ["running", "queued"]  # a quarter of 4: one at a time
        refused = await alice.call_tool("fire_tool", {"tool": "test.gate", "arguments": {"key": "a2"}})
        assert refused.is_error and "You already have 2 tasks" in refused.content[0].text  # type: ignore[union-attr]
        his = [
            (await tool(bob, "fire_tool", tool="test.gate", arguments={"key": f"b{i}"}))["task_id"] for i in range(3)
        ]
        for key in ("b0", "b1"):
            await gate.wait_entered(key)
        assert [await status(bob, t) for t in his] == ["running", "running", "queued"]  # half of 4
        for key in ("a0", "a1", "b0", "b1", "b2"):
            gate.release(key)
        assert (await tool(alice, "poll_output", task_ids=hers, timeout_s=20))["pending"] == []
        assert (await tool(bob, "poll_output", task_ids=his, timeout_s=20))["pending"] == []


async def test_token_variables_never_reach_a_command_whatever_their_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    """`A_TOK` does not look secret by its name; it holds a bearer token, so no command gets it."""
    for name, value in {"A_TOK": ALICE, "B_TOK": BOB, "GH_PAT": "ghp_" + "q" * 36}.items():
        monkeypatch.setenv(name, value)
    settings = Settings(
        data_dir=tmp_path / "data",
        auth_tokens={"alice": "A_TOK"},
        owners={"bob": {"token_env": "B_TOK"}},
        github_token_env="GH_PAT",
        shell_pass_env=("B_TOK",),  # not even when asked for
    )
    probe = 'for v in A_TOK B_TOK GH_PAT; do [ -n "$(printenv $v)" ] && echo "$v present" || echo "$v absent"; done'
    async with open_client(settings, clock, Gate()) as (_, client):
        view = await call(client, "fire_tool", tool="shell", arguments={"command": probe}, wait_s=10)
        assert view["task"]["output"]["text"] == "A_TOK absent\nB_TOK absent\nGH_PAT absent\n"
