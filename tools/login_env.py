"""The environment commands start from: the server's own, or the user's login shell's.

An app launched by launchd (Claude Desktop on macOS) gets launchd's minimal PATH, so `npm`, Homebrew
tools and whatever the user's profile adds are not found. `shell_env = "login"` resolves the login
shell's environment once, at start: `$SHELL -l -i -c` runs this Python, which prints its environment
between two markers (so what the profile prints is ignored, and a daemon the profile starts that keeps
the pipe open does not hold us). Bounded by a timeout, after which the shell's process group is
killed. Any failure is logged and the server's own environment is used, as with `"inherit"`.

Secrets are not dropped here: the shell runner scrubs whatever environment it starts from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pwd
import select
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping

import anyio.to_thread

from tools.shell import ShellConfig

log = logging.getLogger(__name__)

LOGIN_TIMEOUT_S = 5.0
_BEGIN, _END = b"\0offload-env-begin\0", b"\0offload-env-end\0"
_SHELL_OWN = frozenset({"PWD", "OLDPWD", "SHLVL", "_"})
"""Set by the shell that printed the environment, for itself: not the commands' business."""
_DUMP = (
    "import json, os, sys; "
    f"sys.stdout.buffer.write({_BEGIN!r} + json.dumps(dict(os.environ)).encode() + {_END!r}); "
    "sys.stdout.flush()"
)


class LoginEnvError(Exception):
    """The login shell's environment could not be read: it failed, timed out, or printed no environment."""


def login_shell(environ: Mapping[str, str]) -> str:
    """$SHELL, else the user's shell from the password database."""
    shell = environ.get("SHELL")
    with contextlib.suppress(KeyError):
        shell = shell or pwd.getpwuid(os.getuid()).pw_shell
    if not shell:
        raise LoginEnvError("neither $SHELL nor the password database names a login shell")
    return shell


def login_environment(shell: str, environ: Mapping[str, str], timeout_s: float = LOGIN_TIMEOUT_S) -> dict[str, str]:
    """The environment `shell` sets up as an interactive login shell started with `environ`."""
    argv = [shell, "-l", "-i", "-c", f"{shlex.quote(sys.executable)} -c {shlex.quote(_DUMP)}"]
    with tempfile.TemporaryFile() as errors:
        try:
            child = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=errors,
                env=dict(environ),
                start_new_session=True,
            )
        except OSError as exc:
            raise LoginEnvError(f"{shell} could not be started ({exc.strerror})") from None
        try:
            output = _read_until_end(child, timeout_s)
        finally:
            _end(child)
        if output is None:
            raise LoginEnvError(f"{shell} printed no environment within {timeout_s:g} s; it was killed")
        if _END not in output:
            errors.seek(0)
            said = errors.read()[-300:].decode(errors="replace").strip()
            raise LoginEnvError(
                f"{shell} exited with status {child.returncode} before printing its environment"
                + (f"; it said: {said}" if said else "")
            )
    found = _between_markers(output)
    if found is None:
        raise LoginEnvError(f"{shell} printed an environment that cannot be read")
    return {name: value for name, value in found.items() if name not in _SHELL_OWN}


def _between_markers(output: bytes) -> dict[str, str] | None:
    """The JSON object after the last begin marker before the last end marker (a profile may print the
    markers itself); None if there is none."""
    end = output.rfind(_END)
    begin = output.rfind(_BEGIN, 0, end)
    if begin < 0:
        return None
    try:
        found = json.loads(output[begin + len(_BEGIN) : end])
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def _read_until_end(child: subprocess.Popen[bytes], timeout_s: float) -> bytes | None:
    """What the shell prints up to the end marker, or to EOF; None if the time runs out first."""
    assert child.stdout is not None
    fd = child.stdout.fileno()
    deadline = time.monotonic() + timeout_s
    output = b""
    while _END not in output:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        output += chunk
    return output


def _end(child: subprocess.Popen[bytes]) -> None:
    """Kills what is left of the shell's group (a hung profile, a daemon it started in the group)."""
    with contextlib.suppress(OSError):
        os.killpg(child.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(timeout=1)
    if child.stdout is not None:
        child.stdout.close()


def command_environment(
    mode: str, path: str | None, environ: Mapping[str, str], timeout_s: float = LOGIN_TIMEOUT_S
) -> dict[str, str] | None:
    """The environment commands start from, resolved once at start; None means the server's own
    (`os.environ`, read when each command starts). `path`, if set, is the PATH commands get."""
    base: dict[str, str] | None = None
    if mode == "login":
        try:
            shell = login_shell(environ)
            base = {**environ, **login_environment(shell, environ, timeout_s)}
            log.info("commands get the environment of the login shell %s (PATH has %d entries)", shell, _entries(base))
        except LoginEnvError as exc:
            log.warning("shell_env = login: %s; commands get the server's own environment instead", exc)
    if path is not None:
        base = {**(environ if base is None else base), "PATH": path}
    return base


def _entries(environ: Mapping[str, str]) -> int:
    return len([part for part in environ.get("PATH", "").split(os.pathsep) if part])


async def with_command_environment(config: ShellConfig, mode: str, path: str | None) -> ShellConfig:
    """`config` with the environment its commands start from, resolved once (off the event loop)."""
    if mode != "login" and path is None:
        return config
    base = await anyio.to_thread.run_sync(command_environment, mode, path, dict(os.environ))
    return dataclasses.replace(config, base_env=base)
