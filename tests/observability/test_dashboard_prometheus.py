"""Every query of the Grafana dashboard, run by a real Prometheus scraping a real broker under load.

The broker runs with a 64 KiB outbound high-water mark so the load's slow consumer trips it within
a few megabytes. Prometheus (Debian's binary) scrapes it every second. While the load runs, the
test evaluates every panel's PromQL with the template variables filled in as Grafana would, through
/api/v1/query, until all return data (bounded in time) and then asserts:
- every query succeeds and returns at least one series, with finite values;
- every metric a query names is one the broker exports (else the panel would be blank forever);
- every label a legend shows (`{{reason}}`) is on every series;
- the panels that load must move show it (published, delivered, bytes, closes, slow consumers...).
A separate test checks that docs/observability.md and the dashboard cover every broker_* metric
the broker exports.

It runs twice: against one process, and against `--workers 2` (the scrape is then gathered from
both workers and the hub, every series labelled by `worker`). The panels that show what only the
workers' supervisor exports (`WORKERS_ONLY`) are checked only in the second run.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from . import dashboard as dash
from .load import Load, http_get
from .prometheus import PrometheusError, PrometheusServer, finite, sample_value

ARTIFACTS = dash.REPO / "tests" / "artifacts"
DOCS = dash.REPO / "docs" / "observability.md"
JOB = "broker"
# Grafana's $__rate_interval is max(4 x scrape interval, step + scrape interval): 4 s at a 1 s
# scrape; 5 s leaves room for a late scrape.
RATE_WINDOW = "5s"
MIN_SCRAPES = 5
SETTLE_S = 6.0  # one full rate window of load plus a scrape before values are judged
WAIT_S = 45.0
SETTLED_GRACE_S = 8.0
HIGH_WATER = 64 * 1024
# Exported broker_* families the dashboard deliberately shows another way.
NOT_ON_DASHBOARD = {
    "broker_internal_errors": 'shown as broker_connections_closed_total{reason="internal_error"}',
    "broker_uptime_seconds": "uptime comes from process_start_time_seconds",
}

# Panels whose series exist only with --workers (the hub's and the backplane's).
WORKERS_ONLY = {
    "Workers running and restarts",
    "Hub messages per second",
    "Backplane up",
    "Backplane messages per second",
    "Backplane refusals and failures per second",
    "Backplane buffered bytes and pending requests",
    "Backplane round trip",
    "Backplane reconnects per minute",
}

BrokerFactory = Callable[..., Any]


@pytest.fixture(params=[1, 2], ids=["one-process", "workers-2"])
def workers(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def loaded_broker(broker_factory: BrokerFactory, workers: int) -> Any:
    return broker_factory("--outbound-high-water", str(HIGH_WATER), "--workers", str(workers))


@pytest.fixture
def prometheus(loaded_broker: Any, tmp_path: Path) -> Iterator[PrometheusServer]:
    port = loaded_broker.port
    server = PrometheusServer(
        tmp_path, JOB, f"127.0.0.1:{port}", ARTIFACTS / f"prometheus-broker-{port}.log"
    ).start()
    try:
        yield server
    finally:
        server.stop()


def template_values(port: int) -> dict[str, str]:
    return {
        "job": JOB,
        "instance": f"127.0.0.1:{port}",
        "__rate_interval": RATE_WINDOW,
        "__interval": "1s",
        "__range": "1m",
    }


def check_target(
    prom: PrometheusServer,
    where: str,
    target: dict[str, Any],
    values: dict[str, str],
    exported: set[str],
) -> list[str]:
    """What is wrong with one panel query right now (empty list: it shows data)."""
    expr = dash.substitute(target["expr"], values)
    problems = []
    unknown = dash.metric_names(expr) - exported
    if unknown:
        problems.append(f"{where}: the broker does not export {sorted(unknown)}: {expr}")
    try:
        samples = prom.query(expr)
    except PrometheusError as exc:
        return [*problems, f"{where}: query failed ({exc}): {expr}"]
    if not samples:
        return [*problems, f"{where}: no data: {expr}"]
    for sample in samples:
        missing = dash.legend_labels(target) - set(sample["metric"])
        if missing:
            problems.append(
                f"{where}: legend labels {sorted(missing)} absent from {sample['metric']}: {expr}"
            )
        if not finite(sample):
            problems.append(f"{where}: value {sample['value'][1]} for {sample['metric']}: {expr}")
    return problems


def check_dashboard(
    prom: PrometheusServer,
    board: dict[str, Any],
    values: dict[str, str],
    skip: frozenset[str] | set[str] = frozenset(),
) -> list[str]:
    exported = prom.metric_names()
    problems = []
    for panel, target in dash.targets(board):
        if panel["title"] in skip:
            continue
        where = f"{panel['title']!r} [{target['refId']}]"
        problems += check_target(prom, where, target, values, exported)
    return problems


def panel_values(
    prom: PrometheusServer, board: dict[str, Any], title: str, values: dict[str, str]
) -> dict[str, float]:
    """legend -> value for every series of a panel, evaluated now."""
    (panel,) = [p for p in dash.panels(board) if p.get("title") == title]
    out = {}
    for target in panel["targets"]:
        for sample in prom.query(dash.substitute(target["expr"], values)):
            legend = re.sub(
                r"\{\{\s*(\w+)\s*\}\}",
                lambda m, s=sample: str(s["metric"].get(m.group(1), "")),
                target.get("legendFormat") or target["refId"],
            )
            out[legend] = sample_value(sample)
    return out


@pytest.mark.timeout(90)
def test_every_dashboard_query_returns_data(
    loaded_broker: Any, prometheus: PrometheusServer, workers: int
) -> None:
    board = dash.load()
    skip = WORKERS_ONLY if workers == 1 else set()
    values = template_values(loaded_broker.port)
    instance = values["instance"]

    # Counters must have a sample from before the load, or increase() cannot see it start at 0.
    deadline = time.monotonic() + 10
    while prometheus.scrapes() < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert prometheus.scrapes() >= 2, f"no scrapes: {prometheus.target_health()}"

    load = Load(loaded_broker.port, max_seconds=70).start()
    slow_seen = f'max(broker_slow_consumers_total{{instance="{instance}"}}) >= 1'
    try:
        started = time.monotonic()
        deadline = started + WAIT_S
        problems: list[str] = ["not evaluated yet"]
        while time.monotonic() < deadline:
            problems = check_dashboard(prometheus, board, values, skip)
            settled = (
                time.monotonic() - started >= SETTLE_S
                and prometheus.scrapes() >= MIN_SCRAPES
                and bool(prometheus.query(slow_seen))
            )
            if settled and not problems:
                break
            if settled:  # the load has run long enough: a query still failing will stay failing
                deadline = min(deadline, time.monotonic() + SETTLED_GRACE_S)
            time.sleep(0.5)
        context = (
            f"\nload: {dict(load.counts)}\nload errors: {load.errors}"
            f"\ntarget: {prometheus.target_health()}, scrapes: {prometheus.scrapes()}"
        )
        assert not problems, "dashboard queries failing:\n" + "\n".join(problems) + context
        assert prometheus.scrapes() >= MIN_SCRAPES, context
        assert prometheus.target_health() == "up", context
        assert not load.errors, "well-behaved load clients failed" + context
        assert load.counts["slow consumer seen"] > 0, (
            "the broker never counted the slow consumer" + context
        )

        # The template variables list this broker, as Grafana's label_values() would.
        for name, expected in (("job", JOB), ("instance", instance)):
            query = dash.substitute(dash.variable_query(dash.variables(board)[name]), values)
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
            assert match, query
            listed = prometheus.label_values(match.group(2), match.group(1))
            assert expected in listed, f"${name}: {listed}"

        # The panels load must move do move (evaluated while the load still runs).
        def positive(title: str, at_least: float = 0.0) -> dict[str, float]:
            got = panel_values(prometheus, board, title, values)
            assert got and all(v > at_least for v in got.values()), f"{title}: {got}" + context
            return got

        positive("Messages published / delivered per second")
        positive("Bytes received / sent per second")
        positive("Open connections")
        positive("Accepted connections per second")
        positive("epoll_wait calls per second")
        positive("Subscriptions")
        positive("Topics")
        positive("Resident memory (RSS)")
        positive("Open file descriptors")
        positive("Slow consumers in range")
        positive("Fan-out (deliveries per published message)", at_least=1.0)
        busy = positive("Event loop busy fraction")
        assert all(v <= workers for v in busy.values()), busy  # summed over processes
        loop = positive("Loop iteration busy time p50 / p99")
        assert loop[f"{instance} p50"] <= loop[f"{instance} p99"] <= 1.1, loop

        closes = panel_values(prometheus, board, "Closed connections per second by reason", values)
        # Churn closes cleanly or vanishes; garbage is refused at the handshake.
        for reason in ("client_close", "client_gone", "bad_handshake"):
            assert closes[f"{instance} {reason}"] > 0, closes
        kinds = panel_values(prometheus, board, "Ready events per second by kind", values)
        assert kinds[f"{instance} in"] > 0, kinds
        bugs = panel_values(prometheus, board, "Internal errors per minute", values)
        assert bugs == {instance: 0.0}, "the broker hit internal errors under load" + context

        # The checks can fail: a metric the broker lacks, or a legend label its series lack.
        exported = prometheus.metric_names()
        bogus = {"refId": "A", "expr": 'rate(broker_no_such_metric_total{job=~"$job"}[5s])'}
        assert any(
            "does not export" in p for p in check_target(prometheus, "x", bogus, values, exported)
        )
        mislabelled = {
            "refId": "A",
            "expr": 'sum by (instance) (broker_connections{job=~"$job"})',
            "legendFormat": "{{reason}}",
        }
        assert check_target(prometheus, "x", mislabelled, values, exported)
    finally:
        load.stop()


def test_docs_and_dashboard_cover_every_broker_metric(broker: Any) -> None:
    text = http_get(broker.http + "/metrics").decode()
    families = {
        f.name for f in text_string_to_metric_families(text) if f.name.startswith("broker_")
    }
    assert families, text[:500]
    docs = DOCS.read_text()
    undocumented = sorted(f for f in families if not re.search(rf"\b{f}\b|\b{f}_", docs))
    assert not undocumented, f"docs/observability.md does not describe {undocumented}"

    used: set[str] = set()
    for _, target in dash.targets(dash.load()):
        used |= dash.metric_names(target["expr"])
    suffixes = ("", "_total", "_bucket", "_sum", "_count")
    unshown = sorted(
        f
        for f in families
        if f not in NOT_ON_DASHBOARD and not any(f + s in used for s in suffixes)
    )
    assert not unshown, f"exported but on no dashboard panel: {unshown}"
