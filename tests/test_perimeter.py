"""The perimeter against a broker process: Origin (403), connections per address (503) and the
handshake rate (429), each under a load that exceeds it while an honest client from another
loopback address connects and gets its messages."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from broker_client import _tls
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.auth.keys import SECRET, claims, sign
from tests.conftest import REPO, BrokerProcess, free_port
from tests.tlsutil import Pki
from tests.wsraw import OP_CLOSE, OP_TEXT, RawWs, close_payload, encode_frame

Factory = Callable[..., BrokerProcess]
ATTACKER, HONEST, PUBLISHER = "127.0.0.2", "127.0.0.3", "127.0.0.4"


class Handshake:
    """A raw upgrade from a chosen loopback address; keeps the socket when it got 101."""

    def __init__(
        self,
        port: int,
        source: str,
        origin: str | None = None,
        timeout: float = 10.0,
        token: str | None = None,
    ) -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
        )
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            "GET /ws HTTP/1.1",
            "Host: 127.0.0.1",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
        if origin is not None:
            lines.append(f"Origin: {origin}")
        if token is not None:
            lines.append(f"Authorization: Bearer {token}")
        buf = b""
        try:
            self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            while b"\r\n\r\n" not in buf:
                chunk = self.sock.recv(4096)
                if not chunk:
                    raise ConnectionError(f"closed without an answer: {buf!r}")
                buf += chunk
        except OSError:
            self.sock.close()
            raise
        head, _, self.rest = buf.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode().split("\r\n")
        self.status = int(status_line.split(" ")[1])
        self.headers = dict(line.lower().split(": ", 1) for line in header_lines)

    def closed_by_broker(self, timeout: float = 5.0) -> bool:
        """The broker closed its side (after the body) within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(4096):
                pass
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        return True

    def ws(self) -> RawWs:
        assert self.status == 101
        c = RawWs.adopt(self.sock)
        c.buf = self.rest
        return c

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def handshakes() -> Iterator[list[Handshake]]:
    opened: list[Handshake] = []
    yield opened
    for h in opened:
        h.close()


def refused_total(broker: BrokerProcess, reason: str) -> float:
    return broker.metric("broker_handshakes_refused_total", f'reason="{reason}"')


def honest_round_trip(broker: BrokerProcess, topic: str, n: int = 20) -> list[int]:
    """An honest subscriber from HONEST gets `n` messages published from PUBLISHER."""
    with (
        connect(broker.url, source_address=(HONEST, 0), open_timeout=10) as sub,
        connect(broker.url, source_address=(PUBLISHER, 0), open_timeout=10) as pub,
    ):
        sub.send(json.dumps({"op": "subscribe", "topic": topic, "id": 1}))
        assert json.loads(sub.recv(10)).items() >= {"op": "ack", "id": 1}.items()
        for i in range(n):
            pub.send(json.dumps({"op": "publish", "topic": topic, "data": i}))
        return [json.loads(sub.recv(10))["data"] for _ in range(n)]


# -- Origin ---------------------------------------------------------------------------------------


def test_origins(broker_factory: Factory, handshakes: list[Handshake]) -> None:
    b = broker_factory("--allowed-origins", "https://app.example.com,https://*.example.org")
    for origin, status in [
        ("https://app.example.com", 101),
        ("https://App.Example.com:443", 101),
        ("https://eu.example.org", 101),
        (None, 101),  # not a browser
        ("https://evil.com", 403),
        ("https://example.org", 403),
        ("https://example.org.evil.net", 403),
        ("https://evilexample.org", 403),
        ("http://app.example.com", 403),
        ("null", 403),
    ]:
        h = Handshake(b.port, "127.0.0.1", origin)
        handshakes.append(h)
        assert h.status == status, origin
        if status == 403:
            assert h.headers["connection"] == "close"
            assert h.closed_by_broker()
    assert refused_total(b, "origin") == 6
    assert refused_total(b, "rate") == refused_total(b, "per_ip") == 0
    # A real client that sends Origin.
    with connect(b.url, origin="https://x.example.org", open_timeout=5) as ws:  # type: ignore[arg-type]
        ws.send(json.dumps({"op": "ping", "id": 1}))
        assert json.loads(ws.recv(5)) == {"op": "pong", "id": 1}


