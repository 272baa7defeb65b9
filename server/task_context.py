"""The `ToolContext` a running task gets: plain callables that record what the tool reports (its
process, a detached command's capture process) in the task and the store, so `tools/` never needs
`server/`."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import anyio

from server.config import Settings
from server.output import OutputLog, OutputWriter, StoredLog
from server.store import TaskStore
from server.tasks import ErrorKind, Task
from tools.context import ProcessInfo, Stdin, ToolContext


def context_for(
    task: Task,
    store: TaskStore,
    settings: Settings,
    copy_turns: anyio.CapacityLimiter,
    announce: Callable[[], None] = lambda: None,
) -> ToolContext:
    """`announce`: tells waiters and subscribers the task changed without a change of status (it is ready)."""
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

    def set_input(stdin: Stdin | None) -> None:
        task.handle.stdin = stdin

    def set_ready() -> None:
        task.ready_at = time.time()
        announce()

    return ToolContext(
        task_id=task.id,
        write_output=_told(output.write, task) if isinstance(output, OutputWriter) else _no_output,
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
        set_input=set_input,
        set_ready=set_ready,
    )


def _told(write: Callable[[bytes], None], task: Task) -> Callable[[bytes], None]:
    """Stores the bytes, then wakes whoever waits for new output (`poll_output(wait_for=...)`)."""

    def write_and_tell(data: bytes) -> None:
        write(data)
        for listener in task.handle.output_listeners:
            listener.set()

    return write_and_tell


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
