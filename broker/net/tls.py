"""TLS terminated in the epoll loop: a `Connection` whose socket bytes pass through an SSLObject.

Theory of operation. Each connection gets an `ssl.SSLObject` over two `MemoryBIO`s
(`SSLContext.wrap_bio`), and does its own socket I/O around it:

    recv  -> incoming BIO -> SSLObject.read until SSLWantReadError -> Connection._received
    out   -> SSLObject.write (whole, into the outgoing BIO) -> `cipher` -> one send per flush

Why SSLObject rather than a non-blocking SSLSocket:

* Nothing is stranded. One bounded `recv` per wake-up (the loop is level-triggered, see
  loop.py) is fed to the incoming BIO and then *all* of it is decrypted, reading until
  SSLWantReadError. Plaintext never waits inside OpenSSL where epoll cannot see it (the
  `SSLSocket.pending()` trap): what is left in the BIO is an incomplete record, and its rest
  can only come from the socket, which epoll reports.
* Writes are never partial at the TLS level. SSL_write into a memory BIO always takes the
  whole buffer, so OpenSSL's retry-with-the-same-buffer rule (SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER)
  never comes into play; partial *socket* writes leave ciphertext in `cipher`, which we own and
  retry with, exactly like the plain path keeps the unsent tail of `out`.
* A TLS write can need a read (a handshake in progress). Renegotiation is refused
  (OP_NO_RENEGOTIATION; TLS 1.3 has none), but if `write` ever raises SSLWantReadError the
  frames stay in `out`, reading stays on, and the flush after the next read retries them.

Accounting: `queued` counts plaintext in `out` plus ciphertext in `cipher`, so the slow-consumer
and EPOLLOUT logic of `Connection` holds unchanged. The plain `Connection` pays nothing for
this module: TLS is a subclass chosen at accept time.

The TLS handshake runs in state HTTP with `http` still None, so it counts against
`--handshake-timeout` (the sweep closes a stalled one as `handshake_timeout`). A failed handshake
sends OpenSSL's alert, or, when the first bytes were a plain HTTP request, a plain-text
`400` saying the port speaks TLS (as nginx's 497 and Go's net/http do), then closes. Failures are
counted by reason (`broker_tls_handshake_failures_total`) and logged at debug level only: a
scanner must not be able to fill the log.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from typing import TYPE_CHECKING

from broker.errors import Closed
from broker.net.connection import CLOSED, DRAINING, OPEN, READING, Connection
from broker.wire.handshake import HttpExchange

if TYPE_CHECKING:
    from broker.server import Server

log = logging.getLogger("broker.tls")

# Sent in clear to a client that spoke plain HTTP to the TLS port.
_PLAIN_HTTP_BODY = b"This port speaks TLS only: use https:// or wss:// here.\n"
_PLAIN_HTTP_REPLY = b"".join(
    (
        b"HTTP/1.1 400 Bad Request\r\n",
        b"Content-Type: text/plain; charset=utf-8\r\n",
        b"Content-Length: %d\r\n" % len(_PLAIN_HTTP_BODY),
        b"Connection: close\r\n\r\n",
        _PLAIN_HTTP_BODY,
    )
)

# OpenSSL reason codes -> failure label (metrics.TLS_FAILURE_REASONS).
_PROTOCOL_REASONS = {
    "UNSUPPORTED_PROTOCOL",
    "WRONG_VERSION_NUMBER",
    "VERSION_TOO_LOW",
    "NO_SHARED_CIPHER",
    "NO_PROTOCOLS_AVAILABLE",
    "NO_SUITABLE_SIGNATURE_ALGORITHM",
    "NO_SHARED_GROUPS",
    "UNKNOWN_PROTOCOL",
}


class TlsSetupError(Exception):
    """The certificate or key cannot be used; the message names the file and the cause."""


def _no_password() -> str:
    raise ValueError("the private key is encrypted; give an unencrypted PEM key")


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context from PEM files; TlsSetupError if they cannot be used.

    Python's server default (`create_default_context(Purpose.CLIENT_AUTH)`) brings OpenSSL's
    default cipher list, no compression and server cipher preference; we pin TLS 1.2 as the
    minimum and refuse renegotiation. Client certificates are not asked for.
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    for path in (cert, key):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise TlsSetupError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        ctx.load_cert_chain(cert, key, password=_no_password)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise TlsSetupError(f"cannot use {cert} with key {key}: {exc}") from exc
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def failure_reason(exc: ssl.SSLError) -> str:
    """The metric label for a handshake that raised `exc`."""
    reason = exc.reason or ""
    if reason in ("HTTP_REQUEST", "HTTPS_PROXY_REQUEST"):
        return "plain_http"
    if reason in _PROTOCOL_REASONS:
        return "protocol"
    if reason.startswith(("TLSV1_ALERT_", "SSLV3_ALERT_", "TLSV13_ALERT_")):
        return "peer_alert"  # e.g. the client does not trust our certificate
    if isinstance(exc, ssl.SSLEOFError):
        return "eof"
    return "other"


class TlsConnection(Connection):
    __slots__ = ("cipher", "incoming", "outgoing", "tls", "tls_ready")

    def __init__(
        self, sock: socket.socket, server: Server, context: ssl.SSLContext, peer: str = ""
    ) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.tls_ready = False
        self.cipher: bytes | memoryview = b""  # ciphertext (or the plain 400) not yet sent
        super().__init__(sock, server, peer)
        self.http = None  # created once the TLS handshake is done

    # -- input ---------------------------------------------------------------------------------

    def on_readable(self) -> None:
        server = self.server
        try:
            data = server.reader.recv(self.sock)  # net/reads.py
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.abort(Closed.CLIENT_GONE)
            return
        n = len(data)
        server.stats.bytes_received += n
        if n == server.config.read_size:
            server.busy = True  # more is waiting (Connection.on_readable)
        if self.state >= DRAINING:  # DRAINING or LINGER: input is discarded until the EOF
            if not data:
                self.abort(Closed.CLIENT_GONE)
            return
        if not data:
            if self.tls_ready:
                self._received(b"")
            else:
                self.abort(Closed.CLIENT_GONE)
            return
        self.incoming.write(data)
        if not self.tls_ready and not self._handshake():
            return
        # Decrypt everything this recv brought: what stays in the BIO is an incomplete record.
        # Into the server's read buffer (net/reads.py), free again: `data` was a copy of it.
        read = self.tls.read
        reader = server.reader
        chunks = []
        eof = False
        try:
            while True:
                got: int = read(reader.size, reader.buf)  # type: ignore[assignment]  # a count
                if not got:  # the peer's close_notify
                    eof = True
                    break
                chunks.append(reader.view[:got].tobytes())
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
        except ssl.SSLError as exc:
            self._tls_error(exc)
            return
        if chunks:
            self._received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if eof and self.state < DRAINING:
            self._received(b"")
        if self.outgoing.pending and self.state != CLOSED:
            self.flush()  # TLS's own records: session tickets, a key update, alerts

    def _handshake(self) -> bool:
        """Advance the handshake with what the incoming BIO holds; True once it is done."""
        try:
            self.tls.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            if self.outgoing.pending:
                self.flush()  # our flight (ServerHello ... Finished)
            return False
        except ssl.SSLError as exc:
            self._handshake_failed(exc)
            return False
        self.tls_ready = True
        self.server.stats.tls_handshakes += 1
        self.http = HttpExchange(self.server.config.max_http_body)
        return True

    def _handshake_failed(self, exc: ssl.SSLError) -> None:
        reason = failure_reason(exc)
        self.server.stats.tls_failures[reason] += 1
        log.debug("TLS handshake failed fd=%d: %s", self.fd, exc)
        # OpenSSL's alert, or a plain-text 400 for a plain HTTP request; then close.
        self.cipher = _PLAIN_HTTP_REPLY if reason == "plain_http" else self.outgoing.read()
        self.queued = len(self.cipher)
        self.reason = Closed.TLS_ERROR
        Connection._drain(self)
        if self.state == DRAINING:
            self.flush()

    def _tls_error(self, exc: ssl.SSLError) -> None:
        """A bad record after the handshake: send OpenSSL's alert if it fits, then close."""
        log.debug("TLS error fd=%d: %s", self.fd, exc)
        alert = self.outgoing.read()
        if alert:
            with contextlib.suppress(OSError):
                self.sock.send(alert)
        self.reason = self.reason or Closed.TLS_ERROR
        self.abort(Closed.TLS_ERROR)

    # -- output --------------------------------------------------------------------------------

    def flush(self) -> None:
        """Encrypt `out` into the outgoing BIO, then one send of the ciphertext owed. A paced
        replay (`backlog`) goes first, as in the plain `Connection.flush`."""
        if self.backlog is not None and not self._flush_backlog():
            return
        if self.state == CLOSED:
            return
        out = self.out
        if out and self.tls_ready:
            data = out[0] if len(out) == 1 else b"".join(out)
            try:
                self.tls.write(data)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass  # a handshake in progress: `out` stays; the flush after the next read retries
            except ssl.SSLError as exc:
                self._tls_error(exc)
                return
            else:
                out.clear()
        pending = self.cipher
        if self.outgoing.pending:
            fresh = self.outgoing.read()
            pending = b"".join((pending, fresh)) if pending else fresh
        if not pending:
            if self.state == DRAINING and not out:
                self._linger()
            return
        sent = self._send(pending)
        if sent < 0:
            return
        if sent == len(pending):
            self.cipher = b""
            self.queued = sum(map(len, out))  # frames a write could not take yet, if any
            if not self.queued:
                if self.since:
                    self._caught_up()  # it had a backlog (may queue its conflated frames again)
                if self.mask == READING and self.state == OPEN:
                    return
                if self.state == DRAINING and not self.queued:
                    self._linger()
                    return
        else:
            rest = memoryview(pending)[sent:]
            self.cipher = rest
            self.queued = len(rest) + sum(map(len, out))
            self._backlogged()
        self.update_interest()

    def _flush_backlog(self) -> bool:
        """Encrypt the backlog's next chunk once the ciphertext owed is sent, and send; True
        once the backlog is all sent (then `out` may go)."""
        if self.state == CLOSED:
            return False
        if not self.cipher and not self.outgoing.pending:
            try:
                self.tls.write(self._backlog_chunk())
            except ssl.SSLError as exc:  # no renegotiation, so no WantRead after the handshake
                self._tls_error(exc)
                return False
        pending = self.cipher
        if self.outgoing.pending:
            fresh = self.outgoing.read()
            pending = b"".join((pending, fresh)) if pending else fresh
        sent = self._send(pending)
        if sent < 0:
            return False
        self.cipher = memoryview(pending)[sent:] if sent < len(pending) else b""
        self.queued = sum(map(len, self.out))  # the replay in `cipher` is not lag
        if not self.cipher and not self.backlog:
            self.backlog = None
            if self.out:
                return True
            if self.state == DRAINING:
                self._linger()
                return False
        self.update_interest()
        return False

    # -- closing -------------------------------------------------------------------------------

    def _drain(self) -> None:
        """Encrypt what `out` holds and append our close_notify, then drain as plain does."""
        self._merge_backlog()  # a pending replay goes before our close_notify
        if self.tls_ready and self.state < DRAINING:
            out = self.out
            try:
                if out:
                    self.tls.write(out[0] if len(out) == 1 else b"".join(out))
                    out.clear()
                self.tls.unwrap()  # writes close_notify; we do not wait for the peer's
            except ssl.SSLError:
                pass  # WantRead from unwrap is the expected outcome
            if self.outgoing.pending:
                fresh = self.outgoing.read()
                self.cipher = b"".join((self.cipher, fresh)) if self.cipher else fresh
            self.queued = len(self.cipher) + sum(map(len, out))
        super()._drain()
        if self.state == DRAINING:
            self.flush()

    def abort(self, reason: Closed) -> None:
        if self.state != CLOSED and not self.tls_ready:
            if reason is Closed.HANDSHAKE_TIMEOUT:
                self.server.stats.tls_failures["timeout"] += 1
            elif reason is Closed.CLIENT_GONE and self.reason is None:
                self.server.stats.tls_failures["eof"] += 1
        super().abort(reason)
        self.cipher = b""
