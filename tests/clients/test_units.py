"""Unit tests for the client's sans-IO parts: codec, reply parsing, topic matching, backoff, errors,
session bookkeeping, and the stats helpers. Bytes in, objects out; no broker needed."""

from __future__ import annotations

import base64
import contextlib
import json
import random

import msgpack
import pytest
from broker_client import errors
from broker_client.protocol import (
    Ack,
    Backoff,
    Codec,
    ErrorReply,
    Message,
    Pong,
    parse_reply,
    topic_matches,
)
from broker_client.session import Session
from broker_client.stats import http_base, parse_metrics, render_table, summary
from hypothesis import given
from hypothesis import strategies as st


def test_codec_json_frames_are_compact_text() -> None:
    frame = Codec("json").encode(
        {"op": "publish", "topic": "a.b", "data": {"é": [1, 2.5]}, "id": 3}
    )
    assert isinstance(frame, str)
    assert json.loads(frame) == {"op": "publish", "topic": "a.b", "data": {"é": [1, 2.5]}, "id": 3}
    assert " " not in frame


def test_codec_msgpack_frames_are_binary_and_carry_bytes() -> None:
    frame = Codec("msgpack").encode({"op": "publish", "topic": "t", "data": b"\x00\xff"})
    assert isinstance(frame, bytes)
    assert msgpack.unpackb(frame) == {"op": "publish", "topic": "t", "data": b"\x00\xff"}


@pytest.mark.parametrize("data", [b"raw", float("nan"), object()])
def test_codec_json_rejects_what_json_cannot_carry(data: object) -> None:
    with pytest.raises(TypeError, match="JSON"):
        Codec("json").encode({"op": "publish", "topic": "t", "data": data})


def test_codec_rejects_unknown_encoding() -> None:
    with pytest.raises(ValueError, match="encoding"):
        Codec("xml")  # type: ignore[arg-type]


def test_decode_goes_by_frame_type_not_negotiated_encoding() -> None:
    # Protocol v1: a text frame is JSON and a binary frame msgpack, whatever was negotiated.
    assert Codec.decode('{"op":"pong"}') == {"op": "pong"}
    assert Codec.decode(msgpack.packb({"op": "pong"})) == {"op": "pong"}


@pytest.mark.parametrize(
    "frame", ["{", "[1]", "null", b"\xc1", b"\x93\x01\x02\x03", "", b"\x82\x00\x00\x80\x00"]
)
def test_decode_garbage_raises_protocol_error_only(frame: str | bytes) -> None:
    with pytest.raises(errors.ProtocolError):
        Codec.decode(frame)


@given(st.one_of(st.text(max_size=50), st.binary(max_size=50)))
def test_decode_never_raises_anything_else(frame: str | bytes) -> None:
    # h11's fuzz invariant: accepted, or our one documented error type.
    with contextlib.suppress(errors.ProtocolError):
        parse_reply(Codec.decode(frame))


def test_parse_each_server_op() -> None:
    assert parse_reply({"op": "message", "topic": "a", "data": [1], "seq": 4}) == Message(
        "a", [1], 4
    )
    assert parse_reply({"op": "ack", "id": 7}) == Ack(7, None)
    assert parse_reply({"op": "ack", "id": "x", "delivered": 3}) == Ack("x", 3)
    assert parse_reply(
        {"op": "error", "id": 2, "code": "bad_request", "message": "m"}
    ) == ErrorReply(2, "bad_request", "m")
    assert parse_reply({"op": "pong", "id": 1}) == Pong(1)
    assert parse_reply({"op": "from-the-future"}) is None


def test_parse_base64_message_gives_bytes() -> None:
    obj = {"op": "message", "topic": "t", "seq": 1, "data": base64.b64encode(b"\x00hi").decode()}
    obj["encoding"] = "base64"
    assert parse_reply(obj) == Message("t", b"\x00hi", 1)


