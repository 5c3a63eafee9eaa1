"""The hub of `--workers N`: the parent process numbers, retains and routes every message.

Theory of operation: the parent creates one socketpair per worker before starting it; the worker
inherits its end (`BROKER_WORKER_FD`). Both ends are non-blocking sockets in each side's epoll
loop, carrying a stream of msgpack arrays (no length prefix: msgpack's Unpacker finds the
boundaries). Each side appends what it has to say to one buffer and writes it once at the end
of the loop iteration, so a burst of publishes crosses in a few large writes.

    worker -> hub                                  hub -> worker
    ["i", pattern, encoding, add]                  ["m", topic, seq, json, msgpack, ack]
    ["p", n, topic, data, size]                    ["r", n, result]
    ["w", n, topic, encoding, epoch|None, seq]     ["c", k, what]    (send your metrics/stats/view)
    ["h", n, topic, epoch|None, seq, limit, budget]
    ["d", ack, delivered]   (after fanning out a message that carried an ack number)
    ["g", n, what]          (gather every process's "metrics" text, "stats" snapshot, or view:
                             ["view", path, params] for GET /connections and /topics)
    ["b", n]                (barrier: answered with ["r", n, None] once what came before is done)
    ["M", k, value]         (this worker's, for gathering k)
    ["u"]                   (this worker started: set up and listening)
    ["a"]                   (alive: a heartbeat from the worker's loop timer, see below)

The hub (`Hub`) keeps the positions and history (`LocalStreams`, as a single process does) and
a `Sublist` of (worker, encoding) targets built from the workers' interest messages: a publish is
numbered, encoded once per encoding some worker needs (and kept with its history entry), and sent
once to each worker with a matching subscriber, with the frames that worker needs. A publish
that wants an ack carries an ack number to each of those workers; each answers with how many it
delivered to, and the origin's `n` is resolved with the total once all have (or have died).
Since one socket carries both the messages and the answers, in order, a worker never sees a
message older than a position it was given after it (backplane.py's recovery buffer stays
empty of anything newer).

Liveness (`--worker-timeout`): once listening, a worker's loop sends ["a"] every
`heartbeat_interval` seconds from a timer, so a heartbeat proves the loop itself still turns (a
handler stuck in a loop, a SIGSTOP: no heartbeat). The hub notes when it last read anything from
each worker (`WorkerLink.seen`, once per recv, not per message); the supervisor's watch timer
kills a worker silent for longer than the timeout. One small message a second per worker, on a
timer: nothing is added to the publish path.

Bounds: a worker that stops reading its socket must not grow the hub without limit: past
`BUFFER_LIMIT` bytes queued to it, messages to it are dropped and counted
(`broker_hub_dropped_total`); a worker refuses publishes with `unavailable` when its own buffer
to the hub is past the same limit.
"""

from __future__ import annotations

import itertools
import json
import logging
import select
import socket
from collections.abc import Callable
from typing import Any

import msgpack

from broker.config import Config
from broker.metrics import Stats
from broker.net.reads import ReadBuffer
from broker.pubsub.backplane import Backplane
from broker.pubsub.history import LocalStreams
from broker.pubsub.router import Router, window_messages
from broker.pubsub.topics import Sublist
from broker.wire import codec, messages
from broker.wire.codec import Encoding
from broker.wire.messages import Since

log = logging.getLogger("broker.hub")

READ_SIZE = 1 << 20
BUFFER_LIMIT = 64 << 20
JSON_EXT = 1  # msgpack extension type: data msgpack cannot carry (an int over 64 bits), as JSON
GATHER_TIMEOUT = 2.0  # seconds the hub waits for workers' metrics before answering without them
HEARTBEAT = 1.0  # seconds between a worker's heartbeats (fewer than 4 per --worker-timeout: more)
_WANT = select.EPOLLIN | select.EPOLLRDHUP
_packb = msgpack.Packer(use_bin_type=True).pack


