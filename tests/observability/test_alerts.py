"""The alerting rules of grafana/alerts.yml: valid, unit-tested, loaded by the compose stack, and
written against metrics the broker really exports.

`promtool` (Debian's prometheus package, installed by scripts/test.sh) checks the rules and runs
their unit tests (grafana/alerts.test.yml); each alert must have a test in which it fires. The
stack's Prometheus must load the file through the mount docker-compose.yml gives it.
"""

from __future__ import annotations

import subprocess
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from . import dashboard as dash
from .load import http_get
from .test_stack_config import compose, resolve_in_container, tool  # noqa: F401

ALERTS = dash.GRAFANA / "alerts.yml"
ALERT_TESTS = dash.GRAFANA / "alerts.test.yml"
# Exported only by a broker with a backplane (--workers, --redis), not by the one started here.
ONLY_WITH_BACKPLANE = {"broker_backplane_up"}


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run(
        [tool("promtool"), "check", "rules", str(ALERTS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_every_rule_pass() -> None:
    result = subprocess.run(
        [tool("promtool"), "test", "rules", ALERT_TESTS.name],
        cwd=ALERT_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_every_alert_has_a_test_where_it_fires_and_one_where_it_does_not() -> None:
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    assert [str(ALERTS.name)] == tests["rule_files"]
    fires: set[str] = set()
    for case in tests["tests"]:
        for check in case["alert_rule_test"]:
            for expected in check["exp_alerts"]:
                fires.add(check["alertname"])
                # Each test holds a broker that must not alert (instance ok:...).
                assert expected["exp_labels"]["instance"].startswith("bad:"), expected
        assert any("ok:" in s["series"] for s in case["input_series"]), case["name"]
    names = [rule["alert"] for rule in rules()]
    assert len(names) == len(set(names)), names
    assert sorted(set(names) - fires) == [], "alerts without a test in which they fire"
    for rule in rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        for label in ("job", "instance"):
            assert label in rule["expr"], f"{rule['alert']}: keep {label} in the expression"


def test_the_stack_prometheus_loads_the_rules(compose: dict[str, Any]) -> None:  # noqa: F811
    prometheus = compose["services"]["prometheus"]
    config_flag = next(
        a for a in prometheus["command"] if str(a).startswith("--config.file=")
    ).split("=", 1)[1]
    config = yaml.safe_load(resolve_in_container(prometheus, config_flag).read_text())
    config_dir = config_flag.rsplit("/", 1)[0]
    loaded = [
        resolve_in_container(prometheus, f"{config_dir}/{name}").resolve()
        for name in config["rule_files"]
    ]
    assert loaded == [ALERTS.resolve()]


def test_rules_name_only_metrics_the_broker_exports(broker: Any) -> None:
    text = http_get(broker.http + "/metrics").decode()
    exported: set[str] = set()
    for family in text_string_to_metric_families(text):
        exported |= {sample.name for sample in family.samples}
    for rule in rules():
        unknown = dash.metric_names(rule["expr"]) - exported - ONLY_WITH_BACKPLANE
        assert not unknown, f"{rule['alert']}: the broker does not export {sorted(unknown)}"
