"""Settings: one frozen object from flags > environment (`OFFLOAD_*`) > TOML file > defaults.

Unknown keys are rejected by name, wherever they come from: a misspelt limit must not be
silently ignored.
"""

from __future__ import annotations

import math
import os
import sys
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from server.errors import ConfigError
from server.redact import mask_url, url_secrets
from server.upstreams import McpServerSettings, ServerName
from tools.clients import ClientsConfig
from tools.policy import Mode, ShellPolicy
from tools.presets import Preset, check_preset, validate_rule
from tools.sandbox import Kind, OwnerShell, Sandbox
from tools.shell import SECRET_MARKERS, ShellConfig

ENV_PREFIX = "OFFLOAD_"
APP_NAME = "offload"
LOCAL_OWNER = "local"
DEFAULT_QUEUE = "any"
"""Distributed mode: the worker queue of a task fired without `target` (every worker takes from it)."""
"""The one owner of a server without bearer tokens (stdio, or HTTP on loopback without auth)."""

PositiveSeconds = Annotated[float, Field(gt=0, le=7 * 24 * 3600)]
OwnerName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class PresetSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    command: Annotated[str, Field(min_length=1)]
    cwd: str | None = None
    timeout_s: PositiveSeconds | None = None
    env: dict[str, str] = {}
    description: str | None = None
    args: str = "none"
    """What a caller may append: "none" (the default), "words", "any", or a regex each argument must match."""
    allow_options: bool = False
    """Allow appended arguments that start with "-" or "+" (options can make a program run other commands)."""
    queue: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] | None = None
    """Distributed mode: the worker queue this preset runs on (e.g. the one build host that can run it)."""

    @field_validator("args")
    @classmethod
    def _args_rule(cls, value: str) -> str:
        return validate_rule(value)

    @model_validator(mode="after")
    def _args_reach_a_value(self) -> PresetSettings:
        check_preset(self.command, self.args)
        return self


