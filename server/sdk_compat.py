"""The two places Offload reaches under the MCP SDK's public surface (mcp 2.3), kept here so an SDK
change breaks one module, loudly (tests/test_notify.py checks both), not a feature quietly.

- The SDK gives a request handler the per-request `ServerSession`; the connection it belongs to is
  private, yet a `resources/subscribe` must be remembered per connection (each request has its own
  session object) and answered later on that connection's standalone stream.
- `MCPServer` has no decorator for `resources/subscribe`; the handlers go on its low-level server.
"""

from __future__ import annotations

from typing import Any

from mcp.server.connection import Connection
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.mcpserver import MCPServer


class SDKChangedError(RuntimeError):
    def __init__(self, what: str) -> None:
        super().__init__(f"the MCP SDK no longer has {what}; update server/sdk_compat.py for this SDK version")


def connection_of(ctx: ServerRequestContext[Any, Any]) -> Connection:
    connection = getattr(ctx.session, "_connection", None)
    if not isinstance(connection, Connection):
        raise SDKChangedError("ServerSession._connection")
    return connection


def lowlevel_of(server: MCPServer) -> Server[Any]:
    lowlevel = getattr(server, "_lowlevel_server", None)
    if not isinstance(lowlevel, Server):
        raise SDKChangedError("MCPServer._lowlevel_server")
    return lowlevel
