"""`offload-mcp worker`: runs the tasks front-ends queue on its queues (distributed mode)."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from server import __version__
from server.config import DEFAULT_QUEUE, Settings
from server.distributed import WorkerEngine, worker_name
from server.errors import ConfigError
from server.process_table import ProcessTable
from server.redis_store import RedisStore
from server.runtime import Runtime
from server.signals import stop_on_signal

log = logging.getLogger("offload")


def default_queues() -> list[str]:
    """A worker's queues unless told: its host name (a task fired with target=HOST) and `any`."""
    return [socket.gethostname(), DEFAULT_QUEUE]


@asynccontextmanager
async def worker_beside(settings: Settings, queues: list[str] | None) -> AsyncIterator[None]:
    """A front-end started with `--worker` runs a worker in its own process too (a Runtime of its own,
    as a worker process has); without `--worker` (None), nothing."""
    if queues is None:
        yield
        return
    if settings.redis_url is None:
        raise ConfigError("--worker runs a worker beside the front-end: it needs redis_url (--redis-url)")
    with contextlib.ExitStack() as held:  # as `serve_worker`: its process table, and what dead ones left
        async with Runtime.open(settings, role="worker") as runtime, anyio.create_task_group() as tg:
            store = runtime.executor.store
            assert isinstance(store, RedisStore)
            store.process_table = held.enter_context(ProcessTable.open(store.root, store.instance))
            engine = WorkerEngine(runtime.executor, store, settings, queues, worker_name())
            await engine.tend_left_behind()
            tg.start_soon(engine.serve, name="offload worker beside the front-end")
            log.info("worker %s on queues %s beside the front-end (Redis at %s)", engine.name, queues, store.where)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()


async def serve_worker(settings: Settings, queues: list[str]) -> None:
    """Runs until SIGTERM/SIGINT, then stops its tasks (TERM, grace, KILL) and writes their outcome. First
    it ends what dead workers on its data directory left running (their rows in its process table)."""
    if settings.redis_url is None:
        raise ConfigError("offload-mcp worker needs redis_url: pass --redis-url or set OFFLOAD_REDIS_URL")
    with contextlib.ExitStack() as held:  # the table outlives the Runtime: shutdown's outcomes remove rows
        async with Runtime.open(settings, role="worker") as runtime, anyio.create_task_group() as tg:
            store = runtime.executor.store
            assert isinstance(store, RedisStore)
            store.process_table = held.enter_context(ProcessTable.open(store.root, store.instance))
            engine = WorkerEngine(runtime.executor, store, settings, queues, worker_name())
            tg.start_soon(stop_on_signal, tg.cancel_scope.cancel)
            await engine.tend_left_behind()  # before it says it is up, and before it takes any task
            log.info(
                "offload-mcp %s worker %s on queues %s (Redis at %s)", __version__, engine.name, queues, store.where
            )
            await engine.serve()
