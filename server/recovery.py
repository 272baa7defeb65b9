"""Start-up recovery: the truthful end of tasks an earlier server process left unfinished.

For each task of a server instance that is gone (its lock is free):
- queued → `failed`/`interrupted`: it never started;
- its command's wrapper recorded an exit status → it finished while nobody watched:
  `completed`, or `failed`/`exit_status`, with that code and its output;
- detached and still the same process (pid and start time) → still running: follow it again;
- otherwise → `failed`/`interrupted`, after killing what it left behind (identity checked, so
  a recycled pid is never hit).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import anyio

from server.executor import Executor
from server.tasks import ErrorKind, Status, Task, TaskError
from tools.context import JSON, ProcessInfo, TaskFailure, ToolContext
from tools.registry import Handler, Reattach
from tools.shell import is_same_process, kill_left_behind, outcome_from_record, read_exit_file

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Recovered:
    finished: int = 0
    interrupted: int = 0
    followed: int = 0
    groups_killed: int = 0


async def recover(executor: Executor) -> Recovered:
    report = Recovered()
    store = executor.store
    tasks = [
        Task.from_row(row, store.output_path(row["id"]), executor.registry.get(row["tool"]), local=False)
        for row in store.orphaned()
    ]
    async with anyio.create_task_group() as tg:
        for task in tasks:
            tg.start_soon(_recover_one, executor, task, report)
    if tasks:
        log.info(
            "recovered %d unfinished tasks of an earlier run: %d finished meanwhile, %d interrupted, "
            "%d still running and followed again, %d process groups killed",
            len(tasks),
            report.finished,
            report.interrupted,
            report.followed,
            report.groups_killed,
        )
    return report


async def _recover_one(executor: Executor, task: Task, report: Recovered) -> None:
    info = task.process
    if task.status is Status.QUEUED or info is None:
        _interrupted(executor, task, "the server stopped before the task finished; nothing of it is running")
        report.interrupted += 1
        return
    exit_path = executor.store.exit_path(task.id)
    if read_exit_file(exit_path) is not None:
        if not task.detached and await kill_left_behind(info, executor.settings.kill_grace_s):
            report.groups_killed += 1  # background children of a command that had finished
        _settle_from_record(executor, task)
        report.finished += 1
        return
    reattach = task.spec.reattach if task.spec is not None else None
    if task.detached and reattach is not None and is_same_process(info):
        executor.adopt(task, _follow(reattach, info, task.started_at or task.created_at))
        report.followed += 1
        return
    killed = await kill_left_behind(info, executor.settings.kill_grace_s)
    report.groups_killed += killed
    report.interrupted += 1
    what = "its process group was killed" if killed else "its process was already gone"
    _interrupted(executor, task, f"the server stopped while the task ran; {what}")


def _follow(reattach: Reattach, info: ProcessInfo, started_wall_s: float) -> Handler:
    async def follow(_arguments: object, ctx: ToolContext) -> JSON:
        return await reattach(info, ctx, started_wall_s)

    return follow


def _settle_from_record(executor: Executor, task: Task) -> None:
    started = task.started_at or task.created_at
    store = executor.store
    try:
        result = outcome_from_record(store.exit_path(task.id), store.output_path(task.id), started)
    except TaskFailure as failure:
        executor.settle(task, Status.FAILED, TaskError(kind=failure.kind, message=failure.message), failure.result)
        return
    executor.settle(task, Status.COMPLETED, None, result)


def _interrupted(executor: Executor, task: Task, message: str) -> None:
    executor.settle(task, Status.FAILED, TaskError(kind=ErrorKind.INTERRUPTED, message=message), None)
