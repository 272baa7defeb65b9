"""The catalog of fireable tools: one `ToolSpec` per tool, plus entry-point plugins.

A tool is a pydantic input model and an async handler; flags tell the executor how to
treat it. Adding a tool is one small module that builds a `ToolSpec`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol

from pydantic import BaseModel

from tools.context import JSON, Orphan, ToolContext

ENTRY_POINT_GROUP = "offload.tools"

log = logging.getLogger(__name__)

Handler = Callable[[Any, ToolContext], Awaitable[JSON]]
Recover = Callable[[Orphan, ToolContext], Awaitable[JSON]]
"""Settles a task whose server died while it ran: follows what still runs, reports what finished
(raising `TaskFailure` like a handler), and ends what is left. Runs as the task's handler."""


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A fireable tool: what it takes, what runs, and how the executor must treat it."""

    name: str
    description: str
    input_model: type[BaseModel]
    handler: Handler
    cacheable: bool = False
    """Read-only and deterministic enough that an identical call may reuse a finished result."""
    cache_if: Callable[[Any], bool] | None = None
    """For a tool cacheable only for some arguments (HTTP GET, not POST)."""
    destructive: bool = False
    open_world: bool = False
    default_timeout_s: float | None = None
    max_concurrency: int | None = None
    """Per-tool limit on top of the global one; `None` means only the global limit applies."""
    limit_group: str | None = None
    """Tools of one group share one limit (every github.* tool counts against GitHub's)."""
    unavailable: str | None = None
    """Why firing this tool cannot work here (a missing credential); fire_tool refuses it with this."""
    note: str | None = None
    """Shown in the catalog, e.g. a missing credential."""
    recover: Recover | None = None
    """None: such a task is settled `interrupted` (after its process group, if any, is killed)."""
    queue: str | None = None
    """Distributed mode: the worker queue its tasks go to unless `fire_tool` names one (presets may pin one)."""
    check: Callable[[Any, str], None] | None = None
    """Refuses arguments the operator's policy forbids for this owner (raises ValueError saying why) before
    anything starts: (arguments, owner)."""
    input_schema: JSON = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_schema", self.input_model.model_json_schema())

    def is_cacheable(self, arguments: Any) -> bool:
        return self.cacheable and (self.cache_if is None or self.cache_if(arguments))

    def flags(self) -> list[str]:
        named = {
            "cacheable": self.cacheable,
            "destructive": self.destructive,
            "open_world": self.open_world,
        }
        return [flag for flag, on in named.items() if on]


class ToolSource(Protocol):
    """Tools that come and go while the server runs (another MCP server's, `tools/upstream.py`)."""

    def get(self, name: str) -> ToolSpec | None: ...

    def specs(self) -> Iterable[ToolSpec]: ...


class Registry:
    """Name → ToolSpec; the single source `fire_tool` and `list_fireable_tools` read."""

    def __init__(self, specs: Iterable[ToolSpec] = ()) -> None:
        self._specs: dict[str, ToolSpec] = {}
        self._sources: list[ToolSource] = []
        for spec in specs:
            self.add(spec)

    def add_source(self, source: ToolSource) -> None:
        """Asked after the fixed tools, on every lookup: its tools may change while the server runs."""
        self._sources.append(source)

    def add(self, spec: ToolSpec) -> None:
        if spec.name in self._specs:
            raise ValueError(f"a fireable tool named {spec.name!r} is already registered")
        self._specs[spec.name] = spec

    def get(self, name: str) -> ToolSpec | None:
        found = self._specs.get(name)
        for source in self._sources:
            found = found or source.get(name)
        return found

    def names(self) -> list[str]:
        return [spec.name for spec in self]

    def __iter__(self) -> Iterator[ToolSpec]:
        yield from self._specs.values()
        for source in self._sources:
            yield from (spec for spec in source.specs() if spec.name not in self._specs)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Adds third-party tools; a broken plugin is logged and skipped, never fatal."""
        for point in entry_points(group=group):
            try:
                loaded = point.load()
                specs = loaded() if callable(loaded) and not isinstance(loaded, ToolSpec) else loaded
                for spec in [specs] if isinstance(specs, ToolSpec) else specs:
                    self.add(spec)
            except Exception:
                log.exception("skipping fireable-tool plugin %r from entry point group %s", point.name, group)
