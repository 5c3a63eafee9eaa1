"""Reading grafana/dashboards/broker.json the way Grafana does, for the tests.

Owns the small amount of Grafana and PromQL knowledge the tests need: walking panels (rows may
nest theirs), substituting template variables, and finding the metric names and selectors in a
PromQL expression. The PromQL scan is lexical, not a parser: strings, label matchers, range
brackets and grouping-label lists are blanked out first, then every identifier that is not a
function call or keyword is a metric name. That is exact for the expressions a dashboard holds
(and the tests assert the scan finds at least one metric in every target).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "broker.json"
PROMETHEUS_CONFIG = GRAFANA / "prometheus.yml"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "broker.yml"

Panel = dict[str, Any]
Target = dict[str, Any]

# Words of PromQL that are not metric names when they stand alone (not followed by "(").
_KEYWORDS = frozenset(
    (
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "inf",
        "nan",
    )
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
# An identifier not glued to a preceding word character, digit or dot (so 1e-9 and 0.5 are not
# names); `$var` is a Grafana variable, not a name.
_IDENT = re.compile(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*")
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
_LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def load(path: Path = DASHBOARD) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def panels(dashboard: Mapping[str, Any]) -> Iterator[Panel]:
    """Every panel, rows included, and the panels a collapsed row holds."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def targets(dashboard: Mapping[str, Any]) -> Iterator[tuple[Panel, Target]]:
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield panel, target


def variables(dashboard: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}


def variable_query(variable: Mapping[str, Any]) -> str:
    query = variable.get("query")
    if isinstance(query, Mapping):
        return str(query.get("query", ""))
    return str(query or variable.get("definition", ""))


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """Replace `$name` and `${name}` (and `${name:format}`); an unknown variable is an error."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"no value for template variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(replace, expr)


def _blank(expr: str) -> str:
    expr = _STRING.sub('""', expr)
    expr = _MATCHERS.sub(" ", expr)
    expr = _RANGE.sub(" ", expr)
    return _GROUPING.sub(" ", expr)


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects."""
    blanked = _blank(expr)
    names = set()
    for match in _IDENT.finditer(blanked):
        word = match.group()
        if word in _KEYWORDS or blanked[match.end() :].lstrip().startswith("("):
            continue
        names.add(word)
    return names


def selectors(expr: str) -> list[tuple[str, str]]:
    """(metric name, label matcher text or "") for every selector in the expression."""
    names = metric_names(expr)
    found = []
    masked = _STRING.sub(lambda m: " " * len(m.group()), expr)  # keep offsets, hide strings
    for match in _IDENT.finditer(masked):
        if match.group() not in names:
            continue
        # Skip identifiers inside a matcher or range: those are label names, not metrics.
        before = masked[: match.start()]
        if before.count("{") > before.count("}") or before.count("[") > before.count("]"):
            continue
        rest = masked[match.end() :]
        start = match.end() + len(rest) - len(rest.lstrip())
        if masked.startswith("{", start):
            found.append((match.group(), expr[start + 1 : masked.index("}", start)]))
        else:
            found.append((match.group(), ""))
    return found


def legend_labels(target: Mapping[str, Any]) -> set[str]:
    return set(_LEGEND_LABEL.findall(str(target.get("legendFormat", ""))))
