"""Offload: an MCP server that runs slow tools in the background."""

import sys

__version__ = "0.1.0"

WINDOWS_MESSAGE = (
    "offload-mcp runs on Linux and macOS, not on Windows (it relies on POSIX process groups, signals and file "
    "locks). Run it inside WSL (Windows Subsystem for Linux), where it works as on Linux.\n"
)

if sys.platform == "win32":  # before anything imports fcntl: a plain message, not an ImportError
    sys.stderr.write(WINDOWS_MESSAGE)
    raise SystemExit(1)