class OwnerSettings(BaseModel):
    """`[owners.NAME]`: one owner's token and shell policy; a setting left out is the server-wide one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    token_env: str | None = None
    """The variable holding this owner's bearer token (as `[auth_tokens]` NAME = "VARIABLE")."""
    shell_mode: Mode | None = None
    shell_roots: tuple[str, ...] | None = None
    shell_allow: tuple[str, ...] | None = None
    shell_deny: tuple[str, ...] | None = None
    sandbox: Kind | None = None
    network: bool | None = None
    max_active: Annotated[int, Field(ge=1)] | None = None
    """Queued plus running tasks of this owner (default max_active_per_owner)."""
    share: Annotated[float, Field(gt=0, le=1)] | None = None
    """The part of max_concurrency this owner may run at once."""
    admin: bool = False
    """Sees server-wide figures in offload://stats."""
    mcp_servers: tuple[str, ...] | None = None
    """Globs of the upstream MCP servers (proxy mode) this owner may fire tools of; left out: every one."""


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_concurrency: Annotated[int, Field(ge=1, le=10_000)] = 32
    """Tasks running at once across all tools; more are queued, never refused."""
    tool_concurrency: dict[str, Annotated[int, Field(ge=1)]] = {}
    """Per-tool limits, e.g. {"shell": 8}; they apply on top of max_concurrency."""
    default_timeout_s: PositiveSeconds = 1800.0
    max_timeout_s: PositiveSeconds = 24 * 3600.0
    ttl_s: PositiveSeconds = 1800.0
    """How long a finished task's result and output are kept (and reusable for cacheable tools)."""
    finished_tasks_max: Annotated[int, Field(ge=1)] = 2000
    tombstones_max: Annotated[int, Field(ge=0)] = 20_000
    data_dir: Path | None = None
    """Where the task database and output files live (default: the platform state directory)."""
    output_memory_max_bytes: Annotated[int, Field(ge=0)] = 0
    """No longer used: output is written through to the data directory as it arrives (kept so
    configuration files that set it still load)."""
    output_file_max_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024 * 1024
    """Per-task output kept on disk; past it the head and the tail are kept and the middle dropped."""
    lease_s: Annotated[float, Field(ge=1, le=600)] = 6.0
    """A server that stops renewing its lease this long is taken for dead; any live server on the data
    directory then settles its tasks (on one machine a dead server is known at once by its lock)."""
    detach: bool = False
    """Shell commands outlive the server and are followed again after a restart."""
    portable_process: bool = False
    """Use the portable process core (psutil identity, no pidfd, no /proc, no subreaper) even on Linux,
    where the Linux one is the default: what macOS runs, so CI runs it on every change."""
    max_active_per_owner: Annotated[int, Field(ge=1)] = 1000
    """Queued plus running tasks one owner may have; more is refused with a clear error."""
    sweep_interval_s: PositiveSeconds = 60.0
    kill_grace_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    shutdown_timeout_s: Annotated[float, Field(gt=0, le=60)] = 1.5
    shell_env: Literal["login", "inherit"] = "login" if sys.platform == "darwin" else "inherit"
    """"login": commands get the environment of the user's login shell ($SHELL -l -i), read once at start
    (an app started by launchd, like Claude Desktop, has a minimal PATH); "inherit": the server's own.
    The default is "login" on macOS, "inherit" elsewhere; a login shell that fails falls back to "inherit"."""
    shell_path: str | None = None
    """The PATH commands get, whatever shell_env says."""
    shell_secret_markers: tuple[str, ...] = SECRET_MARKERS
    shell_pass_env: tuple[str, ...] = ()
    presets: dict[str, PresetSettings] = {}
    http_max_connections: Annotated[int, Field(ge=1, le=10_000)] = 100
    http_private_networks: bool = True
    """False: http.request refuses hosts resolving to loopback/private/link-local addresses (SSRF guard)."""
    github_base_url: str | None = None
    """GitHub Enterprise (https://HOST/api/v3) or a local test server; default api.github.com."""
    github_token_env: str = "GITHUB_TOKEN"  # noqa: S105 - the name of a variable, not a secret
    anthropic_base_url: str | None = None
    anthropic_key_env: str = "ANTHROPIC_API_KEY"
    anthropic_model: str = "claude-sonnet-5-5"
    anthropic_max_retries: Annotated[int, Field(ge=0, le=10)] = 2
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    redis_url: str | None = None
    """Distributed mode (`redis://` or `rediss://`, a password allowed): records and output in Redis, commands
    run by `offload-mcp worker` processes. Unset: everything runs in this one process (the default)."""
    redis_namespace: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] = "offload"
    """Prefix of every Redis key and Docket queue (several Offloads may share one Redis)."""

    transport: Literal["stdio", "sse", "http"] = "stdio"
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    """0 picks a free port (logged at start)."""
    auth_token_env: str = "OFFLOAD_AUTH_TOKEN"  # noqa: S105 - the name of a variable, not a secret
    """The variable holding the bearer token of the single owner "default" (HTTP transports)."""
    auth_tokens: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")], str] = {}
    """Several owners: owner name -> name of the variable holding that owner's bearer token."""
    allowed_hosts: tuple[str, ...] = ()
    """Host headers accepted on a non-loopback bind (DNS-rebinding protection), e.g. "offload.lan:*"."""
    allowed_origins: tuple[str, ...] = ()
    max_request_body_bytes: Annotated[int, Field(ge=1024, le=256 * 1024 * 1024)] = 1024 * 1024
    max_sessions_per_owner: Annotated[int, Field(ge=1, le=10_000)] = 64
    """Streamable HTTP sessions one owner may hold open; past it, opening another gets 429."""
    max_streams_per_owner: Annotated[int, Field(ge=1, le=10_000)] = 16
    """Open GET streams (SSE connections, standalone streams) one owner may hold; past it, 429."""
    max_connections: Annotated[int, Field(ge=1, le=100_000)] = 512
    """HTTP connections at once (lowered to fit the descriptor limit); past it, 503 and close."""
    http_header_timeout_s: Annotated[float, Field(gt=0, le=300)] = 10.0
    """A connection whose request headers take longer is closed."""
    http_body_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    """A request body that stops arriving for this long is treated as a disconnect."""
    max_argument_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = 256 * 1024
    """Largest JSON of a fired tool's arguments (and of a command, its stdin and env together)."""
    stream_hold_s: Annotated[float, Field(ge=0, le=55)] = 25.0
    """Streamable HTTP: a reply stream that has waited this long (poll_output, fire_tool wait_s) is closed
    with a retry hint and resumed by the client with Last-Event-ID; 0 holds it open."""
    stream_retry_ms: Annotated[int, Field(ge=0, le=60_000)] = 1000
    """The `retry` hint of resumable streams: how long a client waits before reconnecting."""
    expose: tuple[str, ...] = ()
    """Fireable tools also served as MCP tools of their own name ("shell", "github.*"): task-capable
    (SEP-2663) for clients with the tasks extension, answered inline within expose_wait_s for others."""
    expose_wait_s: Annotated[float, Field(ge=0, le=55)] = 45.0
    shell_mode: Literal["off", "deny-list", "allow-list"] = "off"
    shell_allow: tuple[str, ...] = ()
    """allow-list rules: a command prefix in words ("git status") or a regex ("re:^pytest( .*)?$")."""
    shell_deny: tuple[str, ...] = ()
    shell_roots: tuple[str, ...] = ()
    """Working directories commands may use (symlinks resolved); empty means any."""
    shell_sandbox: Kind = "none"
    """"bwrap": every command runs under bubblewrap (read-only system, its owner's roots writable, private
    /tmp and PID namespace, no data directory); required on a server with several owners and an open shell."""
    shell_network: bool = True
    shell_sandbox_hide: tuple[str, ...] = ()
    """More paths every sandbox replaces with an empty directory (e.g. "~/.ssh", "~/.config/gh")."""
    """Sandboxed commands reach the network (false: only a loopback of their own)."""
    owners: dict[OwnerName, OwnerSettings] = {}
    """Per-owner tokens and policy; `[auth_tokens]` NAME = "VARIABLE" is shorthand for a token_env alone."""
    mcp_servers: dict[ServerName, McpServerSettings] = {}
    """Proxy mode: `[mcp_servers.NAME]` other MCP servers, each of whose tools is fireable as NAME.tool."""
    mcp_servers_file: Path | None = None
    """A Claude Desktop / Claude Code config file whose `mcpServers` are read as they are (tables here win)."""

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://")):
            raise ValueError("redis_url must start with redis:// or rediss://")
        return value

    @model_validator(mode="after")
    def _queues_need_redis(self) -> Settings:
        pinned = sorted(name for name, preset in self.presets.items() if preset.queue is not None)
        if pinned and self.redis_url is None:
            raise ValueError(
                f"presets {', '.join(pinned)} name a worker queue, which needs distributed mode: set redis_url, "
                "or remove their queue"
            )
        return self

    @model_validator(mode="after")
    def _detach_is_local(self) -> Settings:
        if self.detach and self.redis_url is not None:
            raise ValueError(
                "detach keeps a command's output in a file on the machine that runs it, and distributed mode "
                "(redis_url) keeps output in Redis: use one or the other"
            )
        return self

    @model_validator(mode="after")
    def _shell_policy_is_valid(self) -> Settings:
        """Bad roots or rules, or an owner with two token variables, fail at start, named, not at first use."""
        self.shell_config()
        self.owner_tokens()
        return self

    def shell_config(self) -> ShellConfig:
        base = OwnerShell(
            ShellPolicy.build(
                mode=self.shell_mode, allow=self.shell_allow, deny=self.shell_deny, roots=self.shell_roots
            ),
            Sandbox(),
        )
        shells = {name: self._owner_policy(owner) for name, owner in self.owners.items()}
        every_root = {*base.policy.roots, *(root for shell in shells.values() for root in shell.roots)}
        private = (
            os.path.realpath(data_dir(self)),
            *(os.path.realpath(os.path.expanduser(p)) for p in self.shell_sandbox_hide),
        )

        def sandbox(kind: Kind, network: bool, roots: tuple[str, ...]) -> Sandbox:
            hidden = private + tuple(sorted(r for r in every_root if r not in roots))
            return Sandbox(kind=kind, writable=roots, hidden=hidden, network=network)

        owners = {
            name: OwnerShell(
                policy,
                sandbox(
                    owner.sandbox or self.shell_sandbox,
                    self.shell_network if owner.network is None else owner.network,
                    policy.roots,
                ),
            )
            for (name, owner), policy in zip(self.owners.items(), shells.values(), strict=True)
        }
        bearer = (self.auth_token_env, *self.owner_tokens().values())
        presets = {
            name: Preset(
                command=p.command,
                cwd=None if p.cwd is None else str(Path(p.cwd).expanduser()),
                timeout_s=p.timeout_s,
                env=dict(p.env),
                description=p.description,
                args=p.args,
                allow_options=p.allow_options,
                queue=p.queue,
            )
            for name, p in self.presets.items()
        }
        default = sandbox(self.shell_sandbox, self.shell_network, base.policy.roots)
        for name, box in [("(every owner)", default), *((n, shell.sandbox) for n, shell in owners.items())]:
            _check_hiding(name, box)
        return ShellConfig(
            # The variables credentials are read from never reach a command, whatever their names (issue 12);
            # bearer tokens not even through shell_pass_env.
            secret_markers=(*self.shell_secret_markers, *bearer, self.github_token_env, self.anthropic_key_env),
            pass_env=tuple(name for name in self.shell_pass_env if name not in bearer),
            secret_values=() if self.redis_url is None else tuple(url_secrets(self.redis_url)),
            kill_grace_s=self.kill_grace_s,
            detach=self.detach,
            presets=presets,
            policy=base.policy,
            sandbox=default,
            owners=owners,
        )

    def _owner_policy(self, owner: OwnerSettings) -> ShellPolicy:
        return ShellPolicy.build(
            mode=owner.shell_mode or self.shell_mode,
            allow=self.shell_allow if owner.shell_allow is None else owner.shell_allow,
            deny=self.shell_deny if owner.shell_deny is None else owner.shell_deny,
            roots=self.shell_roots if owner.shell_roots is None else owner.shell_roots,
        )

    def owner_tokens(self) -> dict[str, str]:
        """Owner → the variable holding its token, from `[auth_tokens]` and `[owners.NAME] token_env`."""
        named = dict(self.auth_tokens)
        for name, owner in self.owners.items():
            if owner.token_env is None:
                continue
            if named.get(name, owner.token_env) != owner.token_env:
                raise ConfigError(
                    f"owner {name!r} has two token variables: [auth_tokens] says {named[name]!r}, "
                    f"[owners.{name}] token_env says {owner.token_env!r}; keep one"
                )
            named[name] = owner.token_env
        return named

    def slots_for(self, owner: str) -> int | None:
        """Tasks of `owner` that may run at once: its share of max_concurrency (1/owners by default when
        several owners have tokens), or None when it may use all of it."""
        found = self.owners.get(owner)
        share = found.share if found is not None else None
        if share is None:
            owners = len(self.owner_tokens())
            share = 1 / owners if owners > 1 else None
        return None if share is None else max(1, math.floor(share * self.max_concurrency))

    def is_admin(self, owner: str) -> bool:
        """Sees server-wide figures: an owner marked admin, or the only owner there is."""
        found = self.owners.get(owner)
        return (found is not None and found.admin) or len(self.owner_tokens()) <= 1

    def max_active_for(self, owner: str) -> int:
        found = self.owners.get(owner)
        return self.max_active_per_owner if found is None or found.max_active is None else found.max_active


