"""What Docket (pydocket 0.27) reads from Redis, made data only: no job or strike runs code by being read.

Docket pickles a job's arguments and a strike's value into its Redis streams and unpickles them with
cloudpickle as it reads them, before any of our code sees the job: a pickle written to the stream by anyone
who can reach Redis would run on every worker, and a message that does not decode raises out of Docket's
worker loop, killing the worker, and again at every restart (the message stays pending). Docket has no
serializer setting, so this module, installed once per process (`install`), reaches under its public
surface in three places, all fenced here (tests/test_docket_guard.py fails loudly when Docket changes):

- `docket.execution` and `docket.strikelist` unpickle through `DATA_ONLY`, whose `loads` refuses every
  global (the way the pickle documentation restricts an unpickler): a pickle can then build only plain data
  (str, tuples, dicts, numbers), never call anything;
- `Execution.from_message` accepts only Offload's one job: function `offload_run`, arguments exactly one
  task id, keyword arguments none, key the same task id; the arguments are pickled again from that id, so
  Docket only ever unpickles what we wrote. Anything else is dead-lettered: logged (its stream id and what
  was wrong, never its content), counted, and handed to Docket as a job of `offload_dead_letter`, which
  does nothing, so Docket acknowledges it the ordinary way and no worker meets it again;
- `StrikeInstruction.from_message`: a strike that does not decode becomes a strike of a function that does
  not exist (harmless), instead of stopping the strike reader at the same message forever (a worker waits
  for that reader before it takes any job).
"""

from __future__ import annotations

import io
import logging
import pickle
import re
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import cloudpickle  # type: ignore[import-untyped]
import docket.execution
import docket.strikelist
import redis.exceptions
from docket import Docket
from docket.execution import Execution
from docket.strikelist import Operator, Strike, StrikeInstruction

log = logging.getLogger(__name__)

JOB_FUNCTION = "offload_run"
DEAD_LETTER_FUNCTION = "offload_dead_letter"
REFUSED_STRIKE_FUNCTION = "offload_no_such_function"
"""What a strike that does not decode strikes instead: a name no job has."""
TASK_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""A task id as `Executor` makes them (`secrets.token_urlsafe(16)`), with room to spare."""
MAX_REASON_CHARS = 200

dead_letters = 0
"""Jobs this process refused since it started (shown in offload://workers)."""


class DocketChangedError(RuntimeError):
    def __init__(self, what: str) -> None:
        super().__init__(f"pydocket no longer has {what}; update server/docket_guard.py for this Docket version")


class BadJobError(ValueError):
    """A message in a Docket stream that is not a job Offload enqueued."""


class _DataOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refused: the pickle names {module[:60]}.{name[:60]}; only plain data is read")


def data_only_loads(data: bytes) -> Any:
    """`pickle.loads` that builds plain data and never calls anything (every global refused)."""
    return _DataOnlyUnpickler(io.BytesIO(data)).load()


DATA_ONLY = SimpleNamespace(loads=data_only_loads, dumps=cloudpickle.dumps)
"""Stands in for the `cloudpickle` module inside Docket's modules that read Redis."""


async def offload_dead_letter() -> None:
    """The job a refused message becomes: it does nothing, and Docket acknowledges it when it returns."""


def job_task_id(message: dict[bytes, bytes]) -> str:
    """The task id of Offload's one job; BadJobError if the message is anything else."""
    try:
        function = message[b"function"].decode()
        args = data_only_loads(message[b"args"])
        kwargs = data_only_loads(message[b"kwargs"])
        key = message[b"key"].decode()
    except (KeyError, UnicodeDecodeError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise BadJobError(f"it does not decode ({type(exc).__name__}: {exc})") from exc
    if function != JOB_FUNCTION:
        raise BadJobError(f"its function is not {JOB_FUNCTION}")
    if not (isinstance(args, tuple) and len(args) == 1 and isinstance(args[0], str) and TASK_ID.fullmatch(args[0])):
        raise BadJobError("its arguments are not one task id")
    if kwargs != {} or key != args[0]:
        raise BadJobError("its keyword arguments or key are not the ones Offload writes")
    return args[0]


_original_from_message = Execution.from_message
_original_strike = StrikeInstruction.from_message


async def _guarded_from_message(
    cls: type[Execution],
    docket: Docket,
    message: dict[bytes, bytes],
    redelivered: bool = False,
    fallback_task: Any = None,
    message_id: Any = None,
    sync: bool = True,
) -> Execution:
    try:
        task_id = job_task_id(message)
        clean = {**message, b"args": cloudpickle.dumps((task_id,)), b"kwargs": cloudpickle.dumps({})}
        return await _original_from_message(docket, clean, redelivered, fallback_task, message_id, sync)
    except redis.exceptions.RedisError:
        raise  # Redis trouble: Docket's own retry handles it
    except Exception as exc:
        return _dead_letter(cls, docket, message_id, redelivered, exc)


def _dead_letter(cls: type[Execution], docket: Docket, message_id: Any, redelivered: bool, exc: Exception) -> Execution:
    global dead_letters
    dead_letters += 1
    stream_id = message_id.decode() if isinstance(message_id, bytes) else str(message_id)
    reason = str(exc)[:MAX_REASON_CHARS]
    log.warning("refused message %s in Docket stream %s, dropped: %s; nothing ran", stream_id, docket.name, reason)
    return cls(
        docket=docket,
        function=offload_dead_letter,
        args=(),
        kwargs={},
        key=f"{DEAD_LETTER_FUNCTION}:{stream_id}",
        when=datetime.now(UTC),
        attempt=1,
        redelivered=redelivered,
        function_name=DEAD_LETTER_FUNCTION,
        message_id=message_id,
    )


def _guarded_strike(cls: type[StrikeInstruction], message: dict[bytes, bytes]) -> StrikeInstruction:
    try:
        return _original_strike(message)
    except Exception as exc:
        log.warning("ignored a strike in Redis that does not decode (%s)", type(exc).__name__)
        return Strike(REFUSED_STRIKE_FUNCTION, None, Operator.EQUAL, None)


def install() -> None:
    """Idempotent; every process that opens a Docket calls it first (`server.distributed` on import)."""
    for module in (docket.execution, docket.strikelist):
        if not hasattr(module, "cloudpickle"):
            raise DocketChangedError(f"{module.__name__}.cloudpickle")
        module.cloudpickle = DATA_ONLY  # type: ignore[attr-defined]
    Execution.from_message = classmethod(_guarded_from_message)  # type: ignore[method-assign,assignment]
    StrikeInstruction.from_message = classmethod(_guarded_strike)  # type: ignore[method-assign,assignment]
