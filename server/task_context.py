"""The `ToolContext` a running task gets: plain callables that record what the tool reports (its
process, a detached command's capture process) in the task and the store, so `tools/` never needs
`server/`."""

from __future__ import annotations

import sys

import anyio

from server.config import Settings
from server.output import OutputLog, OutputWriter, StoredLog
from server.store import TaskStore
from server.tasks import ErrorKind, Task
from tools.context import ProcessInfo, ToolContext


def context_for(task: Task, store: TaskStore, settings: Settings, copy_turns: anyio.CapacityLimiter) -> ToolContext:
    output = task.output

    def set_process(info: ProcessInfo) -> None:
        task.process = info
        task.detached = settings.detach or task.watcher is not None
        store.record_process(task)
        task.handle.started.set()

    def set_watcher(info: ProcessInfo) -> None:
        task.watcher, task.detached = info, True
        if isinstance(task.output, OutputLog):
            task.output.close()
            task.output = StoredLog(task.output.path)  # the capture process writes it from now on
        store.record_watcher(task)

    return ToolContext(
        task_id=task.id,
        write_output=output.write if isinstance(output, OutputWriter) else _no_output,
        output_bytes=lambda: task.output.total_bytes,
        set_process=set_process,
        set_watcher=set_watcher,
        output_path=store.output_path(task.id),
        exit_path=store.exit_path(task.id),
        capture_argv=capture_argv(store, settings, task.id),
        kill_grace_s=settings.kill_grace_s,
        shutting_down=lambda: task.handle.cancel_reason is ErrorKind.SHUTDOWN,
        copy_turns=copy_turns,
        owner=task.owner,
    )


def capture_argv(store: TaskStore, settings: Settings, task_id: str) -> list[str]:
    """The capture process of a detached command (`server/capture.py`)."""
    return [
        sys.executable,
        "-I",  # isolated: a `server` package in the command's cwd or on its PYTHONPATH is never run instead
        "-m",
        "server.capture",
        "--log",
        str(store.output_path(task_id)),
        "--exit",
        str(store.exit_path(task_id)),
        "--file-max",
        str(settings.output_file_max_bytes),
        "--grace",
        str(settings.kill_grace_s),
    ]


def _no_output(_data: bytes) -> None:
    """A task whose process writes its output file itself gets nothing through the server."""
