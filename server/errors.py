"""Every error Offload raises on purpose, in one tree.

    OffloadError
    ├── ConfigError             settings that cannot be used (raised at start, before any transport)
    └── RequestError            a tool call the model can correct; its text is shown to the model
        ├── UnknownToolError    `fire_tool` named a tool that is not in the catalog
        ├── InvalidArgumentsError  arguments do not fit the tool's input schema
        ├── UnknownTaskError    no task with that id belongs to the caller
        ├── ExpiredTaskError    the task existed but its result has expired
        ├── UnavailableToolError  the tool cannot run here (a credential is missing)
        ├── TooManyTasksError   the caller has the most queued + running tasks allowed
        ├── StoreFullError      the data directory cannot take a new task (disk full)
        ├── DataDirGoneError    the data directory was removed or replaced while the server ran
        ├── StoreUnreachableError  Redis (distributed mode's store, `redis_url`) does not answer
        ├── ForeignTaskError    cancelling a task another server process (same data dir) runs
        ├── RefusedError        the owner's policy forbids these arguments (shell allow/deny lists, roots)
        ├── TooLargeError       the arguments are over `max_argument_bytes` (or `send_input`'s cap)
        ├── NoInputError        `send_input` to a task whose input is not open here
        ├── BadPatternError     a `wait_for` or `filter` regex that does not compile
        └── TooManySubscriptionsError  one connection subscribed to too many resources

Failures *inside* a running task are not exceptions that reach a caller: a tool raises
`tools.context.TaskFailure` with an `ErrorKind`, and the runner records it on the task (adapters
translate their library's exceptions into it at their edge, `raise ... from exc`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from pydantic import ValidationError


class OffloadError(Exception):
    """Base of every error Offload raises deliberately."""


class ConfigError(OffloadError):
    """Raised while loading settings: names the key or flag and the value that is wrong."""


class RequestError(OffloadError):
    """Raised for a tool call that cannot be served as asked; the message says what to do next."""


class UnknownToolError(RequestError):
    """Raised by `fire_tool` for a tool name that is not registered."""

    def __init__(self, tool: str, known: Sequence[str]) -> None:
        self.tool = tool
        shown = ", ".join(sorted(known)[:20])
        super().__init__(
            f"Unknown tool {tool!r}. Fireable tools: {shown}. "
            "Call list_fireable_tools for their descriptions and argument schemas."
        )


class InvalidArgumentsError(RequestError):
    """Raised when arguments fail validation; nothing has been started."""

    def __init__(self, tool: str, problems: Sequence[str]) -> None:
        self.tool = tool
        self.problems = list(problems)
        listed = "; ".join(self.problems)
        super().__init__(
            f"Invalid arguments for {tool!r}: {listed}. Nothing was started. "
            f"Call list_fireable_tools to see the input schema of {tool!r}."
        )


class UnknownTaskError(RequestError):
    """Raised for a task id that does not exist for this caller (another owner's task included)."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        super().__init__(f"Unknown task id {task_id!r}. Call list_tasks to see your tasks and their ids.")


class ExpiredTaskError(RequestError):
    """Raised for a task whose result is no longer kept; says when it went."""

    def __init__(self, task_id: str, expired_at: str) -> None:
        self.task_id = task_id
        self.expired_at = expired_at
        super().__init__(
            f"Task {task_id!r} expired at {expired_at}; its result and output are gone. "
            "Fire the tool again to get a fresh result (list_tasks shows the tasks still kept)."
        )


class TooManyTasksError(RequestError):
    """Raised by `fire_tool` when the caller already has the most queued plus running tasks allowed."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(
            f"You already have {limit} tasks queued or running, the most this server allows (max_active_per_owner). "
            "Collect finished ones with poll_output or cancel some with cancel_task, then fire again."
        )


class ForeignTaskError(RequestError):
    """Raised for cancelling a task that another Offload process on the same data directory runs."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        super().__init__(
            f"Task {task_id!r} is run by another Offload server process sharing this data directory; "
            "cancel it through the client connected to that server."
        )


