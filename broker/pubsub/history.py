"""Positions and history of concrete topics: an epoch, a seq and a bounded ring of recent messages.

Theory of operation: every concrete topic the broker sees (a subscribe or a publish; a history read
creates none) has a `Stream`: an `epoch`, a short random string, and `seq`, the number of its latest
message (0 before the first). A pair (epoch, seq) names one message for good: the epoch is drawn
anew whenever a counter starts over (a forgotten topic, a broker restart), so an old pair can never
name a new message. A publish numbers the message (`append`) and keeps it in the stream's ring
together with what fan-out made of it: the complete delivery frame per encoding
(`Entry.json`/`.msgpack`, by `keep`). A replay therefore writes the very bytes that live subscribers
got; a frame for an encoding that had no subscriber is made once, by the first replay that needs it
(`frame`).

Limits, each counted in `Stats.history_evictions[reason]` (messages removed; the reasons are
`metrics.HISTORY_EVICTION_REASONS`):

    size       `--history-size` messages per topic (0: no history; positions still exist)
    ttl        `--history-ttl` seconds (0: no time limit); an expired message is never served.
               Its memory goes at the topic's next publish or read, or with the whole ring once
               the topic's newest message expired (`expire`, called once a second)
    memory     `--history-memory` bytes for all rings: past it, the least recently published
               topic loses its messages (oldest first), then the next least recently published
    forgotten  positions are kept for `--seq-topics` topics (least recently published or created
               go first); a forgotten topic gets a new epoch when seen again, and its ring goes

Memory accounting: an entry counts `ENTRY_OVERHEAD` (the entry with its slots, its deque slot and
the data object's header, measured with tracemalloc), the size of the request that carried it (a
stand-in for the decoded data object, known without encoding anything) and the length of each
frame it holds. The ring of a topic is contiguous: messages leave from the old end only, so
"every message after seq N is still here" is one comparison with the oldest one's seq.

The seam (issue 10): the router sees only the `Streams` protocol: `append` numbers and retains a
message, `keep` stores the frame fan-out made, `position` tells where a topic stands, `since`
answers recovery and history requests, `frame` gives an entry's frame in an encoding, `expire` is
the clock. `LocalStreams` is the in-process implementation. A Redis-backed one replaces it for a
cluster: `append` becomes the atomic step in Redis (INCR the seq, append to a capped stream,
PUBLISH), `since` reads that stream, and the `Entry` objects it returns keep the same role of a
local frame cache."""

from __future__ import annotations

import itertools
import secrets
from collections import OrderedDict, deque
from typing import Any, NamedTuple, Protocol

from broker.wire import codec, messages
from broker.wire.codec import Encoding

ENTRY_OVERHEAD = 200
EPOCH_BYTES = 6  # 8 url-safe characters: 48 random bits


def new_epoch() -> str:
    return secrets.token_urlsafe(EPOCH_BYTES)


class Entry:
    """One retained message: its seq, when it was published, its data and its frames."""

    # One slot per encoding rather than a list: one object less to make and free per message.
    __slots__ = ("at", "data", "json", "msgpack", "seq", "size", "stream")

    def __init__(self, seq: int, data: Any, at: float, size: int) -> None:
        self.seq = seq
        self.data = data
        self.at = at
        self.size = size  # bytes counted against --history-memory
        self.json: bytes | None = None  # the delivery frame per encoding, once made
        self.msgpack: bytes | None = None
        self.stream: Stream | None = None  # the ring it was kept in (None: history off)


class Stream:
    """A concrete topic's position and its ring of retained messages, oldest first."""

    __slots__ = ("entries", "epoch", "held_bytes", "seq", "topic")

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.epoch = new_epoch()
        self.seq = 0
        # Made at the first message kept and dropped when emptied: an idle position costs
        # ~250 bytes, an empty deque alone would cost 600.
        self.entries: deque[Entry] | None = None
        self.held_bytes = 0


