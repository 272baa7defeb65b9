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
import shutil
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import anyio
from anyio.abc import Process
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tools.context import JSON, LeftRunning, ProcessInfo, TaskFailure, ToolContext
from tools.policy import ShellPolicy
from tools.presets import preset_command
from tools.registry import ToolSpec
from tools.sandbox import OwnerShell, Sandbox, prefix

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
    detach: bool = False
    """Commands outlive the server (they are not killed at shutdown) and are followed again after a restart."""
    presets: Mapping[str, Preset] = field(default_factory=dict)
    policy: ShellPolicy = field(default_factory=ShellPolicy)
    # offload issue 12: per-owner policy and sandbox; owners without an entry get `policy` and `sandbox`.
    sandbox: Sandbox = field(default_factory=Sandbox)
    owners: Mapping[str, OwnerShell] = field(default_factory=dict)

    def for_owner(self, owner: str) -> OwnerShell:
        return self.owners.get(owner) or OwnerShell(self.policy, self.sandbox)


@dataclass(frozen=True, slots=True)
class Preset:
    """A named command from the config file, fired as a tool of its own name."""

    command: str
    cwd: str | None = None
    timeout_s: float | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    description: str | None = None
    args: str = "none"
    """Which `args` a caller may append: "none", "any", or a regex each argument must match (tools/presets.py)."""
    allow_options: bool = False
    """Arguments starting with "-" are refused unless this is set."""


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


@functools.cache
def _wrapper_shell() -> str:
    """The wrapper needs only POSIX sh; dash starts in ~0.6 ms less CPU than bash (measured here)."""
    return "/bin/sh" if os.path.exists("/bin/sh") else _shell()


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


async def stop_group(pgid: int, grace_s: float, leader_exit: Callable[[], Awaitable[object]]) -> None:
    """TERM the whole group, give it `grace_s`, then KILL whatever is left.

    Shielded by the caller: this must finish even when the task is being cancelled.
    """
    if not group_alive(pgid):
        return
    signal_group(pgid, signal.SIGTERM)
    with anyio.move_on_after(grace_s):
        await leader_exit()
        # Grandchildren are not ours to wait for: no exit event reaches us, so look, bounded by grace_s.
        while group_alive(pgid):  # noqa: ASYNC110 - there is no event to wait on
            await anyio.sleep(0.02)
    signal_group(pgid, signal.SIGKILL)
    await leader_exit()


async def _feed_stdin(process: Process, text: str | None) -> None:
    if process.stdin is None:
        return
    async with process.stdin:
        # A command that exits without reading all of it is not a failure of ours.
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await process.stdin.send((text or "").encode())


async def _pump_output(process: Process, ctx: ToolContext, eof: anyio.Event) -> int:
    """Copies the pipe into the task's output, taking turns with every other task's pump."""
    stream = process.stdout
    assert stream is not None
    total = 0
    try:
        while True:
            async with ctx.output_turns:
                chunk = await stream.receive(READ_CHUNK_BYTES)
                total += len(chunk)
                ctx.write_output(chunk)
    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass
    finally:
        eof.set()
    return total


_WRAPPER = (
    "c=$OFFLOAD_COMMAND f=$OFFLOAD_EXIT_FILE; unset OFFLOAD_COMMAND OFFLOAD_EXIT_FILE; "
    '"$0" "$@" -c "$c"; s=$?; printf "%s\\n" "$s" > "$f"; exit "$s"'
)
"""The command runs (under bash, passed as $0) as a child of this POSIX-sh wrapper, which records
its exit status beside its output. Words after $0 go before `-c` (a sandbox: `bwrap … -- bash -c`).

The record is what tells, after the server died, "finished with exit code N" from "killed".
A wrapper killed by a signal writes nothing, which is what a killed command should leave.
"""


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
    environment = scrubbed_environment(os.environ, config, env)
    environment.update(OFFLOAD_COMMAND=command, OFFLOAD_EXIT_FILE=str(ctx.exit_path))
    argv = [_wrapper_shell(), "-c", _WRAPPER, *prefix(config.for_owner(ctx.owner).sandbox, cwd), _shell()]  # issue 12
    if config.detach:
        return await _run_detached(argv, ctx, config, cwd, environment, stdin)
    return await _run_attached(argv, ctx, config, cwd, environment, stdin)


