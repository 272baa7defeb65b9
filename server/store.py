"""Store: the durable tier. Tasks in SQLite, their output in files, one data directory.

Every task row is committed before its id is returned and again at each status change, on
the event loop: a commit in WAL mode with `synchronous=NORMAL` costs tens of microseconds
(measured ~20 µs here), where handing each write to a writer thread cost ~0.9 ms through the
GIL. Nothing a client has seen is lost to a kill -9. Output bytes go to files, never rows.

Several servers may share a data directory (one per MCP client, as Claude Code starts them).
Each holds a lease: a row it renews (`heartbeat`) and an flock on its own instance file. A
server is dead once its lock is free (it died on this machine: known at once) or its lease is
older than `lease_s` (it stopped renewing, wherever it ran). Any live server may then settle
its tasks, after claiming each one (`claim`), so no task is settled twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from server.errors import ConfigError, DataDirGoneError, StoreFullError
from server.output import OutputLog, OutputWriter, StoredLog
from server.tasks import Status, Task, TaskError, TaskSummary, error_kind, iso
from tools.context import ProcessInfo
from tools.registry import ToolSpec

log = logging.getLogger(__name__)

DB_NAME = "offload.db"
WAL_KEEP_BYTES = 4 * 1024 * 1024
"""The WAL is cut back to this size when it starts over after a checkpoint (`journal_size_limit`): without
it the file kept the size of the largest burst for as long as the server ran (274 MB after 6,000 tasks)."""
SCHEMA_VERSION = 2

_MIGRATIONS: dict[int, str] = {
    1: """
        CREATE TABLE tasks (
            id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            tool TEXT NOT NULL,
            arguments TEXT NOT NULL,
            status TEXT NOT NULL,
            instance TEXT NOT NULL,
            created_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            expires_at REAL,
            ttl_s REAL NOT NULL,
            timeout_s REAL,
            cache_key TEXT,
            result TEXT,
            error_kind TEXT,
            error_message TEXT,
            pid INTEGER,
            start_ticks INTEGER,
            boot_id TEXT,
            detached INTEGER NOT NULL DEFAULT 0,
            output_external INTEGER NOT NULL DEFAULT 0,
            output_total INTEGER NOT NULL DEFAULT 0,
            output_head INTEGER,
            output_ring INTEGER,
            output_lost_from INTEGER,
            output_inline BLOB
        );
        CREATE INDEX tasks_owner_created ON tasks (owner, created_at);
        CREATE INDEX tasks_expires ON tasks (expires_at) WHERE expires_at IS NOT NULL;
        CREATE INDEX tasks_cache_key ON tasks (cache_key) WHERE cache_key IS NOT NULL;
        CREATE INDEX tasks_unfinished ON tasks (status) WHERE status IN ('queued', 'running');
        CREATE TABLE tombstones (
            id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            at REAL NOT NULL,
            reason TEXT NOT NULL
        );
        CREATE INDEX tombstones_at ON tombstones (at);
    """,
    2: """
        ALTER TABLE tasks ADD COLUMN watcher_pid INTEGER;
        ALTER TABLE tasks ADD COLUMN watcher_ticks INTEGER;
        CREATE TABLE instances (
            id TEXT PRIMARY KEY,
            pid INTEGER NOT NULL,
            host TEXT NOT NULL,
            started_at REAL NOT NULL,
            heartbeat_at REAL NOT NULL
        );
    """,
}


@dataclass(frozen=True, slots=True)
class Expired:
    """What is left of an expired task: whose it was, and when it expired."""

    owner: str
    at: float


SpecOf = Callable[[str], ToolSpec | None]
"""The configured tool of a stored task's name (None when it is no longer configured)."""


