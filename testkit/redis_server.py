"""A real `redis-server` for the tests and the bench: on a free loopback port, no persistence, started
and stopped by the caller. Readiness is its log line "Ready to accept connections", read from its
stdout: an event, not a sleep."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import anyio
import redis.asyncio as aioredis

REDIS_READY = b"Ready to accept connections"
NO_PERSISTENCE = ("--save", "", "--appendonly", "no")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    def __init__(self, folder: Path, port: int | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (Debian: apt-get install redis-server)")
        self.folder.mkdir(parents=True, exist_ok=True)
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", *NO_PERSISTENCE, "--dir", str(self.folder)]
        self.process = subprocess.Popen(
            [*argv, *self.extra_args],
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
