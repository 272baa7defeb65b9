"""The GitHub, Anthropic and HTTP tools against real local servers on 127.0.0.1, through MCP."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import FakeClock, Gate, call, error_text, finish, open_client
from mcp import Client
from starlette.applications import Starlette

from server.config import Settings
from server.runtime import Runtime
from testkit.fakes import ANTHROPIC_KEY, GITHUB_TOKEN, SlowReads, Traffic, anthropic_app, github_app, plain_app, serve

pytestmark = pytest.mark.anyio


@dataclass
class Upstreams:
    github_url: str
    github: Traffic
    github_app: Starlette
    anthropic_url: str
    anthropic: Traffic
    web_url: str
    web: Traffic
    slow: SlowReads


@pytest.fixture
async def upstreams() -> AsyncIterator[Upstreams]:
    slow = SlowReads()
    gh_app = github_app(slow)
    async with serve(gh_app) as (gh_url, gh), serve(anthropic_app()) as (an_url, an), serve(plain_app()) as (w_url, w):
        yield Upstreams(gh_url, gh, gh_app, an_url, an, w_url, w, slow)
        slow.release()  # nothing left held when the servers stop


@pytest.fixture
def adapter_settings(upstreams: Upstreams, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("GITHUB_TOKEN", GITHUB_TOKEN)
    monkeypatch.setenv("ANTHROPIC_API_KEY", ANTHROPIC_KEY)
    return Settings(
        data_dir=tmp_path / "data",
        github_base_url=upstreams.github_url,
        anthropic_base_url=upstreams.anthropic_url,
        anthropic_max_retries=1,
        max_concurrency=64,
    )


@pytest.fixture
async def connected(adapter_settings: Settings, clock: FakeClock, gate: Gate) -> AsyncIterator[tuple[Runtime, Client]]:
    async with open_client(adapter_settings, clock, gate) as pair:
        yield pair


# ---- http.request ----


async def test_http_get_is_bounded_and_cached(connected: tuple[Runtime, Client], upstreams: Upstreams) -> None:
    _, client = connected
    url = f"{upstreams.web_url}/hello?n=1000"
    first = await call(client, "fire_tool", tool="http.request", arguments={"url": url, "max_bytes": 100}, wait_s=10)
    result = first["task"]["result"]
    assert result["status"] == 200
    assert result["body"] == ("hello " * 1000)[:100]
    assert result["truncated"] is True
    assert result["headers"]["etag"] == '"v1"'
    assert "x-secret-header" not in result["headers"]  # trimmed to the headers worth reading
    again = await call(client, "fire_tool", tool="http.request", arguments={"url": url, "max_bytes": 100})
    assert again["cached"] is True
    assert upstreams.web.requests["GET /hello"] == 1


async def test_http_post_is_never_cached(connected: tuple[Runtime, Client], upstreams: Upstreams) -> None:
    _, client = connected
    arguments = {"method": "POST", "url": f"{upstreams.web_url}/echo", "json": {"a": 1}}
    one = await call(client, "fire_tool", tool="http.request", arguments=arguments, wait_s=10)
    two = await call(client, "fire_tool", tool="http.request", arguments=arguments, wait_s=10)
    assert json.loads(one["task"]["result"]["body"]) == {"got": '{"a":1}', "method": "POST"}
    assert two["cached"] is False
    assert upstreams.web.requests["POST /echo"] == 2


async def test_http_errors_become_task_failures(connected: tuple[Runtime, Client], upstreams: Upstreams) -> None:
    _, client = connected
    missing = await call(
        client, "fire_tool", tool="http.request", arguments={"url": f"{upstreams.web_url}/missing"}, wait_s=10
    )
    assert missing["task"]["error"]["kind"] == "not_found"
    assert missing["task"]["result"]["body"] == "nope"  # the response is kept with the failure
    slow = await call(
        client,
        "fire_tool",
        tool="http.request",
        arguments={"url": f"{upstreams.web_url}/hang", "timeout_s": 0.2},
        wait_s=10,
    )
    assert slow["task"]["error"]["kind"] == "timeout"
    refused = await call(client, "fire_tool", tool="http.request", arguments={"url": "http://127.0.0.1:9/"}, wait_s=10)
    assert refused["task"]["error"]["kind"] == "connection"


async def test_http_arguments_are_validated(connected: tuple[Runtime, Client]) -> None:
    _, client = connected
    bad = await client.call_tool("fire_tool", {"tool": "http.request", "arguments": {"url": "file:///etc/passwd"}})
    assert "url" in error_text(bad)
    both = await client.call_tool(
        "fire_tool", {"tool": "http.request", "arguments": {"url": "http://x/", "json": 1, "body": "b"}}
    )
    assert "not both" in error_text(both)


# ---- GitHub ----


async def test_fifty_github_reads_share_a_few_connections(
    connected: tuple[Runtime, Client], upstreams: Upstreams
) -> None:
    _, client = connected
    ids = []
    for number in range(1, 51):
        fired = await call(
            client, "fire_tool", tool="github.get_issue", arguments={"owner": "octo", "repo": "slow", "number": number}
        )
        ids.append(fired["task_id"])
    # GitHub's limit group lets 8 reads run at once: all 8 reach the server together, the rest wait here.
    await upstreams.slow.wait_in_flight(8)
    assert upstreams.slow.in_flight == 8
    upstreams.slow.release()
    reply = await call(client, "poll_output", task_ids=ids, timeout_s=30)
    assert upstreams.slow.most_in_flight == 8
    assert len(reply["done"]) == 50
    assert {v["status"] for v in reply["done"]} == {"completed"}
    assert upstreams.github.requests.total() == 50
    assert len(upstreams.github.connections) <= 8  # GitHub's limit group: 8 at once, on kept-alive connections
    issue = next(v for v in reply["done"] if v["task_id"] == ids[6])["result"]
    assert issue["number"] == 7
    assert issue["labels"] == ["bug"] and issue["author"] == "octocat" and issue["assignees"] == ["hubot"]
    assert "node_id" not in issue and "reactions" not in issue  # trimmed
    stats = json.loads((await client.read_resource("offload://stats")).contents[0].text)  # type: ignore[union-attr]
    github_client = next(c for c in stats["clients"] if c["kind"] == "github")
    assert github_client == {"kind": "github", "requests": 50, "tasks": 50}


async def test_github_revalidates_with_etags(connected: tuple[Runtime, Client], upstreams: Upstreams) -> None:
    _, client = connected
    arguments = {"owner": "octo", "repo": "hello", "number": 1}
    first = await call(client, "fire_tool", tool="github.get_issue", arguments=arguments, wait_s=10)
    second = await call(client, "fire_tool", tool="github.get_issue", arguments=arguments, wait_s=10, use_cache=False)
    assert second["task_id"] != first["task_id"]
    assert second["task"]["result"] == first["task"]["result"]
    assert upstreams.github_app.state.traffic_not_modified == 1  # answered 304: no rate limit spent


async def test_every_github_tool(connected: tuple[Runtime, Client]) -> None:
    _, client = connected
    repo = {"owner": "octo", "repo": "hello"}
    calls = {
        "github.list_issue_comments": {**repo, "number": 1, "per_page": 5},
        "github.list_issues": {**repo, "state": "closed", "labels": ["bug", "p1"]},
        "github.get_pull_request": {**repo, "number": 2},
        "github.list_pull_request_files": {**repo, "number": 2},
        "github.list_workflow_runs": {**repo, "branch": "main"},
        "github.add_labels": {**repo, "number": 1, "labels": ["triaged"]},
        "github.create_issue_comment": {**repo, "number": 1, "body": "Looking into it."},
    }
    results = {}
    for tool, arguments in calls.items():
        reply = await call(client, "fire_tool", tool=tool, arguments=arguments, wait_s=10)
        assert reply["status"] == "completed", (tool, reply)
        results[tool] = reply["task"]["result"]
    assert len(results["github.list_issue_comments"]["comments"]) == 5
    assert results["github.list_issue_comments"]["more"] is True
    assert {i["state"] for i in results["github.list_issues"]["issues"]} == {"closed"}
    assert results["github.list_issues"]["issues"][0]["labels"] == ["bug", "p1"]
    assert results["github.get_pull_request"]["head"] == "feature"
    assert results["github.list_pull_request_files"]["files"][0]["filename"] == "a.py"
    assert results["github.list_workflow_runs"]["runs"][0]["conclusion"] == "success"
    assert results["github.add_labels"]["labels"] == ["bug", "triaged"]
    assert results["github.create_issue_comment"]["body"] == "Looking into it."


async def test_github_writes_are_never_cached(connected: tuple[Runtime, Client], upstreams: Upstreams) -> None:
    _, client = connected
    arguments = {"owner": "octo", "repo": "hello", "number": 1, "body": "same"}
    for _ in range(2):
        reply = await call(client, "fire_tool", tool="github.create_issue_comment", arguments=arguments, wait_s=10)
        assert reply["cached"] is False
    assert upstreams.github.requests["POST /repos/octo/hello/issues/1/comments"] == 2


@pytest.mark.parametrize(
    ("repo", "kind", "words"),
    [
        ("limited", "rate_limited", "resets at epoch 1900000000"),
        ("missing", "not_found", "404"),
        ("broken", "http_status", "500"),
    ],
)
async def test_github_failures_say_what_happened(
    connected: tuple[Runtime, Client], upstreams: Upstreams, repo: str, kind: str, words: str
) -> None:
    _, client = connected
    reply = await call(
        client, "fire_tool", tool="github.get_issue", arguments={"owner": "octo", "repo": repo, "number": 1}, wait_s=20
    )
    assert reply["task"]["error"]["kind"] == kind
    assert words in reply["task"]["error"]["message"]
    assert GITHUB_TOKEN not in json.dumps(reply)
    attempts = upstreams.github.requests[f"GET /repos/octo/{repo}/issues/1"]
    assert attempts == (3 if repo == "broken" else 1)  # server errors: githubkit's bounded retries, no storm


async def test_a_wrong_github_token_is_an_auth_failure(
    upstreams: Upstreams, tmp_path: Path, clock: FakeClock, gate: Gate, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_wrong")
    settings = Settings(data_dir=tmp_path / "d", github_base_url=upstreams.github_url)
    async with open_client(settings, clock, gate) as (_, client):
        reply = await call(
            client, "fire_tool", tool="github.get_issue", arguments={"owner": "o", "repo": "r", "number": 1}, wait_s=10
        )
        assert reply["task"]["error"]["kind"] == "auth"
        assert "ghp_wrong" not in json.dumps(reply)


async def test_missing_credentials_are_listed_and_refused_clearly(
    tmp_path: Path, clock: FakeClock, gate: Gate, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GITHUB_TOKEN", raising=False)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    async with open_client(Settings(data_dir=tmp_path / "d"), clock, gate) as (runtime, client):
        catalog = {t["name"]: t for t in (await call(client, "list_fireable_tools"))["tools"]}
        assert "ANTHROPIC_API_KEY" in catalog["anthropic.message"]["note"]
        assert "GITHUB_TOKEN" in catalog["github.add_labels"]["note"]
        for tool, arguments in [
            ("anthropic.message", {"prompt": "hi"}),
            ("github.add_labels", {"owner": "o", "repo": "r", "number": 1, "labels": ["x"]}),
        ]:
            message = error_text(await client.call_tool("fire_tool", {"tool": tool, "arguments": arguments}))
            assert "set the environment variable" in message and "Nothing was started" in message
        assert runtime.executor.counters.fired == 0


# ---- Anthropic ----


async def test_identical_messages_are_served_once(connected: tuple[Runtime, Client], upstreams: Upstreams) -> None:
    _, client = connected
    arguments = {"prompt": "Summarise issue 7", "system": "Be brief.", "max_tokens": 100}
    first = await call(client, "fire_tool", tool="anthropic.message", arguments=arguments, wait_s=50)
    assert first["task"]["result"]["text"] == "echo: Summarise issue 7"
    assert first["task"]["result"]["usage"] == {"input_tokens": 5, "output_tokens": 7}
    assert first["task"]["result"]["model"] == "claude-sonnet-5-5"
    second = await call(client, "fire_tool", tool="anthropic.message", arguments=arguments)
    assert second["cached"] is True
    assert upstreams.anthropic.requests["POST /v1/messages"] == 1
    fresh = await call(client, "fire_tool", tool="anthropic.message", arguments=arguments, use_cache=False, wait_s=50)
    assert fresh["status"] == "completed"
    assert upstreams.anthropic.requests["POST /v1/messages"] == 2
    assert ANTHROPIC_KEY not in json.dumps([first, second, fresh])


async def test_anthropic_rate_limit(connected: tuple[Runtime, Client], upstreams: Upstreams) -> None:
    _, client = connected
    reply = await call(
        client, "fire_tool", tool="anthropic.message", arguments={"prompt": "hi", "model": "limited"}, wait_s=30
    )
    assert reply["task"]["error"]["kind"] == "rate_limited"
    assert "retry after 1 s" in reply["task"]["error"]["message"]
    assert upstreams.anthropic.requests["POST /v1/messages"] == 2  # the SDK's own retry, bounded (1 here)
    view = await finish(client, reply["task_id"])
    assert ANTHROPIC_KEY not in json.dumps(view)


async def test_private_addresses_can_be_refused(
    upstreams: Upstreams, tmp_path: Path, clock: FakeClock, gate: Gate
) -> None:
    """With http_private_networks = false, loopback URLs (one a live local server) are refused unsent."""
    settings = Settings(data_dir=tmp_path / "d", http_private_networks=False)
    async with open_client(settings, clock, gate) as (_, client):
        for url in [f"{upstreams.web_url}/hello", "http://localhost:1/", "http://[::1]:1/"]:
            reply = await call(client, "fire_tool", tool="http.request", arguments={"url": url}, wait_s=10)
            error = reply["task"]["error"]
            assert error["kind"] == "refused", error
            assert "non-public address" in error["message"]
    assert sum(upstreams.web.requests.values()) == 0
