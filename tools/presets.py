"""Presets: commands the operator named in the config file, each fired as a tool of its own name.

What a caller may append to a preset: the operator wrote the command, the caller only fills in arguments.

An argument is quoted, so it cannot start a second command in the preset's own shell line; but the program
reads it, and programs do more with a word than take it as a value: an option runs something
(`make --eval=…`, `git -c core.pager=…`, `npm --script-shell=…`), a `NAME=value` word is a setting (make
takes `SHELL=/bin/sh -c id` as its shell and runs `X!=cmd`), `@file` is a response file, `+toolchain` picks
another cargo, a word reaches a shell again through a recipe (make's `$@`), a path makes pytest or `go test`
run the code there. So a preset takes no arguments unless its table says which (ARGS_WORDS, ARGS_ANY or a
regex), every rule refuses the forms in `refusal` (a regex narrows them, never widens them), and a preset
whose command ends at a program that runs its first argument, or picks a subcommand with it (`npm`, `git`,
`env`), takes no arguments at all (`exposed_program`, checked when the settings load).
"""

from __future__ import annotations

import functools
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tools import shell
from tools.cmdline import SHELLS, Unreadable, invocations
from tools.context import JSON, ToolContext
from tools.policy import PolicyError, ShellPolicy
from tools.registry import ToolSpec

ARGS_NONE = "none"
ARGS_WORDS = "words"
ARGS_ANY = "any"

WORD = re.compile(r"[A-Za-z0-9._/:,@%+-]+")
"""`args = "words"`: ASCII letters, digits and these marks only, nothing a shell or a make recipe reads."""
SHELL_CHARS = frozenset(" \t\n\r\v\f$`;&|<>()\\'\"*?[]{}!#~^")
"""Refused by every rule: a word holding one means something else once a program hands it to a shell again
(make puts targets into recipe lines through `$@`; npm and yarn scripts run through `sh -c`)."""
_PLAIN = "without spaces, shell characters, control characters or '=', not starting with '@'"
RULE_ACCEPTS = {
    ARGS_WORDS: "words of ASCII letters, digits and ._/:,@%+- that stay inside the preset's directory, "
    "not starting with '@'",
    ARGS_ANY: f"words {_PLAIN}",
}

RUNS_ITS_ARGUMENTS = frozenset(
    {*SHELLS, "python", "python3", "node", "deno", "ruby", "perl", "php", "lua", "Rscript", "tclsh", "osascript",
     "env", "xargs", "sudo", "doas", "su", "runuser", "ssh", "script", "watch", "time", "nohup", "nice", "timeout",
     "setsid", "stdbuf", "strace", "ltrace", "exec", "command", "builtin", "npx", "pnpx", "bunx", "uvx"}
)  # fmt: skip
"""Programs whose first argument is a program or script to run."""
SUBCOMMANDS = frozenset(
    {"git", "npm", "yarn", "pnpm", "bun", "cargo", "rustup", "go", "uv", "pip", "pip3", "pipx", "poetry", "hatch",
     "docker", "podman", "kubectl", "gh", "dotnet", "deno", "gradle", "systemctl"}
)  # fmt: skip
"""Programs whose first argument picks a subcommand, and some subcommand runs any program (`npm exec CMD`,
`yarn CMD`, `git config core.fsmonitor CMD`, `cargo install`, `go run`, `uv run`, `docker run`)."""
RUN_SUBCOMMANDS = frozenset(
    {("npm", "exec"), ("npm", "x"), ("npm", "explore"), ("yarn", "exec"), ("yarn", "dlx"), ("pnpm", "exec"),
     ("pnpm", "dlx"), ("bun", "x"), ("bun", "run"), ("uv", "run"), ("uv", "tool"), ("go", "run"),
     ("go", "generate"), ("poetry", "run"), ("hatch", "run"), ("pipx", "run"), ("docker", "run"),
     ("docker", "exec"), ("podman", "run"), ("podman", "exec"), ("kubectl", "exec"), ("cargo", "install")}
)  # fmt: skip
"""Subcommands that run the program (or code) their next argument names."""
TAKES_A_VALUE = frozenset({"-C", "-c", "--prefix", "--cwd", "--dir", "--config", "--manifest-path", "-Z", "--filter"})
"""Options of those programs whose value is the next word (`git -C dir`), so it is not taken for a subcommand."""
_PROBE = "offload-probe-argument"


