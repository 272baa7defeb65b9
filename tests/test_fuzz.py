"""Arbitrary JSON thrown at every MCP tool's arguments: the server always answers with a result or an
error a model can read, and keeps serving. The shell runs only `true` here (allow-list), and the network
tools point at a closed local port, so no example can do harm."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from conftest import FakeClock, Gate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp import Client
from mcp_types import CallToolResult

from server.app import OWN_TOOLS, build_server
from server.config import Settings
from server.runtime import Runtime

CLOSED_PORT_URL = "http://127.0.0.1:9"

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


class Served:
    """One server for every example (Hypothesis runs examples synchronously): a portal runs it in its loop."""

    def __init__(self, portal: BlockingPortal, client: Client, tools: dict[str, dict[str, Any]]) -> None:
        self.portal = portal
        self.client = client
        self.tools = tools

    def call(self, name: str, arguments: dict[str, Any]) -> CallToolResult:
        async def bounded() -> CallToolResult:
            with anyio.fail_after(30):
                return await self.client.call_tool(name, arguments)

        return self.portal.call(bounded)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    config = Settings(
        data_dir=tmp_path_factory.mktemp("fuzz"),
        shell_mode="allow-list",
        shell_allow=("true",),
        github_base_url=CLOSED_PORT_URL,
        anthropic_base_url=CLOSED_PORT_URL,
        default_timeout_s=5,
        expose=("shell", "test.boom"),
        expose_wait_s=1,
        kill_grace_s=0.2,
    )
    with start_blocking_portal() as portal:
        runtime = portal.wrap_async_context_manager(
            Runtime.open(config, extra_tools=Gate().specs(), clock=FakeClock(), load_plugins=False)
        )
        with runtime as rt, portal.wrap_async_context_manager(Client(build_server(rt))) as client:
            listed = portal.call(client.list_tools)
            yield Served(portal, client, {t.name: t.input_schema for t in listed.tools})


def arguments_for(schema: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Each of the tool's own argument names, present or not, with any JSON at all, plus stray names."""
    names = list(schema.get("properties", {}))
    known = st.fixed_dictionaries({}, optional=dict.fromkeys(names, json_values))
    stray = st.dictionaries(st.text(max_size=12), json_values, max_size=2)
    return st.builds(lambda a, b: {**b, **a}, known, stray)


def assert_answered(result: CallToolResult) -> None:
    """A result with structured content, or an error whose text says what was wrong."""
    if result.is_error:
        text = result.content[0].text  # type: ignore[union-attr]
        assert text.strip() and "Traceback" not in text, text
    else:
        assert result.structured_content is not None
        json.dumps(result.structured_content, allow_nan=False)


@pytest.mark.parametrize("tool", [*sorted(OWN_TOOLS), "shell", "test.boom"])  # and two exposed fireable tools
def test_any_arguments_get_an_answer_and_the_server_keeps_serving(served: Served, tool: str) -> None:
    @settings(max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(arguments=arguments_for(served.tools[tool]))
    def throw(arguments: dict[str, Any]) -> None:
        assert_answered(served.call(tool, arguments))

    throw()
    assert served.call("list_fireable_tools", {}).structured_content is not None