def heartbeat_interval(timeout: float) -> float:
    """Seconds between heartbeats (and between the supervisor's checks) for `--worker-timeout`:
    at least four fit in the timeout, so one late iteration is not taken for a hung loop."""
    return min(HEARTBEAT, timeout / 4)


def _ext_hook(code: int, data: bytes) -> Any:
    if code == JSON_EXT:
        return json.loads(data)
    return msgpack.ExtType(code, data)


def _unpacker() -> msgpack.Unpacker:
    return msgpack.Unpacker(
        raw=False,
        strict_map_key=False,
        timestamp=0,
        ext_hook=_ext_hook,
        max_buffer_size=BUFFER_LIMIT * 2,
    )


def pack(message: list[Any]) -> bytes:
    """One channel message; data msgpack cannot carry travels as JSON in an extension."""
    try:
        return _packb(message)
    except (OverflowError, ValueError, TypeError):
        return _packb([_portable(x) for x in message])


def _portable(value: Any) -> Any:
    try:
        _packb(value)
    except (OverflowError, ValueError, TypeError):
        if isinstance(value, list):
            return [_portable(x) for x in value]
        return msgpack.ExtType(JSON_EXT, json.dumps(value).encode())
    return value


class Channel:
    """One end of a socketpair in an epoll loop: buffered writes, flushed once per iteration."""

    def __init__(
        self, sock: socket.socket, register: Callable[[int, Any, int], int], handler: Any
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        self.out = bytearray()
        self.unpacker = _unpacker()
        self.reader = ReadBuffer(READ_SIZE)
        self.closed = False
        self.mask = _WANT
        self.sent_messages = 0
        self.received_messages = 0
        register(self.fd, handler, self.mask)

    def send(self, message: list[Any]) -> None:
        self.out += pack(message)
        self.sent_messages += 1

    def read(self) -> list[Any] | None:
        """The messages one recv brought; None at EOF or on an error."""
        try:
            data = self.reader.recv(self.sock)  # net/reads.py
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            return None
        if not data:
            return None
        self.unpacker.feed(data)
        found = list(self.unpacker)
        self.received_messages += len(found)
        return found

    def flush(self, modify: Callable[[int, int], None]) -> None:
        out = self.out
        if out and not self.closed:
            try:
                sent = self.sock.send(out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                return  # the reader sees the EOF
            del out[:sent]
        mask = _WANT | select.EPOLLOUT if out else _WANT
        if mask != self.mask and not self.closed:
            self.mask = mask
            modify(self.fd, mask)


# -- the worker's side ---------------------------------------------------------------------------


class HubLink(Backplane):
    """A worker's backplane: the socket to its parent's hub. With `--redis` too, Redis is the
    router's backplane and this link only gathers metrics (the hub then routes nothing)."""

    def __init__(self, sock: socket.socket, loop: Any, router: Router, stats: Stats) -> None:
        super().__init__()
        self.loop = loop
        self.router = router
        self.stats = stats
        self.channel = Channel(sock, self._register, self)
        self.render_metrics: Callable[[], bytes] = lambda: b""
        self.render_stats: Callable[[], dict[str, Any]] = dict
        # GET /connections and /topics of this worker: (path, query parameters) -> JSON value;
        # and given topics' [rate, subscribers] here, for the second round of /topics.
        self.render_view: Callable[[str, dict[str, str]], Any] = lambda path, params: {}
        self.render_topics: Callable[[list[str], str], dict[str, list[float]]] = (
            lambda names, sort: {}
        )
        self.on_lost: Callable[[], None] = lambda: None
        self._beat_every = HEARTBEAT
        loop.after_events.append(self.flush)
        self.came_up()

    def _register(self, fd: int, handler: Any, mask: int) -> int:
        return int(self.loop.register(fd, handler, mask))

    # -- Backplane ---------------------------------------------------------------------------

    def congested(self) -> bool:
        return len(self.channel.out) > BUFFER_LIMIT

    def buffered_bytes(self) -> int:
        return len(self.channel.out)

    def send_interest(self, pattern: str, encoding: int, add: bool) -> None:
        self.channel.send(["i", pattern, encoding, add])

    def send_publish(self, n: int, topic: str, data: Any, size: int) -> None:
        self.channel.send(["p", n, topic, data, size])

    def send_window(self, n: int, topic: str, encoding: int, since: Since | None) -> None:
        if since is None:
            self.channel.send(["w", n, topic, encoding, None, 0])
        else:
            self.channel.send(["w", n, topic, encoding, since.epoch, since.seq])

    def send_history(
        self, n: int, topic: str, since: Since | None, limit: int, budget: int
    ) -> None:
        epoch, seq = (None, 0) if since is None else since
        self.channel.send(["h", n, topic, epoch, seq, limit, budget])

    def barrier(self, done: Callable[[Any], None]) -> None:
        # The hub handles one link's messages in order: its answer to this comes after it took
        # every interest change sent before it, so a publish made anywhere after the ack of a
        # wildcard subscribe reaches that subscriber.
        if self.channel.closed or not self.up:
            done(None)
            return
        n = next(self._numbers)
        self.pending[n] = done
        self.channel.send(["b", n])

    def ready(self) -> None:
        """Tell the supervisor this worker started (set up and listening); from now on it holds
        the worker to --worker-timeout, so the heartbeats start here."""
        self.channel.send(["u"])
        timeout = self.router.config.worker_timeout
        if timeout > 0:
            self._beat_every = heartbeat_interval(timeout)
            self.loop.call_later(self._beat_every, self._beat)

    def _beat(self) -> None:
        # Sent from a loop timer, not a thread: a loop that stops turning stops the heartbeats.
        if self.channel.closed:
            return
        self.channel.send(["a"])
        self.loop.call_later(self._beat_every, self._beat)

    def gather_metrics(self, done: Callable[[bytes], None]) -> None:
        """Every process's metrics, labelled by worker (answered by the hub)."""
        if self.channel.closed:
            done(self.render_metrics())
            return
        n = next(self._numbers)
        self.pending[n] = lambda result: done(
            result if isinstance(result, bytes) else self.render_metrics()
        )
        self.channel.send(["g", n, "metrics"])

    def gather_stats(self, done: Callable[[dict[str, Any]], None]) -> None:
        """/stats for the whole host: every worker's snapshot, summed by the hub."""
        if self.channel.closed:
            done(self.render_stats())
            return
        n = next(self._numbers)
        self.pending[n] = lambda result: done(
            result if isinstance(result, dict) else self.render_stats()
        )
        self.channel.send(["g", n, "stats"])

    def gather_view(self, path: str, params: dict[str, str], done: Callable[[Any], None]) -> None:
        """GET /connections or /topics for the whole host: every worker's list, merged by the
        hub (`merge_view`). The caller has checked `params` against its own view."""
        if self.channel.closed:
            done(self.render_view(path, params))
            return
        n = next(self._numbers)
        self.pending[n] = lambda result: done(
            result if isinstance(result, dict) else self.render_view(path, params)
        )
        self.channel.send(["g", n, ["view", path, params]])

    # -- the loop ----------------------------------------------------------------------------

    def on_event(self, mask: int) -> None:
        channel = self.channel
        if mask & select.EPOLLOUT:
            channel.flush(self.loop.modify)
        if not mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR | select.EPOLLRDHUP):
            return
        found = channel.read()
        if found is None:
            self._lost()
            return
        deliver = self.router.deliver
        for message in found:
            kind = message[0]
            try:
                if kind == "m":
                    count = deliver(message[1], message[2], [message[3], message[4]])
                    if message[5]:
                        channel.send(["d", message[5], count])
                elif kind == "r":
                    self.resolve(message[1], message[2])
                elif kind == "c":
                    what = message[2]
                    if what == "metrics":
                        value: Any = self.render_metrics()
                    elif what == "stats":
                        value = self.render_stats()
                    elif what[0] == "view":  # [_, path, params]: the origin checked them
                        value = self.render_view(what[1], what[2])
                    else:  # ["topics", names, sort, _]: [rate, subscribers] of each
                        value = self.render_topics(what[1], what[2])
                    channel.send(["M", message[1], value])
            except Exception:
                self.stats.internal_errors += 1
                log.exception("error handling a message from the hub")
        if self.stats.backplane is self:  # with --redis too, Redis is the backplane
            self.stats.backplane_received = channel.received_messages

    def flush(self) -> None:
        self.channel.flush(self.loop.modify)
        if self.stats.backplane is self:
            self.stats.backplane_sent = self.channel.sent_messages

    def _lost(self) -> None:
        channel = self.channel
        if channel.closed:
            return
        channel.closed = True
        self.loop.unregister(channel.fd)
        channel.sock.close()
        log.error("lost the hub (the parent process); shutting down")
        self.went_down()
        self.on_lost()


# -- the parent's side ---------------------------------------------------------------------------


class Target:
    """A (worker, encoding) pair in the hub's sublist."""

    __slots__ = ("encoding", "link")

    def __init__(self, link: WorkerLink, encoding: int) -> None:
        self.link = link
        self.encoding = encoding


class WorkerLink:
    """The hub's end of one worker's socketpair."""

    def __init__(self, hub: Hub, index: int, sock: socket.socket) -> None:
        self.hub = hub
        self.index = index
        self.targets = (Target(self, 0), Target(self, 1))
        self.patterns: set[tuple[str, int]] = set()
        self.channel = Channel(sock, hub.loop.register, self)
        self.seen = hub.loop.now  # when the hub last read from this worker (--worker-timeout)

    def on_event(self, mask: int) -> None:
        if mask & select.EPOLLOUT:
            self.channel.flush(self.hub.loop.modify)
        if not mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR | select.EPOLLRDHUP):
            return
        found = self.channel.read()
        if found is None:
            self.hub.detach(self)
            return
        self.seen = self.hub.loop.now  # any message proves the worker alive, not only ["a"]
        handle = self.hub.handle
        for message in found:
            try:
                handle(self, message)
            except Exception:
                self.hub.stats.internal_errors += 1
                log.exception("error handling a message from worker %d", self.index)

    def send(self, message: list[Any]) -> None:
        channel = self.channel
        if len(channel.out) > BUFFER_LIMIT:
            self.hub.dropped += 1
            return
        channel.send(message)

    def send_packed(self, data: bytes) -> None:
        channel = self.channel
        if len(channel.out) > BUFFER_LIMIT:
            self.hub.dropped += 1
            return
        channel.out += data
        channel.sent_messages += 1