async def _run_attached(
    argv: list[str], ctx: ToolContext, config: ShellConfig, cwd: str | None, env: dict[str, str], stdin: str | None
) -> JSON:
    """Output comes through a pipe to the server; the process ends with the server."""
    started = time.monotonic()
    process = await anyio.open_process(
        argv,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        env=env,
        start_new_session=True,
    )
    ctx.set_process(ProcessInfo(process.pid, start_ticks(process.pid), boot_id()))
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_feed_stdin, process, stdin)
            output_bytes = await _read_until_exit(process, ctx)
    finally:
        with anyio.CancelScope(shield=True):
            await stop_group(process.pid, config.kill_grace_s, process.wait)
            await process.aclose()
    return _outcome(process.returncode, time.monotonic() - started, output_bytes)


async def _run_detached(
    argv: list[str], ctx: ToolContext, config: ShellConfig, cwd: str | None, env: dict[str, str], stdin: str | None
) -> JSON:
    """Output goes straight to the task's file and the process outlives the server.

    A plain `Popen`, watched through a pidfd: asyncio's subprocess transport kills the
    process it owns when it is closed, and this one must survive the server's shutdown.
    """
    started = time.monotonic()
    stdin_path = ctx.output_path.with_suffix(".stdin")
    if stdin is not None:
        stdin_path.write_text(stdin)
    with contextlib.ExitStack() as files:
        out = files.enter_context(open(ctx.output_path, "ab"))  # noqa: ASYNC230 - a local file, once
        into = files.enter_context(open(stdin_path, "rb")) if stdin is not None else subprocess.DEVNULL  # noqa: ASYNC230
        process = subprocess.Popen(  # noqa: ASYNC220 - spawning does not block on the child
            argv, stdin=into, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True
        )
    ctx.set_process(ProcessInfo(process.pid, start_ticks(process.pid), boot_id()))
    ctx.use_output_file()

    async def leader_exit() -> None:
        await wait_for_exit(process.pid)
        process.wait()  # reaps it: it has exited, so this does not block

    try:
        await leader_exit()
    except anyio.get_cancelled_exc_class():
        if ctx.shutting_down():
            raise LeftRunning(f"detached command (pid {process.pid}) keeps running") from None
        with anyio.CancelScope(shield=True):
            await stop_group(process.pid, config.kill_grace_s, leader_exit)
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            stdin_path.unlink()
    return _outcome(process.returncode, time.monotonic() - started, _file_size(ctx.output_path))


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


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


# ---- finding processes again after a restart ----


