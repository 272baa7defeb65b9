"""RedisStore: the TaskStore of distributed mode. Task records, tombstones, leases, reuse keys and output
live in Redis, shared by every front-end and worker; the same contract as the SQLite `Store`
(tests/test_task_store.py runs against both).

Keys, under one namespace (`offload` unless a test picks its own):
    {ns}:task:{id}       hash: the record, each field JSON
    {ns}:owner:{owner}   zset: the owner's task ids by created_at
    {ns}:cache:{key}     zset: completed task ids of a result key by finished_at
    {ns}:inflight:{key}  the unfinished task of a result key (what an identical call joins), until its outcome
    {ns}:expiring        zset: finished task ids by expires_at (what `sweep` walks)
    {ns}:unfinished      set: queued and running task ids (what `claim_orphans` walks)
    {ns}:active:{owner}  set: the owner's unfinished task ids (its `max_active_per_owner`, cluster-wide)
    {ns}:tomb:{id}, {ns}:tombs   tombstones (bounded, newest kept)
    {ns}:instance:{id}   a live process's lease: a key that expires after lease_s unless renewed
    {ns}:fence:{id}      the run fence: who runs the task (set once; a redelivery finds it taken)
    {ns}:out:{id}, {ns}:outmeta:{id}   the output stream and its layout (`RedisLog`)
and two pub/sub channels, {ns}:changes (a task id each time a task changes) and {ns}:cancel.

The interface is synchronous, like the SQLite store's: each call is one round trip (a pipeline or a
script) to a Redis that is meant to be near, so it runs on the event loop as SQLite's commits do.

Across an outage (Redis not answering for a while) nothing a task records is dropped, as with the SQLite
store's `update` and `flush`. A task change Redis does not take is held in this process, merged with that
task's later changes (a later value wins, so an older held status never overwrites a newer one), and written
whole (its fields, its moves out of `unfinished` and into `expiring` and its result key, its message on the
change channel) at the task's next change and at every `heartbeat` (`flush`); one warning per outage, not one
per change. Output a `RedisLog` could not store is held by the log, bounded as the log is, and written by the
same `flush` and at its `finish`. `close` tries once more. What is held lives in this process's memory only: a
process that dies before Redis answers again loses it (its lease lapses, and whoever claims its tasks settles
them `interrupted`). The calls that start or steer a task (`add`, `hand_off`, `request_cancel`, reads) raise
`StoreUnreachableError` instead: their caller can act.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry
from redis.typing import FieldT

from server.errors import StoreUnreachableError
from server.output import Chunk, Output, chunk_of, is_continuation, plan_read
from server.process_table import ProcessTable
from server.redact import mask_url
from server.store import Expired, SpecOf, make_private, summary_of
from server.tasks import Status, Task, TaskError, TaskSummary, error_kind
from tools.context import ProcessInfo

log = logging.getLogger(__name__)

UNFINISHED = (Status.QUEUED.value, Status.RUNNING.value)
HANDED_TO_QUEUE = ""
"""The `instance` of a task waiting in a Docket queue: no process holds it, so nobody's death settles it."""
READ_RETRIES = 4
STATUS_CHANGED = "status"
DETAIL_CHANGED = "detail"
"""What a message on the change channel (`{task id} {what}`) says changed: the status, or a detail (the pid)."""
CANCEL_FENCE = "cancel_task"
"""The fence of a task cancelled before any worker took it."""

_CLAIM = """
local status = redis.call('HGET', KEYS[1], 'status')
if redis.call('HGET', KEYS[1], 'instance') == ARGV[1] and (status == '"queued"' or status == '"running"') then
  redis.call('HSET', KEYS[1], 'instance', ARGV[2])
  return 1
end
return 0
"""

_COMPLETE_RECORD = {b"id", b"owner", b"tool", b"status", b"created_at", b"ttl_s"}
"""A task record has these from its first write; a later write to a record Redis lost leaves only some."""

_SWEEP_ONE = """
if redis.call('EXISTS', KEYS[1]) == 0 or not redis.call('HGET', KEYS[1], 'owner') then
  redis.call('DEL', KEYS[1], KEYS[5], KEYS[6], KEYS[7])
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 0
end
local owner = cjson.decode(redis.call('HGET', KEYS[1], 'owner'))
local at = redis.call('ZSCORE', KEYS[2], ARGV[1])
local key = cjson.decode(redis.call('HGET', KEYS[1], 'cache_key'))
redis.call('HSET', KEYS[3], 'owner', owner, 'at', at)
redis.call('ZADD', KEYS[4], at, ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', ARGV[2] .. owner, ARGV[1])
if key ~= cjson.null then redis.call('ZREM', ARGV[3] .. key, ARGV[1]) end
redis.call('DEL', KEYS[1], KEYS[5], KEYS[6], KEYS[7])
return 1
"""

_RECORD_OUTCOME = """
local status = redis.call('HGET', KEYS[1], 'status')
if status and status ~= '"queued"' and status ~= '"running"' then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
if redis.call('GET', KEYS[6]) == ARGV[1] then redis.call('DEL', KEYS[6]) end
redis.call('SREM', KEYS[7], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
if ARGV[3] ~= '' then redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1]) end
redis.call('PUBLISH', KEYS[5], ARGV[1] .. ' status')
return 1
"""
"""The first outcome recorded stays: a later one (from a process taken for dead) is refused."""