class Hub:
    """The parent's routing state: positions, history, and who wants what."""

    def __init__(self, config: Config, loop: Any, stats: Stats) -> None:
        self.config = config
        self.loop = loop
        self.stats = stats
        self.streams = LocalStreams(
            config.history_size,
            config.history_ttl,
            config.history_memory,
            config.seq_topics,
            stats.history_evictions,
        )
        self.sublist: Sublist[Target] = Sublist(
            lambda t: t.encoding, groups=len(Encoding), cache_size=config.topic_cache_size
        )
        self.links: dict[int, WorkerLink] = {}
        # ack number -> [origin link, n, epoch, seq, workers still to answer, delivered, links]
        self.acks: dict[int, list[Any]] = {}
        self._acks = itertools.count(1)
        # gathering k -> [origin link, n, {worker: value}, workers still to answer, timer, what]
        self.gathers: dict[int, list[Any]] = {}
        self._gathers = itertools.count(1)
        self.render_own: Callable[[], bytes] = lambda: b""
        self.on_detach: Callable[[int], None] = lambda index: None
        self.on_ready: Callable[[int], None] = lambda index: None
        self.dropped = 0
        loop.after_events.append(self.flush)
        loop.call_later(1.0, self._expire)

    def attach(self, index: int, sock: socket.socket) -> WorkerLink:
        link = self.links[index] = WorkerLink(self, index, sock)
        return link

    def detach(self, link: WorkerLink) -> None:
        """A worker's socket closed (it exited or died): forget its interest and answers."""
        if self.links.get(link.index) is not link:
            return
        del self.links[link.index]
        channel = link.channel
        channel.closed = True
        self.loop.unregister(channel.fd)
        channel.sock.close()
        for pattern, encoding in link.patterns:
            self.sublist.remove(pattern, link.targets[encoding])
        link.patterns.clear()
        for number, ack in list(self.acks.items()):
            if link in ack[6]:
                ack[6].remove(link)
                ack[4] -= 1
                if ack[4] <= 0:
                    self._acked(number)
        for k, gather in list(self.gathers.items()):
            if link.index in gather[3]:
                gather[3].discard(link.index)
                if not gather[3]:
                    self._gathered(k)
        self.on_detach(link.index)

    def flush(self) -> None:
        modify = self.loop.modify
        for link in self.links.values():
            if link.channel.out:
                link.channel.flush(modify)

    def _expire(self) -> None:
        self.streams.expire(self.loop.now)
        self.loop.call_later(1.0, self._expire)

    # -- requests ----------------------------------------------------------------------------

    def handle(self, link: WorkerLink, message: list[Any]) -> None:
        kind = message[0]
        if kind == "p":
            self.publish(link, message[1], message[2], message[3], message[4])
        elif kind == "d":
            ack = self.acks.get(message[1])
            if ack is not None and link in ack[6]:
                ack[6].remove(link)
                ack[5] += message[2]
                ack[4] -= 1
                if ack[4] <= 0:
                    self._acked(message[1])
        elif kind == "i":
            _, pattern, encoding, add = message
            key = (pattern, encoding)
            if add:
                link.patterns.add(key)
                self.sublist.insert(pattern, link.targets[encoding])
            elif key in link.patterns:
                link.patterns.discard(key)
                self.sublist.remove(pattern, link.targets[encoding])
        elif kind == "w":
            self._window(link, message)
        elif kind == "h":
            _, n, topic, epoch, seq, limit, budget = message
            window = self.streams.since(topic, epoch, seq, limit, self.loop.now)
            found = window_messages(window, budget)
            link.send(["r", n, [window.epoch, window.seq, window.recovered, found]])
        elif kind == "b":
            link.send(["r", message[1], None])
        elif kind == "g":
            self._gather(link, message[1], message[2])
        elif kind == "u":
            self.on_ready(link.index)
        elif kind == "a":
            pass  # a heartbeat: reading it set link.seen, which is all it is for
        elif kind == "M":
            gather = self.gathers.get(message[1])
            if gather is not None and link.index in gather[3]:
                gather[2][str(link.index)] = message[2]
                gather[3].discard(link.index)
                if not gather[3]:
                    self._gathered(message[1])

    def publish(self, origin: WorkerLink, n: int, topic: str, data: Any, size: int) -> None:
        """Number, retain and route one message; `n` > 0 wants the total delivered back."""
        stats = self.stats
        stats.published += 1
        streams = self.streams
        entry = streams.append(topic, data, size, self.loop.now)
        seq = entry.seq
        frames: dict[WorkerLink, list[bytes | None]] = {}
        for encoding, targets in enumerate(self.sublist.match(topic)):
            if not targets:
                continue
            try:
                frame: bytes | None = messages.message(topic, data, seq, Encoding(encoding))
            except codec.EncodeError:
                frame = None
            if frame is not None:
                streams.keep(entry, encoding, frame)
            for target in targets:
                slot = frames.get(target.link)
                if slot is None:
                    slot = frames[target.link] = [None, None]
                slot[encoding] = frame
        ack = 0
        if n and frames:
            ack = next(self._acks)
            epoch = entry.stream.epoch if entry.stream is not None else streams.position(topic)[0]
            self.acks[ack] = [origin, n, epoch, seq, len(frames), 0, list(frames)]
        # Workers that need the same encodings get the same bytes: packed once.
        packed: dict[tuple[bool, bool], bytes] = {}
        for link, (f0, f1) in frames.items():
            key = (f0 is None, f1 is None)
            data = packed.get(key)
            if data is None:
                data = packed[key] = pack(["m", topic, seq, f0, f1, ack])
            link.send_packed(data)
        stats.delivered += len(frames)  # messages forwarded to workers
        if n and not frames:
            epoch = streams.position(topic)[0]
            origin.send(["r", n, [epoch, seq, 0]])

    def _acked(self, number: int) -> None:
        origin, n, epoch, seq, _, delivered, _ = self.acks.pop(number)
        link: WorkerLink = origin
        if self.links.get(link.index) is link:
            link.send(["r", n, [epoch, seq, delivered]])

    def _window(self, link: WorkerLink, message: list[Any]) -> None:
        _, n, topic, encoding, epoch, seq = message
        streams = self.streams
        position = streams.position(topic)  # a subscribe creates the topic's stream
        if epoch is None:
            link.send(["r", n, [position[0], position[1], False, []]])
            return
        window = streams.since(topic, epoch, seq, None, self.loop.now)
        frames = [streams.frame(e, topic, Encoding(encoding)) for e in window.entries]
        link.send(["r", n, [window.epoch, window.seq, window.recovered, frames]])

    # -- metrics -----------------------------------------------------------------------------

    def _gather(self, origin: WorkerLink, n: int, what: Any) -> None:
        k = next(self._gathers)
        waiting = set(self.links)
        timer = self.loop.call_later(GATHER_TIMEOUT, lambda: self._gathered(k))
        self.gathers[k] = [origin, n, {}, waiting, timer, what]
        for link in self.links.values():
            link.send(["c", k, what])

    def _gathered(self, k: int) -> None:
        gather = self.gathers.pop(k, None)
        if gather is None:
            return
        origin, n, found, _, timer, what = gather
        timer.cancel()
        if what == "metrics":
            found["hub"] = self.render_own()
            merged: Any = merge_metrics(found)
        elif what == "stats":
            merged = merge_stats(found)
            merged["workers_running"] = len(self.links)
        elif what[0] == "view" and what[1] == "/topics":
            # Round 1 chose the topics; round 2 asks every worker for their exact figures.
            chosen = merge_view(what[1], what[2], found)
            names = [t["topic"] for t in chosen["topics"]]
            if names:
                self._gather(origin, n, ["topics", names, chosen["sort"], chosen["interval_s"]])
                return
            merged = chosen
        elif what[0] == "topics":
            merged = merge_topic_figures(what[1], what[2], what[3], found)
        else:
            merged = merge_view(what[1], what[2], found)
        link: WorkerLink = origin
        if self.links.get(link.index) is link:
            link.send(["r", n, merged])


