"""`broker-bench pollers`: the seed's thesis measured on the broker itself (docs/benchmarks.md).

The claim: `select` and `poll` cost O(watched fds) per call (select: O(highest fd), and no fd
at or above FD_SETSIZE), `epoll_wait` costs O(ready). So a fixed small active set beside a
growing crowd of idle connections should cost epoll the same per wake-up whatever the crowd,
and cost poll and select more with every idle connection.

Method, per poller (a broker spawned with `--poller P`, pinned like every scenario):
  * the active set: `active` subscribers on one topic (one worker process) and one publisher
    at a fixed `rate`; every publish wakes the broker, which delivers it `active` times;
  * the crowd grows step by step (new worker processes, several loopback source addresses,
    as workers.py explains; no process holds 20,000 files); at each step, after a settle:
    `rest` seconds without publishing (the broker's own once-a-second sweep, an O(n) walk
    whatever the poller), then `duration` seconds of publishing;
  * per step: broker CPU (on-CPU ns from /proc/PID/schedstat; its kernel part from stime) per
    delivered message and per wake-up
    (wake-ups = the change of broker_epoll_wait_total, which counts poll()/select() calls
    under those pollers), and wake-up latency = publish stamp -> subscriber's recv, p50/p99;
  * select stops below its limit (its last step leaves room under fd 1024 for the /metrics
    scrape); then `probe` more connections are attempted and those the broker closed
    (accepted on fds >= 1024) are reported.
Spawned brokers get `--ping-interval 3600` so keepalive pings never wake the crowd mid-run.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from broker.bench import scenarios as sc
from broker.bench import target as tg
from broker.bench.publisher import Publisher

POLLERS = ("epoll", "poll", "select")
CROWD = (0, 1000, 2500, 5000, 10000, 19000)
SELECT_CROWD = (0, 250, 500, 750, 880)  # + 101 active + ~10 of the broker's own < 1024
TOPIC = "bench.pollers"


@dataclasses.dataclass(frozen=True)
class Plan:
    pollers: Sequence[str] = POLLERS
    crowd: Sequence[int] = CROWD
    select_crowd: Sequence[int] = SELECT_CROWD
    active: int = 100
    rate: float = 200.0
    duration: float = 5.0
    rest: float = 2.0
    settle: float = 1.0
    size: int = 64
    probe: int = 200  # select: connections attempted past its last step


def cpu_total_sys(pids: list[int]) -> tuple[float, float]:
    """(CPU seconds, of which in the kernel) summed over `pids`.

    The total is the scheduler's on-CPU time in ns (/proc/PID/schedstat, field 1): a step of a
    few seconds at a light load uses tens of ms, which utime+stime in 10 ms ticks would blur.
    The kernel part (stime, field 15 of /proc/PID/stat) only comes in ticks: read it as coarse.
    """
    total_ns = system = 0
    for pid in pids:
        try:
            raw = Path(f"/proc/{pid}/stat").read_text()
            total_ns += int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        system += int(raw[raw.rfind(")") + 2 :].split()[12])
    return total_ns / 1e9, system / tg.CLK_TCK


def _wakeups(metrics: dict[str, float]) -> float | None:
    return metrics.get("broker_epoll_wait_total")


def _per(total: float, n: float | None, scale: float = 1e6) -> float | None:
    return round(total * scale / n, 2) if n else None


def _publish_at(pub: Publisher, rate: float, duration: float) -> None:
    """`rate` publishes per second for `duration` s, catching up after a late wake-up."""
    interval = 1.0 / rate
    t0 = time.monotonic()
    end = t0 + duration
    nxt = t0
    next_service = 0.0
    while (now := time.monotonic()) < end:
        if now >= next_service:
            pub.service()
            next_service = now + 0.1
        if now < nxt:
            time.sleep(min(nxt - now, end - now))
            continue
        due = min(100, int((now - nxt) / interval) + 1)
        pub.publish(due)
        nxt += due * interval


def _step(
    t: sc.Target, opts: sc.Options, plan: Plan, active: sc.Load, pub: Publisher, ready: int
) -> dict[str, sc.Number]:
    """One measurement: `rest` s quiet, then `duration` s at `rate` (the crowd is in place)."""
    pids = tg.descendants(t.pid) if t.pid else []
    time.sleep(plan.settle)
    if opts.quiet_wait > 0:
        tg.wait_quiet(opts.quiet_wait)
    r0 = cpu_total_sys(pids)[0]
    w0 = time.monotonic()
    time.sleep(plan.rest)
    rest_cpu = cpu_total_sys(pids)[0] - r0
    rest_wall = time.monotonic() - w0
    active.start(True, 0.0, plan.size)
    m0 = sc.broker_metrics(t.endpoint)
    noise = tg.OtherCpu()
    c0, s0 = cpu_total_sys(pids)
    w0 = time.monotonic()
    seq0 = pub.seq
    _publish_at(pub, plan.rate, plan.duration)
    published = pub.seq - seq0
    sc._drain(active, published * ready, idle_s=2.0, max_s=30.0)
    wall = time.monotonic() - w0
    c1, s1 = cpu_total_sys(pids)
    other = noise.cpus(tg.descendants(t.pid) if t.pid else [])
    stats = active.stop()
    m1 = sc.broker_metrics(t.endpoint)
    before, after = _wakeups(m0), _wakeups(m1)
    wakeups = after - before if before is not None and after is not None else None
    cpu, system = c1 - c0, s1 - s0
    delivered = stats.delivered
    return {
        "published": published,
        "delivered": delivered,
        "lost": published * ready - delivered,
        "wakeups": int(wakeups) if wakeups is not None else None,
        "cpu_us_per_wakeup": _per(cpu, wakeups),
        "sys_us_per_wakeup": _per(system, wakeups),
        "cpu_us_per_delivery": _per(cpu, delivered),
        "p50_ms": sc.ms(sc.percentile_us(stats.hist, 0.50)),
        "p99_ms": sc.ms(sc.percentile_us(stats.hist, 0.99)),
        "broker_cpu_pct": round(100.0 * cpu / wall, 2) if wall > 0 else None,
        "rest_cpu_pct": round(100.0 * rest_cpu / rest_wall, 2) if rest_wall > 0 else None,
        "other_cpu": other,
    }


def one_poller(opts: sc.Options, plan: Plan, poller: str) -> sc.Report:
    spawn = dataclasses.replace(
        opts, broker_args=[*opts.broker_args, "--poller", poller, "--ping-interval", "3600"]
    )
    steps: list[dict[str, sc.Number]] = []
    notes: list[str] = []
    results: dict[str, sc.Number] = {}
    crowd = plan.select_crowd if poller == "select" else plan.crowd
    loads: list[sc.Load] = []
    with sc.open_target(spawn) as t:
        if t.server == "external":
            raise tg.BenchError("pollers spawns its own brokers (one per poller): drop --url")
        try:
            one_proc = dataclasses.replace(opts, procs=1)
            active, conn = sc.connect_load(t, plan.active, TOPIC, one_proc)
            loads.append(active)
            ready = conn["ready"]
            pub = Publisher(t.endpoint, TOPIC, plan.size)
            try:
                idle = 0
                for k, want in enumerate(crowd):
                    if want > idle:
                        load, c = sc.connect_load(t, want - idle, f"bench.idle.{k}.{{i}}", opts)
                        loads.append(load)
                        idle += c["ready"]
                        if c["failed"]:
                            notes.append(f"step {k}: {c['failed']} idle connections failed")
                    figures = _step(t, opts, plan, active, pub, ready)
                    steps.append({"idle": idle, "active": ready, **figures})
                if poller == "select" and plan.probe > 0:
                    results.update(_probe(t, opts, plan.probe, loads))
            finally:
                pub.close()
        finally:
            for load in loads:
                load.close()
    results["active_ready"] = ready
    results["idle_max"] = steps[-1]["idle"] if steps else 0
    params = sc._params(
        t,
        opts,
        poller=poller,
        active=plan.active,
        rate=plan.rate,
        duration_s=plan.duration,
        rest_s=plan.rest,
        payload_bytes=plan.size,
        crowd=",".join(str(n) for n in crowd),
    )
    return sc.Report("pollers", params, results, steps=steps, notes=notes)


def _probe(t: sc.Target, opts: sc.Options, n: int, loads: list[sc.Load]) -> dict[str, sc.Number]:
    """select only: `n` more connections, past what it can watch; how many the broker closed."""
    load = sc.Load(t.endpoint, n, "bench.probe.{i}", dataclasses.replace(opts, procs=1))
    loads.append(load)
    conn = load.connect()
    return {"probe_attempted": n, "probe_ready": conn["ready"], "probe_refused": conn["failed"]}


def run(opts: sc.Options, plan: Plan) -> list[sc.Report]:
    for p in plan.pollers:
        if p not in POLLERS:
            raise tg.BenchError(f"unknown poller {p!r}: choose from {', '.join(POLLERS)}")
    if opts.url:
        raise tg.BenchError("pollers spawns its own brokers (one per poller): drop --url")
    return [one_poller(opts, plan, p) for p in plan.pollers]


# ---------------------------------------------------------------- the plot


def commit() -> str:
    """The checkout's short commit (with '+' if it has local changes), or 'unknown'."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("+" if dirty else "")


