"""Hostile input against a broker process: each gets its documented refusal (HTTP status,
`bad_request`, close code), never silence, 1011, 500 or a traceback in the log."""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest

from tests.conftest import BrokerProcess
from tests.wsraw import OP_BINARY, OP_TEXT, RawWs

Ws = Callable[..., RawWs]
JSON, MSGPACK = "pubsub.v1.json", "pubsub.v1.msgpack"
UPGRADE = (
    "Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


@pytest.fixture
def quiet_broker(broker: BrokerProcess) -> Iterator[BrokerProcess]:
    """The default broker; after the test its log holds no traceback and no bug was counted."""
    yield broker
    assert broker.metric("broker_internal_errors_total") == 0
    assert "Traceback" not in broker.log()


def strict_json(body: bytes) -> Any:
    """Parse like a strict peer: UTF-8 only, no NaN/Infinity."""

    def refuse(name: str) -> None:
        raise AssertionError(f"{name} is not JSON: {body[:100]!r}")

    return json.loads(body.decode("utf-8"), parse_constant=refuse)


def exchange(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    """Send raw HTTP and read until the broker closes (or `timeout`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except TimeoutError:
            pass
        return out


def responses(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split a stream of responses to HEAD requests: status, headers, bytes after the headers
    up to the next response (which must be empty: HEAD answers carry no body)."""
    out = []
    parts = raw.split(b"HTTP/1.1 ")[1:]
    for part in parts:
        head, _, rest = part.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        out.append((int(lines[0].split(" ")[0]), headers, rest))
    return out


# -- HEAD --------------------------------------------------------------------------------------


def test_head_upgrade_gets_400_without_body(quiet_broker: BrokerProcess) -> None:
    raw = exchange(quiet_broker.port, f"HEAD /ws HTTP/1.1\r\n{UPGRADE}\r\n".encode())
    [(status, headers, body)] = responses(raw)
    assert status == 400
    assert int(headers["content-length"]) > 0 and body == b""


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/healthz", 200),
        ("/metrics", 200),
        ("/stats", 200),
        ("/", 200),
        ("/client.js", 200),
        ("/nope", 404),
        ("/publish/a", 405),
        ("/ws", 400),
    ],
)
def test_head_on_every_route_answers_headers_only(
    quiet_broker: BrokerProcess, path: str, status: int
) -> None:
    # Two pipelined HEADs, then a GET: if a body slipped in, the next status line would not
    # start right after the headers.
    request = f"HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n" * 2 + "GET /healthz HTTP/1.1\r\n"
    request += "Host: x\r\nConnection: close\r\n\r\n"
    got = responses(exchange(quiet_broker.port, request.encode()))
    if status == 400:  # a refused upgrade closes the connection after its answer
        assert [(s, body) for s, _, body in got] == [(400, b"")]
        return
    assert [(s, body) for s, _, body in got] == [(status, b""), (status, b""), (200, b"ok")]
    assert all("content-length" in headers for _, headers, _ in got)


# -- strings no encoding can carry, numbers JSON cannot, nesting ---------------------------------


def test_lone_surrogate_id_on_msgpack_is_a_bad_request(
    quiet_broker: BrokerProcess, raw_ws: Ws
) -> None:
    c = raw_ws(quiet_broker, subprotocol=MSGPACK)
    c.send_frame(OP_TEXT, b'{"op":"ping","id":"\\ud800"}')  # JSON text on a msgpack connection
    op, payload = c.recv_frame()
    assert op == OP_BINARY
    reply = msgpack.unpackb(payload)
    assert reply["code"] == "bad_request" and "id" not in reply
    c.send_frame(OP_BINARY, msgpack.packb({"op": "ping", "id": 2}))
    assert msgpack.unpackb(c.recv_frame()[1]) == {"op": "pong", "id": 2}


