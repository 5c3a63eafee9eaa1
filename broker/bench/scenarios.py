"""The scenarios: idle, fanout, latency (with a sweep), ceiling. Each returns a Report.

Method (the same as the peers harness `wsload`, so figures line up with its RESULTS.md):
  * the server runs on CPU 0 (taskset), the load (coordinator, publisher, workers) on CPU 1;
  * RSS per connection = (VmRSS with N subscribed connections - VmRSS before any) / N;
  * fanout is closed-loop: the publisher keeps at most `window` deliveries outstanding
    (published x subscribers - delivered), otherwise it fills socket buffers and a 10 s run
    becomes minutes of draining; throughput = delivered / (last delivery - first publish);
  * after publishing, everything drains until all expected deliveries arrived or nothing
    arrived for `drain_idle` seconds; lost = published x ready subscribers - delivered;
  * latency = the subscriber's CLOCK_MONOTONIC right after `recv` minus the stamp in the
    payload, both on one machine's clock, in 1 us buckets.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from broker.bench import target as tg
from broker.bench import tls, wire
from broker.bench.publisher import Publisher
from broker.bench.workers import WorkerSpec, worker_main

Number = int | float | None


@dataclass
class Options:
    """What every scenario shares: the target and how the load is spread."""

    url: str | None = None  # None: start our own server
    sub_urls: list[str] = field(default_factory=list)  # subscribers elsewhere (cluster nodes)
    pid: int | None = None
    procs: int = 0  # 0: one worker process per 5,000 connections
    src_ips: int = 8
    conc: int = 64
    conn_timeout: float = 180.0
    broker_cpu: int | None = 0
    load_cpu: int | None = 1
    broker_args: list[str] = field(default_factory=list)
    quiet_wait: float = 0.0  # wait up to this long for a quiet machine before measuring
    tls: bool = False  # a spawned broker gets a throw-away certificate; clients use wss://


@dataclass
class Report:
    scenario: str
    params: dict[str, Any]
    results: dict[str, Number]
    steps: list[dict[str, Number]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "params": self.params,
            "results": self.results,
            "steps": self.steps,
            "notes": self.notes,
        }


@dataclass
class Target:
    endpoint: tg.Endpoint
    pid: int | None
    server: str  # "broker", "trivial" or "external"


@contextlib.contextmanager
def open_target(opts: Options, kind: str = "broker") -> Iterator[Target]:
    """The server to load: ours to start (and stop by PID) unless --url names a running one."""
    if kind == "broker" and opts.url:
        yield Target(tg.loopback_target(opts.url), opts.pid, "external")
        return
    port = tg.free_port()
    cpu = opts.broker_cpu if tg.can_pin() else None
    with tempfile.TemporaryDirectory(prefix="broker-bench-") as tmp:
        if kind == "broker":
            args = list(opts.broker_args)
            if opts.tls:
                cert, key = tls.self_signed(Path(tmp))
                args += ["--tls-cert", str(cert), "--tls-key", str(key)]
            server = tg.spawn_broker(port, cpu, args)
        else:
            if opts.tls:
                raise tg.BenchError("the trivial server speaks no TLS: run ceiling without --tls")
            server = tg.spawn_trivial(port, cpu)
        try:
            endpoint = tg.Endpoint("127.0.0.1", port, "/ws", opts.tls and kind == "broker")
            yield Target(endpoint, server.pid, kind)
        finally:
            server.stop()


# ---------------------------------------------------------------- the worker pool


@dataclass
class Stats:
    delivered: int
    closed: int
    hist: Counter[int]
    last_ns: int


class Load:
    """K subscriber processes holding `n` connections; stopped by PID whatever happens."""

    def __init__(self, ep: tg.Endpoint, n: int, topic_fmt: str, opts: Options) -> None:
        procs = opts.procs or math.ceil(n / 5000)
        procs = max(1, min(procs, n))
        ctx = mp.get_context("spawn")
        self.delivered = ctx.RawArray("q", procs)
        self.last = ctx.RawArray("q", procs)
        self.closed = ctx.RawArray("q", procs)
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        cpu = opts.load_cpu if tg.can_pin() else None
        per = math.ceil(n / procs)
        first = 0
        # --sub-url: subscribers spread over other brokers (process i on the i-th, round robin).
        eps = [tg.loopback_target(u) for u in opts.sub_urls] or [ep]
        for i in range(procs):
            count = min(per, n - first)
            sub_ep = eps[i % len(eps)]
            spec = WorkerSpec(
                index=i,
                host=sub_ep.host,
                port=sub_ep.port,
                path=sub_ep.path,
                tls=sub_ep.tls,
                first=first,
                count=count,
                topic_fmt=topic_fmt,
                src_ips=opts.src_ips,
                conc=max(1, opts.conc // procs),
                conn_timeout=opts.conn_timeout,
                cpu=cpu,
                max_seconds=opts.conn_timeout + 3600,
            )
            first += count
            mine, theirs = ctx.Pipe()
            p = ctx.Process(
                target=worker_main,
                args=(spec, theirs, [self.delivered, self.last, self.closed]),
                name=f"broker-bench-worker-{i}",
                daemon=True,
            )
            p.start()
            theirs.close()
            self.pipes.append(mine)
            self.procs.append(p)
        self.n = n
        self.conn_timeout = opts.conn_timeout

    def _gather(self, kind: str, timeout: float) -> list[tuple[Any, ...]]:
        deadline = time.monotonic() + timeout
        out = []
        for i, pipe in enumerate(self.pipes):
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise tg.BenchError(f"worker {i} did not answer {kind!r} in {timeout:.0f} s")
            msg = pipe.recv()
            if msg[0] != kind:
                raise tg.BenchError(f"worker {i}: expected {kind!r}, got {msg[0]!r}")
            out.append(msg)
        return out

    def _send(self, msg: tuple[Any, ...]) -> None:
        for pipe in self.pipes:
            pipe.send(msg)

    def connect(self) -> dict[str, Any]:
        msgs = self._gather("connected", self.conn_timeout + 60)
        errors = [e for m in msgs for e in m[5]]
        return {
            "ready": sum(m[1] for m in msgs),
            "failed": sum(m[2] for m in msgs),
            "t0_ns": min(m[3] for m in msgs),
            "t_last_ns": max(m[4] for m in msgs),
            "errors": errors[:5],
            "cpu_s": sum(m[6] for m in msgs),
        }

    def start(self, stamps: bool, tick: float, size: int = wire.MAX_PAYLOAD) -> None:
        """Reset counts; count by `#` alone when `size` keeps deliveries short (wire.scan)."""
        self._send(("start", stamps, tick, size <= wire.FAST_COUNT_MAX_PAYLOAD))
        self._gather("started", 30)

    def delivered_total(self) -> int:
        return sum(self.delivered)

    def closed_total(self) -> int:
        return sum(self.closed)

    def stop(self) -> Stats:
        self._send(("stop",))
        msgs = self._gather("stats", 60)
        hist: Counter[int] = Counter()
        for m in msgs:
            hist.update(m[3])
        return Stats(
            delivered=sum(m[1] for m in msgs),
            closed=sum(m[2] for m in msgs),
            hist=hist,
            last_ns=max(m[4] for m in msgs),
        )

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(("exit",))
        deadline = time.monotonic() + 20
        for p in self.procs:
            p.join(max(0.1, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        for pipe in self.pipes:
            pipe.close()

    def __enter__(self) -> Load:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- helpers


def percentile_us(hist: Counter[int], q: float) -> float | None:
    """Nearest-rank percentile of a histogram of 1 us buckets."""
    total = sum(hist.values())
    if not total:
        return None
    rank = max(1, math.ceil(q * total))
    acc = 0
    for us in sorted(hist):
        acc += hist[us]
        if acc >= rank:
            return float(us)
    return float(max(hist))


def ms(us: float | None) -> float | None:
    return None if us is None else round(us / 1000.0, 3)


def broker_metrics(ep: tg.Endpoint) -> dict[str, float]:
    """Every sample of the broker's /metrics ({} from a server without one, like `trivial`)."""
    try:
        context = tls.client_context() if ep.tls else None
        with urllib.request.urlopen(ep.http + "/metrics", timeout=5, context=context) as r:
            text = r.read().decode()
    except (OSError, ValueError):
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


