"""Sandboxed shell commands: each command runs under bubblewrap (`bwrap`), as Claude Code runs its Bash tool.

What a sandboxed command sees:
- the system read-only (`--ro-bind / /`), with its owner's `shell_roots` bound writable;
- a private `/tmp` and `/dev`, its own `/proc` in its own PID namespace: the server, its environment
  and every other owner's processes are not there to read;
- the data directory and the other owners' roots replaced by empty directories;
- no capabilities (`--cap-drop ALL`), so it cannot unmount what hides them;
- never root: a server running as root has bwrap drop the command to an unprivileged uid (nobody's) with
  `setpriv` once the mounts are made (a user namespace would not do: bwrap run by root maps the uid inside
  to host root, which may still write /proc/sys, connect to root's sockets and write root's files); and
  /proc's writable knobs (`/proc/sys`, `/proc/sysrq-trigger`, ...) bound read-only over its own /proc;
- the network, or (`network = false`) only a loopback of its own and no unix sockets: a seccomp filter
  (built by libseccomp) refuses `socket(AF_UNIX)`, datagram socket pairs and io_uring, so the host's
  pathname sockets (which a network namespace does not hide) cannot be reached.

The sandbox is a prefix of the command line: `bwrap` leads the command's process group (a detached
command's capture process, which writes to the data directory, stays outside it), without a new session
inside, so signalling the group reaches every process in the sandbox, and `--die-with-parent` ends the
sandbox with its parent (the server, or the capture process).
A command that kills itself with a signal reports exit code 128+N from inside the sandbox (bwrap passes
a status on, not a signal).
Where bwrap is missing or refused, `check` fails at start: there is never a silent fallback. It also checks,
inside a sandbox, that the command is not root, has no capabilities, cannot write /proc/sys, and can write
each of its owner's roots (a root-owned root is not writable by nobody: the message says what to change).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import os
import pwd
import shutil
import socket
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Literal

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


PID_1_IN = ("/bin/sh", "-c", 'cd -- "$1" || exit 125; shift; "$@"; exit $?', "sh")
"""PID_1 with a working directory first: a command dropped to nobody enters it as nobody (bwrap's `--chdir`
runs as root without capabilities, which may not enter a directory only nobody may)."""
PROC_KNOBS = ("sys", "sysrq-trigger", "irq", "bus", "fs", "acpi", "scsi")
"""/proc's entries a root process could write (the list runc and Docker make read-only), bound read-only over
the sandbox's own /proc. bwrap 0.8 covers irq and bus only: it asks whether /proc/sys itself is writable,
which a directory there never is, though the knobs in it are."""
DROP_ROOT = ("--reuid={uid}", "--regid={gid}", "--clear-groups", "--bounding-set=-all", "--inh-caps=-all")
"""`setpriv` options: the ids, no groups, no capabilities to regain, and `--no-new-privs` after them."""
WITH_FILTER = ("/bin/sh", "-c", 'exec "$@" 3<"$0"')
"""bwrap reads its seccomp filter from fd 3: this opens the filter's file there and becomes bwrap (same pid,
so bwrap still leads the command's process group)."""


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


@functools.cache
def setpriv_path() -> str | None:
    return shutil.which("setpriv")


def as_root() -> bool:
    """Does this server run as root? Then its sandboxed commands run as `unprivileged_ids()`."""
    return os.geteuid() == 0


@functools.cache
def unprivileged_ids() -> tuple[int, int]:
    """The uid and gid a root server's sandboxed commands run as: nobody's (65534 where there is no nobody)."""
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        return 65534, 65534
    return nobody.pw_uid, nobody.pw_gid


_filter_file: list[str] = []


def filter_path() -> str:
    """The seccomp filter of a sandbox without network, as BPF in a private file of this server (0600 in its
    own /tmp, which no sandbox sees); written once, again if something removed it."""
    if _filter_file and os.path.exists(_filter_file[0]):
        return _filter_file[0]
    fd, path = tempfile.mkstemp(prefix="offload-seccomp-", suffix=".bpf")
    with os.fdopen(fd, "wb") as f:
        _no_unix_sockets().export_bpf(f)
    if not _filter_file:
        atexit.register(_remove_filter)
    _filter_file[:] = [path]
    return path