class TaskStore(Protocol):
    """Where task records, tombstones, leases, reuse keys and output live. `Store` (SQLite + files) is the
    embedded one; tests/test_task_store.py is the contract a second one must pass too."""

    instance: str

    def output_path(self, task_id: str) -> Path: ...
    def exit_path(self, task_id: str) -> Path: ...
    def new_output(self, task_id: str, file_max_bytes: int) -> OutputWriter: ...
    def add(self, task: Task) -> None: ...
    def record_running(self, task: Task) -> bool: ...
    def record_process(self, task: Task) -> None: ...
    def record_watcher(self, task: Task) -> None: ...
    def record_outcome(self, task: Task) -> bool: ...
    def load(self, task_id: str, spec_of: SpecOf) -> Task | None: ...
    def summaries(
        self, owner: str, now: float, status: Status | None, tool: str | None, limit: int
    ) -> list[TaskSummary]: ...
    def reusable(self, cache_key: str, now: float) -> str | None:
        """A task to reuse for this result key: completed and unexpired, else unfinished (to join)."""

    def unfinished(self, owner: str) -> int | None:
        """The owner's unfinished tasks wherever they run; None: this process counts its own."""

    def count_by_status(self, owner: str, now: float) -> dict[str, int]: ...
    def tombstone(self, task_id: str) -> Expired | None: ...
    def heartbeat(self, now: float) -> None: ...
    def claim_orphans(self, now: float, spec_of: SpecOf) -> list[Task]: ...
    def sweep(self, now: float, tombstones_max: int) -> list[str]: ...
    def remove_files(self, task_ids: list[str]) -> None: ...
    def checkpoint(self) -> None: ...
    def ensure_present(self) -> None:
        """Raises `DataDirGoneError` once the data directory this store opened was removed or replaced."""

    def close(self) -> None: ...


class FileLogs:
    """Where a server on a data directory keeps each task's output log and exit record: files."""

    output_dir: Path

    def output_path(self, task_id: str) -> Path:
        return self.output_dir / f"{task_id}.log"

    def exit_path(self, task_id: str) -> Path:
        return self.output_dir / f"{task_id}.exit"

    def new_output(self, task_id: str, file_max_bytes: int) -> OutputLog:  # a file in the data directory
        return OutputLog(self.output_path(task_id), file_max_bytes)


