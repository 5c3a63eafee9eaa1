"""The HTTP side of the port, bytes in and bytes out: upgrades, refusals, keep-alive, limits."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.errors import HandshakeError
from broker.wire.codec import Encoding
from broker.wire.handshake import HttpExchange

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 section 1.3
ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def upgrade_request(extra: bytes = b"", key: bytes = KEY, version: bytes = b"13") -> bytes:
    return (
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n"
        b"Sec-WebSocket-Key: "
        + key
        + b"\r\nSec-WebSocket-Version: "
        + version
        + b"\r\n"
        + extra
        + b"\r\n"
    )


def test_upgrade_answers_101_with_the_rfc_accept_token() -> None:
    ex = HttpExchange(1024)
    req = ex.receive(upgrade_request() + b"\x81\x80abcd")
    assert req is not None and req.path == "/ws"
    up = ex.accept_upgrade(req)
    assert up.response.startswith(b"HTTP/1.1 101 ")
    assert b"sec-websocket-accept: " + ACCEPT + b"\r\n" in up.response
    assert b"sec-websocket-protocol" not in up.response.lower()
    assert up.encoding is Encoding.JSON
    assert up.trailing_data == b"\x81\x80abcd"  # the client's first frame, carried over


@pytest.mark.parametrize(
    ("offer", "encoding", "chosen"),
    [
        (b"pubsub.v1.msgpack", Encoding.MSGPACK, b"pubsub.v1.msgpack"),
        (b"mqtt, pubsub.v1.json", Encoding.JSON, b"pubsub.v1.json"),
        (b"pubsub.v1.msgpack, pubsub.v1.json", Encoding.MSGPACK, b"pubsub.v1.msgpack"),
        (b"mqtt", Encoding.JSON, None),
    ],
)
def test_subprotocol_choice(offer: bytes, encoding: Encoding, chosen: bytes | None) -> None:
    ex = HttpExchange(1024)
    req = ex.receive(upgrade_request(b"Sec-WebSocket-Protocol: " + offer + b"\r\n"))
    assert req is not None
    up = ex.accept_upgrade(req)
    assert up.encoding is encoding
    if chosen is None:
        assert b"sec-websocket-protocol" not in up.response.lower()
    else:
        assert b"sec-websocket-protocol: " + chosen + b"\r\n" in up.response.lower()


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (upgrade_request(version=b"8"), 426),
        (upgrade_request(key=b"short"), 400),
        (upgrade_request(key=base64.b64encode(b"x" * 15)), 400),
        (upgrade_request(key=b"!!!!!!!!!!!!!!!!!!!!!!=="), 400),
        (b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"POST /ws HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 400),
    ],
)
def test_refused_upgrades(raw: bytes, status: int) -> None:
    ex = HttpExchange(1024)
    req = ex.receive(raw)
    assert req is not None
    with pytest.raises(HandshakeError) as err:
        ex.accept_upgrade(req)
    assert err.value.status == status
    if status == 426:
        assert (b"sec-websocket-version", b"13") in err.value.headers
    response = ex.respond(err.value.status, b"no\n", headers=err.value.headers)
    assert response.startswith(b"HTTP/1.1 %d " % status)


def test_keep_alive_and_pipelining() -> None:
    ex = HttpExchange(1024)
    two = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n"
    first = ex.receive(two)
    assert first is not None and first.path == "/a"
    assert ex.respond(200, b"ok").endswith(b"\r\n\r\nok")
    assert ex.next_cycle()
    second = ex.next_request()
    assert second is not None and second.path == "/b"


def test_body_is_collected_and_capped() -> None:
    ex = HttpExchange(10)
    req = ex.receive(b"POST /publish/a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhel")
    assert req is None
    req = ex.receive(b"lo")
    assert req is not None and req.body == b"hello"
    ex2 = HttpExchange(10)
    with pytest.raises(HandshakeError) as err:
        ex2.receive(b"POST /publish/a HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n")
    assert err.value.status == 413
    ex3 = HttpExchange(10)
    chunked = b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n20\r\n" + b"x" * 32
    with pytest.raises(HandshakeError) as err:
        ex3.receive(chunked)
    assert err.value.status == 413
    assert b"connection: close" in ex3.respond(413, b"").lower()


def test_oversized_headers_are_refused() -> None:
    ex = HttpExchange(10)
    with pytest.raises(HandshakeError) as err:
        ex.receive(b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000)
    assert err.value.status == 431


@given(st.binary(max_size=300))
def test_garbage_is_a_request_none_or_handshake_error(data: bytes) -> None:
    ex = HttpExchange(100)
    try:
        req = ex.receive(data)
        if req is not None and req.path == "/ws":
            ex.accept_upgrade(req)
    except HandshakeError as exc:
        assert 400 <= exc.status < 500
        ex.respond(exc.status, b"")


def _head_and_body(response: bytes) -> tuple[dict[bytes, bytes], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")[1:]
    return dict(line.lower().split(b": ", 1) for line in lines), body


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        # A HEAD "upgrade": refused like any non-GET, and h11 forbids a body after HEAD.
        (upgrade_request().replace(b"GET ", b"HEAD ", 1), 400),
        (b"HEAD /publish/a HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n", 413),
        # h11 refuses the request itself (no Host): its sender still reads a HEAD answer.
        (b"HEAD /ws HTTP/1.1\r\n\r\n", 400),
    ],
)
def test_refusals_of_head_requests_have_no_body(raw: bytes, status: int) -> None:
    ex = HttpExchange(10)
    try:
        ex.receive(raw[:3])  # in pieces, as a socket may deliver it
        req = ex.receive(raw[3:])
        assert req is not None
        ex.accept_upgrade(req)
    except HandshakeError as exc:
        assert exc.status == status
        response = ex.respond(exc.status, b"refused\n", headers=exc.headers)
    else:
        raise AssertionError("accepted")
    assert response.startswith(b"HTTP/1.1 %d " % status)
    headers, body = _head_and_body(response)
    assert body == b""
    assert headers[b"content-length"] == b"8"  # what a GET would have carried


def test_head_keeps_the_connection_and_the_next_response_follows_the_headers() -> None:
    ex = HttpExchange(1024)
    req = ex.receive(b"HEAD /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    assert req is not None and req.method == b"HEAD"
    first = ex.respond(200, b"hello")
    assert first.endswith(b"\r\n\r\n")
    assert _head_and_body(first)[0][b"content-length"] == b"5"
    assert ex.next_cycle()
    second = ex.next_request()
    assert second is not None and second.method == b"GET"
    assert ex.respond(200, b"hello").endswith(b"\r\n\r\nhello")  # GET after HEAD: body again
