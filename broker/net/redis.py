"""A cluster of broker nodes on one Redis: the `--redis` backplane, in the node's own epoll loop.

Theory of operation. Redis is the hub of pubsub/backplane.py: it numbers every message, keeps the
history and routes each message to the nodes that have a matching subscriber.

* One atomic step per publish (the `PUBLISH_SCRIPT` Lua script, EVALSHA, EVAL after NOSCRIPT):
  HINCRBY the topic's seq in its hash (which also holds its epoch: a missing hash means a new
  epoch, so a Redis restarted without persistence hands out new epochs and old (epoch, seq)
  pairs never name new messages), XADD to the topic's capped stream (MAXLEN ~ --history-size,
  trimmed by MINID ~ now - --history-ttl, PEXPIRE'd), then SPUBLISH to the topic's shard channel
  and, when anyone holds a pattern subscription, PUBLISH to its pattern channel. Two nodes can
  therefore never hand out the same seq, and every node sees the same (epoch, seq).
* Each node subscribes only to what its local clients need: SSUBSCRIBE (Redis 7 sharded pub/sub)
  to the shard channel of a concrete topic, PSUBSCRIBE to a glob for a wildcard. Redis globs are
  not our `*`/`>`: every glob character of the topic (`*?[]\\`) is escaped so it matches only
  itself, and `*`/`>` become a glob `*` that over-matches; the node's own Sublist filters exactly.
* One connection, RESP3 (HELLO 3): push messages and replies share it, in Redis's order. So a
  subscribe's SSUBSCRIBE precedes its position/recovery read, and every message published before
  that read arrives before its answer: the seam's recovery buffer then replays and drops exactly
  what it must. A message that reaches the node through several subscriptions (its shard channel
  and patterns) arrives as consecutive copies from the one PUBLISH step: the copy equal to the
  previous message is skipped.
* I/O: a non-blocking socket (TLS through an SSLObject and memory BIOs, as in net/tls.py), RESP
  parsed by hiredis.Reader, commands appended to one buffer and written once per loop iteration
  (pipelined), bounded (--redis-buffer: past it publishes are refused). A PING a second measures
  the round trip and notices a dead peer (--redis-timeout). A lost connection fails every request
  in flight with `unavailable`, and is retried with capped exponential backoff and full jitter.
* The address: an IP literal is used as it is. A name is looked up (getaddrinfo, which may wait
  seconds on a slow or dead DNS server) in a daemon thread, whose answer comes back to the loop
  through `EventLoop.call_soon_threadsafe`; the loop keeps serving meanwhile. The lookup counts
  against the attempt's --redis-timeout like the TCP connect, and an answer is used only by the
  attempt that asked, if it still waits: a late one is dropped. The addresses of a name are tried
  in getaddrinfo's order within the attempt: one that fails at once (refused, unreachable, a
  family the host cannot open, such as ::1 for a Redis bound to 127.0.0.1 only) passes to the
  next; one that stays silent holds the attempt until its timeout.
* After a reconnection, the node re-subscribes and reads, for every concrete topic it holds, the
  stream after the last seq it delivered: the gap the outage cost is delivered in order before the
  live messages that follow (buffered meanwhile). A gap Redis no longer holds (trimmed, or a new
  epoch) cannot be filled: the exact subscribers of that topic are closed with 1012 so that they
  reconnect and learn, through `since`, that they did not recover (`on_gap`).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import logging
import random
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import unquote, urlsplit

import hiredis
import msgpack

from broker.errors import RequestError
from broker.net.reads import ReadBuffer
from broker.pubsub.backplane import Backplane, unavailable
from broker.pubsub.history import new_epoch
from broker.wire import codec, messages
from broker.wire.codec import Encoding
from broker.wire.messages import Since, is_pattern

if TYPE_CHECKING:
    from broker.config import Config
    from broker.metrics import Stats
    from broker.net.loop import EventLoop
    from broker.pubsub.router import Router

log = logging.getLogger("broker.redis")

READ_SIZE = 256 * 1024
PING_INTERVAL = 1.0
BACKOFF_FIRST = 0.05  # seconds before the first reconnection attempt (then doubling, jittered)
BACKOFF_CAP = 2.0  # the longest wait between attempts
JSON_EXT = 1  # msgpack extension: data msgpack cannot carry (an int over 64 bits), as JSON

DOWN, CONNECTING, HANDSHAKE, UP = range(4)

# KEYS: the topic's hash, its stream. ARGV: data, candidate epoch, history size (0: none),
# history ttl ms (0: none), shard channel, pattern channel, keep ms.
PUBLISH_SCRIPT = """
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[2]
  redis.call('HSET', KEYS[1], 'epoch', epoch)
  redis.call('DEL', KEYS[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[7])
local msg = string.format('%d', seq) .. ' ' .. epoch .. ' ' .. ARGV[1]
local size = tonumber(ARGV[3])
if size > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', size, '*', 'm', msg)
  local ttl = tonumber(ARGV[4])
  if ttl > 0 then
    local t = redis.call('TIME')
    local horizon = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - ttl
    redis.call('XTRIM', KEYS[2], 'MINID', '~', string.format('%d', horizon))
    redis.call('PEXPIRE', KEYS[2], ttl)
  else
    redis.call('PEXPIRE', KEYS[2], ARGV[7])
  end
end
local n = redis.call('SPUBLISH', ARGV[5], msg)
if redis.call('PUBSUB', 'NUMPAT') > 0 then
  n = n + redis.call('PUBLISH', ARGV[6], msg)
end
return {epoch, seq, n}
"""

# KEYS: the topic's hash, its stream. ARGV: create ('1': make the epoch if new, as a subscribe
# does; '0': a read creates nothing), candidate epoch, asked epoch ('' = the oldest retained,
# '-' = the position only), asked seq, limit (0 = all), history ttl ms, keep ms.
# Returns {epoch, seq, recovered (0/1), {messages oldest first}}.
READ_SCRIPT = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local last = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
if not epoch then
  if ARGV[1] ~= '1' then
    if ARGV[3] == '' then return {ARGV[2], 0, 1, {}} end
    return {ARGV[2], 0, 0, {}}
  end
  epoch = ARGV[2]
  redis.call('HSET', KEYS[1], 'epoch', epoch)
  redis.call('DEL', KEYS[2])
end
if ARGV[1] == '1' then redis.call('PEXPIRE', KEYS[1], ARGV[7]) end
if ARGV[3] == '-' then return {epoch, last, 1, {}} end
local ttl = tonumber(ARGV[6])
local horizon = 0
if ttl > 0 then
  local t = redis.call('TIME')
  horizon = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - ttl
end
local want, after, limit = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
if want == '' then want, after = epoch, 0 end
local out = {}
if want == epoch and after >= 0 and after <= last then
  local count = last - after
  if count == 0 then return {epoch, last, 1, out} end
  local got = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', count)
  if #got == count and tonumber(string.match(got[count][1], '^(%d+)')) >= horizon then
    local n = count
    if limit > 0 and limit < n then n = limit end
    for i = count, count - n + 1, -1 do out[#out + 1] = got[i][2][2] end
    return {epoch, last, 1, out}
  end
end
local got
if limit > 0 then
  got = redis.call('XRANGE', KEYS[2], string.format('%d', horizon), '+', 'COUNT', limit)
else
  got = redis.call('XRANGE', KEYS[2], string.format('%d', horizon), '+')
end
for i = 1, #got do out[#out + 1] = got[i][2][2] end
return {epoch, last, 0, out}
"""


class RedisAddress(NamedTuple):
    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    tls: bool


def parse_url(url: str) -> RedisAddress:
    """redis://[[user]:password@]host[:port][/db], rediss:// for TLS; ValueError if malformed."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"not a redis:// or rediss:// URL: {url!r}")
    host = parts.hostname
    if not host:
        raise ValueError(f"no host in {url!r}")
    port = parts.port or 6379
    path = parts.path.strip("/")
    db = int(path) if path else 0
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return RedisAddress(host, port, db, username, password, parts.scheme == "rediss")


def glob_escape(text: str) -> str:
    """`text` as a Redis glob that matches only itself."""
    return "".join("\\" + c if c in "*?[]\\^" else c for c in text)


def pattern_glob(pattern: str) -> str:
    """A Redis glob matching at least every topic our `pattern` matches: literal tokens escaped,
    `*` and `>` as glob `*` (which also crosses dots: the Sublist filters exactly)."""
    tokens = pattern.split(".")
    return ".".join("*" if t in ("*", ">") else glob_escape(t) for t in tokens)


_packb = msgpack.Packer(use_bin_type=True).pack


def _portable(value: Any) -> Any:
    try:
        _packb(value)
    except (OverflowError, ValueError, TypeError):
        if isinstance(value, list):
            return [_portable(x) for x in value]
        if isinstance(value, dict):
            return {k: _portable(v) for k, v in value.items()}
        return msgpack.ExtType(JSON_EXT, json.dumps(value).encode())
    return value


def pack(data: Any) -> bytes:
    """The data as it travels through Redis: msgpack; what msgpack cannot carry, as JSON."""
    try:
        return _packb(data)
    except (OverflowError, ValueError, TypeError):
        return _packb(_portable(data))


def _ext_hook(code: int, data: bytes) -> Any:
    if code == JSON_EXT:
        return json.loads(data)
    return msgpack.ExtType(code, data)


def unpack(payload: bytes) -> Any:
    return msgpack.unpackb(
        payload, raw=False, strict_map_key=False, timestamp=0, ext_hook=_ext_hook
    )


def parse_message(msg: bytes) -> tuple[int, str, bytes]:
    """(seq, epoch, packed data) of a message as the publish script made it."""
    seq, epoch, payload = msg.split(b" ", 2)
    return int(seq), epoch.decode(), payload


AddrInfo = tuple[int, int, int, str, Any]  # one entry of socket.getaddrinfo's answer
Resolver = Callable[[str, int], Sequence[AddrInfo]]  # (host, port) -> addresses, may block


def lookup(host: str, port: int) -> Sequence[AddrInfo]:
    """The resolver of a name: getaddrinfo, which may block on DNS (so never on the loop)."""
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)


def is_ip_literal(host: str) -> bool:
    """Whether `host` is an address (IPv4, IPv6 with or without a zone) rather than a name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class RedisConfigError(Exception):
    """--redis or --redis-ca cannot be used; the message says why."""


class _Publish:
    """A publish awaiting Redis' answer, kept in the reply queue (no closure per publish)."""

    __slots__ = ("args", "n")

    def __init__(self, n: int, args: list[Any]) -> None:
        self.n = n  # 0: no confirmation asked for
        self.args = args  # the script's keys and arguments, for an EVAL after NOSCRIPT


class _LostError(Exception):
    """The connection to Redis is gone."""


Reply = Callable[[Any], None]  # called with the reply, a hiredis.ReplyError, or None when lost


class RedisLink(Backplane):
    """A node's backplane: one RESP3 connection to Redis in the node's loop. `resolve` looks a
    host name up in a worker thread (a test hands in one that stalls)."""

    def __init__(
        self,
        config: Config,
        loop: EventLoop,
        router: Router,
        stats: Stats,
        resolve: Resolver = lookup,
    ) -> None:
        super().__init__()
        self.resolve_host = resolve
        self.config = config
        self.read_buffer = ReadBuffer(READ_SIZE)
        self.address = parse_url(config.redis)
        self.loop = loop
        self.router = router
        self.stats = stats
        prefix = config.redis_prefix
        self.prefix = prefix
        self._shard_prefix = (prefix + ":{").encode()
        self._pattern_prefix = (prefix + ":").encode()
        self.tls_context: ssl.SSLContext | None = None
        if self.address.tls:
            try:
                self.tls_context = ssl.create_default_context(cafile=config.redis_ca or None)
            except (OSError, ssl.SSLError) as exc:
                raise RedisConfigError(f"--redis-ca {config.redis_ca}: {exc}") from None
        self.state = DOWN
        self.sock: socket.socket | None = None
        self.fd = -1
        self.mask = 0
        self.ssl: ssl.SSLObject | None = None
        self.incoming: ssl.MemoryBIO | None = None
        self.outgoing: ssl.MemoryBIO | None = None
        self.reader = hiredis.Reader()
        self.out = bytearray()
        self.replies: deque[Reply | _Publish | None] = deque()
        self.attempts = 0
        self._try = 0  # numbers every attempt, never reset: a lookup's answer names its attempt
        self._addrs: list[AddrInfo] = []  # the name's addresses this attempt has yet to try
        self.reconnects = 0  # connections lost (or failed) after the first came up
        self.ever_up = False
        self.rtt = 0.0  # seconds, the last PING's round trip
        self._ping_sent = 0.0  # when the unanswered PING went out (0: none)
        self._deadline = 0.0  # of the connection attempt under way
        self._cipher = b""  # TLS records not yet sent
        self._tls_done = False
        self._timer: Any = None
        self._shas: dict[str, str] = {}
        # Our subscriptions in Redis: pattern -> local (pattern, encoding) pairs holding it.
        self.channels: dict[str, int] = {}
        # Concrete topics held here -> (epoch, seq) of the last message delivered here.
        self.positions: dict[str, tuple[str, int]] = {}
        # Topics whose gap is being read after a reconnection -> live messages meanwhile.
        self.filling: dict[str, list[tuple[int, str, bytes]]] = {}
        self._last: tuple[bytes, bytes] | None = None
        self._refusals_logged = 0
        # The epoch proposed with each publish, used by Redis only for a topic it does not know:
        # drawn anew once Redis used it and at each connection, so no topic gets it twice.
        self._candidate = new_epoch()
        self._candidate_b = self._candidate.encode()  # (channel topic, message) just delivered
        self.on_gap: Callable[[str], None] = lambda topic: None
        self.messages_in = 0
        self.messages_out = 0
        loop.after_events.append(self.flush)
        loop.call_later(PING_INTERVAL, self._tick)
        self.connect()

    # -- names -------------------------------------------------------------------------------

    def _keys(self, topic: str) -> tuple[str, str]:
        base = f"{self.prefix}:{{{topic}}}"
        return base + ":s", base + ":h"

    def _shard_channel(self, topic: str) -> str:
        return f"{self.prefix}:{{{topic}}}"

    def _pattern_channel(self, topic: str) -> str:
        return f"{self.prefix}:{topic}"

    # -- connection --------------------------------------------------------------------------

    def connect(self) -> None:
        """Start a connection attempt (non-blocking); its outcome arrives through the loop."""
        self._timer = None
        addr = self.address
        self.attempts += 1
        self._try += 1
        self._addrs = []
        self.state = CONNECTING  # with no socket yet while the name is looked up
        self._deadline = self.loop.now + self.config.redis_timeout
        if is_ip_literal(addr.host):
            # AI_NUMERICHOST: parsed, never sent to DNS, so it cannot block the loop.
            try:
                info = socket.getaddrinfo(
                    addr.host, addr.port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
                )
            except OSError as exc:
                self._failed(f"bad address {addr.host}: {exc}")
                return
            self._open(info[0])
            return
        # A name: the lookup runs in a daemon thread (shutdown never waits for one stuck on DNS)
        # and its answer comes back on the loop thread. One stuck lookup holds its thread until
        # getaddrinfo gives up (resolv.conf's timeout x attempts); the backoff spaces attempts,
        # so a dead DNS server costs a few threads, never the loop.
        token, resolve, loop = self._try, self.resolve_host, self.loop

        def look_up() -> None:
            result: Sequence[AddrInfo] | Exception
            try:
                result = resolve(addr.host, addr.port)
            except Exception as exc:  # any failure (OSError, UnicodeError...) fails the attempt
                result = exc
            loop.call_soon_threadsafe(lambda: self._resolved(token, result))

        try:
            threading.Thread(target=look_up, name="redis-lookup", daemon=True).start()
        except RuntimeError as exc:  # can't start new thread (a process or memory limit)
            self._failed(f"cannot look {addr.host} up: {exc}")

    def _resolved(self, token: int, result: Sequence[AddrInfo] | Exception) -> None:
        """On the loop thread: a lookup is done. Used only by the attempt that started it, and
        only while that attempt still waits (not timed out, not closed)."""
        if token != self._try or self.state != CONNECTING or self.sock is not None:
            return
        if isinstance(result, Exception) or not result:
            self._failed(f"cannot resolve {self.address.host}: {result or 'no address'}")
            return
        self._addrs = list(result[1:])
        self._open(result[0])

    def _open(self, info: AddrInfo) -> None:
        """Start the non-blocking TCP connect to one resolved address."""
        family, kind, proto, _, sockaddr = info
        try:
            sock = socket.socket(family, kind, proto)
        except OSError as exc:  # EMFILE, EAFNOSUPPORT (::1 on a host without IPv6)...
            if not self._next_address():
                self._failed(f"socket: {exc}")
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self.sock = sock
        self.fd = sock.fileno()
        self.reader = hiredis.Reader()
        self._new_candidate()
        self.out.clear()
        self.replies.clear()
        self._last = None
        err = sock.connect_ex(sockaddr)
        self.mask = select.EPOLLOUT | select.EPOLLIN | select.EPOLLRDHUP
        self.loop.register(self.fd, self, self.mask)
        if err not in (0, errno.EINPROGRESS) and not self._next_address():
            self._lost(f"connect: {errno.errorcode.get(err, str(err))}")

    def _next_address(self) -> bool:
        """The connect to one address of the name failed at once: try its next address, in the
        same attempt (same deadline). False when none is left."""
        if not self._addrs:
            return False
        if self.sock is not None:
            self.loop.unregister(self.fd)
            self.sock.close()
            self.sock = None
        self._open(self._addrs.pop(0))
        return True

    def _connected(self) -> None:
        """TCP is up: TLS handshake if rediss://, then HELLO 3, AUTH, SELECT, SCRIPT LOAD."""
        assert self.sock is not None
        if self.tls_context is not None:
            self.incoming = ssl.MemoryBIO()
            self.outgoing = ssl.MemoryBIO()
            self.ssl = self.tls_context.wrap_bio(
                self.incoming, self.outgoing, server_hostname=self.address.host
            )
        self.state = HANDSHAKE
        addr = self.address
        hello: list[Any] = ["HELLO", "3"]
        if addr.password is not None:
            hello += ["AUTH", addr.username or "default", addr.password]
        hello += ["SETNAME", f"broker-{self.config.port}"]  # CLIENT LIST tells nodes apart
        self.command(hello, self._hello)
        if addr.db:
            self.command(["SELECT", addr.db], self._check_setup)
        self.command(["SCRIPT", "LOAD", PUBLISH_SCRIPT], self._loaded("publish"))
        self.command(["SCRIPT", "LOAD", READ_SCRIPT], self._loaded("read"))
        self.command(["PING"], self._ready)
        self.flush()

    def _hello(self, reply: Any) -> None:
        if isinstance(reply, hiredis.ReplyError):
            log.error("Redis refused HELLO 3 (Redis 7 with RESP3 is needed): %s", reply)
            self._lost(f"HELLO: {reply}")

    def _check_setup(self, reply: Any) -> None:
        if isinstance(reply, hiredis.ReplyError):
            self._lost(f"setup: {reply}")

    def _loaded(self, name: str) -> Reply:
        def done(reply: Any) -> None:
            if isinstance(reply, hiredis.ReplyError | type(None)):
                self._lost(f"SCRIPT LOAD: {reply}")
            else:
                self._shas[name] = reply.decode() if isinstance(reply, bytes) else str(reply)

        return done

    def _ready(self, reply: Any) -> None:
        if self.state != HANDSHAKE:
            return
        self.state = UP
        self.attempts = 0
        if self.ever_up:
            log.warning("Redis is reachable again (%s:%d)", self.address.host, self.address.port)
        else:
            log.info("connected to Redis at %s:%d", self.address.host, self.address.port)
        self.ever_up = True
        self.channels.clear()
        self.came_up()  # re-subscribes every pattern held here (send_interest)
        for topic, (epoch, seq) in list(self.positions.items()):
            self._fill(topic, epoch, seq)

    def on_event(self, mask: int) -> None:
        try:
            if self.state == CONNECTING:
                if mask & (select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP):
                    assert self.sock is not None
                    err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err and self._next_address():
                        return
                    if err:
                        raise _LostError(f"connect: {errno.errorcode.get(err, str(err))}")
                    self._connected()
                return
            if mask & select.EPOLLOUT:
                self._write()
            if mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR | select.EPOLLRDHUP):
                self._read()
        except _LostError as exc:
            self._lost(str(exc))
        except (OSError, hiredis.ProtocolError) as exc:
            self._lost(f"{type(exc).__name__}: {exc}")

    def _read(self) -> None:
        sock = self.sock
        assert sock is not None
        try:
            data = self.read_buffer.recv(sock)  # net/reads.py
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            raise _LostError("Redis closed the connection")
        if self.ssl is not None:
            assert self.incoming is not None
            self.incoming.write(data)
            self._tls_step()
            if not self._tls_done:
                return
            chunks = []
            buffer = self.read_buffer  # free again: `data` was a copy of it
            try:
                while True:
                    n: int = self.ssl.read(READ_SIZE, buffer.buf)  # type: ignore[assignment]
                    chunks.append(buffer.view[:n].tobytes())
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                raise _LostError("Redis closed the TLS session") from None
            except ssl.SSLError as exc:
                raise _LostError(f"TLS: {exc}") from None
            self._tls_step()
            data = b"".join(chunks)
            if not data:
                return
        reader = self.reader
        reader.feed(data)
        replies = self.replies
        push = hiredis.PushNotification
        while True:
            reply = reader.gets()
            if reply is False:
                break
            if type(reply) is push:
                self._push(reply)
                continue
            if not replies:
                raise _LostError("a reply nobody asked for")
            done = replies.popleft()
            if type(done) is _Publish:
                self._published(done, reply)
            elif done is not None:
                done(reply)  # type: ignore[operator]
            if self.state == DOWN:  # a callback gave up on the connection
                return

    def _tls_step(self) -> None:
        """Drive the TLS handshake; move the records OpenSSL made to `_cipher`, to be sent."""
        assert self.ssl is not None and self.outgoing is not None
        if not self._tls_done:
            try:
                self.ssl.do_handshake()
                self._tls_done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                raise _LostError(f"TLS handshake: {exc}") from None
        pending = self.outgoing.read()
        if pending:
            self._cipher += pending

    def command(self, args: list[Any], done: Reply | _Publish | None) -> None:
        """Queue one command; `done` gets its reply (None: the reply is dropped)."""
        self.out += hiredis.pack_command(tuple(args))
        self.replies.append(done)
        self.messages_out += 1

    def _subscription(self, args: list[Any]) -> None:
        """(S|P)(UN)SUBSCRIBE: RESP3 answers these with a push, not a reply."""
        self.out += hiredis.pack_command(tuple(args))

    def flush(self) -> None:
        """Once per loop iteration: write what the iteration queued, in one send."""
        self.stats.backplane_sent = self.messages_out
        self.stats.backplane_received = self.messages_in
        if self.state < HANDSHAKE or not (self.out or self._cipher):
            return
        try:
            self._write()
        except _LostError as exc:
            self._lost(str(exc))
        except OSError as exc:
            self._lost(f"{type(exc).__name__}: {exc}")

    def _write(self) -> None:
        sock = self.sock
        assert sock is not None
        if self.ssl is not None:
            self._tls_step()
            if self.out and self._tls_done:
                self.ssl.write(bytes(self.out))
                self.out.clear()
                self._tls_step()
            data = self._cipher
            if data:
                try:
                    sent = sock.send(data)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                self._cipher = data[sent:]
            pending = bool(self._cipher)
        else:
            out = self.out
            if out:
                try:
                    sent = sock.send(out)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                del out[:sent]
            pending = bool(out)
        want = select.EPOLLIN | select.EPOLLRDHUP | (select.EPOLLOUT if pending else 0)
        if want != self.mask:
            self.mask = want
            self.loop.modify(self.fd, want)

    def _failed(self, why: str) -> None:
        self._lost(why)

    def _lost(self, why: str) -> None:
        """The connection failed or broke: fail what is in flight, try again later."""
        if self.state == DOWN:
            return  # already lost (a failing callback reports it again)
        was_up = self.state == UP
        if self.sock is not None:
            self.loop.unregister(self.fd)
            self.sock.close()
            self.sock = None
        self.state = DOWN
        self.ssl = None
        self._tls_done = False
        self._cipher = b""
        self.out.clear()
        replies, self.replies = self.replies, deque()
        self.filling.clear()  # re-read from `positions` on the next connection
        self._ping_sent = 0.0
        if was_up:
            log.warning("lost Redis (%s): publishes are refused until it is back", why)
        elif self.attempts <= 1 or self.attempts % 20 == 0:
            addr = self.address
            log.warning("cannot reach Redis at %s:%d: %s", addr.host, addr.port, why)
        if self.ever_up:
            self.reconnects += 1
        self.went_down()
        for done in replies:
            with contextlib.suppress(Exception):
                if type(done) is _Publish:
                    self._published(done, None)
                elif done is not None:
                    done(None)  # type: ignore[operator]
        # Capped exponential backoff with jitter: nodes that lost Redis together do not all
        # knock at the same instant when it comes back.
        delay = min(BACKOFF_CAP, BACKOFF_FIRST * (2 ** min(self.attempts, 16)))
        self._timer = self.loop.call_later(random.uniform(delay / 2, delay), self.connect)

    def _tick(self) -> None:
        """Once a second: a PING for the round trip, and give up on a silent Redis."""
        self.loop.call_later(PING_INTERVAL, self._tick)
        now = self.loop.now
        if self.state in (CONNECTING, HANDSHAKE):
            if now > self._deadline:
                # Still looking the name up: the attempt fails as a silent connect would.
                what = "no address for " + self.address.host if self.sock is None else "no answer"
                self._lost(f"{what} within {self.config.redis_timeout:g} s")
            return
        if self.state != UP:
            return
        if self._ping_sent:
            if now - self._ping_sent > self.config.redis_timeout:
                self._lost(f"no PING reply within {self.config.redis_timeout:g} s")
            return
        self._ping_sent = time.monotonic()
        self.command(["PING"], self._pong)

    def _pong(self, reply: Any) -> None:
        if reply is not None and self._ping_sent:
            self.rtt = time.monotonic() - self._ping_sent
        self._ping_sent = 0.0

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.sock is not None:
            self.loop.unregister(self.fd)
            self.sock.close()
            self.sock = None
        self.state = DOWN

    # -- Backplane ---------------------------------------------------------------------------

    def congested(self) -> bool:
        return self.state != UP or len(self.out) > self.config.redis_buffer

    def buffered_bytes(self) -> int:
        return len(self.out) + len(self._cipher)

    def send_interest(self, pattern: str, encoding: int, add: bool) -> None:
        channels = self.channels
        count = channels.get(pattern, 0)
        concrete = not is_pattern(pattern)
        if add:
            channels[pattern] = count + 1
            if count:
                return
            if concrete:
                self._subscription(["SSUBSCRIBE", self._shard_channel(pattern)])
                self.positions.setdefault(pattern, ("", -1))
            else:
                self._subscription(["PSUBSCRIBE", f"{self.prefix}:{pattern_glob(pattern)}"])
            return
        if count > 1:
            channels[pattern] = count - 1
            return
        channels.pop(pattern, None)
        if concrete:
            self.positions.pop(pattern, None)
            self.filling.pop(pattern, None)
            if self.state == UP:
                self._subscription(["SUNSUBSCRIBE", self._shard_channel(pattern)])
        elif self.state == UP:
            self._subscription(["PUNSUBSCRIBE", f"{self.prefix}:{pattern_glob(pattern)}"])

    def barrier(self, done: Reply) -> None:
        # Replies come in command order: once this PING's is here, Redis has run every
        # (P)SUBSCRIBE sent before it. Down: at once (the interest is sent when Redis is back).
        if self.state == UP:
            self.command(["PING"], done)
        else:
            done(None)

    def unwant(self, pattern: str, encoding: int) -> None:
        super().unwant(pattern, encoding)
        interest = self.interest
        if not self.up and (pattern, 0) not in interest and (pattern, 1) not in interest:
            # Down: no UNSUBSCRIBE to send, but the position must go (no gap fill for it).
            self.positions.pop(pattern, None)

    def _script(self, name: str, source: str, args: list[Any], done: Reply) -> None:
        sha = self._shas.get(name)

        def answer(reply: Any) -> None:
            if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
                if self.state == UP:
                    self.command(["EVAL", source, *args], done)
                    return
                reply = None
            done(reply)

        if sha is None:
            self.command(["EVAL", source, *args], done)
        else:
            self.command(["EVALSHA", sha, *args], answer)

    def send_publish(self, n: int, topic: str, data: Any, size: int) -> None:
        cfg = self.config
        base = f"{self.prefix}:{{{topic}}}"
        args = [
            2,
            base + ":s",
            base + ":h",
            pack(data),
            self._candidate,
            cfg.history_size,
            int(cfg.history_ttl * 1000),
            base,
            f"{self.prefix}:{topic}",
            int(cfg.redis_keep * 1000),
        ]
        sha = self._shas.get("publish")
        if sha is None:
            self.command(["EVAL", PUBLISH_SCRIPT, *args], _Publish(n, args))
        else:
            self.command(["EVALSHA", sha, *args], _Publish(n, args))

    def _new_candidate(self) -> None:
        self._candidate = new_epoch()
        self._candidate_b = self._candidate.encode()

    def _published(self, entry: _Publish, reply: Any) -> None:
        """Redis answered a publish (or the connection went: `reply` None)."""
        n = entry.n
        if type(reply) is list:
            epoch = reply[0]
            if epoch == self._candidate_b:
                self._new_candidate()
            if n:
                self.resolve(n, (epoch.decode(), reply[1], reply[2]))
        elif reply is None:
            if n:
                self.resolve(n, unavailable("Redis went away before confirming the publish"))
            else:  # no confirmation asked for; one lost in flight is at least counted
                self.failed += 1
        elif str(reply).startswith("NOSCRIPT") and self.state == UP:
            self.command(["EVAL", PUBLISH_SCRIPT, *entry.args], entry)
        else:
            # OOM (maxmemory), LOADING, BUSY, READONLY...: not made, the client may retry.
            self._refusals_logged += 1
            if self._refusals_logged <= 10 or self._refusals_logged % 1000 == 0:
                log.error("Redis refused a publish: %s", reply)
            if n:
                self.resolve(n, unavailable(f"Redis refused the publish: {reply}"))

    def _read_args(self, topic: str, create: bool, epoch: str, seq: int, limit: int) -> list[Any]:
        cfg = self.config
        h, s = self._keys(topic)
        return [
            2,
            h,
            s,
            "1" if create else "0",
            new_epoch(),
            epoch,
            seq,
            limit,
            int(cfg.history_ttl * 1000),
            int(cfg.redis_keep * 1000),
        ]

    def send_window(self, n: int, topic: str, encoding: int, since: Since | None) -> None:
        if since is None:
            args = self._read_args(topic, True, "-", 0, 0)
        else:
            args = self._read_args(topic, True, since.epoch, since.seq, 0)

        def done(reply: Any) -> None:
            if not isinstance(reply, list):
                self.resolve(n, self._read_error(reply))
                return
            epoch, seq, recovered = reply[0].decode(), reply[1], bool(reply[2])
            self._known(topic, epoch, seq)
            frames: list[bytes | None] = []
            if recovered and since is not None:
                enc = Encoding(encoding)
                for msg in reply[3]:
                    n_seq, _, payload = parse_message(msg)
                    try:
                        frames.append(messages.message(topic, unpack(payload), n_seq, enc))
                    except codec.EncodeError:
                        frames.append(None)
            self.resolve(n, (epoch, seq, recovered, frames))

        self._script("read", READ_SCRIPT, args, done)

    def send_history(
        self, n: int, topic: str, since: Since | None, limit: int, budget: int
    ) -> None:
        epoch, seq = ("", 0) if since is None else since
        # The script reads `limit` 0 as "all": for limit 0 ask for one and return none.
        args = self._read_args(topic, False, epoch, seq, limit or 1)

        def done(reply: Any) -> None:
            if not isinstance(reply, list):
                self.resolve(n, self._read_error(reply))
                return
            found = []
            left = budget
            for msg in reply[3] if limit else ():
                n_seq, _, payload = parse_message(msg)
                found.append((n_seq, unpack(payload)))
                left -= len(msg)
                if left <= 0:
                    break
            self.resolve(n, (reply[0].decode(), reply[1], bool(reply[2]), found))

        self._script("read", READ_SCRIPT, args, done)

    def _read_error(self, reply: Any) -> RequestError:
        if reply is None:
            return unavailable("Redis went away before answering")
        log.error("Redis refused a read: %s", reply)
        return unavailable(f"Redis refused the read: {reply}")

    def _known(self, topic: str, epoch: str, seq: int) -> None:
        """A position read from Redis for a topic held here: where its gap fill would start."""
        old = self.positions.get(topic)
        if old is not None and (old[0] != epoch or old[1] < seq):
            self.positions[topic] = (epoch, seq)

    # -- messages ----------------------------------------------------------------------------

    def _push(self, push: list[Any]) -> None:
        kind = push[0]
        if kind == b"smessage":
            channel, msg = push[1], push[2]
            topic_bytes = channel[len(self._shard_prefix) : -1]
        elif kind == b"pmessage":
            channel, msg = push[2], push[3]
            topic_bytes = channel[len(self._pattern_prefix) :]
        else:
            return  # subscribe confirmations
        self.messages_in += 1
        last = self._last
        if last is not None and last[0] == topic_bytes and last[1] == msg:
            return  # the same publish again, through another of our subscriptions
        self._last = (topic_bytes, msg)
        seq, epoch, payload = parse_message(msg)
        topic = topic_bytes.decode()
        filling = self.filling.get(topic) if self.filling else None
        if filling is not None:
            filling.append((seq, epoch, payload))
            return
        self._deliver(topic, seq, epoch, payload)

    def _deliver(self, topic: str, seq: int, epoch: str, payload: bytes) -> None:
        positions = self.positions
        if topic in positions:
            positions[topic] = (epoch, seq)
        router = self.router
        groups = router.sublist.match(topic)
        recovering = self.recovering.get(topic) if self.recovering else None
        if not (groups[0] or groups[1] or recovering):
            return  # over-matched by a glob, or its last subscriber just left
        data = unpack(payload)
        frames: list[bytes | None] = [None, None]
        for encoding in (Encoding.JSON, Encoding.MSGPACK):
            if groups[encoding] or recovering:
                with contextlib.suppress(codec.EncodeError):
                    frames[encoding] = messages.message(topic, data, seq, encoding)
        router.deliver(topic, seq, frames)

    def _fill(self, topic: str, epoch: str, seq: int) -> None:
        """After a reconnection: read what `topic` published since (epoch, seq), deliver it,
        then the live messages that arrived meanwhile."""
        if seq < 0:  # never had a position (its subscribe was never answered)
            return
        self.filling[topic] = []
        args = self._read_args(topic, True, epoch, seq, 0)

        def done(reply: Any) -> None:
            buffered = self.filling.pop(topic, None)
            if buffered is None or not isinstance(reply, list):
                return  # unsubscribed meanwhile, or the connection went again
            new_epoch_, last, recovered = reply[0].decode(), reply[1], bool(reply[2])
            if recovered:
                for msg in reply[3]:
                    n_seq, m_epoch, payload = parse_message(msg)
                    self._deliver(topic, n_seq, m_epoch, payload)
                self.stats.replayed += len(reply[3])
            else:
                log.warning(
                    "topic %r: Redis no longer holds what this node missed; closing its "
                    "subscribers so that they resubscribe",
                    topic,
                )
                if topic in self.positions:
                    self.positions[topic] = (new_epoch_, last)
                self.on_gap(topic)
            cur = self.positions.get(topic, (new_epoch_, last))
            for n_seq, m_epoch, payload in buffered:
                if m_epoch != cur[0] or n_seq > cur[1]:
                    self._deliver(topic, n_seq, m_epoch, payload)
                    cur = (m_epoch, n_seq)

        self._script("read", READ_SCRIPT, args, done)
