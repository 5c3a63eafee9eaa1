"""The live page and the browser client in real headless Chromium (Debian's), driven by Playwright.

Loads the page from the broker, subscribes through the UI, publishes from Python and from the page's
form, checks the figures polled from GET /stats, and restarts the broker under an open page to see
the JS client reconnect and re-subscribe. Saves a screenshot to tests/artifacts/page.png. The
README's docs/screenshot.png is tracked, so a test run never rewrites it (a CI clone stays clean):
`scripts/update_screenshot.sh` refreshes it, running the figures test with
BROKER_UPDATE_SCREENSHOT=1, the only case where that test copies its screenshot there. Never
downloads a browser: /usr/bin/chromium only.

With auth on (HS256 tokens minted here with PyJWT): the module's tokens, typed errors, refresh and
4001; the page's token prompt. With history on: recovery of the page's subscriptions after its
socket drops (no loss, no duplicate) and the "unrecovered" report after a broker restart.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from broker_client import Client
from playwright.sync_api import Page, expect, sync_playwright

from tests.conftest import ARTIFACTS, REPO, BrokerProcess

CHROMIUM = Path("/usr/bin/chromium")
SECRET = "browser-test-secret-of-32-bytes-or-more"  # PyJWT warns below 32
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
    assert page.errors == []  # type: ignore[attr-defined]
    if os.environ.get("BROKER_UPDATE_SCREENSHOT") == "1":  # scripts/update_screenshot.sh
        shutil.copyfile(shot, REPO / "docs" / "screenshot.png")


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


def mint(ttl: int = 60, **claims: Any) -> str:
    """An HS256 token signed with the test brokers' secret."""
    now = int(time.time())
    payload = {"sub": "browser", "iat": now, "exp": now + ttl, **claims}
    return jwt.encode(payload, SECRET, algorithm="HS256")


