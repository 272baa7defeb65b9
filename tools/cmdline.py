"""Every command a bash line runs by name, read with a real bash parser (bashlex), for the deny-list.

What it promises (tests/test_deny_fuzz.py checks it with generated spellings): a program named in a deny
rule is found wherever bash would run it *by a literal name* — in any list, pipeline, `!`, `{ …; }`,
subshell, `if`/`while`/`for`/`until` body, function body, `$(…)`, backquotes, `<(…)`, after assignments
and redirections, behind a full path or quotes or backslashes or line continuations, behind the wrappers
in WRAPPERS (with their options), and inside the string of `sh/bash/… -c` (any option cluster holding
`c`, `--` included) or of the programs in COMMAND_STRINGS and `watch`, to any depth up to MAX_DEPTH.
And it refuses outright what it cannot read that way: a line bashlex cannot parse (`case`, `[[ ]]`,
`$(( ))`, arrays, `time`), a command word computed at run time (`$x`, `$(…)`, backquotes, globs `?*[`,
braces `{a,b}`), `eval`, `source`/`.`, and a shell that reads its commands from a script file or from
stdin (`… | bash`, `bash <<EOF`, `script`/`su` without `-c`).

What it cannot see, and so never claims: programs started by another program's arguments or files
(`find -exec`, `xargs` input, `git -c core.pager=…`, `make`, `npm run`, a script that is not a shell
reading it directly, `python -c`), commands run elsewhere (`ssh host CMD`, `systemd-run`), aliases and
functions from outside the line, and anything a program does once it runs. A deny-list is a guard-rail;
the allow-list and the sandbox are the protections.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import bashlex  # type: ignore[import-untyped]
import bashlex.errors  # type: ignore[import-untyped]

MAX_DEPTH = 4
"""Nested `sh -c` strings read; deeper nesting is refused."""

SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "ash", "mksh", "yash", "posh", "busybox"})
DYNAMIC = frozenset(
    {"eval", "source", ".", "fc", "trap", "hash", "mapfile", "readarray", "let", "enable", "alias", "bind", "complete"}
)
"""Builtins that run text computed at run time, or bind a name to a program (`hash -p`), or call a
command back (`mapfile -C`), or evaluate arithmetic (`let`, where `a[$(cmd)]` runs cmd): refused."""
RE_EVALUATED = ("$(", "`", "@P}")
"""Text that some builtin may evaluate again even inside quotes (`printf -v 'a[$(cmd)]'`, `test -v`,
`declare`, `(( ))`, `${x@P}`): a line holding any of them anywhere but as a plain substitution is refused."""
COMPUTED_CHARS = frozenset("$`*?[{")
"""In a command word (even quoted), these mean the shell decides at run time what runs."""

WRAPPERS: dict[str, frozenset[str]] = {
    # wrapper -> its options that take a separate argument; the command follows its options
    "env": frozenset({"-u", "--unset", "-C", "--chdir"}),
    "command": frozenset(),
    "builtin": frozenset(),
    "exec": frozenset({"-a"}),
    "nohup": frozenset(),
    "nice": frozenset({"-n", "--adjustment"}),
    "ionice": frozenset({"-c", "--class", "-n", "--classdata", "-t"}),
    "stdbuf": frozenset({"-i", "-o", "-e", "--input", "--output", "--error"}),
    "timeout": frozenset({"-s", "--signal", "-k", "--kill-after"}),
    "setsid": frozenset(),
    "chrt": frozenset(),
    "taskset": frozenset(),
    "sudo": frozenset({"-u", "-g", "-C", "-D", "-h", "-p", "-r", "-t", "-U", "--user", "--group"}),
    "doas": frozenset({"-u", "-C"}),
    "xargs": frozenset({"-I", "-n", "-P", "-L", "-s", "-d", "-E", "-a", "--max-args", "--max-procs"}),
    "unbuffer": frozenset(),
    "flock": frozenset({"-w", "--timeout", "-E", "--conflict-exit-code"}),
    "runuser": frozenset({"-u", "--user", "-w", "--whitelist-environment", "-g", "--group", "-G", "--supp-group"}),
    "watch": frozenset({"-n", "--interval", "-q", "--equexit"}),
}
"""Programs that run the command after them: the check looks through them."""
TAKES_POSITIONAL = {"timeout": 1, "chrt": 1, "taskset": 1, "flock": 1}
"""Wrappers with leading positional arguments before the command (a duration, a priority, a lock file)."""
COMMAND_STRINGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "flock": ("wE", ("--command",)),
    "script": ("IOBTEom", ("--command",)),
    "su": ("wgGs", ("--command", "--session-command")),
    "runuser": ("wgGsu", ("--command", "--session-command")),
}
"""Programs that hand the string of their `-c` (or long option) to a shell: program -> (its short options
taking a value, its long options carrying the string). The string is read like `sh -c`'s."""
STDIN_SHELLS = frozenset({"script", "su"})
"""Programs that start a shell reading stdin when they are given no command string: refused then."""

