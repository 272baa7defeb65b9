"""The shell runner behind `run_shell_background`, the `shell` tool and config presets.

Each command runs under `bash -c` (else `sh -c`) as the leader of a new session, so its
whole process tree shares one process group that can be signalled at once. stdout and
stderr share one pipe, read concurrently with the process, so output interleaves as
produced and a chatty command never blocks on a full pipe.

Attached (the default): the server is the command's parent and reads the pipe; the outcome is
what the server saw when it reaped the command, so no wrapper process is needed. A command
whose server dies is settled `interrupted` by the next one. Detached: the command runs under
a capture process (`ToolContext.capture_argv`) that outlives the server and records the outcome.

Stopping (end, cancel, timeout, shutdown) is one path: TERM the group, keep reading through the
grace period so a trap's last words are kept, KILL, drain, end what left the group.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Protocol

import anyio
import anyio.lowlevel
from anyio.abc import Process
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tools import exit_record
from tools.context import (
    JSON,
    ErrorKind,
    InputClosed,
    LeftRunning,
    Orphan,
    ProcessInfo,
    TaskFailure,
    ToolContext,
)
from tools.policy import ShellPolicy
from tools.process import (
    TASK_MARKER,
    carries_marker,
    end_escaped,
    end_marked,
    identify,
    is_same_process,
    kill_left_behind,
    portable,
    spawning,
    stop_group,
    track,
    untrack,
    wait_for_exit,
)
from tools.registry import ToolSpec
from tools.sandbox import OwnerShell, Sandbox, prefix
from tools.terminal import PipeInput, PtyInput, PtyReader, ReadyWatch, open_pty, with_controlling_tty

if TYPE_CHECKING:
    from tools.presets import Preset

SERVER_PREFIX = "OFFLOAD_"
"""The server's own settings never reach a command (unless `pass_env` names one)."""
SECRET_MARKERS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH", "COOKIE", "SESSION")
"""Environment names containing any of these (case-insensitive) are not passed to commands."""

READ_CHUNK_BYTES = 64 * 1024
DRAIN_AFTER_EXIT_S = 0.5
"""How long output is still read after the command exits while a background child holds the pipe."""
SCRIPT_FILE_OVER_BYTES = 96 * 1024
MAX_PATTERN_CHARS = 1000
"""Longer commands run from a private file: the kernel caps one argument at 128 KiB."""


@dataclass(frozen=True, slots=True)
class ShellConfig:
    """What the operator decides about every shell command; built by the server from Settings."""

    secret_markers: tuple[str, ...] = SECRET_MARKERS
    pass_env: tuple[str, ...] = ()
    """Names passed through even though they look secret."""
    secret_values: tuple[str, ...] = ()
    """Secrets the server holds (the password in redis_url): a variable whose value contains one is never
    passed to a command, whatever its name, `pass_env` included."""
    kill_grace_s: float = 1.0
    detach: bool = False
    """Commands outlive the server (they are not killed at shutdown) and are followed again after a restart."""
    presets: Mapping[str, Preset] = field(default_factory=dict)
    policy: ShellPolicy = field(default_factory=ShellPolicy)
    sandbox: Sandbox = field(default_factory=Sandbox)
    owners: Mapping[str, OwnerShell] = field(default_factory=dict)
    """Per-owner policy and sandbox; an owner without an entry gets `policy` and `sandbox`."""
    base_env: Mapping[str, str] | None = None
    """The environment commands start from (the login shell's, `shell_path`; tools/login_env.py), scrubbed
    like any; None: the server's own."""

    def for_owner(self, owner: str) -> OwnerShell:
        return self.owners.get(owner) or OwnerShell(self.policy, self.sandbox)


