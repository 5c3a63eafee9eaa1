"""The bench's sans-IO scanner and client frames: bytes in, counts and pongs out."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from broker.bench import wire
from broker.wire.frames import frame


def delivery(seq: int, stamp: int = 0x1234) -> bytes:
    payload = wire.make_payload(stamp, seq, 64).decode()
    body = json.dumps({"op": "message", "topic": "t0", "data": payload, "seq": seq})
    return frame(0x1, body.encode())


def feed(
    chunks: list[bytes], want_stamps: bool = False, fast: bool = False
) -> tuple[int, list[bytes], list[bytes]]:
    """Run chunks through scan the way a worker does, carrying the kept tail over."""
    buf = bytearray(1 << 16)
    pend = b""
    count, stamps, pings = 0, [], []
    for chunk in chunks:
        data = pend + chunk
        buf[: len(data)] = data
        n, found, keep, seen = wire.scan(buf, len(data), want_stamps, fast)
        count += n
        stamps += found
        pings += seen
        pend = bytes(buf[keep : len(data)])
    return count, stamps, pings


def test_payload_is_wsload_shaped() -> None:
    p = wire.make_payload(0xABC, 7, 64)
    assert len(p) == 64
    assert p.startswith(b"#" + b"%016x" % 0xABC + b"%016x" % 7)


def test_counts_every_delivery_in_one_buffer() -> None:
    stream = b"".join(delivery(i) for i in range(100))
    count, stamps, _ = feed([stream], want_stamps=True)
    assert count == 100
    assert stamps == [b"%016x" % 0x1234] * 100


@given(
    st.lists(st.integers(min_value=1, max_value=400), min_size=1, max_size=40),
    st.sampled_from(["stamps", "pairs", "fast"]),
)
def test_split_points_never_lose_or_double_count(cuts: list[int], how: str) -> None:
    # a ping whose payload holds '#' and whose length byte is 0x23 sits among the deliveries
    ping = frame(0x9, b"#" * 35)
    stream = b"".join(delivery(i, stamp=i + 1) + (ping if i == 7 else b"") for i in range(30))
    chunks, pos = [], 0
    for n in cuts:
        chunks.append(stream[pos : pos + n])
        pos += n
    chunks.append(stream[pos:])
    count, stamps, pings = feed(chunks, want_stamps=how == "stamps", fast=how == "fast")
    assert count == 30
    assert pings == [b"#" * 35]
    if how == "stamps":
        assert sorted(int(s, 16) for s in stamps) == list(range(1, 31))


def test_ping_is_found_between_deliveries_and_across_a_split() -> None:
    ping = frame(0x9, b"keepalive")
    stream = delivery(1) + ping + delivery(2)
    cut = len(delivery(1)) + 3  # inside the ping's payload
    count, _, pings = feed([stream[:cut], stream[cut:]])
    assert count == 2
    assert pings == [b"keepalive"]


def test_header_byte_0x23_is_not_a_marker() -> None:
    # a 35-byte frame has 0x23 ('#') as its length byte; only '"#' counts
    ack = frame(0x1, b'{"op":"ack","id":1,"pad":"xxxxxxx"}')
    assert ack[1] == 0x23
    assert feed([ack])[0] == 0


def test_client_frames_are_masked_and_unmask_to_the_payload() -> None:
    body = wire.publish_body(b"t0", wire.make_payload(1, 2, 64))
    f = wire.client_frame(body)
    assert f[0] == 0x81
    assert f[1] & 0x80
    length = f[1] & 0x7F
    assert length == len(body) < 126
    key = f[2:6]
    assert wire.mask(f[6:], key) == body
    long_body = body * 3
    g = wire.client_frame(long_body)
    assert g[1] == 0x80 | 126
    assert int.from_bytes(g[2:4], "big") == len(long_body)
    assert wire.mask(g[8:], g[4:8]) == long_body


def test_handshake_response_check() -> None:
    req, accept = wire.handshake_request("127.0.0.1", 1, "/ws")
    key = next(v for v in req.split(b"\r\n") if v.startswith(b"Sec-WebSocket-Key"))
    assert wire.accept_for(key.split(b": ")[1]) == accept
    ok = b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: " + accept
    assert wire.check_handshake_response(ok, accept) is None
    assert wire.check_handshake_response(b"HTTP/1.1 404 Not Found", accept)
    bad = b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: AAAA"
    assert wire.check_handshake_response(bad, accept) == "bad Sec-WebSocket-Accept"