def merge_stats(snapshots: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """/stats for the host: counts and rates summed over workers, the busiest topics merged,
    and each worker's own figures under "workers" (topics: the most any worker holds, as the
    same pattern may be subscribed on several)."""
    merged: dict[str, Any] = {}
    busiest: dict[str, float] = {}
    for snap in snapshots.values():
        for key, value in snap.items():
            if key == "busiest_topics":
                for entry in value:
                    busiest[entry["topic"]] = busiest.get(entry["topic"], 0.0) + entry["per_s"]
            elif key in ("topics", "uptime_s"):
                merged[key] = max(merged.get(key, 0), value)
            elif isinstance(value, int | float) and key not in ("worker", "pid"):
                merged[key] = merged.get(key, 0) + value
    top = sorted(busiest.items(), key=lambda kv: -kv[1])[:10]
    merged["busiest_topics"] = [{"topic": t, "per_s": r} for t, r in top]
    merged["workers"] = [
        {"worker": s.get("worker"), "pid": s.get("pid"), "connections": s.get("connections")}
        for _, s in sorted(snapshots.items())
    ]
    return merged


# How GET /connections orders its entries (server.py ranks its own the same way).
_CONNECTION_KEYS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "lag": lambda c: (c["queue_age_s"], c["queued_bytes"]),
    "age": lambda c: c["connected_s"],
    "dropped": lambda c: (c["dropped"], c["queued_bytes"]),
}