@pytest.mark.parametrize(
    "obj",
    [
        {"op": "message", "topic": "t", "seq": "1", "data": 1},
        {"op": "message", "topic": "t", "seq": 1},
        {"op": "message", "topic": "t", "seq": 1, "data": "!!", "encoding": "base64"},
        {"op": "ack"},
        {"op": "ack", "id": True},
        {"op": "error", "id": 1, "message": "no code"},
        {"no": "op"},
    ],
)
def test_parse_malformed_replies(obj: dict[str, object]) -> None:
    with pytest.raises(errors.ProtocolError):
        parse_reply(obj)


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("a.b", "a.b", True),
        ("a.b", "a.c", False),
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.*", "a", False),
        ("*.b", "a.b", True),
        ("a.>", "a.b", True),
        ("a.>", "a.b.c", True),
        ("a.>", "a", False),
        (">", "a", True),
        ("*", "a.b", False),
    ],
)
def test_topic_matches(pattern: str, topic: str, expected: bool) -> None:
    assert topic_matches(pattern, topic) is expected


def _brute_force(pattern: str, topic: str) -> bool:
    want, have = pattern.split("."), topic.split(".")
    if want[-1] == ">":
        head = want[:-1]
        return len(have) > len(head) and all(
            w in ("*", h) for w, h in zip(head, have, strict=False)
        )
    return len(want) == len(have) and all(w in ("*", h) for w, h in zip(want, have, strict=True))


tokens = st.sampled_from(["a", "b", "c"])


@given(
    st.lists(st.one_of(tokens, st.just("*")), min_size=1, max_size=4),
    st.booleans(),
    st.lists(tokens, min_size=1, max_size=5),
)
def test_topic_matches_agrees_with_brute_force(pat: list[str], tail: bool, top: list[str]) -> None:
    pattern = ".".join([*pat, ">"] if tail else pat)
    topic = ".".join(top)
    assert topic_matches(pattern, topic) == _brute_force(pattern, topic)


def test_backoff_grows_to_the_cap_with_jitter_below_the_nominal_delay() -> None:
    backoff = Backoff(initial=0.1, maximum=1.0, factor=2.0, jitter=0.5)
    delays = backoff.delays(random.Random(1))
    got = [next(delays) for _ in range(8)]
    nominal = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]
    for delay, cap in zip(got, nominal, strict=True):
        assert cap * 0.5 <= delay <= cap
    assert len(set(got[4:])) > 1, "jitter must spread clients that reconnect together"


def test_backoff_without_jitter_is_exact() -> None:
    delays = Backoff(initial=0.5, maximum=2.0, jitter=0.0).delays()
    assert [next(delays) for _ in range(4)] == [0.5, 1.0, 2.0, 2.0]


@pytest.mark.parametrize("bad", [{"initial": 0}, {"initial": 2, "maximum": 1}, {"jitter": 1.5}])
def test_backoff_rejects_nonsense(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="backoff"):
        Backoff(**bad)


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("bad_request", errors.BadRequestError),
        ("forbidden", errors.ForbiddenError),
        ("too_large", errors.TooLargeError),
        ("rate_limited", errors.RateLimitedError),
        ("not_found", errors.NotFoundError),
        ("internal", errors.BrokerInternalError),
        ("something_new", errors.BrokerError),
    ],
)
def test_error_from_reply_is_typed_and_keeps_the_code(code: str, cls: type[Exception]) -> None:
    err = errors.error_from_reply(code, "why", 9)
    assert type(err) is cls
    assert isinstance(err, errors.BrokerError)
    assert isinstance(err, errors.BrokerClientError)
    assert (err.code, err.message, err.request_id) == (code, "why", 9)
    assert str(err) == f"{code}: why"


def test_timeout_error_is_also_builtin_timeout() -> None:
    assert issubclass(errors.RequestTimeoutError, TimeoutError)


class _Sub:
    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.got: list[Message] = []
        self.ended: list[BaseException | None] = []

    def _deliver(self, message: Message) -> None:
        self.got.append(message)

    def _end(self, error: BaseException | None) -> None:
        self.ended.append(error)


