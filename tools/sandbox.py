"""Sandboxed shell commands: each command runs under bubblewrap (`bwrap`), as Claude Code runs its Bash tool.

What a sandboxed command sees:
- the system read-only (`--ro-bind / /`), with its owner's `shell_roots` bound writable;
- a private `/tmp` and `/dev`, its own `/proc` in its own PID namespace: the server, its environment
  and every other owner's processes are not there to read;
- the data directory and the other owners' roots replaced by empty directories;
- no capabilities (`--cap-drop ALL`), so even root inside cannot unmount what hides them;
- the network, or (`network = false`) only a loopback of its own.

The sandbox is a prefix of the command line: `bwrap` leads the command's process group (a detached
command's capture process, which writes to the data directory, stays outside it), without a new session
inside, so signalling the group reaches every process in the sandbox, and `--die-with-parent` ends the
sandbox with its parent (the server, or the capture process).
A command that kills itself with a signal reports exit code 128+N from inside the sandbox (bwrap passes
a status on, not a signal).
Where bwrap is missing or refused, `check` fails at start: there is never a silent fallback.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import anyio

from tools.policy import ShellPolicy

Kind = Literal["none", "bwrap"]

CHECK_TIMEOUT_S = 10.0
PID_1 = ("/bin/sh", "-c", '"$@"; exit $?', "sh")
"""The namespace's PID 1, which runs the command as its child. Not bwrap's own reaper: bwrap exits as soon
as that reaper reports the command's status, leaving it a zombie in the command's process group until the
system's init reaps it, and every group check after the command then reads all of /proc (4-16 ms measured
here). This one is reaped by bwrap itself. As PID 1 it ignores the group's SIGTERM (the kernel shields a
namespace's init), so it just ends when the command does; its own end takes the namespace along."""


class SandboxError(RuntimeError):
    """The sandbox a setting asks for cannot run here; the message says why and what to change."""


@dataclass(frozen=True, slots=True)
class Sandbox:
    """One owner's sandbox, built by the server from its settings."""

    kind: Kind = "none"
    writable: tuple[str, ...] = ()
    """Real paths bound read-write: the owner's roots."""
    hidden: tuple[str, ...] = ()
    """Real paths replaced by an empty directory: the data directory, other owners' roots."""
    network: bool = True

    @property
    def on(self) -> bool:
        return self.kind != "none"


@functools.cache
def bwrap_path() -> str | None:
    return shutil.which("bwrap")


def prefix(sandbox: Sandbox, cwd: str | None) -> list[str]:
    """The words that put a command inside `sandbox`; empty when it is off."""
    if not sandbox.on:
        return []
    binary = bwrap_path()
    if binary is None:
        raise SandboxError(_missing())
    argv = [
        binary,
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--tmpfs",
        "/tmp",  # noqa: S108 - a private, empty /tmp inside the sandbox
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--cap-drop",
        "ALL",
        "--die-with-parent",
    ]
    if not sandbox.network:
        argv.append("--unshare-net")
    # Hidden paths outside the owner's roots first (a root inside one is bound over the empty directory),
    # then the roots, then hidden paths inside a root. Under the private /tmp only the roots exist.
    outside = [p for p in sandbox.hidden if not any(_within(p, root) for root in sandbox.writable)]
    argv += [word for p in outside if not _within(p, "/tmp") and os.path.exists(p) for word in ("--tmpfs", p)]  # noqa: S108
    for path in sandbox.writable:
        argv += ["--bind", path, path]
    argv += [word for p in sandbox.hidden if p not in outside and os.path.exists(p) for word in ("--tmpfs", p)]
    if cwd is not None:
        argv += ["--chdir", cwd]
    return [*argv, "--as-pid-1", "--", *PID_1]


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


async def check(sandboxes: Sequence[Sandbox]) -> None:
    """Runs a trivial command under each distinct sandbox once, at start; SandboxError if one cannot run."""
    for sandbox in dict.fromkeys(s for s in sandboxes if s.on):
        argv = [*prefix(sandbox, None), "/bin/sh", "-c", "exit 0"]
        try:
            with anyio.fail_after(CHECK_TIMEOUT_S):
                done = await anyio.run_process(argv, check=False)
        except (OSError, TimeoutError) as exc:
            raise SandboxError(f"shell_sandbox = 'bwrap' cannot start ({exc}); {_fix()}") from exc
        if done.returncode != 0:
            said = done.stderr.decode(errors="replace").strip() or f"exit status {done.returncode}"
            raise SandboxError(f"shell_sandbox = 'bwrap' cannot start a sandbox here: {said}; {_fix()}")


def _missing() -> str:
    return f"shell_sandbox = 'bwrap' but the bwrap program is not on PATH; {_fix()}"


def _fix() -> str:
    return (
        "install bubblewrap (`apt-get install bubblewrap`, `dnf install bubblewrap`) and allow unprivileged user "
        "namespaces, or set shell_sandbox = 'none' (then restrict the shell another way: shell_mode = 'allow-list' "
        "or 'disabled')"
    )


@dataclass(frozen=True, slots=True)
class OwnerShell:
    """What one owner's shell commands may do and where they run: its policy and its sandbox."""

    policy: ShellPolicy = field(default_factory=ShellPolicy)
    sandbox: Sandbox = field(default_factory=Sandbox)

    @property
    def confined(self) -> bool:
        """Can this owner's commands not read the server or other owners? (sandboxed, allow-list, or no shell)"""
        return self.sandbox.on or self.policy.mode in ("allow-list", "disabled")
