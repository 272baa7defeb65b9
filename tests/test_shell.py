"""The shell runner with real processes: exit codes, stdin, output offsets, bounds, no orphans."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest
from conftest import FakeClock, Gate, call, error_text, finish, live_group_members, open_client, start_tree
from mcp import Client

from server.config import Settings
from server.runtime import Runtime

pytestmark = pytest.mark.anyio


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the command reads its group from /proc (Linux)")
async def test_run_shell_background_returns_the_pid(client: Client) -> None:
    reply = await call(client, "run_shell_background", command="read -a f < /proc/$$/stat; echo ${f[4]}; sleep 0.2")
    assert reply["status"] in ("running", "completed")
    assert isinstance(reply["pid"], int)
    view = await finish(client, reply["task_id"])
    assert view["output"]["text"].strip() == str(reply["pid"])  # the pid we report is the command's group
    assert view["pid"] == reply["pid"]


async def test_non_zero_exit_fails_with_exit_status_and_keeps_output(client: Client) -> None:
    reply = await call(client, "run_shell_background", command="echo oops; echo err >&2; exit 3")
    view = await finish(client, reply["task_id"])
    assert view["status"] == "failed"
    assert view["error"]["kind"] == "exit_status"
    assert "code 3" in view["error"]["message"]
    assert view["result"]["exit_code"] == 3 and view["result"]["signal"] is None
    assert view["result"]["output_bytes"] == len("oops\nerr\n")
    assert view["output"]["text"] == "oops\nerr\n"


async def test_stdin_is_fed_then_closed(client: Client) -> None:
    reply = await call(client, "run_shell_background", command="cat; echo; wc -l", stdin="hello\nworld")
    view = await finish(client, reply["task_id"])
    assert view["output"]["text"] == "hello\nworld\n0\n"


async def test_a_program_reading_stdin_never_hangs(client: Client) -> None:
    reply = await call(client, "fire_tool", tool="shell", arguments={"command": "cat; echo eof"}, wait_s=10)
    assert reply["task"]["output"]["text"] == "eof\n"


async def test_cwd_and_env(client: Client, tmp_path: anyio.Path) -> None:
    reply = await call(
        client, "run_shell_background", command="pwd; echo $GREETING", cwd=str(tmp_path), env={"GREETING": "hi there"}
    )
    view = await finish(client, reply["task_id"])
    assert view["output"]["text"] == f"{tmp_path}\nhi there\n"


async def test_secrets_are_scrubbed_from_the_environment(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFLOAD_TEST_API_TOKEN", "s3cr3t-value")
    monkeypatch.setenv("MY_PASSWORD", "hunter2")
    monkeypatch.setenv("PLAIN_SETTING", "visible")
    reply = await call(client, "run_shell_background", command="env", env={"EXPLICIT_KEY": "given"})
    text = (await finish(client, reply["task_id"]))["output"]["text"]
    assert "s3cr3t-value" not in text and "hunter2" not in text
    assert "PLAIN_SETTING=visible" in text
    assert "EXPLICIT_KEY=given" in text  # what the caller passes explicitly is passed


async def test_cancel_kills_the_whole_process_tree(client: Client) -> None:
    task_id, pgid = await start_tree(client)
    view = await call(client, "cancel_task", task_id=task_id)
    assert view["status"] == "cancelled"
    assert view["error"]["kind"] == "cancelled_by_client"
    assert live_group_members(pgid) == []


async def test_a_command_that_ignores_term_is_killed(client: Client) -> None:
    reply = await call(client, "run_shell_background", command="trap '' TERM; echo armed; sleep 300 & wait")
    pgid = reply["pid"]
    view = await call(client, "cancel_task", task_id=reply["task_id"])
    assert view["status"] == "cancelled"
    assert live_group_members(pgid) == []


async def test_timeout_kills_and_reports_timeout(client: Client) -> None:
    task_id, pgid = await start_tree(client, timeout_s=1)
    view = await finish(client, task_id)
    assert view["status"] == "failed"
    assert view["error"]["kind"] == "timeout"
    assert view["output"]["text"] == "ready\n"
    assert live_group_members(pgid) == []


async def test_background_children_end_with_the_command(client: Client) -> None:
    reply = await call(client, "run_shell_background", command="sleep 300 & echo left")
    view = await finish(client, reply["task_id"])
    assert view["status"] == "completed"
    assert live_group_members(reply["pid"]) == []


async def test_cancelling_a_finished_task_changes_nothing(client: Client) -> None:
    reply = await call(client, "fire_tool", tool="shell", arguments={"command": "echo done"}, wait_s=10)
    view = await call(client, "cancel_task", task_id=reply["task_id"])
    assert view["status"] == "completed"


async def test_incremental_reads_by_offset_and_tail(client: Client) -> None:
    reply = await call(client, "fire_tool", tool="shell", arguments={"command": "printf abcdefghij"}, wait_s=10)
    task_id = reply["task_id"]
    first = (await call(client, "get_cached_output", task_id=task_id, max_bytes=4))["output"]
    assert (first["text"], first["offset"], first["next_offset"], first["truncated"]) == ("abcd", 0, 4, True)
    rest = (await call(client, "get_cached_output", task_id=task_id, offset=4))["output"]
    assert (rest["text"], rest["next_offset"], rest["truncated"]) == ("efghij", 10, False)
    at_end = (await call(client, "get_cached_output", task_id=task_id, offset=10))["output"]
    assert at_end["text"] == "" and at_end["next_offset"] == 10
    beyond = (await call(client, "get_cached_output", task_id=task_id, offset=999))["output"]
    assert beyond["text"] == "" and beyond["offset"] == 10
    tail = (await call(client, "get_cached_output", task_id=task_id, tail_bytes=3))["output"]
    assert (tail["text"], tail["offset"]) == ("hij", 7)


async def test_reads_never_split_a_character(client: Client) -> None:
    reply = await call(client, "fire_tool", tool="shell", arguments={"command": "printf 'h\u00e9\u00e9'"}, wait_s=10)
    first = (await call(client, "get_cached_output", task_id=reply["task_id"], max_bytes=2))["output"]
    assert (first["text"], first["next_offset"]) == ("h", 1)
    second = (await call(client, "get_cached_output", task_id=reply["task_id"], offset=1, max_bytes=3))["output"]
    assert (second["text"], second["next_offset"]) == ("\u00e9", 3)
    tail = (await call(client, "get_cached_output", task_id=reply["task_id"], tail_bytes=3))["output"]
    assert tail["text"] == "\u00e9"


async def test_huge_output_stays_bounded_with_exact_accounting(clock: FakeClock, gate: Gate) -> None:
    file_cap = 1024 * 1024
    total = 5_000_000
    command = f"head -c {total} /dev/zero | tr '\\0' a; printf END"
    settings = Settings(output_file_max_bytes=file_cap)
    async with open_client(settings, clock, gate) as (runtime, client):
        reply = await call(client, "fire_tool", tool="shell", arguments={"command": command}, wait_s=30)
        view = reply["task"]
        assert view["status"] == "completed"
        assert view["result"]["output_bytes"] == total + 3
        assert view["output"]["total_bytes"] == total + 3
        assert runtime.executor.store.output_path(reply["task_id"]).stat().st_size == file_cap + 64  # + header
        head = (await call(client, "get_cached_output", task_id=reply["task_id"], max_bytes=file_cap))["output"]
        assert head["text"] == "a" * (file_cap // 2)
        gap = head["dropped"]
        assert gap["from"] == file_cap // 2
        assert gap["to"] == total + 3 - file_cap // 2
        assert head["next_offset"] == gap["to"]  # the next read continues after the gap
        after = await call(
            client, "get_cached_output", task_id=reply["task_id"], offset=head["next_offset"], max_bytes=file_cap
        )
        assert after["output"]["text"] == "a" * (file_cap // 2 - 3) + "END"
        assert after["output"]["next_offset"] == total + 3


async def test_shutdown_kills_running_commands(settings: Settings, clock: FakeClock, gate: Gate) -> None:
    async with open_client(settings, clock, gate) as (runtime, client):
        task_id, pgid = await start_tree(client)
        task = runtime.executor.get("local", task_id)
    assert task.status == "cancelled" and task.error is not None and task.error.kind == "shutdown"
    assert live_group_members(pgid) == []


async def test_bad_cwd_is_refused_before_anything_starts(client: Client, runtime: Runtime) -> None:
    result = await client.call_tool("run_shell_background", {"command": "true", "cwd": "/no/such/dir"})
    message = error_text(result)
    assert "/no/such/dir" in message and "not an existing directory" in message
    assert "Nothing was started" in message
    assert runtime.executor.counters.fired == 0


async def test_server_process_environment_is_untouched(client: Client) -> None:
    before = dict(os.environ)
    await call(client, "fire_tool", tool="shell", arguments={"command": "true", "env": {"X_NEW": "1"}}, wait_s=10)
    assert dict(os.environ) == before
