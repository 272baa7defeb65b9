"""`server/docket_guard.py` against the installed Docket: the reaches under its surface still land (this
fails loudly when a Docket release moves them), its own job passes, and nothing else decodes into code."""

from __future__ import annotations

import os
import pickle
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docket.execution
import docket.strikelist
import pytest
from docket import Docket
from docket.execution import Execution

from server import distributed, docket_guard
from server.docket_guard import DATA_ONLY, BadJobError, data_only_loads, job_task_id


class _RunsOnLoad:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _message_of_our_job(task_id: str) -> dict[bytes, bytes]:
    """The message Docket itself writes for `docket.add(offload_run, key=id)(id)`."""
    queue = Docket(name="t:queue:any", url="redis://u:p@127.0.0.1:1/0")
    execution = Execution(queue, distributed.offload_run, (task_id,), {}, task_id, datetime.now(UTC), 1)
    return execution.as_message()


def test_the_guard_is_installed_where_docket_reads_redis() -> None:
    assert docket.execution.cloudpickle is DATA_ONLY  # type: ignore[attr-defined]
    assert docket.strikelist.cloudpickle is DATA_ONLY  # type: ignore[attr-defined]
    assert Execution.from_message.__func__ is docket_guard._guarded_from_message  # type: ignore[attr-defined]


def test_offload_s_own_job_passes_and_keeps_its_task_id() -> None:
    assert job_task_id(_message_of_our_job("Xy3-task_id-0123456789")) == "Xy3-task_id-0123456789"


def test_a_pickle_that_would_run_code_is_refused_unloaded(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with pytest.raises(pickle.UnpicklingError, match=r"posix\.system"):
        data_only_loads(pickle.dumps(_RunsOnLoad(marker)))
    message = {**_message_of_our_job("abc"), b"args": pickle.dumps((_RunsOnLoad(marker),))}
    with pytest.raises(BadJobError, match="does not decode"):
        job_task_id(message)
    assert not marker.exists()


@pytest.mark.parametrize(
    "change",
    [
        {b"function": b"trace"},
        {b"args": pickle.dumps(("a", "b"))},
        {b"args": pickle.dumps(("not an id!",))},
        {b"kwargs": pickle.dumps({"x": 1})},
        {b"key": b"another-key"},
        {b"args": b"\x80\x05not a pickle"},
    ],
)
def test_any_other_job_is_refused(change: dict[bytes, bytes]) -> None:
    with pytest.raises(BadJobError):
        job_task_id({**_message_of_our_job("abc"), **change})
