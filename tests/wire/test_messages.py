"""Request validation, topic syntax and the codecs: bytes in, requests or RequestError out."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
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


def nested(depth: int, leaf: Any = 0) -> Any:
    """`depth` levels of arrays around `leaf` (built without recursion)."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ('{"op":"ping","id":1e999}', "out of range"),
        ('{"op":"ping","id":-1e999}', "out of range"),
        ('{"op":"publish","topic":"a","data":{"x":[1, 1e400]}}', "out of range"),
        ('{"op":"ping","id":"\\ud800"}', "lone surrogate"),
        ('{"op":"ping","id":"a\\udfffb"}', "lone surrogate"),
        ('{"op":"publish","topic":"a","data":{"\\udc00":1}}', "lone surrogate"),
        ('{"op":"publish","topic":"a","data":["ok", ["\\uD83D"]]}', "lone surrogate"),
        ('{"op":"publish","topic":"a","data":' + json.dumps(nested(128)) + "}", "deeper"),
    ],
)
def test_values_no_encoding_can_echo_are_bad_requests(payload: str, fragment: str) -> None:
    with pytest.raises(RequestError, match=fragment) as err:
        parse_request(payload, binary=False)
    assert err.value.code is ErrorCode.BAD_REQUEST
    assert err.value.request_id is None  # unreadable: the error reply echoes nothing


def test_what_decode_accepts_at_the_limits() -> None:
    # 127 levels of data inside the request object: 128 in all, the limit.
    text = '{"op":"publish","topic":"a","data":' + json.dumps(nested(127)) + "}"
    deep = parse_request(text, binary=False)
    assert deep.data == nested(127)
    pair = parse_request('{"op":"ping","id":"\\ud83d\\ude00"}', binary=False)  # a valid pair
    assert pair.id == "\U0001f600"
    assert parse_request('{"op":"ping","id":1e308}', binary=False).id == 1e308
    # Many containers side by side are not deep.
    wide = parse_request(json.dumps({"op": "publish", "topic": "a", "data": [[]] * 1000}), False)
    assert wide.data == [[]] * 1000


def test_msgpack_depth_and_non_finite_ids() -> None:
    ok = msgpack.packb({"op": "publish", "topic": "a", "data": nested(127)})
    assert parse_request(ok, binary=True).data == nested(127)
    too_deep = msgpack.packb({"op": "publish", "topic": "a", "data": nested(128)})
    with pytest.raises(RequestError, match="deeper"):
        parse_request(too_deep, binary=True)
    for bad in (float("inf"), float("-inf"), float("nan")):
        with pytest.raises(RequestError, match="id must be"):
            parse_request(msgpack.packb({"op": "ping", "id": bad}), binary=True)
    # Non-finite data is msgpack's to carry; JSON connections never see it (EncodeError).
    inf = parse_request(msgpack.packb({"op": "publish", "topic": "a", "data": [1e999]}), True)
    with pytest.raises(codec.EncodeError):
        messages.message("a", inf.data, 1, Encoding.JSON)


def _strict_json(body: bytes) -> Any:
    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in a JSON reply")

    return json.loads(body.decode("utf-8"), parse_constant=refuse)


def _has_big_int(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, list):
            stack += item
        elif type(item) is int and not -(2**63) <= item < 2**64:
            return True
    return False


# Strings with lone surrogates (category Cs) too: json.dumps writes them as \ud800 escapes.
any_text = st.text(st.characters(categories=["Cs"]) | st.characters(), max_size=8)
json_texts = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | any_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=12,
).map(json.dumps)


@given(json_texts | st.integers(100, 300).map(lambda d: "[" * d + "]" * d))
def test_what_json_decode_accepts_every_encoding_can_write(text: str) -> None:
    """Text with surrogate escapes, huge or non-finite numbers and deep nesting: decode refuses
    it, or the value goes back out as strict JSON and as msgpack (bar integers over 64 bits)."""
    try:
        value = codec.decode(text, binary=False)
    except codec.DecodeError:
        return
    assert _strict_json(codec.encode_payload(value, Encoding.JSON)) == value
    try:
        codec.encode_payload(value, Encoding.MSGPACK)
    except codec.EncodeError:
        assert _has_big_int(value)


