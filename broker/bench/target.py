"""The server under test: where it listens, how it is started and stopped, what /proc says.

Invariants: traffic only ever goes to 127.0.0.0/8 (`loopback_target` refuses anything else);
a server the bench starts is stopped by its own PID (SIGTERM, then SIGKILL after a deadline),
never by name. RSS is VmRSS from /proc/PID/status and CPU is utime+stime from /proc/PID/stat,
summed over the PID and its descendants, as the peers harness measures them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
# the CPUs we may use, read before the coordinator pins itself to the load CPU
ALLOWED_CPUS = frozenset(os.sched_getaffinity(0))


class BenchError(Exception):
    """A run that cannot go on (bad target, server gone, nothing connected); exit status 2."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    path: str
    tls: bool = False

    @property
    def url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://{self.host}:{self.port}{self.path}"

    @property
    def http(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"


def loopback_target(url: str) -> Endpoint:
    """Parse a ws:// or wss:// URL; refuse a host outside 127.0.0.0/8 (this is a load generator)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise BenchError(f"only ws:// and wss:// URLs are supported, not {url!r}")
    host = parts.hostname or ""
    if host == "localhost":
        host = "127.0.0.1"
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise BenchError(f"target host must be a literal 127.x.y.z address, not {host!r}") from None
    if not (addr.version == 4 and addr in ipaddress.ip_network("127.0.0.0/8")):
        raise BenchError(f"refusing non-loopback target {host}: only 127.0.0.0/8 is allowed")
    # The query is kept: `/ws?token=...` loads a broker with authentication on (docs/security.md).
    path = (parts.path or "/ws") + (f"?{parts.query}" if parts.query else "")
    return Endpoint(str(addr), parts.port or 8765, path, parts.scheme == "wss")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def can_pin() -> bool:
    """Pin broker and load apart only when there are at least two CPUs to pin to."""
    return len(ALLOWED_CPUS) >= 2


# ---------------------------------------------------------------- /proc


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name may hold spaces and parentheses: fields start after the last ')'
    return raw[raw.rfind(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (a broker may fork workers one day)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                parent[int(entry)] = int(fields[1])
    found = [pid]
    for _ in range(4):
        more = [p for p, pp in parent.items() if pp in found and p not in found]
        if not more:
            break
        found.extend(more)
    return found


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime (fields 14 and 15 of /proc/PID/stat), summed."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
    return total


def alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def tcp_ext(names: tuple[str, ...]) -> dict[str, int]:
    """TcpExt counters from /proc/net/netstat (ListenOverflows, TCPSynRetrans, ...)."""
    out = dict.fromkeys(names, 0)
    with contextlib.suppress(OSError):
        lines = Path("/proc/net/netstat").read_text().splitlines()
        for head, values in zip(lines[::2], lines[1::2], strict=False):
            if head.startswith("TcpExt:"):
                table = dict(zip(head.split()[1:], values.split()[1:], strict=False))
                for name in names:
                    out[name] = int(table.get(name, 0))
    return out


def _proc_ticks() -> dict[tuple[int, str], tuple[int, int]]:
    """(pid, start time) -> (ppid, utime+stime ticks) for every process."""
    out: dict[tuple[int, str], tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            f = _stat_fields(int(entry))
            if f is not None and len(f) > 19:
                out[(int(entry), f[19])] = (int(f[1]), int(f[11]) + int(f[12]))
    return out


class OtherCpu:
    """CPU used by processes other than ours (server tree, load, this one) over an interval.

    The machine is shared: a test suite running beside a benchmark takes CPU from the broker
    or the load, so every report carries this figure (in CPUs, like wsload's `other_cpu`).
    Kernel threads (children of kthreadd, PID 2) are left out.
    """

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.before = _proc_ticks()

    def cpus(self, exclude: list[int]) -> float:
        after = _proc_ticks()
        wall = max(1e-9, time.monotonic() - self.t0)
        skip = set(exclude) | {os.getpid(), 2}
        ticks = 0
        for key, (ppid, t) in after.items():
            if key[0] in skip or ppid in skip:
                continue
            ticks += t - self.before.get(key, (0, 0))[1]
        return round(ticks / CLK_TCK / wall, 3)


def busy_cpus(interval: float = 1.0) -> float:
    """How many CPUs the whole machine kept busy over `interval` (from /proc/stat)."""

    def sample() -> tuple[int, int]:
        vals = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals[:8]), idle

    t0, i0 = sample()
    time.sleep(interval)
    t1, i1 = sample()
    ncpu = os.cpu_count() or 1
    return ncpu * (1.0 - (i1 - i0) / max(1, t1 - t0))


def wait_quiet(max_wait: float, threshold: float = 0.1) -> float:
    """Wait (bounded) until the machine uses under `threshold` CPUs; returns the last reading."""
    deadline = time.monotonic() + max_wait
    busy = busy_cpus()
    while busy >= threshold and time.monotonic() < deadline:
        busy = busy_cpus()
    return busy


# ---------------------------------------------------------------- servers we start


class Server:
    """A server process the bench started itself, pinned to one CPU, stopped by PID."""

    def __init__(self, name: str, cmd: list[str], port: int, cpu: int | None) -> None:
        self.name = name
        self.port = port
        self.log_path = Path(tempfile.gettempdir()) / f"broker-bench-{name}-{port}.log"
        if cpu is not None and shutil.which("taskset"):
            # taskset execs the command, so the PID we hold is the server's own
            cmd = ["taskset", "-c", str(cpu), *cmd]
        env = {**os.environ, "BROKER_LOG_LEVEL": os.environ.get("BROKER_LOG_LEVEL", "warning")}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
        if cpu is not None and not shutil.which("taskset"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(self.proc.pid, {cpu})
        self.pid = self.proc.pid

    def wait_listening(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with {self.proc.returncode}: {self.log_tail()}"
                )
            with socket.socket() as s:
                s.settimeout(0.5)
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        self.stop()
        raise BenchError(f"{self.name} did not listen on {self.port}: {self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def spawn_broker(port: int, cpu: int | None, extra: list[str]) -> Server:
    cmd = [sys.executable, "-m", "broker", "--host", "127.0.0.1", "--port", str(port), *extra]
    server = Server("broker", cmd, port, cpu)
    server.wait_listening()
    return server


def spawn_trivial(port: int, cpu: int | None) -> Server:
    cmd = [sys.executable, "-m", "broker.bench.trivial", "--port", str(port)]
    server = Server("trivial", cmd, port, cpu)
    server.wait_listening()
    return server
