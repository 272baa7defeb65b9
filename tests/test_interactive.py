"""Interactive and long-lived commands (issue 23), with real programs through a real MCP client: input to a
running command (`stdin: "pipe"`, `send_input`), a python REPL and `read -p` in a terminal (`pty`), a dev
server that becomes ready (`ready_when`) and is reached and cancelled, output waited for by pattern
(`wait_for`) and filtered by one (`filter`), refusals, and what a restarted server can and cannot reattach.
Every wait is on output or readiness, bounded; no sleeps."""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from conftest import FakeClock, Gate, call, error_text, finish, live_group_members, open_client
from mcp import Client
from mcp_types import ResourceUpdatedNotification
from test_durable import kill_9
from test_notify import json_of

from server.app import build_server
from server.config import Settings
from server.interactive import MAX_INPUT_BYTES
from testkit.processes import gone
from testkit.rawserver import start_server

pytestmark = pytest.mark.anyio

ECHO_LINES = 'while IFS= read -r line; do echo "got $line"; done; echo "stdin closed"'


async def wait_for(client: Client, task_id: str, pattern: str, timeout_s: float = 20) -> dict[str, Any]:
    reply = await call(client, "poll_output", task_ids=[task_id], wait_for=pattern, timeout_s=timeout_s)
    assert reply["pending"] == [], f"{pattern!r} never appeared: {reply}"
    view: dict[str, Any] = reply["done"][0]
    return view


async def text_after(client: Client, task_id: str, offset: int) -> str:
    view = await call(client, "get_cached_output", task_id=task_id, offset=offset)
    return str(view["output"]["text"])


async def test_send_input_reaches_a_piped_command_and_eof_ends_it(client: Client) -> None:
    task = await call(client, "run_shell_background", command=ECHO_LINES, stdin="pipe")
    view = await call(client, "get_cached_output", task_id=task["task_id"])
    assert view["interactive"]["input"] == "pipe"
    sent = await call(client, "send_input", task_id=task["task_id"], text="hello\n")
    await wait_for(client, task["task_id"], "^got hello$")
    assert await text_after(client, task["task_id"], sent["offset"]) == "got hello\n"
    await call(client, "send_input", task_id=task["task_id"], text="last\n", eof=True)
    done = await finish(client, task["task_id"])
    assert done["status"] == "completed" and done["output"]["text"] == "got hello\ngot last\nstdin closed\n"
    assert done["interactive"]["stdin"] == "closed"


async def test_send_input_is_refused_plainly(client: Client) -> None:
    closed = await call(client, "run_shell_background", command="sleep 30")
    refused = error_text(await client.call_tool("send_input", {"task_id": closed["task_id"], "text": "x"}))
    assert 'not fired with stdin "pipe" or pty' in refused and closed["task_id"] in refused
    await call(client, "cancel_task", task_id=closed["task_id"])

    ended = await call(client, "run_shell_background", command="true", stdin="pipe")
    await finish(client, ended["task_id"])
    refused = error_text(await client.call_tool("send_input", {"task_id": ended["task_id"], "text": "x"}))
    assert "it has completed; there is no command left to write to" in refused

    unknown = error_text(await client.call_tool("send_input", {"task_id": "no-such-task", "text": "x"}))
    assert "Unknown task id 'no-such-task'" in unknown

    piped = await call(client, "run_shell_background", command="cat >/dev/null", stdin="pipe")
    big = "x" * (MAX_INPUT_BYTES + 1)
    too_big = error_text(await client.call_tool("send_input", {"task_id": piped["task_id"], "text": big}))
    assert f"send_input text is {MAX_INPUT_BYTES + 1} bytes" in too_big and "64 KiB" in too_big
    await call(client, "send_input", task_id=piped["task_id"], text="", eof=True)
    again = error_text(await client.call_tool("send_input", {"task_id": piped["task_id"], "text": "more"}))
    assert "stdin is closed" in again or "has completed" in again
    await finish(client, piped["task_id"])


async def test_a_python_repl_in_a_terminal(client: Client) -> None:
    command = f"PYTHON_BASIC_REPL=1 {sys.executable} -q"
    task = await call(client, "run_shell_background", command=command, pty=True, rows=10, cols=40)
    await wait_for(client, task["task_id"], "^>>> ")
    await call(client, "send_input", task_id=task["task_id"], text="import sys; print(6 * 7, sys.stdin.isatty())\n")
    await wait_for(client, task["task_id"], r"^42 True")
    screen = await call(client, "get_cached_output", task_id=task["task_id"], screen=True)
    lines = screen["output"]["text"].split("\n")
    assert "42 True" in lines and lines[-1] == ">>>", lines  # echoed input, the answer, a new prompt
    assert len(lines) <= 10 and all(len(line) <= 40 for line in lines)
    await call(client, "send_input", task_id=task["task_id"], text="", eof=True)  # Ctrl-D at the prompt
    done = await finish(client, task["task_id"])
    assert done["status"] == "completed"


async def test_read_p_prompts_in_a_terminal_and_takes_the_answer(client: Client) -> None:
    command = 'read -p "Name? " name; echo "hello, $name"; [ -t 0 ] && echo "a terminal"'
    task = await call(client, "run_shell_background", command=command, pty=True)
    await wait_for(client, task["task_id"], r"Name\? ")
    await call(client, "send_input", task_id=task["task_id"], text="bob\n")
    done = await finish(client, task["task_id"])
    assert done["status"] == "completed"
    assert "hello, bob\r\n" in done["output"]["text"] and "a terminal" in done["output"]["text"]


