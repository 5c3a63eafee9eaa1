"""The live page and the browser client in real headless Chromium (Debian's), driven by Playwright.

Loads the page from the broker, subscribes through the UI, publishes from Python and from the page's
form, checks the figures polled from GET /stats, and restarts the broker under an open page to see
the JS client reconnect and re-subscribe. Saves a screenshot to tests/artifacts/page.png and a copy
to docs/screenshot.png (the README shows it). Never downloads a browser: /usr/bin/chromium only.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from broker_client import Client
from playwright.sync_api import Page, expect, sync_playwright

from tests.conftest import ARTIFACTS, REPO, BrokerProcess

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Page]:
    """A page in a fresh Chromium profile; console errors are collected on `page.errors`."""
    assert CHROMIUM.exists(), "Debian chromium is missing: scripts/test.sh installs it"
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1200, "height": 900},
        )
        try:
            pg = context.new_page()
            errors: list[str] = []
            pg.on("pageerror", lambda exc: errors.append(str(exc)))
            pg.errors = errors  # type: ignore[attr-defined]
            pg.set_default_timeout(10_000)
            yield pg
        finally:
            context.close()


def open_page(page: Page, broker: BrokerProcess) -> None:
    page.goto(broker.http + "/")
    expect(page.locator("#conn-state")).to_have_attribute("data-state", "connected")


def subscribe_in_ui(page: Page, pattern: str) -> None:
    page.fill("#sub-topic", pattern)
    page.click("#sub-button")
    expect(page.locator(f".chip[data-topic='{pattern}']")).to_be_visible()
    expect(page.locator("#sub-status")).to_have_text(f"subscribed to {pattern}")


def test_page_subscribes_publishes_and_shows_live_figures(
    page: Page, broker: BrokerProcess
) -> None:
    open_page(page, broker)
    subscribe_in_ui(page, "demo.>")

    with Client(broker.url) as client:
        # A message published from Python appears in the page's log.
        assert client.publish("demo.kitchen", {"hello": "browser"}) == 1
        entry = page.locator("#messages li[data-topic='demo.kitchen']").first
        expect(entry).to_contain_text('{"hello":"browser"}')
        expect(entry).to_contain_text("#1")

        # The form publishes; a Python subscriber and the page itself (demo.>) both get it.
        sub = client.subscribe("demo.garage")
        page.fill("#pub-topic", "demo.garage")
        page.fill("#pub-data", '{"from": "page"}')
        page.click("#pub-button")
        assert sub.get(5).data == {"from": "page"}
        expect(page.locator("#pub-status")).to_have_text(
            "published to demo.garage: delivered to 2 connections"
        )
        page.fill("#pub-data", "{not json")
        page.click("#pub-button")
        expect(page.locator("#pub-status")).to_contain_text("not JSON")
        page.check("#pub-raw")
        page.click("#pub-button")
        assert sub.get(5).data == "{not json"

        # Traffic for the figures while they are checked: 60 messages over ~2.4 s on three topics.
        topics = ["demo.kitchen", "demo.garage", "demo.attic"]

        def traffic() -> None:
            for i in range(60):
                client.publish(topics[i % 3], {"t": 20 + i / 10}, ack=False)
                time.sleep(0.04)

        publisher = threading.Thread(target=traffic)
        publisher.start()
        try:
            # Figures come from GET /stats, polled once a second.
            _wait_number(page, "#stat-in", lambda n: n > 0)
            _wait_number(page, "#stat-out", lambda n: n > 0)
            _wait_number(page, "#stat-connections", lambda n: n >= 2)  # the page and this client
            expect(page.locator("#busiest tr").nth(1)).to_be_visible(timeout=5000)
            busiest = page.locator("#busiest td.topic").all_text_contents()
            assert set(busiest) <= set(topics), busiest
        finally:
            publisher.join(10)
        # At the end of the traffic, so the chart holds a few seconds of it.
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "page.png"
        page.screenshot(path=str(shot), full_page=True)
        client.ping()  # the broker answers in order: every publish above is counted
        published = 1 + 2 + 60  # from Python, two from the form, the traffic
        assert _stats(page)["published_total"] == published
        _wait_number(page, "#stat-published-total", lambda n: n == published)
    shutil.copyfile(shot, REPO / "docs" / "screenshot.png")
    assert page.errors == []  # type: ignore[attr-defined]


def test_page_reconnects_after_broker_restart(
    page: Page, broker_factory: Callable[..., BrokerProcess]
) -> None:
    old = broker_factory()
    open_page(page, old)
    subscribe_in_ui(page, "re.>")

    old.terminate()
    expect(page.locator("#conn-state")).not_to_have_attribute("data-state", "connected")
    expect(page.locator("#cards")).to_have_class("cards stale", timeout=5000)
    new = broker_factory(port=old.port)
    expect(page.locator("#conn-state")).to_have_attribute("data-state", "connected", timeout=15_000)
    assert new.metric("broker_subscriptions") == 1  # the JS client re-subscribed re.>

    with Client(new.url) as client:
        assert client.publish("re.after", "restart") == 1
    expect(page.locator("#messages li[data-topic='re.after']")).to_contain_text('"restart"')
    expect(page.locator("#cards")).to_have_class("cards", timeout=5000)
    assert page.errors == []  # type: ignore[attr-defined]


def test_client_module_operations_in_the_browser(page: Page, broker: BrokerProcess) -> None:
    page.goto(broker.http + "/")
    result: dict[str, Any] = page.evaluate(
        """async () => {
            const m = await import("/client.js");
            const client = new m.BrokerClient();  // default URL: this page's host, /ws
            const states = [];
            client.addEventListener("state", (e) => states.push(e.detail.state));
            await client.connect();
            const got = [];
            const sub = await client.subscribe("js.*");
            const cb = [];
            await client.subscribe("js.>", (msg) => cb.push(msg.seq));
            const delivered = await client.publish("js.a", { n: 1 });
            const first = await sub.next();
            got.push(first.value);
            const none = await client.publish("js.a", 2, { ack: false });
            got.push((await sub.next()).value);
            let error = null;
            try { await client.publish("js.*", 1); } catch (e) { error = [e.name, e.code]; }
            let badSub = null;
            try { await client.subscribe("a..b"); } catch (e) { badSub = e.code; }
            const rtt = await client.ping();
            await sub.unsubscribe();
            const after = await client.publish("js.a", 3);
            const subscriptions = client.subscriptions;
            client.close();
            return { url: client.url, delivered, got, none, error, badSub, rtt, after, cb,
                     subscriptions, states, ended: sub.ended,
                     matches: [m.topicMatches("a.>", "a.b.c"), m.topicMatches("a.*", "a.b.c")] };
        }"""
    )
    assert result["url"] == broker.url
    assert result["delivered"] == 1
    assert result["got"] == [
        {"topic": "js.a", "data": {"n": 1}, "seq": 1},
        {"topic": "js.a", "data": 2, "seq": 2},
    ]
    assert result["none"] is None
    assert result["error"] == ["BrokerError", "bad_request"]
    assert result["badSub"] == "bad_request"
    assert 0 <= result["rtt"] < 5000
    assert result["after"] == 1  # js.> (the callback subscription) still holds
    assert result["cb"][:2] == [1, 2]
    assert result["subscriptions"] == ["js.>"]
    assert result["ended"] is True
    assert result["states"] == ["connecting", "connected", "closed"]
    assert result["matches"] == [True, False]


def _number(page: Page, selector: str) -> float | None:
    text = page.locator(selector).inner_text().replace(",", "").replace("\u202f", "")
    try:
        return float(text)
    except ValueError:
        return None  # a dash until the first poll


def _wait_number(
    page: Page, selector: str, ok: Callable[[float], bool], timeout: float = 5
) -> None:
    """Until the figure at `selector` satisfies `ok` (the page polls /stats once a second)."""
    deadline = time.monotonic() + timeout
    while (value := _number(page, selector)) is None or not ok(value):
        assert time.monotonic() < deadline, f"{selector} shows {value}"
        time.sleep(0.1)


def _stats(page: Page) -> dict[str, Any]:
    stats: dict[str, Any] = page.evaluate("async () => (await fetch('/stats')).json()")
    return stats
