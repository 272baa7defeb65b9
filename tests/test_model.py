"""Model-based test: fire / cancel / read by offset / restart against a small reference model.

The engine runs for real (a Runtime, real shell commands, a real data directory) on an event loop
in a portal thread; hypothesis picks the steps. What must hold after every step:
- every read returns exactly the command's bytes at the offsets it names, never more than exist;
- statuses only move forward (queued → running → finished) and a finished task never changes;
- a second server on the same data directory returns the same view of every finished task;
and at the end, every task that finished holds exactly the bytes its command wrote.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.from_thread
from conftest import FakeClock
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from server.config import Settings
from server.runtime import Runtime
from server.tasks import Status, TaskView

ORDER = {Status.QUEUED: 0, Status.RUNNING: 1, Status.COMPLETED: 2, Status.FAILED: 2, Status.CANCELLED: 2}
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)


@dataclass
class Expected:
    task_id: str
    data: bytes
    kind: str  # quick | exit | slow
    may_cancel: bool = False
    """A cancel or a restart came while it had not finished: `cancelled` is a true outcome then."""
    status: Status = Status.QUEUED
    final: TaskView | None = None


def _command(kind: str, code: int) -> str:
    return {
        "quick": 'printf "%s" "$T"',
        "exit": f'printf "%s" "$T"; exit {code}',
        "slow": 'printf "%s" "$T"; sleep 300',
    }[kind]


class Engine(RuleBasedStateMachine):
    tasks = Bundle("tasks")

    def __init__(self) -> None:
        super().__init__()
        self.stack = ExitStack()
        self.folder = Path(tempfile.mkdtemp(prefix="offload-model-"))
        self.settings = self._settings()
        self.clock = FakeClock()
        self.portal = self.stack.enter_context(anyio.from_thread.start_blocking_portal())
        self._start_others()
        self.primary = self._open()
        self.peer = self.stack.enter_context(self._manager())
        self.model: dict[str, Expected] = {}

    def _settings(self) -> Settings:
        return Settings(kill_grace_s=0.2, data_dir=self.folder / "data")

    def _start_others(self) -> None:
        """What runs beside the servers (a variant's worker), stopped after them and before the portal."""

    def _manager(self) -> AbstractContextManager[Runtime]:
        return self.portal.wrap_async_context_manager(Runtime.open(self.settings, clock=self.clock, load_plugins=False))

    def _open(self) -> tuple[AbstractContextManager[Runtime], Runtime]:
        manager = self._manager()
        return manager, manager.__enter__()

    @property
    def runtime(self) -> Runtime:
        return self.primary[1]

    # ---- steps ----

    @rule(target=tasks, kind=st.sampled_from(["quick", "exit", "slow"]), text=TEXT, code=st.integers(1, 125))
    def fire(self, kind: str, text: str, code: int) -> str:
        arguments = {"command": _command(kind, code), "env": {"T": text}}
        reply = self.portal.call(
            lambda: self.runtime.fire(
                "shell", arguments, timeout_s=None, ttl_s=None, use_cache=True, wait_s=0, owner="me"
            )
        )
        self.model[reply.task_id] = Expected(reply.task_id, text.encode(), kind)
        return reply.task_id

    @rule(task_id=tasks)
    def cancel(self, task_id: str) -> None:
        self.model[task_id].may_cancel = self.model[task_id].final is None
        view = self.portal.call(lambda: self.runtime.cancel(task_id, owner="me"))
        self._observe(view)
        expected = self.model[task_id]
        if expected.kind == "slow":
            assert view.status is Status.CANCELLED or expected.final is not None

    @rule(task_id=tasks, offset=st.integers(0, 200), max_bytes=st.integers(1, 64))
    def read(self, task_id: str, offset: int, max_bytes: int) -> None:
        view = self._view(self.runtime, task_id, offset, max_bytes)
        self._observe(view)
        expected = self.model[task_id]
        output = view.output
        assert output is not None
        assert output.total_bytes <= len(expected.data)
        got = output.text.encode()
        assert got == expected.data[output.offset : output.next_offset], (got, output)
        if view.status.finished and view.status is not Status.CANCELLED:
            assert output.total_bytes == len(expected.data)

    def _view(self, runtime: Runtime, task_id: str, offset: int = 0, max_bytes: int = 4096) -> TaskView:
        return self.portal.call(
            lambda: runtime.get_output(task_id, offset=offset, max_bytes=max_bytes, tail_bytes=None, owner="me")
        )

    @rule(task_id=consumes(tasks))
    def wait(self, task_id: str) -> None:
        expected = self.model[task_id]
        if expected.kind == "slow" and expected.final is None:
            return
        reply = self.portal.call(
            lambda: self.runtime.poll([task_id], timeout_s=20, return_when="all", max_bytes=4096, owner="me")
        )
        assert reply.pending == [] and reply.unknown == []
        self._observe(reply.done[0])

    @rule()
    def restart(self) -> None:
        """A clean restart: running work is cancelled (shutdown); everything finished reads the same."""
        for expected in self.model.values():
            expected.may_cancel = expected.may_cancel or expected.final is None
        self.primary[0].__exit__(None, None, None)
        self.primary = self._open()
        for expected in self.model.values():
            view = self._view(self.runtime, expected.task_id)
            self._observe(view)
            assert view.status.finished, "after a restart nothing this server ran is still running"

    # ---- what must hold ----

    def _observe(self, view: TaskView) -> None:
        expected = self.model[view.task_id]
        assert ORDER[view.status] >= ORDER[expected.status], (expected.status, view.status)
        expected.status = view.status
        if expected.final is not None:
            assert _same(view, expected.final, output=False), "a finished task never changes"
        elif view.status.finished:
            expected.final = view
            self._check_outcome(expected, view)

    def _check_outcome(self, expected: Expected, view: TaskView) -> None:
        if view.status is Status.CANCELLED:
            assert expected.may_cancel, view
            assert view.output is not None
            assert expected.data.startswith(view.output.text.encode())  # what it wrote before the end, exactly
            return
        assert expected.kind != "slow", view
        assert (view.status is Status.COMPLETED) == (expected.kind == "quick"), view
        assert view.result is not None and view.result["output_bytes"] == len(expected.data)

    @invariant()
    def the_peer_sees_the_same(self) -> None:
        for expected in self.model.values():
            if expected.final is None:
                continue
            mine = self._view(self.runtime, expected.task_id)
            theirs = self._view(self.peer, expected.task_id)
            assert _same(mine, theirs)
            assert theirs.output is not None and mine.output is not None
            assert theirs.output.text == mine.output.text

    def teardown(self) -> None:
        try:
            for expected in self.model.values():
                if expected.kind != "slow" and expected.final is None:
                    self.wait(expected.task_id)
                    assert expected.final is not None
        finally:
            self.primary[0].__exit__(None, None, None)
            self.stack.close()
            shutil.rmtree(self.folder, ignore_errors=True)


def _same(a: TaskView, b: TaskView, *, output: bool = True) -> bool:
    fields: set[str] = {"status", "result", "error", "finished_at", *(["output"] if output else [])}
    return a.model_dump(include=fields) == b.model_dump(include=fields)


Engine.TestCase.settings = settings(
    max_examples=12,
    stateful_step_count=10,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_engine_against_the_model = Engine.TestCase