def merge_view(path: str, params: dict[str, str], views: dict[str, Any]) -> dict[str, Any]:
    """GET /connections or /topics for the host, from each worker's answer to the same request.

    /connections is exact: each connection lives in one worker, so the host's first `limit` are
    among the workers' first `limit`; each entry says its `worker` (ids are per worker). For
    /topics this is the first round: it ranks the topics of the workers' first `limit` by their
    summed figures; the second asks every worker for the chosen ones' exact figures
    (`merge_topic_figures`). A topic outside every worker's first `limit` can still be missed
    (docs/protocol.md)."""
    limit = int(params.get("limit", 0)) or None
    answers = sorted(views.items(), key=lambda kv: int(kv[0]))
    if path == "/connections":
        sort = params.get("sort", "lag")
        entries = [
            {**entry, "worker": int(worker)}
            for worker, view in answers
            for entry in view.get("connections", ())
        ]
        entries.sort(key=_CONNECTION_KEYS[sort], reverse=True)
        total = sum(view.get("total", 0) for _, view in answers)
        return {"total": total, "sort": sort, "connections": entries[:limit]}
    sort = params.get("sort", "rate")
    topics: dict[str, dict[str, Any]] = {}
    interval = 0.0
    for _, view in answers:
        interval = max(interval, view.get("interval_s", 0.0))
        for entry in view.get("topics", ()):
            merged = topics.setdefault(
                entry["topic"], {"topic": entry["topic"], "rate": 0.0, "subscribers": 0}
            )
            merged["rate"] += entry["rate"]
            merged["subscribers"] += entry["subscribers"]
    ranked = sorted(
        topics.values(), key=lambda t: t["rate" if sort == "rate" else "subscribers"], reverse=True
    )
    return {"sort": sort, "interval_s": interval, "topics": ranked[:limit]}


