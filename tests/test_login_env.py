"""`shell_env = "login"`: the login shell's environment, read once at start, against fake login shells.

Each fake `$SHELL` is a real script run the way a login shell is (`-l -i -c COMMAND`): it sets up
its environment as a profile would, then runs the command.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from pathlib import Path

import anyio
import pytest
from conftest import FakeClock, Gate, call, open_client

from server.config import Settings
from tools.login_env import LoginEnvError, command_environment, login_environment
from tools.process import wait_for_exit

pytestmark = pytest.mark.anyio

KNOWN_PATH = "/opt/offload-test/bin:/usr/bin:/bin"


def fake_shell(tmp_path: Path, profile: str) -> str:
    """A login shell whose profile is `profile`; it then runs what `-c` names."""
    script = tmp_path / "fake-login-shell"
    script.write_text(
        "#!/bin/sh\n"
        '[ "$1 $2 $3" = "-l -i -c" ] || { echo "not started as a login shell: $*" >&2; exit 64; }\n'
        f"{profile}\n"
        'exec /bin/sh -c "$4"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def test_the_login_shells_environment_is_read(tmp_path: Path) -> None:
    shell = fake_shell(
        tmp_path,
        f"export PATH={KNOWN_PATH}; export FROM_PROFILE='a b\nc'; echo 'Welcome!'; printf 'noise\\0'",
    )
    found = login_environment(shell, {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert found["PATH"] == KNOWN_PATH
    assert found["FROM_PROFILE"] == "a b\nc"
    assert found["HOME"] == str(tmp_path)
    assert "PWD" not in found and "SHLVL" not in found


def test_a_daemon_the_profile_leaves_on_the_pipe_does_not_hold_us(tmp_path: Path) -> None:
    shell = fake_shell(tmp_path, f"export PATH={KNOWN_PATH}; setsid sleep 30 & echo $! > {tmp_path}/daemon")
    started = time.monotonic()
    assert login_environment(shell, {"PATH": "/usr/bin:/bin"}, timeout_s=10)["PATH"] == KNOWN_PATH
    assert time.monotonic() - started < 3  # read up to the end marker, not to EOF or the timeout
    os.kill(int((tmp_path / "daemon").read_text()), 9)


async def test_a_hanging_profile_times_out_is_killed_and_falls_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shell = fake_shell(tmp_path, f"echo $$ > {tmp_path}/pid; sleep 300")
    environ = {"SHELL": shell, "PATH": "/usr/bin:/bin"}
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        assert command_environment("login", None, environ, timeout_s=0.5) is None
    assert time.monotonic() - started < 3
    assert "printed no environment within 0.5 s; it was killed" in caplog.text
    assert "server's own environment instead" in caplog.text
    with anyio.fail_after(5):
        await wait_for_exit(int((tmp_path / "pid").read_text()))


def test_a_failing_profile_falls_back_and_says_why(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shell = fake_shell(tmp_path, "echo 'profile: syntax error near line 3' >&2; exit 3")
    with pytest.raises(LoginEnvError, match=r"exited with status 3 .*syntax error near line 3"):
        login_environment(shell, {"PATH": "/usr/bin:/bin"})
    with caplog.at_level(logging.WARNING):
        assert command_environment("login", None, {"SHELL": shell}) is None
    assert "exited with status 3" in caplog.text
    missing = str(tmp_path / "no-such-shell")
    with pytest.raises(LoginEnvError, match="could not be started"):
        login_environment(missing, {})


def test_shell_path_sets_path_whatever_shell_env_says(tmp_path: Path) -> None:
    assert command_environment("inherit", None, {"PATH": "/bin"}) is None
    assert command_environment("inherit", "/x/bin:/bin", {"PATH": "/bin", "A": "1"}) == {
        "PATH": "/x/bin:/bin",
        "A": "1",
    }
    shell = fake_shell(tmp_path, f"export PATH={KNOWN_PATH}")
    assert command_environment("login", "/only", {"SHELL": shell})["PATH"] == "/only"  # type: ignore[index]


async def test_commands_run_with_the_login_environment_minus_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: FakeClock, gate: Gate
) -> None:
    shell = fake_shell(tmp_path, f"export PATH={KNOWN_PATH}; export PROFILE_API_TOKEN=hush; export EDITOR=vi")
    monkeypatch.setenv("SHELL", shell)
    settings = Settings(shell_env="login", data_dir=tmp_path / "data")
    async with open_client(settings, clock, gate) as (_, client):
        fired = await call(
            client, "fire_tool", tool="shell", arguments={"command": 'echo "$PATH|$EDITOR|${PROFILE_API_TOKEN-unset}"'}
        )
        done = await call(client, "poll_output", task_ids=[fired["task_id"]], timeout_s=10)
    assert done["done"][0]["output"]["text"].strip() == f"{KNOWN_PATH}|vi|unset"


def test_a_profile_that_prints_the_markers_itself_never_stops_the_server(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by review: a stray end marker before the real output crashed the server at start."""
    shell = fake_shell(tmp_path, f"export PATH={KNOWN_PATH}; printf '\\0offload-env-end\\0 junk'")
    with caplog.at_level(logging.WARNING):
        found = command_environment("login", None, {"SHELL": shell, "PATH": "/usr/bin:/bin"})
    assert found is None or found["PATH"] == KNOWN_PATH  # read, or fallen back with a warning; never raised
    shell = fake_shell(tmp_path, f'export PATH={KNOWN_PATH}; printf \'\\0offload-env-begin\\0{{"PATH": "/fake"}}\'')
    assert login_environment(shell, {"PATH": "/usr/bin:/bin"})["PATH"] == KNOWN_PATH  # the last begin marker


async def test_a_secret_only_the_login_profile_exports_is_masked_in_replies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: FakeClock, gate: Gate
) -> None:
    """Found by review: on macOS a token often lives only in the profile; `gh auth token` printed it clear."""
    secret = "ghp_profile_only_0123456789abcdef"
    shell = fake_shell(tmp_path, f"export PATH={KNOWN_PATH}; export PROFILE_GH_TOKEN={secret}")
    monkeypatch.setenv("SHELL", shell)
    (tmp_path / "token.txt").write_text(secret)
    settings = Settings(shell_env="login", data_dir=tmp_path / "data")
    async with open_client(settings, clock, gate) as (_, client):
        fired = await call(client, "fire_tool", tool="shell", arguments={"command": f"cat {tmp_path}/token.txt"})
        done = await call(client, "poll_output", task_ids=[fired["task_id"]], timeout_s=10)
    assert secret not in done["done"][0]["output"]["text"]
