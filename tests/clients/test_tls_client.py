"""The Python clients and broker-cli over wss:// against a real TLS broker (a CA made in the test):
the `ssl=` context, `--cafile`, and a clear error when the certificate is not trusted."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from broker_client import AsyncClient, Client, ConnectError

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
