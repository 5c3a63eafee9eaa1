"""A real Prometheus server (Debian's /usr/bin/prometheus) for one test, and its HTTP API.

It listens on a free loopback port with its own temporary config and TSDB directory, is started
with Popen and stopped by PID. Before anything is asked of it, `/api/v1/status/flags` must show our
listen address and data directory, so a Prometheus started by the distribution (the Debian package
ships a systemd unit on :9090) can never be the one answering.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from .load import HTTP

SCRAPE_INTERVAL_S = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrometheusError(RuntimeError):
    """The API answered with an error (bad query, or not ready)."""


class PrometheusServer:
    def __init__(self, workdir: Path, job: str, target: str, log_path: Path) -> None:
        self.workdir = workdir
        self.job = job
        self.target = target
        self.log_path = log_path
        self.port = free_port()
        self.config = workdir / "prometheus.yml"
        self.data = workdir / "tsdb"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> PrometheusServer:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus not found: scripts/test.sh installs the Debian package")
        self.config.write_text(
            json.dumps(  # JSON is YAML: no templating of YAML by hand
                {
                    "global": {
                        "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
                        "scrape_timeout": f"{SCRAPE_INTERVAL_S}s",
                    },
                    "scrape_configs": [
                        {
                            "job_name": self.job,
                            "metrics_path": "/metrics",
                            "static_configs": [{"targets": [self.target]}],
                        }
                    ],
                }
            )
        )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={self.data}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                ],
                stdout=log,
                stderr=log,
                cwd=self.workdir,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}: {self.log()}")
            with (
                contextlib.suppress(OSError),
                HTTP.open(self.base + "/-/ready", timeout=1) as response,
            ):
                if response.status == 200:
                    self._check_identity()
                    return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"prometheus did not become ready: {self.log()}")

    def _check_identity(self) -> None:
        flags = self.api("/api/v1/status/flags")
        assert flags["storage.tsdb.path"] == str(self.data), flags
        assert flags["web.listen-address"] == f"127.0.0.1:{self.port}", flags
        assert flags["config.file"] == str(self.config), flags

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    # -- HTTP API ------------------------------------------------------------------------------

    def api(self, path: str, **params: str | list[str]) -> Any:
        url = self.base + path
        if params:
            url += "?" + urllib.parse.urlencode(params, doseq=True)
        try:
            with HTTP.open(url, timeout=10) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query at now; the samples of a vector (a scalar becomes one sample)."""
        data = self.api("/api/v1/query", query=expr)
        if data["resultType"] == "vector":
            result: list[dict[str, Any]] = data["result"]
            return result
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        raise PrometheusError(f"unexpected result type {data['resultType']} for {expr}")

    def metric_names(self) -> set[str]:
        return set(
            self.api("/api/v1/label/__name__/values", **{"match[]": f'{{job="{self.job}"}}'})
        )

    def label_values(self, label: str, match: str) -> list[str]:
        values: list[str] = self.api(f"/api/v1/label/{label}/values", **{"match[]": match})
        return values

    def scrapes(self, window: str = "2m") -> int:
        """How many scrapes of our broker Prometheus has stored in the window."""
        result = self.query(f'count_over_time(up{{job="{self.job}"}}[{window}])')
        return int(float(result[0]["value"][1])) if result else 0

    def target_health(self) -> str:
        active = self.api("/api/v1/targets")["activeTargets"]
        ours = [t for t in active if t["labels"].get("job") == self.job]
        return str(ours[0]["health"]) if ours else "absent"


def sample_value(sample: dict[str, Any]) -> float:
    return float(sample["value"][1])


def finite(sample: dict[str, Any]) -> bool:
    return math.isfinite(sample_value(sample))