def test_bad_origin_list_stops_the_broker_at_start() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "broker", "--port", str(free_port()), "--allowed-origins", "x.com"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    assert b"not an origin" in proc.stderr


# -- connections per address ----------------------------------------------------------------------


def wait_connections(broker: BrokerProcess, n: int) -> None:
    """Until the broker holds `n` connections besides the /metrics scrape."""
    assert broker.wait_metric("broker_connections", equals=n + 1) == n + 1


def test_per_address_limit_counts_down_on_every_kind_of_close(
    broker_factory: Factory, handshakes: list[Handshake]
) -> None:
    b = broker_factory("--max-connections-per-ip", "2", "--close-timeout", "1")

    def fill() -> list[Handshake]:
        got = [Handshake(b.port, ATTACKER) for _ in range(3)]
        handshakes.extend(got)
        assert [h.status for h in got] == [101, 101, 503]
        assert got[2].headers["retry-after"] == "5"
        assert got[2].closed_by_broker()
        return got[:2]

    # Plain HTTP from a full address is served: only WebSockets count.
    held = fill()
    with socket.create_connection(("127.0.0.1", b.port), source_address=(ATTACKER, 0)) as http:
        http.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert http.recv(4096).startswith(b"HTTP/1.1 200")
    # 1. the client closes cleanly, and 2. the client vanishes with an RST.
    clean, rst = held
    ws = clean.ws()
    ws.send_frame(OP_CLOSE, close_payload(1000))
    assert ws.expect_close()[0] == 1000
    rst.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    rst.close()
    clean.close()
    wait_connections(b, 0)
    # 3. the broker closes (a protocol error: drain, linger), 4. the client goes silent and the
    # broker's linger deadline ends it.
    violator, silent = fill()
    violator.sock.sendall(encode_frame(OP_TEXT, b"{}", mask=False))
    assert violator.ws().expect_close()[0] == 1002
    assert violator.closed_by_broker()
    silent.sock.sendall(encode_frame(0x3, b""))  # a reserved opcode: 1002, and no reply from us
    assert silent.ws().expect_close()[0] == 1002
    violator.close()
    wait_connections(b, 0)  # `silent` never closed its socket: the linger deadline did
    silent.close()
    # 5. an upgrade admitted by the perimeter but refused by its own checks (426).
    bad_version = socket.create_connection(("127.0.0.1", b.port), source_address=(ATTACKER, 0))
    with bad_version:
        bad_version.sendall(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n"
        )
        assert bad_version.recv(4096).startswith(b"HTTP/1.1 426")
    wait_connections(b, 0)
    # Every count went back to zero: the address gets its two again, and no more.
    fill()
    assert refused_total(b, "per_ip") == 3
    # Other addresses were never limited by ATTACKER's connections.
    assert honest_round_trip(b, "t") == list(range(20))


# -- under load ---------------------------------------------------------------------------------


def hammer(
    port: int, stop: threading.Event, seen: Counter[int], hold: list[Handshake], origin: str | None
) -> None:
    """Handshake from ATTACKER as fast as answers come; keep what is accepted (up to 200)."""
    while not stop.is_set():
        try:
            h = Handshake(port, ATTACKER, origin, timeout=10)
        except OSError:
            seen[0] += 1
            continue
        seen[h.status] += 1
        if h.status == 101 and len(hold) < 200:
            hold.append(h)
        else:
            h.close()