# broker counters whose change over a run explains its throughput (names: CONTRACT/metrics)
COUNTERS = {
    "broker_loop_iterations": "broker_epoll_wait_total",
    "broker_backpressure": "broker_backpressure_total",
    "broker_slow_consumers": "broker_slow_consumers_total",
    "broker_delivered_counter": "broker_messages_delivered_total",
}


def _summed(samples: dict[str, float], name: str) -> float | None:
    """A counter's value, summed over its labels (broker_slow_consumers_total{policy=...})."""
    if name in samples:
        return samples[name]
    values = [v for k, v in samples.items() if k.startswith(name + "{")]
    return sum(values) if values else None


def counter_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, Number]:
    out: dict[str, Number] = {}
    for label, name in COUNTERS.items():
        first, last = _summed(before, name), _summed(after, name)
        if first is not None and last is not None:
            out[label] = int(last - first)
    return out


def slow_iterations(before: dict[str, float], after: dict[str, float]) -> dict[str, Number]:
    """Loop iterations whose busy time passed ~8, ~17 and ~34 ms (the broker's histogram)."""
    name = "broker_loop_iteration_seconds"
    total = f"{name}_count"
    if total not in before or total not in after:
        return {}
    count = after[total] - before[total]
    out: dict[str, Number] = {"broker_iterations": int(count)}
    for ms_label, le in (("8ms", "0.008388608"), ("17ms", "0.016777216"), ("34ms", "0.033554432")):
        key = f'{name}_bucket{{le="{le}"}}'
        if key in before and key in after:
            out[f"broker_iterations_over_{ms_label}"] = int(count - (after[key] - before[key]))
    return out