class Window(NamedTuple):
    """The answer to `since`: the topic's position, whether the request could be served without
    a gap, and the entries (after the requested seq when recovered, else the oldest retained)."""

    epoch: str
    seq: int
    recovered: bool
    entries: list[Entry]


class Streams(Protocol):
    """What the router needs from positions and history; see the module docstring (the seam)."""

    messages: int  # retained, for the metrics
    held_bytes: int

    @property
    def topics(self) -> int:
        """Topics holding history."""

    def append(self, topic: str, data: Any, size: int, now: float) -> Entry:
        """Number the next message of `topic`; `size` is its request's size in bytes."""

    def keep(self, entry: Entry, encoding: int, frame: bytes) -> None:
        """Keep the frame fan-out made for `entry` in `encoding`."""

    def position(self, topic: str) -> tuple[str, int]:
        """(epoch, seq) of `topic`, creating its stream if it is new."""

    def since(
        self, topic: str, epoch: str | None, seq: int, limit: int | None, now: float
    ) -> Window:
        """The messages of `topic` after (epoch, seq), at most `limit`; epoch None = the
        oldest retained. A topic not known yet is not created (its epoch is not kept)."""

    def frame(self, entry: Entry, topic: str, encoding: Encoding) -> bytes | None:
        """The delivery frame of `entry` in `encoding` (made once), None if unencodable."""

    def expire(self, now: float) -> None:
        """Drop what the TTL has expired."""


