"""Presets: commands the operator named in the config file, each fired as a tool of its own name.

What a caller may append to a preset: the operator wrote the command, the caller only fills in arguments.

An argument is quoted, so it cannot start a second command; but the program reads it, and many programs
run whatever an option tells them to (`make --eval=…`, `git -c core.pager=…`, `npm --script-shell=…`).
So a preset takes no arguments unless its table says `args = "any"` or a regex each one must match, and
an argument that looks like an option (starts with `-`) is refused unless `allow_options = true`.
"""

from __future__ import annotations

import functools
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tools import shell
from tools.context import JSON, ToolContext
from tools.policy import PolicyError, ShellPolicy
from tools.registry import ToolSpec

ARGS_NONE = "none"
ARGS_ANY = "any"


def validate_rule(rule: str) -> str:
    """`none`, `any` or a valid regex; ValueError naming the rule otherwise (at start, not at the first call)."""
    if rule in (ARGS_NONE, ARGS_ANY):
        return rule
    try:
        re.compile(rule)
    except re.error as exc:
        raise ValueError(f'args = {rule!r} is neither "none", "any" nor a valid regex: {exc}') from exc
    return rule


class PresetLike(Protocol):
    @property
    def command(self) -> str: ...
    @property
    def args(self) -> str: ...
    @property
    def allow_options(self) -> bool: ...


def preset_command(name: str, preset: PresetLike, args: Sequence[str], policy: ShellPolicy) -> str:
    """The preset's command line with `args` appended (each quoted), or PolicyError saying which argument and why."""
    policy.require_shell()
    command, rule, allow_options = preset.command, preset.args, preset.allow_options
    if not args:
        return command
    if rule == ARGS_NONE:
        raise PolicyError(
            f"preset {name!r} takes no arguments, and got {list(args)!r}; fire it with no `args`, "
            'or ask the operator to set args = "any" or a regex in [presets.' + name + "]"
        )
    for arg in args:
        if arg.startswith("-") and not allow_options:
            raise PolicyError(
                f"preset {name!r} refuses the option-like argument {arg!r}: options can make a program run other "
                f"commands; pass plain values, or ask the operator to set allow_options = true in [presets.{name}]"
            )
        if rule != ARGS_ANY and re.fullmatch(rule, arg) is None:
            raise PolicyError(f"preset {name!r} refuses the argument {arg!r}: each argument must match {rule!r}")
    return f"{command} {shlex.join(args)}"


@dataclass(frozen=True, slots=True)
class Preset:
    """A named command from the config file, fired as a tool of its own name."""

    command: str
    cwd: str | None = None
    timeout_s: float | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    description: str | None = None
    args: str = "none"
    """Which `args` a caller may append: "none", "any", or a regex each argument must match (tools/presets.py)."""
    allow_options: bool = False
    """Arguments starting with "-" are refused unless this is set."""
    queue: str | None = None
    """Distributed mode: the worker queue this preset always runs on (a build host, say)."""


class PresetArgs(BaseModel):
    """Arguments of a preset: extra words appended (quoted) to its command."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    args: Annotated[
        list[str], Field(description="Extra arguments appended to the preset command, each shell-quoted.")
    ] = []
    stdin: Annotated[str | None, Field(description="Text written to stdin, then closed.")] = None

    @field_validator("args")
    @classmethod
    def _no_nul(cls, value: list[str]) -> list[str]:
        if any("\x00" in arg for arg in value):
            raise ValueError("an argument contains a NUL byte, which no command can receive")
        return value


def preset_spec(name: str, preset: Preset, config: shell.ShellConfig) -> ToolSpec:
    def check(args: PresetArgs, owner: str) -> None:
        shell.check_cwd(preset.cwd, f"preset {name!r}: ")
        preset_command(name, preset, args.args, config.for_owner(owner).policy)

    async def handler(args: PresetArgs, ctx: ToolContext) -> JSON:
        command = preset_command(name, preset, args.args, config.for_owner(ctx.owner).policy)
        return await shell.run_command(command, ctx, config, cwd=preset.cwd, env=preset.env, stdin=args.stdin)

    return ToolSpec(
        name=name,
        description=preset.description or f"Preset command: {preset.command}",
        input_model=PresetArgs,
        handler=handler,
        destructive=True,
        open_world=True,
        default_timeout_s=preset.timeout_s,
        check=check,
        recover=functools.partial(shell.recover, config=config),
        queue=preset.queue,
    )


def preset_specs(config: shell.ShellConfig) -> list[ToolSpec]:
    return [preset_spec(name, preset, config) for name, preset in config.presets.items()]
