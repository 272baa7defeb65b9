"""Preset arguments through the MCP client: refused unless the preset's table allows them, options refused
unless allowed, and the issue's probes (`make --eval`, `make SHELL=…`, `X!=cmd`, a target that reaches a
recipe's shell) never run their command; plain targets run with a real make (issue 22, item 3)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import FakeClock, Gate, call, error_text, open_client

from server.config import Settings, load_settings
from server.errors import ConfigError
from tools.presets import ARGS_ANY, ARGS_WORDS, refusal

pytestmark = pytest.mark.anyio
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def make_preset(tmp_path: Path, **table: Any) -> Settings:
    (tmp_path / "Makefile").write_text("all:\n\t@echo made $(MAKECMDGOALS)\n%:\n\t@echo made $@\n")
    return Settings.model_validate(
        {"data_dir": tmp_path / "data", "presets": {"build": {"command": "make", "cwd": str(tmp_path), **table}}}
    )


def probes(marker: Path) -> list[str]:
    """Arguments that make a real make run `id > marker`, each in its own way (all ran before issue 22
    except the option-like ones, which only `allow_options` let through)."""
    return [
        f"SHELL=/bin/sh -c 'id > {marker}'",  # make's shell, running every recipe line
        f"X!=id > {marker}",  # a shell assignment: make runs it while reading the command line
        f"x;id > {marker}",  # the target reaches the recipe's shell through $@
        f"x\nid > {marker}",
        f"--eval=x:;@id > {marker}",
        f"-f/dev/null --eval=x:;@id > {marker}",
        f"-E x:;@id > {marker}",
    ]


@needs_make
@pytest.mark.parametrize(
    ("table", "said"),
    [
        ({}, "takes no arguments"),
        ({"args": "any"}, "it takes"),
        ({"args": "words"}, "it takes"),
        ({"args": ".*"}, "it takes"),
    ],
)
async def test_the_make_probes_never_run(
    clock: FakeClock, gate: Gate, tmp_path: Path, table: dict[str, str], said: str
) -> None:
    marker = tmp_path / "p"
    async with open_client(make_preset(tmp_path, **table), clock, gate) as (_, client):
        for probe in probes(marker):
            fired = {"tool": "build", "arguments": {"args": [probe, "x"]}}
            refused = error_text(await client.call_tool("fire_tool", fired))
            assert "Nothing was started" in refused and said in refused, refused
            assert repr(probe) in refused or "takes no arguments" in refused, refused
    assert not marker.exists()


@needs_make
@pytest.mark.parametrize("rule", ["words", "any", r"[a-z0-9./]+"])
async def test_plain_targets_run(clock: FakeClock, gate: Gate, tmp_path: Path, rule: str) -> None:
    async with open_client(make_preset(tmp_path, args=rule), clock, gate) as (_, client):
        ran = await call(
            client, "fire_tool", tool="build", arguments={"args": ["test", "build/all", "v1.2.3"]}, wait_s=10
        )
        assert ran["task"]["output"]["text"] == "made test\nmade build/all\nmade v1.2.3\n", ran


@pytest.mark.parametrize("rule", ["words", "any"])
async def test_plain_words_reach_the_program_as_given(clock: FakeClock, gate: Gate, tmp_path: Path, rule: str) -> None:
    """Without make too: a program that prints its arguments, one a line."""
    table = {"command": "printf '%s\\n'", "args": rule}
    settings = Settings.model_validate({"data_dir": tmp_path / "data", "presets": {"argv": table}})
    words = ["test", "build/all", "v1.2.3", "tests/test_x.py::test_a", "c++", "50%"]
    async with open_client(settings, clock, gate) as (_, client):
        ran = await call(client, "fire_tool", tool="argv", arguments={"args": words}, wait_s=10)
        assert ran["task"]["output"]["text"] == "".join(f"{word}\n" for word in words), ran


@needs_make
async def test_a_refusal_names_the_argument_the_reason_and_what_the_preset_takes(
    clock: FakeClock, gate: Gate, tmp_path: Path
) -> None:
    async with open_client(make_preset(tmp_path, args="words"), clock, gate) as (_, client):
        for arg, why in (("CC=cc", "'='"), ("/etc/x", "outside the preset's directory"), ("@args", "'@'")):
            refused = error_text(await client.call_tool("fire_tool", {"tool": "build", "arguments": {"args": [arg]}}))
            assert repr(arg) in refused and why in refused and "ASCII letters, digits and ._/:,@%+-" in refused
    async with open_client(make_preset(tmp_path, args="any"), clock, gate) as (_, client):
        ran = await call(client, "fire_tool", tool="build", arguments={"args": ["/tmp/é"]}, wait_s=10)
        assert ran["task"]["output"]["text"] == "made /tmp/é\n"  # `any` trusts the caller with paths


async def test_arguments_need_the_preset_to_allow_them(clock: FakeClock, gate: Gate, tmp_path: Path) -> None:
    async with open_client(make_preset(tmp_path), clock, gate) as (_, client):
        plain = await call(client, "fire_tool", tool="build", arguments={}, wait_s=10)
        assert plain["task"]["output"]["text"] == "made\n"
        refused = error_text(await client.call_tool("fire_tool", {"tool": "build", "arguments": {"args": ["all"]}}))
        assert "takes no arguments" in refused and "args = " in refused
    async with open_client(make_preset(tmp_path, args="[a-z]+"), clock, gate) as (_, client):
        ok = await call(client, "fire_tool", tool="build", arguments={"args": ["docs"]}, wait_s=10)
        assert ok["task"]["output"]["text"] == "made docs\n"
        bad = error_text(await client.call_tool("fire_tool", {"tool": "build", "arguments": {"args": ["a;b"]}}))
        assert "'a;b'" in bad and "must match '[a-z]+'" in bad
    async with open_client(make_preset(tmp_path, args="any", allow_options=True), clock, gate) as (_, client):
        ok = await call(client, "fire_tool", tool="build", arguments={"args": ["-s", "docs"]}, wait_s=10)
        assert ok["task"]["output"]["text"] == "made docs\n"
        assignment = error_text(await client.call_tool("fire_tool", {"tool": "build", "arguments": {"args": ["A=1"]}}))
        assert "'A=1'" in assignment and "setting" in assignment  # allow_options lets options through, no more


ADMITTED = ["test", "build/all", "v1.2.3", "tests/test_x.py::test_a", "./...", "a,b", "50%", "x@y", "c++", "a-b"]
"""Admitted by both "words" and "any"."""
REFUSED = {
    "-e": "option",
    "--eval=x": "option",
    "+nightly": "option",
    "@args.txt": "'@'",
    "CC=cc": "'='",
    "SHELL=/bin/sh -c id": "'='",
    "a=b": "'='",
    "a b": "space",
    "a;b": "shell",
    "$(id)": "shell",
    "`id`": "shell",
    "a|b": "shell",
    "a>b": "shell",
    "a*": "shell",
    "~root": "shell",
    "!x": "shell",
    "x\ny": "control",
    "x\ty": "control",
    "x\x00y": "control",
    "x\x7fy": "control",
}
"""Refused by both, with a word of the reason."""
ONLY_ANY = ["/tmp/x", "../x", "a/../../b", "é", "naïve"]
"""Admitted by "any" only: paths outside the preset's directory, letters outside ASCII."""


