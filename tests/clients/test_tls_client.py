"""The Python clients and broker-cli over wss:// against a real TLS broker (a CA made in the test):
the `ssl=` context, `--cafile`, a clear error when the certificate is not trusted, and the blocking
client's thread-safe TLS (`broker_client/_tls.py`): its reader thread decrypting while several
caller threads encrypt, many opening handshakes in a row, and `open_timeout` over the TLS handshake.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from broker_client import AsyncClient, Client, ConnectError
from broker_client._tls import ThreadSafeTls

from tests.clients.test_cli import cli
from tests.conftest import BrokerProcess
from tests.tlsutil import Pki

Factory = Callable[..., BrokerProcess]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


@pytest.fixture
def tls_broker(broker_factory: Factory, pki: Pki) -> BrokerProcess:
    cert, key, _ = pki.issue(2001)
    return broker_factory("--tls-cert", str(cert), "--tls-key", str(key), tls=pki.client_context())


def test_async_and_blocking_clients_speak_wss(tls_broker: BrokerProcess) -> None:
    assert tls_broker.url.startswith("wss://")

    async def run() -> None:
        async with AsyncClient(tls_broker.url, ssl=tls_broker.tls) as client:
            sub = await client.subscribe("secure.t")
            with Client(tls_broker.url, ssl=tls_broker.tls) as other:
                assert other.publish("secure.t", {"n": 1}) == 1
            message = await sub.get(timeout=5)
            assert message.data == {"n": 1}

    asyncio.run(run())


def test_untrusted_certificate_is_a_connect_error(tls_broker: BrokerProcess) -> None:
    # No ssl= means the system's CAs, which do not know the test's CA.
    with pytest.raises(ConnectError, match=r"TLS failed|CERTIFICATE_VERIFY_FAILED"):
        Client(tls_broker.url, reconnect=False).connect()


def test_cli_cafile(tls_broker: BrokerProcess, pki: Pki) -> None:
    url = ["--url", tls_broker.url, "--timeout", "5"]
    done = cli(*url, "--cafile", str(pki.ca_path), "publish", "secure.t", '"x"')
    assert (done.returncode, done.stdout.strip()) == (0, "0"), done.stderr
    refused = cli(*url, "publish", "secure.t", '"x"')
    assert refused.returncode == 3 and "TLS failed" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    plain = cli("--url", "ws://127.0.0.1:1/ws", "--cafile", str(pki.ca_path), "ping")
    assert plain.returncode == 2 and "--cafile is for wss://" in plain.stderr


def test_blocking_client_runs_wss_over_thread_safe_tls(
    tls_broker: BrokerProcess, broker: BrokerProcess
) -> None:
    """websockets' reader thread reads while callers write, which an SSLSocket cannot take (see
    _tls.py): this is the check that fails at once without the fix. ws:// keeps a plain socket."""
    with Client(tls_broker.url, ssl=tls_broker.tls) as client:
        tls = client._ws.socket
        assert isinstance(tls, ThreadSafeTls)
        assert tls.version() == "TLSv1.3"
        cert = tls.getpeercert()  # verified for the URL's host, 127.0.0.1
        assert cert is not None
        assert int(str(cert["serialNumber"]), 16) == 2001
        assert client.ping() < 5
    with Client(broker.url) as plain:
        assert type(plain._ws.socket) is socket.socket


def payload(thread: int, n: int) -> str:
    """Distinct per sender and message, 8 bytes to 29 KB: within one TLS record (16 KiB) or two."""
    unit = f"<{thread}:{n:04d}>"
    return unit * (1 + (n % 7) ** 2 * 100)


def test_blocking_client_sends_from_threads_while_it_reads_over_wss(
    tls_broker: BrokerProcess,
) -> None:
    """The concurrency of the bug, bounded: four threads publish on one client (half waiting for
    the ack the reader decrypts, half not) while the reader decrypts their deliveries. Every
    message arrives whole and in order per topic."""
    threads, count = 4, 150
    with Client(tls_broker.url, ssl=tls_broker.tls, request_timeout=10) as client:
        sub = client.subscribe("race.>")
        failures: list[BaseException] = []

        def publish(t: int) -> None:
            try:
                for n in range(count):
                    client.publish(f"race.{t}", payload(t, n), ack=n % 2 == 0)
            except BaseException as exc:
                failures.append(exc)

        senders = [threading.Thread(target=publish, args=(t,)) for t in range(threads)]
        for sender in senders:
            sender.start()
        got: dict[str, list[str]] = {f"race.{t}": [] for t in range(threads)}
        for _ in range(threads * count):
            message = sub.get(timeout=10)
            got[message.topic].append(message.data)
        for sender in senders:
            sender.join(10)
        assert failures == []
        for t in range(threads):
            assert got[f"race.{t}"] == [payload(t, n) for n in range(count)]


def test_blocking_client_opens_many_wss_connections_in_a_row(tls_broker: BrokerProcess) -> None:
    """The opening handshake is where the race hung (the reader took in the server's session
    tickets while the caller wrote the upgrade request): 60 connects, each bounded by
    open_timeout."""
    for n in range(60):
        with Client(tls_broker.url, ssl=tls_broker.tls, open_timeout=5, reconnect=False) as c:
            assert c.publish("open.n", n) == 0


def test_open_timeout_covers_the_tls_handshake() -> None:
    """A server that takes the TCP connection and never answers the ClientHello: `connect()`
    fails within open_timeout and closes its socket (the server reads the ClientHello, then
    EOF). A server that hangs up in the handshake is a ConnectError too."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        url = f"wss://127.0.0.1:{server.getsockname()[1]}/ws"
        start = time.monotonic()
        with pytest.raises(ConnectError, match=r"no answer within 0\.5 s"):
            Client(url, open_timeout=0.5, reconnect=False).connect()
        assert time.monotonic() - start < 3
        conn, _ = server.accept()
        with conn:
            conn.settimeout(5)
            hello = conn.recv(65536)
            assert hello[:1] == b"\x16"  # a TLS handshake record
            while conn.recv(65536):
                pass  # EOF: the client closed its socket

        def hang_up() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(65536)  # the ClientHello: read, so that the close is a FIN, not a reset

        closer = threading.Thread(target=hang_up)
        closer.start()
        with pytest.raises(ConnectError, match="closed the connection during the TLS handshake"):
            Client(url, open_timeout=5, reconnect=False).connect()
        closer.join(5)
