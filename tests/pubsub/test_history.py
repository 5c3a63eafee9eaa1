"""History and positions without sockets: the ring's limits, the epoch rules, and the seam
between replay and live delivery (router level, with publishes interleaved)."""

from __future__ import annotations

import dataclasses
import json
import tracemalloc
from typing import Any

import msgpack
import pytest

from broker.config import Config
from broker.metrics import HISTORY_EVICTION_REASONS, Stats
from broker.pubsub.history import ENTRY_OVERHEAD, LocalStreams
from broker.pubsub.router import Router
from broker.pubsub.session import Session
from broker.wire.codec import Encoding
from tests.pubsub.test_router import frames


def streams(size: int = 100, ttl: float = 0.0, memory: int = 1 << 30, topics: int = 1000) -> Any:
    return LocalStreams(size, ttl, memory, topics, dict.fromkeys(HISTORY_EVICTION_REASONS, 0))


def seqs(s: LocalStreams, topic: str) -> list[int]:
    return [e.seq for e in s.streams[topic].entries]


def make(**overrides: Any) -> Router:
    return Router(dataclasses.replace(Config(), **overrides), Stats())


def send(r: Router, session: Session, **request: Any) -> None:
    r.handle(session, json.dumps(request), binary=False)


# -- the ring ----------------------------------------------------------------------------------


def test_size_limit_keeps_the_latest() -> None:
    s = streams(size=3)
    for i in range(5):
        assert s.append("t", i, 10, now=0.0).seq == i + 1
    assert seqs(s, "t") == [3, 4, 5]
    assert s.evictions["size"] == 2
    assert s.messages == 3
    assert s.held_bytes == 3 * (ENTRY_OVERHEAD + 10)


def test_size_zero_keeps_positions_but_no_history() -> None:
    s = streams(size=0)
    epoch, seq = s.position("t")
    assert seq == 0
    for _ in range(3):
        s.append("t", "x", 10, now=0.0)
    assert s.position("t") == (epoch, 3)
    assert s.messages == s.held_bytes == s.topics == 0
    w = s.since("t", epoch, 1, None, now=0.0)
    assert (w.recovered, w.entries) == (False, [])
    assert s.since("t", epoch, 3, None, now=0.0).recovered, "nothing missed: recovered"


def test_ttl_expires_messages_and_whole_rings() -> None:
    s = streams(ttl=10.0)
    s.append("old", 1, 10, now=0.0)
    for t in (0.0, 5.0, 9.0):
        s.append("t", t, 10, now=t)
    # At 12 s the first "t" message (0 s) has expired: it is never served.
    w = s.since("t", None, 0, None, now=12.0)
    assert [e.seq for e in w.entries] == [2, 3] and not w.recovered
    assert s.evictions["ttl"] == 1
    s.expire(now=12.0)  # "old" expired as a whole; "t" is newer
    assert "old" not in s.retained and s.position("old")[1] == 1
    assert s.evictions["ttl"] == 2
    s.expire(now=20.0)
    assert s.topics == s.messages == s.held_bytes == 0
    s.append("t", 4, 10, now=21.0)
    epoch = s.position("t")[0]
    assert s.since("t", epoch, 3, None, now=21.0).recovered
    assert not s.since("t", epoch, 2, None, now=21.0).recovered


def test_memory_limit_takes_the_least_recently_published_first() -> None:
    each = ENTRY_OVERHEAD + 100
    s = streams(memory=5 * each)
    for topic in ("a", "b", "c"):
        s.append(topic, "x", 100, now=0.0)
    s.append("b", "x", 100, now=0.0)  # "a" is now the least recently published
    s.append("c", "x", 100, now=0.0)
    assert s.held_bytes == 5 * each
    s.append("a", "x", 100, now=0.0)  # over: "b" (now the least recent) loses its oldest
    assert seqs(s, "b") == [2] and s.evictions["memory"] == 1
    s.append("a", "x", 100, now=0.0)  # over again: "b" loses its last one and is gone
    assert list(s.retained) == ["c", "a"] and s.evictions["memory"] == 2
    assert s.position("b") == (s.streams["b"].epoch, 2), "the position stays"
    s.append("a", "x", 100, now=0.0)  # then "c", oldest first
    assert seqs(s, "c") == [2] and seqs(s, "a") == [1, 2, 3, 4]
    for _ in range(5):
        s.append("a", "x", 100, now=0.0)  # alone over the limit: its own oldest go
    assert list(s.retained) == ["a"] and seqs(s, "a") == [5, 6, 7, 8, 9]
    assert s.held_bytes == 5 * each == sum(e.size for e in s.streams["a"].entries or ())
    assert s.evictions["memory"] == 4 + 4