_RECORD_CHANGE = """
local status = redis.call('HGET', KEYS[1], 'status')
if status and status ~= '"queued"' and status ~= '"running"' then return 0 end
local n = tonumber(ARGV[1])
redis.call('HSET', KEYS[1], unpack(ARGV, n + 2))
for i = 2, n + 1 do redis.call('PUBLISH', KEYS[2], ARGV[i]) end
return 1
"""
"""Any other change of a record, the same way: a settled task's record no longer changes."""

_FENCE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'gone', ''} end
local status = cjson.decode(redis.call('HGET', KEYS[1], 'status'))
if status ~= 'queued' and status ~= 'running' then return {'finished', status} end
local holder = redis.call('GET', KEYS[2])
if holder then return {'taken', holder} end
redis.call('SET', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], 'instance', ARGV[2])
return {'ok', ''}
"""


class RedisRecords:
    """Reading task records out of Redis (and the key and channel names): what every process needs, the
    front-ends' lookups above all. `RedisStore` adds the writes, leases, fences and expiry."""

    redis: redis.Redis
    ns: str
    where: str
    output_max_bytes: int
    unwritten_logs: set[RedisLog]
    """This process's logs holding output Redis has not taken yet (what `RedisStore.flush` writes)."""

    def key(self, kind: str, name: str) -> str:
        return self._key(kind, name)

    def _key(self, kind: str, name: str) -> str:
        return _key(self.ns, kind, name)

    @property
    def changes_channel(self) -> str:
        return f"{self.ns}:changes"

    @property
    def cancel_channel(self) -> str:
        return f"{self.ns}:cancel"

    def _reachable(self) -> AbstractContextManager[None]:
        return reachable(self.where)

    def new_output(self, task_id: str, file_max_bytes: int, *, writing: bool = False) -> RedisLog:
        """The task's log; `writing`: this process runs the task and writes it (a worker)."""
        stream, meta = self._key("out", task_id), self._key("outmeta", task_id)
        return RedisLog(self.redis, stream, meta, file_max_bytes, self.where, self.unwritten_logs, writing=writing)

    def load(self, task_id: str, spec_of: SpecOf) -> Task | None:
        with self._reachable():
            raw = self.redis.hgetall(self._key("task", task_id))
        if not raw.keys() >= _COMPLETE_RECORD:  # none, or the remains of one Redis lost (a late write made it)
            return None
        record = {_text(k): _decode(v) for k, v in raw.items()}
        return self._task(record, spec_of)

    def arguments_json(self, task_id: str) -> str | None:
        value = _decode(self.redis.hget(self._key("task", task_id), "arguments"))
        return None if value is None else str(value)

    def _records(self, ids: list[str], fields: tuple[str, ...]) -> list[dict[str, Any] | None]:
        pipe = self.redis.pipeline(transaction=False)
        for task_id in ids:
            pipe.hmget(self._key("task", task_id), list(fields))
        found: list[dict[str, Any] | None] = []
        for values in pipe.execute():
            if values[0] is None:
                found.append(None)
            else:
                found.append({name: _decode(v) for name, v in zip(fields, values, strict=True)})
        return found

    def _owner_records(self, owner: str, fields: tuple[str, ...]) -> Iterator[dict[str, Any]]:
        """The owner's records, newest first, a page at a time."""
        zkey = self._key("owner", owner)
        start = 0
        page = 200
        with self._reachable():
            while True:
                ids = [_text(i) for i in self.redis.zrevrange(zkey, start, start + page - 1)]
                if not ids:
                    return
                for record in self._records(ids, fields):
                    if record is not None:
                        yield record
                start += page

    def summaries(
        self, owner: str, now: float, status: Status | None, tool: str | None, limit: int
    ) -> list[TaskSummary]:
        fields = ("id", "tool", "status", "error_kind", "created_at", "finished_at", "expires_at")
        found: list[TaskSummary] = []
        for record in self._owner_records(owner, fields):
            if _expired(record, now) or (status is not None and record["status"] != status.value):
                continue
            if tool is not None and record["tool"] != tool:
                continue
            found.append(summary_of(record))
            if len(found) >= limit:
                break
        return found

    def count_by_status(self, owner: str, now: float) -> dict[str, int]:
        counts: dict[str, int] = {}
        for record in self._owner_records(owner, ("status", "expires_at")):
            if not _expired(record, now):
                counts[record["status"]] = counts.get(record["status"], 0) + 1
        return counts

    def reusable(self, cache_key: str, now: float) -> str | None:
        with self._reachable():
            ids = [_text(i) for i in self.redis.zrevrange(self._key("cache", cache_key), 0, 20)]
            for record in self._records(ids, ("id", "status", "expires_at")) if ids else []:
                if record is not None and record["status"] == Status.COMPLETED.value and not _expired(record, now):
                    return str(record["id"])
            running = self.redis.get(self._key("inflight", cache_key))  # any front-end's, to join
            record = self._records([_text(running)], ("id", "status"))[0] if running is not None else None
        return str(record["id"]) if record is not None and record["status"] in UNFINISHED else None

    def tombstone(self, task_id: str) -> Expired | None:
        with self._reachable():
            raw = self.redis.hgetall(self._key("tomb", task_id))
        if not raw:
            return None
        return Expired(_text(raw[b"owner"]), float(raw[b"at"]))

    def _task(self, record: dict[str, Any], spec_of: SpecOf) -> Task:
        error = None
        if record.get("error_kind") is not None:
            error = TaskError(kind=error_kind(record["error_kind"]), message=record.get("error_message") or "")
        task_id = str(record["id"])
        return Task(
            id=task_id,
            tool=record["tool"],
            owner=record["owner"],
            created_at=record["created_at"],
            ttl_s=record["ttl_s"],
            output=self.new_output(task_id, self.output_max_bytes),
            spec=spec_of(record["tool"]),
            timeout_s=record.get("timeout_s"),
            time_left_s=record.get("timeout_s"),
            cache_key=record.get("cache_key"),
            status=Status(record["status"]),
            started_at=record.get("started_at"),
            finished_at=record.get("finished_at"),
            result=record.get("result"),
            error=error,
            process=_process(record.get("pid"), record.get("start_ticks"), record.get("boot_id")),
            watcher=_process(record.get("watcher_pid"), record.get("watcher_ticks"), record.get("boot_id")),
            detached=bool(record.get("detached")),
            queue=record.get("queue"),
            local=False,
        )


