"""TLS for `websockets`' sync client that two threads may use at once: the blocking client's wss://.

Why: websockets' sync client reads its socket in a background thread while the caller's thread
writes to it (`send`, a ping, the opening request). Over an `ssl.SSLSocket` that is SSL_read and
SSL_write on one SSL object at the same time, which OpenSSL forbids: under CPU load about one
opening handshake in 250 hung until the open timeout (0 in 1,800 with this transport; commit
fcb6f44, when the tests first worked around it). The asyncio client is not affected: asyncio's TLS
runs in the loop's one thread.

Theory of operation: the TLS state is an `ssl.SSLObject` over two memory BIOs, touched only under
`_lock`, and socket I/O happens outside that lock, so a reader waiting for the network never holds
up a writer. Ciphertext leaves in the order OpenSSL made it: whoever drains the outgoing BIO holds
`_send_lock` until those bytes are sent (websockets itself holds its protocol mutex across a
send, so this adds no wait it did not have). `recv` decrypts every complete record it has read
before it returns: plaintext left in the SSLObject would be invisible to the selector websockets
waits on. What stays in the incoming BIO is at most an incomplete record, whose rest is still on
its way to the socket.

`connect` is websockets' `connect` with this transport for wss:// URLs; ws:// passes through.
"""

from __future__ import annotations

import socket
import ssl as ssl_module
import threading
import time
import urllib.parse
from typing import Any, Literal, cast, overload

from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect
from websockets.uri import parse_uri

__all__ = ["ThreadSafeTls", "connect"]

# Ciphertext per socket read; websockets asks for 64 KiB of plaintext at a time.
_RECV_SIZE = 1 << 16


