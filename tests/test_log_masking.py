"""What a caller sends stays out of the server's log, even at DEBUG (issue 22, item 6): a header given to
`http.request` (the SDK logs SSE request bodies at DEBUG), a URL's query values and user info (httpx logs
every URL at INFO). A real `offload-mcp` subprocess, a real HTTP server on 127.0.0.1, the SDK's client."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from test_http import ALICE, connect, tool

from server.redact import RedactingFilter, Redactor, mask_log_text
from testkit.fakes import serve
from testkit.rawserver import served_log, server_env

pytestmark = pytest.mark.anyio

SECRETS = {
    "Authorization": "Bearer auth-secret-4711",
    "Proxy-Authorization": "Basic proxy-secret-4712",
    "X-Api-Key": "api-key-secret-4713",
    "Cookie": "sid=cookie-secret-4714",
    "X-Session-Token": "token-secret-4715",
}
QUERY = "q=query-secret-4716&sig=sig-secret-4717"
USERINFO = "user:userinfo-secret-4718"


async def echo(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


@pytest.mark.parametrize("transport", ["sse", "http"])
async def test_headers_and_query_values_never_reach_the_debug_log(tmp_path: Path, transport: str) -> None:
    env = {**server_env(tmp_path), "OFFLOAD_LOG_LEVEL": "DEBUG", "OFFLOAD_AUTH_TOKEN": ALICE}
    log = bytearray()
    async with serve(Starlette(routes=[Route("/x", echo)])) as (base, traffic):
        process = await anyio.open_process(
            [sys.executable, "-m", "server", "--transport", transport, "--port", "0"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            url, seen = await served_log(process)
            log += seen.encode()
            async with anyio.create_task_group() as tg:

                async def drain() -> None:
                    assert process.stderr is not None
                    async for piece in process.stderr:
                        log.extend(piece)

                tg.start_soon(drain)
                target = base.replace("://", f"://{USERINFO}@") + f"/x?{QUERY}"
                async with connect(url, ALICE) as client:
                    arguments = {"url": target, "headers": SECRETS}
                    fired = await tool(client, "fire_tool", tool="http.request", arguments=arguments, wait_s=10)
                assert fired["status"] == "completed", fired
                process.terminate()
                with anyio.fail_after(10):
                    await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
            await process.aclose()
    assert traffic.requests["GET /x"] == 1
    text = log.decode()
    assert "HTTP Request: GET http://***@127.0.0.1:" in text and "/x?q=***&sig=***" in text, text
    assert "secret-47" not in text, text  # every value above holds it


@pytest.mark.parametrize(
    ("said", "secret"),
    [
        ('Received JSON: b\'{"headers":{"authorization":"Bearer b1b2b3b4"}}\'', "b1b2b3b4"),
        ("arguments={'headers': {'Cookie': 'a=c1c2c3; b=c4'}}", "c1c2c3"),
        ("[(b'x-api-key', b'k1k2k3k4'), (b'host', b'h')]", "k1k2k3k4"),
        ('{\\"Proxy-Authorization\\": \\"Basic p1p2p3p4\\"}', "p1p2p3p4"),
        ("Authorization: Bearer t1t2t3t4\r\nHost: h", "t1t2t3t4"),
        ("env GITHUB_TOKEN=g1g2g3g4 ran", "g1g2g3g4"),
        ("GET https://u:w1w2w3w4@example.test/a?x=1 done", "w1w2w3w4"),
        ("GET https://example.test/a?page=q1q2q3q4#top done", "q1q2q3q4"),
    ],
)
def test_secret_shapes_are_masked_in_any_logger(said: str, secret: str) -> None:
    record = logging.LogRecord("httpx", logging.DEBUG, __file__, 1, "%s", (said,), None)
    assert RedactingFilter(Redactor()).filter(record)
    assert secret not in record.getMessage(), record.getMessage()


def test_ordinary_lines_stay_readable() -> None:
    for said in ("KeyError: 'x'", "a non-loopback bind needs a bearer token for every owner", "GET https://h/a"):
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "%s", (said,), None)
        assert RedactingFilter(Redactor()).filter(record)
        assert record.getMessage() == said


@pytest.mark.parametrize("line", ["a." * 32768, "a-" * 32768, '"k":"' * 13000, "x:" * 32768, "a://" * 16384])
def test_masking_stays_linear_on_long_lines(line: str) -> None:
    """A backtracking name pattern took minutes on 64 KiB of `a.a.a.` (DEBUG logs carry whole bodies)."""
    started = time.perf_counter()
    mask_log_text(line)
    assert time.perf_counter() - started < 2
