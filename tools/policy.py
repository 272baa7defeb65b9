"""Shell policy: which commands and working directories a client may use.

A guard-rail, not a sandbox. Rules on a command *string* can be talked around: a deny-list
sees every program a line runs by name (tools/cmdline.py says exactly what that covers, and
refuses lines it cannot read), never what a program runs in turn (`find -exec`, `make`).
`allow-list` is the strict mode because it does not trust the shell to agree with
us: the command must be plain words (no operators, no expansions), the words are checked,
and then exactly those words run, each one quoted. Real isolation — a dedicated user, a
container — is the operator's job.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from tools.cmdline import Invocation, Unreadable, invocations

Mode = Literal["off", "deny-list", "allow-list", "disabled"]

OPERATOR_CHARS = ";&|<>()"
EXPANSION_CHARS = ("$", "`", "\n", "\r")
"""Refused in allow-list mode: each would let the shell run something other than the words checked."""
REGEX_PREFIX = "re:"


class PolicyError(ValueError):
    """The command or directory is refused by the operator's policy; the message says which rule."""


@dataclass(frozen=True, slots=True)
class Rule:
    """`git status` matches commands whose first words are those; `re:…` is a regex on the command."""

    text: str
    words: tuple[str, ...] = ()
    pattern: re.Pattern[str] | None = None

    @classmethod
    def parse(cls, text: str) -> Rule:
        if text.startswith(REGEX_PREFIX):
            try:
                return cls(text, pattern=re.compile(text.removeprefix(REGEX_PREFIX)))
            except re.error as exc:
                raise ValueError(f"shell rule {text!r} is not a valid regex: {exc}") from exc
        words = tuple(shlex.split(text))
        if not words:
            raise ValueError("a shell rule cannot be empty")
        return cls(text, words=words)

    def allows(self, words: Sequence[str]) -> bool:
        """Whole-command match: a regex must match all of the quoted command line."""
        if self.pattern is not None:
            return self.pattern.fullmatch(shlex.join(words)) is not None
        return tuple(words[: len(self.words)]) == self.words

    def denies(self, run: Invocation, raw: str) -> bool:
        """Anywhere match: a regex found in the raw line or in one program's unquoted words; or the rule's
        program with its words in order among the positionals and its options among the options, however
        spelt (`rm -rf` denies `rm -fr x`, `rm -r -f x`, `rm --recursive --force x`)."""
        if self.pattern is not None:
            return any(self.pattern.search(text) for text in (raw, shlex.join([run.program, *run.args])))
        if run.program != os.path.basename(self.words[0]):
            return False
        wanted = Invocation(run.program, self.words[1:])
        return wanted.flags() <= run.flags() and _in_order(wanted.positionals(), run.positionals())


@dataclass(frozen=True, slots=True)
class ShellPolicy:
    mode: Mode = "off"
    allow: tuple[Rule, ...] = ()
    deny: tuple[Rule, ...] = ()
    roots: tuple[str, ...] = ()
    """Real paths (symlinks resolved) of the directories commands may start in."""

    @classmethod
    def build(cls, *, mode: Mode, allow: Sequence[str], deny: Sequence[str], roots: Sequence[str]) -> ShellPolicy:
        resolved = []
        for root in roots:
            real = os.path.realpath(os.path.expanduser(root))
            if not os.path.isdir(real):
                raise ValueError(f"shell root {root!r} is not an existing directory")
            resolved.append(real)
        return cls(
            mode=mode,
            allow=tuple(Rule.parse(r) for r in allow),
            deny=tuple(Rule.parse(r) for r in deny),
            roots=tuple(resolved),
        )

    def command_to_run(self, command: str, env: Mapping[str, str] | None) -> str:
        """The command line to hand to the shell, or PolicyError saying which rule refused it."""
        if self.mode == "off":
            return command
        self.require_shell()
        if self.mode == "deny-list":
            self._check_deny(command)
            return command
        if env:
            raise PolicyError(
                f"shell policy is allow-list: `env` is refused ({sorted(env)}): variables such as PATH, "
                "BASH_ENV or GIT_SSH_COMMAND would change what an allowed command runs; ask the operator for a preset"
            )
        words = plain_words(command)
        if not any(rule.allows(words) for rule in self.allow):
            allowed = ", ".join(repr(r.text) for r in self.allow) or "none"
            raise PolicyError(f"shell policy is allow-list and no rule allows {command!r}; allowed: {allowed}")
        self._check_deny(command)
        return shlex.join(words)

    def require_shell(self) -> None:
        """PolicyError when this owner has no shell at all (`shell_mode = "disabled"`)."""
        if self.mode == "disabled":
            raise PolicyError(
                "shell commands are disabled for this owner (shell_mode = 'disabled'); "
                "use the other fireable tools (list_fireable_tools), or ask the operator to enable the shell"
            )

    def cwd_to_use(self, cwd: str | None) -> str | None:
        """`cwd` if it lies inside a root (the first root when none is given), else PolicyError."""
        if not self.roots:
            return cwd
        if cwd is None:
            return self.roots[0]
        real = os.path.realpath(cwd)
        if any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in self.roots):
            return real
        raise PolicyError(
            f"cwd {cwd!r} (really {real!r}) is outside the allowed roots {list(self.roots)}; "
            "use one of them or a directory inside one"
        )

    def _check_deny(self, command: str) -> None:
        if not self.deny:
            return
        try:
            runs = invocations(command)
        except Unreadable as exc:
            raise PolicyError(
                f"shell policy has a deny-list and cannot tell what {command!r} runs: {exc}. Write the "
                "commands out plainly (literal program names, no eval, no shell reading stdin or a script)"
            ) from exc
        for run in runs:
            for rule in self.deny:
                if rule.denies(run, command):
                    raise PolicyError(f"shell policy denies {command!r} (rule {rule.text!r})")


def plain_words(command: str) -> list[str]:
    """The words of a command that has no operators or expansions; PolicyError naming what it has."""
    for char in EXPANSION_CHARS:
        if char in command:
            raise PolicyError(
                f"shell policy is allow-list: commands are plain words, and {command!r} contains {char!r} "
                "(expansions, substitutions and several lines are refused)"
            )
    words = _split(command)
    for word in words:
        if word and all(c in OPERATOR_CHARS for c in word):
            raise PolicyError(
                f"shell policy is allow-list: commands are plain words, and {command!r} contains the operator "
                f"{word!r} (pipes, lists and redirections are refused)"
            )
    if not words:
        raise PolicyError("shell policy is allow-list: the command is empty")
    return words


def _in_order(wanted: Sequence[str], words: Sequence[str]) -> bool:
    """`wanted` is a subsequence of `words`."""
    remaining = iter(words)
    return all(any(word == w for w in remaining) for word in wanted)


def _split(command: str) -> list[str]:
    lexer = shlex.shlex(command, posix=True, punctuation_chars=OPERATOR_CHARS)
    lexer.whitespace_split = True
    lexer.commenters = ""
    try:
        return list(lexer)
    except ValueError as exc:
        raise PolicyError(f"shell policy cannot read {command!r}: {exc}") from exc