def test_frames_count_against_memory_and_are_made_once() -> None:
    s = streams()
    e = s.append("t", {"k": "v"}, 20, now=0.0)
    s.keep(e, Encoding.JSON, b"x" * 50)
    assert s.held_bytes == ENTRY_OVERHEAD + 20 + 50
    frame = s.frame(e, "t", Encoding.MSGPACK)
    assert frame is not None and s.frame(e, "t", Encoding.MSGPACK) is frame
    assert s.held_bytes == ENTRY_OVERHEAD + 20 + 50 + len(frame)
    assert msgpack.unpackb(frame[2:]) == {
        "op": "message",
        "topic": "t",
        "data": {"k": "v"},
        "seq": 1,
    }
    assert s.frame(s.append("t", 2**70, 20, now=0.0), "t", Encoding.MSGPACK) is None


def test_entry_overhead_is_measured() -> None:
    """ENTRY_OVERHEAD covers what an entry costs besides its data and frames (tracemalloc)."""
    s = streams(size=1000)
    data = [f"{i:064d}" for i in range(1000)]  # allocated before: the data is counted apart
    now = 1.5  # one clock reading per loop iteration, shared by its publishes
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for d in data:
        s.append("t", d, 0, now=now)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    per_entry = used / 1000
    data_header = 49  # a str object's header: the data estimate counts only its payload
    assert per_entry + data_header <= ENTRY_OVERHEAD <= 1.5 * (per_entry + data_header)


# -- positions ---------------------------------------------------------------------------------


def test_epoch_rules() -> None:
    s = streams(topics=2)
    epoch, seq = s.position("a")
    assert seq == 0 and len(epoch) == 8
    assert s.append("a", 1, 10, now=0.0).seq == 1
    assert s.position("a") == (epoch, 1), "an epoch handed out with seq 0 stays valid"
    assert s.since("a", epoch, 0, None, now=0.0).recovered
    s.position("b")
    s.position("c")  # a third topic: "a" (least recently published or created) is forgotten
    assert s.evictions["forgotten"] == 1
    new_epoch, seq = s.position("a")
    assert seq == 0 and new_epoch != epoch, "a counter that starts over gets a new epoch"
    w = s.since("a", epoch, 1, None, now=0.0)
    assert (w.epoch, w.seq, w.recovered) == (new_epoch, 0, False)
    assert len({streams().position("t")[0] for _ in range(100)}) == 100


def test_since_rules() -> None:
    s = streams(size=3)
    epoch = s.position("t")[0]
    for i in range(5):
        s.append("t", i, 10, now=0.0)
    assert [e.seq for e in s.since("t", epoch, 2, None, now=0.0).entries] == [3, 4, 5]
    assert [e.seq for e in s.since("t", epoch, 3, 1, now=0.0).entries] == [4]
    assert s.since("t", epoch, 5, None, now=0.0) == (epoch, 5, True, [])
    for bad in ((epoch, 1), (epoch, 6), ("other", 4)):
        w = s.since("t", *bad, None, now=0.0)
        assert not w.recovered and [e.seq for e in w.entries] == [3, 4, 5], "oldest retained"


# -- the router: acks, replay and the seam -----------------------------------------------------


def test_subscribe_acks_carry_positions() -> None:
    r = make()
    s = Session()
    send(r, s, op="subscribe", topic="a.b", id=1)
    send(r, s, op="subscribe", topic="a.*", id=2)
    send(r, s, op="publish", topic="a.b", data="x")
    send(r, s, op="subscribe", topic="a.b", id=3)  # again: acked, position given
    ack1, ack2, msg, ack3 = frames(s)
    epoch = ack1["epoch"]
    assert ack1 == {"op": "ack", "id": 1, "epoch": epoch, "seq": 0}
    assert ack2 == {"op": "ack", "id": 2}, "a wildcard has no position"
    assert msg["seq"] == 1 and ack3 == {"op": "ack", "id": 3, "epoch": epoch, "seq": 1}


def test_recovery_replays_exactly_the_missed_then_live() -> None:
    r = make()
    pub, sub = Session(), Session(Encoding.MSGPACK)
    epoch = r.streams.position("t")[0]
    for i in range(1, 6):
        r.publish("t", i)
    r.handle(
        sub,
        msgpack.packb(
            {"op": "subscribe", "topic": "t", "id": 1, "since": {"epoch": epoch, "seq": 2}}
        ),
        True,
    )
    r.publish("t", 6)
    got = frames(sub)
    assert got[0] == {"op": "ack", "id": 1, "epoch": epoch, "seq": 5, "recovered": True}
    assert [(m["seq"], m["data"]) for m in got[1:]] == [(3, 3), (4, 4), (5, 5), (6, 6)]
    assert r.stats.replayed == 3
    del pub


