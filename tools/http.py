"""`http.request` on the shared httpx client, and the HTTP failure kinds every adapter uses."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tools.clients import ClientPool, PrivateAddressError
from tools.context import JSON, ErrorKind, TaskFailure, ToolContext
from tools.registry import ToolSpec

KEPT_HEADERS = (
    "content-type",
    "content-length",
    "etag",
    "last-modified",
    "location",
    "retry-after",
    "date",
    "cache-control",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
)
"""Response headers worth an assistant's context; the rest are dropped."""


def failure_for_status(status: int, headers: Mapping[str, str], what: str, result: JSON | None = None) -> TaskFailure:
    """An upstream HTTP error as a task failure whose kind says what to do about it."""
    if status == 429 or (status == 403 and headers.get("x-ratelimit-remaining") == "0"):
        reset = headers.get("x-ratelimit-reset")
        retry = headers.get("retry-after")
        when = f"; the limit resets at epoch {reset}" if reset else f"; retry after {retry} s" if retry else ""
        return TaskFailure(ErrorKind.RATE_LIMITED, f"{what} was rate limited (HTTP {status}){when}", result)
    if status in (401, 403):
        return TaskFailure(
            ErrorKind.AUTH, f"{what} was refused (HTTP {status}): check the credentials and their scopes", result
        )
    if status == 404:
        return TaskFailure(ErrorKind.NOT_FOUND, f"{what} found nothing (HTTP 404)", result)
    return TaskFailure(ErrorKind.HTTP_STATUS, f"{what} failed with HTTP {status}", result)


def failure_for_transport(exc: httpx.TransportError, what: str) -> TaskFailure:
    if isinstance(exc, httpx.TimeoutException):
        return TaskFailure(ErrorKind.TIMEOUT, f"{what} timed out ({type(exc).__name__})")
    return TaskFailure(ErrorKind.CONNECTION, f"{what} could not connect: {type(exc).__name__}: {exc}")


class HttpArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] = "GET"
    url: Annotated[str, Field(pattern=r"^https?://", description="http:// or https:// URL.")]
    headers: dict[str, str] = {}
    query: dict[str, str | int | float | bool] = {}
    json_body: Annotated[Any, Field(alias="json", description="Sent as JSON (not with body).")] = None
    body: Annotated[str | None, Field(description="Raw request body (not with json).")] = None
    timeout_s: Annotated[float, Field(gt=0, le=600)] = 30.0
    max_bytes: Annotated[int, Field(ge=0, le=10 * 1024 * 1024, description="Most bytes of body kept.")] = 65536

    @model_validator(mode="after")
    def _one_body(self) -> HttpArgs:
        if self.json_body is not None and self.body is not None:
            raise ValueError("give json or body, not both")
        return self


async def request(args: HttpArgs, ctx: ToolContext, pool: ClientPool) -> JSON:
    client = pool.http()
    pool.served("http")
    started = time.monotonic()
    what = f"{args.method} {args.url}"
    try:
        async with client.stream(
            args.method,
            args.url,
            headers=args.headers,
            params=args.query or None,
            json=args.json_body,
            content=args.body,
            timeout=args.timeout_s,
        ) as response:
            body, truncated = await _read_bounded(response, args.max_bytes)
    except PrivateAddressError as exc:
        raise TaskFailure(ErrorKind.REFUSED, f"{what} refused: {exc}") from exc
    except httpx.TransportError as exc:
        raise failure_for_transport(exc, what) from exc
    except httpx.HTTPError as exc:  # invalid URL, redirect loops, ...
        raise TaskFailure(ErrorKind.HTTP_STATUS, f"{what} failed: {type(exc).__name__}: {exc}") from exc
    result: JSON = {
        "status": response.status_code,
        "url": str(response.url),
        "headers": {name: response.headers[name] for name in KEPT_HEADERS if name in response.headers},
        "body": body.decode(response.encoding or "utf-8", errors="replace"),
        "truncated": truncated,
        "elapsed_s": round(time.monotonic() - started, 4),
    }
    if response.status_code >= 400:
        raise failure_for_status(response.status_code, response.headers, what, result)
    return result


async def _read_bounded(response: httpx.Response, max_bytes: int) -> tuple[bytes, bool]:
    kept = bytearray()
    async for chunk in response.aiter_bytes():
        kept += chunk
        if len(kept) > max_bytes:
            return bytes(kept[:max_bytes]), True
    return bytes(kept), False


def http_specs(pool: ClientPool) -> list[ToolSpec]:
    async def handler(args: HttpArgs, ctx: ToolContext) -> JSON:
        return await request(args, ctx, pool)

    return [
        ToolSpec(
            name="http.request",
            description="HTTP request on a shared keep-alive client; body bounded by max_bytes. GET/HEAD are cached.",
            input_model=HttpArgs,
            handler=handler,
            cacheable=True,
            cache_if=lambda args: args.method in ("GET", "HEAD"),
            open_world=True,
            max_concurrency=32,
            limit_group="http",
        )
    ]
