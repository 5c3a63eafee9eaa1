"""Request validation, topic syntax and the codecs: bytes in, requests or RequestError out."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.errors import ErrorCode, RequestError
from broker.wire import codec, messages
from broker.wire.codec import Encoding
from broker.wire.frames import frame
from broker.wire.messages import check_topic, parse_request


@pytest.mark.parametrize(
    "topic",
    ["a", "a.b.c", "x" * 255, "é" * 127, "orders.eu-west.42", "a.*", "*.b", ">", "a.>", "*.*.>"],
)
def test_valid_patterns(topic: str) -> None:
    assert check_topic(topic, pattern=True) == topic


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "x" * 256,
        "é" * 128,
        "a..b",
        ".a",
        "a.",
        "a b",
        "a\tb",
        "a\x00b",
        "a*",
        "a.>.b",
        "a.b>",
        ">.a",
        "\ud800",
        5,
        None,
        ["a"],
    ],
)
def test_invalid_patterns(topic: Any) -> None:
    with pytest.raises(RequestError) as err:
        check_topic(topic, pattern=True)
    assert err.value.code is ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("topic", ["a.*", ">", "a.>", "*"])
def test_publish_to_wildcard_is_refused(topic: str) -> None:
    with pytest.raises(RequestError, match="wildcard"):
        check_topic(topic, pattern=False)


def test_parse_every_op_in_both_encodings() -> None:
    reqs = [
        {"op": "subscribe", "topic": "a.*", "id": 1},
        {"op": "unsubscribe", "topic": "a.*", "id": "u"},
        {"op": "publish", "topic": "a.b", "data": {"x": [1, 2.5, None]}, "id": 2.5},
        {"op": "ping"},
    ]
    for req in reqs:
        from_json = parse_request(json.dumps(req), binary=False)
        from_msgpack = parse_request(msgpack.packb(req), binary=True)
        assert from_json == from_msgpack
        assert from_json.op == req["op"]
        assert from_json.id == req.get("id")


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ("not json", "invalid JSON"),
        ("[1,2]", "must be an object"),
        ('{"topic":"a"}', "missing op"),
        ('{"op":"dance"}', "unknown op"),
        ('{"op":"publish","topic":"a"}', "needs data"),
        ('{"op":"publish","topic":"a.*","data":1}', "wildcard"),
        ('{"op":"subscribe"}', "topic must be a string"),
        ('{"op":"ping","id":true}', "id must be"),
        ('{"op":"ping","id":[1]}', "id must be"),
        ('{"op":"ping","id":18446744073709551616}', "id must be"),
        ('{"op":"publish","topic":"a","data":NaN}', "invalid JSON"),
        ("[" * 100000, "invalid JSON"),
    ],
)
def test_bad_requests(payload: str, fragment: str) -> None:
    with pytest.raises(RequestError, match=fragment) as err:
        parse_request(payload, binary=False)
    assert err.value.code is ErrorCode.BAD_REQUEST


def test_error_carries_the_request_id() -> None:
    with pytest.raises(RequestError) as err:
        parse_request('{"op":"publish","topic":"a.>","data":1,"id":"p7"}', binary=False)
    assert err.value.request_id == "p7"
    reply = json.loads(messages.error(err.value, Encoding.JSON)[2:])
    assert reply == {"op": "error", "id": "p7", "code": "bad_request", "message": err.value.message}


def test_bad_msgpack() -> None:
    for payload in (b"\xc1", b"\x92\x01", msgpack.packb({"op": "ping"}) + b"\x00", b"\x91" * 5000):
        with pytest.raises(RequestError, match="invalid msgpack"):
            parse_request(payload, binary=True)


@given(st.binary(max_size=200))
def test_garbage_only_raises_request_error(payload: bytes) -> None:
    # h11's fuzz invariant: accepted, or our one documented error type, never anything else.
    for binary in (True, False):
        with contextlib.suppress(RequestError):
            parse_request(payload if binary else payload.decode("utf-8", "replace"), binary)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def _unframe(data: bytes) -> bytes:
    n = data[1] & 0x7F
    start = 2 + {126: 2, 127: 8}.get(n, 0)
    return data[start:]


@given(json_values)
def test_message_roundtrip_both_encodings(data: Any) -> None:
    for encoding in Encoding:
        raw = messages.message("a.b", data, 7, encoding)
        assert raw[0] == (0x81 if encoding is Encoding.JSON else 0x82)
        body = _unframe(raw)
        decoded = json.loads(body) if encoding is Encoding.JSON else msgpack.unpackb(body)
        assert decoded == {"op": "message", "topic": "a.b", "data": data, "seq": 7}


def test_binary_data_on_json_is_base64() -> None:
    body = json.loads(_unframe(messages.message("t", b"\x00\xff", 1, Encoding.JSON)))
    assert body == {"op": "message", "topic": "t", "data": "AP8=", "seq": 1, "encoding": "base64"}
    packed = msgpack.unpackb(_unframe(messages.message("t", b"\x00\xff", 1, Encoding.MSGPACK)))
    assert packed["data"] == b"\x00\xff"


def test_unencodable_values_raise_encode_error() -> None:
    with pytest.raises(codec.EncodeError):
        codec.encode(2**70, Encoding.MSGPACK)
    with pytest.raises(codec.EncodeError):
        codec.encode({b"k": 1}, Encoding.JSON)
    # The packer is usable after a failure.
    assert msgpack.unpackb(_unframe(codec.encode([1], Encoding.MSGPACK))) == [1]


@pytest.mark.parametrize("n", [0, 1, 125, 126, 65535, 65536, 70000])
def test_frame_lengths(n: int) -> None:
    raw = frame(0x2, b"x" * n)
    assert raw[0] == 0x82
    assert raw[1] & 0x80 == 0
    assert _unframe(raw) == b"x" * n
