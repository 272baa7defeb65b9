"""The model-based test of `test_model`, in distributed mode: the primary and the peer are front-ends on a
real Redis, and a worker (in this process, on the same clock) runs the commands. The same promises hold for
every read, status and finished task; what changes is what a restart means:
- a front-end's restart stops nothing: its tasks run on the worker, and read the same afterwards;
- the worker's restart stops what it runs (a shutdown: `cancelled` is then a true outcome).
"""

from __future__ import annotations

import atexit
import secrets
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager, asynccontextmanager

import anyio
from hypothesis import HealthCheck, settings
from hypothesis.stateful import rule
from test_model import Engine

from server.config import Settings
from server.distributed import WorkerEngine
from server.redis_store import RedisStore
from server.runtime import Runtime
from testkit.redis_server import RedisServer

_REDIS: list[RedisServer] = []


def redis_url(engine: Engine) -> str:
    """One redis-server for every example (each example its own namespace); stopped at exit."""
    if not _REDIS:
        server = RedisServer(engine.folder / "redis")
        server.start()  # no redis-server: this fails, as it must in CI
        atexit.register(server.stop)
        _REDIS.append(server)
    return _REDIS[0].url


class DistributedEngine(Engine):
    worker: AbstractContextManager[None] | None = None

    def _settings(self) -> Settings:
        self.namespace = f"m{secrets.token_hex(6)}"
        return self._node("front")

    def _node(self, name: str) -> Settings:
        return Settings(
            kill_grace_s=0.2,
            data_dir=self.folder / name,
            redis_url=redis_url(self),
            redis_namespace=self.namespace,
            lease_s=2.0,
        )

    def _start_others(self) -> None:
        self._start_worker()
        self.stack.callback(self._stop_worker)  # after the servers, before the portal

    def _start_worker(self) -> None:
        self.worker = self.portal.wrap_async_context_manager(self._running_worker())
        self.worker.__enter__()

    def _stop_worker(self) -> None:
        if self.worker is not None:
            self.worker.__exit__(None, None, None)
            self.worker = None

    @asynccontextmanager
    async def _running_worker(self) -> AsyncIterator[None]:
        settings = self._node("worker")
        async with (
            Runtime.open(settings, role="worker", clock=self.clock, load_plugins=False) as runtime,
            anyio.create_task_group() as tg,
        ):
            store = runtime.executor.store
            assert isinstance(store, RedisStore)
            tg.start_soon(WorkerEngine(runtime.executor, store, settings, ["any"], "model").serve)
            yield
            tg.cancel_scope.cancel()

    @rule()
    def restart(self) -> None:
        """A front-end's restart: its tasks go on on the worker; everything reads as before."""
        self.primary[0].__exit__(None, None, None)
        self.primary = self._open()
        for expected in self.model.values():
            self._observe(self._view(self.runtime, expected.task_id))

    @rule()
    def restart_worker(self) -> None:
        """The worker's restart stops what it runs: `cancelled` (a shutdown) is then a true outcome."""
        for expected in self.model.values():
            expected.may_cancel = expected.may_cancel or expected.final is None
        self._stop_worker()
        self._start_worker()


DistributedEngine.TestCase.settings = settings(
    max_examples=6,
    stateful_step_count=10,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_distributed_engine_against_the_model = DistributedEngine.TestCase
