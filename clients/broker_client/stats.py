"""Read the broker's Prometheus `/metrics` and summarise its key figures (`broker-cli stats`).

The metric names are the broker's contract (docs/protocol.md, CONTRACT.md); a metric the broker does
not export shows as "-" rather than failing, so the table still works against an older or newer
broker. Parsing uses prometheus-client's own text parser, the reference for the exposition format.
"""

from __future__ import annotations

import math
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from .errors import ConnectError

__all__ = ["Metrics", "fetch_metrics", "http_base", "parse_metrics", "render_table", "summary"]


def http_base(ws_url: str) -> str:
    """The broker's HTTP root for its WebSocket URL: ws://h:p/ws -> http://h:p, wss -> https."""
    parts = urllib.parse.urlsplit(ws_url)
    scheme = {"ws": "http", "wss": "https", "http": "http", "https": "https"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"not a ws:// or wss:// URL: {ws_url!r}")
    path = parts.path.rstrip("/")
    if path.endswith("/ws"):
        path = path[: -len("/ws")]
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, "", ""))


@dataclass
class Metrics:
    """Samples by metric name: {name: {labels as a sorted tuple of pairs: value}}."""

    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = field(default_factory=dict)

    def value(self, name: str, **labels: str) -> float | None:
        by_labels = self.samples.get(name)
        if not by_labels:
            return None
        if labels:
            return by_labels.get(tuple(sorted(labels.items())))
        if () in by_labels:
            return by_labels[()]
        return None

    def total(self, name: str) -> float | None:
        """The sum over all label values (e.g. closed connections over every reason)."""
        by_labels = self.samples.get(name)
        return sum(by_labels.values()) if by_labels else None

    def by_label(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for labels, value in self.samples.get(name, {}).items():
            for key, val in labels:
                if key == label:
                    out[val] = value
        return out

    def quantile(self, name: str, q: float) -> float | None:
        """The upper bound of the histogram bucket holding quantile q (what the buckets can
        tell).
        """
        buckets = sorted(
            (float(le), count) for le, count in self.by_label(name + "_bucket", "le").items()
        )
        total = self.value(name + "_count")
        if not buckets or not total:
            return None
        for le, count in buckets:
            if count >= q * total:
                return le
        return math.inf


def parse_metrics(text: str) -> Metrics:
    metrics = Metrics()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            metrics.samples.setdefault(sample.name, {})[labels] = float(sample.value)
    return metrics


def fetch_metrics(
    base: str,
    timeout: float = 5.0,
    context: ssl.SSLContext | None = None,
    token: str | None = None,
) -> Metrics:
    """GET {base}/metrics (with `Authorization: Bearer token` for a broker started with
    --metrics-token); `ConnectError` with a readable reason when that fails."""
    url = base + "/metrics"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        request = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            text = response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        raise ConnectError(f"{url} answered HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ConnectionRefusedError):
            detail = "connection refused (is the broker running?)"
        else:
            detail = str(reason)
        raise ConnectError(f"cannot reach {url}: {detail}") from exc
    except (TimeoutError, OSError) as exc:
        raise ConnectError(f"cannot reach {url}: {exc or type(exc).__name__}") from exc
    try:
        return parse_metrics(text)
    except ValueError as exc:
        raise ConnectError(f"{url} did not return Prometheus text: {exc}") from exc


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "> largest bucket"
    if value < 1e-3:
        return f"{value * 1e6:,.0f} µs"
    if value < 1:
        return f"{value * 1e3:,.1f} ms"
    return f"{value:,.2f} s"


def _duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m {secs}s"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


def _nonzero(values: dict[str, float]) -> str:
    parts = [f"{k} {v:,.0f}" for k, v in sorted(values.items(), key=lambda kv: -kv[1]) if v]
    return ", ".join(parts)


Row = tuple[str, str, str]  # label, value, note


def summary(metrics: Metrics, now: float | None = None) -> list[tuple[str, list[Row]]]:
    """The key figures in sections of (label, value, note) rows."""
    m = metrics
    start = m.value("process_start_time_seconds")
    uptime = (now if now is not None else time.time()) - start if start is not None else None
    waits = m.value("broker_epoll_wait_total")
    ev_sum = m.value("broker_epoll_events_per_wait_sum")
    ev_count = m.value("broker_epoll_events_per_wait_count")
    per_wait = f"{ev_sum / ev_count:.2f}" if ev_sum is not None and ev_count else "-"
    loop_p50 = m.quantile("broker_loop_iteration_seconds", 0.5)
    loop_p99 = m.quantile("broker_loop_iteration_seconds", 0.99)
    max_fds = m.value("process_max_fds")
    return [
        (
            "connections",
            [
                ("open", _count(m.value("broker_connections")), ""),
                ("accepted", _count(m.value("broker_connections_accepted_total")), ""),
                (
                    "closed",
                    _count(m.total("broker_connections_closed_total")),
                    _nonzero(m.by_label("broker_connections_closed_total", "reason")),
                ),
            ],
        ),
        (
            "pub/sub",
            [
                ("subscriptions", _count(m.value("broker_subscriptions")), ""),
                ("topics", _count(m.value("broker_topics")), ""),
                ("messages published", _count(m.value("broker_messages_published_total")), ""),
                ("messages delivered", _count(m.value("broker_messages_delivered_total")), ""),
                (
                    "messages dropped",
                    _count(m.total("broker_messages_dropped_total")),
                    _nonzero(m.by_label("broker_messages_dropped_total", "reason")),
                ),
                ("slow consumers", _count(m.total("broker_slow_consumers_total")), ""),
            ],
        ),
        (
            "traffic",
            [
                ("bytes received", _bytes(m.value("broker_bytes_received_total")), ""),
                ("bytes sent", _bytes(m.value("broker_bytes_sent_total")), ""),
                ("outbound queued", _bytes(m.value("broker_outbound_queued_bytes")), ""),
                (
                    "backpressure",
                    _count(m.value("broker_backpressure_total")),
                    "sends that hit EAGAIN",
                ),
            ],
        ),
        (
            "event loop",
            [
                ("epoll waits", _count(waits), ""),
                ("events per wait", per_wait, "mean"),
                ("busy per iteration", _seconds(loop_p50), f"p50; p99 {_seconds(loop_p99)}"),
            ],
        ),
        (
            "process",
            [
                ("uptime", _duration(uptime), ""),
                ("resident memory", _bytes(m.value("process_resident_memory_bytes")), ""),
                ("cpu time", _seconds(m.value("process_cpu_seconds_total")), ""),
                (
                    "open files",
                    _count(m.value("process_open_fds")),
                    f"of {max_fds:,.0f}" if max_fds is not None else "",
                ),
            ],
        ),
    ]


def render_table(title: str, sections: Iterable[tuple[str, list[Row]]]) -> str:
    sections = list(sections)
    label_w = max(len(label) for _, rows in sections for label, _, _ in rows)
    value_w = max(len(value) for _, rows in sections for _, value, _ in rows)
    lines = [title]
    for name, rows in sections:
        lines.append("")
        lines.append(name)
        for label, value, note in rows:
            line = f"  {label:<{label_w}}  {value:>{value_w}}"
            lines.append(f"{line}   {note}" if note else line)
    return "\n".join(lines)