class ShellArgs(BaseModel):
    """Arguments of the `shell` tool (and of `run_shell_background`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    command: Annotated[str, Field(min_length=1, description="Run with bash -c in its own process group.")]
    cwd: Annotated[str | None, Field(description="Working directory.")] = None
    env: Annotated[dict[str, str] | None, Field(description="Extra environment variables.")] = None
    stdin: Annotated[str | None, Field(description='Fed to stdin, then closed; "pipe": kept open.')] = None
    pty: Annotated[bool, Field(description="Run in a terminal of rows x cols.")] = False
    rows: int = 24
    cols: int = 80
    ready_when: Annotated[str | None, Field(description="Regex: ready once output matches.")] = None

    @field_validator("rows", "cols")
    @classmethod
    def _terminal_size(cls, value: int) -> int:
        if not 2 <= value <= 1000:
            raise ValueError(f"a terminal of {value} rows or columns cannot be made; use 2 to 1000")
        return value

    @field_validator("ready_when")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None and len(value) > MAX_PATTERN_CHARS:
            raise ValueError(f"ready_when is {len(value)} characters; at most {MAX_PATTERN_CHARS}")
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"ready_when {value!r} is not a valid regular expression ({exc})") from None
        return value

    @model_validator(mode="after")
    def _stdin_fits_pty(self) -> ShellArgs:
        if self.pty and self.stdin == "pipe":
            raise ValueError('pty already keeps the input open for send_input: drop stdin "pipe"')
        return self

    @property
    def interaction(self) -> Interaction:
        return Interaction(
            pipe=self.stdin == PIPE,
            pty=(self.rows, self.cols) if self.pty else None,
            ready_when=self.ready_when,
        )

    @field_validator("env")
    @classmethod
    def _env_is_passable(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for name, text in (value or {}).items():
            if not name or "=" in name or "\x00" in name:
                raise ValueError(f"env name {name!r} cannot be passed to a process (empty, or has '=' or NUL)")
            if "\x00" in text:
                raise ValueError(f"env value of {name!r} contains a NUL byte, which no process can receive")
        return value

    @field_validator("cwd")
    @classmethod
    def _cwd_is_usable(cls, value: str | None) -> str | None:
        """Only spelled right here: whether it exists is checked after the owner's roots (see `check`), so
        a refusal never tells whether a path outside them exists."""
        if value is None:
            return None
        try:
            return str(Path(value).expanduser())
        except (RuntimeError, ValueError) as exc:  # ~nobody, a NUL
            raise ValueError(f"cwd {value[:200]!r} cannot be used ({exc})") from None

    @field_validator("command")
    @classmethod
    def _no_nul(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("command contains a NUL byte")
        return value


PIPE = "pipe"
"""`stdin: "pipe"`: the command's stdin stays open for `send_input`."""


@dataclass(frozen=True, slots=True)
class Interaction:
    """How a command talks back: input kept open (a pipe, or a terminal of `pty` rows x cols) and the
    output that makes it ready."""

    pipe: bool = False
    pty: tuple[int, int] | None = None
    ready_when: str | None = None

    @property
    def keeps_input(self) -> bool:
        return self.pipe or self.pty is not None


def interaction_of(arguments: object) -> Interaction | None:
    """How a task's command talks back, if it is a shell command's (a preset's `stdin` is always text)."""
    return arguments.interaction if isinstance(arguments, ShellArgs) else None


