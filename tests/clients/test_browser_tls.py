"""The live page and the JS client over https:// and wss:// in headless Chromium.

Chromium does not know the test CA; it is told to accept exactly the broker's key with
`--ignore-certificate-errors-spki-list` (a pin of the certificate's SubjectPublicKeyInfo, checked
on every handshake), not a blanket `--ignore-certificate-errors`. A second broker with a different
key shows the pin is a real check: Chromium refuses it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from broker_client._tls import connect
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, expect, sync_playwright

from tests.clients.test_browser import CHROMIUM, CHROMIUM_ARGS, open_page, subscribe_in_ui
from tests.conftest import BrokerProcess
from tests.tlsutil import Pki

Factory = Callable[..., BrokerProcess]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


@pytest.fixture
def pinned(pki: Pki, broker_factory: Factory, tmp_path: Path) -> Iterator[tuple[Page, Any]]:
    """(page in a Chromium that pins the broker's key, the TLS broker)."""
    cert, key, spki = pki.issue(2001)
    broker = broker_factory(
        "--tls-cert", str(cert), "--tls-key", str(key), tls=pki.client_context()
    )
    assert CHROMIUM.exists(), "Debian chromium is missing: scripts/test.sh installs it"
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=str(CHROMIUM),
            args=[*CHROMIUM_ARGS, f"--ignore-certificate-errors-spki-list={spki}"],
            headless=True,
        )
        try:
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.errors = errors  # type: ignore[attr-defined]
            page.set_default_timeout(10_000)
            yield page, broker
        finally:
            context.close()


def test_page_and_js_client_over_wss(pinned: tuple[Page, BrokerProcess]) -> None:
    page, broker = pinned
    assert broker.http.startswith("https://")
    open_page(page, broker)  # the page derives wss:// from its https:// location
    subscribe_in_ui(page, "secure.>")
    with connect(broker.url, ssl=broker.tls) as ws:
        ws.send(json.dumps({"op": "publish", "topic": "secure.a", "data": {"x": 1}, "id": 1}))
        assert json.loads(ws.recv(5))["delivered"] == 1
    entry = page.locator("#messages li[data-topic='secure.a']").first
    expect(entry).to_contain_text('{"x":1}')

    result: dict[str, Any] = page.evaluate(
        """async () => {
            const m = await import("/client.js");
            const client = new m.BrokerClient();
            await client.connect();
            const sub = await client.subscribe("big");
            const data = "y".repeat(300000);  // many TLS records each way
            const delivered = await client.publish("big", data);
            const got = (await sub.next()).value;
            client.close();
            return { url: client.url, delivered, size: got.data.length };
        }"""
    )
    assert result == {"url": broker.url, "delivered": 1, "size": 300000}
    assert broker.metric("broker_tls_handshake_failures_total", 'reason="peer_alert"') == 0
    assert page.errors == []  # type: ignore[attr-defined]


def test_pin_is_a_real_check(
    pinned: tuple[Page, BrokerProcess], pki: Pki, broker_factory: Factory
) -> None:
    page, _ = pinned
    cert, key, _ = pki.issue(2002, name="other")  # same CA, another key: not pinned
    other = broker_factory("--tls-cert", str(cert), "--tls-key", str(key), tls=pki.client_context())
    with pytest.raises(PlaywrightError, match="ERR_CERT_AUTHORITY_INVALID"):
        page.goto(other.http + "/")
    labels = 'reason="peer_alert"'
    # Chromium may try the handshake more than once: at least one refusal, counted as an alert.
    assert other.wait_metric("broker_tls_handshake_failures_total", labels, at_least=1) >= 1