class Store(FileLogs):
    def __init__(
        self, root: Path, connection: sqlite3.Connection, instance: str, lock_fd: int, lease_s: float = 10.0
    ) -> None:
        self.root = root
        self.output_dir = root / "output"
        self.instance = instance
        self.lease_s = lease_s
        self._unwritten: dict[str, dict[str, Any]] = {}
        self._db = connection
        self._lock_fd = lock_fd
        self._closed = False
        self._dir = DataDirWatch(root)
        self.peers = PeerFeed(connection, instance)

    def __repr__(self) -> str:
        return f"<Store {self.root} instance={self.instance}>"

    @classmethod
    def open(cls, root: Path, *, lease_s: float = 10.0, now: float | None = None) -> Store:
        """Opens (or creates) the data directory; a corrupt database is moved aside, not fatal."""
        root = root.expanduser()
        _require_writable(root)
        for sub in ("output", "instances"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        make_private(root)
        instance = secrets.token_hex(8)
        lock_fd = hold_lock(root / "instances" / f"{instance}.lock")
        store = cls(root, connect(root / DB_NAME, _migrate), instance, lock_fd, lease_s)
        at = time.time() if now is None else now
        try:
            store.heartbeat(at)
        except sqlite3.OperationalError as exc:
            store.close()
            raise ConfigError(
                f"the data directory {str(root)!r} cannot be written ({exc}); free some space there, "
                "or choose another with --data-dir or OFFLOAD_DATA_DIR"
            ) from exc
        return store

    def close(self) -> None:
        """Writes what a full disk made `update` hold, then gives up this server's lease: its unfinished
        tasks become claimable at once. Idempotent."""
        if self._closed:
            return
        self._closed = True
        _report_unwritten(self.flush(), self.root)
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("DELETE FROM instances WHERE id = ?", (self.instance,))
            self._db.execute("PRAGMA optimize")
        self._db.close()
        os.close(self._lock_fd)
        with contextlib.suppress(OSError):
            (self.root / "instances" / f"{self.instance}.lock").unlink()

    # ---- writes (each one a commit) ----

    def add(self, task: Task) -> None:
        """Raises `StoreFullError` when the data directory cannot take the row: nothing is started then."""
        self.ensure_present()
        row = _row(task, self.instance)
        columns = ", ".join(row)
        marks = ", ".join(f":{name}" for name in row)
        try:
            self._db.execute(f"INSERT INTO tasks ({columns}) VALUES ({marks})", row)  # noqa: S608 - our column names
        except sqlite3.OperationalError as exc:
            raise StoreFullError(str(self.root), str(exc)) from exc

    def record_running(self, task: Task) -> bool:
        """False when another server settled the task first: it must not start then."""
        return self.update(task.id, status=task.status.value, started_at=task.started_at)

    def record_process(self, task: Task) -> None:
        process = task.process
        assert process is not None
        fields = {"pid": process.pid, "start_ticks": process.start_ticks, "boot_id": process.boot_id}
        self.update(task.id, **fields, detached=int(task.detached))

    def record_watcher(self, task: Task) -> None:
        watcher = task.watcher
        assert watcher is not None
        fields = {"watcher_pid": watcher.pid, "watcher_ticks": watcher.start_ticks, "boot_id": watcher.boot_id}
        self.update(task.id, **fields, detached=1)

    def record_outcome(self, task: Task) -> bool:
        """False when another server settled the task first (this one was taken for dead): the first
        outcome recorded is the one every reader sees, so a result never flips after it was read."""
        return self.update(task.id, **_outcome(task))

    def update(self, task_id: str, **values: Any) -> bool:
        """Never raises: a change the database cannot take now (disk full, locked past the timeout) is
        kept and written by `flush` later, so a full disk never takes the server or a task down. Written
        only while the task is unfinished (a settled record never changes); False when it was not."""
        if self._dir.gone:
            return True  # a database nobody can open again: nothing to write it to (see `ensure_present`)
        values = {**self._unwritten.pop(task_id, {}), **values}
        assignments = ", ".join(f"{name} = :{name}" for name in values)
        sql = f"UPDATE tasks SET {assignments} WHERE id = :id AND status IN ('queued', 'running')"  # noqa: S608
        try:
            cursor = self._db.execute(sql, {**values, "id": task_id})
        except sqlite3.OperationalError as exc:
            self._unwritten[task_id] = values
            log.warning(
                "the task database cannot be written (%s); holding changes of %d tasks", exc, len(self._unwritten)
            )
            return True
        return cursor.rowcount == 1

    def flush(self) -> int:
        """Writes the changes `update` had to hold; returns how many are still held."""
        for task_id in list(self._unwritten):
            self.update(task_id)
        return len(self._unwritten)

    # ---- reads ----

    def load(self, task_id: str, spec_of: SpecOf) -> Task | None:
        """The task as stored, expired or not (the caller decides); `local` False: no handle of ours runs it."""
        self.ensure_present()
        row = self._db.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return None if row is None else _task(row, self.output_path(task_id), spec_of(row["tool"]))

    def summaries(
        self, owner: str, now: float, status: Status | None, tool: str | None, limit: int
    ) -> list[TaskSummary]:
        """The owner's unexpired tasks, newest first."""
        self.ensure_present()
        query = "SELECT * FROM tasks WHERE owner = ? AND (expires_at IS NULL OR expires_at > ?)"
        params: list[Any] = [owner, now]
        if status is not None:
            query += " AND status = ?"
            params.append(status.value)
        if tool is not None:
            query += " AND tool = ?"
            params.append(tool)
        query += " ORDER BY created_at DESC, rowid DESC LIMIT ?"
        return [summary_of(row) for row in self._db.execute(query, [*params, limit])]

    def reusable(self, cache_key: str, now: float) -> str | None:
        """The newest completed, unexpired task with this result key; else a running one (any server's) to join."""
        found = self._db.execute(
            "SELECT id FROM tasks WHERE cache_key = ? AND (status IN ('queued', 'running') "
            "OR (status = 'completed' AND expires_at > ?)) "
            "ORDER BY status = 'completed' DESC, finished_at DESC, created_at DESC LIMIT 1",
            (cache_key, now),
        ).fetchone()
        return None if found is None else str(found[0])

    def unfinished(self, owner: str) -> int | None:
        return None  # each server counts its own (as before distributed mode)

    def count_by_status(self, owner: str, now: float) -> dict[str, int]:
        rows = self._db.execute(
            "SELECT status, count(*) FROM tasks WHERE owner = ? AND (expires_at IS NULL OR expires_at > ?) "
            "GROUP BY status",
            (owner, now),
        )
        return {str(status): int(count) for status, count in rows}

    def tombstone(self, task_id: str) -> Expired | None:
        found = self._db.execute("SELECT owner, at FROM tombstones WHERE id = ?", (task_id,)).fetchone()
        return None if found is None else Expired(found[0], found[1])

    # ---- leases ----

    def heartbeat(self, now: float) -> None:
        """Renews this server's lease (a row, re-inserted if a peer took it for dead and removed it)."""
        self.ensure_present()
        self.flush()
        self._db.execute(
            "INSERT INTO instances (id, pid, host, started_at, heartbeat_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
            (self.instance, os.getpid(), socket.gethostname(), now, now),
        )

    def claim_orphans(self, now: float, spec_of: SpecOf) -> list[Task]:
        """Takes over the unfinished tasks of server instances that are gone (lock free, or lease expired),
        each with one atomic UPDATE, so of several live servers exactly one settles each task."""
        rows = self._db.execute(
            "SELECT * FROM tasks WHERE status IN ('queued', 'running') AND instance != ?", (self.instance,)
        ).fetchall()
        names = {i: f"{host}#{pid}" for i, host, pid in self._db.execute("SELECT id, host, pid FROM instances")}
        dead: dict[str, bool] = {}
        for row in rows:
            if row["instance"] not in dead:
                dead[row["instance"]] = _instance_is_dead(self._db, self.root, row["instance"], now - self.lease_s)
        return [
            _task(row, self.output_path(row["id"]), spec_of(row["tool"]), names.get(row["instance"]))
            for row in rows
            if dead[row["instance"]] and self._claim(row["id"], row["instance"])
        ]

    def _claim(self, task_id: str, from_instance: str) -> bool:
        cursor = self._db.execute(
            "UPDATE tasks SET instance = ? WHERE id = ? AND instance = ? AND status IN ('queued', 'running')",
            (self.instance, task_id, from_instance),
        )
        return cursor.rowcount == 1

    def checkpoint(self) -> None:
        """Copies the WAL into the database file; blocking I/O with fsyncs, so it runs in a worker
        thread on a connection of its own, never on the event loop's commits. Not once the data directory
        is gone: a connection would make a fresh database in its place."""
        if not self._dir.gone_now():
            _checkpoint(self.root / DB_NAME)

    def ensure_present(self) -> None:
        self._dir.check()

    # ---- expiry ----

    def sweep(self, now: float, tombstones_max: int) -> list[str]:
        """Deletes expired task rows, leaving bounded tombstones; returns their ids (see `remove_files`)."""
        self.ensure_present()
        expired = self._db.execute(
            "SELECT id, owner, expires_at FROM tasks WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,)
        ).fetchall()
        if not expired:
            return []
        with self._transaction():
            self._db.executemany(
                "INSERT OR REPLACE INTO tombstones (id, owner, at, reason) VALUES (?, ?, ?, 'expired')",
                [(row[0], row[1], row[2]) for row in expired],
            )
            self._db.executemany("DELETE FROM tasks WHERE id = ?", [(row[0],) for row in expired])
            self._db.execute(
                "DELETE FROM tombstones WHERE id NOT IN (SELECT id FROM tombstones ORDER BY at DESC LIMIT ?)",
                (tombstones_max,),
            )
        return [row[0] for row in expired]

    def remove_files(self, task_ids: list[str]) -> None:
        """Blocking file I/O, a few unlinks a task: run it in a worker thread."""
        for task_id in task_ids:
            _remove_task_files(self.output_path(task_id), self.exit_path(task_id))

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")


def _instance_is_dead(db: sqlite3.Connection, root: Path, instance: str, stale_before: float) -> bool:
    """On this host the lock says it at once (and a busy loop is no death); elsewhere the lease."""
    lease = db.execute("SELECT heartbeat_at, host FROM instances WHERE id = ?", (instance,)).fetchone()
    if lease is not None and lease["host"] != socket.gethostname():
        stale = bool(lease["heartbeat_at"] < stale_before)
        if stale:
            db.execute("DELETE FROM instances WHERE id = ?", (instance,))
        return stale
    dead = lock_is_free(root / "instances" / f"{instance}.lock")
    if dead:
        db.execute("DELETE FROM instances WHERE id = ?", (instance,))
    return dead


class DataDirWatch:
    """Notices the data directory (or its database) removed or replaced under a running server, by the
    database file's device and inode: one stat a call. From then on the store refuses fires and reads,
    and writes nothing: an open connection would go on writing into an unlinked file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._db_path = root / DB_NAME
        self._identity = _identity(self._db_path)
        self.gone = False

    def check(self) -> None:
        if self.gone_now():
            raise DataDirGoneError(str(self.root))

    def gone_now(self) -> bool:
        if not self.gone and _identity(self._db_path) != self._identity:
            self.gone = True
            log.error(
                "the data directory %s (or its database) was removed or replaced while this server ran; "
                "fires and reads are refused from now on: restart the server",
                self.root,
            )
        return self.gone


class PeerFeed:
    """What other servers on the data directory changed: the ids of their tasks that appeared or changed
    status since the last call. SQLite sends no events across processes; `PRAGMA data_version` (no I/O)
    says whether any other connection committed, and only then are two indexed queries run: new rows
    (by rowid) and the others' unfinished tasks (compared with the last look)."""

    def __init__(self, db: sqlite3.Connection, instance: str) -> None:
        self._db = db
        self._instance = instance
        self._version: int | None = None
        self._last_rowid = int(db.execute("SELECT coalesce(max(rowid), 0) FROM tasks").fetchone()[0])
        self._unfinished: dict[str, str] = {}

    def changed(self) -> list[str]:
        version = int(self._db.execute("PRAGMA data_version").fetchone()[0])
        if version == self._version:
            return []
        self._version = version
        fresh = self._db.execute(
            "SELECT rowid, id FROM tasks WHERE rowid > ? AND instance != ?", (self._last_rowid, self._instance)
        ).fetchall()
        self._last_rowid = max([self._last_rowid, *(row[0] for row in fresh)])
        now = dict(
            self._db.execute(
                "SELECT id, status FROM tasks WHERE status IN ('queued', 'running') AND instance != ?",
                (self._instance,),
            ).fetchall()
        )
        moved = [task_id for task_id, status in self._unfinished.items() if now.get(task_id) != status]
        self._unfinished = now
        return list(dict.fromkeys([*(row[1] for row in fresh), *moved]))


def _checkpoint(path: Path) -> None:
    """PASSIVE copies the bulk with no writer waiting, but under a steady stream of tasks it never catches
    up, and the WAL only starts over once it has. So a WAL past `WAL_KEEP_BYTES` then gets a TRUNCATE:
    it copies the few frames left with commits held back that long (waiting at most 100 ms for them)."""
    db = sqlite3.connect(path, timeout=5.0)
    try:
        db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        if Path(f"{path}-wal").stat().st_size > WAL_KEEP_BYTES:
            db.execute("PRAGMA busy_timeout = 100")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except FileNotFoundError:
        pass  # no WAL: nothing to copy
    finally:
        db.close()


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        found = path.stat()
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino


# ---- row mapping ----

Row = Mapping[str, Any] | sqlite3.Row


def _row(task: Task, instance: str) -> dict[str, Any]:
    """Every column of a new task."""
    process = task.process
    return {
        "id": task.id,
        "owner": task.owner,
        "tool": task.tool,
        "arguments": "{}" if task.arguments is None else task.arguments.model_dump_json(by_alias=True),
        "instance": instance,
        "created_at": task.created_at,
        "started_at": task.started_at,
        "ttl_s": task.ttl_s,
        "timeout_s": task.timeout_s,
        "cache_key": task.cache_key,
        "pid": None if process is None else process.pid,
        "start_ticks": None if process is None else process.start_ticks,
        "boot_id": None if process is None else process.boot_id,
        "detached": int(task.detached),
        **_outcome(task),
    }


def _outcome(task: Task) -> dict[str, Any]:
    """What changes when a task finishes: its outcome and how much output it wrote."""
    return {
        "status": task.status.value,
        "finished_at": task.finished_at,
        "expires_at": task.expires_at,
        "result": None if task.result is None else json.dumps(task.result, separators=(",", ":")),
        "error_kind": None if task.error is None else task.error.kind,
        "error_message": None if task.error is None else task.error.message,
        "output_total": task.output.total_bytes,
    }


def _task(row: Row, output_path: Path, spec: ToolSpec | None, holder: str | None = None) -> Task:
    if row["output_inline"] is not None and not output_path.exists():
        _write_inline(output_path, row["output_inline"])  # a small output Offload 0.1 kept in its row
    error = (
        None
        if row["error_kind"] is None
        else TaskError(kind=error_kind(row["error_kind"]), message=row["error_message"])
    )
    return Task(
        id=row["id"],
        tool=row["tool"],
        owner=row["owner"],
        created_at=row["created_at"],
        ttl_s=row["ttl_s"],
        output=StoredLog(output_path),
        spec=spec,
        timeout_s=row["timeout_s"],
        time_left_s=row["timeout_s"],
        cache_key=row["cache_key"],
        status=Status(row["status"]),
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        result=None if row["result"] is None else json.loads(row["result"]),
        error=error,
        process=_process(row["pid"], row["start_ticks"], row["boot_id"]),
        watcher=_process(row["watcher_pid"], row["watcher_ticks"], row["boot_id"]),
        detached=bool(row["detached"]),
        local=False,
        holder=holder,
    )


def summary_of(row: Row | Mapping[str, Any]) -> TaskSummary:
    """A task's line in `list_tasks`, from a row of either store (the same field names)."""
    return TaskSummary(
        task_id=row["id"],
        tool=row["tool"],
        status=Status(row["status"]),
        error_kind=None if row["error_kind"] is None else error_kind(row["error_kind"]),
        created_at=iso(row["created_at"]) or "",
        finished_at=iso(row["finished_at"]),
    )


def _process(pid: int | None, ticks: int | None, boot_id: str | None) -> ProcessInfo | None:
    return None if pid is None else ProcessInfo(pid, ticks, boot_id)


def _write_inline(path: Path, data: bytes) -> None:
    log = OutputLog(path, max(len(data), 2) * 2)
    log.write(data)
    log.finish()


PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def make_private(root: Path) -> None:
    """The data directory holds every owner's arguments and output: directories 0700, files 0600.

    Looser modes left by an earlier version (or another umask) are tightened, with a log line. The
    database is created 0600 before SQLite opens it, so its -wal and -shm files get the same mode.
    """
    tightened = 0
    for folder in (root, root / "output", root / "instances"):
        if folder.stat().st_mode & 0o077:
            log.warning("tightening %s to mode 0700: the data directory must be private to this user", folder)
            folder.chmod(PRIVATE_DIR_MODE)
        for entry in os.scandir(folder):
            if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mode & 0o077:
                os.chmod(entry.path, PRIVATE_FILE_MODE)
                tightened += 1
    if tightened:
        log.warning("tightened %d files in %s to mode 0600", tightened, root)
    os.close(os.open(root / DB_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE))


def _require_writable(root: Path) -> None:
    try:
        root.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"the data directory {str(root)!r} cannot be written ({exc.strerror or exc}); "
            "choose another with --data-dir or OFFLOAD_DATA_DIR"
        ) from exc


