"""Property-based fuzzing of a live broker: handshakes, frames and requests, as attackers send.

tests/wire fuzzes the sans-IO parsers alone (garbage in, a request or our one error type out);
this module drives a real broker process over real sockets, so that what happens between the
layers (echoed ids, cross-encoding delivery, the HTTP answer to a half-parsed request) is covered
too. The invariant, after every example:

* every input is accepted or refused with a documented answer: an HTTP status of
  docs/protocol.md, an `error` code of the table there, a close code of the close table;
* never 1011, never a 500, no traceback in the broker's log, no bug counted;
* no connection is left stuck: every exchange ends within a bounded wait (a sentinel ping or
  publish comes back, or the broker closes);
* every JSON byte the broker writes parses strictly (UTF-8, no NaN/Infinity), for the sender and
  for JSON and msgpack subscribers watching every topic.

Deterministic for CI: hypothesis derandomized, no example database; about 20 s on an idle
machine (the example counts below are the budget; keep the whole module under a minute).
Derandomized means "the same examples for the same session", not for every selection of tests:
Hypothesis also draws constants found in the project's imported (non-test) modules, so the whole
suite, this file alone and a different commit each generate other examples. A failure seen in one
only is real all the same: its example is printed; pin it with `@example` (as below) to keep it.
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from tests.conftest import BrokerProcess
from tests.wsraw import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, RawWs, encode_frame

MAX_MESSAGE = 65536
WAIT = 10.0  # seconds any single exchange may take before the connection counts as stuck
STATUSES = {101, 200, 202, 400, 403, 404, 405, 413, 415, 426, 431, 501}
ERROR_CODES = {"bad_request", "not_found", "too_large"}
REPLY_OPS = {"ack", "pong", "error", "message"}
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass
class Live:
    broker: BrokerProcess
    observers: list[RawWs]  # a JSON and a msgpack subscriber to ">"
    sync: RawWs  # publishes the markers that end an example for the observers
    marker: int = 0
    seen: Counter[str] = field(default_factory=Counter)  # outcomes, to show the fuzz reached them

    def saw(self, outcome: str) -> None:
        self.seen[outcome] += 1
        event(outcome)


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    broker = BrokerProcess(
        "--max-message-size",
        str(MAX_MESSAGE),
        "--max-http-body",
        str(MAX_MESSAGE),
        "--max-subscriptions",
        "20",
        "--close-timeout",
        "2",
        "--allowed-origins",  # the perimeter's 403 in the mix (clients here send no Origin)
        "https://ok.example",
    ).start()
    try:
        observers = [RawWs(broker.port), RawWs(broker.port, subprotocol="pubsub.v1.msgpack")]
        for ws in observers:
            ws.send_json({"op": "subscribe", "topic": ">", "id": "obs"})
            assert decode_reply(ws, *ws.recv_frame()) == {"op": "ack", "id": "obs"}
        state = Live(broker, observers, RawWs(broker.port))
        yield state
        for ws in [*observers, state.sync]:
            ws.close()
        assert broker.metric("broker_internal_errors_total") == 0
        assert broker.metric("broker_connections_closed_total", 'reason="internal_error"') == 0
        assert "Traceback" not in broker.log()
    finally:
        broker.stop()


def strict_json(payload: bytes) -> Any:
    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in a JSON reply: {payload[:200]!r}")

    return json.loads(payload.decode("utf-8"), parse_constant=refuse)


def decode_reply(ws: RawWs, op: int, payload: bytes) -> Any:
    """A data frame from the broker in the encoding its opcode says, parsed strictly."""
    if op == OP_TEXT:
        return strict_json(payload)
    assert op == OP_BINARY, op
    return msgpack.unpackb(payload, raw=False, strict_map_key=False)


def check_reply(live: Live, reply: Any, sent_ids: list[Any]) -> None:
    assert isinstance(reply, dict) and reply.get("op") in REPLY_OPS, reply
    live.saw(f"reply {reply['op']}")
    if reply["op"] == "error":
        assert reply["code"] in ERROR_CODES, reply
        live.saw(f"error {reply['code']}")
        assert isinstance(reply["message"], str)
    if "id" in reply and reply["op"] != "message":
        assert any(reply["id"] == i for i in sent_ids), (reply, sent_ids)


def sync_observers(live: Live) -> None:
    """Publish a marker and read both observers up to it, checking every frame on the way."""
    live.marker += 1
    marker = live.marker
    live.sync.send_json({"op": "publish", "topic": "fuzz.marker", "data": marker})
    for ws in live.observers:
        ws.sock.settimeout(WAIT)
        while True:
            op, payload = ws.recv_frame()
            if op in (OP_PING, OP_PONG):
                continue
            msg = decode_reply(ws, op, payload)
            assert msg["op"] == "message", msg
            live.saw(f"observer {'msgpack' if op == OP_BINARY else 'JSON'} message")
            if msg["topic"] == "fuzz.marker" and msg["data"] == marker:
                break


def broker_log_is_clean(live: Live) -> None:
    assert "Traceback" not in live.broker.log()


# -- handshakes: raw HTTP bytes -------------------------------------------------------------------

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
BASE_HEADERS = [
    (b"Host", b"127.0.0.1"),
    (b"Upgrade", b"websocket"),
    (b"Connection", b"Upgrade"),
    (b"Sec-WebSocket-Key", KEY),
    (b"Sec-WebSocket-Version", b"13"),
]
EXTRA_HEADERS = st.sampled_from(
    [
        (b"Content-Length", b"5"),
        (b"Content-Length", b"-1"),
        (b"Content-Length", b"abc"),
        (b"Content-Length", b"99999999999"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Transfer-Encoding", b"gzip"),
        (b"Sec-WebSocket-Protocol", b"pubsub.v1.msgpack"),
        (b"Sec-WebSocket-Protocol", b"\xff\xfe"),
        (b"Sec-WebSocket-Key", b"short"),
        (b"Sec-WebSocket-Version", b"8"),
        (b"Origin", b"https://evil.example"),
        (b"Origin", b"https://ok.example"),
        (b"Connection", b"close"),
        (b"Host", b""),
        (b"X-Big", b"a" * 20000),
        (b"Content-Type", b"application/msgpack"),
    ]
)


ROUTE_HEADERS = [(b"Host", b"127.0.0.1"), (b"Content-Length", b"0")]


def _head_bytes(method: bytes, target: bytes, version: bytes, headers: list[Any]) -> bytes:
    lines = b"".join(k + b": " + v + b"\r\n" for k, v in headers)
    return b"%s %s %s\r\n%s\r\n" % (method, target, version, lines)


@st.composite
def http_requests(draw: st.DrawFn) -> bytes:
    """One request: a valid upgrade, a request to a route, either mutated, or plain garbage."""
    shape = draw(st.sampled_from(["upgrade", "route", "mutated upgrade", "mutated route", "junk"]))
    if shape == "junk":
        return draw(st.binary(max_size=200))
    if "upgrade" in shape:
        method = draw(st.sampled_from([b"GET", b"GET", b"GET", b"HEAD", b"POST"]))
        target = draw(st.sampled_from([b"/ws", b"/ws", b"/ws?token=x", b"/ws?a=%ff"]))
        headers = list(BASE_HEADERS)
        body = b""
    else:
        method = draw(st.sampled_from([b"GET", b"GET", b"HEAD", b"POST", b"PUT", b"CONNECT"]))
        target = draw(
            st.sampled_from(
                [
                    *(b"/", b"/healthz", b"/metrics", b"/stats", b"/client.js", b"/nope"),
                    *(b"/publish/fz.a", b"/publish/fz.*", b"/publish/%ff", b"/publish/"),
                ]
            )
        )
        body = draw(st.sampled_from([b"", b"1", b'{"a":[1]}', b"1e999", b"[[[]]]", b"\xc1"]))
        headers = [(b"Host", b"127.0.0.1"), (b"Content-Length", b"%d" % len(body))]
    headers += draw(st.lists(EXTRA_HEADERS, max_size=1 if shape in ("upgrade", "route") else 3))
    if shape in ("upgrade", "route"):
        return _head_bytes(method, target, b"HTTP/1.1", headers) + body
    # Mutations of every part: method, target, version, headers dropped or added, the bytes.
    if draw(st.booleans()):
        method = draw(st.sampled_from([b"get", b"G ET", b"OPTIONS", b"\xff", b""]))
    if draw(st.booleans()):
        target = draw(st.sampled_from([b"*", b"http://x/ws", b"ws", b"/ws#x", b""]) | st.binary())
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTX", b""]))
    drop = draw(st.sets(st.integers(0, len(headers) - 1), max_size=2))
    headers = [h for i, h in enumerate(headers) if i not in drop]
    if draw(st.booleans()):
        i = draw(st.integers(0, len(headers)))
        headers.insert(i, (draw(st.binary(min_size=1, max_size=8)), draw(st.binary(max_size=16))))
    raw = _head_bytes(method, target, version, headers) + body + draw(st.binary(max_size=40))
    mutation = draw(st.sampled_from(["none", "truncate", "insert", "flip"]))
    if mutation == "truncate":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif mutation == "insert":
        i = draw(st.integers(0, len(raw)))
        raw = raw[:i] + draw(st.binary(min_size=1, max_size=8)) + raw[i:]
    elif mutation == "flip" and raw:
        i = draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([raw[i] ^ (1 << draw(st.integers(0, 7)))]) + raw[i + 1 :]
    return raw


def send_in_pieces(sock: socket.socket, data: bytes, cuts: list[int]) -> None:
    """Send `data` split at `cuts` (positions), pausing so each piece arrives on its own."""
    last = 0
    for cut in [*sorted(c % (len(data) + 1) for c in cuts), len(data)]:
        if cut > last:
            sock.sendall(data[last:cut])
            time.sleep(0.002)
            last = cut


def read_to_eof(sock: socket.socket) -> bytes:
    sock.settimeout(WAIT)
    out = b""
    deadline = time.monotonic() + WAIT
    try:
        while chunk := sock.recv(65536):
            out += chunk
            assert time.monotonic() < deadline, "the broker kept the connection open"
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"stuck: no EOF after {WAIT}s; got {out[:300]!r}") from None
    return out


def parse_frames(data: bytes) -> list[tuple[int, bytes]]:
    frames = []
    while data:
        assert len(data) >= 2, data
        n = data[1] & 0x7F
        start = 2 + {126: 2, 127: 8}.get(n, 0)
        if n == 126:
            n = struct.unpack("!H", data[2:4])[0]
        elif n == 127:
            n = struct.unpack("!Q", data[2:10])[0]
        assert data[0] & 0x80 and not data[1] & 0x80, data[:2]
        frames.append((data[0] & 0x0F, data[start : start + n]))
        data = data[start + n :]
    return frames


def check_http_answers(live: Live, data: bytes, head: bool) -> int:
    """Every response in `data` is documented and well formed; returns how many there were."""
    count = 0
    while data:
        assert data.startswith(b"HTTP/1.1 "), data[:200]
        top, sep, data = data.partition(b"\r\n\r\n")
        assert sep, top
        status_line, *lines = top.split(b"\r\n")
        status = int(status_line.split(b" ")[1])
        assert status in STATUSES, status_line
        live.saw(f"http {status}")
        headers = dict(line.lower().split(b": ", 1) for line in lines)
        count += 1
        if status == 101:
            for op, payload in parse_frames(data):  # what the client sent after its upgrade
                if op == OP_CLOSE:
                    code = struct.unpack("!H", payload[:2])[0]
                    assert code in (1002, 1007, 1009)
                    live.saw(f"close {code} after 101")
                else:
                    assert op in (OP_TEXT, OP_BINARY), op
            return count
        length = int(headers[b"content-length"])
        bodiless = count == 1 and head  # a HEAD answer declares the length, carries no body
        if bodiless:
            length = 0
        body, data = data[:length], data[length:]
        assert len(body) == length, "short body"
        if not bodiless and headers.get(b"content-type", b"").startswith(b"application/json"):
            strict_json(body)
    return count


@settings(FUZZ, max_examples=600)
@given(http_requests(), st.lists(st.integers(0, 10_000), max_size=2))
@example(
    _head_bytes(b"GET", b"/ws", b"HTTP/1.1", [*BASE_HEADERS[:4], (b"Sec-WebSocket-Version", b"8")]),
    [],
)  # 426
@example(
    _head_bytes(b"GET", b"/ws", b"HTTP/1.1", [*BASE_HEADERS, (b"Origin", b"https://x.example")]),
    [],
)  # 403
@example(_head_bytes(b"HEAD", b"/stats", b"HTTP/1.1", ROUTE_HEADERS), [])  # JSON, no body
@example(
    _head_bytes(b"HEAD", b"/stats", b"HTTP/1.1", ROUTE_HEADERS)
    + _head_bytes(b"GET", b"/stats", b"HTTP/1.1", ROUTE_HEADERS),
    [],
)  # a HEAD answer leaks no body into the next one, whose JSON body is whole
def test_handshakes(live: Live, raw: bytes, cuts: list[int]) -> None:
    with socket.create_connection(("127.0.0.1", live.broker.port), timeout=WAIT) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        send_in_pieces(s, raw, cuts)
        s.shutdown(socket.SHUT_WR)  # the end of what we send: the broker must conclude
        answers = check_http_answers(live, read_to_eof(s), raw.startswith(b"HEAD "))
    if b"\r\n\r\n" in raw.lstrip(b"\r\n") and len(raw) < 16 * 1024:
        assert answers, f"a whole request head got no answer: {raw[:300]!r}"
    broker_log_is_clean(live)


# -- frames ----------------------------------------------------------------------------------------


@dataclass
class Frame:
    opcode: int
    payload: bytes
    fin: bool = True
    rsv: int = 0
    mask: bool = True
    key: bytes = b"\x00\x00\x00\x00"
    wide: bool = False

    def encode(self) -> bytes:
        return encode_frame(
            self.opcode,
            self.payload,
            fin=self.fin,
            rsv=self.rsv,
            mask=self.mask,
            key=self.key,
            wide=self.wide,
        )


REQUEST_TEXTS = st.sampled_from(
    [
        b'{"op":"ping","id":1}',
        b'{"op":"subscribe","topic":"fz.>","id":2}',
        b'{"op":"publish","topic":"fz.a","data":[1,"x"],"id":3}',
        b'{"op":"publish","topic":"fz.a","data":1e999,"id":4}',
        b'{"op":"ping","id":"\\ud800"}',
        b'{"op":',
        b"[" * 200 + b"]" * 200,
    ]
)
close_payloads = st.one_of(
    st.just(b""),
    st.binary(min_size=1, max_size=1),
    st.builds(
        lambda code, reason: struct.pack("!H", code) + reason,
        st.sampled_from([1000, 1001, 1002, 1004, 1005, 1006, 1011, 1015, 2999, 3000, 4999, 5000]),
        st.sampled_from([b"", b"bye", b"\xff\xfe", b"x" * 123]),
    ),
)
masks = st.binary(min_size=4, max_size=4)
MSGPACK_REQUESTS = [
    msgpack.packb({"op": "subscribe", "topic": "fz.b", "id": 5}),
    msgpack.packb({"op": "publish", "topic": "fz.b", "data": b"\x00\xff", "id": 6}),
    msgpack.packb({"op": "publish", "topic": "fz.b", "data": float("inf")}),
]
whole_messages = st.one_of(
    st.builds(lambda p, k: [Frame(OP_TEXT, p, key=k)], REQUEST_TEXTS, masks),
    st.builds(lambda p, k: [Frame(OP_BINARY, p, key=k)], st.sampled_from(MSGPACK_REQUESTS), masks),
)


@st.composite
def fragmented_messages(draw: st.DrawFn) -> list[Frame]:
    """A message in 2-4 fragments, a ping or pong possibly between them (section 5.4)."""
    opcode, payload = draw(
        st.sampled_from([(OP_TEXT, p) for p in (b'{"op":"ping","id":1}', b"caf\xc3\xa9")])
        | st.tuples(st.just(OP_BINARY), st.sampled_from(MSGPACK_REQUESTS))
    )
    cuts = sorted(draw(st.sets(st.integers(1, len(payload) - 1), min_size=1, max_size=3)))
    parts = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
    out = [Frame(opcode if i == 0 else 0x0, part, fin=False) for i, part in enumerate(parts)]
    out[-1].fin = True
    if draw(st.booleans()):
        out.insert(draw(st.integers(1, len(out) - 1)), Frame(OP_PING, b"between"))
    return out


pings = st.one_of(
    st.builds(lambda p: [Frame(OP_PING, p)], st.binary(max_size=125)),
    st.builds(lambda p: [Frame(OP_PONG, p)], st.binary(max_size=8)),
)
closes = st.builds(lambda p: [Frame(OP_CLOSE, p)], close_payloads)
# One defect each; the broker must close with 1002, 1007 or 1009.
violations = st.one_of(
    st.builds(lambda p: [Frame(OP_TEXT, p, mask=False)], REQUEST_TEXTS),
    st.builds(lambda p, r: [Frame(OP_TEXT, p, rsv=r)], REQUEST_TEXTS, st.integers(1, 7)),
    st.builds(lambda o: [Frame(o, b"x")], st.sampled_from([0x3, 0x7, 0xB, 0xF])),
    st.just([Frame(0x0, b"continuation first")]),
    st.just([Frame(OP_PING, b"", fin=False)]),
    st.just([Frame(OP_PING, b"x" * 126)]),
    st.just([Frame(OP_TEXT, b"a", fin=False), Frame(OP_TEXT, b"b")]),  # new message mid-message
    st.builds(
        lambda p: [Frame(OP_TEXT, p)],
        st.sampled_from([b"\xff", b"\xed\xa0\x80", b"caf\xc3", b'{"id":"\xc3\x28"}']),
    ),
    st.just([Frame(OP_TEXT, b"caf\xc3", fin=False), Frame(0x0, b"(")]),  # bad UTF-8 across two
    st.just([Frame(OP_TEXT, b'{"op":"ping"}', wide=True)]),  # not the minimal length form
    st.just([Frame(OP_BINARY, b"x" * (MAX_MESSAGE + 1))]),
    st.just([Frame(OP_TEXT, b"y" * (MAX_MESSAGE // 2 + 1), fin=False)] * 2),
)
# Weighted: mostly what a client sends, sometimes a close or a defect (each usually ends it).
frame_units = st.sampled_from(
    [whole_messages] * 3 + [fragmented_messages()] * 2 + [pings] * 2 + [closes, violations]
).flatmap(lambda strategy: strategy)
# A 64-bit length with its top bit set (section 5.2: MUST be 0): refused before any payload.
BAD_LENGTH = bytes([0x82, 0xFF]) + struct.pack("!Q", 1 << 63) + b"\x00" * 4


def sent_close_code(frame: Frame) -> int | None:
    if frame.opcode != OP_CLOSE or frame.rsv or not frame.mask:
        return None
    return struct.unpack("!H", frame.payload[:2])[0] if len(frame.payload) >= 2 else 1000


@settings(FUZZ, max_examples=500)
@given(
    st.lists(frame_units, min_size=1, max_size=4).map(lambda units: [f for u in units for f in u]),
    st.lists(st.integers(0, 200_000), max_size=3),
    st.sampled_from([None, "pubsub.v1.msgpack"]),
    st.sampled_from([False] * 19 + [True]),
)
@example([Frame(OP_BINARY, b"x" * (MAX_MESSAGE + 1))], [], None, False)  # 1009
@example([Frame(OP_TEXT, b"caf\xc3", fin=False), Frame(0x0, b"(")], [5], None, False)  # 1007
@example([Frame(OP_TEXT, b'{"op":"ping","id":1}')], [], None, True)  # 1002: length's top bit
def test_frames(
    live: Live, frame_list: list[Frame], cuts: list[int], subprotocol: str | None, bad: bool
) -> None:
    ws = RawWs(live.broker.port, subprotocol=subprotocol, timeout=WAIT)
    try:
        data = b"".join(f.encode() for f in frame_list)
        if bad:
            data += BAD_LENGTH
        sentinel = b"sentinel-%d" % len(data)
        data += encode_frame(OP_PING, sentinel)
        send_in_pieces(ws.sock, data, cuts)
        # The client's close code is echoed; any other close is the broker's and must be one of
        # its documented violation codes.
        allowed = {1002, 1007, 1009} | {c for f in frame_list if (c := sent_close_code(f))}
        pings = {f.payload for f in frame_list if f.opcode == OP_PING} | {sentinel}
        while True:
            op, payload = ws.recv_frame()
            if op == OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if payload else 1005
                assert code in allowed, (code, allowed)  # so 1011 only as the client's echo
                live.saw(f"close {code}")
                assert ws.at_eof(WAIT), "no EOF after the close frame"
                break
            if op == OP_PONG:
                assert payload in pings
                if payload == sentinel:
                    live.saw("frames: still open")
                    break
                continue
            check_reply(live, decode_reply(ws, op, payload), [1, 2, 3, 4, 5, 6])
    finally:
        ws.close()
    sync_observers(live)
    broker_log_is_clean(live)


# -- requests -------------------------------------------------------------------------------------


def _nested(depth: int) -> Any:
    value: Any = "deep"
    for _ in range(depth):
        value = [value]
    return value


any_text = st.text(st.characters(categories=["Cs"]) | st.characters(), max_size=6)
topics = st.one_of(
    st.sampled_from(["fz.a", "fz.b.c", "fz.*", "fz.>", ">", "*", "", "fz..a", " fz", "x" * 256]),
    any_text,
    st.integers(),
    st.none(),
)
ids = st.one_of(
    st.none(),
    st.integers(-(2**63), 2**63 - 1),
    st.integers(2**63, 2**70),
    st.floats(),
    any_text,
    st.booleans(),
    st.lists(st.integers(), max_size=2),
)
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64),
    st.floats(),
    any_text,
    st.binary(max_size=8),
)
values = st.one_of(
    st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
        max_leaves=10,
    ),
    st.integers(100, 300).map(_nested),
)
# Well-formed requests (so acks and deliveries happen, with odd but valid values) and requests
# with any field of any type.
good_data = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=8,
)
good_requests = st.one_of(
    st.fixed_dictionaries(
        {"op": st.just("subscribe"), "topic": st.sampled_from(["fz.a", "fz.*", "fz.>"])},
        optional={"id": st.integers(0, 99) | st.text(max_size=4)},
    ),
    st.fixed_dictionaries(
        {"op": st.just("publish"), "topic": st.sampled_from(["fz.a", "fz.b.c"]), "data": good_data},
        optional={"id": st.integers(0, 99) | st.text(max_size=4)},
    ),
    st.fixed_dictionaries(
        {"op": st.sampled_from(["ping", "unsubscribe"]), "topic": st.just("fz.a")},
        optional={"id": st.floats(allow_nan=False, allow_infinity=False)},
    ),
)
any_requests = st.fixed_dictionaries(
    {},
    optional={
        "op": st.sampled_from(["publish", "publish", "subscribe", "unsubscribe", "ping", "nope"])
        | any_text
        | st.integers(),
        "topic": topics,
        "id": ids,
        "data": values,
        "extra": values,
    },
)
requests = st.one_of(good_requests, any_requests)


def encode_request(request: dict[str, Any], how: int) -> tuple[int, bytes]:
    """(opcode, payload): JSON text (escaped or raw UTF-8, surrogates as they come) or msgpack."""
    if how == 2:
        try:
            return OP_BINARY, msgpack.packb(request, unicode_errors="surrogatepass")
        except (OverflowError, ValueError, TypeError):
            pass  # too big or too deep for msgpack: send it as JSON
    text = json.dumps(request, ensure_ascii=how == 0, default=list)
    return OP_TEXT, text.encode("utf-8", "surrogatepass")


@settings(FUZZ, max_examples=500)
@given(
    st.lists(st.tuples(requests, st.integers(0, 2)), min_size=1, max_size=4),
    st.sampled_from([None, "pubsub.v1.msgpack"]),
)
@example([({"op": "ping", "id": "\udc00"}, 1)], None)  # raw UTF-8 surrogate: not UTF-8, 1007
def test_requests(
    live: Live, batch: list[tuple[dict[str, Any], int]], subprotocol: str | None
) -> None:
    ws = RawWs(live.broker.port, subprotocol=subprotocol, timeout=WAIT)
    try:
        sent_ids = [r["id"] for r, _ in batch if "id" in r]
        for request, how in batch:
            op, payload = encode_request(request, how)
            ws.send_frame(op, payload)
        ws.send_json({"op": "ping", "id": "sentinel"})
        while True:
            op, payload = ws.recv_frame()
            if op == OP_CLOSE:  # only for what the protocol closes on: bad UTF-8, too large
                code = struct.unpack("!H", payload[:2])[0]
                assert code in (1007, 1009)
                live.saw(f"requests: close {code}")
                break
            if op in (OP_PING, OP_PONG):
                continue
            assert op == (OP_TEXT if subprotocol is None else OP_BINARY), (
                "the connection's encoding"
            )
            reply = decode_reply(ws, op, payload)
            if reply == {"op": "pong", "id": "sentinel"}:
                break
            check_reply(live, reply, [*sent_ids, "sentinel"])
    finally:
        ws.close()
    sync_observers(live)
    broker_log_is_clean(live)


@settings(FUZZ, max_examples=200)
@given(
    st.sampled_from(["fz.a", "fz.*", "", "fz..a", "x" * 256]) | any_text,
    good_data | values,
    st.sampled_from(
        ["application/json", "application/msgpack", "application/octet-stream", "text/plain"]
    ),
    st.booleans(),
)
def test_http_publish(live: Live, topic: str, value: Any, ctype: str, as_json: bool) -> None:
    if ctype == "application/msgpack" and not as_json:
        try:
            body = msgpack.packb(value, unicode_errors="surrogatepass")
        except (OverflowError, ValueError, TypeError):
            body = b"\xc1"
    else:
        body = json.dumps(value, default=list).encode("utf-8", "surrogatepass")
    path = "/publish/" + urllib.parse.quote(topic.encode("utf-8", "surrogatepass"), safe="")
    conn = http.client.HTTPConnection("127.0.0.1", live.broker.port, timeout=WAIT)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": ctype})
        resp = conn.getresponse()
        answer = resp.read()
    finally:
        conn.close()
    assert resp.status in (202, 400, 413, 415), resp.status
    live.saw(f"publish {resp.status}")
    result = strict_json(answer)
    assert ("delivered" in result) == (resp.status == 202), result
    sync_observers(live)
    broker_log_is_clean(live)


# What each fuzz test must have reached at least once (derandomized: the same run every time), so
# that a strategy that stopped producing some kind of input cannot pass unnoticed.
REACHED = {
    "test_handshakes": {
        *("http 101", "http 200", "http 400", "http 403", "http 404", "http 405", "http 426")
    },
    "test_frames": {"close 1002", "close 1007", "close 1009", "frames: still open", "reply ack"},
    "test_requests": {"error bad_request", "reply ack", "reply message", "requests: close 1007"},
    "test_http_publish": {"publish 202", "publish 400", "publish 415"},
}


def test_the_fuzz_reached_every_outcome(live: Live, request: pytest.FixtureRequest) -> None:
    ran = {item.name for item in request.session.items} & set(REACHED)
    wanted = set().union(*(REACHED[name] for name in ran))
    assert wanted <= set(live.seen), (sorted(wanted - set(live.seen)), live.seen)
    if ran:
        assert live.seen["observer JSON message"] and live.seen["observer msgpack message"]
    print(dict(sorted(live.seen.items())))
