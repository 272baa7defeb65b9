"""ProcessTable: a worker's own record, on its machine, of the commands it runs, so that what a killed
worker left running is ended there, whoever settles its tasks.

In distributed mode a task's record, its process identity included, lives in Redis, and any worker settles
the tasks of a worker whose lease lapsed; but a process can only be ended on its own machine, and
`kill_left_behind` rightly refuses an identity recorded under another boot id. So a worker also keeps, in
its data directory (`processes.db`, SQLite), one row per command it starts: the task id and the process
identity (pid = process group, start ticks, boot id), written as the command starts and deleted when its
task ends. Each worker instance holds an flock on its instance file for as long as it runs (the lock
`Store` uses): a free lock is a dead instance, known at once on this machine.

`left_behind` lists the rows of dead instances of this host (a lock seen through a file system shared with
another host proves nothing); `end_left_behind` ends each one's process group if its identity still
matches (never a recycled pid) and every process still carrying its task's marker; `forget` drops the rows.
The worker does so at start and in its periodic loop (`WorkerEngine.end_left_behind`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import anyio

from server.store import PRIVATE_DIR_MODE, PRIVATE_FILE_MODE, connect, hold_lock, lock_is_free
from tools.context import ProcessInfo
from tools.process import end_marked, kill_left_behind

log = logging.getLogger(__name__)

TABLE_NAME = "processes.db"
WAL_PAGES = 100
"""The table is tiny: its WAL is copied back every this many pages, on the commit that crosses it."""

_SCHEMA = """
    CREATE TABLE IF NOT EXISTS processes (
        instance TEXT NOT NULL,
        task_id TEXT NOT NULL,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        start_ticks INTEGER,
        boot_id TEXT,
        PRIMARY KEY (instance, task_id)
    );
"""


@dataclass(frozen=True, slots=True)
class LeftBehind:
    """A command a dead worker instance started and never saw end."""

    instance: str
    task_id: str
    process: ProcessInfo


class ProcessTable:
    def __init__(self, root: Path, db: sqlite3.Connection, instance: str, lock_fd: int) -> None:
        self.root = root
        self.instance = instance
        self._db = db
        self._lock_fd = lock_fd
        self._host = socket.gethostname()
        self._closed = False

    def __repr__(self) -> str:
        return f"<ProcessTable {self.root / TABLE_NAME} instance={self.instance}>"

    @classmethod
    def open(cls, root: Path, instance: str) -> ProcessTable:
        """Opens (or creates) the table in the data directory `root` and takes `instance`'s lock; an
        unreadable table is moved aside (what it recorded is then not cleaned up), not fatal."""
        root = root.expanduser()
        (root / "instances").mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        path = root / TABLE_NAME
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE))  # 0600 before SQLite
        lock_fd = hold_lock(_lock_path(root, instance))
        try:
            db = connect(path, _create)
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(root, db, instance, lock_fd)

    def __enter__(self) -> ProcessTable:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Gives up this instance's lock. Rows still here (a command shutdown could not stop) are then
        another instance's to end. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._db.close()
        os.close(self._lock_fd)
        with contextlib.suppress(OSError):
            _lock_path(self.root, self.instance).unlink()

    def add(self, task_id: str, process: ProcessInfo) -> None:
        """Never raises: a row the disk cannot take is logged (the task runs on; only its crash cleanup
        on this machine is lost)."""
        self._write(
            "INSERT OR REPLACE INTO processes (instance, task_id, host, pid, start_ticks, boot_id) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(self.instance, task_id, self._host, process.pid, process.start_ticks, process.boot_id)],
        )

    def remove(self, task_id: str) -> None:
        """The task ended: nothing of it is left to clean up (another instance's row is never touched)."""
        self._write("DELETE FROM processes WHERE instance = ? AND task_id = ?", [(self.instance, task_id)])

    def left_behind(self) -> list[LeftBehind]:
        """The rows of this host's other instances whose lock is free: they died with these commands started."""
        rows = self._db.execute(
            "SELECT instance, task_id, pid, start_ticks, boot_id FROM processes WHERE instance != ? AND host = ?",
            (self.instance, self._host),
        ).fetchall()
        dead: dict[str, bool] = {}
        for row in rows:
            if row["instance"] not in dead:
                dead[row["instance"]] = lock_is_free(_lock_path(self.root, row["instance"]))
        return [
            LeftBehind(row["instance"], row["task_id"], ProcessInfo(row["pid"], row["start_ticks"], row["boot_id"]))
            for row in rows
            if dead[row["instance"]]
        ]

    def forget(self, rows: Iterable[LeftBehind]) -> None:
        self._write(
            "DELETE FROM processes WHERE instance = ? AND task_id = ?", [(row.instance, row.task_id) for row in rows]
        )

    def _write(self, statement: str, values: list[tuple[object, ...]]) -> None:
        try:
            self._db.executemany(statement, values)
        except sqlite3.Error as exc:
            log.warning("the process table %s cannot be written (%s)", self.root / TABLE_NAME, exc)


async def end_left_behind(rows: Iterable[LeftBehind], grace_s: float) -> int:
    """Ends what each row's command left: its process group (TERM, grace, KILL), only while its identity
    matches, and every process still carrying its task's marker; returns how many commands had something."""
    ended: list[LeftBehind] = []

    async def end(row: LeftBehind) -> None:
        killed = await kill_left_behind(row.process, grace_s)
        if await end_marked(row.task_id, grace_s) > 0 or killed:
            ended.append(row)

    async with anyio.create_task_group() as tg:
        for row in rows:
            tg.start_soon(end, row)
    for row in ended:
        log.info(
            "ended what task %s left running (pid %d) when worker %s died", row.task_id, row.process.pid, row.instance
        )
    return len(ended)


def _lock_path(root: Path, instance: str) -> Path:
    return root / "instances" / f"{instance}.lock"


def _create(db: sqlite3.Connection) -> sqlite3.Connection:
    db.execute(f"PRAGMA wal_autocheckpoint = {WAL_PAGES}")
    db.executescript(_SCHEMA)
    return db
