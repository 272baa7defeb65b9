"""The deny-list's stated guarantee (tools/cmdline.py), fuzzed: however a denied program is spelt, wrapped,
nested or placed, a line that runs it by name is refused; lines that only mention it are not. Plus every
bypass issue 12 found, and the README's `rm -rf` rule in all its spellings."""

from __future__ import annotations

import shlex

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tools.policy import PolicyError, ShellPolicy

POLICY = ShellPolicy.build(mode="deny-list", allow=[], deny=["whoami", "rm -rf"], roots=[])

NAMES = ["whoami", "/usr/bin/whoami", "'whoami'", '"whoami"', "w'h'oami", "wh\\oami", '"who"ami', "who\\\nami"]
WRAPPERS = [
    "env",
    "env -u HOME",
    "env A=1 B=2",
    "env -- ",
    "timeout 5s",
    "timeout -s KILL 5",
    "timeout -k 1 5",
    "stdbuf -o L",
    "stdbuf -oL",
    "setsid",
    "setsid -w",
    "nice",
    "nice -n 5",
    "nohup",
    "command",
    "builtin",
    "exec",
    "sudo -u root",
    "xargs -n 1",
    "/usr/bin/env",
    "runuser -u bob --",
    "watch -x",
    "flock /tmp/x",
]
PREFIXES = ["", "X=1 ", "</dev/null ", "2>/dev/null ", "X=1 Y=2 </dev/null "]
ARGS = ["", " -a", " --help", " > /dev/null", " 2>&1"]
CONTEXTS = [
    "{}",
    "true; {}",
    "true && {}",
    "false || {}",
    "true | {}",
    "{{ {}; }}",
    "({})",
    "if true; then {}; fi",
    "if {}; then :; fi",
    "while false; do :; done; {}",
    "for i in 1; do {}; done",
    "until true; do :; done\n{}",
    "! {}",
    "echo $({})",
    "echo `{}`",  # the inner line's \, ` and $ escaped, as bash needs inside backquotes
    'echo "$({})"',
    "cat <({})",
    "f() {{ {}; }}; f",
    "{} &",
    "true\n{}",
    "true \\\n&& {}",
    "x=$({})",
    "echo hi > $({})",
]
SHELLS = ["sh -c {}", "bash -c {}", "bash -lc {}", "sh -xc {}", "sh -c -- {}", "dash -ec {}", "busybox sh -c {}",
          "script -qc {} /dev/null", "script --command={}", "su -c {}", "runuser bob -c {}", "flock -w 1 /tmp/x -c {}",
          "watch -n 1 {}"]  # fmt: skip
"""Programs that hand a string to a shell (issue 22 added script, su, runuser and watch)."""


@st.composite
def spellings(draw: st.DrawFn) -> str:
    """A line that, run by bash, runs whoami (by construction)."""
    command = draw(st.sampled_from(NAMES)) + draw(st.sampled_from(ARGS))
    for wrapper in draw(st.lists(st.sampled_from(WRAPPERS), max_size=3)):
        command = f"{wrapper} {command}"
    line = draw(st.sampled_from(PREFIXES)) + command
    for _ in range(draw(st.integers(0, 3))):
        if draw(st.booleans()):
            context = draw(st.sampled_from(CONTEXTS))
            if "`" in context:
                line = line.replace("\\", "\\\\").replace("`", "\\`").replace("$", "\\$")
            line = context.format(line)
        else:
            line = draw(st.sampled_from(SHELLS)).format(shlex.quote(line))
    return line


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(spellings())
def test_every_spelling_that_runs_a_denied_program_is_refused(line: str) -> None:
    with pytest.raises(PolicyError):
        POLICY.command_to_run(line, None)


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(CONTEXTS), st.sampled_from(["echo whoami", "printf %s whoami", "grep -r whoami .", "ls -r"]))
def test_lines_that_only_mention_it_run(context: str, mention: str) -> None:
    line = context.format(mention)
    assert POLICY.command_to_run(line, None) == line