def check_plotting() -> None:
    """Fail before a long run, not after it, when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise tg.BenchError(
            "the plot needs matplotlib: pip install -e '.[bench]' (or pass --no-plot)"
        ) from None


COLORS = {"epoll": "#1b7837", "poll": "#d95f02", "select": "#7570b3"}


def plot(reports: list[dict[str, Any]], path: Path, caption: str) -> None:
    """Three panels against the idle crowd: CPU per wake-up, CPU per delivery, latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), constrained_layout=True)
    a_wake, a_del, a_lat = axes
    for rep in reports:
        if rep["scenario"] != "pollers":
            continue
        poller = rep["params"]["poller"]
        color = COLORS.get(poller, "black")
        name = poller + (" (ends below fd 1024: FD_SETSIZE)" if poller == "select" else "")
        steps = [s for s in rep["steps"] if s.get("cpu_us_per_wakeup") is not None]
        x = [s["idle"] for s in steps]
        a_wake.plot(x, [s["cpu_us_per_wakeup"] for s in steps], "o-", color=color, label=name)
        a_wake.plot(x, [s["sys_us_per_wakeup"] for s in steps], "o--", color=color, alpha=0.5, ms=3)
        a_del.plot(x, [s["cpu_us_per_delivery"] for s in steps], "o-", color=color, label=name)
        lat = [s for s in rep["steps"] if s.get("p99_ms") is not None]
        xl = [s["idle"] for s in lat]
        a_lat.plot(xl, [s["p50_ms"] for s in lat], "o-", color=color, label=f"{poller} p50")
        a_lat.plot(xl, [s["p99_ms"] for s in lat], "^:", color=color, label=f"{poller} p99")
    a_wake.set_title("broker CPU per wake-up (µs, log scale)\nsolid: all, dashed: in the kernel")
    a_del.set_title("broker CPU per delivered message (µs)")
    a_lat.set_title("wake-up latency (ms, log scale)\npublish stamp → subscriber recv")
    a_wake.set_yscale("log")  # epoll's flat line and poll's 40x climb on one readable axis
    a_lat.set_yscale("log")  # p50s of a few ms beside p99s that spike on a shared machine
    a_del.set_ylim(bottom=0)
    for ax in axes:
        ax.set_xlabel("idle connections beside the active set")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(caption, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def caption(reports: list[dict[str, Any]], when: str, rev: str) -> str:
    p: dict[str, Any] = next((r["params"] for r in reports if r["scenario"] == "pollers"), {})
    return (
        f"broker-bench pollers: {p.get('active', '?')} active subscribers + 1 publisher at "
        f"{p.get('rate', '?'):g} msg/s beside an idle crowd; {when}, commit {rev}, "
        f"{os.cpu_count()} CPUs (broker pinned to one), shared machine"
    )