def validate_rule(rule: str) -> str:
    """`none`, `words`, `any` or a valid regex; ValueError naming the rule otherwise (at start, not at first use)."""
    if rule in (ARGS_NONE, ARGS_WORDS, ARGS_ANY):
        return rule
    try:
        re.compile(rule)
    except re.error as exc:
        raise ValueError(f'args = {rule!r} is neither "none", "words", "any" nor a valid regex: {exc}') from exc
    return rule


def exposed_program(command: str) -> str | None:
    """The program a caller's appended arguments would drive whole, if the preset's command ends at one
    that runs its first argument or picks a subcommand with it (`npm`, `env FOO=1`, `git -C dir`);
    else None. Read with the deny-list's bash reader; a line it cannot read is judged by its last word."""
    try:
        found = invocations(f"{command} {_PROBE}")
    except Unreadable:
        words = command.split()
        last = os.path.basename(words[-1]) if words else ""
        return last if last in RUNS_ITS_ARGUMENTS | SUBCOMMANDS else None
    for before, invocation in zip([None, *found], found, strict=False):
        if invocation.program == _PROBE:  # a wrapper (`env`, `timeout 5`, `sudo`) would run the argument
            return before.program if before is not None else _PROBE
        if invocation.args[-1:] == (_PROBE,) and invocation.program in RUNS_ITS_ARGUMENTS | SUBCOMMANDS:
            given = _positionals(invocation.args[:-1])
            if not given or (len(given) == 1 and (invocation.program, given[0]) in RUN_SUBCOMMANDS):
                return " ".join([invocation.program, *given])
    return None


def _positionals(args: tuple[str, ...]) -> list[str]:
    """The words that are no option nor an option's value."""
    found: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg.startswith(("-", "+")):
            skip = arg in TAKES_A_VALUE
        else:
            found.append(arg)
    return found


def check_preset(command: str, rule: str) -> None:
    """ValueError when a preset that takes arguments would hand its caller a whole program (at start)."""
    program = None if rule == ARGS_NONE else exposed_program(command)
    if program is not None:
        raise ValueError(
            f"args = {rule!r}, but the command {command!r} ends at {program!r}, which runs its first argument or "
            f"picks a subcommand with it (`npm exec CMD`, `git config core.fsmonitor CMD`, `env CMD`): "
            'name the subcommand or script in the command (command = "npm run build") or set args = "none"'
        )


def refusal(arg: str, rule: str, allow_options: bool) -> str | None:
    """Why `arg` may not be appended under `rule`, or None when it may."""
    if arg.startswith(("-", "+")) and not allow_options:
        return "it starts with '-' or '+', so the program reads it as an option, and options can run other commands"
    if rule not in (ARGS_WORDS, ARGS_ANY) and re.fullmatch(rule, arg) is None:
        return f"each argument must match {rule!r}"
    if arg.startswith("@"):
        return "it starts with '@', which many programs read as a file of more arguments"
    if "=" in arg:
        return "it holds '=', which make and env-style programs read as a setting (NAME=value)"
    if any(char < " " or char == "\x7f" for char in arg):
        return "it holds a control character (a newline, a tab, a NUL)"
    if SHELL_CHARS & set(arg):
        return "it holds a space or a shell character, which a program may hand to a shell again (make's $@)"
    if rule == ARGS_WORDS:
        if WORD.fullmatch(arg) is None:
            return "it holds a character outside ASCII letters, digits and ._/:,@%+-"
        if arg.startswith("/") or ".." in arg.split("/"):
            return "it names a path outside the preset's directory (pytest and go test run the code a path holds)"
    return None


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
            'or ask the operator to set args = "words", "any" or a regex in [presets.' + name + "]"
        )
    for arg in args:
        why = refusal(arg, rule, allow_options)
        if why is not None:
            accepts = RULE_ACCEPTS.get(rule, f"words matching {rule!r}, {_PLAIN}")
            options = " (options too)" if allow_options else " (no options)"
            raise PolicyError(
                f"preset {name!r} refuses the argument {arg!r}: {why}; it takes {accepts}{options}. "
                f"Pass plain values, or ask the operator to change args in [presets.{name}]"
            )
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
    """Which `args` a caller may append: "none", "words", "any", or a regex (each argument must match it, and
    pass what `refusal` checks for every rule)."""
    allow_options: bool = False
    """Arguments starting with "-" or "+" are refused unless this is set."""
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
