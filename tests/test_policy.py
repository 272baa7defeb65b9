"""Shell policy and secret redaction, through the MCP client where the client would meet them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import FakeClock, Gate, call, error_text, finish, open_client

from server.config import Settings
from tools.policy import PolicyError, ShellPolicy

pytestmark = pytest.mark.anyio

BYPASSES = [
    "s\\udo ls",
    "'su'do ls",
    "sh -c 'sudo ls'",
    'bash -c "sudo ls"',
    "env sudo ls",
    "env -i PATH=/usr/bin sudo ls",
    "/usr/bin/sudo ls",
    "true; sudo ls",
    "true && sudo ls",
    "true | sudo ls",
    "$(printf sudo) ls",
    "`printf sudo` ls",
    "x=sudo; $x ls",
    "true\nsudo ls",
    "{sudo,ls}",
    "/usr/bin/su?o ls",
    "git status > /etc/passwd",
    "nohup sudo ls",
]


def allow_list(**extra: object) -> ShellPolicy:
    return ShellPolicy.build(mode="allow-list", allow=["git status", "echo", "re:ls( -l)?"], deny=[], roots=[], **extra)  # type: ignore[arg-type]


@pytest.mark.parametrize("command", BYPASSES)
def test_allow_list_refuses_every_bypass(command: str) -> None:
    with pytest.raises(PolicyError):
        allow_list().command_to_run(command, None)


def test_allow_list_runs_exactly_the_words_it_checked() -> None:
    policy = allow_list()
    assert policy.command_to_run("git status --short", None) == "git status --short"
    assert policy.command_to_run("echo 'a b' *.py", None) == "echo 'a b' '*.py'"  # no glob at run time
    assert policy.command_to_run("ls -l", None) == "ls -l"
    for refused in ["ls -la", "git push", "gitx status", "ls -l /; rm x"]:
        with pytest.raises(PolicyError):
            policy.command_to_run(refused, None)
    with pytest.raises(PolicyError, match="`env` is refused"):
        policy.command_to_run("echo hi", {"BASH_ENV": "/tmp/x"})


@pytest.mark.parametrize("command", ["s\\udo ls", "sh -c 'sudo ls'", "env sudo ls", "true && /usr/bin/sudo ls"])
def test_deny_list_sees_through_the_usual_disguises(command: str) -> None:
    policy = ShellPolicy.build(mode="deny-list", allow=[], deny=["sudo"], roots=[])
    with pytest.raises(PolicyError, match="rule 'sudo'"):
        policy.command_to_run(command, None)
    assert policy.command_to_run("echo sudo is a word", None) == "echo sudo is a word"


def test_roots_resolve_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "work"
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    policy = ShellPolicy.build(mode="off", allow=[], deny=[], roots=[str(root)])
    assert policy.cwd_to_use(None) == str(root)
    assert policy.cwd_to_use(str(root / "sub")) == str(root / "sub")
    for refused in [root / "escape", outside, root / ".." / "elsewhere", tmp_path / "work2"]:
        with pytest.raises(PolicyError, match="outside the allowed roots"):
            policy.cwd_to_use(str(refused))


async def test_policy_refusals_reach_the_client_before_anything_runs(
    tmp_path: Path, clock: FakeClock, gate: Gate
) -> None:
    marker = tmp_path / "ran"
    settings = Settings(shell_mode="allow-list", shell_allow=("echo", "touch"), shell_roots=(str(tmp_path),))
    async with open_client(settings, clock, gate) as (_, client):
        text = error_text(await client.call_tool("run_shell_background", {"command": f"sh -c 'touch {marker}'"}))
        assert "refused" in text and "no rule allows" in text and "Nothing was started" in text
        text = error_text(await client.call_tool("run_shell_background", {"command": "echo hi", "cwd": "/"}))
        assert "outside the allowed roots" in text
        text = error_text(
            await client.call_tool("fire_tool", {"tool": "shell", "arguments": {"command": "echo $HOME"}})
        )
        assert "contains '$'" in text
        assert (await call(client, "list_tasks"))["tasks"] == []
        assert not marker.exists()
        # What is allowed runs, in the first root by default, as exactly its words.
        reply = await call(client, "run_shell_background", command=f"touch {marker} 'a;b'")
        view = await finish(client, reply["task_id"])
        assert view["status"] == "completed", view
        assert marker.exists() and (tmp_path / "a;b").exists()


def test_bad_policy_settings_fail_at_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not an existing directory"):
        Settings(shell_roots=(str(tmp_path / "missing"),))
    with pytest.raises(ValueError, match="not a valid regex"):
        Settings(shell_mode="allow-list", shell_allow=("re:(",))


SECRET = "ghp_" + "s3cr3t" * 6


async def test_known_secrets_are_masked_in_output_results_and_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: FakeClock, gate: Gate
) -> None:
    monkeypatch.setenv("GITHUB_TOKEN", SECRET)
    leak = tmp_path / "leak.txt"
    leak.write_text(f"token={SECRET}\n")
    async with open_client(Settings(), clock, gate) as (_, client):
        # The token is scrubbed from the command's environment...
        reply = await call(client, "run_shell_background", command='printf "[%s]" "$GITHUB_TOKEN"')
        assert (await finish(client, reply["task_id"]))["output"]["text"] == "[]"
        # ...and masked when a command finds it anyway, at the same length so offsets stay true.
        reply = await call(client, "run_shell_background", command=f"cat {leak}")
        view = await finish(client, reply["task_id"])
        text = view["output"]["text"]
        assert SECRET not in text and "[redacted" in text and len(text) == len(leak.read_text())
        # A read that cuts through the secret still shows none of it.
        for offset, size in [(0, 12), (12, 10), (20, 40)]:
            part = await call(client, "get_cached_output", task_id=reply["task_id"], offset=offset, max_bytes=size)
            assert part["output"]["text"] == text[offset : offset + size], (offset, size)
        # Errors of failed tasks and refused requests are masked too.
        boom = await call(client, "fire_tool", tool="test.boom", arguments={"key": SECRET})
        failed = await finish(client, boom["task_id"])
        assert failed["error"]["message"].startswith("RuntimeError: boom [redacted")
        refused = error_text(await client.call_tool("get_cached_output", {"task_id": SECRET}))
        assert SECRET not in refused and "[redacted" in refused


async def test_oversize_arguments_are_refused_clearly(clock: FakeClock, gate: Gate) -> None:
    async with open_client(Settings(max_argument_bytes=4096), clock, gate) as (_, client):
        text = error_text(await client.call_tool("run_shell_background", {"command": "echo " + "x" * 5000}))
        said = re.search(r"is (\d+) bytes, above this server's limit of 4096 bytes", text)
        assert said is not None and int(said[1]) > 5000, text  # the command and the tool's other arguments
        assert (await call(client, "list_tasks"))["tasks"] == []


def test_log_lines_and_tracebacks_mask_the_secrets() -> None:
    import io
    import logging

    from server.redact import RedactingFilter, Redactor

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter(Redactor([SECRET])))
    logger = logging.getLogger("offload.test.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("calling with token %s", SECRET)
        try:
            _fail_with(f"upstream echoed Authorization: Bearer {SECRET}")
        except RuntimeError:
            logger.exception("request failed")
    finally:
        logger.removeHandler(handler)
    logged = stream.getvalue()
    assert SECRET not in logged
    assert "token [redacted" in logged and "Authorization: ***" in logged and "Traceback" in logged


def _fail_with(message: str) -> None:
    raise RuntimeError(message)
