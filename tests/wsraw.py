"""A raw-socket WebSocket client that reads like RFC 6455, for conformance tests.

It can send what a correct client never would (unmasked frames, reserved bits, bad UTF-8,
interleaved fragments), so the tests see exactly what the broker answers.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import time
from typing import Any

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def encode_frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    mask: bool = True,
    rsv: int = 0,
    key: bytes | None = None,
    wide: bool = False,
) -> bytes:
    """One client frame. `key` fixes the masking key (else random); `wide` writes the length in
    the 64-bit form whatever it is (not minimal: RFC 6455 section 5.2 says MUST be minimal)."""
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    n = len(payload)
    mask_bit = 0x80 if mask else 0
    if wide or n >= 65536:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", n)
    elif n < 126:
        head += bytes([mask_bit | n])
    else:
        head += bytes([mask_bit | 126]) + struct.pack("!H", n)
    if not mask:
        return head + payload
    key = os.urandom(4) if key is None else key
    return head + key + apply_mask(payload, key)


def apply_mask(payload: bytes, key: bytes) -> bytes:
    """XOR with the 4-byte key repeated (section 5.3), as one big-integer operation."""
    n = len(payload)
    if not n:
        return b""
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload) ^ int.from_bytes(stream)).to_bytes(n)


class RawWs:
    def __init__(
        self,
        port: int,
        *,
        subprotocol: str | None = None,
        timeout: float = 5.0,
        rcvbuf: int | None = None,
    ):
        """Connect and complete the handshake. `rcvbuf` shrinks the receive window before the
        connection exists (a client that stops reading then stalls the broker quickly)."""
        self.sock = socket.socket()
        self.sock.settimeout(timeout)
        # Each frame leaves when sent, as from a browser: with Nagle, a small frame written behind
        # unacknowledged bulk waits for the peer's delayed ACK (~40 ms a round trip on loopback).
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.buf = b""
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            "GET /ws HTTP/1.1",
            f"Host: 127.0.0.1:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
        if subprotocol:
            lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
        try:
            self.sock.connect(("127.0.0.1", port))
            self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            head = self._read_until(b"\r\n\r\n")
        except OSError:
            self.sock.close()
            raise
        self.status = int(head.split(b" ", 2)[1])
        self.headers = head.decode()
        assert self.status == 101, head

    @classmethod
    def adopt(cls, sock: socket.socket) -> RawWs:
        """Wrap a socket whose handshake the caller sent itself (e.g. pipelined)."""
        c = cls.__new__(cls)
        c.sock, c.buf = sock, b""
        return c

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed before " + repr(marker))
            self.buf += chunk
        head, self.buf = self.buf.split(marker, 1)
        return head

    def _read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed mid-frame")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def send_frame(self, opcode: int, payload: bytes = b"", **kw: Any) -> None:
        self.sock.sendall(encode_frame(opcode, payload, **kw))

    def send_json(self, value: Any) -> None:
        self.send_frame(OP_TEXT, json.dumps(value).encode())

    def recv_frame(self) -> tuple[int, bytes]:
        b0, b1 = self._read_exact(2)
        assert b1 & 0x80 == 0, "server frames must not be masked"
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._read_exact(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._read_exact(8))[0]
        assert b0 & 0x80, "the broker sends whole frames only"
        return b0 & 0x0F, self._read_exact(n)

    def recv_json(self) -> Any:
        op, payload = self.recv_frame()
        while op in (OP_PING, OP_PONG):
            op, payload = self.recv_frame()
        assert op == OP_TEXT, (op, payload)
        return json.loads(payload)

    def expect_close(self) -> tuple[int, str]:
        """Read frames until the server's close; returns (code, reason)."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            op, payload = self.recv_frame()
            if op == OP_CLOSE:
                if not payload:
                    return 1005, ""
                return struct.unpack("!H", payload[:2])[0], payload[2:].decode()
        raise AssertionError("no close frame")

    def at_eof(self, timeout: float = 5.0) -> bool:
        """True once the server has closed the TCP connection (after any leftover bytes)."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self.sock.close()


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode()