def merge_topic_figures(
    names: list[str], sort: str, interval: float, figures: dict[str, dict[str, list[float]]]
) -> dict[str, Any]:
    """The second round of /topics: the chosen topics with each worker's [rate, subscribers]
    summed, ranked again (a worker that did not answer counts nothing)."""
    topics: list[dict[str, Any]] = []
    for name in names:
        rate = subscribers = 0.0
        for answer in figures.values():
            rate_here, subscribers_here = answer.get(name, (0.0, 0))
            rate += rate_here
            subscribers += subscribers_here
        topics.append({"topic": name, "rate": rate, "subscribers": int(subscribers)})
    key = "rate" if sort == "rate" else "subscribers"
    topics.sort(key=lambda t: t[key], reverse=True)
    return {"sort": sort, "interval_s": interval, "topics": topics}


def merge_metrics(texts: dict[str, bytes]) -> bytes:
    """Prometheus texts of several processes as one, each sample labelled `worker="<name>"`.

    The text format wants a family's samples together under one HELP/TYPE, so the texts are
    split into families (a family starts at its `# HELP` line) and joined family by family."""
    families: dict[str, list[str]] = {}
    for worker in sorted(texts, key=lambda w: (not w.isdigit(), int(w) if w.isdigit() else 0)):
        label = f'worker="{worker}"'
        current: list[str] | None = None
        for line in texts[worker].decode().splitlines():
            if line.startswith("# HELP "):
                name = line.split(" ", 3)[2]
                current = families.get(name)
                if current is None:
                    current = families[name] = [line]
                    header = True
                else:
                    header = False
                continue
            if line.startswith("#"):
                if current is not None and header and line.startswith("# TYPE "):
                    current.append(line)
                continue
            if current is None or not line:
                continue
            brace = line.find("{")
            space = line.find(" ")
            if brace != -1 and (space == -1 or brace < space):
                rest = line[brace + 1 :]
                comma = "" if rest.startswith("}") else ","
                current.append(f"{line[: brace + 1]}{label}{comma}{rest}")
            else:
                current.append(f"{line[:space]}{{{label}}}{line[space:]}")
    out = []
    for lines in families.values():
        out.extend(lines)
    return ("\n".join(out) + "\n").encode()