def start_ticks(pid: int) -> int | None:
    """Process start time in clock ticks since boot, or None if it is gone or unknowable."""
    try:
        fields = (_PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


@functools.cache
def boot_id() -> str | None:
    try:
        return (_PROC / "sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def is_same_process(info: ProcessInfo) -> bool:
    """True if `info.pid` is still the process we started (not a recycled pid)."""
    if info.boot_id is None or info.boot_id != boot_id():
        return False
    return info.start_ticks is not None and start_ticks(info.pid) == info.start_ticks


def group_is_ours(info: ProcessInfo) -> bool:
    """May the group `info.pid` be signalled? Yes while its leader is the process we started,
    or, once the leader is gone, while members remain: Linux does not hand out a pid that is
    still some group's id, so those members are the ones our command left behind."""
    if info.boot_id is None or info.boot_id != boot_id() or not group_alive(info.pid):
        return False
    leader = start_ticks(info.pid)
    return leader is None or leader == info.start_ticks


def read_exit_file(path: Path) -> int | None:
    """The exit status a wrapper recorded, or None if the command never finished on its own."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


async def kill_left_behind(info: ProcessInfo, grace_s: float) -> bool:
    """TERM then KILL a group an earlier server run left behind; returns whether it did."""
    if not group_is_ours(info):
        return False
    signal_group(info.pid, signal.SIGTERM)
    with anyio.move_on_after(grace_s):
        while group_alive(info.pid):  # noqa: ASYNC110 - not our children: no exit event reaches us
            await anyio.sleep(0.02)
    if group_alive(info.pid):
        signal_group(info.pid, signal.SIGKILL)
    return True


async def wait_for_exit(pid: int) -> None:
    """Waits for a process that is not our child (a detached command from an earlier run).

    A pidfd becomes readable when the process exits: an event, not a poll.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await anyio.wait_readable(fd)
    finally:
        os.close(fd)


async def reattach(info: ProcessInfo, ctx: ToolContext, started_wall_s: float, *, config: ShellConfig) -> JSON:
    """Follows a detached command that outlived the server until it ends, then reports it."""
    try:
        await wait_for_exit(info.pid)
    except anyio.get_cancelled_exc_class():
        if ctx.shutting_down():
            raise LeftRunning(f"detached command (pid {info.pid}) keeps running") from None
        with anyio.CancelScope(shield=True):
            await kill_left_behind(info, config.kill_grace_s)
        raise
    return outcome_from_record(ctx.exit_path, ctx.output_path, started_wall_s)


def outcome_from_record(exit_path: Path, output_path: Path, started_wall_s: float) -> JSON:
    """The result of a command that finished while nobody watched, from its wrapper's record."""
    code = read_exit_file(exit_path)
    if code is None:
        raise TaskFailure("interrupted", "the command ended while the server was down and left no exit status")
    try:
        duration_s = max(exit_path.stat().st_mtime - started_wall_s, 0.0)
    except OSError:
        duration_s = 0.0
    return _outcome(code, duration_s, _file_size(output_path))


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
    def check(args: ShellArgs, owner: str) -> None:
        policy = config.for_owner(owner).policy  # issue 12: the owner's own policy
        policy.command_to_run(args.command, args.env)
        policy.cwd_to_use(args.cwd)

    async def handler(args: ShellArgs, ctx: ToolContext) -> JSON:
        policy = config.for_owner(ctx.owner).policy  # issue 12: the owner's own policy
        command = policy.command_to_run(args.command, args.env)
        cwd = policy.cwd_to_use(args.cwd)
        return await run_command(command, ctx, config, cwd=cwd, env=args.env, stdin=args.stdin)

    return ToolSpec(
        name="shell",
        description="Run a shell command (bash -c) in its own process group; output is streamed to the task.",
        input_model=ShellArgs,
        handler=handler,
        destructive=True,
        open_world=True,
        reattach=functools.partial(reattach, config=config),
        check=check,
    )


def preset_spec(name: str, preset: Preset, config: ShellConfig) -> ToolSpec:
    def check(args: PresetArgs, owner: str) -> None:
        preset_command(name, preset, args.args, config.for_owner(owner).policy)

    async def handler(args: PresetArgs, ctx: ToolContext) -> JSON:
        policy = config.for_owner(ctx.owner).policy  # issue 12: argument policy and shell_mode = "disabled"
        command = preset_command(name, preset, args.args, policy)
        return await run_command(command, ctx, config, cwd=preset.cwd, env=preset.env, stdin=args.stdin)

    return ToolSpec(
        name=name,
        description=preset.description or f"Preset command: {preset.command}",
        input_model=PresetArgs,
        handler=handler,
        destructive=True,
        open_world=True,
        default_timeout_s=preset.timeout_s,
        reattach=functools.partial(reattach, config=config),
        check=check,
    )


def shell_specs(config: ShellConfig) -> Sequence[ToolSpec]:
    return [shell_spec(config), *(preset_spec(name, p, config) for name, p in config.presets.items())]