@pytest.mark.parametrize("rule", [ARGS_WORDS, ARGS_ANY])
def test_what_words_and_any_admit(rule: str) -> None:
    for arg in ADMITTED:
        assert refusal(arg, rule, allow_options=False) is None, arg
    for arg, why in REFUSED.items():
        said = refusal(arg, rule, allow_options=False)
        assert said is not None and why in said, (arg, said)
    for arg in ONLY_ANY:
        assert (refusal(arg, rule, allow_options=False) is None) is (rule == ARGS_ANY), arg
    assert refusal("-s", rule, allow_options=True) is None
    assert refusal("-DX=1", rule, allow_options=True) is not None


@pytest.mark.parametrize(
    "command", ["npm", "git", "git -C /src", "yarn", "cargo", "go", "npm exec", "uv run", "env FOO=1", "timeout 5",
                "sudo -u bob", "bash", "python3", "cd /src && npx", "nice -n 5 docker run"]
)  # fmt: skip
def test_a_preset_whose_arguments_would_pick_the_program_fails_at_start(tmp_path: Path, command: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[presets.build]\ncommand = "{command}"\nargs = "words"\n')
    with pytest.raises(ConfigError, match=r"presets\.build.*name the subcommand or script in the command"):
        load_settings(config, environ={})


@pytest.mark.parametrize(
    "command", ["make", "npm run build", "git log", "cargo test", "go test", "uv run pytest", "python3 -m pytest",
                "sh -c 'make \"$@\"' sh", "npx prettier --check"]
)  # fmt: skip
def test_a_preset_that_names_its_subcommand_takes_arguments(tmp_path: Path, command: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f"[presets.build]\ncommand = '''{command}'''\nargs = \"words\"\n")
    assert load_settings(config, environ={}).presets["build"].command == command
    config.write_text(f'[presets.build]\ncommand = "{command.split()[0]}"\n')  # no arguments: any command
    assert load_settings(config, environ={}).presets["build"].args == "none"


def test_a_bad_argument_rule_fails_at_start(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[presets.build]\ncommand = "make"\nargs = "("\n')
    with pytest.raises(ConfigError, match=r"presets\.build\.args"):
        load_settings(config, environ={})
