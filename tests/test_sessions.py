"""Transport sessions belong to owners, and one client cannot lock the others out (issue 12, items 2 and 6).

Real servers on 127.0.0.1, raw HTTP from httpx and sockets: bob tries alice's session by every spelling
the issue found, duplicate headers and parameters are refused, session ids stay out of the log above
DEBUG, per-owner caps answer 429, half-sent requests are cut off, and the connection cap answers 503.
Every DoS probe is bounded in count and time."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from conftest import Gate
from test_http import ALICE, BOB, INITIALIZE, INITIALIZED, MCP_POST_HEADERS, PING, TOKENS, web_server

from server.auth import SessionIdFilter
from testkit.rawserver import served_log, server_env

pytestmark = pytest.mark.anyio

AS_ALICE = {"Authorization": f"Bearer {ALICE}"}
AS_BOB = {"Authorization": f"Bearer {BOB}"}
OWNERS = {"alice": "ALICE_TOKEN", "bob": "BOB_TOKEN"}


@asynccontextmanager
async def two_owner_server(gate: Gate, transport: str, **settings: Any) -> AsyncIterator[str]:
    async with web_server(gate, transport, TOKENS, auth_tokens=OWNERS, **settings) as url:
        yield url


async def open_session(http: httpx.AsyncClient, url: str, who: dict[str, str]) -> str:
    opened = await http.post(url, json=INITIALIZE, headers={**MCP_POST_HEADERS, **who})
    assert opened.status_code == 200, opened.text
    session = opened.headers["mcp-session-id"]
    done = await http.post(url, json=INITIALIZED, headers={**MCP_POST_HEADERS, **who, "mcp-session-id": session})
    assert done.status_code == 202, done.text
    return str(session)


async def test_bob_cannot_use_alices_streamable_http_session(gate: Gate, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with two_owner_server(gate, "http") as url, httpx.AsyncClient(timeout=10) as http:
        hers = await open_session(http, url, AS_ALICE)
        his = await open_session(http, url, AS_BOB)
        post = {**MCP_POST_HEADERS, **AS_BOB}
        # Her id alone, in every method.
        ping = await http.post(url, json=PING, headers={**post, "mcp-session-id": hers})
        stream = await http.get(url, headers={**AS_BOB, "Accept": "text/event-stream", "mcp-session-id": hers})
        delete = await http.delete(url, headers={**AS_BOB, "mcp-session-id": hers})
        assert [r.status_code for r in (ping, stream, delete)] == [404, 404, 404]
        # Two session headers (hers first, then his), two Authorization headers: refused before anything reads one.
        doubled = [*post.items(), ("mcp-session-id", hers), ("mcp-session-id", his)]
        twice = await http.post(url, json=PING, headers=doubled)
        tokens = [*MCP_POST_HEADERS.items(), ("Authorization", f"Bearer {ALICE}"), ("Authorization", f"Bearer {BOB}")]
        two_tokens = await http.post(url, json=PING, headers=[*tokens, ("mcp-session-id", hers)])
        assert (twice.status_code, two_tokens.status_code) == (400, 400)
        assert "2 mcp-session-id headers" in twice.text and "2 authorization headers" in two_tokens.text
        # Her session is untouched and still hers.
        mine = await http.post(url, json=PING, headers={**MCP_POST_HEADERS, **AS_ALICE, "mcp-session-id": hers})
        assert mine.status_code == 200, mine.text
    logged = [r for r in caplog.records if r.levelno > logging.DEBUG]
    assert logged, "the probes above should have been logged"
    for session in (hers, his):
        spellings = {session, str(uuid.UUID(hex=session))}
        assert not [r.getMessage() for r in logged if any(s in r.getMessage() for s in spellings)]


def spellings(session_hex: str) -> list[str]:
    """Every form `UUID(hex=…)` accepts for one id: the SDK normalises SSE session ids this way."""
    hyphenated = str(uuid.UUID(hex=session_hex))
    return [session_hex, session_hex.upper(), hyphenated, "{" + hyphenated + "}", "urn:uuid:" + hyphenated]


async def test_bob_cannot_use_alices_sse_session_by_any_spelling(gate: Gate) -> None:
    async with (
        two_owner_server(gate, "sse") as url,
        httpx.AsyncClient(timeout=10) as http,
        http.stream("GET", url, headers=AS_ALICE) as alice,
        http.stream("GET", url, headers=AS_BOB) as bob,
    ):
        endpoints, readers = [], []  # the readers are kept: a collected one closes its stream
        for stream in (alice, bob):
            readers.append(stream.aiter_text())
            first = await anext(readers[-1])
            found = re.search(r"data: (\S+)\?session_id=([0-9a-f]+)", first)
            assert found is not None, first
            endpoints.append((url.removesuffix("/sse") + found.group(1), found.group(2)))
        (posts, hers), (_, his) = endpoints
        statuses = {}
        for spelt in spellings(hers):
            reply = await http.post(posts, params={"session_id": spelt}, json=INITIALIZE, headers=AS_BOB)
            statuses[spelt] = reply.status_code
        assert set(statuses.values()) == {404}, statuses
        second = await http.post(f"{posts}?session_id={his}&session_id={hers}", json=INITIALIZE, headers=AS_BOB)
        assert second.status_code == 400 and "several session_id" in second.text
        mine = await http.post(posts, params={"session_id": hers}, json=INITIALIZE, headers=AS_ALICE)
        assert mine.status_code == 202, mine.text


async def test_sessions_and_streams_are_capped_per_owner(gate: Gate) -> None:
    async with (
        two_owner_server(gate, "http", max_sessions_per_owner=2, max_streams_per_owner=1) as url,
        httpx.AsyncClient(timeout=10) as http,
    ):
        first = await open_session(http, url, AS_ALICE)
        await open_session(http, url, AS_ALICE)
        refused = await http.post(url, json=INITIALIZE, headers={**MCP_POST_HEADERS, **AS_ALICE})
        assert refused.status_code == 429 and "max_sessions_per_owner = 2" in refused.text
        dodged = await http.post(f"{url}?session_id=x", json=INITIALIZE, headers={**MCP_POST_HEADERS, **AS_ALICE})
        assert dodged.status_code == 429, "a query string does not make an opening POST uncounted"
        await open_session(http, url, AS_BOB)  # bob is not held up by alice
        # Ending one of hers makes room again.
        assert (await http.delete(url, headers={**AS_ALICE, "mcp-session-id": first})).status_code == 200
        await open_session(http, url, AS_ALICE)
    async with (
        two_owner_server(gate, "sse", max_streams_per_owner=1) as url,
        httpx.AsyncClient(timeout=10) as http,
        http.stream("GET", url, headers=AS_ALICE) as held,
    ):
        reader = held.aiter_text()
        await anext(reader)
        again = await http.get(url, headers=AS_ALICE)
        assert again.status_code == 429 and "max_streams_per_owner = 1" in again.text
        async with http.stream("GET", url, headers=AS_BOB) as bobs:
            assert bobs.status_code == 200


@asynccontextmanager
async def real_server(tmp_path: Path, **env: str) -> AsyncIterator[tuple[str, int]]:
    """`offload-mcp --transport http` as a subprocess (its own uvicorn, its own limits): (url, port)."""
    environ = {**server_env(tmp_path), "OFFLOAD_AUTH_TOKEN": ALICE, "OFFLOAD_LOG_LEVEL": "INFO", **env}
    process = await anyio.open_process(
        [sys.executable, "-m", "server", "--transport", "http", "--port", "0"],
        env=environ,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        url, _ = await served_log(process)
        found = re.search(r":(\d+)/", url)
        assert found is not None
        yield url, int(found.group(1))
    finally:
        process.terminate()
        with anyio.fail_after(10):
            await process.wait()
        await process.aclose()


async def closed_by_server(stream: anyio.abc.ByteStream, timeout_s: float) -> bytes:
    """Everything the server sends until it closes the connection, within `timeout_s`."""
    received = b""
    with anyio.fail_after(timeout_s):
        try:
            while True:
                received += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return received


@pytest.mark.slow
async def test_half_sent_requests_are_cut_off_and_connections_capped(tmp_path: Path) -> None:
    cap = 8
    settings = {"OFFLOAD_MAX_CONNECTIONS": str(cap), "OFFLOAD_HTTP_HEADER_TIMEOUT_S": "1"}
    async with real_server(tmp_path, OFFLOAD_HTTP_BODY_TIMEOUT_S="1", **settings) as (url, port):
        # `cap` connections that never finish their headers (no token: the server cannot know who they are).
        slow = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(cap)]
        for stream in slow:
            await stream.send(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        # They hold every slot, yet a client that sends its request at once is served: it displaces the
        # oldest connection still waiting for its headers, which is closed.
        async with httpx.AsyncClient(timeout=10) as http:
            served = await http.post(url, json=INITIALIZE, headers={**MCP_POST_HEADERS, **AS_ALICE})
            assert served.status_code == 200, served.text
        assert await closed_by_server(slow[0], timeout_s=0.9) == b""  # before its own header timeout
        # The other half-sent ones are closed after the header timeout (1 s), well within the bound.
        for stream in slow[1:]:
            await closed_by_server(stream, timeout_s=5)
        for stream in slow:
            await stream.aclose()
        # A body that stops arriving is cut off too.
        body = await anyio.connect_tcp("127.0.0.1", port)
        head = (
            f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {ALICE}\r\n"
            "Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n"
            "Content-Length: 1000\r\n\r\n{"
        )
        await body.send(head.encode())
        assert (await closed_by_server(body, timeout_s=5)).startswith(b"HTTP/1.1 408")
        await body.aclose()
        # And the server answers everyone else again.
        async with httpx.AsyncClient(timeout=10) as http:
            reply = await http.post(url, json=INITIALIZE, headers={**MCP_POST_HEADERS, **AS_ALICE})
            assert reply.status_code == 200, reply.text


def test_session_ids_are_masked_in_log_lines_however_they_are_wrapped() -> None:
    sid = "b46d289f0e1c4a7b9d3e5f60718293a4"
    for said in (sid, f"0x{sid}", f"{sid}_x", f"id={sid[:8]}-{sid[8:12]}-{sid[12:16]}-{sid[16:20]}-{sid[20:]}z"):
        record = logging.LogRecord(
            "mcp.server.streamable_http", logging.INFO, __file__, 1, "unknown session %s", (said,), None
        )
        assert SessionIdFilter().filter(record) is not False
        assert sid[:8] not in record.getMessage(), record.getMessage()