def auth_broker(broker_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    """Auth on, no leeway: a token is over at its `exp`, so the tests stay short."""
    return broker_factory("--auth-secret", SECRET, "--auth-leeway", "0")


def http_publish(broker: BrokerProcess, topic: str, data: str, token: str) -> int:
    req = urllib.request.Request(
        f"{broker.http}/publish/{topic}",
        data=data.encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status


def test_client_module_with_tokens_in_the_browser(
    page: Page, broker_factory: Callable[..., BrokerProcess]
) -> None:
    broker = auth_broker(broker_factory)
    rights = {"publish": ["js.>"], "subscribe": ["js.>"]}
    page.goto(broker.http + "/healthz")  # any page of the broker's origin, to import /client.js
    result: dict[str, Any] = page.evaluate(
        """async ({ good, refresh, fixed }) => {
            const m = await import("/client.js");
            const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
            const brief = (e) => e && {
                name: e.name, code: e.code ?? null, status: e.status ?? null };

            // A refused upgrade: the browser sees close 1006 before "open", nothing more.
            const refusedClient = new m.BrokerClient(
                undefined, { token: "no.such.token", reconnect: false });
            const refusedEvents = [];
            refusedClient.addEventListener("error", (e) => refusedEvents.push(e.detail.message));
            const refusedError = await refusedClient.connect().then(() => null, (e) => e);
            const refused = { ...brief(refusedError), tokenSent: refusedError.tokenSent,
                              message: refusedError.message, events: refusedEvents };

            // A good token: allowed requests work, the rest reject with ForbiddenError (.code).
            const client = await new m.BrokerClient(undefined, { token: good }).connect();
            const sub = await client.subscribe("js.a");
            const delivered = await client.publish("js.a", { n: 1 });
            const message = (await sub.next()).value;
            const forbidden = await client.publish("other.a", 1).then(() => null, (e) => ({
                ...brief(e),
                isForbidden: e instanceof m.ForbiddenError,
                isBroker: e instanceof m.BrokerError,
            }));
            const forbiddenSub = await client.subscribe("other.>").then(() => null, brief);
            client.close();

            // Both at once (the tokens were minted before this script ran): a token function
            // whose first token lives ~3 s, refreshed on the same socket; and a fixed token that
            // expires: "tokenexpired", then closed for good.
            const refreshPhase = async () => {
                const handed = [];
                const client = new m.BrokerClient(undefined, {
                    token: async () => {
                        handed.push(refresh[handed.length]);
                        return handed.at(-1);
                    },
                });
                const states = [];
                client.addEventListener("state", (e) => states.push(e.detail.state));
                const expiredEvents = [];
                client.addEventListener("tokenexpired", () => expiredEvents.push(1));
                await client.connect();
                const socket = client._ws;
                const firstExp = m.tokenClaims(refresh[0]).exp;
                while (Date.now() < firstExp * 1000 + 1500) await sleep(100);
                const result = {
                    handed: handed.length, sameSocket: client._ws === socket, states: [...states],
                    expired: expiredEvents.length, ping: (await client.ping()) >= 0 };
                client.close();
                return result;
            };
            const fixedPhase = async () => {
                const client = new m.BrokerClient(undefined, { token: fixed });
                const events = [];
                client.addEventListener("tokenexpired", (e) => events.push({
                    ...brief(e.detail.error), reconnect: e.detail.reconnect }));
                await client.connect();
                const started = Date.now();
                while (client.state !== "closed" && Date.now() - started < 6000) await sleep(50);
                return { state: client.state, events,
                         after: brief(await client.ping().then(() => null, (e) => e)) };
            };
            const [refreshed, expired] = await Promise.all([refreshPhase(), fixedPhase()]);
            return { refused, delivered, message, forbidden, forbiddenSub, refreshed, expired };
        }""",
        {
            "good": mint(**rights),
            "refresh": [mint(4, **rights), mint(60, **rights), mint(60, **rights)],
            "fixed": mint(3, **rights),
        },
    )
    refused = result["refused"]
    assert refused["name"] == "ConnectionRefusedError"
    assert refused["status"] is None  # a browser hides the 401
    assert refused["tokenSent"] is True
    assert refused["message"].startswith("connection refused (check token)")
    assert refused["events"] == [refused["message"]]

    assert result["delivered"] == 1
    assert result["message"] == {"topic": "js.a", "data": {"n": 1}, "seq": 1}
    assert result["forbidden"] == {
        "name": "ForbiddenError",
        "code": "forbidden",
        "status": None,
        "isForbidden": True,
        "isBroker": True,
    }
    assert result["forbiddenSub"]["code"] == "forbidden"

    refreshed = result["refreshed"]
    assert refreshed["handed"] >= 2  # the connection's token, then the refresh
    assert refreshed["sameSocket"] is True
    assert refreshed["states"] == ["connecting", "connected"]
    assert refreshed["expired"] == 0
    assert refreshed["ping"] is True

    expired = result["expired"]
    assert expired["state"] == "closed"
    assert expired["events"] == [
        {"name": "TokenExpiredError", "code": 4001, "status": None, "reconnect": False}
    ]
    assert expired["after"] == {"name": "TokenExpiredError", "code": 4001, "status": None}
    assert page.errors == []  # type: ignore[attr-defined]


def test_page_asks_for_a_token_then_shows_the_figures(
    page: Page, broker_factory: Callable[..., BrokerProcess]
) -> None:
    broker = auth_broker(broker_factory)
    stats_auth: list[str | None] = []
    page.on(
        "request",
        lambda r: (
            stats_auth.append(r.headers.get("authorization")) if r.url.endswith("/stats") else None
        ),
    )
    page.goto(broker.http + "/")
    expect(page.locator("#auth")).to_be_visible()
    expect(page.locator("#auth-why")).to_have_text(
        "This broker needs an admin token to show its figures."
    )
    expect(page.locator("#conn-error")).to_contain_text("connection refused")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "page-token.png"))

    # A valid token without "admin": /stats answers 403 and the page says why.
    page.fill("#token-input", mint(subscribe=["demo.>"]))
    page.click("#token-button")
    expect(page.locator("#auth-why")).to_contain_text("not an admin token")
    expect(page.locator("#token-status")).to_have_text("refused (HTTP 403)")

    admin = mint(admin=True, subscribe=["demo.>"], publish=["demo.>"])
    page.fill("#token-input", admin)
    page.click("#token-button")
    expect(page.locator("#auth")).to_be_hidden()
    expect(page.locator("#conn-state")).to_have_attribute("data-state", "connected")
    _wait_number(page, "#stat-connections", lambda n: n >= 1)
    expect(page.locator("#token-forget")).to_be_visible()

    # The page's own WebSocket carries the token too: it subscribes and receives.
    subscribe_in_ui(page, "demo.>")
    assert http_publish(broker, "demo.kitchen", '{"hello": "admin"}', admin) == 202
    expect(page.locator("#messages li[data-topic='demo.kitchen']")).to_contain_text("admin")
    _wait_number(page, "#stat-published-total", lambda n: n == 1)
    page.screenshot(path=str(ARTIFACTS / "page-token-accepted.png"))

    # Only in this tab's sessionStorage; never in localStorage or the URL.
    storage = page.evaluate(
        "() => ({ session: sessionStorage.getItem('broker.token'), local: localStorage.length })"
    )
    assert storage == {"session": admin, "local": 0}
    assert "token" not in page.url
    assert stats_auth[0] is None
    assert stats_auth[-1] == f"Bearer {admin}"
    assert page.errors == []  # type: ignore[attr-defined]


