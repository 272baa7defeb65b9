"""Runtime: the one Executor (and its task group) for the whole process.

It is opened before any transport starts and closed after the last one stops, so no MCP
session or connection owns running work. The MCP layer calls the methods here; they speak
in views and raise `RequestError`s, never MCP types, and every one takes the caller's owner:
there is no default owner in a server several owners share. Task changes are published on
`changes`; the face turns them into notifications.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Literal

import anyio
from anyio.abc import TaskGroup

from server import redis_auth
from server.cache import Clock
from server.changes import Subscriber
from server.config import Settings, clients_config, data_dir
from server.distributed import DocketRunner, follow_changes, live_workers, queue_depths
from server.errors import ConfigError, DataDirGoneError, ForeignTaskError, RequestError, StoreUnreachableError
from server.executor import Executor, RunnerFactory, upkeep_forever
from server.interactive import OutputWatch, read_view
from server.recovery import follow_peers, recover, watch_peers
from server.redact import Redactor, known_secrets, url_secrets
from server.redis_store import RedisStore
from server.runner import Lifecycle
from server.store import Store, TaskStore
from server.tasks import (
    Catalog,
    FireableTool,
    FireReply,
    PollReply,
    ShellReply,
    Status,
    Task,
    TaskList,
    TaskView,
    UnknownTask,
    task_uri,
)
from server.upstreams import check_names, prepare, upstreams_config
from server.waiting import ProgressFn, ReturnWhen
from tools import sandbox
from tools.claude import claude_specs
from tools.clients import ClientPool
from tools.github import github_specs
from tools.http import http_specs
from tools.login_env import with_command_environment
from tools.presets import preset_specs
from tools.process import become_subreaper, end_orphans, force_portable, portable
from tools.registry import Registry, ToolSpec
from tools.shell import ShellConfig, shell_spec
from tools.upstream import UpstreamSet

log = logging.getLogger(__name__)

FIRE_REPLY_BYTES = 16 * 1024
"""Output (the tail) included when `fire_tool(wait_s=…)` returns a finished task."""
SPAWN_WAIT_S = 5.0
"""`run_shell_background` waits this long at most for the pid of a command that is not queued."""


class Runtime:
    upstreams: UpstreamSet | None = None
    """Proxy mode's upstream MCP servers (their tools are in the registry as NAME.tool)."""

    def __init__(
        self,
        settings: Settings,
        executor: Executor,
        pool: ClientPool,
        redactor: Redactor,
        task_group: TaskGroup,
    ) -> None:
        self.settings = settings
        self.executor = executor
        self.pool = pool
        self.redactor = redactor
        self._tg = task_group
        self._at_close: list[Callable[[], None]] = []

    def __repr__(self) -> str:
        return f"<Runtime {self.executor!r}>"

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        settings: Settings,
        *,
        extra_tools: Iterable[ToolSpec] = (),
        clock: Clock = time.time,
        load_plugins: bool = True,
        role: Literal["serve", "worker"] = "serve",
    ) -> AsyncIterator[Runtime]:
        """`role` "worker" (distributed mode only): tasks come from the worker's queues, not from MCP."""
        if settings.portable_process:
            force_portable()
        _use_pidfd_child_watcher()
        pool = ClientPool(clients_config(settings))
        registry, upstreams, login_secrets = await _registry(settings, pool, extra_tools, load_plugins)
        become_subreaper()  # what leaves a command's process group comes back to us
        store = _open_store(settings)
        try:
            async with upstreams, anyio.create_task_group() as tg:  # upstreams stop after every task has
                executor = Executor(registry, settings, clock, tg, store, _runner_factory(store, settings, tg, role))
                await _start_engine(executor, tg)
                if isinstance(store, RedisStore) and role == "serve" and settings.redis_url is not None:
                    tg.start_soon(follow_changes, executor, store, settings.redis_url, name="offload change stream")
                names = [*secret_variables(settings), *upstreams.referenced_variables()]
                redactor = Redactor.from_environ(names, extra=[*login_secrets, *secret_values(settings)])
                await upstreams.start_eager()
                runtime = cls(settings, executor, pool, redactor, tg)
                runtime.upstreams = upstreams
                try:
                    yield runtime
                finally:
                    with anyio.CancelScope(shield=True):
                        await executor.shutdown()
                        end_orphans()  # what left its command's group, marker or not
                        await pool.aclose()
                    runtime.closing()
                    tg.cancel_scope.cancel()
        finally:
            with contextlib.suppress(sqlite3.Error):
                store.checkpoint()
            store.close()

    def start_background(self, run: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
        """Runs `run` until the Runtime closes: the face's delivery loops (notifications, log messages for
        clients) live as long as the tasks they report on, not as long as one connection."""
        self._tg.start_soon(run, name=name)

    def at_close(self, callback: Callable[[], None]) -> None:
        """Called once every task has ended, before the background loops are cancelled: the face's last
        words to its clients (listen streams end with their final result)."""
        self._at_close.append(callback)

    def closing(self) -> None:
        for callback in self._at_close:
            try:
                callback()
            except Exception:
                log.exception("a close callback raised")

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Hears every task change (synchronously; must not block); returns the call that unsubscribes."""
        return self.executor.changes.subscribe(subscriber)

    def tools(self) -> list[ToolSpec]:
        return list(self.executor.registry)

    # ---- the MCP tools' logic ----

    async def fire(
        self,
        tool: str,
        arguments: dict[str, Any],
        *,
        timeout_s: float | None,
        ttl_s: float | None,
        use_cache: bool,
        wait_s: float,
        owner: str,
        target: str | None = None,
    ) -> FireReply:
        await prepare(self.upstreams, tool, owner)  # a lazy upstream MCP server starts on its first fire
        fired = self.executor.fire(
            owner, tool, arguments, timeout_s=timeout_s, ttl_s=ttl_s, use_cache=use_cache, target=target
        )
        task = fired.task
        if wait_s > 0 and not task.status.finished:
            await self.executor.wait([task], wait_s, "all")
        full = self.output_view(task, 0, FIRE_REPLY_BYTES, FIRE_REPLY_BYTES) if task.status.finished else None
        return FireReply(
            task_id=task.id,
            resource=task_uri(task.id),
            tool=task.tool,
            status=task.status,
            cached=fired.cached,
            deduplicated=fired.deduplicated,
            task=full,
        )

    async def run_shell(
        self,
        arguments: dict[str, Any],
        *,
        timeout_s: float | None,
        owner: str,
    ) -> ShellReply:
        task = self.executor.fire(owner, "shell", arguments, timeout_s=timeout_s, use_cache=False).task
        with anyio.move_on_after(SPAWN_WAIT_S):
            async with anyio.create_task_group() as tg:  # the pid, or the news that it is queued

                async def until(event: anyio.Event) -> None:
                    await event.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(until, task.handle.started)
                tg.start_soon(until, task.handle.queued)
        return ShellReply(task_id=task.id, resource=task_uri(task.id), pid=task.pid, status=task.status)

    def get_output(
        self,
        task_id: str,
        *,
        offset: int,
        max_bytes: int,
        tail_bytes: int | None,
        owner: str,
        filter: str | None = None,
        view: Literal["bytes", "screen"] = "bytes",
    ) -> TaskView:
        task = self.executor.get(owner, task_id)
        if filter is not None or view == "screen":  # matching lines, or the terminal's screen
            return self.redactor.model(read_view(task, offset, max_bytes, filter, view))
        return self.output_view(task, offset, max_bytes, tail_bytes)

    def output_view(self, task: Task, offset: int, max_bytes: int, tail_bytes: int | None) -> TaskView:
        """The task whole, with output from `offset`; the server's secrets masked throughout."""
        start = offset
        if tail_bytes is not None:
            start = max(offset, task.output.tail(tail_bytes))
        chunk = task.output.read(start, max_bytes)
        if self.redactor:
            chunk = self.redactor.chunk(task.output, chunk, live=not task.status.finished)
        return self.redactor.model(task.view(chunk))

    async def poll(
        self,
        task_ids: list[str],
        *,
        timeout_s: float,
        return_when: ReturnWhen,
        max_bytes: int,
        on_progress: ProgressFn | None = None,
        owner: str,
        wait_for: str | None = None,
    ) -> PollReply:
        tasks, unknown = _known(self, task_ids, owner)
        until = OutputWatch(tasks, wait_for)  # finished, ready (ready_when), or a line matching wait_for
        if on_progress is not None:
            await on_progress(sum(map(until, tasks)), len(tasks))
        tasks, timed_out = await self.executor.wait(tasks, timeout_s, return_when, on_progress, until)
        done, gone = _known(self, [t.id for t in tasks if until(t)], owner)  # read again as a read would:
        unknown += gone  # a TTL that ended while the poll waited lists the task as expired
        share = max_bytes // max(len(done), 1)
        views = [self.output_view(t, 0, share, share) for t in done]
        pending = [t.id for t in tasks if not until(t)]
        return PollReply(done=views, pending=pending, unknown=unknown, timed_out=timed_out)

    def task(self, task_id: str, *, owner: str) -> Task:
        """The task itself, for a face that shapes its own reply (the tasks extension)."""
        return self.executor.get(owner, task_id)

    async def start(self, tool: str, arguments: dict[str, Any], *, owner: str) -> Task:
        """Fires with the defaults and returns the task itself (the tasks extension's tools/call)."""
        await prepare(self.upstreams, tool, owner)  # the owner's upstreams only; a lazy one starts now
        return self.executor.fire(owner, tool, arguments).task

    async def settled(self, task: Task, wait_s: float) -> Task:
        """The task once finished, or as it is after `wait_s`."""
        if not task.status.finished:
            await self.executor.wait([task], wait_s, "all")
        return task

    def list_tasks(self, *, status: Status | None, tool: str | None, limit: int, owner: str) -> TaskList:
        return TaskList(tasks=self.executor.store.summaries(owner, self.executor.clock(), status, tool, limit))

    def stats(self, *, owner: str) -> dict[str, Any]:
        """What `offload://stats` shows: the caller's own work; server-wide figures (all owners' work, the
        reuse, the clients, the data directory) only to an admin owner or the only owner there is."""
        executor = self.executor
        active = [t for t in executor.active_tasks() if t.owner == owner]
        mine: dict[str, Any] = {
            "tasks_by_status": executor.store.count_by_status(owner, executor.clock()),
            "queue_depth": sum(t.status is Status.QUEUED for t in active),
            "running": sum(t.status is Status.RUNNING for t in active),
        }
        if not self.settings.is_admin(owner):
            return mine
        return {
            **mine,
            **_server_wide(executor),
            "clients": self.pool.stats(),
            "data_dir": str(data_dir(self.settings).expanduser()),
        }

    async def cancel(self, task_id: str, *, owner: str) -> TaskView:
        try:
            task = await self.executor.cancel(owner, task_id)
        except ForeignTaskError:
            await recover(self.executor)  # its server may have just died: then it is ours to settle now
            task = await self.executor.cancel(owner, task_id)
        return self.output_view(task, 0, 4096, 4096)

    async def catalog(self, *, owner: str) -> Catalog:
        """The tools this owner may fire (an upstream the owner may not use is not listed). The owner's
        upstreams whose tools are not known yet are started first, a few seconds at most, so a model learns
        their names without guessing."""
        upstreams = self.upstreams
        if upstreams is not None:
            await upstreams.start_for(owner)
        return catalog_of(
            spec for spec in self.executor.registry if upstreams is None or upstreams.allows(spec.name, owner)
        )

    def workers(self) -> list[dict[str, Any]]:
        """Distributed mode's live workers (offload://workers); empty in single-process mode."""
        store = self.executor.store
        return live_workers(store, time.time()) if isinstance(store, RedisStore) else []


def _known(runtime: Runtime, task_ids: Iterable[str], owner: str) -> tuple[list[Task], list[UnknownTask]]:
    """The caller's tasks by id, and the ids that are unknown or expired (they never fail the others)."""
    tasks, unknown = [], []
    for task_id in dict.fromkeys(task_ids):
        try:
            tasks.append(runtime.executor.get(owner, task_id))
        except DataDirGoneError:
            raise  # no id can be read: the whole call is refused
        except RequestError as exc:
            unknown.append(UnknownTask(task_id=task_id, message=runtime.redactor.text(str(exc))))
    return tasks, unknown


def _server_wide(executor: Executor) -> dict[str, Any]:
    """Every owner's work (per queue too, in distributed mode) and the reuse figures, for offload://stats."""
    counters = executor.counters
    everyone = executor.active_tasks()
    per_tool = {
        tool: {
            "lookups": lookups,
            "reused": counters.cache_reuses[tool],
            "hit_rate": round(counters.cache_reuses[tool] / lookups, 3),
        }
        for tool, lookups in counters.cache_lookups.items()
    }
    server: dict[str, Any] = {
        "queue_depth": sum(t.status is Status.QUEUED for t in everyone),
        "running": sum(t.status is Status.RUNNING for t in everyone),
    }
    if isinstance(executor.store, RedisStore):
        server["queues"] = queue_depths(executor.store)  # tasks waiting for a worker, per queue
    return {
        "server": server,
        "fired": counters.fired,
        "cache": {"hits": counters.cache_hits, "joined": counters.joined, "per_tool": per_tool},
    }


def _runner_factory(store: TaskStore, settings: Settings, tg: TaskGroup, role: str) -> RunnerFactory | None:
    """A distributed front-end's tasks run on workers (`DocketRunner`); everywhere else, here."""
    if not isinstance(store, RedisStore) or role != "serve":
        return None

    def make_runner(lifecycle: Lifecycle) -> DocketRunner:
        return DocketRunner(tg, settings, store, lifecycle)

    return make_runner


def _open_store(settings: Settings) -> TaskStore:
    """SQLite on the data directory; Redis (records and output) when `redis_url` is set."""
    if settings.redis_url is None:
        return Store.open(data_dir(settings), lease_s=settings.lease_s)
    needs_auth = redis_auth.check_credentials(settings.redis_url, settings.shell_config())
    try:
        store = RedisStore.open(
            settings.redis_url, data_dir(settings), namespace=settings.redis_namespace, lease_s=settings.lease_s
        )
    except StoreUnreachableError as exc:
        raise ConfigError(
            f"Redis at redis_url={exc.where} does not answer ({exc.reason}); start it, or fix redis_url "
            "(--redis-url or OFFLOAD_REDIS_URL)"
        ) from exc
    if needs_auth:
        try:
            redis_auth.check_auth_required(settings.redis_url)
        except ConfigError:
            store.close()
            raise
    store.output_max_bytes = settings.output_file_max_bytes
    return store


async def _registry(
    settings: Settings, pool: ClientPool, extra_tools: Iterable[ToolSpec], load_plugins: bool
) -> tuple[Registry, UpstreamSet, list[str]]:
    """Every fireable tool (other MCP servers' too), after checking that the shell's sandboxes can start here."""
    shell = await with_command_environment(settings.shell_config(), settings.shell_env, settings.shell_path)
    try:
        await sandbox.check([shell.sandbox, *(owner.sandbox for owner in shell.owners.values())])
    except sandbox.SandboxError as exc:
        raise ConfigError(str(exc)) from exc
    if exposure := sandbox.network_exposure(
        {"default": shell.sandbox, **{n: o.sandbox for n, o in shell.owners.items()}}
    ):
        log.warning("%s", exposure)
    registry = Registry(
        [
            shell_spec(shell),
            *preset_specs(shell),
            *http_specs(pool),
            *github_specs(pool),
            *claude_specs(pool),
            *extra_tools,
        ]
    )
    if load_plugins:
        registry.load_entry_points()
    upstreams = UpstreamSet(upstreams_config(settings, _upstream_environ(shell)))
    check_names(upstreams.config, registry.names())
    registry.add_source(upstreams)
    login_secrets = known_secrets(shell.base_env, ()) if shell.base_env is not None else []  # masked too
    return registry, upstreams, login_secrets


def _upstream_environ(shell: ShellConfig) -> Mapping[str, str]:
    """Offload's own variables (what an upstream's `${VAR}` may take) with the PATH commands get: the login
    shell's on macOS, or `shell_path`, so an upstream's `npx` is found where the user's terminal finds it."""
    path = (shell.base_env or {}).get("PATH")
    return os.environ if path is None else {**os.environ, "PATH": path}


async def _start_engine(executor: Executor, tg: TaskGroup) -> None:
    """Settles what an earlier run left, expires old results, then keeps the lease and the store tended."""
    try:
        await recover(executor)
        await executor.sweep()
    except Exception:  # a full disk, Redis gone for a moment: serve anyway; the lease loop tries again
        log.exception("settling earlier tasks or expiring old ones failed; will try again")
    tg.start_soon(upkeep_forever, executor, name="offload store upkeep")
    tg.start_soon(watch_peers, executor, executor.settings.lease_s / 3, name="offload lease and peers")
    if isinstance(executor.store, Store):  # Redis has a change stream of its own (`follow_changes`)
        tg.start_soon(follow_peers, executor, executor.store, name="offload news of other servers")


def catalog_of(specs: Iterable[ToolSpec]) -> Catalog:
    return Catalog(
        tools=[
            FireableTool(
                name=spec.name,
                description=spec.description,
                input_schema=spec.input_schema,
                flags=spec.flags(),
                default_timeout_s=spec.default_timeout_s,
                note=spec.note,
            )
            for spec in specs
        ]
    )


def secret_variables(settings: Settings) -> list[str]:
    """The variables this server reads credentials from: their values are masked in every reply."""
    return [
        settings.github_token_env,
        settings.anthropic_key_env,
        settings.auth_token_env,
        *settings.owner_tokens().values(),
    ]


def secret_values(settings: Settings) -> list[str]:
    """Secrets the settings hold themselves (a password in redis_url): masked like the others."""
    return [] if settings.redis_url is None else url_secrets(settings.redis_url)


def _use_pidfd_child_watcher() -> None:
    """Python 3.11 watches each child with a thread (~1.5 ms of loop time a spawn, measured);
    pidfd watching, the default from 3.12, costs ~0.2 ms. Linux only; harmless to skip."""
    if sys.version_info >= (3, 12) or portable():
        return
    if sys.platform == "linux":  # a check mypy reads, so the block is skipped for other platforms
        try:
            current = asyncio.get_child_watcher()
            if isinstance(current, asyncio.PidfdChildWatcher) and current.is_active():
                return  # already watching this loop: replacing it would orphan its pending children
            watcher = asyncio.PidfdChildWatcher()
            watcher.attach_loop(asyncio.get_running_loop())
            asyncio.set_child_watcher(watcher)
        except (OSError, RuntimeError, AttributeError) as exc:  # old kernel, or not on asyncio
            log.debug("keeping the default child watcher: %s", exc)
