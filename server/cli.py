"""Entry point: `offload-mcp` serves MCP (stdio, or SSE / streamable HTTP); `offload-mcp demo` shows it working."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from server import __version__
from server.app import build_server
from server.config import Settings, load_settings
from server.errors import ConfigError
from server.limits import raise_descriptor_limit
from server.logs import RepeatFilter
from server.redact import RedactingFilter, Redactor
from server.runtime import Runtime, secret_values, secret_variables
from server.signals import stop_on_signal
from server.stdio import loop_stdio_server

log = logging.getLogger("offload")

PRIVATE_UMASK = 0o077
"""Set at start: every file the server creates (the database, output and exit files) is 0600. Commands
inherit it; one that needs group-readable files sets its own `umask`."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="offload-mcp",
        description="MCP server that runs slow tools in the background: fire now, collect later. "
        "With no command it serves MCP: over stdio (the form MCP clients launch), or with --transport "
        "sse|http as a server several clients share.",
        epilog="Settings also come from OFFLOAD_* environment variables and the TOML file; flags win.",
    )
    p.add_argument(
        "command",
        nargs="?",
        choices=["serve", "demo", "worker"],
        default="serve",
        help="serve (default): serve MCP; demo: fire a few tasks through a real client; "
        "worker: run the tasks front-ends queue (distributed mode, needs --redis-url)",
    )
    p.add_argument("--version", action="version", version=f"offload-mcp {__version__}")
    p.add_argument("--config", type=Path, help="TOML settings file (default: the platform config dir)")
    p.add_argument("--max-concurrency", type=int, help="tasks running at once; more are queued (default 32)")
    p.add_argument("--default-timeout-s", type=float, help="timeout of a task that names none (default 1800)")
    p.add_argument("--ttl-s", type=float, help="how long finished results are kept and reused (default 1800)")
    p.add_argument("--data-dir", type=Path, help="task database and output files (default: platform state dir)")
    p.add_argument("--detach", action="store_true", default=None, help="shell commands outlive the server")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="stderr log level")
    p.add_argument(
        "--transport",
        choices=["stdio", "sse", "http"],
        help="stdio (default), sse (/sse) or http (streamable HTTP, /mcp)",
    )
    p.add_argument("--host", help="address the HTTP transports bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port of the HTTP transports (default 8000; 0 picks a free one)")
    p.add_argument(
        "--auth-token-env",
        metavar="NAME",
        help="environment variable holding the bearer token clients must send (default OFFLOAD_AUTH_TOKEN)",
    )
    p.add_argument(
        "--redis-url",
        metavar="URL",
        help="distributed mode: redis:// or rediss:// URL shared by front-ends and workers (OFFLOAD_REDIS_URL)",
    )
    p.add_argument(
        "--worker",
        action="store_true",
        help="distributed mode: a front-end that also runs tasks, as a worker on --queue (default: the host "
        "name and 'any')",
    )
    p.add_argument(
        "--queue",
        action="append",
        metavar="NAME",
        help="worker: a queue to take tasks from (repeatable; default: the host name and 'any')",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    overrides: dict[str, Any] = {
        "max_concurrency": args.max_concurrency,
        "default_timeout_s": args.default_timeout_s,
        "ttl_s": args.ttl_s,
        "data_dir": args.data_dir,
        "detach": args.detach,
        "log_level": args.log_level,
        "transport": args.transport,
        "host": args.host,
        "port": args.port,
        "auth_token_env": args.auth_token_env,
        "redis_url": args.redis_url,
    }
    try:
        settings = load_settings(args.config, overrides=overrides)
    except ConfigError as exc:
        sys.stderr.write(f"offload-mcp: {exc}\n")  # logging is not set up yet: the settings failed
        return 2
    _log_to_stderr(settings.log_level, Redactor.from_environ(secret_variables(settings), secret_values(settings)))
    os.umask(PRIVATE_UMASK)  # the store's files and the commands' exit records: private to this user
    raise_descriptor_limit()  # before the HTTP connection cap is fitted to it
    if args.command == "demo":
        from server.demo import run_demo

        return anyio.run(run_demo, argv_for_server(args))
    try:
        if args.command == "worker":
            from server.worker import default_queues, serve_worker

            anyio.run(serve_worker, settings, args.queue or default_queues())
        elif settings.transport == "stdio":
            anyio.run(serve_stdio, settings)
        else:
            from server.auth import Credentials
            from server.web import serve_http
            from server.worker import default_queues

            queues = (args.queue or default_queues()) if args.worker else None
            anyio.run(serve_http, settings, Credentials.load(settings, os.environ), queues)
    except ConfigError as exc:
        log.error("%s", exc)  # noqa: TRY400 - the message is the whole story; a traceback would bury it
        return 2
    return 0


def argv_for_server(args: argparse.Namespace) -> list[str]:
    """The demo's server gets the same settings the demo was given (and keeps quiet unless asked)."""
    forwarded: list[str] = ["--transport", "stdio"] + ([] if args.log_level else ["--log-level", "WARNING"])
    for flag in ("config", "max_concurrency", "default_timeout_s", "ttl_s", "data_dir", "log_level"):
        value = getattr(args, flag)
        if value is not None:
            forwarded += [f"--{flag.replace('_', '-')}", str(value)]
    if args.detach:
        forwarded.append("--detach")
    return forwarded


def _log_to_stderr(level: str, redactor: Redactor) -> None:
    """stdout is the protocol on stdio: every log line goes to stderr, with the secrets masked."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RepeatFilter())  # before masking: it keys on the message template
    handler.addFilter(RedactingFilter(redactor))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


async def serve_stdio(settings: Settings) -> None:
    """Serves until stdin closes or SIGTERM/SIGINT arrives, then kills every task's process group."""
    async with Runtime.open(settings) as runtime, anyio.create_task_group() as tg:
        tg.start_soon(stop_on_signal, tg.cancel_scope.cancel)
        log.info("offload-mcp %s serving MCP on stdio", __version__)
        server = build_server(runtime)
        async with loop_stdio_server(settings.max_request_body_bytes) as (read_stream, write_stream):
            await server.run_streams(read_stream, write_stream)
        log.info("stdin closed; shutting down")
        tg.cancel_scope.cancel()
