"""Static checks of grafana/dashboards/broker.json: what Grafana needs to show it with no clicks.

Grafana accepts a lot of broken JSON silently (a duplicate panel id hides a panel, a panel without
a datasource falls back to whatever is the default, a query without the template variable shows
every broker whatever is selected), so these are checked here rather than by eye.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import yaml

from . import dashboard as dash

REQUIRED_ROWS = (
    "Traffic",
    "Connections",
    "Event loop",
    "Backpressure",
    "Subscriptions and topics",
    "Process",
)
TEMPLATE_MATCHERS = ('job=~"$job"', 'instance=~"$instance"')
# The metric names the broker exports by contract (exposition names); each has a panel.
CONTRACT_METRICS = (
    "broker_epoll_wait_total",
    "broker_epoll_events_total",
    "broker_epoll_events_per_wait_bucket",
    "broker_loop_iteration_seconds_bucket",
    "broker_connections",
    "broker_connections_accepted_total",
    "broker_connections_closed_total",
    "broker_subscriptions",
    "broker_topics",
    "broker_messages_published_total",
    "broker_messages_delivered_total",
    "broker_messages_dropped_total",
    "broker_bytes_received_total",
    "broker_bytes_sent_total",
    "broker_outbound_queued_bytes",
    "broker_backpressure_total",
    "broker_slow_consumers_total",
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
    "process_open_fds",
)


@pytest.fixture(scope="module")
def board() -> dict[str, Any]:
    return dash.load()


@pytest.fixture(scope="module")
def datasource_uid() -> str:
    """The uid the provisioned Prometheus datasource gets; every panel must name it."""
    config = yaml.safe_load(dash.DATASOURCES.read_text())
    (source,) = config["datasources"]
    assert source["type"] == "prometheus"
    return str(source["uid"])


def test_dashboard_identity(board: dict[str, Any]) -> None:
    assert board["uid"] and board["title"]
    assert isinstance(board["schemaVersion"], int)
    assert board.get("id") is None, "a provisioned dashboard must not carry a database id"


def test_panel_ids_are_unique_integers(board: dict[str, Any]) -> None:
    ids = [p.get("id") for p in dash.panels(board)]
    assert all(isinstance(i, int) for i in ids), ids
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    assert not duplicates, f"duplicate panel ids: {duplicates}"


def test_every_panel_and_target_names_the_provisioned_datasource(
    board: dict[str, Any], datasource_uid: str
) -> None:
    wanted = {"type": "prometheus", "uid": datasource_uid}
    wrong = [p["title"] for p in dash.panels(board) if p.get("datasource") != wanted]
    assert not wrong, f"panels without datasource {wanted}: {wrong}"
    wrong = [
        f"{p['title']}/{t.get('refId')}"
        for p, t in dash.targets(board)
        if t.get("datasource") != wanted
    ]
    assert not wrong, f"targets without datasource {wanted}: {wrong}"
    for variable in dash.variables(board).values():
        assert variable.get("datasource") == wanted, variable["name"]


def test_rows_cover_the_operator_views(board: dict[str, Any]) -> None:
    rows = [p["title"] for p in dash.panels(board) if p["type"] == "row"]
    missing = [r for r in REQUIRED_ROWS if r not in rows]
    assert not missing, f"rows missing: {missing} (have {rows})"


def test_panels_have_titles_descriptions_units_and_queries(board: dict[str, Any]) -> None:
    problems = []
    titles = [p.get("title", "") for p in dash.panels(board) if p["type"] != "row"]
    problems += [f"duplicate title {t!r}" for t in sorted(set(titles)) if titles.count(t) > 1]
    for panel in dash.panels(board):
        title = panel.get("title", "")
        if not title:
            problems.append(f"panel {panel.get('id')} has no title")
        if panel["type"] == "row":
            assert not panel.get("targets"), title
            continue
        if not panel.get("description"):
            problems.append(f"{title}: no description")
        if panel["type"] == "heatmap":
            unit = panel.get("options", {}).get("yAxis", {}).get("unit")
        else:
            unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        if not unit:
            problems.append(f"{title}: no unit")
        refs = [t.get("refId") for t in panel.get("targets", [])]
        if not refs:
            problems.append(f"{title}: no query")
        if len(set(refs)) != len(refs) or not all(refs):
            problems.append(f"{title}: refIds {refs} not unique")
        for target in panel.get("targets", []):
            if not target.get("expr", "").strip():
                problems.append(f"{title}/{target.get('refId')}: empty expr")
    assert not problems, "\n".join(problems)


def test_every_selector_uses_the_template_variables(board: dict[str, Any]) -> None:
    problems = []
    for panel, target in dash.targets(board):
        where = f"{panel['title']}/{target['refId']}"
        found = dash.selectors(target["expr"])
        if not found:
            problems.append(f"{where}: no metric selector found in {target['expr']!r}")
        for name, matchers in found:
            missing = [m for m in TEMPLATE_MATCHERS if m not in matchers]
            if missing:
                problems.append(f"{where}: {name}{{{matchers}}} lacks {missing}")
    assert not problems, "\n".join(problems)


def test_template_variables(board: dict[str, Any]) -> None:
    variables = dash.variables(board)
    assert set(variables) >= {"job", "instance"}, sorted(variables)
    for name in ("job", "instance"):
        variable = variables[name]
        assert variable["type"] == "query"
        assert dash.variable_query(variable).startswith("label_values(")
        assert variable.get("refresh") in (1, 2), "values must load without a click"
        editor = variable["query"]
        if isinstance(editor, dict):  # the editor's fields must say what the query string says
            assert editor["query"].endswith(f",{editor['label']})"), editor
            assert editor["query"].startswith(f"label_values({editor['metric']}"), editor
    # Instances follow the chosen job, so picking a job narrows the instance list.
    assert "$job" in dash.variable_query(variables["instance"])
    # Every variable the queries use is defined (Grafana's own $__ variables aside).
    used = set()
    for _, target in dash.targets(board):
        used |= {m[0] or m[1] for m in dash._VARIABLE.findall(target["expr"])}
    undefined = {v for v in used if not v.startswith("__")} - set(variables)
    assert not undefined, undefined


def test_contract_metrics_each_have_a_panel(board: dict[str, Any]) -> None:
    used = set()
    for _, target in dash.targets(board):
        used |= dash.metric_names(target["expr"])
    missing = [m for m in CONTRACT_METRICS if m not in used]
    assert not missing, f"no panel shows {missing}"


def test_loop_iteration_percentiles(board: dict[str, Any]) -> None:
    exprs = [t["expr"] for _, t in dash.targets(board)]
    for q in ("0.5", "0.99"):
        assert any(
            f"histogram_quantile({q}," in e and "broker_loop_iteration_seconds_bucket" in e
            for e in exprs
        ), f"no p{q} of broker_loop_iteration_seconds"


def test_grid_layout_has_no_overlaps(board: dict[str, Any]) -> None:
    boxes = []
    for panel in board["panels"]:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, panel["title"]
        assert g["y"] >= 0 and g["h"] > 0, panel["title"]
        boxes.append((panel["title"], g))
    for (ta, a), (tb, b) in itertools.combinations(boxes, 2):
        overlap = (
            a["x"] < b["x"] + b["w"]
            and b["x"] < a["x"] + a["w"]
            and a["y"] < b["y"] + b["h"]
            and b["y"] < a["y"] + a["h"]
        )
        assert not overlap, f"{ta!r} overlaps {tb!r}"


def test_metric_scan_finds_names_and_selectors() -> None:
    """The lexical PromQL scan the checks above rely on."""
    expr = (
        'histogram_quantile(0.99, sum by (instance, le) (rate(a_bucket{job=~"$job", x="}"}[5m])))'
        " / on (instance) group_left b_total + 1e-9 * time() - c offset 5m"
    )
    assert dash.metric_names(expr) == {"a_bucket", "b_total", "c"}
    assert dash.selectors('sum(rate(a{job="j"}[1m])) / b') == [("a", 'job="j"'), ("b", "")]
    assert (
        dash.substitute(
            'x{i=~"$instance"}[${__rate_interval}]',
            {
                "instance": "h:1",
                "__rate_interval": "5s",
            },
        )
        == 'x{i=~"h:1"}[5s]'
    )
    with pytest.raises(KeyError):
        dash.substitute("$nope", {})
