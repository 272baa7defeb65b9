"""The shell runner behind `run_shell_background`, the `shell` tool and config presets.

Each command runs under `bash -c` (else `sh -c`) as the leader of a new session, so its
whole process tree shares one process group that can be signalled at once. stdout and
stderr share one pipe, read concurrently with the process, so output interleaves as
produced and a chatty command never blocks on a full pipe.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import anyio
from anyio.abc import Process
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tools.context import JSON, TaskFailure, ToolContext
from tools.registry import ToolSpec

SECRET_MARKERS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH", "COOKIE", "SESSION")
"""Environment names containing any of these (case-insensitive) are not passed to commands."""

READ_CHUNK_BYTES = 64 * 1024
DRAIN_AFTER_EXIT_S = 0.5
"""How long output is still read after the command exits while a background child holds the pipe."""


@dataclass(frozen=True, slots=True)
class ShellConfig:
    """What the operator decides about every shell command; built by the server from Settings."""

    secret_markers: tuple[str, ...] = SECRET_MARKERS
    pass_env: tuple[str, ...] = ()
    """Names passed through even though they look secret."""
    kill_grace_s: float = 1.0
    presets: Mapping[str, Preset] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Preset:
    """A named command from the config file, fired as a tool of its own name."""

    command: str
    cwd: str | None = None
    timeout_s: float | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    description: str | None = None


class ShellArgs(BaseModel):
    """Arguments of the `shell` tool (and of `run_shell_background`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    command: Annotated[str, Field(min_length=1, description="Shell command line, run with bash -c.")]
    cwd: Annotated[str | None, Field(description="Working directory; must exist.")] = None
    env: Annotated[dict[str, str] | None, Field(description="Extra environment variables for this command.")] = None
    stdin: Annotated[str | None, Field(description="Text written to stdin, then closed.")] = None

    @field_validator("cwd")
    @classmethod
    def _cwd_is_a_directory(cls, value: str | None) -> str | None:
        if value is None:
            return None
        path = Path(value).expanduser()
        if not path.is_dir():
            raise ValueError(f"cwd {value!r} is not an existing directory")
        return str(path.resolve())

    @field_validator("command")
    @classmethod
    def _no_nul(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("command contains a NUL byte")
        return value


class PresetArgs(BaseModel):
    """Arguments of a preset: extra words appended (quoted) to its command."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    args: Annotated[
        list[str], Field(description="Extra arguments appended to the preset command, each shell-quoted.")
    ] = []
    stdin: Annotated[str | None, Field(description="Text written to stdin, then closed.")] = None


def scrubbed_environment(
    base: Mapping[str, str], config: ShellConfig, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The server's environment minus anything that looks like a secret, plus `extra`."""
    markers = tuple(marker.upper() for marker in config.secret_markers)
    keep = set(config.pass_env)
    env = {
        name: value
        for name, value in base.items()
        if name in keep or not any(marker in name.upper() for marker in markers)
    }
    env.update(extra or {})
    return env


@functools.cache
def _shell() -> str:
    return shutil.which("bash") or "/bin/sh"


def shell_argv(command: str) -> list[str]:
    return [_shell(), "-c", command]


def group_alive(pgid: int) -> bool:
    """True while any process of the group is alive; zombies do not count.

    An orphaned child that died stays a zombie until init reaps it, and in a container init
    may never do so: `killpg(pgid, 0)` alone would call such a group alive forever.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _PROC.is_dir() or any(_live_in_group(stat, pgid) for stat in _PROC.glob("[0-9]*/stat"))


_PROC = Path("/proc")


def _live_in_group(stat_path: Path, pgid: int) -> bool:
    try:
        fields = stat_path.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False  # gone while we looked
    return int(fields[2]) == pgid and fields[0] not in ("Z", "X")


def signal_group(pgid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


async def stop_group(process: Process, grace_s: float) -> None:
    """TERM the whole group, give it `grace_s`, then KILL whatever is left.

    Shielded by the caller: this must finish even when the task is being cancelled.
    """
    pgid = process.pid
    if not group_alive(pgid):
        return
    signal_group(pgid, signal.SIGTERM)
    with anyio.move_on_after(grace_s):
        await process.wait()
        # Grandchildren are not ours to wait for: no exit event reaches us, so look, bounded by grace_s.
        while group_alive(pgid):  # noqa: ASYNC110 - there is no event to wait on
            await anyio.sleep(0.02)
    signal_group(pgid, signal.SIGKILL)
    await process.wait()


async def _feed_stdin(process: Process, text: str | None) -> None:
    if process.stdin is None:
        return
    async with process.stdin:
        # A command that exits without reading all of it is not a failure of ours.
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await process.stdin.send((text or "").encode())


async def _pump_output(process: Process, ctx: ToolContext, eof: anyio.Event) -> int:
    assert process.stdout is not None
    total = 0
    try:
        async for chunk in process.stdout:
            total += len(chunk)
            ctx.write_output(chunk)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass
    finally:
        eof.set()
    return total


async def run_command(
    command: str,
    ctx: ToolContext,
    config: ShellConfig,
    *,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    stdin: str | None = None,
) -> JSON:
    """Runs one command to completion; a non-zero exit becomes a `TaskFailure`."""
    started = time.monotonic()
    process = await anyio.open_process(
        shell_argv(command),
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        env=scrubbed_environment(os.environ, config, env),
        start_new_session=True,
    )
    ctx.set_pid(process.pid)
    output_bytes = 0
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_feed_stdin, process, stdin)
            output_bytes = await _read_until_exit(process, ctx)
    finally:
        with anyio.CancelScope(shield=True):
            await stop_group(process, config.kill_grace_s)
            await process.aclose()
    return _outcome(process.returncode, time.monotonic() - started, output_bytes)


async def _read_until_exit(process: Process, ctx: ToolContext) -> int:
    """Reads output until the leader exits and the pipe drains.

    A background child (`cmd &`) can hold the pipe open long after the command is done;
    past a short drain the task ends anyway and `stop_group` ends that child.
    """
    counted = 0
    eof = anyio.Event()

    async def pump() -> None:
        nonlocal counted
        counted = await _pump_output(process, ctx, eof)

    async with anyio.create_task_group() as tg:
        tg.start_soon(pump)
        await process.wait()
        with anyio.move_on_after(DRAIN_AFTER_EXIT_S):
            await eof.wait()
        tg.cancel_scope.cancel()
    return counted


def _outcome(returncode: int | None, duration_s: float, output_bytes: int) -> JSON:
    code = returncode if returncode is not None and returncode >= 0 else None
    signame = None
    if returncode is not None and returncode < 0:
        signame = signal.Signals(-returncode).name
    result: JSON = {
        "exit_code": code,
        "signal": signame,
        "duration_s": round(duration_s, 3),
        "output_bytes": output_bytes,
    }
    if code == 0:
        return result
    what = f"exited with code {code}" if code is not None else f"was killed by {signame}"
    raise TaskFailure("exit_status", f"command {what}; its output is still readable", result)


def shell_spec(config: ShellConfig) -> ToolSpec:
    async def handler(args: ShellArgs, ctx: ToolContext) -> JSON:
        return await run_command(args.command, ctx, config, cwd=args.cwd, env=args.env, stdin=args.stdin)

    return ToolSpec(
        name="shell",
        description="Run a shell command (bash -c) in its own process group; output is streamed to the task.",
        input_model=ShellArgs,
        handler=handler,
        destructive=True,
        open_world=True,
    )


def preset_spec(name: str, preset: Preset, config: ShellConfig) -> ToolSpec:
    async def handler(args: PresetArgs, ctx: ToolContext) -> JSON:
        command = preset.command
        if args.args:
            command = f"{command} {shlex.join(args.args)}"
        return await run_command(command, ctx, config, cwd=preset.cwd, env=preset.env, stdin=args.stdin)

    return ToolSpec(
        name=name,
        description=preset.description or f"Preset command: {preset.command}",
        input_model=PresetArgs,
        handler=handler,
        destructive=True,
        open_world=True,
        default_timeout_s=preset.timeout_s,
    )


def shell_specs(config: ShellConfig) -> Sequence[ToolSpec]:
    return [shell_spec(config), *(preset_spec(name, p, config) for name, p in config.presets.items())]
