"""Subscriber worker processes: many raw non-blocking sockets on one select.epoll each.

Why processes: a process may hold at most 20,000 open files here (hard limit), and 19,000
connections plus a broker's worth of headroom do not fit in one; several processes also let
one stall (GC, page faults) without freezing every subscriber. Why not the `websockets`
library: at a million deliveries per second its per-frame Python work would be the bottleneck.

Theory of operation. The coordinator (scenarios.Load) starts K workers; each owns a
contiguous range of connection numbers and does:
  1. connect: at most `conc` handshakes in flight; each socket binds a source address
     127.0.0.(2 + i % src_ips) with IP_BIND_ADDRESS_NO_PORT (the kernel's ephemeral port search
     slows down badly when one source address holds ~19k connections to one port), sends the
     upgrade, then a subscribe with id 1, and is ready once the ack arrives;
     with TLS (wss://) the socket first carries a TLS handshake, and from then on every byte
     passes through an ssl.SSLObject over memory BIOs (the broker's own arrangement);
  2. serve: wait for commands on its pipe, answer pings, and count payload markers in 1 MiB
     `recv_into` buffers (wire.scan). With a tick > 0 the worker sleeps between sweeps so
     each recv carries many deliveries (throughput runs); with tick 0 it reads as soon as
     epoll says so and stamps each recv with CLOCK_MONOTONIC (latency runs).
Counts go to shared arrays once per sweep (the closed-loop publisher reads their sum);
histograms come back over the pipe on "stop". Every loop is bounded in time: the connect
phase by its deadline, serving by `max_seconds` and the parent's liveness.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import select
import signal
import socket
import ssl
import struct
import time
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, cast

from broker.bench import tls, wire

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
RECV_BYTES = 1 << 20
# a sweep whose recvs averaged less than this (about 16 deliveries of 64 B) pauses for a tick
BATCH_BYTES = 2048
# state of one connection
CONNECTING, HANDSHAKE, SUBSCRIBING, READY, TLS_HELLO = range(5)
_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close with RST, leave no TIME_WAIT behind


@dataclass(frozen=True)
class WorkerSpec:
    index: int
    host: str
    port: int
    path: str
    first: int  # connection numbers first .. first+count-1
    count: int
    topic_fmt: str  # "bench.idle.{i}" or one fixed topic
    src_ips: int
    conc: int
    conn_timeout: float
    cpu: int | None
    max_seconds: float
    tls: bool = False


class Conn:
    __slots__ = ("accept", "n", "pend", "rx", "sock", "state", "tin", "tls", "tout")

    def __init__(self, sock: socket.socket, n: int) -> None:
        self.sock = sock
        self.n = n
        self.state = CONNECTING
        self.rx = bytearray()
        self.accept = b""
        self.pend = b""
        self.tls: ssl.SSLObject | None = None
        self.tin = self.tout = ssl.MemoryBIO()  # replaced by two BIOs when TLS starts


class Worker:
    def __init__(self, spec: WorkerSpec, pipe: Connection, shared: list[Any]) -> None:
        self.spec = spec
        self.pipe = pipe
        self.delivered_shared, self.last_shared, self.closed_shared = shared
        self.ep = select.epoll()
        self.ep.register(pipe.fileno(), select.EPOLLIN)
        self.conns: dict[int, Conn] = {}
        self.ready = 0
        self.failed = 0
        self.errors: list[str] = []
        self.buf = bytearray(RECV_BYTES)
        self.view = memoryview(self.buf)
        self.delivered = 0
        self.closed_after_ready = 0
        self.last_ns = 0
        self.hist: Counter[int] = Counter()
        self.want_stamps = False
        self.fast = False
        self.tick = 0.0
        self.deadline = time.monotonic() + spec.max_seconds
        self.parent = os.getppid()
        self.tls_context = tls.client_context() if spec.tls else None

    # ------------------------------------------------------------ TLS-aware I/O

    def _send(self, c: Conn, data: bytes) -> None:
        """Send a small message (handshake, subscribe, pong): it fits an empty send buffer."""
        if c.tls is not None:
            c.tls.write(data)
            data = c.tout.read()
        c.sock.send(data)

    def _recv(self, c: Conn) -> bytes:
        """Plaintext from one recv; b"" at EOF; BlockingIOError when there is none yet."""
        data = c.sock.recv(65536)
        if c.tls is None or not data:
            return data
        c.tin.write(data)
        chunks = []
        with contextlib.suppress(ssl.SSLWantReadError):
            while chunk := c.tls.read(65536):
                chunks.append(chunk)
        if not chunks:
            raise BlockingIOError
        return b"".join(chunks)

    def _tls_hello(self, c: Conn) -> bool:
        """Advance the client's TLS handshake; True once done (then the upgrade is sent)."""
        assert c.tls is not None
        if c.state == TLS_HELLO:
            data = c.sock.recv(65536)
            if not data:
                raise OSError("closed during the TLS handshake")
            c.tin.write(data)
        try:
            c.tls.do_handshake()
        except ssl.SSLWantReadError:
            if c.tout.pending:
                c.sock.send(c.tout.read())
            return False
        return True

    # ------------------------------------------------------------ connect phase

    def _error(self, what: str) -> None:
        if len(self.errors) < 5:
            self.errors.append(what)

    def _start(self, n: int) -> None:
        s = self.spec
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if s.src_ips > 0:
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((f"127.0.0.{2 + n % s.src_ips}", 0))
            err = sock.connect_ex((s.host, s.port))
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, os.strerror(err))
        except OSError as e:
            sock.close()
            self.failed += 1
            self._error(f"connect: {e}")
            return
        c = Conn(sock, n)
        self.conns[sock.fileno()] = c
        self.ep.register(sock.fileno(), select.EPOLLOUT)

    def _fail(self, c: Conn, why: str) -> None:
        self._drop(c)
        self.failed += 1
        self._error(why)

    def _drop(self, c: Conn) -> None:
        fd = c.sock.fileno()
        self.conns.pop(fd, None)
        with contextlib.suppress(OSError):
            self.ep.unregister(fd)
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
        c.sock.close()

    def _on_connect_event(self, c: Conn, ev: int) -> None:
        if c.state == CONNECTING:
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._fail(c, f"connect: {os.strerror(err)}")
                return
            self.ep.modify(c.sock.fileno(), select.EPOLLIN)
            if self.tls_context is not None:
                c.tin, c.tout = ssl.MemoryBIO(), ssl.MemoryBIO()
                c.tls = self.tls_context.wrap_bio(c.tin, c.tout, server_hostname=self.spec.host)
        if c.tls is not None and c.state in (CONNECTING, TLS_HELLO):
            try:
                done = self._tls_hello(c)
            except BlockingIOError:
                return
            except OSError as e:  # ssl.SSLError included
                self._fail(c, f"TLS handshake: {e}")
                return
            c.state = TLS_HELLO
            if not done:
                return
            c.state = CONNECTING  # TLS is up: send the upgrade request through it
        if c.state == CONNECTING:
            req, c.accept = wire.handshake_request(self.spec.host, self.spec.port, self.spec.path)
            try:
                self._send(c, req)  # a few hundred bytes into an empty send buffer
            except OSError as e:
                self._fail(c, f"send handshake: {e}")
                return
            c.state = HANDSHAKE
            return
        try:
            data = self._recv(c)
        except BlockingIOError:
            return
        except OSError as e:
            self._fail(c, f"recv: {e}")
            return
        if not data:
            self._fail(c, "closed by server before ready")
            return
        c.rx += data
        if c.state == HANDSHAKE:
            end = c.rx.find(b"\r\n\r\n")
            if end < 0:
                if len(c.rx) > 16384:
                    self._fail(c, "oversized handshake response")
                return
            why = wire.check_handshake_response(bytes(c.rx[:end]), c.accept)
            if why:
                self._fail(c, why)
                return
            del c.rx[: end + 4]
            try:
                self._send(c, wire.subscribe_frame(self.spec.topic_fmt.format(i=c.n)))
            except OSError as e:
                self._fail(c, f"send subscribe: {e}")
                return
            c.state = SUBSCRIBING
        if c.state == SUBSCRIBING:
            if wire.is_ack(c.rx):
                c.state = READY
                c.rx = bytearray()
                self.ready += 1
            elif wire.is_error(c.rx):
                self._fail(c, "subscribe refused: " + c.rx[:200].decode("latin-1"))

    def connect_phase(self) -> bool:
        """Open and subscribe this worker's connections; False if told to exit meanwhile."""
        s = self.spec
        cpu0 = time.process_time()
        t0 = time.monotonic_ns()
        t_last = t0
        nxt = s.first
        stop = s.first + s.count
        deadline = time.monotonic() + s.conn_timeout
        while (
            self.ready + self.failed < s.count
            and time.monotonic() < deadline
            and os.getppid() == self.parent
        ):
            inflight = len(self.conns) - self.ready
            while inflight < s.conc and nxt < stop:
                self._start(nxt)
                nxt += 1
                inflight += 1
            for fd, ev in self.ep.poll(0.05):
                if fd == self.pipe.fileno():
                    if self._command() == "exit":
                        return False
                    continue
                c = self.conns.get(fd)
                if c is not None and c.state != READY:
                    before = self.ready
                    self._on_connect_event(c, ev)
                    if self.ready != before:
                        t_last = time.monotonic_ns()
        for c in [c for c in self.conns.values() if c.state != READY]:
            self._fail(c, "not ready before the connect deadline")
        self.failed += stop - nxt  # never started
        cpu = time.process_time() - cpu0
        self.pipe.send(("connected", self.ready, self.failed, t0, t_last, self.errors, cpu))
        return True

    # ------------------------------------------------------------ serve phase

    def _command(self) -> str:
        msg = self.pipe.recv()
        cmd = msg[0]
        if cmd == "start":
            self.want_stamps, self.tick, self.fast = bool(msg[1]), float(msg[2]), bool(msg[3])
            self.delivered = 0
            self.last_ns = 0
            self.hist = Counter()
            self.delivered_shared[self.spec.index] = 0
            self.last_shared[self.spec.index] = 0
            self.pipe.send(("started",))
        elif cmd == "stop":
            self.pipe.send(
                ("stats", self.delivered, self.closed_after_ready, dict(self.hist), self.last_ns)
            )
        elif cmd == "exit":
            for c in list(self.conns.values()):
                self._drop(c)
            self.pipe.send(("bye",))
        return str(cmd)

    def _read(self, c: Conn) -> int:
        """One recv and scan; returns the bytes read (0 when nothing or closed)."""
        if c.tls is not None:
            return self._read_tls(c)
        p = len(c.pend)
        try:
            if p:
                self.buf[:p] = c.pend
                n = c.sock.recv_into(self.view[p:])
            else:
                n = c.sock.recv_into(self.buf)
        except BlockingIOError:
            return 0
        except OSError:
            n = 0
        if n == 0:
            self._drop(c)
            self.closed_after_ready += 1
            return 0
        self._scan(c, p + n, time.monotonic_ns())
        return n

    def _read_tls(self, c: Conn) -> int:
        """One recv of ciphertext, all of it decrypted (nothing left where epoll cannot see)."""
        try:
            raw = c.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return 0
        except OSError:
            raw = b""
        tls = c.tls
        assert tls is not None
        if raw:
            c.tin.write(raw)
        now = time.monotonic_ns()
        eof = not raw
        full = True
        while full:
            p = len(c.pend)
            self.buf[:p] = c.pend
            end = p
            full = False
            try:
                while end < RECV_BYTES:
                    # with a buffer, read returns a count (typeshed knows only bytes)
                    k = cast(int, tls.read(RECV_BYTES - end, self.view[end:]))
                    if not k:
                        eof = True
                        break
                    end += k
                full = end >= RECV_BYTES
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                eof = True
            if end > p:
                self._scan(c, end, now)
        if eof:
            self._drop(c)
            self.closed_after_ready += 1
            return 0
        return len(raw)

    def _scan(self, c: Conn, end: int, now: int) -> None:
        """Count the deliveries in buf[:end]; keep a partial frame in `c.pend`."""
        count, stamps, keep, pings = wire.scan(self.buf, end, self.want_stamps, self.fast)
        c.pend = bytes(self.buf[keep:end]) if keep < end else b""
        for ping in pings:
            with contextlib.suppress(OSError):
                self._send(c, wire.client_frame(ping, wire.OP_PONG))
        if count:
            self.delivered += count
            self.last_ns = now
            if stamps:
                hist = self.hist
                if len(stamps) == 1:
                    hist[max(0, now - int(stamps[0], 16)) // 1000] += 1
                else:
                    for stamp, k in Counter(stamps).items():
                        hist[max(0, now - int(stamp, 16)) // 1000] += k

    def serve(self) -> None:
        """Read whatever epoll reports; with a tick, pause after sweeps whose reads were small.

        The pause lets deliveries pile up in the kernel so the next recv carries many of them
        (the generator's cost is per recv, not per byte). A server that already writes large
        batches fills each recv by itself, so then there is no pause and counts (which the
        closed-loop publisher waits for) stay fresh.
        """
        pipe_fd = self.pipe.fileno()
        sweeps = 0
        while True:
            sweeps += 1
            # the liveness checks cost two calls: once per 256 sweeps (or idle second) will do
            if not sweeps & 255 and (
                time.monotonic() > self.deadline or os.getppid() != self.parent
            ):
                return
            nrecv = nbytes = 0
            events = self.ep.poll(0.5)
            if not events:
                sweeps = 255  # idle for half a second: check liveness on the next turn
            for fd, _ev in events:
                if fd == pipe_fd:
                    if self._command() == "exit":
                        return
                    continue
                c = self.conns.get(fd)
                if c is not None:
                    nbytes += self._read(c)
                    nrecv += 1
            self.delivered_shared[self.spec.index] = self.delivered
            self.last_shared[self.spec.index] = self.last_ns
            self.closed_shared[self.spec.index] = self.closed_after_ready
            if self.tick > 0 and nrecv and nbytes < BATCH_BYTES * nrecv:
                time.sleep(self.tick)


def worker_main(spec: WorkerSpec, pipe: Connection, shared: list[Any]) -> None:
    """Process entry point (multiprocessing, spawn start method)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator handles Ctrl-C and stops us
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if spec.cpu is not None:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {spec.cpu})
    w = Worker(spec, pipe, shared)
    try:
        if w.connect_phase():
            w.serve()
    except (BrokenPipeError, EOFError):
        pass
    finally:
        for c in list(w.conns.values()):
            w._drop(c)
