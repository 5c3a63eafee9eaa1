"""Cutting a client's TCP connection from the client side, the way networks do: an RST (SO_LINGER
with a zero timeout, then close: the kernel resets instead of the FIN handshake) or a clean FIN
(shutdown), under the library's feet. The client sees its connection drop and must reconnect."""

from __future__ import annotations

import socket
import struct

from broker_client import AsyncClient, Client

_LINGER_ZERO = struct.pack("ii", 1, 0)


def cut(client: AsyncClient | Client, *, rst: bool) -> bool:
    """Cut the client's current connection; False when it has none right now."""
    ws = client._ws
    if ws is None:
        return False
    if isinstance(client, AsyncClient):
        transport = ws.transport  # type: ignore[union-attr]
        sock: socket.socket = transport.get_extra_info("socket")
        if sock is None:
            return False
        if rst:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
            transport.abort()  # closes the socket now: with linger 0 that is an RST
        else:
            sock.shutdown(socket.SHUT_WR)  # FIN; the broker closes its side, the client reads EOF
        return True
    sock = ws.socket  # type: ignore[union-attr]
    try:
        if rst:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
            # Wake the reader thread (EOF); its close of the socket then sends the RST.
            sock.shutdown(socket.SHUT_RD)
        else:
            sock.shutdown(socket.SHUT_WR)
    except OSError:
        return False  # already closed under us
    return True