@pytest.mark.parametrize(
    ("flags", "origin", "refusal"),
    [
        (("--handshake-rate", "5", "--handshake-burst", "5"), None, 429),
        (("--max-connections-per-ip", "10"), None, 503),
        (("--allowed-origins", "https://ok.example"), "https://evil.example", 403),
    ],
)
def test_an_honest_client_is_served_while_an_address_is_refused(
    broker_factory: Factory, flags: tuple[str, ...], origin: str | None, refusal: int
) -> None:
    b = broker_factory(*flags)
    stop = threading.Event()
    seen: Counter[int] = Counter()
    hold: list[Handshake] = []
    workers = [
        threading.Thread(target=hammer, args=(b.port, stop, seen, hold, origin), daemon=True)
        for _ in range(4)
    ]
    for w in workers:
        w.start()
    try:
        deadline = time.monotonic() + 30
        while sum(seen.values()) < 100 and time.monotonic() < deadline:
            time.sleep(0.05)
        for round_ in range(3):  # an honest client, several times over, while the load goes on
            started = time.monotonic()
            assert honest_round_trip(b, f"honest.{round_}") == list(range(20))
            assert time.monotonic() - started < 20  # generous: correctness, not performance
    finally:
        stop.set()
        for w in workers:
            w.join(15)
        for h in hold:
            h.close()
    assert seen[0] == 0, "no handshake went unanswered"
    assert seen[refusal] > 0 and set(seen) <= {101, refusal}, seen
    reason = {429: "rate", 503: "per_ip", 403: "origin"}[refusal]
    assert refused_total(b, reason) == seen[refusal]
    if refusal == 503:
        assert seen[101] == 10  # held open all along: the address never got an eleventh
    print(f"attacker's answers: {dict(seen)}")
    assert b.metric("broker_internal_errors_total") == 0


def test_per_address_limit_over_tls(broker_factory: Factory, tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    cert, key, _ = pki.issue(1)
    tls = pki.client_context()
    b = broker_factory(
        "--tls-cert", str(cert), "--tls-key", str(key), "--max-connections-per-ip", "1", tls=tls
    )

    def wss() -> ClientConnection:
        sock = socket.create_connection(("127.0.0.1", b.port), 5, source_address=(ATTACKER, 0))
        return _tls.connect(b.url, ssl=tls, sock=sock, open_timeout=5)

    with wss(), pytest.raises(InvalidStatus) as err, wss():
        pass
    assert err.value.response.status_code == 503
    assert err.value.response.headers["Retry-After"] == "5"
    assert b.wait_metric("broker_connections", equals=1) == 1
    with wss() as again:
        again.send(json.dumps({"op": "ping", "id": 1}))
        assert json.loads(again.recv(5)) == {"op": "pong", "id": 1}


def test_perimeter_comes_before_authentication_and_a_401_frees_its_place(
    broker_factory: Factory, handshakes: list[Handshake]
) -> None:
    b = broker_factory(
        "--auth-secret",
        SECRET,
        "--max-connections-per-ip",
        "1",
        "--allowed-origins",
        "https://ok.x",
    )
    token = sign(claims(subscribe=[">"]))

    def upgrade(origin: str | None = "https://ok.x", token: str | None = None) -> Handshake:
        h = Handshake(b.port, ATTACKER, origin, token=token)
        handshakes.append(h)
        return h

    assert upgrade("https://evil.x").status == 403  # refused before its (missing) token is read
    for _ in range(3):  # admitted by the perimeter, refused by auth: the place is given back
        refused = upgrade()
        assert refused.status == 401
        assert refused.closed_by_broker()
        refused.close()
        wait_connections(b, 0)
    held = upgrade(token=token)
    assert held.status == 101
    assert upgrade().status == 503  # the address is full: 503 before any token check
    assert upgrade(token=token).status == 503
    assert refused_total(b, "per_ip") == 2 and refused_total(b, "origin") == 1
    assert b.metric("broker_auth_failures_total", 'reason="missing"') == 3
