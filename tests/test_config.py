"""Settings: precedence, units, and unknown keys rejected by name."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from server.config import Settings, load_settings
from server.errors import ConfigError


@pytest.fixture(autouse=True)
def no_user_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default config path must not reach the real user's file."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


def test_defaults_without_a_file(tmp_path: Path) -> None:
    settings = load_settings(None, environ={})
    assert settings.ttl_s == 1800 and settings.max_concurrency >= 1


def test_precedence_flags_over_env_over_file(tmp_path: Path) -> None:
    path = tmp_path / "offload.toml"
    path.write_text('max_concurrency = 3\nttl_s = 10\ndefault_timeout_s = 7\n[presets.build]\ncommand = "make"\n')
    settings = load_settings(
        path,
        environ={"OFFLOAD_TTL_S": "20", "OFFLOAD_DEFAULT_TIMEOUT_S": "8"},
        overrides={"default_timeout_s": 9, "max_concurrency": None},
    )
    assert (settings.max_concurrency, settings.ttl_s, settings.default_timeout_s) == (3, 20, 9)
    assert settings.shell_config().presets["build"].command == "make"


def test_unknown_key_in_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "offload.toml"
    path.write_text("max_concurency = 3\n")
    with pytest.raises(ConfigError, match="unknown setting 'max_concurency'"):
        load_settings(path, environ={})


def test_unknown_environment_setting_is_named() -> None:
    with pytest.raises(ConfigError, match="unknown environment setting OFFLOAD_TTL;"):
        load_settings(None, environ={"OFFLOAD_TTL": "5"})


def test_bad_value_names_key_and_value() -> None:
    with pytest.raises(ConfigError, match=r"max_concurrency = '0'"):
        load_settings(None, environ={"OFFLOAD_MAX_CONCURRENCY": "0"})


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml", environ={})


def test_shell_markers_from_environment_are_a_list() -> None:
    settings = load_settings(None, environ={"OFFLOAD_SHELL_PASS_ENV": "GH_TOKEN,NPM_TOKEN"})
    assert settings.shell_pass_env == ("GH_TOKEN", "NPM_TOKEN")


def test_the_readme_configuration_example_is_valid(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    example = re.search(r"```toml\n(max_concurrency.*?)```", readme, re.S)
    assert example is not None
    values = tomllib.loads(example.group(1))
    values["shell_roots"] = [str(tmp_path)]  # the example's ~/src need not exist here
    settings = Settings.model_validate(values)
    assert settings.shell_mode == "off" and settings.presets["build"].command == "npm run build"


@pytest.mark.parametrize("case", ["data dir inside a root", "a root inside another owner's root"])
def test_a_sandbox_refuses_to_hide_what_a_writable_root_contains(tmp_path: Path, case: str) -> None:
    """A command could rename the directory above a hidden path and find it unhidden next time."""
    home = tmp_path / "bob"
    (home / "team" / "alice").mkdir(parents=True)
    owners = {"alice": {"token_env": "A_TOKEN"}, "bob": {"token_env": "B_TOKEN", "shell_roots": [str(home)]}}
    if case == "data dir inside a root":
        (tmp_path / "alice").mkdir()
        owners["alice"]["shell_roots"] = [str(tmp_path / "alice")]  # type: ignore[assignment]
        config = {"data_dir": str(home / ".local" / "state" / "offload"), "owners": owners}
    else:
        owners["alice"]["shell_roots"] = [str(home / "team" / "alice")]  # type: ignore[assignment]
        config = {"data_dir": str(tmp_path / "data"), "owners": owners}
    with pytest.raises(ConfigError, match=r"owner bob: .* lies inside its writable shell root"):
        Settings.model_validate({**config, "shell_sandbox": "bwrap"})
