"""broker-bench end to end at tiny scale: every scenario against a real broker (or the trivial
server for `ceiling`), checking the report's fields and its bookkeeping, never its timing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from broker.bench.__main__ import main
from tests.conftest import REPO, BrokerProcess

NUMBERS = (int, float)


def bench(tmp_path: Path, *args: str, timeout: float = 120) -> dict[str, Any]:
    out = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "broker.bench", *args, "--json", str(out), "--procs", "2"]
    proc = subprocess.run(
        cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    doc: dict[str, Any] = json.loads(out.read_text())
    assert doc["reports"], doc
    return doc


def check_numbers(results: dict[str, Any], fields: list[str]) -> None:
    for name in fields:
        assert name in results, f"{name} missing from {sorted(results)}"
        value = results[name]
        assert isinstance(value, NUMBERS) and not isinstance(value, bool), (name, value)
        assert math.isfinite(value), (name, value)


def against(broker: BrokerProcess) -> list[str]:
    return ["--url", broker.url, "--pid", str(broker.pid)]


def test_idle(broker: BrokerProcess, tmp_path: Path) -> None:
    doc = bench(
        tmp_path, "idle", *against(broker), "--conns", "40", "--settle", "0.2", "--rest", "0.5"
    )
    r = doc["reports"][0]["results"]
    check_numbers(
        r,
        [
            "conns_ready",
            "conns_failed",
            "connect_per_s",
            "rss_empty_kib",
            "rss_kib",
            "bytes_per_conn",
            "rest_cpu_pct",
            "disconnected_at_rest",
            "other_cpu",
        ],
    )
    assert r["conns_ready"] == 40
    assert r["conns_failed"] == 0
    assert r["disconnected_at_rest"] == 0
    # the broker saw our 40 connections (plus the /metrics request itself)
    assert r["broker_connections_gauge"] >= 40


def test_fanout_delivers_everything(broker: BrokerProcess, tmp_path: Path) -> None:
    doc = bench(tmp_path, "fanout", *against(broker), "--subs", "30", "--duration", "1")
    r = doc["reports"][0]["results"]
    check_numbers(
        r,
        [
            "published",
            "delivered",
            "lost",
            "disconnected",
            "deliveries_per_s",
            "broker_cpu_pct",
            "broker_cpu_us_per_delivery",
            "loadgen_cpu_pct",
        ],
    )
    assert r["subs_ready"] == 30
    assert r["published"] > 0
    assert r["delivered"] == r["published"] * 30
    assert r["lost"] == 0
    assert r["disconnected"] == 0
    assert r["publish_errors"] == 0


def test_latency_with_sweep(broker: BrokerProcess, tmp_path: Path) -> None:
    doc = bench(
        tmp_path,
        "latency",
        *against(broker),
        "--subs",
        "20",
        "--rate",
        "40",
        "--duration",
        "1",
        "--sweep",
        "--sweep-start",
        "40",
        "--step-duration",
        "0.5",
        "--sweep-max",
        "100",
        "--sweep-factor",
        "2",
    )
    rep = doc["reports"][0]
    r = rep["results"]
    check_numbers(r, ["published", "delivered", "lost", "p50_ms", "p99_ms", "max_ms", "samples"])
    assert r["delivered"] == r["published"] * 20
    assert r["samples"] == r["delivered"]  # every delivery carried a readable stamp
    assert 0 <= r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
    # the sweep ran 40, 80 (and stops before 160 > --sweep-max) unless p99 passed 5 ms first
    assert [s["rate"] for s in rep["steps"]][:1] == [40]
    for s in rep["steps"]:
        check_numbers(s, ["rate", "published", "delivered", "p50_ms", "p99_ms"])
        assert s["delivered"] == s["published"] * 20


def test_ceiling_against_the_trivial_server(tmp_path: Path) -> None:
    doc = bench(tmp_path, "ceiling", "--subs", "30", "--duration", "1")
    rep = doc["reports"][0]
    assert rep["scenario"] == "ceiling"
    assert rep["params"]["server"] == "trivial"
    r = rep["results"]
    check_numbers(r, ["deliveries_per_s", "loadgen_cpu_pct", "broker_cpu_pct", "lost"])
    assert r["delivered"] == r["published"] * 30 > 0


@pytest.mark.parametrize(
    "url",
    ["ws://10.0.0.1:8765/ws", "ws://[::1]:8765/ws", "ws://example.com/ws", "wss://127.0.0.1/"],
)
def test_refuses_targets_outside_loopback(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fanout", "--url", url]) == 2
    assert "broker-bench:" in capsys.readouterr().err


def test_tls_idle_and_fanout_against_a_spawned_broker(tmp_path: Path) -> None:
    """--tls: the bench makes a certificate, spawns a TLS broker and loads it over wss://."""
    doc = bench(tmp_path, "idle", "--tls", "--conns", "40", "--settle", "0.2", "--rest", "0.5")
    report = doc["reports"][0]
    assert report["params"]["url"].startswith("wss://127.0.0.1:")
    assert report["results"]["conns_ready"] == 40
    assert report["results"]["broker_connections_gauge"] >= 40  # read over https
    doc = bench(tmp_path, "fanout", "--tls", "--subs", "30", "--duration", "1")
    r = doc["reports"][0]["results"]
    assert r["subs_ready"] == 30
    assert r["lost"] == 0
    assert r["delivered"] == r["published"] * 30 > 0


def test_tls_ceiling_is_refused_before_anything_starts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ceiling", "--tls"]) == 2
    assert "speaks no TLS" in capsys.readouterr().err


def test_pollers_runs_each_poller_and_draws_the_plot(tmp_path: Path) -> None:
    """`pollers` at toy scale: a broker per poller, every step delivers everything, a PNG."""
    png = tmp_path / "pollers.png"
    doc = bench(
        tmp_path,
        "pollers",
        *("--crowd", "0,30", "--select-crowd", "0,20", "--active", "5", "--rate", "50"),
        *("--duration", "0.5", "--rest", "0.2", "--probe", "10", "--plot", str(png)),
    )
    reports = doc["reports"]
    assert [r["params"]["poller"] for r in reports] == ["epoll", "poll", "select"]
    for rep in reports:
        crowd = [0, 20] if rep["params"]["poller"] == "select" else [0, 30]
        assert [s["idle"] for s in rep["steps"]] == crowd
        for s in rep["steps"]:
            check_numbers(
                s,
                ["wakeups", "cpu_us_per_wakeup", "cpu_us_per_delivery", "p50_ms", "p99_ms"],
            )
            assert s["active"] == 5
            assert s["delivered"] == s["published"] * 5 > 0
            assert s["lost"] == 0
            assert s["wakeups"] > 0
    # far below FD_SETSIZE, the probe's connections are all served
    assert reports[2]["results"]["probe_ready"] == 10
    assert reports[2]["results"]["probe_refused"] == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --replot redraws from the JSON alone, running nothing
    again = tmp_path / "again.png"
    assert main(["pollers", "--replot", str(tmp_path / "report.json"), "--plot", str(again)]) == 0
    assert again.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pollers_spawns_its_own_brokers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pollers", "--url", "ws://127.0.0.1:9/ws", "--no-plot"]) == 2
    assert "drop --url" in capsys.readouterr().err