def test_unrecoverable_replays_nothing() -> None:
    r = make(history_size=2)
    s = Session()
    epoch = r.streams.position("t")[0]
    for i in range(5):
        r.publish("t", i)
    send(r, s, op="subscribe", topic="t", id=1, since={"epoch": epoch, "seq": 1})
    send(r, s, op="subscribe", topic="u", id=2, since={"epoch": epoch, "seq": 0})
    r.publish("t", "live")
    ack1, ack2, live = frames(s)
    assert ack1 == {"op": "ack", "id": 1, "epoch": epoch, "seq": 5, "recovered": False}
    assert ack2["recovered"] is False and ack2["seq"] == 0 and ack2["epoch"] != epoch
    assert live["seq"] == 6 and live["data"] == "live"


def test_seam_with_interleaved_publishes() -> None:
    """Publishes before, between and after recovering subscribes, on several connections:
    each sees every seq once, in order, from its `since` on."""
    r = make(history_size=1000)
    epoch = r.streams.position("t")[0]
    subs: list[tuple[Session, int]] = []
    for n in range(200):
        r.publish("t", n + 1)
        if n % 20 == 7:
            s = Session(Encoding(n % 2))
            since = max(0, n - 13)
            request = {
                "op": "subscribe",
                "topic": "t",
                "id": n,
                "since": {"epoch": epoch, "seq": since},
            }
            r.handle(s, msgpack.packb(request), True)
            subs.append((s, since))
    for s, since in subs:
        got = frames(s)
        assert got[0]["recovered"] is True
        assert [m["seq"] for m in got[1:]] == list(range(since + 1, 201))
        assert [m["data"] for m in got[1:]] == list(range(since + 1, 201))


def test_replay_over_the_high_water_mark_goes_to_the_backlog() -> None:
    r = make(outbound_high_water=1000, history_size=100)
    s = Session()
    epoch = r.streams.position("t")[0]
    for _ in range(50):
        r.publish("t", "x" * 100)
    send(r, s, op="ping", id=0)
    send(r, s, op="subscribe", topic="t", id=1, since={"epoch": epoch, "seq": 0})
    assert s.backlog is not None and s.out == [] and s.queued == 0
    r.publish("t", "live")  # waits in out, counted as lag; no slow consumer
    assert r.over == [] and len(s.out) == 1
    chunks = []
    while s.backlog:
        chunks.append(s.next_chunk(1000))
    assert all(len(c) <= 1000 for c in chunks[:-1])
    s.out[:0] = chunks  # the connection writes the backlog first, then out
    s.backlog = None
    got = frames(s)
    assert got[0] == {"op": "pong", "id": 0}
    assert got[1]["recovered"] is True
    assert [m["seq"] for m in got[2:]] == list(range(1, 52))


def test_backlogs_chain_in_order() -> None:
    """A second large replay while one is pending goes after it and after what came between."""
    r = make(outbound_high_water=500)
    s = Session()
    ea, eb = r.streams.position("a")[0], r.streams.position("b")[0]
    for _ in range(20):
        r.publish("a", "x" * 50)
        r.publish("b", "y" * 50)
    send(r, s, op="subscribe", topic="a", id=1, since={"epoch": ea, "seq": 0})
    r.publish("a", "live-a")
    send(r, s, op="subscribe", topic="b", id=2, since={"epoch": eb, "seq": 0})
    r.publish("b", "live-b")
    r.publish("a", "live-a2")
    assert s.backlog is not None
    s.out[:0] = list(s.backlog)
    got = frames(s)
    a = [m["seq"] for m in got if m.get("topic") == "a"]
    b = [m["seq"] for m in got if m.get("topic") == "b"]
    assert a == list(range(1, 23)) and b == list(range(1, 22))
    ack2 = next(i for i, m in enumerate(got) if m.get("id") == 2)
    first_b = next(i for i, m in enumerate(got) if m.get("topic") == "b")
    assert ack2 < first_b