class LocalStreams:
    """Positions and rings in this process. Not thread-safe; the loop owns it."""

    def __init__(
        self, size: int, ttl: float, memory: int, max_topics: int, evictions: dict[str, int]
    ) -> None:
        self.size = size
        self.ttl = ttl
        self.memory = memory
        self.max_topics = max(1, max_topics)
        self.evictions = evictions
        # Every known stream, least recently published (or created) first.
        self.streams: OrderedDict[str, Stream] = OrderedDict()
        # The streams that hold messages, least recently published first (memory and TTL order).
        self.retained: OrderedDict[str, Stream] = OrderedDict()
        self.messages = 0
        self.held_bytes = 0
        self._scratch = Entry(0, None, 0.0, 0)

    @property
    def topics(self) -> int:
        return len(self.retained)

    # -- positions -----------------------------------------------------------------------------

    def _new(self, topic: str) -> Stream:
        streams = self.streams
        if len(streams) >= self.max_topics:
            _, old = streams.popitem(last=False)
            if old.entries:
                self._clear(old, "forgotten")
        stream = streams[topic] = Stream(topic)
        return stream

    def position(self, topic: str) -> tuple[str, int]:
        stream = self.streams.get(topic) or self._new(topic)
        return stream.epoch, stream.seq

    # -- publish -------------------------------------------------------------------------------

    def append(self, topic: str, data: Any, size: int, now: float) -> Entry:
        streams = self.streams
        stream = streams.get(topic)
        if stream is None:
            stream = self._new(topic)
        else:
            streams.move_to_end(topic)
        seq = stream.seq = stream.seq + 1
        if not self.size:
            # Nothing is retained, so one entry serves every publish: no allocation.
            entry = self._scratch
            entry.seq = seq
            return entry
        entry = Entry(seq, data, now, ENTRY_OVERHEAD + size)
        entries = stream.entries
        if entries is None:
            entries = stream.entries = deque()
            self.retained[topic] = stream
        else:
            self.retained.move_to_end(topic)
            if len(entries) >= self.size:  # the steady state of a busy topic: inlined
                old = entries.popleft()
                stream.held_bytes -= old.size
                self.held_bytes -= old.size
                self.messages -= 1
                self.evictions["size"] += 1
            ttl = self.ttl
            if ttl and entries and entries[0].at < now - ttl:
                self._trim(stream, now)
                if stream.entries is None:  # the TTL took them all
                    entries = stream.entries = deque()
                    self.retained[topic] = stream
        entry.stream = stream
        entries.append(entry)
        stream.held_bytes += entry.size
        self.messages += 1
        self.held_bytes += entry.size
        if self.held_bytes > self.memory:
            self._shrink()
        return entry

    def keep(self, entry: Entry, encoding: int, frame: bytes) -> None:
        if encoding:
            entry.msgpack = frame
        else:
            entry.json = frame
        stream = entry.stream
        # Still in its ring? Rings lose their oldest first (or everything), so: still in range.
        entries = None if stream is None else stream.entries
        if stream is not None and entries and entries[0].seq <= entry.seq:
            n = len(frame)
            entry.size += n
            stream.held_bytes += n
            self.held_bytes += n
            if self.held_bytes > self.memory:
                self._shrink()

    def frame(self, entry: Entry, topic: str, encoding: Encoding) -> bytes | None:
        frame = entry.msgpack if encoding else entry.json
        if frame is None:
            try:
                frame = messages.message(topic, entry.data, entry.seq, encoding)
            except codec.EncodeError:
                return None
            self.keep(entry, encoding, frame)
        return frame

    # -- reads ---------------------------------------------------------------------------------

    def since(
        self, topic: str, epoch: str | None, seq: int, limit: int | None, now: float
    ) -> Window:
        stream = self.streams.get(topic)
        if stream is None:
            # Not created by a read: a flood of reads of made-up topics must not push real
            # positions out (--seq-topics). Nothing was published, so nothing is missing.
            return Window(new_epoch(), 0, epoch is None, [])
        if self.ttl and stream.entries and stream.entries[0].at < now - self.ttl:
            self._trim(stream, now)
        entries = stream.entries or ()
        last = stream.seq
        if epoch is None:
            epoch, seq = stream.epoch, 0
        first = entries[0].seq if entries else last + 1
        if epoch == stream.epoch and first - 1 <= seq <= last:
            start = seq + 1 - first
            recovered = True
        else:
            start = 0
            recovered = False
        stop = len(entries) if limit is None else min(len(entries), start + limit)
        found = list(itertools.islice(entries, start, stop)) if start < stop else []
        return Window(stream.epoch, last, recovered, found)

    # -- eviction ------------------------------------------------------------------------------

    def expire(self, now: float) -> None:
        """Drop whole rings whose newest message expired (oldest first); cheap when none did."""
        if not self.ttl:
            return
        horizon = now - self.ttl
        retained = self.retained
        while retained:
            stream = next(iter(retained.values()))
            entries = stream.entries
            if entries and entries[-1].at >= horizon:
                break
            self._clear(stream, "ttl")

    def _trim(self, stream: Stream, now: float) -> None:
        horizon = now - self.ttl
        while stream.entries and stream.entries[0].at < horizon:
            self._drop_oldest(stream, "ttl")

    def _shrink(self) -> None:
        """Over --history-memory: the least recently published topic loses its oldest messages
        until it has none, then the next one. A message at a time, not a whole ring: freeing
        rings of cold objects in bulk cost ~1.5 us more per publish (docs/benchmarks.md)."""
        retained = self.retained
        while self.held_bytes > self.memory and retained:
            self._drop_oldest(next(iter(retained.values())), "memory")

    def _drop_oldest(self, stream: Stream, reason: str) -> None:
        entries = stream.entries
        assert entries
        entry = entries.popleft()
        stream.held_bytes -= entry.size
        self.held_bytes -= entry.size
        self.messages -= 1
        self.evictions[reason] += 1
        if not entries:
            stream.entries = None
            del self.retained[stream.topic]

    def _clear(self, stream: Stream, reason: str) -> None:
        n = len(stream.entries or ())
        self.held_bytes -= stream.held_bytes
        self.messages -= n
        self.evictions[reason] += n
        stream.held_bytes = 0
        stream.entries = None
        self.retained.pop(stream.topic, None)
