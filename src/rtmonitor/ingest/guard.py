"""Bearer-token checks for gRPC receivers: once per RPC, before any message is read.

Health and reflection are other services and are never checked (probes stay open)."""

from __future__ import annotations

from typing import Any

import grpc

from rtmonitor.auth import AuthError, Principal, Scope, TokenRegistry, require

SURFACE = "grpc"


def peer_host(peer: str) -> str:
    """A client's address without its port ("ipv4:10.0.0.7:53211" -> "ipv4:10.0.0.7",
    "ipv6:[::1]:53211" -> "ipv6:[::1]"): every connection of one host is one peer."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rpartition(":")[0]
    return peer  # unix sockets and anything else: as given


def authorization(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The call's `authorization` metadata value, if any."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else None
    return None


async def authorize(
    context: grpc.aio.ServicerContext[Any, Any],
    registry: TokenRegistry,
    scope: Scope = "ingest",
    surface: str = SURFACE,
) -> Principal:
    """The caller's token, if it has `scope`; else the refusal is counted and logged and
    the call ends UNAUTHENTICATED (no valid token) or PERMISSION_DENIED (lacks the scope)."""
    try:
        principal = registry.authenticate(authorization(context))
        require(principal, scope)
    except AuthError as exc:
        registry.refuse(surface, peer_host(context.peer() or ""), exc)
        code = (
            grpc.StatusCode.UNAUTHENTICATED
            if exc.status == "unauthenticated"
            else grpc.StatusCode.PERMISSION_DENIED
        )
        await context.abort(code, exc.message)
    return principal
