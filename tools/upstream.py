"""Proxy mode: other MCP servers' tools as fireable tools `NAME.tool`.

One long-lived client session per configured upstream (`Upstream`), kept by a supervisor task:
started on first use (or at start with `start = "eager"`), restarted with backoff after it dies,
given up on after `GIVE_UP_AFTER` quick deaths in a row with a message quoting its last stderr
lines. A stdio upstream runs in its own session (process group) with an environment of its own
config plus a minimal base, never Offload's; it is stopped when Offload stops (stdin closed, then
TERM and KILL to the group), and its pid is recorded on every task it serves so that a restart
after a `kill -9` of Offload ends it if closing its stdin did not.

A call carries a progress token: progress and log messages become output lines. The call's
result becomes the task's result; `isError` fails it `upstream_error`; an upstream that dies
mid-call fails it `upstream_exited` with its stderr tail. Nothing is retried. Cancelling the
task abandons the request, which sends `notifications/cancelled`; the task's own `timeout_s`
applies, never a request timeout of the client.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import math
import os
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import anyio.abc
import httpx2
import mcp_types as types
from jsonschema import validators
from jsonschema.exceptions import SchemaError
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from pydantic import BaseModel, ConfigDict, model_validator
from referencing import Registry, Resource
from referencing.exceptions import NoSuchResource, Unresolvable

from tools.context import JSON, ErrorKind, ProcessInfo, TaskFailure, ToolContext
from tools.registry import ToolSpec
from tools.upstream_lines import MAX_MESSAGE_BYTES, MESSAGE_TOO_LARGE, too_large
from tools.upstream_sse import capped_client_factory
from tools.upstream_stdio import StdioProcess, TransportStreams
from tools.upstream_stdio import UpstreamUnavailable as UpstreamUnavailable

log = logging.getLogger(__name__)

BASE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TERM", "TZ", "TMPDIR", "USER", "LOGNAME", "SHELL")
"""What an upstream inherits from Offload's environment; everything else comes from its config."""
STDERR_LINES = 20
"""Lines of an upstream's stderr kept for error messages."""
START_TIMEOUT_S = 30.0
QUICK_DEATH_S = 10.0
"""A session that ends sooner than this after it was ready (or never became ready) died quickly."""
GIVE_UP_AFTER = 3
HEALTH_TIMEOUT_S = 10.0
MAX_SCHEMA_BYTES = 256 * 1024
MAX_RESULT_BYTES = 1024 * 1024
"""A bigger result is written to the task's output (read it by offset) and the result says so."""
LIST_WAIT_S = 3.0
"""How long `list_fireable_tools` waits, in all, for the lazy upstreams it starts to list their tools."""
BACKOFF_S = (0.5, 30.0)
"""First and longest wait before a dead upstream is started again (doubling in between)."""
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


# ---- configuration (built by the server from Settings) ----


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """One `[mcp_servers.NAME]` table (or one entry of an `mcpServers` file)."""

    name: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    """Given to the process on top of BASE_ENV; `${VAR}` is replaced by Offload's own VAR (deliberately)."""
    cwd: str | None = None
    url: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    transport: Literal["stdio", "http", "sse"] = "stdio"
    tools: tuple[str, ...] = ("*",)
    """Globs of the upstream's tool names to offer."""
    timeout_s: float | None = None
    max_concurrency: int | None = None
    start: Literal["lazy", "eager"] = "lazy"
    cacheable: tuple[str, ...] = ()
    """Globs of tools whose results may be reused although the upstream does not annotate them so."""
    health_check_s: float | None = 60.0
    """How often the session is checked with a `tools/list`; None: only a process exit ends it."""
    max_message_bytes: int = MAX_MESSAGE_BYTES
    """One message from the upstream; a bigger one fails the call it answers (the session goes on)."""


