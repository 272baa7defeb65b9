"""The two places Offload reaches under the MCP SDK's public surface (mcp 2.3), kept here so an SDK
change breaks one module, loudly (tests/test_notify.py checks both), not a feature quietly.

- The SDK gives a request handler the per-request `ServerSession`; the connection it belongs to is
  private, yet a `resources/subscribe` must be remembered per connection (each request has its own
  session object) and answered later on that connection's standalone stream.
- `MCPServer` has no decorator for `resources/subscribe`; the handlers go on its low-level server.
- The streamable HTTP session manager does not say how many sessions one principal holds, which a
  per-owner cap needs (it keeps each session's principal, for its own owner check).
"""

from __future__ import annotations

from typing import Any

from mcp.server.connection import Connection
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.mcpserver import MCPServer
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager


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


def sessions_held(manager: StreamableHTTPSessionManager, client_id: str) -> int:
    """Open streamable HTTP sessions opened by the principal `client_id` (our owner name)."""
    owners = getattr(manager, "_session_owners", None)
    live = getattr(manager, "_server_instances", None)
    if not isinstance(owners, dict) or not isinstance(live, dict):
        raise SDKChangedError("StreamableHTTPSessionManager._session_owners / _server_instances")
    return sum(1 for session, who in owners.items() if session in live and who.get("client_id") == client_id)