def _remaining(deadline: float | None) -> float | None:
    """Seconds left until `deadline` (None: no limit); `TimeoutError` once it has passed, as a
    timeout of 0 would make the socket non-blocking instead."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out opening the connection")
    return left


class ThreadSafeTls:
    """A TLS client connection over a connected TCP `sock`, with the socket methods websockets'
    sync client uses (`recv`, `sendall`, `shutdown`, `close`, `settimeout`, `setsockopt`,
    `fileno` for its selector, `family`, `getsockname`, `getpeername`) and the TLS facts callers
    ask for (`version`, `cipher`, `getpeercert`).

    The handshake runs in the constructor within `timeout` s (None: no limit); the socket is
    blocking afterwards. Nothing else is forwarded to the raw socket: a plaintext `send` by
    mistake fails with `AttributeError` instead of bypassing TLS.
    """

    def __init__(
        self,
        sock: socket.socket,
        context: ssl_module.SSLContext,
        server_hostname: str | None,
        timeout: float | None,
    ) -> None:
        self._sock = sock
        self.family = sock.family
        self._incoming = ssl_module.MemoryBIO()
        self._outgoing = ssl_module.MemoryBIO()
        self._tls = context.wrap_bio(
            self._incoming, self._outgoing, server_hostname=server_hostname
        )
        self._lock = threading.Lock()  # the SSLObject and its two BIOs
        self._send_lock = threading.Lock()  # held from draining the outgoing BIO to the send
        self._handshake(None if timeout is None else time.monotonic() + timeout)

    def _handshake(self, deadline: float | None) -> None:
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl_module.SSLWantReadError:
                pass
            self._sock.settimeout(_remaining(deadline))
            self._flush()
            data = self._sock.recv(_RECV_SIZE)
            if not data:
                raise ConnectionResetError(
                    "the server closed the connection during the TLS handshake"
                )
            self._incoming.write(data)
        self._flush()  # the client's Finished
        self._sock.settimeout(None)

    def _flush(self) -> None:
        """Send what OpenSSL wrote on its own (handshake messages, a KeyUpdate's answer)."""
        with self._send_lock:
            with self._lock:
                data = self._outgoing.read()
            if data:
                self._sock.sendall(data)

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt `data` and send all of it; frames from two threads never interleave records."""
        if not data:
            return  # as socket.sendall; OpenSSL has no empty write
        with self._send_lock:
            with self._lock:
                self._tls.write(data)  # whole: a memory BIO never refuses bytes
                ciphertext = self._outgoing.read()
            self._sock.sendall(ciphertext)

    def recv(self, bufsize: int) -> bytes:
        """The plaintext of every complete record read so far, b"" at the end of the stream.

        Reads at most `bufsize` bytes of ciphertext per socket read; the plaintext returned can
        exceed `bufsize` by the rest of a record that a previous read left incomplete.
        """
        while True:
            chunks: list[bytes] = []
            ended = False
            with self._lock:
                try:
                    while chunk := self._tls.read(_RECV_SIZE):
                        chunks.append(chunk)
                    ended = True  # read() returns b"" once the peer's close_notify is in
                except ssl_module.SSLWantReadError:
                    pass  # no complete record left
                except ssl_module.SSLZeroReturnError:
                    ended = True
                answer = self._outgoing.pending
            if answer:
                self._flush()
            if chunks or ended:
                return b"".join(chunks)
            data = self._sock.recv(bufsize)
            if not data:
                return b""  # TCP EOF without close_notify: websockets ends the connection anyway
            with self._lock:
                self._incoming.write(data)

    def version(self) -> str | None:
        return self._tls.version()

    def cipher(self) -> tuple[str, str, int] | None:
        return self._tls.cipher()

    @overload
    def getpeercert(self, binary_form: Literal[False] = ...) -> dict[str, Any] | None: ...
    @overload
    def getpeercert(self, binary_form: Literal[True]) -> bytes | None: ...
    def getpeercert(self, binary_form: bool = False) -> dict[str, Any] | bytes | None:
        return self._tls.getpeercert(binary_form)

    def fileno(self) -> int:
        return self._sock.fileno()

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def setsockopt(self, level: int, option: int, value: int | bytes) -> None:
        self._sock.setsockopt(level, option, value)

    def shutdown(self, how: int) -> None:
        self._sock.shutdown(how)

    def close(self) -> None:
        self._sock.close()

    def getsockname(self) -> Any:
        return self._sock.getsockname()

    def getpeername(self) -> Any:
        return self._sock.getpeername()


def connect(
    uri: str,
    *,
    ssl: ssl_module.SSLContext | None = None,
    sock: socket.socket | None = None,
    server_hostname: str | None = None,
    open_timeout: float | None = 10,
    **kwargs: Any,
) -> ClientConnection:
    """`websockets.sync.client.connect(uri, legacy=True, ...)`, over a `ThreadSafeTls` for wss://.

    The caller owns the returned connection (close it, or use it in a `with`). For wss:// the TCP
    connection (unless `sock` is given), the TLS handshake with `ssl` (None: the system's CAs) for
    `server_hostname` (None: the URI's host) and the WebSocket handshake share `open_timeout`, as
    in websockets. websockets is then given the open TLS connection and the URI as ws://, which
    yields the same request and Host header. Given a socket, websockets follows no redirect and
    ignores the options that open one (`proxy`, `source_address`: pass `sock` instead). Other
    keyword arguments go to websockets' `connect`.
    """
    ws_uri = parse_uri(uri)
    if not ws_uri.secure:
        return ws_connect(
            uri,
            ssl=ssl,
            sock=sock,
            server_hostname=server_hostname,
            open_timeout=open_timeout,
            legacy=True,
            **kwargs,
        )
    deadline = None if open_timeout is None else time.monotonic() + open_timeout
    if sock is None:
        sock = socket.create_connection((ws_uri.host, ws_uri.port), timeout=open_timeout)
    parts = urllib.parse.urlsplit(uri)
    # Host leaves out wss's default port, as websockets writes it; ws:// would add ":443".
    plain = parts._replace(scheme="ws", netloc=parts.netloc.removesuffix(":443")).geturl()
    try:
        if sock.family in {socket.AF_INET, socket.AF_INET6}:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)  # as websockets does
        tls = ThreadSafeTls(
            sock,
            ssl or ssl_module.create_default_context(),
            server_hostname or ws_uri.host,
            _remaining(deadline),
        )
        return ws_connect(
            plain,
            # A socket-like object; websockets casts its own TLS-in-TLS wrapper the same way.
            sock=cast(socket.socket, tls),
            open_timeout=_remaining(deadline),
            legacy=True,
            **kwargs,
        )
    except BaseException:
        sock.close()  # websockets closes what it was given too; a second close does nothing
        raise