@dataclass(frozen=True, slots=True)
class UpstreamsConfig:
    servers: Mapping[str, UpstreamConfig] = field(default_factory=dict)
    allowed: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Owner → globs of the upstreams it may use; an owner not named here may use every one."""
    kill_grace_s: float = 1.0
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)


class UnknownUpstreamTool(Exception):
    """`NAME.tool` names a running upstream that offers no such tool."""

    def __init__(self, tool: str, offered: list[str]) -> None:
        super().__init__(tool)
        self.tool = tool
        self.offered = offered


# ---- one session ----


@dataclass(slots=True)
class _Session:
    """One generation of an upstream: its client, its process, and how it ended."""

    client: Client
    process: ProcessInfo | None
    ended: anyio.Event = field(default_factory=anyio.Event)
    relist: anyio.Event = field(default_factory=anyio.Event)
    ready_at: float = 0.0
    unhealthy: str | None = None


class Upstream:
    """One configured MCP server: its supervisor loop, its current session and its tools."""

    def __init__(self, config: UpstreamConfig, owner: UpstreamSet) -> None:
        self.config = config
        self._set = owner
        self.specs: dict[str, ToolSpec] = {}
        """Offered tool name (upstream's own) → spec; empty until the first listing."""
        self.listed = False
        self.current: _Session | None = None
        self.failure: str | None = None
        """Why the last start or session failed (status and stderr tail)."""
        self.given_up: str | None = None
        self.attempts = 0
        self.failed_starts = 0
        self.stderr: deque[str] = deque(maxlen=STDERR_LINES)
        self._wanted = anyio.Event()
        self._changed = anyio.Event()
        self._limiter = None if config.max_concurrency is None else anyio.CapacityLimiter(config.max_concurrency)
        self._in_flight: dict[str, ToolContext] = {}
        self._process: StdioProcess | None = None

    def __repr__(self) -> str:
        state = "given up" if self.given_up else "ready" if self.current else "down"
        return f"<Upstream {self.config.name} {state} tools={len(self.specs)} attempts={self.attempts}>"

    # ---- state ----

    def _tell(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def want(self) -> None:
        self._wanted.set()

    async def ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Starts the upstream if need be and waits until its tools are known; raises UpstreamUnavailable
        if it was given up on, or if a start attempt made while waiting failed."""
        self.want()
        failed_starts = self.failed_starts
        with anyio.move_on_after(timeout_s):
            while True:
                if self.given_up is not None:
                    raise UpstreamUnavailable(self.given_up)
                if self.current is not None and self.listed:
                    return
                if self.failed_starts > failed_starts and self.failure is not None:
                    raise UpstreamUnavailable(self.failure)
                await self._changed.wait()
        raise UpstreamUnavailable(f"MCP server {self.config.name!r} did not become ready within {timeout_s:g} s")

    async def session(self) -> _Session:
        """The live session, waiting (bounded by the task's deadline) while one is being started."""
        self.want()
        while True:
            if self.given_up is not None:
                raise TaskFailure(ErrorKind.UPSTREAM_EXITED, self.given_up)
            current = self.current
            if current is not None and not current.ended.is_set():
                return current
            await self._changed.wait()

    # ---- the supervisor ----

    async def supervise(self) -> None:
        await self._wanted.wait()
        quick_deaths = 0
        delay_s = BACKOFF_S[0]
        while True:
            self.attempts += 1
            started = time.monotonic()
            ready_at = await self._serve_once()
            lived_s = 0.0 if ready_at is None else time.monotonic() - ready_at
            # Only failed starts count toward giving up: a call that crashes a ready upstream must not let one
            # owner switch it off for every owner. A quick death still backs off.
            quick_deaths = quick_deaths + 1 if ready_at is None else 0
            if ready_at is not None and lived_s >= QUICK_DEATH_S:
                delay_s = BACKOFF_S[0]
            log.warning(
                "MCP server %r stopped after %.1f s: %s", self.config.name, time.monotonic() - started, self.failure
            )
            if quick_deaths >= GIVE_UP_AFTER:
                self.given_up = (
                    f"MCP server {self.config.name!r} was given up on after {quick_deaths} failed starts in a row; "
                    f"the last: {self.failure}. Fix its configuration and restart Offload"
                )
                log.error("%s", self.given_up)
                self._tell()
                return
            self._tell()
            await anyio.sleep(delay_s)
            delay_s = min(delay_s * 2, BACKOFF_S[1])

    async def _serve_once(self) -> float | None:
        """Runs one session until it ends; returns when it became ready (None if it never did)."""
        self.stderr.clear()
        self._process = None
        ready_at: float | None = None
        exited = anyio.Event()
        try:
            with anyio.CancelScope(deadline=anyio.current_time() + START_TIMEOUT_S) as starting:
                async with AsyncExitStack() as stack:
                    process, streams = await stack.enter_async_context(self._transport(exited))
                    client = Client(
                        _Streams(streams),
                        mode="auto",
                        read_timeout_seconds=None,  # the task's timeout_s applies, never a request timeout
                        logging_callback=self._on_log,
                        message_handler=self._on_message,
                        log_level="info",
                        cache=None,
                    )
                    await stack.enter_async_context(client)
                    session = _Session(client, process)
                    await self._list(session)
                    starting.deadline = math.inf
                    ready_at = session.ready_at = time.monotonic()
                    self.current, self.failure = session, None
                    self._tell()
                    log.info("MCP server %r ready: %d tools offered", self.config.name, len(self.specs))
                    await self._serve(session, exited)
                    ended = session.unhealthy or ("exited" if self._exit_status() else "closed the connection")
                    self.failure = self._describe_end(ended)
            if starting.cancelled_caught and ready_at is None:
                self.failure = self._describe_end(f"did not become ready within {START_TIMEOUT_S:g} s")
        except Exception as exc:  # a start that failed, or a connection that broke
            log.debug("MCP server %r session ended: %r", self.config.name, exc)
            what = "failed to start" if ready_at is None else "broke the connection"
            self.failure = self._describe_end(f"{what} ({type(exc).__name__}: {_first_line(exc)})")
        finally:
            if self.current is not None:
                self.current.ended.set()
                self.current = None
            self._tell()
        if ready_at is None:
            self.failed_starts += 1
        return ready_at

    async def _serve(self, session: _Session, exited: anyio.Event) -> None:
        """Until the process exits: lists the tools again whenever the upstream says they changed."""
        async with anyio.create_task_group() as tg:

            async def end_on_exit() -> None:
                await exited.wait()
                session.ended.set()

            tg.start_soon(end_on_exit)
            tg.start_soon(_listen, session, self.config.name)
            tg.start_soon(_check_health, session, self.config.health_check_s)
            while not session.ended.is_set():
                await _first(session.ended, session.relist)
                if session.relist.is_set() and not session.ended.is_set():
                    session.relist = anyio.Event()
                    await self._relist(session)
            tg.cancel_scope.cancel()

    def _exit_status(self) -> str | None:
        return None if self._process is None else self._process.exit_status

    def _describe_end(self, what: str) -> str:
        status = f" ({self._exit_status()})" if self._exit_status() else ""
        tail = "\n".join(self.stderr)
        told = f"; its last stderr lines:\n{tail}" if tail else "; it wrote nothing to stderr"
        return f"MCP server {self.config.name!r} {what}{status}{told}"

    async def _list(self, session: _Session) -> None:
        tools: list[types.Tool] = []
        cursor: str | None = None
        while True:
            page = await session.client.list_tools(cursor=cursor, cache_mode="bypass")
            tools.extend(page.tools)
            cursor = page.next_cursor
            if not cursor:
                break
        offered = [tool for tool in tools if any(fnmatch.fnmatchcase(tool.name, g) for g in self.config.tools)]
        offered = [tool for tool in offered if _schema_fits(self.config.name, tool)]
        self.specs = {tool.name: _tool_spec(self, tool) for tool in offered}
        self.listed = True

    async def _relist(self, session: _Session) -> None:
        try:
            await self._list(session)
            log.info("MCP server %r changed its tools: %d offered", self.config.name, len(self.specs))
            self._set.tools_changed()
        except Exception:
            log.exception("listing the tools of MCP server %r again failed", self.config.name)

    # ---- transports ----

    @asynccontextmanager
    async def _transport(self, exited: anyio.Event) -> AsyncIterator[tuple[ProcessInfo | None, TransportStreams]]:
        config, environ = self.config, self._set.config.environ
        if config.command is None:
            async with _http_transport(config, environ) as streams:
                yield None, streams
            return
        argv, env = [config.command, *config.args], upstream_env(config, environ)
        grace_s, cap = self._set.config.kill_grace_s, config.max_message_bytes
        self._process = StdioProcess(config.name, argv, env, config.cwd, grace_s, self.stderr, cap)
        async with self._process.open(exited) as opened:
            yield opened

    # ---- notifications ----

    async def _on_log(self, params: types.LoggingMessageNotificationParams) -> None:
        """Log messages carry no request id: they go to the calls in flight on this upstream only when all
        of those are one owner's (never one owner's log line in another's output); else to our log."""
        _share_log_line(self.config.name, params, list(self._in_flight.values()))

    async def _on_message(self, message: Any) -> None:
        if isinstance(message, types.ToolListChangedNotification) and self.current is not None:
            self.current.relist.set()

    # ---- the tools ----

    def check_owner(self, owner: str) -> None:
        self._set.check_owner(self.config.name, owner)

    async def call(self, tool: str, arguments: JSON, ctx: ToolContext) -> JSON:
        """One `tools/call` on the live session, raced against the session's end."""
        async with self._limiter or _no_limit():
            session = await self.session()
            if session.process is not None:
                ctx.set_process(session.process)  # a restart after kill -9 of Offload ends it by this
            self._in_flight[ctx.task_id] = ctx
            try:
                return await self._call_on(session, tool, arguments, ctx)
            finally:
                self._in_flight.pop(ctx.task_id, None)

    async def _call_on(self, session: _Session, tool: str, arguments: JSON, ctx: ToolContext) -> JSON:
        result, error = await _call_raced(session, tool, arguments, ctx)
        _fail_if_too_large(self.config, tool, error)
        grace_s = self._set.config.kill_grace_s + 1
        if result is None and not session.ended.is_set() and _connection_lost(error):
            with anyio.move_on_after(grace_s):  # a pipe closes before the exit is seen
                await session.ended.wait()
        if result is None and session.ended.is_set():
            with anyio.move_on_after(grace_s):
                while self.current is session:  # until the supervisor has recorded how it ended
                    await self._changed.wait()
            ended = self.failure or self._describe_end("exited")
            lost = f"the call to {self.config.name}.{tool} was lost (not retried)"
            raise TaskFailure(ErrorKind.UPSTREAM_EXITED, f"{lost}: {ended}")
        if result is None and self.config.url is not None and _connection_lost(error):
            lost = f"MCP server {self.config.name!r} at {self.config.url} was lost"
            raise TaskFailure(ErrorKind.CONNECTION, f"{lost}: {error}")
        if result is None:
            raise TaskFailure(ErrorKind.UPSTREAM_ERROR, f"MCP server {self.config.name!r} refused the call: {error}")
        return _as_result(self.config.name, tool, result, ctx)


async def _call_raced(
    session: _Session, tool: str, arguments: JSON, ctx: ToolContext
) -> tuple[types.CallToolResult | None, Exception | None]:
    """One `tools/call`, its progress written as output lines, abandoned if the session ends first."""

    async def progress(progress: float, total: float | None, message: str | None) -> None:
        of = f"/{total:g}" if total is not None else ""
        ctx.write_output(f"progress {progress:g}{of}{': ' + message if message else ''}\n".encode())

    result: types.CallToolResult | None = None
    error: Exception | None = None
    async with anyio.create_task_group() as tg:

        async def end_with_session() -> None:
            await session.ended.wait()
            tg.cancel_scope.cancel()

        tg.start_soon(end_with_session)
        try:
            result = await session.client.call_tool(tool, arguments, progress_callback=progress)
        except (MCPError, anyio.ClosedResourceError, anyio.BrokenResourceError, OSError) as exc:
            error = exc
        tg.cancel_scope.cancel()
    return result, error


@asynccontextmanager
async def _http_transport(config: UpstreamConfig, environ: Mapping[str, str]) -> AsyncIterator[TransportStreams]:
    assert config.url is not None
    headers = {name: _expand(value, environ) for name, value in config.headers.items()}
    if config.transport == "sse":
        factory = capped_client_factory(config.name, config.max_message_bytes)
        async with sse_client(config.url, headers=headers, httpx_client_factory=factory) as streams:
            yield streams
        return
    async with (
        httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0, read=None)) as http,
        streamable_http_client(config.url, http_client=http, max_sse_event_size=config.max_message_bytes) as streams,
    ):
        yield streams


def _share_log_line(server: str, params: types.LoggingMessageNotificationParams, in_flight: list[ToolContext]) -> None:
    data = params.data if isinstance(params.data, str) else json.dumps(params.data, default=str)
    line = f"[{params.level}{' ' + params.logger if params.logger else ''}] {data}\n".encode()
    if len({ctx.owner for ctx in in_flight}) > 1:
        log.info("MCP server %r logged (calls of several owners in flight): %s", server, line[:500])
        return
    for ctx in in_flight:
        ctx.write_output(line)


def _schema_fits(server: str, tool: types.Tool) -> bool:
    """A tool whose schema is over MAX_SCHEMA_BYTES is not offered: its catalog entry alone would cost an
    assistant's whole context, and building its checker would hold up every other call."""
    size_bytes = len(json.dumps(tool.input_schema, default=str))
    if size_bytes <= MAX_SCHEMA_BYTES:
        return True
    log.warning(
        "not offering %s.%s: its input schema is %d bytes (most: %d)", server, tool.name, size_bytes, MAX_SCHEMA_BYTES
    )
    return False


async def _check_health(session: _Session, interval_s: float | None) -> None:
    """Every `health_check_s`: a `tools/list` (both protocol eras answer it) within twice that, at most
    HEALTH_TIMEOUT_S; an upstream that does not answer is taken for dead, stopped and started again."""
    if interval_s is None:
        return
    timeout_s = min(2 * interval_s, HEALTH_TIMEOUT_S)
    while True:
        await anyio.sleep(interval_s)
        try:
            with anyio.fail_after(timeout_s):
                await session.client.list_tools(cache_mode="bypass")
        except Exception as exc:  # a timeout, or a broken connection (an HTTP upstream that went away)
            what = "no answer" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {_first_line(exc)}"
            session.unhealthy = f"failed a health check (tools/list: {what} within {timeout_s:g} s)"
            session.ended.set()
            return


async def _listen(session: _Session, name: str) -> None:
    """2026-07-28 servers tell of a changed tool list on a `subscriptions/listen` stream only (older ones
    send the notification unasked: `_on_message`)."""
    tools = session.client.server_capabilities.tools
    if session.client.protocol_version < "2026" or tools is None or not tools.list_changed:
        return
    try:
        async with session.client.listen(tools_list_changed=True) as events:
            async for _event in events:
                session.relist.set()
    except Exception as exc:  # the session ended, or the server will not listen: no refreshes then
        log.debug("MCP server %r: no tool list changes heard any more: %r", name, exc)


def _tool_spec(upstream: Upstream, tool: types.Tool) -> ToolSpec:
    config = upstream.config
    schema = dict(tool.input_schema or {"type": "object"})
    hints = tool.annotations
    read_only = hints is not None and hints.read_only_hint is True
    idempotent = hints is not None and hints.idempotent_hint is True
    configured = any(fnmatch.fnmatchcase(tool.name, glob) for glob in config.cacheable)
    name = f"{config.name}.{tool.name}"

    async def handler(args: BaseModel, ctx: ToolContext) -> JSON:
        return await upstream.call(tool.name, args.model_dump(mode="json"), ctx)

    def check(_args: Any, owner: str) -> None:
        upstream.check_owner(owner)

    spec = ToolSpec(
        name=name,
        description=(tool.description or tool.title or f"{tool.name} of the MCP server {config.name}").strip(),
        input_model=arguments_model(name, schema),
        handler=handler,
        cacheable=(read_only and idempotent) or configured,
        destructive=not read_only and (hints is None or hints.destructive_hint is not False),
        open_world=hints is None or hints.open_world_hint is not False,
        default_timeout_s=config.timeout_s,
        note=f"from the MCP server {config.name!r}",
        check=check,
    )
    object.__setattr__(spec, "input_schema", schema)  # the upstream's own schema, as it gave it
    return spec


# ---- the set of upstreams: a source of fireable tools ----


class UpstreamSet:
    """Every configured upstream; the registry asks it for `NAME.tool` specs (see `Registry.add_source`)."""

    def __init__(self, config: UpstreamsConfig) -> None:
        self.config = config
        self.upstreams = {name: Upstream(server, self) for name, server in config.servers.items()}
        self.on_tools_changed: list[Callable[[], None]] = []
        self.list_wait_s = LIST_WAIT_S
        self._tg: anyio.abc.TaskGroup | None = None

    def __repr__(self) -> str:
        return f"<UpstreamSet {', '.join(map(repr, self.upstreams.values()))}>"

    async def __aenter__(self) -> UpstreamSet:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        for upstream in self.upstreams.values():
            self._tg.start_soon(upstream.supervise, name=f"offload upstream {upstream.config.name}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()  # each session's stop is shielded and bounded
        await self._tg.__aexit__(None, None, None)

    async def start_eager(self) -> None:
        """Starts every `start = "eager"` upstream and waits (bounded) for its tools; failures are logged."""

        async def start(upstream: Upstream) -> None:
            try:
                await upstream.ready()
            except UpstreamUnavailable as exc:
                log.error("%s", exc)  # noqa: TRY400 - the message says it all; no traceback

        async with anyio.create_task_group() as tg:
            for upstream in self.upstreams.values():
                if upstream.config.start == "eager":
                    tg.start_soon(start, upstream)

    async def start_for(self, owner: str) -> None:
        """Before a listing: starts the upstreams `owner` may use whose tools are not known yet (lazy ones, or
        eager ones still starting) and waits for them all at once, `list_wait_s` at most, so their tools are
        listed by name; one that fails or is still starting is listed as `NAME.*`, saying so."""

        async def start(upstream: Upstream) -> None:
            with contextlib.suppress(UpstreamUnavailable):  # its placeholder says why
                await upstream.ready(self.list_wait_s)

        waiting = [
            upstream
            for upstream in self.upstreams.values()
            if not upstream.listed and upstream.given_up is None and upstream.failure is None
        ]
        waiting = [upstream for upstream in waiting if self.allows(f"{upstream.config.name}.*", owner)]
        with anyio.move_on_after(self.list_wait_s):
            async with anyio.create_task_group() as tg:
                for upstream in waiting:
                    tg.start_soon(start, upstream)

    def upstream_of(self, tool: str) -> Upstream | None:
        server, dot, _ = tool.partition(".")
        return self.upstreams.get(server) if dot else None

    async def prepare(self, tool: str) -> None:
        """Before a fire of `NAME.tool`: the upstream is started and its tools known. Raises
        UpstreamUnavailable, or UnknownUpstreamTool naming the tools it offers."""
        upstream = self.upstream_of(tool)
        if upstream is None:
            return
        await upstream.ready()
        if tool.partition(".")[2] not in upstream.specs:
            raise UnknownUpstreamTool(tool, sorted(spec.name for spec in upstream.specs.values()))

    def check_owner(self, server: str, owner: str) -> None:
        allowed = self.config.allowed.get(owner)
        if allowed is not None and not any(fnmatch.fnmatchcase(server, glob) for glob in allowed):
            shown = ", ".join(allowed) or "none"
            raise ValueError(f"owner {owner!r} may not use the MCP server {server!r} (allowed: {shown})")

    def allows(self, tool: str, owner: str) -> bool:
        """Whether `owner` may see and fire `tool` (tools of no upstream: always)."""
        upstream = self.upstream_of(tool)
        if upstream is None:
            return True
        try:
            self.check_owner(upstream.config.name, owner)
        except ValueError:
            return False
        return True

    def referenced_variables(self) -> set[str]:
        """Offload's variables that configs hand to upstreams with `${VAR}`: their values are secrets to mask."""
        texts = [v for c in self.config.servers.values() for v in (*c.env.values(), *c.headers.values())]
        return {found.group(1) for text in texts for found in _ENV_REFERENCE.finditer(text)}

    def tools_changed(self) -> None:
        for listener in self.on_tools_changed:
            try:
                listener()
            except Exception:
                log.exception("a tools-changed listener raised")

    # ---- the registry's view ----

    def get(self, name: str) -> ToolSpec | None:
        upstream = self.upstream_of(name)
        return None if upstream is None else upstream.specs.get(name.partition(".")[2])

    def specs(self) -> Iterator[ToolSpec]:
        """The offered tools; an upstream whose tools are not known (starting, failing, or not started: an owner's
        listing starts its own) shows as one `NAME.*` entry saying so."""
        for upstream in self.upstreams.values():
            if upstream.listed:
                yield from upstream.specs.values()
            else:
                yield _placeholder(upstream)


def _placeholder(upstream: Upstream) -> ToolSpec:
    name = upstream.config.name
    why = upstream.given_up or upstream.failure
    if why is None and upstream.attempts > 0:  # a start under way
        why = "starting; call list_fireable_tools again in a few seconds for its tools"
    return ToolSpec(
        name=f"{name}.*",
        description=f"The tools of the MCP server {name!r}: fire_tool('{name}.TOOL', ...) starts it; "
        "list_fireable_tools shows its tools once it runs.",
        input_model=_AnyArguments,
        handler=_never,
        unavailable=why or "not started yet; fire one of its tools by name",
        note=why or "started on first use",
    )


async def _never(_args: BaseModel, _ctx: ToolContext) -> JSON:
    raise TaskFailure(ErrorKind.REFUSED, "a placeholder is never fired")


class _AnyArguments(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


def _refuse_remote(uri: str) -> Resource[Any]:
    """A schema's `$ref` to a URL is never fetched: an upstream must not make Offload send requests (or
    wait on a server that never answers)."""
    raise NoSuchResource(ref=uri)  # type: ignore[call-arg]  # an attrs class


_LOCAL_ONLY: Registry[Any] = Registry(retrieve=_refuse_remote)  # type: ignore[call-arg]


def arguments_model(tool: str, schema: JSON) -> type[BaseModel]:
    """A pydantic model that takes the arguments as they are once they fit the upstream's JSON Schema
    (checked with `jsonschema`, the draft the schema names, 2020-12 by default)."""
    try:
        validator_class = validators.validator_for(schema, default=validators.Draft202012Validator)
        validator_class.check_schema(schema)
        validator = validator_class(schema, registry=_LOCAL_ONLY)
    except SchemaError as exc:
        log.warning("the input schema of %s is not valid JSON Schema (%s); arguments are passed unchecked", tool, exc)
        return _AnyArguments

    class UpstreamArguments(_AnyArguments):
        @model_validator(mode="before")
        @classmethod
        def _fits_schema(cls, data: Any) -> Any:
            try:
                errors = sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
            except Unresolvable as exc:  # a $ref outside the schema: never fetched
                raise ValueError(f"the tool's schema refers to {exc}, which Offload does not fetch") from None
            problems = [
                f"{'.'.join(str(p) for p in error.absolute_path) or 'the arguments'}: {error.message}"
                for error in errors
            ]
            if problems:
                raise ValueError("; ".join(problems[:5]))
            return data

    UpstreamArguments.__name__ = UpstreamArguments.__qualname__ = f"Arguments of {tool}"
    return UpstreamArguments


def upstream_env(config: UpstreamConfig, environ: Mapping[str, str]) -> dict[str, str]:
    """BASE_ENV from Offload's environment, plus the config's `env` (with `${VAR}` filled in from it)."""
    env = {name: environ[name] for name in BASE_ENV if name in environ}
    env.update({name: _expand(value, environ) for name, value in config.env.items()})
    return env


def _expand(value: str, environ: Mapping[str, str]) -> str:
    """`${VAR}` → Offload's VAR (empty if unset): how a config hands an upstream a secret on purpose."""
    return _ENV_REFERENCE.sub(lambda found: environ.get(found.group(1), ""), value)


def _as_result(server: str, tool: str, result: types.CallToolResult, ctx: ToolContext) -> JSON:
    content = [block.model_dump(mode="json", by_alias=True, exclude_none=True) for block in result.content]
    value: JSON = {"server": server, "tool": tool, "content": content}
    if result.structured_content is not None:
        value["structured_content"] = result.structured_content
    encoded = json.dumps(value).encode()
    size_bytes = len(encoded)
    if size_bytes > MAX_RESULT_BYTES:  # replies stay bounded: the whole result is in the output, by offset
        ctx.write_output(encoded + b"\n")
        note = f"the result was {size_bytes} bytes: it is the task's output (read it by offset)"
        value = {
            "server": server,
            "tool": tool,
            "content": [],
            "truncated": True,
            "result_bytes": size_bytes,
            "note": note,
        }
    if result.is_error:
        text = " ".join(block.text for block in result.content if isinstance(block, types.TextContent))
        raise TaskFailure(
            ErrorKind.UPSTREAM_ERROR, f"{server}.{tool} reported an error: {text[:2000] or '(no text)'}", value
        )
    return value


class _Streams:
    """Already-open streams as a Transport for `mcp.Client` (the process is ours, not the SDK's)."""

    def __init__(self, streams: TransportStreams) -> None:
        self._streams = streams

    async def __aenter__(self) -> TransportStreams:
        return self._streams

    async def __aexit__(self, *exc: object) -> None:
        return None


@asynccontextmanager
async def _no_limit() -> AsyncIterator[None]:
    yield


async def _first(*events: anyio.Event) -> None:
    async with anyio.create_task_group() as tg:

        async def wait(event: anyio.Event) -> None:
            await event.wait()
            tg.cancel_scope.cancel()

        for event in events:
            tg.start_soon(wait, event)


def _fail_if_too_large(config: UpstreamConfig, tool: str, error: Exception | None) -> None:
    """Fails the call `upstream_error` if the upstream's answer to it was over `max_message_bytes`: the stdio
    reader's error in its place, or (streamable HTTP) the SDK's for an SSE event over the cap, which the
    session outlives too (httpx2's wording: "Server-sent event exceeded the N byte limit.")."""
    if not isinstance(error, MCPError):
        return
    if error.code == MESSAGE_TOO_LARGE:
        message = error.message
    elif error.code == types.CONNECTION_CLOSED and "byte limit" in error.message:
        message = too_large(config.name, None, config.max_message_bytes)
    else:
        return
    raise TaskFailure(ErrorKind.UPSTREAM_ERROR, f"{config.name}.{tool} failed: {message}") from error


def _connection_lost(error: Exception | None) -> bool:
    if isinstance(error, MCPError):
        return error.code == types.CONNECTION_CLOSED
    return error is not None


def _first_line(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return (str(exc) or type(exc).__name__).splitlines()[0][:300]
