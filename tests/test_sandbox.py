"""Owner isolation against a shell, with real bubblewrap: two owners (alice, bob) on one HTTP server, and
bob's shell trying every probe from issue 12 — the environment of every process, the store, alice's root,
the server's pid — and failing. Without bwrap these tests fail in CI (CI=true) rather than skip."""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import FakeClock, Gate, call, data, error_text, finish, live_group_members, open_client
from mcp import Client
from test_durable import kill_9
from test_http import ALICE, BOB, TOKENS, connect, tool, web_server

from server.config import Settings
from server.errors import ConfigError
from testkit.rawserver import start_server
from testkit.redis_server import NO_PERSISTENCE
from tools.sandbox import as_root, unprivileged_ids

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(
        shutil.which("bwrap") is None and not os.environ.get("CI"),
        reason="bubblewrap is not installed (apt-get install bubblewrap); required in CI",
    ),
]

SECRETS = {"GITHUB_TOKEN": "ghp_" + "g" * 36, "ANTHROPIC_API_KEY": "sk-ant-" + "k" * 40}


def sandbox_may_write(*paths: Path) -> None:
    """A root server's sandboxed commands run as nobody: the roots (and fifos) they write are given to it."""
    if as_root():
        for path in paths:
            os.chown(path, *unprivileged_ids())


@pytest.fixture
def roots(tmp_path: Path) -> dict[str, Path]:
    found = {}
    for owner in ("alice", "bob"):
        root = tmp_path / "roots" / owner
        root.mkdir(parents=True)
        (root / "secret.txt").write_text(f"{owner}'s private file\n")
        sandbox_may_write(root)
        found[owner] = root
    return found


