"""Task resources and update notifications, on both eras and every transport, through the SDK's client.

Each test's task is a real command held on a FIFO until the client is subscribed, so the update it
waits for can only come from the task finishing afterwards: no sleeps, every wait bounded.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import ERAS, FakeClock, Gate, call, data, open_client
from mcp import Client, StdioServerParameters
from mcp.shared.exceptions import MCPError
from mcp_types import ResourceUpdatedNotification
from test_http import ALICE, BOB, TOKENS, connect, web_server

from server.app import build_server
from server.config import Settings
from server.runtime import Runtime
from server.sdk_compat import SDKChangedError, connection_of, lowlevel_of
from testkit.rawserver import server_env

pytestmark = pytest.mark.anyio

TRANSPORTS = ["memory", "stdio", "http", "sse"]


@asynccontextmanager
async def served(
    transport: str, era: str, tmp_path: Path, on_message: Callable[[Any], Any] | None = None
) -> AsyncIterator[Client]:
    """A real client on `era`, connected over `transport` to a real server."""
    if transport == "stdio":
        params = StdioServerParameters(command=sys.executable, args=["-m", "server"], env=server_env(tmp_path))
        async with Client(params, mode=ERAS[era], message_handler=on_message) as client:
            yield client
        return
    if transport == "memory":
        async with (
            open_client(Settings(data_dir=tmp_path / "data"), FakeClock(), Gate(), era) as (rt, _),
            Client(build_server(rt), mode=ERAS[era], message_handler=on_message) as client,
        ):
            yield client
        return
    async with web_server(Gate(), transport, data_dir=tmp_path / "data") as url:
        if on_message is None:
            async with connect(url, era=era) as client:
                yield client
        else:
            async with _connect_with_handler(url, era, on_message) as client:
                yield client


@asynccontextmanager
async def _connect_with_handler(url: str, era: str, on_message: Callable[[Any], Any]) -> AsyncIterator[Client]:
    from mcp.client.sse import sse_client
    from mcp.client.streamable_http import streamable_http_client

    transport = sse_client(url) if url.endswith("/sse") else streamable_http_client(url)
    async with Client(transport, mode=ERAS[era], message_handler=on_message) as client:
        yield client


class Held:
    """A command that waits until `release()`: it reads one byte from a FIFO the test writes."""

    def __init__(self, folder: Path) -> None:
        self.fifo = folder / "hold"
        os.mkfifo(self.fifo)
        self.command = f"head -c 1 {self.fifo} >/dev/null; echo released"

    async def release(self) -> None:
        def write() -> None:
            with open(self.fifo, "w") as fifo:  # opens once the command has it open for reading
                fifo.write("x")

        with anyio.fail_after(10):
            await anyio.to_thread.run_sync(write)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_legacy_subscriber_hears_the_task_finish(tmp_path: Path, transport: str) -> None:
    updates: list[str] = []
    heard = anyio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, ResourceUpdatedNotification):
            updates.append(message.params.uri)
            heard.set()

    held = Held(tmp_path)
    async with served(transport, "legacy", tmp_path, on_message) as client:
        fired = await call(client, "run_shell_background", command=held.command)
        uri = fired["resource"]
        assert uri == f"task://{fired['task_id']}"
        with warnings.catch_warnings():  # resources/subscribe is deprecated in 2026-07-28, not in this era
            warnings.simplefilter("ignore")
            await client.subscribe_resource(uri)
        assert json_of(await client.read_resource(uri))["status"] == "running"
        await held.release()
        with anyio.fail_after(10):
            await heard.wait()
        assert updates[0] == uri
        view = json_of(await client.read_resource(uri))
        assert view["status"] == "completed" and view["output"]["text"] == "released\n"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_modern_listener_hears_the_task_finish(tmp_path: Path, transport: str) -> None:
    held = Held(tmp_path)
    async with served(transport, "modern", tmp_path) as client:
        fired = await call(client, "run_shell_background", command=held.command)
        uri = fired["resource"]
        async with client.listen(resource_subscriptions=[uri, f"{uri}/output"]) as subscription:
            assert set(subscription.honored.resource_subscriptions or ()) == {uri, f"{uri}/output"}
            await held.release()
            with anyio.fail_after(10):
                async for _event in subscription:
                    if json_of(await client.read_resource(uri))["status"] == "completed":
                        break
        output = await client.read_resource(f"{uri}/output")
        assert output.contents[0].text == "released\n"  # type: ignore[union-attr]


async def test_resources_show_the_task_its_output_and_the_recent_list(tmp_path: Path) -> None:
    async with open_client(Settings(data_dir=tmp_path / "d"), FakeClock(), Gate()) as (_, client):
        templates = {t.uri_template for t in (await client.list_resource_templates()).resource_templates}
        assert templates == {"task://{task_id}", "task://{task_id}/output"}
        listed = {str(r.uri) for r in (await client.list_resources()).resources}
        assert {"tasks://recent", "offload://stats"} <= listed
        big = "x" * 100_000
        fired = await call(client, "run_shell_background", command=f"printf {big}; printf END")
        reply = await call(client, "poll_output", task_ids=[fired["task_id"]], timeout_s=20)
        assert reply["done"][0]["status"] == "completed"
        text = (await client.read_resource(f"task://{fired['task_id']}/output")).contents[0].text  # type: ignore[union-attr]
        note, _, tail = text.partition("\n")
        assert note.startswith("[offload: bytes 34467-100003 of 100003") and "offset=0" in note
        assert tail.endswith("xEND") and len(tail) == 64 * 1024
        view = json_of(await client.read_resource(f"task://{fired['task_id']}"))
        assert view["status"] == "completed" and len(view["output"]["text"]) == 4096
        recent = json_of(await client.read_resource("tasks://recent"))
        assert [t["task_id"] for t in recent["tasks"]] == [fired["task_id"]]
        with pytest.raises(MCPError, match=r"Unknown task id 'nope'"):
            await client.read_resource("task://nope")


async def test_another_owners_task_is_not_a_resource(gate: Gate, tmp_path: Path) -> None:
    tokens = {"alice": "ALICE_TOKEN", "bob": "BOB_TOKEN"}
    async with (
        web_server(gate, "http", TOKENS, auth_tokens=tokens) as url,
        connect(url, ALICE, era="legacy") as alice,
        connect(url, BOB, era="legacy") as bob,
    ):
        fired = await call(alice, "fire_tool", tool="test.gate", arguments={"key": "k"})
        uri = fired["resource"]
        assert json_of(await alice.read_resource(uri))["status"] in ("queued", "running")
        never = "task://" + "A" * 22
        for attempt in [bob.read_resource, _subscribe(bob)]:
            with pytest.raises(MCPError) as theirs:
                await attempt(uri)
            with pytest.raises(MCPError) as unknown:
                await attempt(never)
            assert str(theirs.value).replace(fired["task_id"], "ID") == str(unknown.value).replace("A" * 22, "ID")
        assert json_of(await bob.read_resource("tasks://recent"))["tasks"] == []
        gate.release("k")


def _subscribe(client: Client) -> Callable[[str], Any]:
    async def subscribe(uri: str) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return await client.subscribe_resource(uri)

    return subscribe


async def test_subscribing_to_what_cannot_change_is_refused(tmp_path: Path) -> None:
    async with open_client(Settings(data_dir=tmp_path / "d"), FakeClock(), Gate(), "legacy") as (_, client):
        with pytest.raises(MCPError, match="only task://"):
            await _subscribe(client)("offload://stats")
        await _subscribe(client)("tasks://recent")


async def test_the_sdk_internals_we_rely_on_are_still_there(tmp_path: Path) -> None:
    """Fails loudly when an SDK upgrade moves what server/sdk_compat.py reaches for."""
    async with open_client(Settings(data_dir=tmp_path / "d"), FakeClock(), Gate()) as (runtime, client):
        lowlevel = lowlevel_of(build_server(runtime))
        assert lowlevel.get_request_handler("resources/subscribe") is not None
        assert data(await client.call_tool("list_tasks", {}))["tasks"] == []

    class Bare:
        session = object()

    with pytest.raises(SDKChangedError, match=r"ServerSession\._connection"):
        connection_of(Bare())  # type: ignore[arg-type]
    with pytest.raises(SDKChangedError, match=r"MCPServer\._lowlevel_server"):
        lowlevel_of(object())  # type: ignore[arg-type]


def json_of(result: Any) -> dict[str, Any]:
    import json

    parsed: dict[str, Any] = json.loads(result.contents[0].text)
    return parsed


async def test_listeners_hear_only_their_own_owners_tasks(gate: Gate) -> None:
    """Bob's task finishes before Alice's starts, and the news is delivered in that order: if any of
    Bob's news reached Alice's stream, it would be the first event she gets."""
    tokens = {"alice": "ALICE_TOKEN", "bob": "BOB_TOKEN"}
    async with (
        web_server(gate, "http", TOKENS, auth_tokens=tokens) as url,
        connect(url, ALICE) as alice,
        connect(url, BOB) as bob,
    ):
        bobs = await call(bob, "fire_tool", tool="test.gate", arguments={"key": "bob"})
        await gate.wait_entered("bob")
        watched = [bobs["resource"], "tasks://recent"]
        async with alice.listen(resource_subscriptions=watched) as subscription:
            gate.release("bob")
            assert (await call(bob, "poll_output", task_ids=[bobs["task_id"]]))["done"][0]["status"] == "completed"
            gate.release("alice")
            await call(alice, "fire_tool", tool="test.gate", arguments={"key": "alice"})
            with anyio.fail_after(10):
                first = await anext(aiter(subscription))
        assert first.uri == "tasks://recent"  # type: ignore[union-attr]


async def test_one_connection_may_subscribe_to_a_bounded_number_of_resources() -> None:
    from mcp.server.connection import Connection

    from server.errors import TooManySubscriptionsError
    from server.notify import MAX_SUBSCRIPTIONS, Notifier

    notifier = Notifier()
    connection = Connection(object(), protocol_version="2025-11-25")  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        tg.start_soon(notifier.run)
        for n in range(MAX_SUBSCRIPTIONS):
            notifier.subscribe(connection, "local", f"task://t{n}")
        notifier.subscribe(connection, "local", "task://t0")  # again: not a new one
        with pytest.raises(TooManySubscriptionsError, match="unsubscribe from finished tasks"):
            notifier.subscribe(connection, "local", "task://one-more")
        notifier.unsubscribe(connection, "task://t0")
        notifier.subscribe(connection, "local", "task://one-more")
        notifier.close()  # ends `run`


async def test_a_closed_connection_leaves_no_subscriptions_behind(tmp_path: Path, gate: Gate) -> None:
    async with Runtime.open(Settings(data_dir=tmp_path / "d"), extra_tools=gate.specs(), load_plugins=False) as rt:
        server = build_server(rt)
        assert server.notifier is not None
        async with Client(server, mode="legacy") as client:
            fired = await call(client, "fire_tool", tool="test.gate", arguments={"key": "k"})
            await _subscribe(client)(fired["resource"])
            await _subscribe(client)("tasks://recent")
            assert server.notifier.stats()["subscribed_resources"] == 2
        assert server.notifier.stats()["subscribed_connections"] == 0
        gate.release("k")


@pytest.mark.parametrize("era", list(ERAS))
async def test_a_task_run_by_another_server_on_the_data_dir_notifies_here(tmp_path: Path, era: str) -> None:
    """Found by review (issue 22, item 13): a task server A ran never produced a resource notification on
    server B, though B's poll_output woke. Subscriptions ride the same news of the shared store."""
    settings = Settings(data_dir=tmp_path / "data")
    updates: list[str] = []
    heard = anyio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, ResourceUpdatedNotification):
            updates.append(message.params.uri)
            heard.set()

    held = Held(tmp_path)
    async with (
        open_client(settings, FakeClock(), Gate()) as (_, a),
        open_client(settings, FakeClock(), Gate()) as (b_runtime, _),
        Client(build_server(b_runtime), mode=ERAS[era], message_handler=on_message) as b,
    ):
        fired = await call(a, "run_shell_background", command=held.command)
        uri = fired["resource"]
        assert json_of(await b.read_resource(uri))["status"] == "running"
        if era == "legacy":
            with warnings.catch_warnings():  # resources/subscribe is deprecated in 2026-07-28, not in this era
                warnings.simplefilter("ignore")
                await b.subscribe_resource(uri)
            await held.release()
            with anyio.fail_after(10):  # the news of its start may come first: read again on each one
                while json_of(await b.read_resource(uri))["status"] != "completed":
                    await heard.wait()
                    heard = anyio.Event()
            assert set(updates) == {uri}
        else:
            async with b.listen(resource_subscriptions=[uri]) as subscription:
                await held.release()
                with anyio.fail_after(10):
                    async for _event in subscription:
                        if json_of(await b.read_resource(uri))["status"] == "completed":
                            break
        view = json_of(await b.read_resource(uri))
        assert view["status"] == "completed" and view["output"]["text"] == "released\n"