def _remove_filter() -> None:
    with contextlib.suppress(OSError):
        os.unlink(_filter_file[0])


def _no_unix_sockets() -> Any:
    """Refuses `socket(AF_UNIX, ...)` (EPERM), `socketpair(AF_UNIX, SOCK_DGRAM)` (a datagram socket may be
    sent to any path), and io_uring (which makes sockets without the socket call); everything else is allowed.
    A stream socket pair (asyncio's wake-up channel, for one) still works. Other architectures' calls (a
    32-bit program's `socketcall`) are killed, libseccomp's default."""
    try:
        import pyseccomp as seccomp  # type: ignore[import-untyped]  # loaded only where a sandbox has no network
    except (ImportError, OSError) as exc:
        raise SandboxError(
            f"network = false needs libseccomp ({exc}); install it (`apt-get install libseccomp2`) or give "
            "the owner the network (network = true)"
        ) from exc
    refuse = seccomp.ERRNO(errno.EPERM)
    rules = seccomp.SyscallFilter(seccomp.ALLOW)
    # The kernel reads the family as a 32-bit int: a 64-bit compare let socket(0x100000001, ...) make one.
    family_is_unix = seccomp.Arg(0, seccomp.MASKED_EQ, 0xFFFFFFFF, socket.AF_UNIX)
    rules.add_rule(refuse, "socket", family_is_unix)
    type_mask = 0xF  # the socket type without SOCK_NONBLOCK / SOCK_CLOEXEC
    rules.add_rule(
        refuse,
        "socketpair",
        family_is_unix,
        seccomp.Arg(1, seccomp.MASKED_EQ, type_mask, socket.SOCK_DGRAM),
    )
    for call in ("io_uring_setup", "io_uring_enter", "io_uring_register"):
        rules.add_rule(seccomp.ERRNO(errno.ENOSYS), call)
    return rules


def prefix(sandbox: Sandbox, cwd: str | None) -> list[str]:
    """The words that put a command inside `sandbox`; empty when it is off."""
    if not sandbox.on:
        return []
    binary = bwrap_path()
    if binary is None:
        raise SandboxError(_missing())
    root = as_root()
    argv = [
        binary,
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        *(word for knob in PROC_KNOBS for word in ("--ro-bind-try", f"/proc/{knob}", f"/proc/{knob}")),
        "--tmpfs",
        "/tmp",  # noqa: S108 - a private, empty /tmp inside the sandbox
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--cap-drop",
        "ALL",
        *(("--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP") if root else ()),
        "--die-with-parent",
    ]
    if not sandbox.network:
        argv += ["--unshare-net", "--seccomp", "3"]
    # Hidden paths outside the owner's roots first (a root inside one is bound over the empty directory),
    # then the roots, then hidden paths inside a root. Under the private /tmp only the roots exist.
    outside = [p for p in sandbox.hidden if not any(_within(p, root) for root in sandbox.writable)]
    argv += [word for p in outside if not _within(p, "/tmp") and os.path.exists(p) for word in ("--tmpfs", p)]  # noqa: S108
    # Under the private /tmp bwrap makes a root's parents with the host's modes (pytest's 0700, say): searchable
    # instead, or nobody could not reach the root.
    parents = dict.fromkeys(str(up) for path in sandbox.writable if _within(path, "/tmp") for up in _tmp_parents(path))  # noqa: S108
    argv += [word for up in parents for word in ("--perms", "0755", "--dir", up)]
    for path in sandbox.writable:
        argv += ["--bind", path, path]
    argv += [word for p in sandbox.hidden if p not in outside and os.path.exists(p) for word in ("--tmpfs", p)]
    if cwd is not None and not root:
        argv += ["--chdir", cwd]
    argv += ["--as-pid-1", "--"]
    if root:  # setpriv as PID 1 drops to nobody (the capabilities added above are for this), then PID_1 runs
        uid, gid = unprivileged_ids()
        argv += [_setpriv(), *(o.format(uid=uid, gid=gid) for o in DROP_ROOT), "--no-new-privs", "--"]
        argv += [*PID_1] if cwd is None else [*PID_1_IN, cwd]
    else:
        argv += PID_1
    return argv if sandbox.network else [*WITH_FILTER, filter_path(), *argv]