def test_session_routes_replies_messages_and_resubscriptions() -> None:
    reported: list[errors.BrokerClientError] = []
    session = Session(Codec("json"), reported.append)
    answers: list[object] = []
    rid, frame = session.request("ping", answers.append)
    assert json.loads(frame) == {"op": "ping", "id": rid}
    assert session.receive(json.dumps({"op": "pong", "id": rid})) is False
    assert answers == [Pong(rid)]

    wide, narrow, other = _Sub("a.*"), _Sub("a.b"), _Sub("z")
    assert session.add(wide) is True
    assert session.add(narrow) is True
    twin = _Sub("a.b")
    assert session.add(twin) is False  # shares the wire subscription
    session.add(other)
    session.receive(json.dumps({"op": "message", "topic": "a.b", "data": 1, "seq": 1}))
    assert [len(s.got) for s in (wide, narrow, twin, other)] == [1, 1, 1, 0]
    assert session.remove(twin) is False and session.remove(narrow) is True

    frames = [json.loads(f) for f in session.begin_resubscribe()]
    assert sorted(f["topic"] for f in frames) == ["a.*", "z"]
    first, second = frames
    assert session.receive(json.dumps({"op": "ack", "id": first["id"]})) is False
    refused = {"op": "error", "id": second["id"], "code": "forbidden", "message": "no"}
    assert session.receive(json.dumps(refused)) is True  # the round is complete
    refused_sub = other if second["topic"] == "z" else wide
    assert isinstance(refused_sub.ended[0], errors.ForbiddenError)
    assert second["topic"] not in session.patterns()

    session.receive('{"op":"error","code":"bad_request","message":"unsolicited"}')
    session.receive("not json")
    assert [type(e) for e in reported] == [errors.BadRequestError, errors.ProtocolError]


def test_session_connection_lost_fails_waiters_but_keeps_subscriptions() -> None:
    session = Session(Codec("msgpack"), lambda e: None)
    answers: list[object] = []
    session.request("publish", answers.append, topic="t", data=b"x")
    session.add(_Sub("t"))
    lost = errors.ConnectionLostError("gone")
    session.connection_lost(lost)
    assert answers == [lost]
    assert session.patterns() == ["t"]


METRICS = """\
# HELP broker_connections open connections
# TYPE broker_connections gauge
broker_connections 3.0
# TYPE broker_connections_closed_total counter
broker_connections_closed_total{reason="client_close"} 5.0
broker_connections_closed_total{reason="slow_consumer"} 2.0
# TYPE broker_messages_published_total counter
broker_messages_published_total 1234.0
# TYPE broker_loop_iteration_seconds histogram
broker_loop_iteration_seconds_bucket{le="0.001"} 90.0
broker_loop_iteration_seconds_bucket{le="0.01"} 99.0
broker_loop_iteration_seconds_bucket{le="+Inf"} 100.0
broker_loop_iteration_seconds_count 100.0
broker_loop_iteration_seconds_sum 0.2
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 2.62144e+07
# TYPE process_start_time_seconds gauge
process_start_time_seconds 1000.0
"""


def test_stats_summary_reads_prometheus_text() -> None:
    metrics = parse_metrics(METRICS)
    assert metrics.value("broker_connections") == 3
    assert metrics.total("broker_connections_closed_total") == 7
    assert metrics.quantile("broker_loop_iteration_seconds", 0.5) == 0.001
    assert metrics.quantile("broker_loop_iteration_seconds", 0.99) == 0.01
    rows = {
        label: (value, note) for _, rs in summary(metrics, now=1065.0) for label, value, note in rs
    }
    assert rows["open"] == ("3", "")
    assert rows["closed"] == ("7", "client_close 5, slow_consumer 2")
    assert rows["messages published"] == ("1,234", "")
    assert rows["resident memory"] == ("25.0 MiB", "")
    assert rows["uptime"] == ("1m 5s", "")
    assert rows["topics"] == ("-", "")  # absent metrics show as "-"
    table = render_table("broker x", summary(metrics, now=1065.0))
    assert "messages published" in table and "1,234" in table


@pytest.mark.parametrize(
    ("ws", "http"),
    [
        ("ws://127.0.0.1:8765/ws", "http://127.0.0.1:8765"),
        ("wss://example.test/ws", "https://example.test"),
        ("ws://h:1/prefix/ws/", "http://h:1/prefix"),
        ("ws://h:1", "http://h:1"),
    ],
)
def test_http_base(ws: str, http: str) -> None:
    assert http_base(ws) == http


def test_http_base_rejects_other_schemes() -> None:
    with pytest.raises(ValueError, match="ws://"):
        http_base("ftp://h/ws")