SHORT_ALIASES: dict[str, dict[str, str]] = {
    "rm": {"R": "r", "--recursive": "r", "--force": "f", "--dir": "d"},
    "cp": {"R": "r", "--recursive": "r", "--force": "f"},
    "chmod": {"--recursive": "R"},
    "chown": {"--recursive": "R"},
    "git": {"--force": "f"},
}
"""Option spellings that mean the same, per program, so `rm -rf` also matches `rm -r -f`, `rm -fr`,
`rm --recursive --force`, `rm -Rf`."""


class Unreadable(ValueError):
    """The line has a part this reader cannot follow; in deny-list mode it is refused, with this reason."""


@dataclass(frozen=True, slots=True)
class Invocation:
    """One program bash would run: its name (no directory) and its arguments, unquoted."""

    program: str
    args: tuple[str, ...]

    def flags(self) -> frozenset[str]:
        """Short options as single letters, long options whole, with the program's aliases applied."""
        aliases = SHORT_ALIASES.get(self.program, {})
        found: set[str] = set()
        for arg in self.args:
            if arg == "--":
                break
            if arg.startswith("--"):
                name = _long_option(arg.split("=", 1)[0], aliases)
                found.add(aliases.get(name, name))
            elif arg.startswith("-") and len(arg) > 1:
                found.update(aliases.get(letter, letter) for letter in arg[1:])
        return frozenset(found)

    def positionals(self) -> list[str]:
        return [a for a in self.args if not a.startswith("-")]


def _refuse_re_evaluated(line: str) -> None:
    """Single-quoted `$(…)` or backquotes are text to bash, but builtins that evaluate a name or an
    arithmetic expression (`printf -v`, `test -v`, `declare`) run them; `${x@P}` expands a prompt, which
    runs them too. The policy cannot follow either: refused."""
    if "@P}" in line:
        raise Unreadable("${…@P} expands text as a prompt, which can run commands")
    single = double = escaped = False
    for index, char in enumerate(line):
        if escaped:
            escaped = False
        elif char == "\\" and not single:
            escaped = True
        elif char == "'" and not double:
            single = not single
        elif char == '"' and not single:
            double = not double
        elif single and (char == "`" or line.startswith("$(", index)):
            raise Unreadable("a quoted $(…) or `…` that a builtin may evaluate (printf -v, test -v, declare)")


def _long_option(name: str, aliases: dict[str, str]) -> str:
    """GNU programs take any unambiguous prefix of a long option (`--rec` is `--recursive`)."""
    known = [option for option in aliases if option.startswith("--") and option.startswith(name) and len(name) > 2]
    return known[0] if len(known) == 1 else name


def invocations(line: str, depth: int = 0) -> list[Invocation]:
    """Every program `line` runs by name; Unreadable when some part cannot be followed."""
    if depth > MAX_DEPTH:
        raise Unreadable(f"shells nested more than {MAX_DEPTH} deep")
    _refuse_re_evaluated(line)
    line = line.replace("\\\n", "")  # line continuations first, so word positions hold in $(…) too
    if not line.strip():
        return []
    found: list[Invocation] = []
    for words in _commands_of(line):
        found.extend(_unwrap(words, depth))
    return found


def _commands_of(line: str) -> Iterator[list[tuple[str, str]]]:
    try:
        trees = bashlex.parse(line)
    except (bashlex.errors.ParsingError, NotImplementedError, AttributeError, IndexError, TypeError) as exc:
        raise Unreadable(f"bash syntax this policy cannot read ({exc})") from exc
    for tree in trees:
        yield from _simple_commands(tree, line)


def _simple_commands(node: Any, line: str) -> Iterator[list[tuple[str, str]]]:
    """(unquoted word, raw text) lists of every simple command, nested ones included."""
    kind = getattr(node, "kind", None)
    if kind in ("commandsubstitution", "processsubstitution"):
        raw = line[node.pos[0] : node.pos[1]]
        if raw.startswith("`") and raw.endswith("`") and len(raw) > 1:
            # Inside backquotes bash first undoes \\, \` and \$, then parses: read the text it parses.
            inner = re.sub(r"\\([\\`$])", r"\1", raw[1:-1])
            yield from _commands_of(inner.replace("\\\n", ""))
            return
        if not raw.endswith(")"):  # bashlex stops a substitution at a newline: not all of it was read
            raise Unreadable(f"a substitution bashlex reads only in part ({raw!r})")
    if kind == "command":
        raws = [line[part.pos[0] : part.pos[1]] for part in node.parts if part.kind == "word"]
        words = [(_unquoted(raw), raw) for raw in raws]
        if words:
            yield words
    for attribute in ("parts", "list", "command", "output"):
        child = getattr(node, attribute, None)
        children = child if isinstance(child, list) else [child] if child is not None else []
        for sub in children:
            if hasattr(sub, "kind"):
                yield from _simple_commands(sub, line)