def clients_config(settings: Settings) -> ClientsConfig:
    return ClientsConfig(
        http_max_connections=settings.http_max_connections,
        http_private_networks=settings.http_private_networks,
        github_token_env=settings.github_token_env,
        github_base_url=settings.github_base_url,
        anthropic_key_env=settings.anthropic_key_env,
        anthropic_base_url=settings.anthropic_base_url,
        anthropic_model=settings.anthropic_model,
        anthropic_max_retries=settings.anthropic_max_retries,
    )


def data_dir(settings: Settings) -> Path:
    return settings.data_dir or Path(platformdirs.user_state_dir(APP_NAME))


def default_config_path() -> Path:
    return Path(platformdirs.user_config_dir(APP_NAME)) / "config.toml"


def load_settings(
    config_path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Merges the three sources; raises ConfigError naming the key and value that are wrong."""
    environ = os.environ if environ is None else environ
    path = config_path
    if path is None and (named := environ.get(f"{ENV_PREFIX}CONFIG")):
        path = Path(named)
    explicit = path is not None
    path = path or default_config_path()
    values: dict[str, Any] = _read_toml(path, required=explicit)
    in_file = values.get("redis_url")
    values.update(_from_environ(environ))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        settings = Settings.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source=str(path))) from exc
    if settings.redis_url is not None and settings.redis_url == in_file and url_secrets(in_file):
        _check_file_hidden(path, settings)
    return settings


def _check_file_hidden(path: Path, settings: Settings) -> None:
    """A password in the config file's redis_url must not be readable by a sandboxed command that reaches
    the network (a sandbox shows the file system read-only, the config directory included)."""
    real = os.path.realpath(path)
    shell = settings.shell_config()
    for box in (shell.sandbox, *(owner.sandbox for owner in shell.owners.values())):
        if box.on and box.network and not any(real == h or real.startswith(h.rstrip("/") + "/") for h in box.hidden):
            raise ConfigError(
                f"redis_url in {str(path)!r} carries a password, and sandboxed commands with network can read that "
                "file: set redis_url in OFFLOAD_REDIS_URL instead (commands never get OFFLOAD_* variables), or add "
                "the file's directory to shell_sandbox_hide"
            )


def _read_toml(path: Path, *, required: bool) -> dict[str, Any]:
    if not path.exists():
        if required:
            raise ConfigError(f"config file {str(path)!r} does not exist")
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc}") from exc


_NOT_SETTINGS = {"CONFIG", "AUTH_TOKEN"}
"""OFFLOAD_CONFIG names the file; OFFLOAD_AUTH_TOKEN is a secret, read only by `server.auth`."""


_TABLES = ("presets", "tool_concurrency", "auth_tokens", "owners", "mcp_servers")
"""Settings that only the TOML file can give."""


def _from_environ(environ: Mapping[str, str]) -> dict[str, Any]:
    fields = Settings.model_fields
    found: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name.removeprefix(ENV_PREFIX)
        if key in _NOT_SETTINGS:
            continue
        field = key.lower()
        if field not in fields or field in _TABLES:
            raise ConfigError(
                f"unknown environment setting {name}; known: "
                + ", ".join(ENV_PREFIX + f.upper() for f in fields if f not in _TABLES)
            )
        found[field] = raw.split(",") if typing.get_origin(fields[field].annotation) is tuple else raw
    return found


def _describe(exc: ValidationError, source: str) -> str:
    problems = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            problems.append(f"unknown setting {key!r}")
        else:
            shown = mask_url(str(error.get("input"))) if key == "redis_url" else error.get("input")
            problems.append(f"{key} = {shown!r}: {error['msg']}")
    return f"invalid settings (from flags, OFFLOAD_* environment or {source}): " + "; ".join(problems)


def _check_hiding(owner: str, box: Sandbox) -> None:
    """A path a sandbox hides (the data directory, another owner's root) must not lie inside a root it
    makes writable: a command could rename a directory above it, and the next sandbox would not find
    it to hide. Refused at start, named."""
    if not box.on:
        return
    for hidden in box.hidden:
        for root in box.writable:
            if hidden == root or hidden.startswith(root.rstrip("/") + "/"):
                raise ConfigError(
                    f"owner {owner}: {hidden!r} (the data directory, another owner's root, or a shell_sandbox_hide "
                    f"path) lies inside its writable shell root {root!r}, where a command could rename its way to "
                    "it; move data_dir or that root elsewhere, or narrow shell_roots so that no root contains it"
                )
