"""broker-cli top, connections and topics against a real broker with a real slow reader: the JSON
and the tables, the admin token, and `top` in a real pseudo-terminal (keys switch the sort, `q`
quits and restores the terminal)."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from broker_client.top import View, connections_table, render
from rich.console import Console

from tests.auth.keys import SECRET, claims, sign
from tests.conftest import BrokerProcess
from tests.wsraw import RawWs

from .test_cli import assert_clean_failure, cli

_SCRIPT = Path(sys.executable).with_name("broker-cli")
Ws = Callable[..., RawWs]
HIGH_WATER = 65536
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture
def lagging(broker_factory: Callable[..., BrokerProcess], raw_ws: Ws) -> Iterator[BrokerProcess]:
    """A broker with one reader that stopped reading (over the mark, conflating two topics) and
    one that keeps up, after a second of publishing (so the topic rates are known)."""
    broker = broker_factory(
        "--outbound-high-water", str(HIGH_WATER), "--overflow", "ticker.>=conflate"
    )
    slow = raw_ws(broker, rcvbuf=4096)
    slow.send_json({"op": "subscribe", "topic": "ticker.>", "id": 1})
    assert slow.recv_json()["op"] == "ack"
    pub = raw_ws(broker)
    deadline = time.monotonic() + 30
    started = time.monotonic()
    i = 0
    while time.monotonic() < deadline:
        for topic in ("ticker.a", "ticker.b"):
            pub.send_json({"op": "publish", "topic": topic, "data": "x" * 20_000})
        i += 1
        # Batches under the mark: the kernel's buffers fill first, then the queue.
        pub.send_json({"op": "ping", "id": i})
        assert pub.recv_json()["op"] == "pong"
        if time.monotonic() - started > 1.2:
            with urllib.request.urlopen(broker.http + "/connections", timeout=5) as r:
                if json.loads(r.read())["connections"][0]["conflated_topics"] == 2:
                    break
    stop = threading.Event()

    def keep_publishing() -> None:  # the topic rates are per second: keep them non-zero
        while not stop.wait(0.05):
            for topic in ("ticker.a", "ticker.b"):
                pub.send_json({"op": "publish", "topic": topic, "data": i})

    thread = threading.Thread(target=keep_publishing, daemon=True)
    thread.start()
    yield broker
    stop.set()
    thread.join(5)


def test_connections_and_topics_json_and_tables(lagging: BrokerProcess) -> None:
    result = cli("--url", lagging.url, "connections", "--json", "--limit", "1")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    (first,) = data["connections"]
    assert data["sort"] == "lag" and data["total"] == 2
    assert first["slow"] is True and first["conflated_topics"] == 2
    assert first["queued_bytes"] > HIGH_WATER and first["queue_age_s"] > 0

    topics = json.loads(cli("--url", lagging.url, "topics", "--json").stdout)
    assert {t["topic"] for t in topics["topics"]} == {"ticker.a", "ticker.b"}
    assert all(t["subscribers"] == 1 for t in topics["topics"])

    table = cli("--url", lagging.url, "connections", "--sort", "dropped").stdout
    header, _rule, row = table.splitlines()[:3]
    for column in ("fd", "remote", "user", "queued", "lag", "dropped", "confl", "up"):
        assert column in header.split(), header
    assert "127.0.0.1" in row and "KiB" in row
    by_subs = cli("--url", lagging.url, "topics", "--sort", "subscribers").stdout
    assert "ticker.>" in by_subs and "subscribers" in by_subs

    bad = cli("--url", lagging.url, "connections", "--sort", "size")
    assert bad.returncode == 2 and "invalid choice: 'size'" in bad.stderr
    assert_clean_failure(cli("--url", lagging.url, "topics", "--limit", "0"), 2, "--limit")


def test_top_once_prints_one_frame(lagging: BrokerProcess) -> None:
    result = cli("--url", lagging.url, "top", "--once", "--sort", "age", "--topic-sort", "rate")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "broker top" in out and "2 connections" in out and "sort: age / rate" in out
    assert "Connections by age" in out and "Topics by rate" in out
    assert "ticker.a" in out and "ticker.b" in out
    # Not a terminal: one frame, no screen switching or cursor codes.
    assert "\x1b[?1049h" not in out


def test_render_with_a_recording_console(lagging: BrokerProcess) -> None:
    from broker_client.top import fetch_json

    base = lagging.http

    def fetch(path: str) -> object:
        return fetch_json(base, path)

    view = View()
    for key, expected in (("d", "Connections by dropped"), ("s", "Topics by subscribers")):
        assert view.press(key)
        console = Console(record=True, width=120, color_system="truecolor")
        console.print(render(fetch, view, base))
        text = console.export_text(clear=False)
        assert expected in text, text
    html = console.export_html()
    assert "bold" in html or "font-weight: bold" in html  # the slow row is styled
    assert not view.press("q")


def test_needs_an_admin_token_with_auth_on(broker_factory: Callable[..., BrokerProcess]) -> None:
    broker = broker_factory("--auth-secret", SECRET)
    assert_clean_failure(cli("--url", broker.url, "connections"), 1, "401", "admin token")
    user = sign(claims())
    assert_clean_failure(cli("--url", broker.url, "--token", user, "topics"), 1, "403")
    admin = sign(claims(admin=True))
    result = cli("--url", broker.url, "--token", admin, "top", "--once")
    assert result.returncode == 0, result.stderr
    assert "0 connections" in result.stdout


def read_screen(fd: int, until: str, seen: bytearray, timeout: float = 15) -> str:
    """Read a pty until `until` appears in what it printed (bounded)."""
    deadline = time.monotonic() + timeout

    def found() -> bool:
        return until.encode() in seen or until in _ANSI.sub("", seen.decode("utf-8", "replace"))

    while not found() and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    text = seen.decode("utf-8", "replace")
    if until not in text:
        text = _ANSI.sub("", text)  # the styles rich puts between words
    assert until in text, text[-2000:]
    return text


def test_top_live_in_a_terminal_switches_sort_and_quits(lagging: BrokerProcess) -> None:
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
    proc = subprocess.Popen(
        [str(_SCRIPT), "--url", lagging.url, "top", "--interval", "0.3"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        start_new_session=True,
    )
    os.close(slave)
    seen = bytearray()
    try:
        read_screen(master, "sort: lag / rate", seen)
        assert b"\x1b[?1049h" in seen, "the live view uses the alternate screen"
        read_screen(master, "Connections by lag", seen)
        os.write(master, b"a")
        read_screen(master, "sort: age / rate", seen)
        os.write(master, b"s")
        read_screen(master, "sort: age / subscribers", seen)
        os.write(master, b"q")
        assert proc.wait(10) == 0
        read_screen(master, "\x1b[?1049l", seen)  # the alternate screen is left on exit
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(5)
        os.close(master)


def test_a_connection_of_a_worker_shows_as_worker_slash_fd() -> None:
    row = {
        "id": 5, "fd": 17, "remote": "127.0.0.1", "user": None, "subscriptions": 1,
        "queued_bytes": 0, "queued_frames": 0, "queue_age_s": 0.0, "dropped": 0,
        "conflated_topics": 0, "connected_s": 1.0, "slow": False,
    }  # fmt: skip
    console = Console(width=120, record=True)
    console.print(connections_table({"connections": [row, {**row, "fd": 18, "worker": 2}]}))
    text = console.export_text()
    assert re.search(r"^\s*17\s", text, re.M) and re.search(r"^\s*2/18\s", text, re.M), text