def test_page_recovers_after_its_socket_drops(page: Page, broker: BrokerProcess) -> None:
    open_page(page, broker)
    subscribe_in_ui(page, "rec.a")
    page.evaluate(
        """() => {
            window.seqs = [];
            window.recovered = [];
            window.brokerClient.addEventListener("message", (e) => {
                if (e.detail.topic === "rec.a") window.seqs.push(e.detail.seq);
            });
            window.brokerClient.addEventListener(
                "recovered", (e) => window.recovered.push(e.detail));
        }"""
    )
    total = 150
    with Client(broker.url) as client:

        def traffic() -> None:
            for i in range(total):
                client.publish("rec.a", {"i": i + 1})
                time.sleep(0.005)

        publisher = threading.Thread(target=traffic)
        publisher.start()
        drops = 0
        try:
            for _ in range(3):  # drop the page's socket three times while messages flow
                time.sleep(0.15)
                expect(page.locator("#conn-state")).to_have_attribute("data-state", "connected")
                drops += page.evaluate("() => { window.brokerClient._ws.close(); return 1; }")
        finally:
            publisher.join(20)
    deadline = time.monotonic() + 10
    while page.evaluate("() => window.seqs.length") < total:
        assert time.monotonic() < deadline, page.evaluate("() => window.seqs")
        time.sleep(0.05)
    time.sleep(0.3)  # a duplicate would arrive by now
    seqs = page.evaluate("() => window.seqs")
    assert seqs == list(range(1, total + 1))  # no loss, no duplicate, in order
    recovered = page.evaluate("() => window.recovered")
    assert len(recovered) == drops == 3
    assert all(r["topic"] == "rec.a" and r["epoch"] == r["since"]["epoch"] for r in recovered)
    expect(page.locator("#messages li[data-topic='rec.a']")).to_have_count(total)
    assert page.errors == []  # type: ignore[attr-defined]


def test_page_reports_unrecovered_after_broker_restart(
    page: Page, broker_factory: Callable[..., BrokerProcess]
) -> None:
    old = broker_factory()
    open_page(page, old)
    subscribe_in_ui(page, "rec.b")
    with Client(old.url) as client:
        for i in range(3):
            client.publish("rec.b", i)
    expect(page.locator("#messages li[data-topic='rec.b']")).to_have_count(3)
    page.evaluate(
        """() => {
            window.unrecovered = [];
            window.brokerClient.addEventListener(
                "unrecovered", (e) => window.unrecovered.push(e.detail));
        }"""
    )
    before = page.evaluate("() => window.brokerClient._positions.get('rec.b')")
    assert before["seq"] == 3

    old.terminate()
    expect(page.locator("#conn-state")).not_to_have_attribute("data-state", "connected")
    new = broker_factory(port=old.port)
    expect(page.locator("#conn-state")).to_have_attribute("data-state", "connected", timeout=15_000)
    expect(page.locator("#sub-status")).to_have_text(
        "reconnected: rec.b not recovered (the broker restarted); messages may be missing"
    )
    [event] = page.evaluate("() => window.unrecovered")
    assert event["topic"] == "rec.b"
    assert event["reason"] == "epoch"
    assert event["since"] == before
    assert event["epoch"] != before["epoch"]
    assert event["seq"] == 0

    with Client(new.url) as client:
        assert client.publish("rec.b", "new epoch") == 1
    expect(page.locator("#messages li[data-topic='rec.b']").first).to_contain_text("new epoch")
    after = page.evaluate("() => window.brokerClient._positions.get('rec.b')")
    assert after == {"epoch": event["epoch"], "seq": 1}
    assert page.errors == []  # type: ignore[attr-defined]


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