def call_timeout_s(lease_s: float) -> float:
    """How long one Redis call may take. The client is synchronous (each call holds the event loop), so a
    stalled Redis must fail a call well inside a lease: a heartbeat stuck longer would let this process be
    taken for dead. One retry, at once, on a fresh connection, covers a connection Redis closed while idle
    (redis-py's default retries with backoff, holding the loop for seconds while Redis refuses)."""
    return max(0.5, min(5.0, lease_s / 3))


@contextmanager
def reachable(where: str) -> Iterator[None]:
    """Redis not answering, as the error a caller can act on (naming redis_url, its password masked)."""
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise StoreUnreachableError(where, type(exc).__name__) from exc


class RedisLeases(RedisRecords):
    """Leases in Redis: each process's key expires unless renewed; a process whose key lapsed is dead, and
    one live process claims each of its unfinished tasks (one atomic script each)."""

    instance: str
    lease_s: float
    _claim: Script
    _steady_since: float | None
    """Since when Redis has answered this process's heartbeats without a failure (None: failing now)."""

    def _renew(self, now: float) -> None:
        try:
            with self._reachable():
                self.redis.set(self._key("instance", self.instance), "1", px=int(self.lease_s * 1000))
        except StoreUnreachableError:
            self._steady_since = None
            raise
        if self._steady_since is None:
            self._steady_since = now

    def trusts_leases(self, now: float) -> bool:
        """After an outage every lease may have lapsed, live processes' too: nobody is taken for dead until
        this process has had Redis for a whole lease again, by when every live one has renewed its own."""
        return self._steady_since is not None and now - self._steady_since >= self.lease_s

    def workers_alive(self, now: float) -> bool:
        """Whether any worker sent a heartbeat within the last lease (distributed mode's workers list)."""
        return any(
            json.loads(raw)["heartbeat_at"] >= now - self.lease_s for raw in self.redis.hvals(f"{self.ns}:workers")
        )

    def end_lease(self, instance: str) -> None:
        """The lease of a process known dead (a worker on this machine whose lock is free) ends now, not
        lease_s after its last heartbeat: its unfinished tasks become claimable at once."""
        with self._reachable():
            self.redis.delete(self._key("instance", instance))

    def instance_alive(self, instance: str) -> bool:
        return bool(self.redis.exists(self._key("instance", instance)))

    def claim_orphans(self, now: float, spec_of: SpecOf) -> list[Task]:
        """Takes over the unfinished tasks of processes whose lease lapsed, each with one atomic script,
        so of several live processes exactly one settles each task."""
        if not self.trusts_leases(now):
            return []
        ids = sorted(_text(i) for i in self.redis.smembers(f"{self.ns}:unfinished"))
        alive: dict[str, bool] = {}
        claimed: list[Task] = []
        for task_id, record in zip(ids, self._records(ids, ("instance", "status")) if ids else [], strict=True):
            if record is None:
                self.redis.srem(f"{self.ns}:unfinished", task_id)
                continue
            task = self._claim_if_dead(task_id, record, alive, spec_of)
            if task is not None:
                claimed.append(task)
        return claimed

    def claim_if_orphan(self, task_id: str, spec_of: SpecOf, now: float) -> Task | None:
        """The one task, claimed, if the process holding it is dead (a redelivered job's check)."""
        if not self.trusts_leases(now):
            return None  # the lease loop settles it once leases can be trusted again, if it is dead
        record = self._records([task_id], ("instance", "status"))[0]
        return None if record is None else self._claim_if_dead(task_id, record, {}, spec_of)

    def _claim_if_dead(
        self, task_id: str, record: dict[str, Any], alive: dict[str, bool], spec_of: SpecOf
    ) -> Task | None:
        holder = record["instance"]
        if holder in (self.instance, HANDED_TO_QUEUE) or record["status"] not in UNFINISHED:
            return None
        if holder not in alive:
            alive[holder] = self.instance_alive(holder)
        if alive[holder]:
            return None
        if not self._claim(keys=[self._key("task", task_id)], args=[json.dumps(holder), json.dumps(self.instance)]):
            return None
        task = self.load(task_id, spec_of)
        if task is not None:
            worker = self.redis.get(self._key("fence", task_id))  # a worker's name; a server's instance else
            task.holder = _text(worker) if worker is not None else "#".join(str(holder).split("#")[:2])
        return task