ISSUE_BYPASSES = [
    "true\nwhoami",
    "who\\\nami",
    "bash -lc whoami",
    "sh -xc whoami",
    "sh -c -- whoami",
    "eval whoami",
    "timeout 5s whoami",
    "env -u HOME whoami",
    "stdbuf -o L whoami",
    "setsid whoami",
    "{ whoami; }",
    "if true; then whoami; fi",
    "! whoami",
    "</dev/null whoami",
    "echo `whoami`",
    "{whoami,}",
    "/usr/bin/who?mi",
    "echo whoami | bash",
    "bash <<EOF\nwhoami\nEOF",
    "$(printf whoami)",
    "x=whoami; $x",
]
RM_RF = ["rm -rf x", "rm -fr x", "rm -r -f x", "rm --recursive --force x", "rm -Rf x", "rm -f -R x", "rm -rfv x"]


@pytest.mark.parametrize("line", ISSUE_BYPASSES + RM_RF)
def test_the_bypasses_of_issue_12_are_refused(line: str) -> None:
    with pytest.raises(PolicyError):
        POLICY.command_to_run(line, None)


@pytest.mark.parametrize("line", ["rm -r x", "rm -f x", "rm x", "echo rm -rf", "ls -rf"])
def test_rm_without_both_flags_runs(line: str) -> None:
    assert POLICY.command_to_run(line, None) == line


def test_what_it_cannot_read_is_refused_with_the_reason() -> None:
    for line, reason in [
        ("case x in x) whoami;; esac", "cannot read"),
        ("bash script.sh", "script or stdin"),
        ("$CMD", "computed at run time"),
        ("eval ls", "computed at run time"),
    ]:
        with pytest.raises(PolicyError, match=reason):
            POLICY.command_to_run(line, None)


@pytest.mark.parametrize(
    "line",
    [
        "hash -p /usr/bin/whoami foo; foo",
        "mapfile -C whoami -c 1 < /etc/hostname",
        "printf -v 'a[$(whoami)]' x",
        "test -v 'a[$(whoami)]'",
        "let 'x=a[$(whoami)]'",
        "read -r x <<< '$(whoami)'; echo ${x@P}",
        "flock /tmp/x -c whoami",
        "flock /tmp/x --command 'echo; whoami'",
    ],
)
def test_builtins_that_evaluate_or_rebind_are_refused(line: str) -> None:
    policy = ShellPolicy.build(mode="deny-list", allow=(), deny=("whoami",), roots=())
    with pytest.raises(PolicyError):
        policy.command_to_run(line, None)


@pytest.mark.parametrize("line", ["rm --rec --for d", "rm -r --forc d", "rm --recursive --fo d"])
def test_abbreviated_long_options_match_their_rule(line: str) -> None:
    policy = ShellPolicy.build(mode="deny-list", allow=(), deny=("rm -rf",), roots=())
    with pytest.raises(PolicyError, match="denies"):
        policy.command_to_run(line, None)


@pytest.mark.parametrize("line", ['echo "it\'s $(date)"', "echo '$HOME'", "printf '%s\\n' done"])
def test_ordinary_quoting_still_runs(line: str) -> None:
    policy = ShellPolicy.build(mode="deny-list", allow=(), deny=("whoami",), roots=())
    assert policy.command_to_run(line, None)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("script -qc whoami /dev/null", "denies"),
        ("script -c 'id; whoami'", "denies"),
        ("script -q -e --com whoami", "denies"),
        ("script -qcwhoami", "denies"),
        ("script -T /tmp/t -c whoami", "denies"),
        ("script -q /tmp/typescript", "stdin"),
        ("su -c whoami", "denies"),
        ("su bob --session-command=whoami", "denies"),
        ("su -s /usr/bin/whoami bob", "not a shell"),
        ("su -", "stdin"),
        ("runuser -u bob -- whoami", "denies"),
        ("runuser bob -c 'echo; whoami'", "denies"),
        ("watch -n 1 whoami", "denies"),
        ("watch -d -n1 'date; whoami'", "denies"),
        ("watch -x whoami", "denies"),
    ],
)
def test_programs_that_run_a_command_string_are_read_like_sh_c(line: str, reason: str) -> None:
    with pytest.raises(PolicyError, match=reason):
        POLICY.command_to_run(line, None)


@pytest.mark.parametrize(
    "line",
    ["script -qc 'echo whoami' /dev/null", "su -c 'ls -r' bob", "watch -n 1 echo whoami", "runuser -u bob -- id"],
)
def test_their_harmless_strings_run(line: str) -> None:
    assert POLICY.command_to_run(line, None) == line
