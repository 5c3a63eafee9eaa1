"""Real loopback TCP connections for tests that drive a broker's connections in this process:
the broker's end a `Connection` of a `Server` whose loop never runs (the `servers` fixture in
conftest.py), the peer a plain socket the test reads."""

from __future__ import annotations

import socket
import time

from broker.net.connection import OPEN, Connection
from broker.server import Server


class Pairs:
    """Loopback TCP connections: the broker's end a Connection of `server`, the peer a socket."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.peers: list[socket.socket] = []

    def open(
        self, cls: type[Connection] = Connection, small: bool = False
    ) -> tuple[Connection, socket.socket]:
        peer = socket.socket()
        self.peers.append(peer)
        if small:  # a 4 KiB window, and a send buffer that does not grow (SO_SNDBUF locks it)
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        peer.connect(self.listener.getsockname())
        sock, _ = self.listener.accept()
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if small:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        conn = cls(sock, self.server)
        conn.state = OPEN  # as after the upgrade
        conn.http = None
        return conn, peer

    def close(self) -> None:
        self.listener.close()
        for peer in self.peers:
            peer.close()


def fill(conn: Connection) -> int:
    """Write to the connection's socket until the kernel takes nothing more, even after a
    pause for late ACKs: the peer's window is shut and the send buffer full."""
    filled = 0
    for _ in range(20):
        took = 0
        while True:
            try:
                n = conn.sock.send(b"p" * 65536)
            except BlockingIOError:
                break
            took += n
        filled += took
        if not took and filled:
            return filled
        time.sleep(0.02)
    raise AssertionError("the peer's window never shut")


def read_exactly(peer: socket.socket, n: int) -> bytes:
    peer.settimeout(5)
    got = bytearray()
    while len(got) < n:
        chunk = peer.recv(min(n - len(got), 1 << 20))
        if not chunk:
            break
        got += chunk
    return bytes(got)


def after(peer: socket.socket) -> str:
    """What the peer finds once it has read what it was owed: nothing yet, EOF, or a reset."""
    peer.setblocking(False)
    try:
        extra = peer.recv(65536)
    except BlockingIOError:
        return "nothing"
    except ConnectionResetError:
        return "reset"
    return "eof" if not extra else f"{len(extra)} bytes more"
