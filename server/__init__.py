"""Offload: an MCP server that runs slow tools in the background."""

__version__ = "0.1.0"
