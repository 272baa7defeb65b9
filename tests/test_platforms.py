"""Platforms Offload does not run on say so plainly at start."""

from __future__ import annotations

import subprocess
import sys

import pytest

from server import WINDOWS_MESSAGE


@pytest.mark.parametrize(
    "start",
    [
        "import server.cli; server.cli.main()",  # the `offload-mcp` entry point
        "import runpy; runpy.run_module('server', run_name='__main__')",  # python -m server
        "import runpy; runpy.run_module('server.capture', run_name='__main__')",  # a detached command's parent
    ],
)
def test_windows_gets_a_clear_exit_not_an_import_error(start: str) -> None:
    code = f"import sys; sys.platform = 'win32'; {start}"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 1
    assert done.stderr == WINDOWS_MESSAGE
    assert "WSL" in done.stderr and "Traceback" not in done.stderr
