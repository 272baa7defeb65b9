"""A third-party tool's slips fail its own task, never the server or another task, and a plugin's own
error kind reaches the model as the plugin wrote it (issue 13's review found both)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import call, finish
from mcp import Client
from pydantic import BaseModel

from server.app import build_server
from server.config import Settings
from server.runtime import Runtime
from tools.context import TaskFailure, ToolContext
from tools.registry import ToolSpec

pytestmark = pytest.mark.anyio


class Slip(BaseModel):
    how: str


async def slipping(args: Slip, _ctx: ToolContext) -> Any:
    match args.how:
        case "own_kind":
            raise TaskFailure("quota_exceeded", "the plugin's quota is used up", {"used": 10})
        case "no_kind":
            raise TaskFailure(None, "no kind given")  # type: ignore[arg-type]
        case "no_message":
            raise TaskFailure("timeout", None)  # type: ignore[arg-type]
        case "unsendable_result_in_failure":
            raise TaskFailure("http_status", "failed", {"when": object()})
        case "list":
            return [1, 2, 3]
        case "unsendable":
            return {"when": object()}
    return {"fine": True}


PLUGIN = ToolSpec(name="plugin.slip", description="slips as asked", input_model=Slip, handler=slipping)


async def test_each_slip_fails_its_own_task_and_the_server_goes_on(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    async with (
        Runtime.open(settings, extra_tools=[PLUGIN], load_plugins=False) as runtime,
        Client(build_server(runtime)) as client,
    ):
        expected = {
            "own_kind": "quota_exceeded",
            "no_kind": "exception",
            "no_message": "timeout",
            "unsendable_result_in_failure": "http_status",
            "list": "exception",
            "unsendable": "exception",
        }
        fired = {
            how: (await call(client, "fire_tool", tool="plugin.slip", arguments={"how": how}))["task_id"]
            for how in expected
        }
        for how, kind in expected.items():
            view = await finish(client, fired[how])
            assert view["status"] == "failed", (how, view)
            assert view["error"]["kind"] == kind, (how, view["error"])
        own = await call(client, "get_cached_output", task_id=fired["own_kind"])
        assert own["result"] == {"used": 10} and own["error"]["message"] == "the plugin's quota is used up"
        listed = await call(client, "list_tasks", tool="plugin.slip")
        assert {t["error_kind"] for t in listed["tasks"]} == set(expected.values())
        fine = await call(client, "fire_tool", tool="plugin.slip", arguments={"how": "fine"}, wait_s=10)
        assert fine["task"]["result"] == {"fine": True}  # the server is still serving

    async with Runtime.open(settings, extra_tools=[PLUGIN], load_plugins=False) as runtime:  # as stored
        assert runtime.task(fired["own_kind"], owner="local").error is not None
        assert runtime.task(fired["own_kind"], owner="local").error.kind == "quota_exceeded"  # type: ignore[union-attr]