def test_history_op() -> None:
    r = make(history_size=3)
    s = Session()
    epoch = r.streams.position("t")[0]
    for i in range(5):
        r.publish("t", i)
    r.publish("t", b"\x00\xff")
    send(r, s, op="history", topic="t", id=1)
    send(r, s, op="history", topic="t", id=2, since={"epoch": epoch, "seq": 4}, limit=1)
    send(r, s, op="history", topic="t", id=3, since={"epoch": epoch, "seq": 1})
    send(r, s, op="history", topic="t", id=4, limit=0)
    h1, h2, h3, h4 = frames(s)
    assert h1 == {
        "op": "ack",
        "id": 1,
        "epoch": epoch,
        "seq": 6,
        "recovered": False,
        "messages": [
            {"seq": 4, "data": 3},
            {"seq": 5, "data": 4},
            {"seq": 6, "data": "AP8=", "encoding": "base64"},
        ],
    }
    assert h2["recovered"] is True and h2["messages"] == [{"seq": 5, "data": 4}]
    assert h3["recovered"] is False and len(h3["messages"]) == 3
    assert h4["messages"] == [] and h4["seq"] == 6
    m = Session(Encoding.MSGPACK)
    r.handle(m, msgpack.packb({"op": "history", "topic": "t", "id": 5}), True)
    assert frames(m)[0]["messages"][-1] == {"seq": 6, "data": b"\x00\xff"}


@pytest.mark.parametrize(
    "request_",
    [
        {"op": "subscribe", "topic": "t.*", "since": {"epoch": "e", "seq": 0}},
        {"op": "subscribe", "topic": "t.>", "since": {"epoch": "e", "seq": 0}},
        {"op": "subscribe", "topic": "t", "since": {"epoch": "e", "seq": -1}},
        {"op": "subscribe", "topic": "t", "since": {"epoch": "e", "seq": 1.0}},
        {"op": "subscribe", "topic": "t", "since": {"epoch": "e", "seq": True}},
        {"op": "subscribe", "topic": "t", "since": {"epoch": "e", "seq": 2**63}},
        {"op": "subscribe", "topic": "t", "since": {"epoch": "e", "seq": "3"}},
        {"op": "subscribe", "topic": "t", "since": {"epoch": "", "seq": 0}},
        {"op": "subscribe", "topic": "t", "since": {"epoch": 5, "seq": 0}},
        {"op": "subscribe", "topic": "t", "since": {"epoch": "e" * 65, "seq": 0}},
        {"op": "subscribe", "topic": "t", "since": {"seq": 0}},
        {"op": "subscribe", "topic": "t", "since": [1, 2]},
        {"op": "subscribe", "topic": "t", "since": "e:1"},
        {"op": "history", "topic": "t.*"},
        {"op": "history"},
        {"op": "history", "topic": "t", "limit": -1},
        {"op": "history", "topic": "t", "limit": 1.5},
        {"op": "history", "topic": "t", "limit": "10"},
        {"op": "history", "topic": "t", "since": {"epoch": "e"}},
    ],
)
def test_bad_positions_are_bad_requests(request_: dict[str, Any]) -> None:
    r = make()
    s = Session()
    send(r, s, **request_, id=7)
    (reply,) = frames(s)
    assert (reply["op"], reply["code"], reply["id"]) == ("error", "bad_request", 7), reply
    assert s.patterns is None, "nothing subscribed"


def test_history_limit_is_capped() -> None:
    r = make(history_size=2000)
    s = Session()
    for i in range(1500):
        r.publish("t", i)
    send(r, s, op="history", topic="t", id=1, limit=10**9)
    assert len(frames(s)[0]["messages"]) == 1000


def test_reads_do_not_create_topics() -> None:
    """A flood of history reads of made-up topics must not push real positions out."""
    s = streams(topics=2)
    epoch = s.position("a")[0]
    for i in range(10):
        w = s.since(f"x{i}", None, 0, 10, now=0.0)
        assert (w.seq, w.recovered, w.entries) == (0, True, [])
        assert not s.since(f"x{i}", "e", 0, 10, now=0.0).recovered
    assert list(s.streams) == ["a"] and s.position("a") == (epoch, 0)


def test_a_position_without_history_is_small() -> None:
    """Every subscribed topic has a position: idle connections must stay cheap (docs/design.md)."""
    s = streams()
    topics = [f"idle.{i}" for i in range(2000)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for topic in topics:
        s.position(topic)
    per_topic = (tracemalloc.get_traced_memory()[0] - before) / len(topics)
    tracemalloc.stop()
    assert per_topic < 260


def test_history_leaves_out_what_the_encoding_cannot_carry() -> None:
    r = make()
    for data in (1, 2**70, 3):
        r.publish("t", data)
    m = Session(Encoding.MSGPACK)
    r.handle(m, msgpack.packb({"op": "history", "topic": "t", "id": 1}), True)
    assert [x["seq"] for x in frames(m)[0]["messages"]] == [1, 3]
    assert r.stats.dropped["unencodable"] == 1
    j = Session()
    send(r, j, op="history", topic="t", id=2)
    assert [x["data"] for x in frames(j)[0]["messages"]] == [1, 2**70, 3]