@given(
    st.text(min_size=1, max_size=20),
    # Every float, infinities and NaN included: JSON has no form for those, and both paths must
    # refuse them alike (EncodeError), never write `Infinity`.
    st.one_of(st.text(), st.integers(), st.booleans(), st.floats(), st.none()),
    st.integers(min_value=0, max_value=2**63),
)
def test_message_frames_written_directly_equal_the_encoders(
    topic: str, data: Any, seq: int
) -> None:
    """str and int data are written without json.dumps: the bytes must not differ, and a value
    the encoder refuses is refused by `messages.message` the same way."""

    def outcome(write: Callable[[], bytes]) -> bytes | type[codec.EncodeError]:
        try:
            return bytes(write())
        except codec.EncodeError:
            return codec.EncodeError

    body = {"op": "message", "topic": topic, "data": data, "seq": seq}
    expected = outcome(lambda: codec.encode(body, Encoding.JSON))
    assert outcome(lambda: messages.message(topic, data, seq, Encoding.JSON)) == expected
    if isinstance(data, float) and not math.isfinite(data):
        assert expected is codec.EncodeError
    else:
        assert expected is not codec.EncodeError


@pytest.mark.parametrize("data", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_data_is_refused_on_json_and_kept_on_msgpack(data: float) -> None:
    with pytest.raises(codec.EncodeError):
        messages.message("t", data, 1, Encoding.JSON)
    with pytest.raises(codec.EncodeError):
        codec.encode({"op": "message", "topic": "t", "data": data, "seq": 1}, Encoding.JSON)
    value = msgpack.unpackb(_unframe(messages.message("t", data, 1, Encoding.MSGPACK)))["data"]
    assert value == data or (math.isnan(value) and math.isnan(data))


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
    )
)
def test_json_decode_fast_path_equals_the_decoder(value: Any) -> None:
    text = json.dumps(value)
    for variant in (text, " " + text, text + "\n", text + "x"):
        try:
            expected: Any = json.loads(variant)
        except ValueError:
            expected = codec.DecodeError
        try:
            got: Any = codec.decode(variant, False)
        except codec.DecodeError:
            got = codec.DecodeError
        assert got == expected


def _as_parsed(payload: str) -> tuple[str, Any, Any] | RequestError:
    try:
        req = parse_request(payload, False)
    except RequestError as exc:
        return exc
    return req.topic, req.data, req.id


_PRINTABLE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
_publishes = st.builds(
    lambda topic, data, req_id, compact, extra: json.dumps(
        {
            "op": "publish",
            "topic": topic,
            "data": data,
            **({"id": req_id} if req_id else {}),
            **extra,
        },
        separators=(",", ":") if compact else None,
    ),
    st.one_of(_PRINTABLE, st.sampled_from(["a.b", "a..b", "a.*", "a.>", "", "x" * 300, "é"])),
    st.one_of(_PRINTABLE, st.text(max_size=10), st.integers()),
    st.one_of(st.none(), st.integers(0, 2**70), st.integers(-5, -1), st.text(max_size=3)),
    st.booleans(),
    st.sampled_from([{}, {"since": 1}]),
)


@given(_publishes)
def test_simple_publish_agrees_with_parse_request(payload: str) -> None:
    """The publish fast path answers exactly as the full parser, or leaves it to it."""
    try:
        fast = messages.simple_publish(payload)
    except RequestError as exc:
        slow = _as_parsed(payload)
        assert isinstance(slow, RequestError)
        assert (exc.code, exc.message, exc.request_id) == (slow.code, slow.message, slow.request_id)
        return
    if fast is not None:
        assert fast == _as_parsed(payload)
        # ...and its data needs no escaping: the delivery frame is the one json.dumps makes.
        topic, data, _ = fast
        assert messages.message(topic, data, 7, Encoding.JSON, plain=True) == messages.message(
            topic, data, 7, Encoding.JSON
        )


def test_simple_publish_takes_the_common_forms() -> None:
    assert messages.simple_publish('{"op":"publish","topic":"a.b","data":"x y"}') == (
        "a.b",
        "x y",
        None,
    )
    spaced = json.dumps({"op": "publish", "topic": "t", "data": "", "id": 7})
    assert messages.simple_publish(spaced) == ("t", "", 7)
    # Escapes, non-ASCII, other types, other key orders: left to parse_request.
    for payload in (
        '{"op":"publish","topic":"t","data":"a\\"b"}',
        '{"op":"publish","topic":"t","data":"\u00e9"}',
        '{"op":"publish","topic":"t","data":5}',
        '{"topic":"t","op":"publish","data":"x"}',
        '{"op":"publish","topic":"t","data":"x","id":-1}',
    ):
        assert messages.simple_publish(payload) is None
    with pytest.raises(RequestError) as caught:
        messages.simple_publish('{"op":"publish","topic":"a.*","data":"x","id":3}')
    assert caught.value.request_id == 3
