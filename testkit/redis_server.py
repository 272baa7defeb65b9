"""A real `redis-server` for the tests and the bench: on a free loopback port, no persistence, started
and stopped by the caller. Readiness is its log line "Ready to accept connections", read from its
stdout: an event, not a sleep.

It is set up the way the README says distributed mode must be: the default user off (a client that does
not authenticate is refused: NOAUTH) and an ACL user `offload` with a password of its own, which `url`
carries. `open_url` is the same address without credentials (what a command would try)."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import anyio
import redis.asyncio as aioredis

REDIS_READY = b"Ready to accept connections"
NO_PERSISTENCE = ("--save", "", "--appendonly", "no")
ACL_USER = "offload"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    def __init__(
        self,
        folder: Path,
        port: int | None = None,
        extra_args: tuple[str, ...] = (),
        *,
        auth: bool = True,
        acl_rules: tuple[str, ...] = ("~*", "&*", "+@all"),
    ) -> None:
        """`auth=False`: the default user left on without a password (how the README used to set Redis up),
        for the tests that show Offload refuses such a Redis. `acl_rules`: what the `offload` user may do
        (every key by default: the tests' namespaces vary)."""
        self.folder = folder
        self.port = port or free_port()
        self.extra_args = extra_args
        self.auth = auth
        self.acl_rules = acl_rules
        self.password = secrets.token_urlsafe(18)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def userinfo(self) -> str:
        """`offload:PASSWORD@`, or nothing without auth: what goes between `redis://` and the address."""
        return f"{ACL_USER}:{self.password}@" if self.auth else ""

    @property
    def url(self) -> str:
        return f"redis://{self.userinfo}127.0.0.1:{self.port}/0"

    @property
    def open_url(self) -> str:
        """The same Redis without credentials: refused (NOAUTH) when `auth` is on."""
        return f"redis://127.0.0.1:{self.port}/0"

    def _acl(self) -> tuple[str, ...]:
        if not self.auth:
            return ()
        return ("--user", "default", "off", "--user", ACL_USER, "on", f">{self.password}", *self.acl_rules)

    def start(self, timeout_s: float = 10.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (Debian: apt-get install redis-server)")
        self.folder.mkdir(parents=True, exist_ok=True)
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", *NO_PERSISTENCE, "--dir", str(self.folder)]
        self.process = subprocess.Popen(
            [*argv, *self._acl(), *self.extra_args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert self.process.stdout is not None
        seen = b""
        os.set_blocking(self.process.stdout.fileno(), True)
        while REDIS_READY not in seen:
            line = self.process.stdout.readline()  # blocks until a line: the server writes one at start
            if not line:
                raise RuntimeError(f"redis-server exited at start: {seen.decode(errors='replace')[-500:]}")
            seen += line
        self.process.stdout.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


async def until_redis(check: Callable[[], bool], redis_url: str, timeout_s: float = 20.0) -> None:
    """Waits, bounded, for a condition on Redis's state (read directly, not through the proxy), checked
    again at each keyspace event (a key set, written or expired): an event, not a sleep."""
    client = aioredis.Redis.from_url(redis_url)
    before = (await client.config_get("notify-keyspace-events"))["notify-keyspace-events"]
    try:
        await client.config_set("notify-keyspace-events", "KEA")
        async with client.pubsub() as pubsub:
            await pubsub.psubscribe("__keyspace@0__:*")
            with anyio.fail_after(timeout_s):
                while not check():
                    await pubsub.get_message(timeout=1.0)
    finally:
        await client.config_set("notify-keyspace-events", before)  # the other tests on this Redis pay nothing
        await client.aclose()