class RedisStore(RedisLeases):
    def __init__(
        self, client: redis.Redis, url: str, root: Path, *, namespace: str = "offload", lease_s: float = 10.0
    ) -> None:
        self.redis = client
        self.where = mask_url(url)
        self.root = root
        self.ns = namespace
        self.instance = f"{socket.gethostname()}#{os.getpid()}#{os.urandom(4).hex()}"
        self.lease_s = lease_s
        self.output_max_bytes = 64 * 1024 * 1024
        self._claim = client.register_script(_CLAIM)
        self._sweep_one = client.register_script(_SWEEP_ONE)
        self._fence = client.register_script(_FENCE)
        self._closed = False
        self._steady_since = None
        self._changes = ChangeWriter(client, namespace, self.where)
        self.unwritten_logs = set()
        self.process_table: ProcessTable | None = None
        """A worker's local table of the commands it runs (`server/process_table.py`): each process it
        records goes there too, first, and leaves when its task ends, for crash cleanup on this machine."""

    def __repr__(self) -> str:
        return f"<RedisStore {self.where} ns={self.ns} instance={self.instance}>"

    @classmethod
    def open(
        cls, url: str, root: Path, *, namespace: str = "offload", lease_s: float = 10.0, now: float | None = None
    ) -> RedisStore:
        """Connects (and checks Redis answers); `root` holds this machine's exit records only."""
        root = root.expanduser()
        for folder in (root, root / "output", root / "instances"):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        make_private(root)
        client = redis.Redis.from_url(
            url, socket_connect_timeout=2.0, socket_timeout=call_timeout_s(lease_s), retry=Retry(NoBackoff(), 1)
        )
        store = cls(client, url, root, namespace=namespace, lease_s=lease_s)
        at = time.time() if now is None else now
        store.heartbeat(at)
        store._steady_since = at - lease_s  # no outage seen yet: leases are trusted from the start
        return store

    def close(self) -> None:
        """Writes what is held (one more try), then gives up this process's lease: its unfinished tasks
        become claimable at once. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if held := self.flush():
            log.warning(
                "closing with %d task records and logs Redis at %s did not take: they are lost", held, self.where
            )
        try:
            self.redis.delete(self._key("instance", self.instance))
        except redis.exceptions.RedisError as exc:
            log.warning("could not give up the lease in Redis at %s: %s", self.where, exc)
        self.redis.close()

    def output_path(self, task_id: str) -> Path:
        return self.root / "output" / f"{task_id}.log"

    def exit_path(self, task_id: str) -> Path:
        return self.root / "output" / f"{task_id}.exit"

    def add(self, task: Task) -> None:
        """Raises `StoreUnreachableError` when Redis does not answer: nothing is started then."""
        record = {
            "id": task.id,
            "owner": task.owner,
            "tool": task.tool,
            "arguments": "{}" if task.arguments is None else task.arguments.model_dump_json(by_alias=True),
            "instance": self.instance,  # until a queue holds it (`hand_off`): this process's death settles it
            "created_at": task.created_at,
            "started_at": task.started_at,
            "ttl_s": task.ttl_s,
            "timeout_s": task.timeout_s,
            "cache_key": task.cache_key,
            "queue": task.queue,
            "cancel": False,
            **_process_fields(task),
            **_outcome(task, output_total=0),  # a new task has written nothing yet
        }
        with self._reachable():
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(self._key("task", task.id), mapping=_encode(record))
            pipe.zadd(self._key("owner", task.owner), {task.id: task.created_at})
            pipe.sadd(f"{self.ns}:unfinished", task.id)
            pipe.sadd(self._key("active", task.owner), task.id)
            if task.cache_key is not None:  # joined by an identical call on any front-end while it runs
                pipe.set(self._key("inflight", task.cache_key), task.id)
            pipe.execute()

    def hand_off(self, task: Task) -> None:
        """The task's job is in its queue: from now on no process's death settles it until a worker takes it.
        Only while this process still holds it: a worker that took it already keeps it (its death settles
        it); a failure is only logged (this process holds it on, so its death settles it)."""
        try:
            self._claim(
                keys=[self._key("task", task.id)], args=[json.dumps(self.instance), json.dumps(HANDED_TO_QUEUE)]
            )
        except redis.exceptions.RedisError as exc:
            log.warning("could not mark task %s queued in Redis at %s: %s", task.id, self.where, exc)

    def record_running(self, task: Task) -> bool:
        """False when another process settled the task first, or Redis did not take the change now: it must
        not start then."""
        written = self._changes.record(
            task.id, Change({"status": task.status.value, "started_at": task.started_at}, (STATUS_CHANGED,))
        )
        return written is True  # held (Redis away) is no start: it may be settled meanwhile

    def record_process(self, task: Task) -> None:
        if self.process_table is not None and task.process is not None:
            self.process_table.add(task.id, task.process)  # on this machine's disk before anywhere else
        self._update(task.id, DETAIL_CHANGED, **_process_fields(task))

    def record_watcher(self, task: Task) -> None:
        watcher = task.watcher
        assert watcher is not None
        self._update(
            task.id,
            DETAIL_CHANGED,
            watcher_pid=watcher.pid,
            watcher_ticks=watcher.start_ticks,
            boot_id=watcher.boot_id,
            detached=True,
        )

    def record_outcome(self, task: Task) -> bool:
        """False when another process settled the task first (this one was taken for dead: a Redis outage,
        a pause past its lease): the first outcome recorded stays, so a result never flips once read."""
        settled = None
        if task.status.finished and task.expires_at is not None:
            cache_key = task.cache_key if task.status is Status.COMPLETED else None
            settled = Settled(task.expires_at, task.finished_at or 0.0, cache_key, task.cache_key, task.owner)
        outcome = _outcome(task, output_total=_known_total(task.output))
        if self.process_table is not None and task.status.finished:
            self.process_table.remove(task.id)  # its command ended here, whoever settled it
        return self._changes.record(task.id, Change(outcome, (STATUS_CHANGED,), settled)) is not False

    def request_cancel(self, task_id: str) -> bool:
        """Flags the task cancelled for whoever runs it; True when nobody took it yet (the fence is now
        the canceller's: no worker will start it, and the caller settles it)."""
        with self._reachable():
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(self._key("task", task_id), "cancel", "true")
            pipe.set(self._key("fence", task_id), CANCEL_FENCE, nx=True)
            pipe.publish(self.cancel_channel, task_id)
            _, fenced, _ = pipe.execute()
        return bool(fenced)

    def take_fence(self, task_id: str, worker: str) -> tuple[str, str]:
        """The run fence, set once: ("ok", ""), ("taken", holder), ("finished", status) or ("gone", "")."""
        verdict, detail = self._fence(
            keys=[self._key("task", task_id), self._key("fence", task_id)], args=[worker, json.dumps(self.instance)]
        )
        return _text(verdict), _text(detail)

    def take_over_fence(self, task_id: str, worker: str) -> None:
        """A dead worker's task that is safe to run again: its fence is this worker's from now on."""
        self.redis.set(self._key("fence", task_id), worker)

    def restart_output(self, task_id: str, file_max_bytes: int) -> RedisLog:
        """A task run again from the start: what the first run wrote is dropped, offsets start at 0."""
        self.redis.delete(self._key("out", task_id), self._key("outmeta", task_id))
        return self.new_output(task_id, file_max_bytes, writing=True)

    def unfinished(self, owner: str) -> int | None:
        """The owner's unfinished tasks across every front-end (what `max_active_per_owner` counts)."""
        with self._reachable():
            return int(self.redis.scard(self._key("active", owner)))

    def run_flags(self, task_ids: list[str]) -> list[tuple[bool, str | None]]:
        """For each task: its cancel flag, and its status (None: no record)."""
        return [
            (record is not None and record["cancel"] is True, None if record is None else record["status"])
            for record in (self._records(task_ids, ("status", "cancel")) if task_ids else [])
        ]

    def cancel_requested(self, task_id: str) -> bool:
        return _decode(self.redis.hget(self._key("task", task_id), "cancel")) is True

    def _update(self, task_id: str, change: str, **values: Any) -> None:
        self._changes.record(task_id, Change(values, (change,)))

    def flush(self) -> int:
        """Writes what Redis could not take: held output first (so whoever sees a task's outcome finds all of
        its output), then each task's held changes in one transaction; stops at the first that fails (Redis
        is still away). Returns how many logs and task records still hold something."""
        if all(output.flush() for output in list(self.unwritten_logs)):
            self._changes.flush()
        return len(self.unwritten_logs) + self._changes.held

    def heartbeat(self, now: float) -> None:
        """Writes what is held (`flush`), then renews this process's lease."""
        self.flush()
        self._renew(now)

    def checkpoint(self) -> None:
        """Nothing to do: Redis persists as its operator configured it."""

    def ensure_present(self) -> None:
        """Nothing to check: records and output live in Redis, whose absence reads raise on their own."""

    def sweep(self, now: float, tombstones_max: int) -> list[str]:
        with self._reachable():
            ids = [_text(i) for i in self.redis.zrangebyscore(f"{self.ns}:expiring", "-inf", now)]
            swept = [task_id for task_id in ids if self._sweep(task_id)]
            if swept:
                tombs = f"{self.ns}:tombs"
                old = [_text(i) for i in self.redis.zrange(tombs, 0, -(tombstones_max + 1))]
                if old:
                    pipe = self.redis.pipeline(transaction=True)
                    pipe.zrem(tombs, *old)
                    pipe.delete(*(self._key("tomb", i) for i in old))
                    pipe.execute()
        return swept

    def _sweep(self, task_id: str) -> bool:
        keys = [
            self._key("task", task_id),
            f"{self.ns}:expiring",
            self._key("tomb", task_id),
            f"{self.ns}:tombs",
            self._key("out", task_id),
            self._key("outmeta", task_id),
            self._key("fence", task_id),
        ]
        args = [task_id, f"{self.ns}:owner:", f"{self.ns}:cache:"]
        return bool(self._sweep_one(keys=keys, args=args))

    def remove_files(self, task_ids: list[str]) -> None:
        """This machine's exit records of expired tasks (their output went with their record)."""
        for task_id in task_ids:
            for path in (self.output_path(task_id), self.exit_path(task_id)):
                path.unlink(missing_ok=True)


class ChangeWriter:
    """Writes task changes to Redis, each in one transaction; holds those Redis does not take, merged per
    task in order, until the task's next change or `flush` gets them through."""

    def __init__(self, client: redis.Redis, namespace: str, where: str) -> None:
        self._redis = client
        self._ns = namespace
        self._where = where
        self._channel = f"{namespace}:changes"
        self._settle = client.register_script(_RECORD_OUTCOME)
        self._change = client.register_script(_RECORD_CHANGE)
        self._unwritten: dict[str, Change] = {}
        self._holding = False
        """An outage is under way (warned about once): some change could not be written and is held."""

    def __repr__(self) -> str:
        return f"<ChangeWriter {self._where} ns={self._ns} held={self.held}>"

    @property
    def held(self) -> int:
        """How many tasks have changes Redis has not taken yet."""
        return len(self._unwritten)

    def record(self, task_id: str, change: Change) -> bool | None:
        """Never raises: a change Redis cannot take now is held, with what the task held before it, and
        written whole later (the task goes on, as with the SQLite store's `update`). True: written; False:
        refused (another process had settled the task); None: held."""
        held = self._unwritten.pop(task_id, None)
        return self._write(task_id, change if held is None else held.then(change))

    def _write(self, task_id: str, change: Change) -> bool | None:
        """True: written; False: an outcome refused (the task was settled already); None: held."""
        try:
            written = self._send(task_id, change)  # a retry after a lost reply repeats it: idempotent
        except redis.exceptions.RedisError as exc:
            self._unwritten[task_id] = change
            if not self._holding:
                self._holding = True
                log.warning(
                    "Redis at %s does not answer (%s); holding task changes to write when it does", self._where, exc
                )
            return None
        if self._holding and not self._unwritten:
            self._holding = False
            log.info("Redis at %s answers again: the task changes held meanwhile are written", self._where)
        return written

    def _send(self, task_id: str, change: Change) -> bool:
        fields = [part for pair in _encode(change.fields).items() for part in pair]
        if (settled := change.settled) is None:  # written only while the task is unfinished, as an outcome is
            published = [f"{task_id} {what}" for what in change.published]
            keys = [_key(self._ns, "task", task_id), self._channel]
            return bool(self._change(keys=keys, args=[len(published), *published, *fields]))
        keys = [
            _key(self._ns, "task", task_id),
            f"{self._ns}:unfinished",
            f"{self._ns}:expiring",
            _key(self._ns, "cache", settled.cache_key or ""),
            self._channel,
            _key(self._ns, "inflight", settled.result_key or ""),
            _key(self._ns, "active", settled.owner),
        ]
        cached: float | str = settled.finished_at if settled.cache_key is not None else ""
        return bool(self._settle(keys=keys, args=[task_id, settled.expires_at, cached, *fields]))

    def flush(self) -> None:
        """Writes the held changes, in the order they were held; stops at the first Redis does not take."""
        for task_id in list(self._unwritten):
            if not self._write(task_id, self._unwritten.pop(task_id)):
                return


def _key(namespace: str, kind: str, name: str) -> str:
    return f"{namespace}:{kind}:{name}"


@dataclass(frozen=True, slots=True)
class Settled:
    """Where a finished task moves, in the transaction of its outcome: out of `unfinished`, into `expiring`
    at `expires_at`, and (completed with a result key) into that key's zset at `finished_at`."""

    expires_at: float
    finished_at: float
    cache_key: str | None
    """The result key it is reused by (completed tasks only)."""
    result_key: str | None = None
    """The result key it held while running (what identical calls joined), freed now."""
    owner: str = ""
    """Whose unfinished tasks it no longer counts among (`max_active_per_owner`, across front-ends)."""


@dataclass(frozen=True, slots=True)
class Change:
    """One change of a task record: fields (each JSON-encoded when written), what the change channel is
    told, and, for a final outcome, where the task moves. Held changes merge in order (`then`)."""

    fields: dict[str, Any]
    published: tuple[str, ...]
    settled: Settled | None = None

    def then(self, later: Change) -> Change:
        """This change followed by a later one: the later values win, each message is sent once."""
        return Change(
            {**self.fields, **later.fields},
            tuple(dict.fromkeys((*self.published, *later.published))),
            later.settled or self.settled,
        )


def _process_fields(task: Task) -> dict[str, Any]:
    process = task.process
    return {
        "pid": None if process is None else process.pid,
        "start_ticks": None if process is None else process.start_ticks,
        "boot_id": None if process is None else process.boot_id,
        "detached": task.detached,
    }


def _outcome(task: Task, *, output_total: int | None) -> dict[str, Any]:
    """The outcome's fields; without `output_total` (None) the record keeps the total it has."""
    outcome = {
        "status": task.status.value,
        "finished_at": task.finished_at,
        "expires_at": task.expires_at,
        "result": task.result,
        "error_kind": None if task.error is None else str(task.error.kind),
        "error_message": None if task.error is None else task.error.message,
    }
    return outcome if output_total is None else {**outcome, "output_total": output_total}


def _known_total(output: Output) -> int | None:
    """How much output the task wrote, when that can be known now: a log this process writes knows; any
    other asks Redis, and while Redis is away the outcome goes without it (recording it never raises)."""
    try:
        return output.total_bytes
    except StoreUnreachableError:
        return None


def _encode(values: dict[str, Any]) -> dict[FieldT, FieldT]:
    return {name: json.dumps(value, separators=(",", ":")) for name, value in values.items()}


def _decode(raw: bytes | str | None) -> Any:
    return None if raw is None else json.loads(raw)


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _expired(record: dict[str, Any], now: float) -> bool:
    expires_at = record.get("expires_at")
    return expires_at is not None and expires_at <= now


def _process(pid: int | None, ticks: int | None, boot_id: str | None) -> ProcessInfo | None:
    return None if pid is None else ProcessInfo(pid, ticks, boot_id)


# ---- output ----


class RedisLog:
    """A task's output as a Redis stream: one entry per stored piece, its id `{offset}-1`, so a read by
    byte offset is one XREVRANGE (the entry holding the offset) and one XRANGE (the rest).

    Bounded like `OutputLog`: the first half of `file_max_bytes` is kept whole (the head), then only the
    most recent half (the ring: older ring entries are deleted as newer ones arrive). The one lost range is
    [head, ring_from), reported as `dropped`. The layout (total, ring_from, finished) is a hash written in
    the same transaction as the entries, so a reader never counts a byte not yet stored.

    Across an outage: pieces Redis does not take are held here and written, in offset order and in one
    transaction with the layout, by the store's next `flush` (every heartbeat) or at `finish`; meanwhile a
    write only holds (a write that waited on a Redis that is away would stall the event loop each time).
    What is held is bounded as the log is: the head, and the ring's worth of recent bytes (plus at most
    the one piece that straddles the ring's start); pieces the ring moved past while held are never written,
    they fall inside `dropped` as they would have been deleted anyway. A retry after an EXEC whose reply
    was lost finds its entries there ("ID ... equal or smaller"): they count as stored. `finished` is set
    only with the last held byte."""

    def __init__(
        self,
        client: redis.Redis,
        stream: str,
        meta: str,
        file_max_bytes: int,
        where: str = "",
        unwritten: set[RedisLog] | None = None,
        *,
        writing: bool = False,
    ) -> None:
        self._redis = client
        self._where = where
        self._stream = stream
        self._meta = meta
        self._head = file_max_bytes // 2
        self._ring = file_max_bytes - self._head
        self._total = 0
        self._ring_entries: deque[tuple[int, int]] = deque()
        """(offset, length) of the ring entries in Redis, or sent to it unacknowledged, oldest first."""
        self._sent: dict[int, bytes] = {}
        """Pieces sent in a transaction that failed, by offset: they keep their id, so a retry can tell."""
        self._fresh: list[tuple[int, bytearray]] = []
        """Bytes never sent (written while waiting): at most a head piece and a ring piece, merged."""
        self._deletes: list[int] = []
        """Ring entries the ring moved past whose XDEL has not been acknowledged."""
        self._unwritten: set[RedisLog] = set() if unwritten is None else unwritten
        self._writing = writing
        """This process writes the log (so knows its total without asking Redis, which may be away)."""
        self._finishing = False
        self._waiting = False
        """A transaction failed: writes only hold until `flush` or `finish` gets one through."""

    def __repr__(self) -> str:
        return f"<RedisLog {self._stream}>"

    # ---- writing (one process: the worker that runs the task) ----

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._writing = True
        start, end = self._total, self._total + len(data)
        self._total = end
        for offset, piece in self._pieces(start, data):
            self._hold(offset, piece)
        self._forget_before(end - self._ring)
        if not self._waiting:
            self._store()

    def _pieces(self, start: int, data: bytes) -> list[tuple[int, bytes]]:
        pieces: list[tuple[int, bytes]] = []
        if start < self._head:
            part = data[: self._head - start]
            pieces.append((start, part))
            start, data = start + len(part), data[len(part) :]
        if len(data) > self._ring:
            start, data = start + len(data) - self._ring, data[len(data) - self._ring :]
        if data:
            pieces.append((start, data))
        return pieces

    def _hold(self, offset: int, piece: bytes) -> None:
        """A piece to send: merged into the last one never sent when it continues it on the same side."""
        if self._fresh:
            at, buffer = self._fresh[-1]
            if at + len(buffer) == offset and (at < self._head) == (offset < self._head):
                buffer += piece
                return
        self._fresh.append((offset, bytearray(piece)))

    def _forget_before(self, floor: int) -> None:
        """The ring keeps what ends past `floor`: older entries are deleted, held bytes before it dropped."""
        while self._ring_entries and sum(self._ring_entries[0]) <= floor:
            old, _ = self._ring_entries.popleft()
            self._deletes.append(old)  # sent, maybe stored: deleted with the next transaction
            self._sent.pop(old, None)
        kept: list[tuple[int, bytearray]] = []
        for at, buffer in self._fresh:
            if self._head <= at < floor:  # never sent: trimmed to the ring's worth, no id to keep
                if at + len(buffer) <= floor:
                    continue
                del buffer[: floor - at]
                at = floor
            kept.append((at, buffer))
        self._fresh = kept

    def finish(self) -> None:
        """No byte follows: marked so in the transaction that stores the last held byte (now, or at the
        store's next `flush` if Redis is away)."""
        self._finishing = True
        self._store()

    def flush(self) -> bool:
        """Sends what is held (a `RedisStore.flush`); True once nothing is."""
        return self._store()

    def close(self) -> None:
        """Nothing held open: what Redis has not taken yet is the store's to flush."""

    def _store(self) -> bool:
        for at, buffer in self._fresh:
            self._sent[at] = bytes(buffer)
            if at >= self._head:
                self._ring_entries.append((at, len(buffer)))
        self._fresh.clear()
        sent, deletes = list(self._sent.items()), list(self._deletes)
        pipe = self._redis.pipeline(transaction=True)
        for at, piece in sent:
            pipe.xadd(self._stream, {"d": piece}, id=f"{at}-1")
        if deletes:
            pipe.xdel(self._stream, *(f"{at}-1" for at in deletes))
        layout: dict[FieldT, FieldT] = {}
        if self._writing:
            ring_from = self._ring_entries[0][0] if self._ring_entries else self._total
            layout = {"head": self._head, "total": self._total, "ring_from": ring_from}
        if self._finishing:  # a log settled by a process that wrote none of it only says no byte follows
            layout["finished"] = 1
        if layout:
            pipe.hset(self._meta, mapping=layout)
        try:
            replies = pipe.execute(raise_on_error=False)
        except redis.exceptions.RedisError as exc:
            self._wait(exc)
            return False
        for (at, _), reply in zip(sent, replies, strict=False):
            if isinstance(reply, Exception) and not _already_stored(reply):
                log.warning("Redis refused the output of %s at byte %d: %s", self._stream, at, reply)
        self._sent.clear()
        del self._deletes[: len(deletes)]
        self._unwritten.discard(self)
        if self._waiting:
            self._waiting = False
            log.info("output of %s: what was held while Redis was away is stored", self._stream)
        return True

    def _wait(self, exc: redis.exceptions.RedisError) -> None:
        self._unwritten.add(self)
        if not self._waiting:
            self._waiting = True
            log.warning(
                "output of %s is held from byte %d until Redis at %s answers: %s",
                self._stream,
                min(self._sent, default=self._total),
                self._where,
                exc,
            )

    # ---- reading (any process) ----

    @property
    def total_bytes(self) -> int:
        if self._writing:
            return self._total
        with reachable(self._where):
            return int(self._redis.hget(self._meta, "total") or 0)

    def read(self, offset: int, max_bytes: int) -> Chunk:
        for _ in range(READ_RETRIES):
            meta = self._layout()
            total, gap = meta["total"], _gap(meta)
            plan = plan_read(offset, max_bytes, total, gap)
            raw, ring_from = self._bytes(plan.lo, plan.hi)
            if meta["head"] <= plan.lo < ring_from and plan.lo < total:
                continue  # the ring moved past what we were reading: read again
            return chunk_of(plan, raw, total=total, finished=bool(meta["finished"]), gap=gap)
        return Chunk(b"", offset, offset, self.total_bytes, None)

    def tail(self, tail_bytes: int) -> int:
        meta = self._layout()
        start = max(meta["total"] - tail_bytes, 0)
        gap = _gap(meta)
        if gap is not None and gap[0] <= start < gap[1]:
            start = gap[1]
        probe, _ = self._bytes(start, min(start + 4, meta["total"]))
        return start + next((i for i, byte in enumerate(probe) if not is_continuation(byte)), len(probe))

    def _layout(self) -> dict[str, int]:
        with reachable(self._where):
            raw = self._redis.hgetall(self._meta)
        meta = {_text(k): int(v) for k, v in raw.items()}
        meta.setdefault("total", 0)
        meta.setdefault("head", self._head)
        meta.setdefault("ring_from", meta["total"])
        meta.setdefault("finished", 0)
        return meta

    def _bytes(self, start: int, end: int) -> tuple[bytes, int]:
        """Bytes [start, end) as stored now (one transaction), and where the ring starts now."""
        if end <= start:
            return b"", int(self._redis.hget(self._meta, "ring_from") or 0)
        pipe = self._redis.pipeline(transaction=True)
        pipe.xrevrange(self._stream, max=f"{start}-1", min="-", count=1)
        pipe.xrange(self._stream, min=f"({start}-1", max=f"{end - 1}-1")
        pipe.hget(self._meta, "ring_from")
        with reachable(self._where):
            first, rest, ring_from = pipe.execute()
        parts: list[bytes] = []
        for entry_id, fields in [*first, *rest]:
            at = int(_text(entry_id).split("-", 1)[0])
            piece: bytes = fields[b"d"]
            lo, hi = max(start, at), min(end, at + len(piece))
            if hi > lo:
                parts.append(piece[lo - at : hi - at])
        return b"".join(parts), int(ring_from or 0)


def _gap(meta: dict[str, int]) -> tuple[int, int] | None:
    return (meta["head"], meta["ring_from"]) if meta["ring_from"] > meta["head"] else None


def _already_stored(reply: Exception) -> bool:
    """An XADD of an entry an earlier EXEC stored (its reply was lost): the stream is past its id."""
    return isinstance(reply, redis.exceptions.ResponseError) and "equal or smaller" in str(reply)