class StoreFullError(RequestError):
    """Raised by `fire_tool` when the task cannot be recorded (the disk is full); nothing is started."""

    def __init__(self, root: str, reason: str) -> None:
        super().__init__(
            f"The task could not be recorded in the data directory {root!r} ({reason}); nothing was started. "
            "Free some disk space there (list_tasks shows what is kept; results expire after ttl_s), then fire again."
        )


class DataDirGoneError(RequestError):
    """Raised by fires and reads once the data directory (or its database) was removed or replaced under a
    running server: what it holds is gone, and a write would land in a file nobody can open again."""

    def __init__(self, root: str) -> None:
        self.root = root
        super().__init__(
            f"The data directory {root!r} was removed or replaced while this server ran: its tasks, results "
            "and output are gone from it, and this call did nothing (a fire started nothing). Restart the "
            "Offload server (quit and reopen the MCP client); it makes the data directory afresh."
        )


class StoreUnreachableError(RequestError):
    """Raised by `fire_tool` (and reads) in distributed mode when Redis does not answer; nothing is started.
    `where` is the redis_url with its password masked."""

    def __init__(self, where: str, reason: str) -> None:
        self.where, self.reason = where, reason
        super().__init__(
            f"The task store (Redis at redis_url={where}) is unreachable ({reason}): this call did nothing "
            "(a fire started nothing). Ask the operator to start Redis or fix redis_url (OFFLOAD_REDIS_URL), "
            "then call again; tasks already acknowledged run on and are kept in Redis."
        )


class UnavailableToolError(RequestError):
    """Raised by `fire_tool` for a listed tool that cannot run here, before anything starts."""

    def __init__(self, tool: str, reason: str) -> None:
        self.tool = tool
        super().__init__(f"{tool!r} cannot run on this server: {reason}. Nothing was started.")


class RefusedError(RequestError):
    """Raised by `fire_tool` when the operator's policy forbids the arguments, before anything starts."""

    def __init__(self, tool: str, reason: str) -> None:
        self.tool = tool
        super().__init__(f"{tool!r} refused: {reason}. Nothing was started.")


class TooLargeError(RequestError):
    """An argument is larger than this server accepts."""

    def __init__(self, what: str, size_bytes: int, limit_bytes: int, hint: str | None = None) -> None:
        hint = hint or "send less (pass big inputs as a file path, or raise max_argument_bytes in the server's config)"
        super().__init__(f"{what} is {size_bytes} bytes, above this server's limit of {limit_bytes} bytes; {hint}")


class NoInputError(RequestError):
    """Raised by `send_input` when the task's command takes no input here: finished, not fired with
    stdin "pipe" or pty, its input closed, or held by another server process (or one that stopped)."""

    def __init__(self, task_id: str, why: str) -> None:
        self.task_id = task_id
        super().__init__(f"task {task_id!r} takes no input: {why}")


class BadPatternError(RequestError):
    """Raised for a regular expression argument that does not compile; names it and the re error."""

    def __init__(self, argument: str, pattern: str, reason: str) -> None:
        super().__init__(
            f"{argument}={pattern[:200]!r} is not a valid regular expression ({reason}); "
            "fix it (Python re syntax), or escape it with re.escape rules for a literal text"
        )


class TooManySubscriptionsError(RequestError):
    def __init__(self, limit: int) -> None:
        super().__init__(
            f"this connection is subscribed to {limit} resources, the most it may be; "
            "unsubscribe from finished tasks (resources/unsubscribe) first"
        )


def plain_problems(exc: ValidationError) -> list[str]:
    """Validation errors as short sentences (where, what, the value given), without pydantic's URLs."""
    problems = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "arguments"
        shown = json.dumps(error.get("input"), default=repr)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message} (got {shown})")
    return problems


def invalid_call(tool: str, exc: ValidationError) -> str:
    """The message for a call of one of Offload's own MCP tools whose parameters do not fit."""
    return (
        f"Invalid arguments for {tool}: {'; '.join(plain_problems(exc))}. Nothing was done. "
        f"The tool's input schema (tools/list) gives each parameter's allowed range."
    )