async def test_a_dev_server_is_ready_reached_and_cancelled_with_nothing_left(client: Client) -> None:
    command = f"{sys.executable} -u -m http.server 0 --bind 127.0.0.1"
    task = await call(client, "run_shell_background", command=command, ready_when=r"Serving HTTP .* port \d+")
    polled = await call(client, "poll_output", task_ids=[task["task_id"]], timeout_s=20)
    assert polled["pending"] == [], polled  # ready counts as done for poll_output; the task runs on
    view = polled["done"][0]
    assert view["status"] == "running" and view["interactive"]["ready"] is True and view["interactive"]["ready_at"]
    port = int(re.search(r"port (\d+)", view["output"]["text"]).group(1))  # type: ignore[union-attr]
    async with httpx.AsyncClient() as http:
        reply = await http.get(f"http://127.0.0.1:{port}/")
    assert reply.status_code == 200
    cancelled = await call(client, "cancel_task", task_id=task["task_id"])
    assert cancelled["status"] == "cancelled"
    assert await gone(task["pid"]) and live_group_members(task["pid"]) == []


async def test_wait_for_and_filter_read_whole_lines_by_pattern(client: Client) -> None:
    command = "for i in 1 2 3 4 5 6; do echo \"line $i\"; done; echo 'build ok'; read -r _"
    task = await call(client, "run_shell_background", command=command, stdin="pipe")
    await wait_for(client, task["task_id"], "^build ok$")
    view = await call(client, "get_cached_output", task_id=task["task_id"], filter=r"line [246]")
    out = view["output"]
    assert out["text"] == "line 2\nline 4\nline 6\n"
    assert out["line_offsets"] == [7, 21, 35]  # each line's own byte offset
    assert out["next_offset"] == out["total_bytes"]  # every complete line was judged
    bounded = await call(client, "get_cached_output", task_id=task["task_id"], filter="line", max_bytes=15)
    assert bounded["output"]["text"] == "line 1\nline 2\n" and bounded["output"]["next_offset"] == 14
    bad = error_text(await client.call_tool("poll_output", {"task_ids": [task["task_id"]], "wait_for": "(unclosed"}))
    assert "wait_for='(unclosed' is not a valid regular expression" in bad and "missing )" in bad
    bad = error_text(await client.call_tool("get_cached_output", {"task_id": task["task_id"], "filter": "["}))
    assert "filter='[' is not a valid regular expression" in bad
    await call(client, "send_input", task_id=task["task_id"], text="\n")
    await finish(client, task["task_id"])


async def test_ready_when_and_pty_are_checked_before_anything_starts(client: Client) -> None:
    bad = error_text(await client.call_tool("run_shell_background", {"command": "true", "ready_when": "(x"}))
    assert "ready_when '(x' is not a valid regular expression" in bad
    both = error_text(await client.call_tool("run_shell_background", {"command": "cat", "pty": True, "stdin": "pipe"}))
    assert 'drop stdin "pipe"' in both


async def test_a_restarted_server_cannot_reattach_input(tmp_path: Path) -> None:
    """The pipe is held by the server's process: after a kill -9 the command is settled `interrupted`, and
    input to it is refused saying why."""
    server = await start_server(tmp_path)
    task = await server.call("run_shell_background", command=ECHO_LINES, stdin="pipe")
    await server.call("send_input", task_id=task["task_id"], text="before\n")
    await kill_9(server)
    again = await start_server(tmp_path)
    async with again.process:
        view = await again.call("get_cached_output", task_id=task["task_id"])
        assert view["status"] == "failed" and view["error"]["kind"] == "interrupted"
        reply = await again.request(
            "tools/call", {"name": "send_input", "arguments": {"task_id": task["task_id"], "text": "after\n"}}
        )
        message = reply["result"]["content"][0]["text"]
        assert reply["result"]["isError"] and "its input was held by a server that stopped" in message
        assert "the command's stdin is closed" in message
        again.process.terminate()


async def test_becoming_ready_is_pushed_to_subscribers(tmp_path: Path) -> None:
    """Readiness is a change like a status change: a subscriber to task://ID hears of it while it runs on."""
    send, heard = anyio.create_memory_object_stream[str](100)

    async def on_message(message: Any) -> None:
        if isinstance(message, ResourceUpdatedNotification):
            send.send_nowait(str(message.params.uri))

    settings = Settings(data_dir=tmp_path / "data", kill_grace_s=0.5)
    async with (
        send,
        heard,
        open_client(settings, FakeClock(), Gate(), "legacy") as (runtime, _),
        Client(build_server(runtime), mode="legacy", message_handler=on_message) as client,
    ):
        command = "read -r _; echo listening; read -r _"
        task = await call(client, "run_shell_background", command=command, stdin="pipe", ready_when="^listening$")
        with warnings.catch_warnings():  # resources/subscribe is deprecated in 2026-07-28, not in this era
            warnings.simplefilter("ignore")
            await client.subscribe_resource(task["resource"])
        view = json_of(await client.read_resource(task["resource"]))
        assert view["status"] == "running" and view["interactive"]["ready"] is False
        await call(client, "send_input", task_id=task["task_id"], text="go\n")
        with anyio.fail_after(10):
            async for uri in heard:  # the start's news may come first: each one is read until one says ready
                view = json_of(await client.read_resource(uri))
                if view["interactive"]["ready"]:
                    break
        assert view["status"] == "running" and view["interactive"]["ready_at"]
        await call(client, "send_input", task_id=task["task_id"], text="stop\n")
        await finish(client, task["task_id"])