@pytest.fixture
def outside_tmp() -> Iterator[Path]:
    """A directory outside /tmp (which every sandbox replaces), to see the sandbox hide it by itself."""
    folder = Path(tempfile.mkdtemp(prefix="offload-test-", dir="/var/tmp"))
    folder.chmod(0o755)  # so what hides a path inside it is the sandbox's mount, not the folder's mode
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def secrets_in_environ(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name, value in {**TOKENS, **SECRETS}.items():
        monkeypatch.setenv(name, value)
    return {**TOKENS, **SECRETS}


def two_owners(roots: dict[str, Path], data_dir: Path, **extra: Any) -> dict[str, Any]:
    return {
        "data_dir": data_dir,
        "shell_sandbox": "bwrap",
        "owners": {
            name: {"token_env": f"{name.upper()}_TOKEN", "shell_roots": [str(root)], **extra.get(name, {})}
            for name, root in roots.items()
        },
    }


@asynccontextmanager
async def alice_and_bob(
    gate: Gate, roots: dict[str, Path], data_dir: Path, environ: dict[str, str], **extra: Any
) -> AsyncIterator[tuple[Client, Client]]:
    async with (
        web_server(gate, "http", environ, **two_owners(roots, data_dir, **extra)) as url,
        connect(url, ALICE) as alice,
        connect(url, BOB) as bob,
    ):
        yield alice, bob


async def run(client: Client, command: str, **arguments: Any) -> dict[str, Any]:
    reply = await tool(client, "run_shell_background", command=command, **arguments)
    return await finish(client, reply["task_id"])


def output(view: dict[str, Any]) -> str:
    return str(view["output"]["text"])


async def test_bob_cannot_read_tokens_store_roots_or_processes(
    gate: Gate, roots: dict[str, Path], outside_tmp: Path, secrets_in_environ: dict[str, str]
) -> None:
    data_dir = outside_tmp / "data"  # not under /tmp, which is private anyway: hidden by a mount of its own
    async with alice_and_bob(gate, roots, data_dir, secrets_in_environ) as (alice, bob):
        mine = await run(alice, "echo alice-was-here > note.txt; cat secret.txt")
        assert mine["status"] == "completed" and output(mine) == "alice's private file\n"
        assert (roots["alice"] / "note.txt").read_text() == "alice-was-here\n"  # her root is writable

        # 1. The issue's own probe: the environment of the command's parent's parent (the server, unsandboxed).
        probe = await run(bob, "base64 -w0 /proc/$(awk '{print $4}' /proc/$PPID/stat)/environ; echo")
        # Every process bob can see: their environments, decoded the ways masking would miss.
        every = await run(bob, "for f in /proc/[0-9]*/environ; do cat $f; echo; done | rev | base64 -w0; echo")
        seen = output(probe) + output(every)
        decoded = b""
        for word in seen.split():
            try:
                decoded += base64.b64decode(word + "=" * (-len(word) % 4))
            except ValueError:
                continue
        for name, value in secrets_in_environ.items():
            assert value.encode() not in decoded and value.encode()[::-1] not in decoded, name
            assert value not in seen, name

        # 2. The store: the data directory is an empty directory inside the sandbox.
        store = await run(bob, f"ls -A {data_dir}; cat {data_dir}/offload.db | wc -c")
        assert output(store).split("\n")[-2:] == ["0", ""], output(store)  # `ls -A` printed nothing
        assert "No such file or directory" in output(store)
        assert (data_dir / "offload.db").exists()

        # 3. Alice's root: absent, neither readable nor writable; the rest of the system is read-only.
        theirs = await run(bob, f"ls -A {roots['alice']}; cat {roots['alice']}/secret.txt; touch /etc/x; echo done")
        text = output(theirs)
        assert "alice's private file" not in text and "No such file or directory" in text
        assert "Read-only file system" in text
        assert not (roots["alice"] / "x").exists()

        # 4. The server's pid and everything else of the host: a PID namespace of its own.
        pids = await run(bob, f"ls /proc | grep -E '^[0-9]+$' | wc -l; kill -0 {os.getpid()} && echo reached")
        lines = output(pids).split("\n")
        assert int(lines[0]) <= 8, output(pids)  # bwrap's init, the command's shells, ls, grep, wc
        assert "reached" not in output(pids)


async def test_a_sandboxed_command_keeps_group_exit_status_and_cancel(
    settings_with_sandbox: Settings, clock: FakeClock, gate: Gate, tmp_path: Path
) -> None:
    async with open_client(settings_with_sandbox, clock, gate) as (_, client):
        failed = await finish(client, (await call(client, "run_shell_background", command="exit 7"))["task_id"])
        assert failed["result"]["exit_code"] == 7 and failed["error"]["kind"] == "exit_status"
        killed = await finish(client, (await call(client, "run_shell_background", command="kill -9 $$"))["task_id"])
        assert killed["result"]["exit_code"] == 128 + 9  # bwrap passes a status on, not a signal (README says so)
        runtime_dir = settings_with_sandbox.shell_roots[0]
        fifo = Path(runtime_dir) / "ready"
        os.mkfifo(fifo)
        sandbox_may_write(fifo)
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        try:
            reply = await call(
                client, "run_shell_background", command=f"sleep 300 & sleep 300 & echo ready > {fifo}; wait"
            )
            with anyio.fail_after(10):
                await anyio.wait_readable(fd)
        finally:
            os.close(fd)
        pgid = reply["pid"]
        members = live_group_members(pgid)
        # wrapper, bwrap (outside and its init inside), the command's shell, two sleeps: one group
        assert len(members) >= 5, members
        view = data(await client.call_tool("cancel_task", {"task_id": reply["task_id"]}))
        assert view["status"] == "cancelled"
        assert live_group_members(pgid) == []


@pytest.fixture
def settings_with_sandbox(tmp_path: Path) -> Settings:
    work = tmp_path / "work"
    work.mkdir()
    sandbox_may_write(work)
    return Settings(kill_grace_s=0.5, data_dir=tmp_path / "data", shell_sandbox="bwrap", shell_roots=(str(work),))


async def test_network_is_per_owner(
    gate: Gate, roots: dict[str, Path], tmp_path: Path, secrets_in_environ: dict[str, str]
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        probe = f"(echo hi > /dev/tcp/127.0.0.1/{port}) 2>/dev/null && echo reached || echo unreachable"
        extra = {"bob": {"network": False}}
        async with alice_and_bob(gate, roots, tmp_path / "data", secrets_in_environ, **extra) as (alice, bob):
            assert output(await run(alice, probe)).strip() == "reached"
            assert output(await run(bob, probe)).strip() == "unreachable"


async def test_several_owners_with_an_open_shell_refuse_to_start(tmp_path: Path) -> None:
    config = tmp_path / "offload.toml"
    config.write_text('[auth_tokens]\nalice = "ALICE_TOKEN"\nbob = "BOB_TOKEN"\n')
    env = {**os.environ, **TOKENS, "XDG_CONFIG_HOME": str(tmp_path / "xdg"), "OFFLOAD_DATA_DIR": str(tmp_path / "d")}
    argv = [sys.executable, "-m", "server", "--transport", "http", "--port", "0", "--config", str(config)]
    done = await anyio.run_process(argv, env=env, check=False, stdin=subprocess.DEVNULL)
    said = done.stderr.decode()
    assert done.returncode == 2, said
    assert "shell_sandbox = 'bwrap'" in said and "'alice', 'bob'" in said and "shell_mode = 'disabled'" in said
    assert ALICE not in said and BOB not in said


async def test_bwrap_missing_is_a_clear_error_at_start(tmp_path: Path) -> None:
    empty = tmp_path / "empty-path"
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    env.update(OFFLOAD_DATA_DIR=str(tmp_path / "d"), OFFLOAD_SHELL_SANDBOX="bwrap")
    done = await anyio.run_process([sys.executable, "-m", "server"], env=env, check=False, stdin=subprocess.DEVNULL)
    assert done.returncode == 2
    assert "bwrap program is not on PATH" in done.stderr.decode() and "install bubblewrap" in done.stderr.decode()


async def test_an_owner_with_the_shell_disabled_is_refused(tmp_path: Path, clock: FakeClock, gate: Gate) -> None:
    settings = Settings(data_dir=tmp_path / "data", owners={"local": {"shell_mode": "disabled"}})
    async with open_client(settings, clock, gate) as (_, client):
        refused = await client.call_tool("run_shell_background", {"command": "true"})
        assert refused.is_error and "disabled for this owner" in refused.content[0].text  # type: ignore[union-attr]


def test_owner_tables_and_auth_tokens_must_agree() -> None:
    with pytest.raises(ConfigError, match="two token variables"):
        Settings(auth_tokens={"alice": "A"}, owners={"alice": {"token_env": "B"}})


@pytest.fixture
def sandboxed_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Server subprocesses started by `start_server` sandbox their commands; returns the owner's root."""
    work = tmp_path / "work"
    work.mkdir()
    sandbox_may_write(work)
    monkeypatch.setenv("OFFLOAD_SHELL_SANDBOX", "bwrap")
    monkeypatch.setenv("OFFLOAD_SHELL_ROOTS", str(work))
    return work


async def test_crash_recovery_leaves_nothing_of_a_sandboxed_command(tmp_path: Path, sandboxed_env: Path) -> None:
    """The sandbox dies with its server (`--die-with-parent`); the next server settles both tasks
    `interrupted` (an attached command's output capture died with its server) and nothing is left."""
    server = await start_server(tmp_path)
    ready = sandboxed_env / "ready"
    os.mkfifo(ready)
    sandbox_may_write(ready)
    fd = os.open(ready, os.O_RDONLY | os.O_NONBLOCK)  # held open first, so the writer never blocks
    try:
        command = f"sleep 300 & sleep 300 & echo up > {ready}; wait"
        running = await server.call("run_shell_background", command=command)
        with anyio.fail_after(10):  # the command says so once its children exist
            await anyio.wait_readable(fd)
    finally:
        os.close(fd)
    quick = await server.call("run_shell_background", command="sleep 0.3; exit 7")
    await kill_9(server)

    again = await start_server(tmp_path)
    async with again.process:
        interrupted = await again.call("get_cached_output", task_id=running["task_id"])
        assert interrupted["status"] == "failed" and interrupted["error"]["kind"] == "interrupted"
        assert live_group_members(running["pid"]) == []  # the whole sandbox, its PID namespace included
        finished = await again.call("get_cached_output", task_id=quick["task_id"])
        assert (finished["status"], finished["error"]["kind"]) == ("failed", "interrupted")
        assert live_group_members(quick["pid"]) == []
        await again.process.stdin.aclose()  # type: ignore[union-attr]


async def test_a_detached_sandboxed_command_outlives_the_server(tmp_path: Path, sandboxed_env: Path) -> None:
    server = await start_server(tmp_path, "--detach")
    gate = sandboxed_env / "gate"
    os.mkfifo(gate)
    sandbox_may_write(gate)
    slow = await server.call("run_shell_background", command=f"echo waiting; read line < {gate}; echo $line; exit 4")
    assert server.process.stdin is not None
    await server.process.stdin.aclose()
    with anyio.fail_after(5):
        await server.process.wait()
    assert live_group_members(slow["pid"]), "detached commands are not killed at shutdown"

    again = await start_server(tmp_path, "--detach")
    async with again.process:
        still = await again.call("get_cached_output", task_id=slow["task_id"])
        assert still["status"] == "running" and still["output"]["text"] == "waiting\n"
        with anyio.fail_after(5):
            await anyio.to_thread.run_sync(gate.write_text, "free\n", abandon_on_cancel=True)
        polled = await again.call("poll_output", task_ids=[slow["task_id"]], timeout_s=20)
        ended = polled["done"][0]
        assert ended["result"]["exit_code"] == 4 and ended["output"]["text"] == "waiting\nfree\n"
        await again.process.stdin.aclose()  # type: ignore[union-attr]


async def test_operator_listed_paths_are_hidden(
    tmp_path: Path, clock: FakeClock, gate: Gate, outside_tmp: Path
) -> None:
    private = outside_tmp / "dot-ssh"
    private.mkdir()
    (private / "id_ed25519").write_text("PRIVATE KEY\n")
    work = tmp_path / "work"
    work.mkdir()
    sandbox_may_write(work)
    settings = Settings(
        data_dir=tmp_path / "data",
        shell_sandbox="bwrap",
        shell_roots=(str(work),),
        shell_sandbox_hide=(str(private),),
    )
    async with open_client(settings, clock, gate) as (_, client):
        view = await finish(
            client, (await call(client, "run_shell_background", command=f"ls -A {private}; echo end"))["task_id"]
        )
        assert view["output"]["text"] == "end\n"


KNOB = Path("/proc/sys/kernel/printk_ratelimit_burst")
"""A harmless global /proc/sys knob (how many kernel messages pass before rate limiting), never namespaced."""


async def test_a_sandboxed_command_has_no_root_powers(
    settings_with_sandbox: Settings, clock: FakeClock, gate: Gate
) -> None:
    """Issue 22: a root server's command could write /proc/sys (core_pattern: a script run as host root).
    Inside, the uid is not 0, no capability is left, and a /proc/sys knob refuses the write; the owner's
    root is still writable."""
    before = KNOB.read_text()
    other = str(int(before) + 1)
    probe = (
        f"id -u; grep CapEff /proc/self/status; echo {other} > {KNOB} && echo knob-written; "
        "[ -w /proc/sys/kernel/core_pattern ] && echo core-pattern-writable; echo mine > note; cat note"
    )
    try:
        async with open_client(settings_with_sandbox, clock, gate) as (_, client):
            view = await finish(client, (await call(client, "run_shell_background", command=probe))["task_id"])
    finally:
        if KNOB.read_text() != before:  # the old sandbox wrote it: put it back before failing
            KNOB.write_text(before)
    lines = view["output"]["text"].split("\n")
    assert lines[0] != "0", view["output"]["text"]
    assert lines[1].split() == ["CapEff:", "0000000000000000"]
    assert "knob-written" not in lines and "core-pattern-writable" not in lines
    assert lines[-2] == "mine" and KNOB.read_text() == before


@pytest.mark.skipif(not as_root(), reason="a root-owned root is writable by a server that is not root")
async def test_a_root_owned_root_is_refused_at_start_on_a_root_server(tmp_path: Path) -> None:
    """A root server's commands run as nobody, which cannot write a root-owned root: refused at start,
    saying what to change, rather than failing each command."""
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg"), "OFFLOAD_DATA_DIR": str(tmp_path / "d")}
    env.update(OFFLOAD_SHELL_SANDBOX="bwrap", OFFLOAD_SHELL_ROOTS=str(work))
    with anyio.fail_after(30):  # a server that starts instead would serve stdio until killed
        done = await anyio.run_process([sys.executable, "-m", "server"], env=env, check=False, stdin=subprocess.DEVNULL)
    said = done.stderr.decode()
    assert done.returncode == 2, said
    uid, gid = unprivileged_ids()
    assert f"by uid {uid}, which sandboxed commands run as" in said and f"chown -R {uid}:{gid} {work}" in said, said


@pytest.fixture
def unix_redis(outside_tmp: Path) -> Iterator[Path]:
    """A socket-only redis-server (no TCP port) whose socket anyone may connect to (0777), in a folder a
    sandbox can see: only the sandbox can keep a command away from it. Ready when it says so on stdout."""
    path = outside_tmp / "redis.sock"
    argv = ["redis-server", "--port", "0", *NO_PERSISTENCE, "--dir", str(outside_tmp)]
    argv += ["--unixsocket", str(path), "--unixsocketperm", "777"]
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert server.stdout is not None
        for line in server.stdout:  # blocks until a line: the server writes one as it becomes ready
            if b"ready to accept connections at" in line:
                break
        server.stdout.close()
        with socket.socket(socket.AF_UNIX) as s:  # it answers from outside
            s.connect(str(path))
            s.sendall(b"PING\r\n")
            assert s.recv(16) == b"+PONG\r\n"
        yield path
    finally:
        server.kill()
        server.wait(timeout=10)


UNIX_PROBE = """python3 -c '
import socket, sys
try:
    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b"PING\\r\\n"); print(s.recv(16))
except OSError as e:
    print("refused:", e.strerror)
' """


async def test_without_network_host_unix_sockets_are_unreachable(
    gate: Gate, roots: dict[str, Path], tmp_path: Path, secrets_in_environ: dict[str, str], unix_redis: Path
) -> None:
    """Issue 22: `network = false` still reached a socket-only Redis. Bob (no network) cannot make a unix
    socket at all; alice (network on) still reaches it (the README says so). A stream socket pair (asyncio's
    wake-up channel) still works without network."""
    extra = {"bob": {"network": False}}
    async with alice_and_bob(gate, roots, tmp_path / "data", secrets_in_environ, **extra) as (alice, bob):
        assert output(await run(alice, UNIX_PROBE + str(unix_redis))).strip() == "b'+PONG\\r\\n'"
        assert output(await run(bob, UNIX_PROBE + str(unix_redis))).strip() == "refused: Operation not permitted"
        raw = "import ctypes as t; c = t.CDLL(None); print(c.syscall(41, t.c_long(1 << 32 | 1), 1, 0))"
        assert output(await run(bob, f'python3 -c "{raw}"')) == "-1\n"  # the family's high bits are not read
        pair = await run(bob, "python3 -c 'import asyncio; asyncio.run(asyncio.sleep(0)); print(\"ok\")'")
        assert output(pair) == "ok\n"


async def test_input_reaches_a_sandboxed_command_and_another_owner_cannot_send_it(
    gate: Gate, roots: dict[str, Path], outside_tmp: Path, secrets_in_environ: dict[str, str]
) -> None:
    """Issue 23: a pipe and a terminal both pass through bwrap; bob's send_input to alice's task reads like an
    unknown id, and her task never sees his text."""
    async with alice_and_bob(gate, roots, outside_tmp / "data", secrets_in_environ) as (alice, bob):
        piped = await tool(alice, "run_shell_background", command="read -r line; echo got $line", stdin="pipe")
        foreign = error_text(await bob.call_tool("send_input", {"task_id": piped["task_id"], "text": "bob\n"}))
        made_up = "x" * len(piped["task_id"])
        unknown = error_text(await bob.call_tool("send_input", {"task_id": made_up, "text": "bob\n"}))
        assert foreign.replace(piped["task_id"], made_up) == unknown and "Unknown task id" in unknown
        await tool(alice, "send_input", task_id=piped["task_id"], text="alice\n")
        assert output(await finish(alice, piped["task_id"])) == "got alice\n"

        command = 'read -p "Name? " n; echo "hi $n"; [ -t 0 ] && echo tty'
        typed = await tool(alice, "run_shell_background", command=command, pty=True)
        prompt = await tool(alice, "poll_output", task_ids=[typed["task_id"]], wait_for=r"Name\? ", timeout_s=20)
        assert prompt["pending"] == []
        await tool(alice, "send_input", task_id=typed["task_id"], text="al\n")
        done = await finish(alice, typed["task_id"])
        assert "hi al\r\n" in output(done) and "tty" in output(done)


@pytest.mark.parametrize("network", [True, False])
def test_a_sandbox_with_network_on_is_named_loudly_at_start(tmp_path: Path, network: bool) -> None:
    """Issue 22 item 4: what a network-on sandbox cannot hide (loopback, abstract sockets, /proc/net/unix) is
    said at start, naming the setting to change; a server whose sandboxes have no network says nothing."""
    work = tmp_path / "work"
    work.mkdir()
    sandbox_may_write(work)
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg"), "OFFLOAD_DATA_DIR": str(tmp_path / "d")}
    env.update(OFFLOAD_SHELL_SANDBOX="bwrap", OFFLOAD_SHELL_ROOTS=str(work), OFFLOAD_SHELL_NETWORK=str(network).lower())
    # stdin an empty pipe: the server starts, then stops as a client that left
    done = subprocess.run([sys.executable, "-m", "server"], env=env, input=b"", capture_output=True, timeout=30)
    said = done.stderr.decode()
    assert done.returncode == 0, said
    warned = "sandboxed shells with network on (default) can reach this machine's loopback services" in said
    assert warned == network, said
    assert ("set network = false" in said) == network
