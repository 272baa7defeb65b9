"""The official MCP conformance suite (npm `@modelcontextprotocol/conformance`) against a real
`offload-mcp --transport http` process: every server scenario that applies to Offload must pass, and
every scenario the suite has must be classified in `.ci/conformance.toml` (applies, or needs the suite's
own test tools, with the reason), so that list is reviewed rather than silently grown.

`.ci/run` installs the suite (and Node 22, both from the npm registry) and sets MCP_CONFORMANCE_BIN;
without it these tests skip locally, and fail in CI, where REQUIRE_MCP_CONFORMANCE is set.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import anyio
import pytest
from test_inspector import ROOT, http_server

from testkit.rawserver import npm_tool, npm_tool_env

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

CLASSIFIED: dict[str, Any] = tomllib.loads((ROOT / ".ci" / "conformance.toml").read_text())
APPLIES: list[str] = CLASSIFIED["applies"]
NEEDS_SUITE_TOOLS: dict[str, str] = CLASSIFIED["needs_suite_tools"]
SCENARIO_TIMEOUT_S = 60


def conformance_path() -> Path:
    return npm_tool("MCP_CONFORMANCE_BIN", "MCP conformance suite")


async def suite(tmp_path: Path, *args: str) -> tuple[int, str]:
    suite_bin = conformance_path()
    env = {**npm_tool_env(tmp_path, suite_bin), "NO_COLOR": "1"}
    with anyio.fail_after(SCENARIO_TIMEOUT_S):
        done = await anyio.run_process([str(suite_bin), *args], env=env, check=False)
    return done.returncode, done.stdout.decode() + done.stderr.decode()


async def test_the_pinned_suite_has_every_server_scenario_classified(tmp_path: Path) -> None:
    code, version = await suite(tmp_path, "--version")
    assert code == 0 and version.strip() == CLASSIFIED["version"], version
    code, listed = await suite(tmp_path, "list", "--server")
    assert code == 0, listed
    scenarios = set(re.findall(r"^\s*- (\S+) \[", listed, re.MULTILINE))
    assert scenarios, listed
    assert not set(APPLIES) & set(NEEDS_SUITE_TOOLS), "a scenario is classified twice"
    unclassified = scenarios - set(APPLIES) - set(NEEDS_SUITE_TOOLS)
    assert not unclassified, f"classify these in .ci/conformance.toml: {sorted(unclassified)}"
    gone = (set(APPLIES) | set(NEEDS_SUITE_TOOLS)) - scenarios
    assert not gone, f"the suite no longer has these; remove them from .ci/conformance.toml: {sorted(gone)}"


async def test_every_applicable_scenario_passes(tmp_path: Path) -> None:
    results = tmp_path / "results"
    failed = {}
    async with http_server(tmp_path) as url:
        for scenario in APPLIES:
            code, output = await suite(tmp_path, "server", "--url", url, "--scenario", scenario, "-o", str(results))
            statuses = _statuses(results, scenario)
            if code != 0 or not statuses or {"FAILURE", "WARNING"} & set(statuses):
                failed[scenario] = output[-3000:]
    passed = len(APPLIES) - len(failed)
    print(f"conformance {CLASSIFIED['version']}: {passed} of {len(APPLIES)} applicable server scenarios passed")
    assert not failed, failed


def _statuses(results: Path, scenario: str) -> list[str]:
    """The check statuses the suite saved for one scenario run."""
    checks = []
    for saved in results.glob(f"server-{scenario}-*/checks.json"):
        checks.extend(json.loads(saved.read_text()))
    return [check["status"] for check in checks]
