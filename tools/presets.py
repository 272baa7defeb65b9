"""What a caller may append to a preset: the operator wrote the command, the caller only fills in arguments.

An argument is quoted, so it cannot start a second command; but the program reads it, and many programs
run whatever an option tells them to (`make --eval=…`, `git -c core.pager=…`, `npm --script-shell=…`).
So a preset takes no arguments unless its table says `args = "any"` or a regex each one must match, and
an argument that looks like an option (starts with `-`) is refused unless `allow_options = true`.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from typing import Protocol

from tools.policy import PolicyError, ShellPolicy

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