def broker_metric(ep: tg.Endpoint, name: str) -> float | None:
    return broker_metrics(ep).get(name)


def proc_cpu(pid: int | None) -> float | None:
    return None if pid is None else tg.cpu_seconds(tg.descendants(pid))


def pct(cpu0: float | None, cpu1: float | None, wall: float) -> float | None:
    if cpu0 is None or cpu1 is None or wall <= 0:
        return None
    return round(100.0 * (cpu1 - cpu0) / wall, 2)


def connect_load(t: Target, n: int, topic_fmt: str, opts: Options) -> tuple[Load, dict[str, Any]]:
    load = Load(t.endpoint, n, topic_fmt, opts)
    try:
        conn = load.connect()
    except BaseException:
        load.close()
        raise
    if conn["ready"] == 0:
        load.close()
        raise tg.BenchError(f"no connection became ready; first errors: {conn['errors']}")
    return load, conn


def _quiet(opts: Options) -> None:
    if opts.quiet_wait > 0:
        tg.wait_quiet(opts.quiet_wait)


def _ours(t: Target) -> list[int]:
    """PIDs whose CPU is ours, not noise: an external broker (our children are skipped anyway)."""
    return tg.descendants(t.pid) if t.pid else []


def _drain(load: Load, expected: int, idle_s: float, max_s: float) -> None:
    """Wait until `expected` deliveries arrived, or none for `idle_s`, or `max_s` passed."""
    deadline = time.monotonic() + max_s
    last_n, last_t = -1, time.monotonic()
    while time.monotonic() < deadline:
        n = load.delivered_total()
        if n >= expected:
            return
        if n != last_n:
            last_n, last_t = n, time.monotonic()
        elif time.monotonic() - last_t > idle_s:
            return
        time.sleep(0.01)


# ---------------------------------------------------------------- idle