def _setpriv() -> str:
    found = setpriv_path()
    if found is None:
        raise SandboxError(
            "shell_sandbox = 'bwrap' on a server running as root needs setpriv (util-linux) to drop commands to "
            "an unprivileged uid, and it is not on PATH; install util-linux, or run the server as an "
            "unprivileged user"
        )
    return found


def _tmp_parents(path: str) -> list[PurePath]:
    """The folders between /tmp and `path`, top first."""
    return [up for up in reversed(PurePath(path).parents) if len(up.parts) > 2]


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


CHECK_SCRIPT = """
[ "$(id -u)" != 0 ] || { echo "a sandboxed command still runs as root (uid 0)" >&2; exit 1; }
grep -Eq '^CapEff:[[:space:]]*0+$' /proc/self/status || { grep CapEff /proc/self/status >&2; exit 1; }
! [ -w /proc/sys/kernel/core_pattern ] || { echo "a sandboxed command may write /proc/sys" >&2; exit 1; }
for root; do [ -w "$root" ] && [ -x "$root" ] || { printf %s "$root" >&2; exit 3; }; done
"""
"""Inside each sandbox at start: not root, no capabilities, /proc/sys read-only (`-w` asks, never opens), and
every writable root writable (exit 3 names the one that is not)."""
ROOT_NOT_WRITABLE = 3


async def check(sandboxes: Sequence[Sandbox]) -> None:
    """Runs `CHECK_SCRIPT` under each distinct sandbox once, at start; SandboxError if one cannot run or
    would leave its command root powers (one bwrap start per sandbox, a few ms)."""
    for sandbox in dict.fromkeys(s for s in sandboxes if s.on):
        argv = [*prefix(sandbox, None), "/bin/sh", "-c", CHECK_SCRIPT, "sh", *sandbox.writable]
        try:
            with anyio.fail_after(CHECK_TIMEOUT_S):
                done = await anyio.run_process(argv, check=False)
        except (OSError, TimeoutError) as exc:
            raise SandboxError(f"shell_sandbox = 'bwrap' cannot start ({exc}); {_fix()}") from exc
        said = done.stderr.decode(errors="replace").strip() or f"exit status {done.returncode}"
        if done.returncode == ROOT_NOT_WRITABLE:
            raise SandboxError(_root_not_writable(said))
        if done.returncode != 0:
            raise SandboxError(f"shell_sandbox = 'bwrap' cannot start a sandbox here: {said}; {_fix()}")


def network_exposure(sandboxes: dict[str, Sandbox]) -> str | None:
    """What a sandbox with network on does not hide, naming its owners, for a loud start-up warning: hiding
    abstract sockets and loopback needs a network namespace of its own with user-mode networking, not built."""
    exposed = sorted(name for name, box in sandboxes.items() if box.on and box.network)
    if not exposed:
        return None
    return (
        f"sandboxed shells with network on ({', '.join(exposed)}) can reach this machine's loopback services, the "
        "host's abstract unix sockets and its pathname sockets their uid may write, and read the host's socket "
        "list in /proc/net/unix; set network = false for any owner whose commands you do not trust"
    )


def _root_not_writable(root: str) -> str:
    if not as_root():
        return f"the shell root {root!r} is not writable by this server's user; make it writable or list another"
    uid, gid = unprivileged_ids()
    return (
        f"the shell root {root!r} is not writable (or a folder above it not searchable) by uid {uid}, which "
        "sandboxed commands run as on a server running as root (never as root: root could write /proc/sys, "
        f"root's files and root's sockets); give it that uid (`chown -R {uid}:{gid} {root}`), or run the server "
        "as an unprivileged user who owns it"
    )


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