def scrubbed_environment(
    base: Mapping[str, str], config: ShellConfig, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The server's environment minus anything that looks like a secret, the server's own settings
    (`OFFLOAD_*`: where its data lives, how it reaches Redis) and any variable holding a secret the server
    knows, plus `extra`."""
    markers = tuple(marker.upper() for marker in config.secret_markers)
    keep = set(config.pass_env)
    env = {
        name: value
        for name, value in base.items()
        if (
            name in keep
            or not (name.upper().startswith(SERVER_PREFIX) or any(marker in name.upper() for marker in markers))
        )
        and not any(secret in value for secret in config.secret_values)
    }
    env.update(extra or {})
    return env


@functools.cache
def _shell() -> str:
    return shutil.which("bash") or "/bin/sh"


def _argv(command: str, script: Path, sandbox: Sandbox, cwd: str | None) -> list[str]:
    """`bash -c COMMAND`, inside the owner's sandbox if it has one; a command too long for one
    argument runs from a private file (outside a sandbox, which cannot see the data directory)."""
    if len(command.encode()) <= SCRIPT_FILE_OVER_BYTES or sandbox.on:
        return [*prefix(sandbox, cwd), _shell(), "-c", command]
    fd = os.open(script, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(command)
    return [_shell(), str(script)]


async def run_command(
    command: str,
    ctx: ToolContext,
    config: ShellConfig,
    *,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    stdin: str | None = None,
    interaction: Interaction = Interaction(),
) -> JSON:
    """Runs one command to completion; a non-zero exit or a death by signal becomes a `TaskFailure`."""
    environment = scrubbed_environment(os.environ if config.base_env is None else config.base_env, config, env)
    environment[TASK_MARKER] = ctx.task_id  # how what leaves the group is found again
    script = ctx.output_path.with_suffix(".sh")
    try:
        argv = _argv(command, script, config.for_owner(ctx.owner).sandbox, cwd)
        if config.detach:
            return await _run_detached(argv, ctx, config, cwd, environment, stdin)
        if interaction.pty is not None:
            environment.setdefault("TERM", "xterm-256color")
            return await _run_in_pty(argv, ctx, config, Spawn(cwd, environment, stdin, interaction))
        return await _run_attached(argv, ctx, config, Spawn(cwd, environment, stdin, interaction))
    finally:
        if not config.detach:
            _unlink(script)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


@dataclass(frozen=True, slots=True)
class Spawn:
    """What an attached command starts with."""

    cwd: str | None
    env: dict[str, str]
    stdin: str | None
    interaction: Interaction


async def _feed_stdin(process: Process, text: str | None) -> None:
    if process.stdin is None:
        return
    async with process.stdin:
        # A command that exits without reading all of it is not a failure of ours.
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await process.stdin.send((text or "").encode())


class _Source(Protocol):
    async def receive(self, max_bytes: int = ...) -> bytes: ...


class _Pump:
    """Copies the pipe into the task's output until EOF or until told to stop.

    It waits for data holding nothing shared, so a quiet command never holds up another. Copying
    takes turns (`ToolContext.copy_turns`, one chunk per loop pass across all tasks), so a flood of
    output from many commands cannot crowd the protocol out of the event loop. It runs shielded: a
    cancelled task keeps reading while its group is stopped, so what a trap prints on TERM is kept.
    """

    def __init__(self, stream: _Source | None, ctx: ToolContext, ready_when: str | None = None) -> None:
        self._stream = stream
        self._ctx = ctx
        self._ready = ReadyWatch(ready_when)
        self.scope = anyio.CancelScope(shield=True)
        self.eof = anyio.Event()

    async def run(self) -> None:
        assert self._stream is not None
        with self.scope:
            try:
                while True:
                    chunk = await self._stream.receive(READ_CHUNK_BYTES)
                    async with self._ctx.copy_turns:
                        self._ctx.write_output(chunk)
                        if self._ready.feed(chunk):  # stored first: a reader told "ready" sees the line
                            self._ctx.set_ready()
                        await anyio.lowlevel.checkpoint()  # the next pump copies on the next pass
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass
            finally:
                self.eof.set()

    async def drain(self, seconds: float) -> None:
        """Lets the pump read on for up to `seconds` (or to EOF), then stops it."""
        with anyio.move_on_after(seconds):
            await self.eof.wait()
        self.scope.cancel()


async def _run_attached(argv: list[str], ctx: ToolContext, config: ShellConfig, spawn: Spawn) -> JSON:
    """The server is the command's parent and reads its pipe."""
    started = time.monotonic()
    keep_open = spawn.interaction.pipe
    with spawning():
        process = await anyio.open_process(
            argv,
            stdin=subprocess.PIPE if spawn.stdin is not None or keep_open else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=spawn.cwd,
            env=spawn.env,
            start_new_session=True,
        )
        track(process.pid)
    ctx.set_process(identify(process.pid))
    pump = _Pump(process.stdout, ctx, spawn.interaction.ready_when)
    held = PipeInput(process.stdin) if keep_open and process.stdin is not None else None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(pump.run)
            if held is not None:
                ctx.set_input(held)
            else:
                tg.start_soon(_feed_stdin, process, spawn.stdin)
            try:
                await _supervise(process.pid, process.wait, pump)
            finally:
                with anyio.CancelScope(shield=True):
                    ctx.set_input(None)
                    if held is not None:
                        await held.close()
                    await _stop(process.pid, ctx, config.kill_grace_s, process.wait)
                    await pump.drain(DRAIN_AFTER_EXIT_S)
                tg.cancel_scope.cancel()  # a stdin nobody reads
    finally:
        with anyio.CancelScope(shield=True):
            await process.aclose()
        untrack(process.pid)
    return exit_record.outcome(process.returncode, time.monotonic() - started, ctx.output_bytes())


async def _supervise(pid: int, leader_exit: Callable[[], Awaitable[object]], pump: _Pump) -> None:
    """Until the command exits, then a little longer for the output a background child still writes."""
    await leader_exit()
    with anyio.move_on_after(DRAIN_AFTER_EXIT_S):
        await pump.eof.wait()


async def _type_at_start(held: PtyInput, text: str) -> None:
    with contextlib.suppress(InputClosed):  # a command that ends first did not want it
        await held.send(text.encode(), False)


async def _run_in_pty(argv: list[str], ctx: ToolContext, config: ShellConfig, spawn: Spawn) -> JSON:
    """The command runs on a pseudo-terminal that is its controlling terminal; the server holds the
    master side: what the terminal shows is the output, what `send_input` writes is typed."""
    assert spawn.interaction.pty is not None
    started = time.monotonic()
    master, slave = open_pty(*spawn.interaction.pty)
    try:
        with spawning():
            process = await anyio.open_process(
                with_controlling_tty(argv),
                stdin=slave,
                stdout=slave,
                stderr=slave,
                cwd=spawn.cwd,
                env=spawn.env,
                start_new_session=True,
            )
            track(process.pid)
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)  # the command's own copies keep it open; EOF (EIO) once they are gone
    ctx.set_process(identify(process.pid))
    pump, held = _Pump(PtyReader(master), ctx, spawn.interaction.ready_when), PtyInput(master)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(pump.run)
            ctx.set_input(held)
            if spawn.stdin:
                tg.start_soon(_type_at_start, held, spawn.stdin)
            try:
                await _supervise(process.pid, process.wait, pump)
            finally:
                with anyio.CancelScope(shield=True):
                    ctx.set_input(None)
                    held.close()
                    await _stop(process.pid, ctx, config.kill_grace_s, process.wait)
                    await pump.drain(DRAIN_AFTER_EXIT_S)
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await process.aclose()
        untrack(process.pid)
        anyio.notify_closing(master)
        os.close(master)
    return exit_record.outcome(process.returncode, time.monotonic() - started, ctx.output_bytes())