def _unquoted(raw: str) -> str:
    """POSIX quote removal of one word (bashlex's own gets adjacent quotes like `''"'"'x'"'"''` wrong)."""
    try:
        parts = shlex.split(raw, posix=True)
    except ValueError as exc:
        raise Unreadable(f"unbalanced quotes in {raw!r}") from exc
    return "".join(parts) if len(parts) <= 1 else raw


def _unwrap(words: Sequence[tuple[str, str]], depth: int) -> list[Invocation]:
    rest = list(words)
    found: list[Invocation] = []
    while rest:
        word, raw = rest[0]
        if COMPUTED_CHARS & set(raw):
            raise Unreadable(f"the command word {raw!r} is computed at run time")
        program = os.path.basename(word)
        args = [w for w, _ in rest[1:]]
        found.append(Invocation(program, tuple(args)))
        if program in DYNAMIC:
            raise Unreadable(f"{program!r} runs text computed at run time")
        if program in SHELLS:
            found.extend(_shell(program, args, depth))
            return found
        if (inner := _string_run_by(program, rest[1:], depth)) is not None:
            found.extend(inner)
            return found
        if program not in WRAPPERS:
            return found
        rest = _after_wrapper(program, rest[1:])
    return found


def _string_run_by(program: str, rest: list[tuple[str, str]], depth: int) -> list[Invocation] | None:
    """What `flock -c`, `script -c`, `su -c`, `runuser -c` and `watch` (without -x) hand a shell, read
    like `sh -c`'s string; None for a program that runs no such string (a wrapper's command is read
    after it)."""
    args = [word for word, _ in rest]
    if program in ("su", "runuser"):
        shell = _option_value(args, program, "s", ("--shell",))
        if shell is not None and os.path.basename(shell) not in SHELLS:
            raise Unreadable(f"{program} -s {shell!r} runs a program that is not a shell")
    if program in COMMAND_STRINGS:
        command = _option_value(args, program, "c", COMMAND_STRINGS[program][1])
        if command is not None:
            return invocations(command, depth + 1)
    if program in STDIN_SHELLS or (program == "runuser" and not {"-u", "--user"} & set(args)):
        raise Unreadable(f"{program} without -c starts a shell reading stdin, which this policy cannot see")
    if program == "watch" and not {"-x", "--exec"} & set(args):
        return invocations(" ".join(word for word, _ in _after_wrapper(program, rest)), depth + 1)
    return None


def _option_value(args: list[str], program: str, letter: str, long_names: tuple[str, ...]) -> str | None:
    """The value of option `-LETTER` (or a long name) of `program`: the shell string of `flock FILE -c STRING`,
    `script -qc STRING`, `su -c STRING`; options read as getopt does (clusters, `-cSTRING`,
    `--command=STRING`, `--com` abbreviated)."""
    with_value = COMMAND_STRINGS[program][0]
    index = 0
    while index < len(args) and args[index] != "--":
        arg, following = args[index], args[index + 1] if index + 1 < len(args) else ""
        if arg.startswith("--"):
            name, equals, value = arg.partition("=")
            if len(name) > 3 and any(long.startswith(name) for long in long_names):
                return value if equals else following
        elif arg.startswith("-"):
            for position, given in enumerate(arg[1:], 2):
                if given == letter:
                    return arg[position:] or following
                if given in with_value:
                    index += position == len(arg)  # its value is the next word
                    break
        index += 1
    return None


def _after_wrapper(program: str, rest: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The words of the command a wrapper runs: its options (and their arguments) and leading
    positionals skipped, `env`'s NAME=VALUE too. `env -S` splits a string: refused."""
    with_argument = WRAPPERS[program]
    positional = TAKES_POSITIONAL.get(program, 0)
    while rest:
        word = rest[0][0]
        if word == "--":
            rest = rest[1:]
            break
        if program == "env" and (word.startswith(("-S", "--split-string"))):
            raise Unreadable("env -S splits a string into a command")
        if word.startswith("-") and len(word) > 1:
            rest = rest[2:] if word in with_argument else rest[1:]
        elif (program == "env" and "=" in word) or (program == "nice" and word.lstrip("-").isdigit()):
            rest = rest[1:]
        else:
            break
    return rest[positional:]


def _shell(program: str, args: list[str], depth: int) -> list[Invocation]:
    """A shell runs its `-c` string (read here), a script file or stdin (refused: unseen commands)."""
    index = 0
    if program == "busybox":
        if not args or args[0] not in SHELLS:
            return []
        index = 1
    reads_string = False
    while index < len(args) and args[index].startswith(("-", "+")) and args[index] not in ("-", "--"):
        option = args[index]
        if not option.startswith("--") and "c" in option[1:]:
            reads_string = True
        if option[1:] in ("o", "O") or option in ("-o", "+o", "-O", "+O"):
            index += 1  # -o NAME
        index += 1
    if index < len(args) and args[index] == "--":
        index += 1
    if not reads_string:
        raise Unreadable(f"{program} reads its commands from a script or stdin, which this policy cannot see")
    if index >= len(args):
        return []
    return invocations(args[index], depth + 1)
