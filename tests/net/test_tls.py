"""TLS in the loop (broker/net/tls.py): real certificates from a CA made in the test, real clients.

The `websockets` client over wss (messages that span many records, a reader slow enough that
the broker holds ciphertext and waits for EPOLLOUT), HTTP over TLS, plain HTTP and garbage sent to
the TLS port, stalled handshakes dropped at --handshake-timeout while an honest client is served,
TLS 1.1 refused, and SIGHUP swapping the certificate under open connections.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from broker_client._tls import connect
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection

from tests.conftest import REPO, BrokerProcess
from tests.tlsutil import Pki

Factory = Callable[..., BrokerProcess]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


def start_tls(factory: Factory, pki: Pki, *args: str, serial: int = 1001) -> BrokerProcess:
    cert, key, _ = pki.issue(serial)
    return factory("--tls-cert", str(cert), "--tls-key", str(key), *args, tls=pki.client_context())


def wss(
    broker: BrokerProcess,
    sock: socket.socket | None = None,
    server_hostname: str = "127.0.0.1",
    **kw: Any,
) -> ClientConnection:
    """A websockets sync client over wss://, its TLS in the client library's ThreadSafeTls (see
    broker_client/_tls.py why not an SSLSocket)."""
    assert broker.tls is not None
    return connect(
        broker.url,
        ssl=broker.tls,
        sock=sock,
        server_hostname=server_hostname,
        open_timeout=5,
        **kw,
    )


def request(ws: ClientConnection, **req: Any) -> dict[str, Any]:
    ws.send(json.dumps(req))
    reply: dict[str, Any] = json.loads(ws.recv(5))
    return reply


def served_serial(broker: BrokerProcess) -> int:
    """The serial number of the certificate a new connection is given."""
    assert broker.tls is not None
    with (
        socket.create_connection(("127.0.0.1", broker.port), timeout=5) as raw,
        broker.tls.wrap_socket(raw, server_hostname="127.0.0.1") as s,
    ):
        cert = s.getpeercert()
        assert cert is not None
        return int(str(cert["serialNumber"]), 16)


def read_to_eof(s: socket.socket, timeout: float = 5.0) -> bytes:
    s.settimeout(timeout)
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def payload(n: int, size: int) -> str:
    """Distinct per message and position, so a lost, repeated or reordered record shows."""
    unit = f"<{n:04d}>abcdefghijklmnopqrstuvwxyz"
    return (unit * (size // len(unit) + 1))[:size]


@pytest.mark.parametrize("poller", ["epoll", "poll", "select"])
def test_wss_publish_subscribe_across_record_boundaries(
    broker_factory: Factory, pki: Pki, poller: str
) -> None:
    broker = start_tls(broker_factory, pki, "--poller", poller)
    with wss(broker, max_size=None) as sub, wss(broker) as pub:
        assert sub.socket.version() == "TLSv1.3"  # type: ignore[attr-defined]
        assert request(sub, op="subscribe", topic="t.>", id=1) == {"op": "ack", "id": 1}
        # 16384 is one full TLS record of plaintext; 900,000 spans 55 records each way.
        for n, size in enumerate((0, 1, 16383, 16384, 16385, 100_000, 900_000)):
            data = payload(n, size)
            ack = request(pub, op="publish", topic="t.a", data=data, id=n)
            assert ack == {"op": "ack", "id": n, "delivered": 1}
            msg = json.loads(sub.recv(5))
            assert msg["data"] == data
    assert broker.metric("broker_tls_handshakes_total") >= 2


def test_slow_reader_gets_every_byte_after_backpressure(broker_factory: Factory, pki: Pki) -> None:
    """A reader with a tiny receive buffer that stops reading: the broker keeps the unsent
    ciphertext, arms EPOLLOUT, and later sends exactly the bytes it owes."""
    broker = start_tls(broker_factory, pki, "--outbound-high-water", str(64 << 20))
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", broker.port))
    count, size = 40, 200_000  # 8 MB: far more than the socket buffers hold
    with (
        wss(broker, sock=raw, server_hostname="127.0.0.1", max_size=None, max_queue=1) as slow,
        wss(broker) as pub,
    ):
        assert request(slow, op="subscribe", topic="slow", id=1)["op"] == "ack"
        before = broker.metric("broker_backpressure_total")
        for n in range(count):
            assert (
                request(pub, op="publish", topic="slow", data=payload(n, size), id=n)["op"] == "ack"
            )
        # The slow reader's client has stopped reading (max_queue=1): bytes wait in the broker.
        assert broker.metric("broker_outbound_queued_bytes") > 1 << 20
        assert broker.metric("broker_backpressure_total") > before
        for n in range(count):
            assert json.loads(slow.recv(10))["data"] == payload(n, size)
        assert request(slow, op="ping", id=2)["op"] == "pong"
    assert broker.wait_metric("broker_outbound_queued_bytes", equals=0) == 0


def test_slow_consumer_over_tls_is_closed_and_its_ciphertext_freed(
    broker_factory: Factory, pki: Pki
) -> None:
    """Over the high-water mark with ciphertext owed: closed as a slow consumer (close frame and
    close_notify queued behind what it was owed), its buffers freed, the others served."""
    broker = start_tls(broker_factory, pki, "--close-timeout", "1")
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", broker.port))
    # close_timeout: the paused client never reads the broker's close, so do not wait 10 s for it
    with (
        wss(
            broker,
            sock=raw,
            server_hostname="127.0.0.1",
            max_size=None,
            max_queue=1,
            close_timeout=0.5,
        ) as slow,
        wss(broker) as pub,
    ):
        assert request(slow, op="subscribe", topic="s", id=1)["op"] == "ack"
        for n in range(40):  # 8 MB against the default 1 MiB mark
            assert request(pub, op="publish", topic="s", data=payload(n, 200_000), id=n)["op"]
        labels = 'reason="slow_consumer"'
        assert broker.wait_metric("broker_connections_closed_total", labels, equals=1) == 1
        assert broker.wait_metric("broker_outbound_queued_bytes", equals=0) == 0
        assert request(pub, op="ping", id=99)["op"] == "pong"


def test_sigterm_closes_tls_clients_with_1001(broker_factory: Factory, pki: Pki) -> None:
    broker = start_tls(broker_factory, pki)
    with wss(broker) as ws:
        assert request(ws, op="subscribe", topic="x", id=1)["op"] == "ack"
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(10)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1001
    assert broker.proc.wait(10) == 0


def test_keepalive_pings_travel_over_tls(broker_factory: Factory, pki: Pki) -> None:
    """The sweep's pings are queued like any frame and encrypted by the flush; the client's
    automatic pongs keep it open past ping interval + timeout."""
    broker = start_tls(broker_factory, pki, "--ping-interval", "1", "--ping-timeout", "1")
    with wss(broker) as ws:
        time.sleep(3.5)  # at least two ping rounds
        assert request(ws, op="ping", id=1)["op"] == "pong"
    assert broker.metric("broker_connections_closed_total", 'reason="ping_timeout"') == 0


def test_replay_over_the_high_water_mark_over_tls(broker_factory: Factory, pki: Pki) -> None:
    """Recovery of 2 MB under a 64 KiB mark: the backlog is encrypted a chunk at a time as the
    ciphertext drains; every message arrives once, in order, live ones behind the replay."""
    broker = start_tls(
        broker_factory, pki, "--outbound-high-water", "65536", "--history-size", "3000"
    )
    with wss(broker) as pub, wss(broker, max_size=None) as sub:
        epoch = request(pub, op="subscribe", topic="big", id=0)["epoch"]  # creates the topic
        assert request(pub, op="unsubscribe", topic="big", id=0)["op"] == "ack"
        for n in range(1, 2001):
            assert (
                request(pub, op="publish", topic="big", data=payload(n, 1000), id=n)["op"] == "ack"
            )
        sub.send(
            json.dumps(
                {"op": "subscribe", "topic": "big", "id": 1, "since": {"epoch": epoch, "seq": 0}}
            )
        )
        for n in range(2001, 2011):
            pub.send(json.dumps({"op": "publish", "topic": "big", "data": payload(n, 1000)}))
        ack = json.loads(sub.recv(5))
        assert (ack["op"], ack["recovered"]) == ("ack", True), ack
        for n in range(1, 2011):
            msg = json.loads(sub.recv(5))
            assert (msg["seq"], msg["data"]) == (n, payload(n, 1000))
    assert broker.metric("broker_slow_consumers_total") == 0


def test_http_over_tls_keeps_alive(broker_factory: Factory, pki: Pki) -> None:
    broker = start_tls(broker_factory, pki)
    conn = http.client.HTTPSConnection("127.0.0.1", broker.port, context=broker.tls, timeout=5)
    try:
        conn.request("GET", "/healthz")
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, b"ok")
        conn.request("GET", "/metrics")  # the same TLS connection
        resp = conn.getresponse()
        assert resp.status == 200
        # the start-up health check, then this connection: one handshake for two requests
        assert b"broker_tls_handshakes_total 2.0" in resp.read()
    finally:
        conn.close()


def test_plain_http_and_garbage_get_a_prompt_close(broker_factory: Factory, pki: Pki) -> None:
    broker = start_tls(broker_factory, pki)
    with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        reply = read_to_eof(s)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert f"Content-Length: {len(body)}".encode() in head
    assert body == b"This port speaks TLS only: use https:// or wss:// here.\n"

    with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as s:
        s.sendall(b"\x00\x01 not a TLS record at all \r\n" * 4)
        assert read_to_eof(s) == b""  # not even a record header: closed without a word
    with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as s:
        s.sendall(b"\x16\x03\x01\x00\x08" + b"\x01\x00\x00\x04abcd")  # a ClientHello of nonsense
        assert read_to_eof(s)[:1] == b"\x15"  # OpenSSL's alert record, then the close

    with wss(broker) as ws:  # nobody else noticed
        assert request(ws, op="ping", id=1)["op"] == "pong"
    failures = 'reason="plain_http"'
    assert broker.metric("broker_tls_handshake_failures_total", failures) == 1
    assert broker.metric("broker_tls_handshake_failures_total", 'reason="protocol"') == 1
    assert broker.metric("broker_tls_handshake_failures_total", 'reason="other"') == 1
    assert broker.metric("broker_connections_closed_total", 'reason="tls_error"') == 3


def test_stalled_handshakes_are_dropped_at_the_timeout(broker_factory: Factory, pki: Pki) -> None:
    broker = start_tls(broker_factory, pki, "--handshake-timeout", "1")
    # Half of a real ClientHello: the broker has a handshake in progress and waits for the rest.
    hello_obj = ssl.create_default_context().wrap_bio(
        ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="localhost"
    )
    with pytest.raises(ssl.SSLWantReadError):
        hello_obj.do_handshake()
    hello = outgoing.read()
    stalled = []
    t0 = time.monotonic()
    for i in range(20):
        s = socket.create_connection(("127.0.0.1", broker.port), timeout=5)
        if i % 2:
            s.sendall(hello[: len(hello) // 2])
        stalled.append(s)
    try:
        with wss(broker) as ws:  # served while the stalled ones wait
            assert request(ws, op="subscribe", topic="x", id=1)["op"] == "ack"
            assert request(ws, op="publish", topic="x", data=1, id=2)["op"] == "message"
        for s in stalled:
            assert read_to_eof(s) == b""  # closed by the broker, nothing sent
        # 1 s timeout, checked by a once-a-second sweep; generous margin for a loaded machine
        assert time.monotonic() - t0 < 6
    finally:
        for s in stalled:
            s.close()
    timeouts = 'reason="timeout"'
    assert broker.metric("broker_tls_handshake_failures_total", timeouts) == 20
    assert broker.metric("broker_connections_closed_total", 'reason="handshake_timeout"') == 20


def test_tls_1_1_is_refused_and_1_2_is_served(broker_factory: Factory, pki: Pki) -> None:
    broker = start_tls(broker_factory, pki)
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(pki.ca_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSVersion.TLSv1_1 itself
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let OpenSSL 3 offer TLS 1.1 at all
    with (
        socket.create_connection(("127.0.0.1", broker.port), timeout=5) as raw,
        pytest.raises(ssl.SSLError) as refused,
    ):
        old.wrap_socket(raw, server_hostname="127.0.0.1")
    # The broker's alert, not a local refusal to offer TLS 1.1:
    assert refused.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION"
    assert broker.metric("broker_tls_handshake_failures_total", 'reason="protocol"') == 1

    tls12 = pki.client_context()
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    with (
        socket.create_connection(("127.0.0.1", broker.port), timeout=5) as raw,
        tls12.wrap_socket(raw, server_hostname="127.0.0.1") as s,
    ):
        assert s.version() == "TLSv1.2"
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert read_to_eof(s).startswith(b"HTTP/1.1 200 ")


def test_untrusted_certificate_is_a_peer_alert(broker_factory: Factory, pki: Pki) -> None:
    broker = start_tls(broker_factory, pki)
    stranger = ssl.create_default_context()  # the system CAs: ours is not among them
    with (
        socket.create_connection(("127.0.0.1", broker.port), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        stranger.wrap_socket(raw, server_hostname="127.0.0.1")
    labels = 'reason="peer_alert"'
    assert broker.wait_metric("broker_tls_handshake_failures_total", labels, equals=1) == 1


def test_sighup_reloads_the_certificate_for_new_connections(
    broker_factory: Factory, pki: Pki
) -> None:
    cert, key, _ = pki.issue(1001)
    broker = broker_factory(
        "--tls-cert", str(cert), "--tls-key", str(key), tls=pki.client_context()
    )
    assert served_serial(broker) == 1001
    with wss(broker) as old:
        assert request(old, op="subscribe", topic="r", id=1)["op"] == "ack"
        new_cert, new_key, _ = pki.issue(1002, name="next")
        os.replace(new_cert, cert)
        os.replace(new_key, key)
        os.kill(broker.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while served_serial(broker) != 1002 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert served_serial(broker) == 1002
        peer = old.socket.getpeercert()  # type: ignore[attr-defined]
        assert int(peer["serialNumber"], 16) == 1001  # the open connection kept its session
        with wss(broker) as new:
            assert request(new, op="publish", topic="r", data="after", id=2)["delivered"] == 1
        assert json.loads(old.recv(5))["data"] == "after"

        # A reload that fails keeps the certificate in use and says so.
        key.write_text("not a key\n")
        os.kill(broker.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "not reloaded" not in broker.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "WARNING" in broker.log()
        assert "not reloaded, keeping the old ones" in broker.log()
        assert served_serial(broker) == 1002
        assert request(old, op="ping", id=3)["op"] == "pong"


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["--tls-cert", "x.pem"], 2, "--tls-cert and --tls-key go together"),
        (["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"], 1, "cannot read"),
        (["--tls-cert", "{ca}", "--tls-key", "{ca}"], 1, "cannot use"),
    ],
)
def test_bad_tls_flags_fail_the_start(pki: Pki, args: list[str], status: int, message: str) -> None:
    argv = [a.format(ca=pki.ca_path) for a in args]
    done = subprocess.run(
        [sys.executable, "-m", "broker", "--port", "0", *argv],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == status
    assert message in done.stderr.decode()


def test_the_docker_health_check_speaks_tls_when_configured(
    broker_factory: Factory, pki: Pki
) -> None:
    """The Dockerfile's HEALTHCHECK command (its port swapped for the test's) asks https://
    when BROKER_TLS_CERT is set, and plain http:// otherwise."""
    line = next(x for x in (REPO / "Dockerfile").read_text().splitlines() if "CMD [" in x)
    command = json.loads(line.split("CMD", 1)[1])
    cert, key, _ = pki.issue(3001)
    env = {"BROKER_TLS_CERT": str(cert), "BROKER_TLS_KEY": str(key)}
    tls_broker = broker_factory(env=env, tls=pki.client_context())
    plain_broker = broker_factory()
    for broker, check_env in ((tls_broker, env), (plain_broker, {})):
        argv = [a.replace(":8765/", f":{broker.port}/") for a in command]
        argv[0] = sys.executable
        done = subprocess.run(
            argv, env={**os.environ, **check_env}, capture_output=True, timeout=30, check=False
        )
        assert done.returncode == 0, done.stderr.decode()