@pytest.mark.parametrize("subprotocol", [JSON, MSGPACK])
@pytest.mark.parametrize(
    "request_text",
    [
        '{"op":"ping","id":1e999}',
        '{"op":"ping","id":"\\udc00"}',
        '{"op":"publish","topic":"t","data":[1, -1e999]}',
        '{"op":"publish","topic":"t","data":{"k":"\\ud800"}}',
        '{"op":"publish","topic":"t","data":' + "[" * 200 + "]" * 200 + "}",
        '{"op":"publish","topic":"t","data":' + "[" * 5000 + "]" * 5000 + "}",
    ],
)
def test_unechoable_values_get_bad_request_and_nothing_is_delivered(
    quiet_broker: BrokerProcess, raw_ws: Ws, subprotocol: str, request_text: str
) -> None:
    json_sub, mp_sub = raw_ws(quiet_broker), raw_ws(quiet_broker, subprotocol=MSGPACK)
    for sub, dec in ((json_sub, strict_json), (mp_sub, msgpack.unpackb)):
        sub.send_json({"op": "subscribe", "topic": "t", "id": 1})
        assert dec(sub.recv_frame()[1]).items() >= {"op": "ack", "id": 1}.items()
    c = raw_ws(quiet_broker, subprotocol=subprotocol)
    c.send_frame(OP_TEXT, request_text.encode())
    decode = strict_json if subprotocol == JSON else msgpack.unpackb
    reply = decode(c.recv_frame()[1])
    assert reply["op"] == "error" and reply["code"] == "bad_request", reply
    c.send_json({"op": "publish", "topic": "t", "data": "after", "id": 3})
    assert decode(c.recv_frame()[1]) == {"op": "ack", "id": 3, "delivered": 2}
    assert strict_json(json_sub.recv_frame()[1])["data"] == "after"  # the refused one never came
    assert msgpack.unpackb(mp_sub.recv_frame()[1])["data"] == "after"


def test_msgpack_nesting_and_infinite_ids(quiet_broker: BrokerProcess, raw_ws: Ws) -> None:
    c = raw_ws(quiet_broker)  # JSON connection sending msgpack frames
    deep: Any = 0
    for _ in range(300):
        deep = [deep]
    for request in (
        {"op": "ping", "id": float("inf")},
        {"op": "ping", "id": float("nan")},
        {"op": "publish", "topic": "t", "data": deep},
    ):
        c.send_frame(OP_BINARY, msgpack.packb(request))
        reply = strict_json(c.recv_frame()[1])
        assert reply["code"] == "bad_request" and "id" not in reply


def test_msgpack_infinity_reaches_msgpack_subscribers_only(
    quiet_broker: BrokerProcess, raw_ws: Ws
) -> None:
    json_sub, mp_sub = raw_ws(quiet_broker), raw_ws(quiet_broker, subprotocol=MSGPACK)
    for sub in (json_sub, mp_sub):
        sub.send_json({"op": "subscribe", "topic": "t", "id": 1})
        sub.recv_frame()
    pub = raw_ws(quiet_broker, subprotocol=MSGPACK)
    pub.send_frame(OP_BINARY, msgpack.packb({"op": "publish", "topic": "t", "data": [1e999]}))
    pub.send_frame(OP_BINARY, msgpack.packb({"op": "publish", "topic": "t", "data": 2}))
    assert msgpack.unpackb(mp_sub.recv_frame()[1])["data"] == [float("inf")]
    assert msgpack.unpackb(mp_sub.recv_frame()[1])["data"] == 2
    assert strict_json(json_sub.recv_frame()[1])["data"] == 2  # Infinity never written as JSON
    unencodable = quiet_broker.metric("broker_messages_dropped_total", 'reason="unencodable"')
    assert unencodable == 1


@pytest.mark.parametrize(
    ("body", "ctype"),
    [
        (b'{"v": 1e999}', "application/json"),
        (b'"\\ud800"', "application/json"),
        (b'{"\\udfff": 1}', "application/json"),
        (b"[" * 200 + b"]" * 200, "application/json"),
        (b"\x91" * 200 + b"\xc0", "application/msgpack"),
    ],
)
def test_http_publish_refuses_the_same_values(
    quiet_broker: BrokerProcess, body: bytes, ctype: str
) -> None:
    req = urllib.request.Request(
        f"{quiet_broker.http}/publish/t", data=body, headers={"Content-Type": ctype}
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    with err.value:
        assert err.value.code == 400
        assert "error" in strict_json(err.value.read())