def idle(opts: Options, conns: int, settle: float, rest: float) -> Report:
    with open_target(opts) as t:
        time.sleep(1.0)  # let a fresh server settle before its empty RSS is read
        pids = tg.descendants(t.pid) if t.pid else []
        rss0 = tg.rss_kb(pids) if pids else None
        net0 = tg.tcp_ext(("ListenOverflows", "TCPSynRetrans"))
        bc0 = tg.cpu_seconds(pids) if pids else None
        load, conn = connect_load(t, conns, "bench.idle.{i}", opts)
        bc1 = tg.cpu_seconds(pids) if pids else None
        with load:
            net1 = tg.tcp_ext(("ListenOverflows", "TCPSynRetrans"))
            load.start(False, 0.0)
            time.sleep(settle)
            _quiet(opts)
            pids = tg.descendants(t.pid) if t.pid else []
            rss_n = tg.rss_kb(pids) if pids else None
            gauge = broker_metric(t.endpoint, "broker_connections")
            cpu0 = tg.cpu_seconds(pids) if pids else None
            noise = tg.OtherCpu()
            w0 = time.monotonic()
            time.sleep(rest)
            cpu1 = tg.cpu_seconds(pids) if pids else None
            other = noise.cpus(_ours(t))
            wall = time.monotonic() - w0
            closed = load.closed_total()
        ready = conn["ready"]
        secs = max(1e-9, (conn["t_last_ns"] - conn["t0_ns"]) / 1e9)
        results: dict[str, Number] = {
            "conns_ready": ready,
            "conns_failed": conn["failed"],
            "connect_seconds": round(secs, 3),
            "connect_per_s": round(ready / secs, 1),
            "connect_broker_cpu_pct": pct(bc0, bc1, secs),
            "connect_loadgen_cpu_pct": round(100.0 * conn["cpu_s"] / secs, 2),
            "rss_empty_kib": rss0,
            "rss_kib": rss_n,
            "bytes_per_conn": (
                round((rss_n - rss0) * 1024 / ready, 1)
                if rss0 is not None and rss_n is not None
                else None
            ),
            "rest_seconds": round(wall, 2),
            "rest_cpu_pct": pct(cpu0, cpu1, wall),
            "disconnected_at_rest": closed,
            "listen_overflows": net1["ListenOverflows"] - net0["ListenOverflows"],
            "syn_retrans": net1["TCPSynRetrans"] - net0["TCPSynRetrans"],
            "other_cpu": other,
        }
        if gauge is not None:
            results["broker_connections_gauge"] = gauge
        notes = [f"first errors: {conn['errors']}"] if conn["errors"] else []
        return Report(
            "idle",
            _params(t, opts, conns=conns, settle_s=settle, rest_s=rest, procs=len(load.procs)),
            results,
            notes=notes,
        )


def _params(t: Target, opts: Options, **kw: Any) -> dict[str, Any]:
    return {
        "server": t.server,
        "url": t.endpoint.url,
        "pid": t.pid,
        "broker_cpu": opts.broker_cpu if (t.server != "external" and tg.can_pin()) else None,
        "load_cpu": opts.load_cpu if tg.can_pin() else None,
        "src_ips": opts.src_ips,
        **kw,
    }


# ---------------------------------------------------------------- fanout / ceiling


def fanout(
    opts: Options,
    subs: int,
    duration: float,
    size: int,
    window: int,
    tick: float,
    kind: str = "broker",
) -> Report:
    with open_target(opts, kind) as t:
        load, conn = connect_load(t, subs, "bench.fanout", opts)
        with load:
            pub = Publisher(t.endpoint, "bench.fanout", size)
            try:
                return _fanout_run(t, opts, load, conn, pub, subs, duration, size, window, tick)
            finally:
                pub.close()


