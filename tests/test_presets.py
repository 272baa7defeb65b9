"""Preset arguments through the MCP client: refused unless the preset's table allows them, options refused
unless allowed, and the issue's `make --eval` probe never runs its command."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import FakeClock, Gate, call, error_text, open_client

from server.config import Settings, load_settings
from server.errors import ConfigError

pytestmark = pytest.mark.anyio


def make_preset(tmp_path: Path, **table: Any) -> Settings:
    (tmp_path / "Makefile").write_text("all:\n\t@echo made $(MAKECMDGOALS)\n%:\n\t@echo made $@\n")
    return Settings.model_validate(
        {"data_dir": tmp_path / "data", "presets": {"build": {"command": "make", "cwd": str(tmp_path), **table}}}
    )


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
async def test_the_make_eval_probe_never_runs(clock: FakeClock, gate: Gate, tmp_path: Path) -> None:
    marker = tmp_path / "p"
    probe = {"args": [f"--eval=x:;@id > {marker}", "x"]}
    for table in ({}, {"args": "any"}, {"args": ".*"}):
        async with open_client(make_preset(tmp_path, **table), clock, gate) as (_, client):
            refused = error_text(await client.call_tool("fire_tool", {"tool": "build", "arguments": probe}))
            assert "Nothing was started" in refused and "--eval" in refused
    assert not marker.exists()


async def test_arguments_need_the_preset_to_allow_them(clock: FakeClock, gate: Gate, tmp_path: Path) -> None:
    async with open_client(make_preset(tmp_path), clock, gate) as (_, client):
        plain = await call(client, "fire_tool", tool="build", arguments={}, wait_s=10)
        assert plain["task"]["output"]["text"] == "made\n"
        refused = error_text(await client.call_tool("fire_tool", {"tool": "build", "arguments": {"args": ["all"]}}))
        assert "takes no arguments" in refused and "args = " in refused
    async with open_client(make_preset(tmp_path, args="[a-z]+"), clock, gate) as (_, client):
        ok = await call(client, "fire_tool", tool="build", arguments={"args": ["docs"]}, wait_s=10)
        assert ok["task"]["output"]["text"] == "made docs\n"
        bad = error_text(await client.call_tool("fire_tool", {"tool": "build", "arguments": {"args": ["a;b"]}}))
        assert "'a;b'" in bad and "must match '[a-z]+'" in bad
    async with open_client(make_preset(tmp_path, args="any", allow_options=True), clock, gate) as (_, client):
        ok = await call(client, "fire_tool", tool="build", arguments={"args": ["-s", "docs"]}, wait_s=10)
        assert ok["task"]["output"]["text"] == "made docs\n"


def test_a_bad_argument_rule_fails_at_start(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[presets.build]\ncommand = "make"\nargs = "("\n')
    with pytest.raises(ConfigError, match=r"presets\.build\.args"):
        load_settings(config, environ={})
