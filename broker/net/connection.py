"""One client connection: socket I/O and the life cycle from HTTP request to closed socket.

Data flows one way: `recv` -> HTTP exchange (wire.handshake) or WebSocket frames (wire.inbound,
parsed straight out of the received bytes, a batch per `recv`) -> requests (router) -> outbound
buffer (`out`) -> `flush` (one `send` per iteration).

At rest an open connection holds no protocol object: the frame parser is a function, and what a
connection keeps between reads is only `rx` (the bytes of an unfinished frame, usually b"") and
`partial` (a fragmented message in progress, usually None).

Life cycle (`state`):

    HTTP      parsing HTTP requests; `/ws` upgrades to OPEN, other paths are answered here
    OPEN      WebSocket open: messages are requests, deliveries are queued
    CLOSING   we sent a close frame and wait for the peer's (shutdown, RFC 6455 section 7.1.2)
    DRAINING  nothing more is read or queued; `out` is flushed, then LINGER
    LINGER    our side is shut down (FIN sent); input is read and discarded until the peer's
              EOF, so that closing never sends an RST that could destroy our last frames
    CLOSED    unregistered and closed; counted once, with the first reason recorded

Every state but CLOSED has a deadline enforced by the server's sweep. Reading is paused (EPOLLIN
dropped) while `out` is over the high-water mark, so a client that does not read cannot make the
broker buffer replies for it without bound.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from broker.errors import Closed, HandshakeError
from broker.metrics import Stats
from broker.pubsub.http_api import Deferred, Response
from broker.pubsub.session import Session
from broker.speedups import load
from broker.wire.handshake import HttpExchange, HttpRequest, check_upgrade
from broker.wire.inbound import Message, PeerClose, close_frame, parse

if TYPE_CHECKING:
    from broker.server import Server

HTTP, OPEN, CLOSING, DRAINING, LINGER, CLOSED = range(6)

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLRDHUP = select.EPOLLRDHUP
READ_EVENTS = EPOLLIN | select.EPOLLPRI | select.EPOLLHUP | select.EPOLLERR | EPOLLRDHUP
READING = EPOLLIN | EPOLLRDHUP  # the mask of an open connection with nothing pending

# A frame violation (wire.inbound.Violation) carries the RFC close code to send.
_VIOLATIONS = {1007: Closed.INVALID_UTF8, 1009: Closed.TOO_LARGE}
NO_STATUS = 1005  # "no status code was present" (section 7.4.1): never sent on the wire
_CLOSE = ((b"connection", b"close"),)


class Connection(Session):
    __slots__ = (
        "connected",
        "counted",
        "deadline",
        "fd",
        "http",
        "last_rx",
        "mask",
        "partial",
        "peer",
        "pinged",
        "reason",
        "rx",
        "rx_need",
        "server",
        "sock",
        "state",
        "token",
    )

    def __init__(self, sock: socket.socket, server: Server, peer: str = "") -> None:
        super().__init__()
        now = server.loop.now
        self.sock = sock
        self.peer = peer  # the client's address key (perimeter.client_key), shared per address
        self.counted = False  # holds a place in its address's count (Server.admit)
        self.fd = sock.fileno()
        self.server = server
        self.state = HTTP
        self.http: HttpExchange | None = HttpExchange(server.config.max_http_body)
        self.mask = READING
        self.last_rx = now
        self.connected: float = now  # loop time of the accept (the same float object as last_rx's)
        self.pinged = False
        self.deadline = now + server.config.handshake_timeout
        self.partial: Message | None = None  # a fragmented message being reassembled
        self.rx: bytes | bytearray = b""  # the start of an unfinished frame
        self.rx_need = 0  # bytes `rx` must reach before that frame can be complete (0: unknown)
        self.reason: Closed | None = None
        self.token = server.loop.register(self.fd, self, self.mask)

    # -- events --------------------------------------------------------------------------------

    def on_event(self, mask: int) -> None:
        try:
            if mask & READ_EVENTS:
                self.on_readable()
            if mask & EPOLLOUT and self.state != CLOSED:
                self.flush()
        except Exception as exc:
            # A bug serving this connection must not reach the loop: close this one (1011).
            self.server.internal_error(self, exc)

    def on_readable(self) -> None:
        server = self.server
        reader = server.reader  # net/reads.py: recv(256 KiB) would allocate 256 KiB per read
        try:
            n = self.sock.recv_into(reader.buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.abort(Closed.CLIENT_GONE)
            return
        server.stats.bytes_received += n
        if n == reader.size:
            server.busy = True  # more is waiting: the loop may write deliveries together
        self._received(reader.view[:n].tobytes())

    def _received(self, data: bytes) -> None:
        """Bytes from the peer (after TLS, if any); b"" is its EOF."""
        state = self.state
        if state in (OPEN, CLOSING):
            if not data:
                self.abort(Closed.CLIENT_GONE)
                return
            self.last_rx = self.server.loop.now
            self.pinged = False
            self._frames(data)
        elif state == HTTP:
            self._http_data(data)
        elif not data:  # DRAINING or LINGER: the peer is done too
            self.abort(Closed.CLIENT_GONE)

    # -- WebSocket -----------------------------------------------------------------------------

    def _frames(self, data: bytes) -> None:
        """Parse every complete frame in `rx` + `data` and run them in order, as one batch."""
        rx = self.rx
        if rx:
            if len(rx) + len(data) < self.rx_need:
                # A frame still short of its announced length: collect without parsing (a
                # bytearray, so a message trickled in small reads is not copied again each time).
                if type(rx) is bytes:
                    rx = self.rx = bytearray(rx)
                rx += data
                return
            data = rx + data if type(rx) is bytes else bytes(rx + data)
            self.rx = b""
        events: list[Any] = []
        used, need, self.partial, end = parse(
            data, self.partial, self.server.config.max_message_size, events
        )
        if end is None and used < len(data):
            self.rx = data[used:]
            self.rx_need = need
        if events:
            if self.state == OPEN:
                server = self.server
                server.router.handle_batch(self, events, server.lone_read())
            # else CLOSING: the peer's last messages are discarded, and no more pongs (7.1.2)
            if self.state >= DRAINING:
                return
        if end is not None:
            if type(end) is PeerClose:
                self._on_close_frame(end.code)
            else:
                self.partial = None
                reason = _VIOLATIONS.get(end.code, Closed.PROTOCOL_ERROR)
                if self.state == OPEN:
                    self.close(reason, end.reason)
                else:  # a violation while we wait for the peer's close: stop waiting
                    self.reason = self.reason or reason
                    self._drain()

    def _on_close_frame(self, code: int) -> None:
        if self.state == OPEN:
            # The peer started the close: echo its code (section 5.5.1), 1000 if it sent none.
            self.queue(close_frame(1000 if code == NO_STATUS else code, ""))
            self.reason = self.reason or Closed.CLIENT_CLOSE
        self._drain()  # CLOSING: the peer answered our close

    # -- HTTP ----------------------------------------------------------------------------------

    def _http_data(self, data: bytes) -> None:
        http = self.http
        assert http is not None
        was_idle = http.idle  # between requests: an EOF now is a normal keep-alive close
        if http.waiting:
            # A response still owed (the backplane answers later): h11 keeps the bytes.
            http.receive(data)
            if data:
                return
        elif not self._serve_http(http, data):
            return
        if not data:  # EOF: finish writing what we owe, then close
            reason = Closed.HTTP_DONE if was_idle else Closed.CLIENT_GONE
            if self.out:
                self.reason = reason
                self._drain()
            else:
                self.abort(reason)

    def _serve_http(self, http: HttpExchange, data: bytes | None) -> bool:
        """Feed `data` (None: nothing new) and answer every complete request; False once the
        connection is done with HTTP (upgraded, closing, or waiting for a deferred answer)."""
        server = self.server
        try:
            req = http.next_request() if data is None else http.receive(data)
            while req is not None:
                if req.path == "/ws":
                    self._upgrade(http, req)
                    return False
                try:
                    resp = server.api.handle(req)
                except Exception as exc:  # a bug: answer 500 and close this connection only
                    server.report_bug(self, exc)
                    self.queue(http.respond(500, b"internal error\n", headers=_CLOSE))
                    self.reason = Closed.INTERNAL_ERROR
                    self._drain()
                    return False
                if type(resp) is Deferred:
                    if resp.response is None:
                        http.waiting = True
                        resp.callback = self._answer_later(http)
                        return False
                    resp = resp.response
                assert type(resp) is Response
                self.queue(http.respond(resp.status, resp.body, resp.content_type, resp.headers))
                if not http.next_cycle():
                    self.reason = Closed.HTTP_DONE
                    self._drain()
                    return False
                self.deadline = server.loop.now + server.config.handshake_timeout
                req = http.next_request()
        except HandshakeError as exc:
            body = (exc.message + "\n").encode()
            self.queue(http.respond(exc.status, body, headers=(*exc.headers, *_CLOSE)))
            self.reason = Closed.BAD_HANDSHAKE
            self._drain()
            return False
        return True

    def _answer_later(self, http: HttpExchange) -> Callable[[Response], None]:
        token = self.token
        return lambda resp: self._deferred(token, http, resp)

    def _deferred(self, token: int, http: HttpExchange, resp: Response) -> None:
        """The backplane answered a request of this connection: write it, go on serving."""
        http.waiting = False
        if self.state != HTTP or self.http is not http or self.token != token:
            return
        try:
            self.queue(http.respond(resp.status, resp.body, resp.content_type, resp.headers))
            if not http.next_cycle():
                self.reason = Closed.HTTP_DONE
                self._drain()
                return
            self.deadline = self.server.loop.now + self.server.config.handshake_timeout
            self._serve_http(http, None)
        except Exception as exc:
            self.server.internal_error(self, exc)

    def _upgrade(self, http: HttpExchange, req: HttpRequest) -> None:
        # The perimeter (429/503/403), the upgrade's own validity (400/426), then the token (401),
        # then the 101.
        self.server.admit(self, req)
        checked = check_upgrade(req)
        grant = self.server.authenticate(req)
        upgrade = http.accept_upgrade(req, checked, self.server.upgrade_headers)
        if grant is not None:
            self.grant = grant
            self.server.schedule_expiry(self)
        self.queue(upgrade.response)
        self.http = None  # the h11 state is no longer needed, and frames need no object
        self.encoding = upgrade.encoding
        self.state = OPEN
        self.last_rx = self.server.loop.now
        if upgrade.trailing_data:
            self._frames(upgrade.trailing_data)

    # -- output --------------------------------------------------------------------------------

    def queue(self, frame: bytes) -> None:
        self.server.router.reply(self, frame)

    def flush(self) -> None:
        """Write what `out` holds with one send; arm EPOLLOUT for the rest. A paced replay
        (`backlog`) goes first, one chunk per call, and `out` waits until it is written.
        (At the end of an iteration `flush_all` does the common case of this itself.)"""
        if self.backlog is not None and not self._flush_backlog():
            return
        out = self.out
        if not out or self.state == CLOSED:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        sent = self._send(data)
        if sent >= 0:
            self._sent(data, sent)

    def _sent(self, data: bytes | memoryview, sent: int) -> None:
        """`sent` bytes of `data` (all of `out`) were written: keep the rest, update interest."""
        out = self.out
        if sent == len(data):
            out.clear()
            self.queued = 0
            if self.since:
                self._caught_up()  # it had a backlog (may queue its conflated frames again)
            if self.mask == READING and self.state == OPEN:
                return  # the steady state: nothing to change (the common case, kept cheap)
            if self.state == DRAINING and not self.queued:
                self._linger()
                return
        else:
            # Keep the unsent tail as a view: no copy now, and the next join copies it once.
            rest = memoryview(data)[sent:]
            out[:] = [rest]
            self.queued = len(rest)
            self._backlogged()
        self.update_interest()

    def _send(self, data: bytes | memoryview) -> int:
        """One `send`; the bytes taken, or -1 after closing a connection whose socket failed."""
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.abort(Closed.CLIENT_GONE)
            return -1
        stats = self.server.stats
        stats.sends += 1
        stats.bytes_sent += sent
        return sent

    def _backlog_chunk(self) -> bytes | memoryview:
        """The next frames of the backlog, about a high-water mark's worth (at least 64 KiB)."""
        return self.next_chunk(max(self.server.config.outbound_high_water, 1 << 16))

    def _flush_backlog(self) -> bool:
        """Write the next chunk of the backlog; True once it is all written (`out` may go)."""
        if self.state == CLOSED:
            return False
        data = self._backlog_chunk()
        sent = self._send(data)
        if sent < 0:
            return False
        backlog = self.backlog
        assert backlog is not None
        if sent < len(data):
            backlog.appendleft(memoryview(data)[sent:])
        elif not backlog:
            self.backlog = None
            if self.out:
                return True
            if self.state == DRAINING:
                self._linger()
                return False
        self.update_interest()
        return False

    def _backlogged(self) -> None:
        """A flush left bytes unsent (plain and TLS): stamp the backlog's start, leave the slow
        state below half the mark, and queue conflated frames once under the mark."""
        server = self.server
        server.stats.timed_flushes += 1
        if not self.since:
            self.since = server.loop.now
        high_water = server.config.outbound_high_water
        if self.slow and self.queued <= high_water // 2:
            self.slow = 0
        if self.conflated is not None and self.queued <= high_water:
            self._release()

    def _caught_up(self) -> None:
        """A flush emptied a buffer that had a backlog: record its age, or queue the conflated
        frames it holds (the backlog goes on: they waited too)."""
        server = self.server
        if self.conflated is not None:
            self._release()
            if self.queued:
                self.update_interest()
                return
        stats = server.stats
        stats.timed_flushes += 1
        stats.record_queue_age(server.loop.now - self.since)
        self.since = 0.0
        self.slow = 0

    def _release(self) -> None:
        if self.state == OPEN:
            self.server.router.release(self)
        else:
            self.conflated = None

    def update_interest(self) -> None:
        """Ask epoll for what this state needs; `modify` only when it changed. Reading waits
        while a backlog is pending: the client's next requests wait until it has its replay."""
        state = self.state
        want = EPOLLRDHUP
        if (
            state != DRAINING
            and self.queued <= self.server.config.outbound_high_water
            and self.backlog is None
        ):
            want |= EPOLLIN
        if self.queued or self.backlog:  # `out`, ciphertext a TlsConnection holds, a replay
            want |= EPOLLOUT
        if want != self.mask:
            if want & EPOLLOUT and not self.mask & EPOLLOUT:
                self.server.stats.backpressure += 1
            self.mask = want
            self.server.loop.modify(self.fd, want)

    # -- closing -------------------------------------------------------------------------------

    def close(self, reason: Closed, message: str = "", wait_for_peer: bool = False) -> None:
        """Start closing with `reason`: a WebSocket gets a close frame with its code first.

        `wait_for_peer` keeps reading until the peer answers with its close frame (a clean
        shutdown); otherwise we drain and close without waiting (violations, slow consumers).
        """
        if self.state >= CLOSING:
            return  # already closing; its deadline finishes the job
        self.reason = reason
        if self.state == OPEN:
            self.queue(close_frame(reason.code, message or reason.label))
            if wait_for_peer:
                self.server.router.drop(self)
                self.state = CLOSING
                self.deadline = self.server.loop.now + self.server.config.close_timeout
                return
        self._drain()

    def _drain(self) -> None:
        self.server.router.drop(self)
        self.http = None
        self.partial = None
        self.rx = b""
        self.state = DRAINING
        self.deadline = self.server.loop.now + self.server.config.close_timeout
        if not self.queued and not self.backlog:
            self._linger()
        # else: the pending flush (end of iteration, or EPOLLOUT if already armed) sends the rest,
        # and its update_interest stops reading. Arming EPOLLOUT here, before trying to send,
        # would cost an epoll_ctl and a wake-up for nothing.

    def _merge_backlog(self) -> None:
        """Put a pending replay back in front of `out` (a transport that must have everything
        queued at once, e.g. TLS before its close_notify); order is kept, pacing is not."""
        backlog = self.backlog
        if backlog:
            self.out[:0] = backlog
            self.queued += sum(map(len, backlog))
        self.backlog = None

    def _linger(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.abort(Closed.CLIENT_GONE)
            return
        self.state = LINGER
        self.deadline = self.server.loop.now + min(2.0, self.server.config.close_timeout)
        self.update_interest()

    def abort(self, reason: Closed) -> None:
        """Close the socket now; the first reason recorded is the one counted."""
        if self.state == CLOSED:
            return
        self.state = CLOSED
        self.server.loop.unregister(self.fd)
        self.sock.close()
        self.server.router.drop(self)
        self.out = []
        self.backlog = None
        self.queued = 0
        self.http = None
        self.partial = None
        self.rx = b""
        self.server.closed(self, self.reason or reason)


def flush_all(sessions: list[Session], stats: Stats) -> None:
    """Flush every buffer that filled in this iteration (the server's end of iteration).

    The steady state (an open plain connection, nothing held back, all of `out` written in one
    send) is done in C when the speedup is built (`_speedups.flush`), else by `_flush_steady`;
    every other connection goes through its own `flush`, and a short send through `_sent`."""
    if _speedups is None:
        _flush_steady(sessions, stats)
        return
    sends, sent_bytes, rest = _speedups.flush(sessions)
    stats.sends += sends
    stats.bytes_sent += sent_bytes
    for conn, sent in rest:
        if sent is None:
            conn.flush()
        elif sent < 0:
            conn.abort(Closed.CLIENT_GONE)
        else:
            out = conn.out
            conn._sent(out[0] if len(out) == 1 else b"".join(out), sent)


def _flush_steady(sessions: list[Session], stats: Stats) -> None:
    """`flush_all` in Python: `Connection.flush` for the steady state, inlined, since a
    message's last subscriber waits for the whole walk (W3 in docs/benchmarks.md)."""
    sends = 0
    sent_bytes = 0
    for conn in sessions:
        if (
            type(conn) is not Connection
            or conn.mask != READING
            or conn.state != OPEN
            or conn.backlog is not None
            or conn.since
        ):
            conn.flush()  # type: ignore[attr-defined]
            continue
        out = conn.out
        if not out:
            continue
        data = out[0] if len(out) == 1 else b"".join(out)
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            conn.abort(Closed.CLIENT_GONE)
            continue
        sends += 1
        sent_bytes += sent
        if sent == len(data):
            out.clear()
            conn.queued = 0
        else:
            conn._sent(data, sent)
    stats.sends += sends
    stats.bytes_sent += sent_bytes


def write_through(
    subs: tuple[Session, ...], frame: bytes, stats: Stats, started: float
) -> tuple[Session, ...] | None:
    """Send `frame` now to each subscriber in the steady state with an empty buffer; the
    others (None: there are none) take the ordinary path, a buffer flushed at the end of the
    iteration. The server asks for this only for a read that carried one message and was the
    loop's only event (nothing else can join the buffers this iteration, so nothing is lost to
    coalescing): the first subscriber's send starts before the walk over the 1,000 others, and
    each is touched once, not at fan-out and again at the flush (W3 in docs/benchmarks.md)."""
    if _speedups is None:
        sends, sent_bytes, skipped, partial = _write_through_py(subs, frame)
    else:
        sends, sent_bytes, skipped, partial = _speedups.write_through(subs, frame)
    stats.sends += sends
    stats.bytes_sent += sent_bytes
    if partial is not None:
        for conn, sent in partial:
            conn._sent(frame, sent)  # keeps the tail and arms EPOLLOUT; timed when it drains
        sends -= len(partial)
    if sends:  # how late they got it: since the iteration began (`started`), as for the flush
        stats.record_queue_age(time.monotonic() - started, sends)
    return None if skipped is None else tuple(skipped)


def _write_through_py(
    subs: tuple[Session, ...], frame: bytes
) -> tuple[int, int, list[Session] | None, list[tuple[Connection, int]] | None]:
    """`write_through`'s walk in Python (the C twin's reference)."""
    sends = 0
    sent_bytes = 0
    skipped: list[Session] | None = None
    partial: list[tuple[Connection, int]] | None = None
    for conn in subs:
        if (
            type(conn) is not Connection
            or conn.queued
            or conn.mask != READING
            or conn.state != OPEN
            or conn.backlog is not None
            or conn.since
        ):
            sent = -1
        else:
            try:
                sent = conn.sock.send(frame)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:  # the flush meets the error and closes it
                sent = -1
        if sent < 0:
            if skipped is None:
                skipped = []
            skipped.append(conn)
            continue
        sends += 1
        sent_bytes += sent
        if sent != len(frame):
            if partial is None:
                partial = []
            partial.append((conn, sent))  # type: ignore[arg-type]
    return sends, sent_bytes, skipped, partial


_speedups = load("broker.net._speedups")
if _speedups is not None:
    _speedups.bind(Connection, READING, OPEN)