async def _stop(pgid: int, ctx: ToolContext, grace_s: float, leader_exit: Callable[[], Awaitable[object]]) -> None:
    """TERM, grace, KILL the group; then whatever left the group (setsid, set -m) goes too."""
    await stop_group(pgid, grace_s, leader_exit)
    await end_escaped(ctx.task_id, grace_s)


async def _run_detached(
    argv: list[str], ctx: ToolContext, config: ShellConfig, cwd: str | None, env: dict[str, str], stdin: str | None
) -> JSON:
    """The command runs under a capture process that outlives the server (see `server/capture.py`).

    A plain `Popen`, watched through a pidfd: asyncio's subprocess transport kills the process it
    owns when it is closed, and this one must survive the server's shutdown.
    """
    stdin_path = ctx.output_path.with_suffix(".stdin")
    capture = [*ctx.capture_argv, *(["--portable"] if portable() else [])]
    if stdin is not None:
        fd = os.open(stdin_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(stdin)
        capture += ["--stdin", str(stdin_path)]
    with spawning():
        watcher = subprocess.Popen(  # noqa: ASYNC220 - spawning does not block on the child
            [*capture, "--", *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
        track(watcher.pid)
    ctx.set_watcher(identify(watcher.pid))
    command: ProcessInfo | None = None

    async def watcher_exit() -> None:
        await wait_for_exit(watcher.pid)
        watcher.wait()  # reaps it: it has exited, so this does not block

    try:
        with anyio.CancelScope(shield=True):  # a command must be known before anything may stop it
            command_pid = await _announced_pid(watcher)
        if command_pid is not None:
            command = identify(command_pid)
            ctx.set_process(command)
        await watcher_exit()
    except anyio.get_cancelled_exc_class():
        if ctx.shutting_down():
            raise LeftRunning(f"detached command (pid {command_pid}) keeps running") from None
        with anyio.CancelScope(shield=True):
            if command is not None:
                await stop_group(command.pid, config.kill_grace_s, watcher_exit)
            with anyio.move_on_after(config.kill_grace_s + DRAIN_AFTER_EXIT_S + 1):
                await watcher_exit()
        raise
    finally:
        if watcher.returncode is not None:  # left running at shutdown, it stays ours: never an orphan
            untrack(watcher.pid)
            _unlink(stdin_path)
            _unlink(ctx.output_path.with_suffix(".sh"))
    return await _outcome_of_capture(command, ctx, config, started_wall_s=None)


async def _outcome_of_capture(
    command: ProcessInfo | None, ctx: ToolContext, config: ShellConfig, started_wall_s: float | None
) -> JSON:
    """What the capture process recorded; if it died without a record, its command must not run on
    unwatched: what is left of it is ended, and the task is `interrupted`."""
    if exit_record.read(ctx.exit_path) is None:
        if command is not None:
            await kill_left_behind(command, config.kill_grace_s)
        await end_marked(ctx.task_id, config.kill_grace_s)
    return exit_record.outcome_from(ctx.exit_path, started_wall_s)


async def _announced_pid(watcher: subprocess.Popen[bytes]) -> int | None:
    """The command's pid, which the capture process writes as its first line."""
    assert watcher.stdout is not None
    fd = watcher.stdout.fileno()
    try:
        with anyio.fail_after(10):
            await anyio.wait_readable(fd)
        line = os.read(fd, 64)
        return int(line.strip()) if line.strip() else None
    except (TimeoutError, ValueError, OSError):
        return None
    finally:
        watcher.stdout.close()


# ---- after a restart ----


async def recover(orphan: Orphan, ctx: ToolContext, *, config: ShellConfig) -> JSON:
    """The truthful end of a command whose server died: follow a detached one that still runs,
    report one whose capture process recorded its end, else `interrupted`, with nothing left."""
    watcher = orphan.watcher
    if (
        orphan.detached
        and watcher is not None
        and (is_same_process(watcher) or carries_marker(watcher.pid, ctx.task_id))
    ):
        return await _follow(watcher, orphan, ctx, config)
    record = exit_record.read(ctx.exit_path)
    with anyio.CancelScope(shield=True):  # a cancel_task meanwhile must not stop it between TERM and KILL
        killed = orphan.process is not None and await kill_left_behind(orphan.process, config.kill_grace_s)
        killed = await end_marked(ctx.task_id, config.kill_grace_s) > 0 or killed
    if record is not None:
        return exit_record.outcome_from(ctx.exit_path, orphan.started_wall_s)
    what = "what was left of it was killed" if killed else "nothing of it was still running"
    raise TaskFailure(ErrorKind.INTERRUPTED, f"the server running this command stopped before it finished; {what}")


async def _follow(watcher: ProcessInfo, orphan: Orphan, ctx: ToolContext, config: ShellConfig) -> JSON:
    try:
        await wait_for_exit(watcher.pid)
    except anyio.get_cancelled_exc_class():
        if ctx.shutting_down():
            raise LeftRunning(f"detached command (capture pid {watcher.pid}) keeps running") from None
        with anyio.CancelScope(shield=True):
            if orphan.process is not None:
                await kill_left_behind(orphan.process, config.kill_grace_s)
            with anyio.move_on_after(config.kill_grace_s + DRAIN_AFTER_EXIT_S + 1):
                await wait_for_exit(watcher.pid)
        raise
    return await _outcome_of_capture(orphan.process, ctx, config, orphan.started_wall_s)


def check_cwd(cwd: str | None, what: str) -> None:
    try:
        usable = cwd is None or Path(cwd).is_dir()
    except OSError as exc:  # a name too long, say
        raise ValueError(f"{what}cwd {(cwd or '')[:200]!r} cannot be used ({exc.strerror})") from None
    if not usable:
        raise ValueError(f"{what}cwd {cwd!r} is not an existing directory; create it or choose another")


def shell_spec(config: ShellConfig) -> ToolSpec:
    def check(args: ShellArgs, owner: str) -> None:
        shell = config.for_owner(owner)  # the owner's own policy and sandbox
        shell.policy.command_to_run(args.command, args.env)
        check_cwd(shell.policy.cwd_to_use(args.cwd), "")  # the roots first, then whether it exists
        if config.detach and (args.interaction.keeps_input or args.ready_when is not None):
            raise ValueError(
                'stdin "pipe", pty and ready_when need a command the server stays attached to, and detach is on: '
                "send all input at start with stdin text, and wait for output with poll_output(wait_for=...)"
            )
        if shell.sandbox.on and len(args.command.encode()) > SCRIPT_FILE_OVER_BYTES:
            raise ValueError(
                f"a sandboxed command may be at most {SCRIPT_FILE_OVER_BYTES // 1024} KiB; "
                "put a long script in a file under your shell_roots and run that file"
            )

    async def handler(args: ShellArgs, ctx: ToolContext) -> JSON:
        policy = config.for_owner(ctx.owner).policy
        command = policy.command_to_run(args.command, args.env)
        cwd = policy.cwd_to_use(args.cwd)
        stdin = None if args.stdin == PIPE else args.stdin
        return await run_command(command, ctx, config, cwd=cwd, env=args.env, stdin=stdin, interaction=args.interaction)

    return ToolSpec(
        name="shell",
        description="Run a shell command (bash -c) in its own process group; output is streamed to the task.",
        input_model=ShellArgs,
        handler=handler,
        destructive=True,
        open_world=True,
        check=check,
        recover=functools.partial(recover, config=config),
    )