def _fanout_run(
    t: Target,
    opts: Options,
    load: Load,
    conn: dict[str, Any],
    pub: Publisher,
    subs: int,
    duration: float,
    size: int,
    window: int,
    tick: float,
) -> Report:
    ready = conn["ready"]
    win_pubs = max(1, window // ready) if window > 0 else 0
    time.sleep(1.0)
    _quiet(opts)
    m0 = broker_metrics(t.endpoint)
    load.start(False, tick, size)
    mine = [os.getpid(), *load.pids()]
    noise = tg.OtherCpu()
    b0, l0 = proc_cpu(t.pid), tg.cpu_seconds(mine)
    w0 = time.monotonic()
    t_start = time.monotonic_ns()
    end = time.monotonic() + duration
    next_service = 0.0
    while True:
        now = time.monotonic()
        if now >= end:
            break
        if now >= next_service:
            pub.service()
            next_service = now + 0.1
        room = 64
        if win_pubs:
            room = min(room, win_pubs - (pub.seq - load.delivered_total() // ready))
        if room > 0:
            pub.publish(room)
        else:
            time.sleep(0.0005)  # counts move once per worker sweep anyway
    published = pub.seq
    _drain(load, published * ready, idle_s=3.0, max_s=60.0)
    wall = time.monotonic() - w0
    b1, l1 = proc_cpu(t.pid), tg.cpu_seconds(mine)
    other = noise.cpus(_ours(t))
    pub.service()
    stats = load.stop()
    deltas = counter_deltas(m0, broker_metrics(t.endpoint))
    span = max(1e-9, (stats.last_ns - t_start) / 1e9)
    delivered = stats.delivered
    results: dict[str, Number] = {
        "subs_ready": ready,
        "published": published,
        "delivered": delivered,
        "lost": published * ready - delivered,
        "disconnected": stats.closed,
        "publish_errors": pub.errors,
        "seconds": round(span, 3),
        "deliveries_per_s": round(delivered / span, 1),
        "broker_cpu_pct": pct(b0, b1, wall),
        "broker_cpu_us_per_delivery": (
            round((b1 - b0) * 1e6 / delivered, 3)
            if b0 is not None and b1 is not None and delivered
            else None
        ),
        "loadgen_cpu_pct": pct(l0, l1, wall),
        "other_cpu": other,
        **deltas,
    }
    iterations = deltas.get("broker_loop_iterations")
    if iterations:
        results["broker_deliveries_per_iteration"] = round(delivered / iterations, 1)
    params = _params(
        t,
        opts,
        subs=subs,
        duration_s=duration,
        payload_bytes=size,
        window_deliveries=window,
        window_publishes=win_pubs,
        rx_tick_ms=tick * 1000,
        procs=len(load.procs),
    )
    return Report("ceiling" if t.server == "trivial" else "fanout", params, results)


# ---------------------------------------------------------------- latency


def _latency_step(
    t: Target,
    opts: Options,
    load: Load,
    pub: Publisher,
    ready: int,
    rate: float,
    duration: float,
    tick: float,
) -> dict[str, Number]:
    _quiet(opts)
    load.start(True, tick)
    m0 = broker_metrics(t.endpoint)
    noise = tg.OtherCpu()
    mine = [os.getpid(), *load.pids()]
    b0, l0 = proc_cpu(t.pid), tg.cpu_seconds(mine)
    w0 = time.monotonic()
    interval = 1.0 / rate
    t0 = time.monotonic()
    end = t0 + duration
    nxt = t0
    next_service = 0.0
    while True:
        now = time.monotonic()
        if now >= end:
            break
        if now >= next_service:
            pub.service()
            next_service = now + 0.1
        if now < nxt:
            time.sleep(min(nxt - now, end - now))
            continue
        due = min(1000, int((now - nxt) / interval) + 1)  # catch up after a late wake-up
        pub.publish(due)
        nxt += due * interval
    published = pub.seq
    _drain(load, published * ready, idle_s=2.0, max_s=30.0)
    wall = time.monotonic() - w0
    b1, l1 = proc_cpu(t.pid), tg.cpu_seconds(mine)
    other = noise.cpus(_ours(t))
    stats = load.stop()
    slow = slow_iterations(m0, broker_metrics(t.endpoint))
    return {
        "rate": rate,
        "published": published,
        "delivered": stats.delivered,
        "lost": published * ready - stats.delivered,
        "disconnected": stats.closed,
        "p50_ms": ms(percentile_us(stats.hist, 0.50)),
        "p99_ms": ms(percentile_us(stats.hist, 0.99)),
        "max_ms": ms(float(max(stats.hist)) if stats.hist else None),
        "samples": sum(stats.hist.values()),
        "broker_cpu_pct": pct(b0, b1, wall),
        "loadgen_cpu_pct": pct(l0, l1, wall),
        "other_cpu": other,
        **slow,
    }


@dataclass(frozen=True)
class Sweep:
    """Raise the rate geometrically from `start`; find where p99 first passes `target_ms`.

    It goes on past that point (to show the curve) until p99 passes `stop_ms`, a step loses
    or disconnects anything (overload), or the rate would pass `max_rate`.
    """

    start: float = 5.0
    target_ms: float = 5.0
    stop_ms: float = 50.0
    factor: float = 1.5
    max_rate: float = 20000.0
    step_duration: float = 5.0


def latency(
    opts: Options,
    subs: int,
    rate: float,
    duration: float,
    size: int,
    sweep: Sweep | None,
    kind: str = "broker",
    tick: float = 0.0,
) -> Report:
    with open_target(opts, kind) as t:
        load, conn = connect_load(t, subs, "bench.latency", opts)
        with load:
            ready = conn["ready"]
            time.sleep(1.0)
            pub = Publisher(t.endpoint, "bench.latency", size)
            try:
                first = _latency_step(t, opts, load, pub, ready, rate, duration, tick)
                pub.seq = 0
                steps: list[dict[str, Number]] = []
                results: dict[str, Number] = {"subs_ready": ready, **first}
                results.pop("rate")
                if sweep is not None:
                    steps = _sweep(t, opts, load, pub, ready, sweep, tick)
                    results.update(_sweep_summary(steps, sweep.target_ms))
            finally:
                pub.close()
    params = _params(
        t,
        opts,
        subs=subs,
        rate=rate,
        duration_s=duration,
        payload_bytes=size,
        rx_tick_ms=tick * 1000,
        procs=len(load.procs),
        **({f"sweep_{k}": v for k, v in vars(sweep).items()} if sweep else {}),
    )
    name = "ceiling-latency" if t.server == "trivial" else "latency"
    return Report(name, params, results, steps=steps)


def _sweep(
    t: Target, opts: Options, load: Load, pub: Publisher, ready: int, sw: Sweep, tick: float
) -> list[dict[str, Number]]:
    steps: list[dict[str, Number]] = []
    r = sw.start
    while r <= sw.max_rate:
        step = _latency_step(t, opts, load, pub, ready, r, sw.step_duration, tick)
        pub.seq = 0
        steps.append(step)
        p99 = step["p99_ms"]
        if p99 is None or p99 > sw.stop_ms or step["lost"] or step["disconnected"]:
            break
        r = float(max(r + 1, round(r * sw.factor)))
    return steps


def _sweep_summary(steps: list[dict[str, Number]], target_ms: float) -> dict[str, Number]:
    """The last rate of the unbroken run of steps under the target, and the first over it."""
    under: Number = None
    over: Number = None
    for step in steps:
        p99 = step["p99_ms"]
        if p99 is None or p99 > target_ms or step["lost"] or step["disconnected"]:
            over = step["rate"]
            break
        under = step["rate"]
    return {
        "sweep_last_rate_p99_under_target": under,
        "sweep_first_rate_p99_over_target": over,
        "sweep_highest_rate_run": steps[-1]["rate"] if steps else None,
    }


def check_size(size: int) -> None:
    if not wire.MIN_PAYLOAD <= size <= wire.MAX_PAYLOAD:
        raise tg.BenchError(f"--size must be {wire.MIN_PAYLOAD}..{wire.MAX_PAYLOAD} bytes")
