"""Real HTTP servers on 127.0.0.1 that imitate the GitHub REST and Anthropic Messages APIs closely
enough for the adapters: ETag/304, rate limits with reset headers, 5xx, slow answers, auth.

Each counts requests and the TCP connections they arrived on (distinct client ports).
"""

from __future__ import annotations

import hashlib
import json
import socket
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

GITHUB_TOKEN = "ghp_test_token_0123456789abcdef"
ANTHROPIC_KEY = "sk-ant-test-key-0123456789abcdef"


class Traffic:
    def __init__(self) -> None:
        self.connections: set[tuple[str, int]] = set()
        self.requests: Counter[str] = Counter()
        self.not_modified = 0

    def wrap(self, app: ASGIApp) -> ASGIApp:
        async def counted(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                self.connections.add(tuple(scope["client"]))  # type: ignore[arg-type]
                self.requests[f"{scope['method']} {scope['path']}"] += 1
            await app(scope, receive, send)

        return counted


@asynccontextmanager
async def serve(app: ASGIApp, *, lifespan: Literal["on", "off"] = "off") -> AsyncIterator[tuple[str, Traffic]]:
    traffic = Traffic()
    config = uvicorn.Config(traffic.wrap(app), log_level="warning", lifespan=lifespan, timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    # The socket listens before the server runs: connections wait in its backlog, so nothing waits for startup.
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    with listener:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [listener])
            try:
                yield f"http://127.0.0.1:{port}", traffic
            finally:
                server.should_exit = True


def _issue(owner: str, repo: str, number: int) -> dict[str, Any]:
    return {
        "number": number,
        "title": f"Issue {number} of {owner}/{repo}",
        "state": "open",
        "user": {"login": "octocat", "id": 1},
        "labels": [{"name": "bug", "color": "f00"}],
        "assignees": [{"login": "hubot"}],
        "comments": 2,
        "created_at": "2026-11-01T00:00:00Z",
        "updated_at": "2026-11-02T00:00:00Z",
        "closed_at": None,
        "html_url": f"https://github.example/{owner}/{repo}/issues/{number}",
        "body": "It breaks.\n" * 3,
        "node_id": "X",
        "reactions": {"+1": 3},
    }


class SlowReads:
    """Reads of the `slow` repo wait here until `until()` returns — by default until the test calls
    `release()` — counting how many wait at once, so a test sees the client's concurrency as events."""

    def __init__(self, until: Callable[[], Awaitable[object]] | None = None) -> None:
        self.released = anyio.Event()
        self._until = until or self.released.wait
        self.in_flight = 0
        self.most_in_flight = 0
        self._reached: dict[int, anyio.Event] = {}

    def release(self) -> None:
        self.released.set()

    async def wait_in_flight(self, count: int, timeout_s: float = 10) -> None:
        with anyio.fail_after(timeout_s):
            await self._reached.setdefault(count, anyio.Event()).wait()

    async def hold(self) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        self._reached.setdefault(self.in_flight, anyio.Event()).set()
        try:
            await self._until()
        finally:
            self.in_flight -= 1


def github_app(slow: SlowReads | None = None) -> Starlette:
    slow = slow or SlowReads()

    async def guarded(request: Request) -> Response | None:
        repo = request.path_params.get("repo", "")
        if request.headers.get("authorization") != f"token {GITHUB_TOKEN}":
            return JSONResponse({"message": "Bad credentials"}, status_code=401)
        if repo == "limited":
            return JSONResponse(
                {"message": "API rate limit exceeded"},
                status_code=403,
                headers={"x-ratelimit-remaining": "0", "x-ratelimit-reset": "1900000000"},
            )
        if repo == "broken":
            return JSONResponse({"message": "Server Error"}, status_code=500)
        if repo == "missing":
            return JSONResponse({"message": "Not Found"}, status_code=404)
        if repo == "slow":
            await slow.hold()
        return None

    async def with_etag(request: Request, payload: Any) -> Response:
        body = json.dumps(payload).encode()
        etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
        if request.headers.get("if-none-match") == etag:
            request.app.state.traffic_not_modified += 1
            return Response(status_code=304, headers={"etag": etag})
        return Response(
            body, media_type="application/json", headers={"etag": etag, "cache-control": "private, max-age=60"}
        )

    async def issue(request: Request) -> Response:
        p = request.path_params
        return await guarded(request) or await with_etag(request, _issue(p["owner"], p["repo"], int(p["number"])))

    async def comments(request: Request) -> Response:
        per_page = int(request.query_params.get("per_page", 30))
        rows = [
            {
                "id": i,
                "user": {"login": "octocat"},
                "body": f"comment {i}",
                "created_at": "2026-11-03T00:00:00Z",
                "html_url": "https://github.example/c",
            }
            for i in range(per_page)
        ]
        return await guarded(request) or JSONResponse(rows)

    async def issues(request: Request) -> Response:
        p = request.path_params
        state = request.query_params.get("state", "open")
        labels = request.query_params.get("labels", "")
        rows = [
            _issue(p["owner"], p["repo"], n) | {"state": state, "labels": [{"name": x} for x in labels.split(",") if x]}
            for n in range(1, 4)
        ]
        return await guarded(request) or JSONResponse(rows)

    async def pull(request: Request) -> Response:
        p = request.path_params
        data = _issue(p["owner"], p["repo"], int(p["number"])) | {
            "pull_request": {},
            "draft": False,
            "merged": False,
            "mergeable": True,
            "head": {"ref": "feature"},
            "base": {"ref": "main"},
            "additions": 10,
            "deletions": 2,
            "changed_files": 1,
        }
        return await guarded(request) or JSONResponse(data)

    async def files(request: Request) -> Response:
        rows = [
            {
                "filename": "a.py",
                "status": "modified",
                "additions": 10,
                "deletions": 2,
                "changes": 12,
                "patch": "@@ -1 +1 @@\n-x\n+y",
                "sha": "abc",
            }
        ]
        return await guarded(request) or JSONResponse(rows)

    async def runs(request: Request) -> Response:
        data = {
            "total_count": 1,
            "workflow_runs": [
                {
                    "id": 7,
                    "name": "CI",
                    "status": "completed",
                    "conclusion": "success",
                    "event": "push",
                    "head_branch": "main",
                    "head_sha": "abc",
                    "created_at": "2026-11-03T00:00:00Z",
                    "html_url": "https://github.example/r/7",
                    "extra": 1,
                }
            ],
        }
        return await guarded(request) or JSONResponse(data)

    async def add_labels(request: Request) -> Response:
        names = (await request.json())["labels"]
        return await guarded(request) or JSONResponse([{"name": "bug"}] + [{"name": n} for n in names])

    async def comment(request: Request) -> Response:
        body = (await request.json())["body"]
        return await guarded(request) or JSONResponse(
            {
                "id": 99,
                "user": {"login": "octocat"},
                "body": body,
                "created_at": "2026-11-04T00:00:00Z",
                "html_url": "https://github.example/c/99",
            },
            status_code=201,
        )

    base = "/repos/{owner}/{repo}"
    app = Starlette(
        routes=[
            Route(base + "/issues/{number:int}", issue),
            Route(base + "/issues/{number:int}/comments", comments, methods=["GET"]),
            Route(base + "/issues/{number:int}/comments", comment, methods=["POST"]),
            Route(base + "/issues/{number:int}/labels", add_labels, methods=["POST"]),
            Route(base + "/issues", issues),
            Route(base + "/pulls/{number:int}", pull),
            Route(base + "/pulls/{number:int}/files", files),
            Route(base + "/actions/runs", runs),
        ]
    )
    app.state.traffic_not_modified = 0
    return app


def anthropic_app() -> Starlette:
    async def messages(request: Request) -> Response:
        sent = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
        if sent != ANTHROPIC_KEY:
            return JSONResponse(
                {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}},
                status_code=401,
            )
        body = await request.json()
        if body["model"] == "limited":
            return JSONResponse(
                {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}},
                status_code=429,
                headers={"retry-after": "1"},
            )
        last = body["messages"][-1]["content"]
        return JSONResponse(
            {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "model": body["model"],
                "content": [{"type": "text", "text": f"echo: {last}"}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": 5, "output_tokens": 7},
            }
        )

    return Starlette(routes=[Route("/v1/messages", messages, methods=["POST"])])


def plain_app() -> Starlette:
    async def hello(request: Request) -> Response:
        return Response(
            "hello " * int(request.query_params.get("n", 1)),
            media_type="text/plain",
            headers={"etag": '"v1"', "x-secret-header": "not kept"},
        )

    async def hang(request: Request) -> Response:
        await anyio.sleep_forever()  # never answers: the client's timeout is what ends the request
        raise AssertionError("unreachable")

    async def echo(request: Request) -> Response:
        return JSONResponse({"got": (await request.body()).decode(), "method": request.method})

    async def missing(request: Request) -> Response:
        return Response("nope", status_code=404)

    return Starlette(
        routes=[
            Route("/hello", hello, methods=["GET", "HEAD"]),
            Route("/hang", hang),
            Route("/echo", echo, methods=["POST", "PUT"]),
            Route("/missing", missing),
        ]
    )
