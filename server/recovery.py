"""Settling the tasks of dead servers: at start-up, and every few seconds while running.

A server is dead once its lease lapses (see `Store.orphaned`). Each of its unfinished tasks is
claimed by exactly one live server (`Store.claim`), then:
- queued, or never given a process → `failed`/`interrupted`: nothing of it ran or runs;
- its tool has a `recover` hook → the hook runs as the task's handler, like any task: it
  follows what still runs (a detached command), reports what finished meanwhile, or fails
  `interrupted` after ending what is left;
- otherwise → `failed`/`interrupted`, after killing its process group (identity checked, so a
  recycled pid is never hit) and every process still carrying its marker.
Either way the task then reads, cancels and notifies like any other, from every server.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio

from server.errors import DataDirGoneError
from server.executor import Executor
from server.redis_store import RedisStore
from server.store import Store
from server.tasks import ErrorKind, Status, Task, TaskError
from tools.context import JSON, ToolContext
from tools.process import carries_marker, end_marked, is_same_process, kill_left_behind, tend_orphans
from tools.registry import Handler, Recover

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Recovered:
    claimed: int = 0
    handed_to_tool: int = 0
    interrupted: int = 0
    groups_killed: int = 0


async def recover(executor: Executor, wall_clock: Callable[[], float] = time.time) -> Recovered:
    report = Recovered()
    now = wall_clock()
    if not executor.runs_here and not _no_worker_left(executor, now):
        return report  # a distributed front-end: the workers settle each other's tasks while any lives
    tasks = executor.store.claim_orphans(now, executor.registry.get)
    async with anyio.create_task_group() as tg:
        for task in tasks:
            tg.start_soon(_recover_one, executor, task, report)
    report.claimed = len(tasks)
    if tasks:
        log.info(
            "settled %d unfinished tasks of a server that is gone: %d handed to their tool, %d interrupted, "
            "%d process groups killed",
            len(tasks),
            report.handed_to_tool,
            report.interrupted,
            report.groups_killed,
        )
    return report


def _no_worker_left(executor: Executor, now: float) -> bool:
    """A front-end settles dead workers' tasks itself only once no worker is left to do it (it cannot end
    what a dead worker left on its machine: a worker there does, when one starts)."""
    return isinstance(executor.store, RedisStore) and not executor.store.workers_alive(now)


async def _recover_one(executor: Executor, task: Task, report: Recovered) -> None:
    who = "the server running it" if task.holder is None else f"the process running it ({task.holder})"
    if task.status is Status.QUEUED or (task.process is None and task.watcher is None):
        _interrupted(executor, task, f"{who} stopped {_how_far(task)}")
        report.interrupted += 1
        return
    if not executor.runs_here:  # a front-end: what the dead worker left runs on another machine
        _interrupted(executor, task, f"{who} stopped before it finished, and no worker is left to end what remains")
        report.interrupted += 1
        return
    hook = task.spec.recover if task.spec is not None else None
    if hook is not None:
        watcher = task.watcher
        following = watcher is not None and (is_same_process(watcher) or carries_marker(watcher.pid, task.id))
        executor.adopt(task, _as_handler(hook, task), following=following)
        report.handed_to_tool += 1
        if not following:
            with anyio.move_on_after(executor.settings.kill_grace_s + 2):  # nothing to follow: settled at once
                await task.handle.done.wait()
        return
    grace_s = executor.settings.kill_grace_s
    with anyio.CancelScope(shield=True):  # bounded by the grace; never stopped between TERM and KILL
        killed = task.process is not None and await kill_left_behind(task.process, grace_s)
        killed = await end_marked(task.id, grace_s) > 0 or killed
    report.groups_killed += killed
    report.interrupted += 1
    what = "what was left of it was killed" if killed else "nothing of it was still running"
    _interrupted(executor, task, f"{who} stopped before it finished; {what}")


def _how_far(task: Task) -> str:
    """What is known of a task with no process of its own: never started, or a call (HTTP, GitHub, an LLM,
    another MCP server) that may have reached its service before it stopped: never "nothing ran" then."""
    if task.status is Status.QUEUED:
        return "before it started; nothing of it runs"
    return (
        "while it ran (a call to a service, or a command just starting: no process of it was recorded); "
        "whether it had any effect is unknown (check before repeating a write), and it was not run again"
    )


def _as_handler(hook: Recover, task: Task) -> Handler:
    orphan = task.orphan()

    async def follow(_arguments: object, ctx: ToolContext) -> JSON:
        return await hook(orphan, ctx)

    return follow


def _interrupted(executor: Executor, task: Task, message: str) -> None:
    executor.settle(task, Status.FAILED, TaskError(kind=ErrorKind.INTERRUPTED, message=message), None)


PEER_NEWS_S = 0.5
"""How often the data directory is asked what other servers changed (one PRAGMA when nothing did)."""


async def follow_peers(executor: Executor, store: Store, interval_s: float = PEER_NEWS_S) -> None:
    """Hears what the other servers on the data directory change (see `PeerFeed`) and tells it here."""
    while True:
        await anyio.sleep(interval_s)
        try:
            for task_id in store.peers.changed():
                executor.peer_changed(task_id)
        except DataDirGoneError:
            pass  # said once, by the store
        except Exception:
            log.exception("reading what other servers changed failed; will try again")


async def watch_peers(executor: Executor, interval_s: float, wall_clock: Callable[[], float] = time.time) -> None:
    """Renews this server's lease, settles the tasks of servers that died, reaps our orphans."""
    while True:
        await anyio.sleep(interval_s)
        try:
            executor.store.heartbeat(wall_clock())
            await recover(executor, wall_clock)
            if executor.runs_here:  # a front-end's: a worker beside it (`--worker`) tends its own
                tend_orphans([task.id for task in executor.active_tasks()])
        except DataDirGoneError:
            pass  # said once, by the store: nothing is left to tend until a restart
        except Exception:
            log.exception("checking on other servers failed; will try again")
