"""Proxy mode's settings and its one step before a fire: `[mcp_servers.NAME]` tables and
`mcp_servers_file` become the `UpstreamsConfig` of `tools/upstream.py`; `prepare` starts a lazy
upstream before its first fire and turns its failures into errors the model can act on."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from server.errors import ConfigError, RefusedError, UnavailableToolError, UnknownToolError
from tools.upstream import UnknownUpstreamTool, UpstreamConfig, UpstreamsConfig, UpstreamSet, UpstreamUnavailable
from tools.upstream_lines import MAX_MESSAGE_BYTES

if TYPE_CHECKING:
    from server.config import Settings

ServerName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
"""No dots: `NAME.tool` splits at the first one."""


class McpServerSettings(BaseModel):
    """One upstream, spelt as Claude Desktop / Claude Code spell it, plus Offload's own keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["stdio", "http", "streamable-http", "sse"] | None = None
    """Claude Code's key; guessed from command / url when left out (a url means streamable HTTP)."""
    command: Annotated[str, Field(min_length=1)] | None = None
    args: tuple[str, ...] = ()
    env: dict[str, str] = {}
    """The upstream's whole environment beyond PATH, HOME, LANG and the like; "${VAR}" takes Offload's VAR."""
    cwd: str | None = None
    url: Annotated[str, Field(pattern=r"^https?://")] | None = None
    headers: dict[str, str] = {}
    tools: tuple[str, ...] = ("*",)
    """Globs of its tool names to offer."""
    timeout_s: Annotated[float, Field(gt=0, le=7 * 24 * 3600)] | None = None
    max_concurrency: Annotated[int, Field(ge=1, le=10_000)] | None = None
    start: Literal["lazy", "eager"] = "lazy"
    cacheable: tuple[str, ...] = ()
    """Globs of tools whose results may be reused although not annotated readOnlyHint and idempotentHint."""
    health_check_s: Annotated[float, Field(gt=0, le=3600)] | None = 60.0
    """A `tools/list` this often, answered within twice that (10 s at most), or the upstream is restarted."""
    max_message_bytes: Annotated[int, Field(ge=1024, le=1024 * 1024 * 1024)] = MAX_MESSAGE_BYTES
    """One message from it (a call's answer); a bigger one fails that call only, saying so."""

    @model_validator(mode="after")
    def _one_transport(self) -> McpServerSettings:
        if (self.command is None) == (self.url is None):
            raise ValueError("give either command (a stdio server) or url (an HTTP server), not both or neither")
        if self.command is None and self.type == "stdio":
            raise ValueError('type = "stdio" needs a command')
        return self


def upstreams_config(settings: Settings, environ: Mapping[str, str] | None = None) -> UpstreamsConfig:
    """The configured upstreams: `mcp_servers_file`'s entries, then `[mcp_servers.NAME]` tables (which win)."""
    servers = dict(_read_file(settings.mcp_servers_file)) if settings.mcp_servers_file is not None else {}
    servers.update(settings.mcp_servers)
    return UpstreamsConfig(
        servers={name: _upstream(name, server) for name, server in servers.items()},
        allowed={name: owner.mcp_servers for name, owner in settings.owners.items() if owner.mcp_servers is not None},
        kill_grace_s=settings.kill_grace_s,
        environ=os.environ if environ is None else environ,
    )


def _upstream(name: str, server: McpServerSettings) -> UpstreamConfig:
    return UpstreamConfig(
        name=name,
        command=server.command,
        args=server.args,
        env=dict(server.env),
        cwd=None if server.cwd is None else str(Path(server.cwd).expanduser()),
        url=server.url,
        headers=dict(server.headers),
        transport="stdio" if server.command else "sse" if server.type == "sse" else "http",
        tools=server.tools,
        timeout_s=server.timeout_s,
        max_concurrency=server.max_concurrency,
        start=server.start,
        cacheable=server.cacheable,
        health_check_s=server.health_check_s,
        max_message_bytes=server.max_message_bytes,
    )


def _read_file(path: Path) -> dict[str, McpServerSettings]:
    where = f"mcp_servers_file {str(path)!r}"
    try:
        document = json.loads(path.expanduser().read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {where}: {exc}") from exc
    entries = document.get("mcpServers") if isinstance(document, dict) else None
    if not isinstance(entries, dict):
        raise ConfigError(f'{where} has no "mcpServers" object (the Claude Desktop / Claude Code layout)')
    found: dict[str, McpServerSettings] = {}
    for name, entry in entries.items():
        try:
            found[_name(name)] = McpServerSettings.model_validate(entry)
        except (ValidationError, ValueError) as exc:
            raise ConfigError(f"{where}: mcpServers.{name}: {_plain(exc)}") from exc
    return found


def _name(name: str) -> str:
    class Named(BaseModel):
        name: ServerName

    return Named(name=name).name


def _plain(exc: Exception) -> str:
    if not isinstance(exc, ValidationError):
        return str(exc)
    problems = []
    for error in exc.errors(include_url=False):
        key = ".".join(str(part) for part in error["loc"]) or "entry"
        what = "unknown key" if error["type"] == "extra_forbidden" else error["msg"].removeprefix("Value error, ")
        problems.append(f"{key}: {what}")
    return "; ".join(problems)


def check_names(upstreams: UpstreamsConfig, fixed: Iterable[str]) -> None:
    """An upstream may not be named like a group of Offload's own tools (`github`): `github.get_issue` would
    be both."""
    taken = {name.partition(".")[0] for name in fixed}
    if clashes := sorted(taken.intersection(upstreams.servers)):
        raise ConfigError(
            f"[mcp_servers.{clashes[0]}] has the name of Offload's own tools {clashes[0]}.*; "
            f"rename it (its tools would be {clashes[0]}.TOOL)"
        )


async def prepare(upstreams: UpstreamSet | None, tool: str, owner: str) -> None:
    """Before `fire_tool("NAME.tool")`: the owner may use NAME, and a lazy upstream is started, so its tools
    are known and checked."""
    upstream = None if upstreams is None else upstreams.upstream_of(tool)
    if upstreams is None or upstream is None:
        return
    try:
        upstreams.check_owner(upstream.config.name, owner)
    except ValueError as exc:
        raise RefusedError(tool, str(exc)) from exc
    try:
        await upstreams.prepare(tool)
    except UpstreamUnavailable as exc:
        raise UnavailableToolError(tool, str(exc)) from exc
    except UnknownUpstreamTool as exc:
        raise UnknownToolError(tool, exc.offered) from exc
