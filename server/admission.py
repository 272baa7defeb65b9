"""Admission: everything `fire_tool` checks before a task exists, so a refused call leaves no trace.

A request is admitted once its tool is known and available, its arguments fit the size limit and the
tool's schema, the owner's policy allows them, and its timeout is within the server's maximum. The
result is what the executor needs to start it: parsed arguments, the result key, the deadline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from server.cache import result_key
from server.config import DEFAULT_QUEUE, Settings
from server.errors import (
    InvalidArgumentsError,
    RefusedError,
    TooLargeError,
    TooManyTasksError,
    UnavailableToolError,
    UnknownToolError,
    plain_problems,
)
from tools.registry import Registry, ToolSpec


@dataclass(frozen=True, slots=True)
class Admitted:
    owner: str
    spec: ToolSpec
    arguments: BaseModel
    cache_key: str | None
    """Set when the tool is cacheable for these arguments: identical calls share it."""
    timeout_s: float
    ttl_s: float
    queue: str | None = None
    """Distributed mode: the worker queue it goes to (`target`, else its preset's); None: the default."""


class Admission:
    def __init__(self, registry: Registry, settings: Settings) -> None:
        self.registry = registry
        self.settings = settings

    def admit(
        self,
        owner: str,
        tool: str,
        arguments: dict[str, Any],
        *,
        timeout_s: float | None,
        ttl_s: float | None,
        target: str | None = None,
    ) -> Admitted:
        """Raises a `RequestError` saying what was wrong and what to call instead. The result key names the
        queue too: a call routed to a queue no worker serves is never joined by one routed elsewhere."""
        spec = self._spec(tool)
        size_bytes = len(json.dumps(arguments, separators=(",", ":"), default=str))
        if size_bytes > self.settings.max_argument_bytes:
            raise TooLargeError(f"the arguments of {tool!r}", size_bytes, self.settings.max_argument_bytes)
        try:
            parsed = spec.input_model.model_validate(arguments)
        except ValidationError as exc:
            raise InvalidArgumentsError(tool, plain_problems(exc)) from exc
        if spec.check is not None:
            try:
                spec.check(parsed, owner)  # the owner's policy
            except ValueError as exc:
                raise RefusedError(tool, str(exc)) from exc
        queue = None if (target or spec.queue) == DEFAULT_QUEUE else target or spec.queue
        key = result_key(owner, tool, parsed) if spec.is_cacheable(parsed) else None
        key = f"{key}@{queue}" if key is not None and queue is not None else key
        ttl = self.settings.ttl_s if ttl_s is None else ttl_s
        return Admitted(owner, spec, parsed, key, self._timeout(spec, timeout_s), ttl, queue)

    def check_room(self, owner: str, active: int) -> None:
        """The owner's cap on unfinished tasks: refused above it, never queued without end."""
        most = self.settings.max_active_for(owner)
        if active >= most:
            raise TooManyTasksError(most)

    def _spec(self, tool: str) -> ToolSpec:
        spec = self.registry.get(tool)
        if spec is None:
            raise UnknownToolError(tool, self.registry.names())
        if spec.unavailable is not None:
            raise UnavailableToolError(tool, spec.unavailable)
        return spec

    def _timeout(self, spec: ToolSpec, asked_s: float | None) -> float:
        limit = self.settings.max_timeout_s
        if asked_s is not None and asked_s > limit:
            raise InvalidArgumentsError(spec.name, [f"timeout_s={asked_s} is above this server's maximum of {limit} s"])
        return asked_s or spec.default_timeout_s or self.settings.default_timeout_s