def lock_is_free(path: Path) -> bool:
    """Free means its holder (a server, a worker's process table) is gone: a live one holds it as long as it runs."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        path.unlink()
    return True


def _report_unwritten(held: int, root: Path) -> None:
    if held:
        log.error(
            "could not write the changes of %d tasks before shutting down (the task database in %s still "
            "cannot be written): they will read as interrupted; free some space there",
            held,
            root,
        )


def _remove_task_files(log_path: Path, exit_path: Path) -> None:
    for path in (log_path, exit_path, log_path.with_suffix(".sh"), log_path.with_suffix(".stdin")):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def hold_lock(path: Path) -> int:
    """An instance's liveness signal on this machine: an flock the kernel drops when the process dies."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, str(os.getpid()).encode())
    return fd


def connect(path: Path, prepare: Callable[[sqlite3.Connection], sqlite3.Connection]) -> sqlite3.Connection:
    """A database of the data directory (WAL, checked), made ready by `prepare` (its schema); one that is
    unreadable is moved aside and a fresh one started, with a log line."""
    try:
        return prepare(_open_db(path))
    except sqlite3.DatabaseError as exc:
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        log.error(  # noqa: TRY400 - the line says all an operator needs; no traceback
            "the database %s is unreadable (%s); moved it to %s and started a fresh one", path, exc, aside
        )
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                Path(f"{path}{suffix}").rename(f"{aside}{suffix}")
        return prepare(_open_db(path))


def _open_db(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, timeout=5.0)
    db.row_factory = sqlite3.Row
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("PRAGMA wal_autocheckpoint = 0")  # checkpoints run in a worker thread: `Store.checkpoint`
        db.execute(f"PRAGMA journal_size_limit = {WAL_KEEP_BYTES}")  # a WAL a checkpoint emptied shrinks
        verdict = db.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError:
        db.close()
        raise
    if verdict != "ok":
        db.close()
        raise sqlite3.DatabaseError(f"integrity check: {verdict}")
    return db


def _migrate(db: sqlite3.Connection) -> sqlite3.Connection:
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise ConfigError(
            f"the task database was written by a newer Offload (schema {version} > {SCHEMA_VERSION}); "
            "upgrade, or use another --data-dir"
        )
    for target in range(version + 1, SCHEMA_VERSION + 1):
        db.executescript(f"BEGIN; {_MIGRATIONS[target]}; PRAGMA user_version = {target}; COMMIT;")
    return db
