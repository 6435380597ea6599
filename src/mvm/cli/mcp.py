"""``mvmctl mcp``: the MCP stdio server (mvm/mcp/server.py)."""

from __future__ import annotations

import click


@click.command(short_help="Serve sandboxes to an MCP client over stdio.")
def mcp() -> None:
    """Serve MCP on stdin/stdout: tools that run code in throwaway sandboxes.

    \b
    Limits (environment; a bad value is refused at start):
      MVM_MCP_MAX_INFLIGHT      tool calls at once (4); another gets a busy error
      MVM_MCP_MEM_CEILING_MIB   guest memory across its sandboxes (4096)
      MVM_MCP_SESSION_IDLE      seconds before an unused sandbox is destroyed (300)
      MVM_MCP_SESSION_MAX       each sandbox's lifetime in seconds (3600)
    Every sandbox it made is destroyed when the client disconnects.
    """
    from mvm.mcp.server import Limits, build_server

    build_server(Limits.from_environment()).run("stdio")


COMMANDS = [mcp]
