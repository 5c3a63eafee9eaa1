"""RFC 6455 conformance with raw sockets: close codes, fragmentation, control frames, limits."""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Callable

import pytest

from tests.conftest import BrokerProcess
from tests.wsraw import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RawWs,
    close_payload,
)


@pytest.fixture
def ws(raw_ws: Callable[..., RawWs]) -> Callable[..., RawWs]:
    return raw_ws


def test_client_close_is_echoed_and_tcp_closed(
    polled_broker: BrokerProcess, ws: Callable[..., RawWs]
) -> None:
    c = ws(polled_broker)
    c.send_frame(OP_CLOSE, close_payload(4000, "bye"))
    assert c.expect_close() == (4000, "")
    assert c.at_eof()


def test_close_without_code_is_answered_1000(
    broker: BrokerProcess, ws: Callable[..., RawWs]
) -> None:
    c = ws(broker)
    c.send_frame(OP_CLOSE, b"")
    assert c.expect_close()[0] == 1000
    assert c.at_eof()


def test_ping_is_answered_with_pong_carrying_the_payload(
    broker: BrokerProcess, ws: Callable[..., RawWs]
) -> None:
    c = ws(broker)
    c.send_frame(OP_PING, b"are you there")
    assert c.recv_frame() == (OP_PONG, b"are you there")


@pytest.mark.parametrize(
    ("name", "send"),
    [
        ("unmasked frame", lambda c: c.send_frame(OP_TEXT, b"{}", mask=False)),
        ("reserved bits", lambda c: c.send_frame(OP_TEXT, b"{}", rsv=4)),
        ("reserved opcode", lambda c: c.send_frame(0x3, b"")),
        ("fragmented ping", lambda c: c.send_frame(OP_PING, b"", fin=False)),
        ("ping over 125 bytes", lambda c: c.send_frame(OP_PING, b"x" * 126)),
        ("continuation first", lambda c: c.send_frame(OP_CONT, b"x")),
        (
            "new message inside a fragmented one",
            lambda c: (c.send_frame(OP_TEXT, b"a", fin=False), c.send_frame(OP_TEXT, b"b")),
        ),
        ("close code 1005 on the wire", lambda c: c.send_frame(OP_CLOSE, close_payload(1005))),
        ("one-byte close payload", lambda c: c.send_frame(OP_CLOSE, b"\x03")),
    ],
)
def test_protocol_errors_close_1002(
    broker: BrokerProcess, ws: Callable[..., RawWs], name: str, send: Callable[[RawWs], object]
) -> None:
    c = ws(broker)
    send(c)
    code, _ = c.expect_close()
    assert code == 1002, name
    assert c.at_eof()


def test_invalid_utf8_closes_1007(broker: BrokerProcess, ws: Callable[..., RawWs]) -> None:
    c = ws(broker)
    c.send_frame(OP_TEXT, b'{"op":"ping","id":"\xff\xfe"}')
    assert c.expect_close()[0] == 1007
    assert c.at_eof()
    c.close()
    closed = broker.wait_metric(
        "broker_connections_closed_total", 'reason="invalid_utf8"', equals=1
    )
    assert closed == 1


def test_invalid_utf8_split_across_fragments_closes_1007(
    broker: BrokerProcess, ws: Callable[..., RawWs]
) -> None:
    c = ws(broker)
    c.send_frame(OP_TEXT, b'"\xe2\x82', fin=False)  # the euro sign cut in half: fine so far
    c.send_frame(OP_CONT, b'\xac"', fin=False)  # completed: still fine
    c.send_frame(OP_CONT, b"\xc0", fin=True)  # never valid
    assert c.expect_close()[0] == 1007


def test_fragmented_messages_are_reassembled(
    broker: BrokerProcess, ws: Callable[..., RawWs]
) -> None:
    c = ws(broker)
    c.send_json({"op": "subscribe", "topic": "f", "id": 1})
    assert c.recv_json().items() >= {"op": "ack", "id": 1}.items()
    msg = json.dumps({"op": "publish", "topic": "f", "data": "é" * 1000, "id": 2}).encode()
    parts = [msg[i : i + 333] for i in range(0, len(msg), 333)]  # cuts through characters
    c.send_frame(OP_TEXT, parts[0], fin=False)
    c.send_frame(OP_PING, b"mid-message")  # control frames may interleave (section 5.4)
    for part in parts[1:-1]:
        c.send_frame(OP_CONT, part, fin=False)
    c.send_frame(OP_CONT, parts[-1], fin=True)
    assert c.recv_frame() == (OP_PONG, b"mid-message")
    replies = [c.recv_json(), c.recv_json()]
    assert {"op": "message", "topic": "f", "data": "é" * 1000, "seq": 1} in replies


def test_too_large_message_closes_1009(
    broker_factory: Callable[..., BrokerProcess], ws: Callable[..., RawWs]
) -> None:
    broker = broker_factory("--max-message-size", "1000")
    c = ws(broker)
    c.send_frame(OP_TEXT, b'"' + b"x" * 998 + b'"')  # exactly 1000: fine
    assert c.recv_json()["code"] == "bad_request"  # a string is not a request
    c.send_frame(OP_TEXT, b"x" * 1001)
    assert c.expect_close()[0] == 1009
    assert c.at_eof()
    # The limit holds for reassembled fragments, and counts UTF-8 bytes, not characters.
    c2 = ws(broker)
    c2.send_frame(OP_TEXT, "é".encode() * 300, fin=False)
    c2.send_frame(OP_CONT, "é".encode() * 300, fin=False)
    assert c2.expect_close()[0] == 1009
    # A frame header announcing a huge payload is refused once the limit is passed.
    c3 = ws(broker)
    c3.sock.sendall(bytes([0x82, 0xFF]) + struct.pack("!Q", 1 << 40) + b"mask" + b"\0" * 2000)
    assert c3.expect_close()[0] == 1009
    for client in (c, c2, c3):
        client.close()
    closed = broker.wait_metric("broker_connections_closed_total", 'reason="too_large"', equals=3)
    assert closed == 3


def test_binary_frame_is_msgpack_even_on_a_json_connection(
    broker: BrokerProcess, ws: Callable[..., RawWs]
) -> None:
    import msgpack

    c = ws(broker)
    c.send_frame(OP_BINARY, msgpack.packb({"op": "ping", "id": 5}))
    assert c.recv_json() == {"op": "pong", "id": 5}


def raw_http(broker: BrokerProcess, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"404"),
        (b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"400"),
        (
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n",
            b"426",
        ),
        (
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: tooshort\r\nSec-WebSocket-Version: 13\r\n\r\n",
            b"400",
        ),
        (b"BLAH\r\n\r\n", b"400"),
    ],
)
def test_handshake_errors(broker: BrokerProcess, request_bytes: bytes, status: bytes) -> None:
    response = raw_http(broker, request_bytes)
    assert response.startswith(b"HTTP/1.1 " + status), response[:200]
    if status == b"426":
        assert b"sec-websocket-version: 13" in response.lower()
