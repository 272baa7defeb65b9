"""Shell policy: which commands and working directories a client may use.

A guard-rail, not a sandbox. Rules on a command *string* can be talked around: a deny-list
is beaten by anything the shell expands at run time (`$(printf sudo)`, a script file, an
alias). `allow-list` is the strict mode because it does not trust the shell to agree with
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

Mode = Literal["off", "deny-list", "allow-list", "disabled"]

OPERATOR_CHARS = ";&|<>()"
EXPANSION_CHARS = ("$", "`", "\n", "\r")
"""Refused in allow-list mode: each would let the shell run something other than the words checked."""
WRAPPERS = frozenset({"env", "command", "exec", "nohup", "nice", "time", "builtin", "stdbuf", "timeout", "xargs"})
"""Words that run the command after them; deny rules look through them."""
SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "ash", "busybox"})
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

    def denies(self, words: Sequence[str], raw: str) -> bool:
        """Anywhere match: a regex found in the raw or the unquoted line, or a prefix of the words."""
        if self.pattern is not None:
            return any(self.pattern.search(text) for text in (raw, " ".join(words)))
        return tuple(words[: len(self.words)]) == self.words


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
        for words in simple_commands(command):
            for rule in self.deny:
                if rule.denies(words, command):
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


def simple_commands(command: str, depth: int = 0) -> list[list[str]]:
    """Each simple command in a line, unwrapped: `env X=1 sudo ls` reads as `sudo ls`, the string of
    `sh -c '…'` is read as commands of its own, `/usr/bin/sudo` as `sudo`. Quotes and escapes are
    removed (so `s\\udo` is `sudo`). What the shell expands at run time is not seen."""
    found: list[list[str]] = []
    current: list[str] = []
    for word in [*_split(command), ";"]:
        if word and all(c in OPERATOR_CHARS for c in word):
            if current:
                found.extend(_unwrap(current, depth))
            current = []
        else:
            current.append(word)
    return found


def _unwrap(words: list[str], depth: int) -> list[list[str]]:
    rest = list(words)
    while rest:
        head = os.path.basename(rest[0])
        if "=" in rest[0] and not rest[0].startswith("="):
            rest.pop(0)
        elif head in WRAPPERS:
            rest.pop(0)
            while rest and (rest[0].startswith("-") or "=" in rest[0] or rest[0].replace(".", "").isdigit()):
                rest.pop(0)
        else:
            break
    if not rest:
        return []
    rest[0] = os.path.basename(rest[0])
    found = [rest]
    if rest[0] in SHELLS and "-c" in rest[:-1] and depth < 4:
        found.extend(simple_commands(rest[rest.index("-c") + 1], depth + 1))
    return found


def _split(command: str) -> list[str]:
    lexer = shlex.shlex(command, posix=True, punctuation_chars=OPERATOR_CHARS)
    lexer.whitespace_split = True
    lexer.commenters = ""
    try:
        return list(lexer)
    except ValueError as exc:
        raise PolicyError(f"shell policy cannot read {command!r}: {exc}") from exc
