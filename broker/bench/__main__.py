"""`broker-bench` / `python -m broker.bench`: run a scenario, print a table, optionally write JSON.

    broker-bench idle    [--conns 19000] [--settle 3] [--rest 10]
    broker-bench fanout  [--subs 1000] [--duration 10] [--window 100000] [--rx-tick-ms 10]
    broker-bench latency [--subs 1000] [--rate 50] [--duration 10] [--sweep]
    broker-bench ceiling [--subs 1000] [--duration 10] [--sweep]   (against the trivial server)
    broker-bench all                                                 (all four, in sequence)
    broker-bench pollers [--crowd 0,1000,...,19000] [--rate 200] [--plot pollers.png]
                         (epoll, poll and select brokers: small active set, growing idle crowd)

Without --url each scenario starts its own broker (`python -m broker`) on a free port, pinned
to CPU 0, and stops it by PID afterwards; with --url ws://127.0.0.1:P/ws (and --pid for RSS
and CPU) it loads a running broker. Only 127.0.0.0/8 targets are accepted. Exit status: 0 on
a completed run, 2 when the run could not be made (the reason is printed).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from broker.bench import pollers as pl
from broker.bench import scenarios as sc
from broker.bench.target import BenchError, can_pin, loopback_target

TARGETS = {
    "idle": "19,000 idle connections: < 4 KiB broker RSS each, < 2% of a core at rest",
    "fanout": "1,000 subscribers, 64-byte payloads: > 1,000,000 deliveries/s",
    "latency": "1,000 subscribers at 50 msg/s: p99 publish-to-delivery < 5 ms",
    "pollers": "the seed's claim: epoll's cost per wake-up flat as idle connections grow; "
    "poll's and select's growing with them",
}


STEP_COLUMNS = (
    "rate",
    "published",
    "lost",
    "p50_ms",
    "p99_ms",
    "max_ms",
    "broker_cpu_pct",
    "loadgen_cpu_pct",
    "other_cpu",
    "broker_iterations_over_8ms",
)
# scenarios whose steps are not rate steps
STEP_COLUMNS_FOR = {
    "pollers": (
        "idle",
        "wakeups",
        "cpu_us_per_wakeup",
        "sys_us_per_wakeup",
        "cpu_us_per_delivery",
        "p50_ms",
        "p99_ms",
        "broker_cpu_pct",
        "rest_cpu_pct",
        "lost",
        "other_cpu",
    )
}


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target and load placement")
    g.add_argument(
        "--url", help="load a running broker (ws://127.x.y.z:PORT/ws) instead of --spawn"
    )
    g.add_argument("--pid", type=int, help="PID of the --url broker, for its RSS and CPU")
    g.add_argument(
        "--sub-url",
        action="append",
        default=[],
        help="put subscribers on these brokers instead (repeatable; load process i uses the "
        "i-th modulo their number): e.g. the other nodes of a --redis cluster",
    )
    g.add_argument(
        "--spawn", action="store_true", help="start our own broker (the default without --url)"
    )
    g.add_argument("--broker-arg", action="append", default=[], help="extra flag for --spawn")
    g.add_argument(
        "--tls",
        action="store_true",
        help="wss://: a spawned broker gets a throw-away certificate (--url wss://... also works)",
    )
    g.add_argument(
        "--procs", type=int, default=0, help="worker processes (0: one per 5,000 connections)"
    )
    g.add_argument("--src-ips", type=int, default=8, help="source addresses 127.0.0.2.. to use")
    g.add_argument("--conc", type=int, default=64, help="handshakes in flight, all workers")
    g.add_argument("--conn-timeout", type=float, default=180.0, help="connect phase limit, s")
    g.add_argument("--broker-cpu", type=int, default=0, help="CPU for a spawned server")
    g.add_argument("--load-cpu", type=int, default=1, help="CPU for the load generator")
    g.add_argument("--no-pin", action="store_true", help="pin nothing")
    g.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        help="before each measurement wait up to this many s until the machine is idle",
    )
    g.add_argument("--json", metavar="PATH", help="also write the report(s) as JSON ('-': stdout)")


def _fanout_args(p: argparse.ArgumentParser, subs: int = 1000) -> None:
    p.add_argument("--subs", type=int, default=subs)
    p.add_argument("--duration", type=float, default=10.0, help="publish phase, s")
    p.add_argument("--size", type=int, default=64, help="payload bytes")
    p.add_argument(
        "--window", type=int, default=100_000, help="max outstanding deliveries (0: open loop)"
    )
    p.add_argument(
        "--rx-tick-ms",
        type=float,
        default=10.0,
        help="subscriber sweep period: each recv then carries many deliveries (0: read at once)",
    )


def _sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sweep", action="store_true", help="then raise the rate step by step")
    p.add_argument("--sweep-start", type=float, default=5.0, help="first rate of the sweep")
    p.add_argument("--sweep-target-ms", type=float, default=5.0, help="the p99 to find")
    p.add_argument("--sweep-stop-ms", type=float, default=50.0, help="stop once p99 passes this")
    p.add_argument("--sweep-factor", type=float, default=1.5, help="rate multiplier per step")
    p.add_argument("--sweep-max", type=float, default=20000.0, help="highest rate to try")
    p.add_argument("--step-duration", type=float, default=5.0, help="seconds per sweep step")


def _latency_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--subs", type=int, default=1000)
    p.add_argument("--rate", type=float, default=50.0, help="publishes per second")
    p.add_argument("--duration", type=float, default=10.0, help="seconds at --rate")
    p.add_argument("--size", type=int, default=64)
    p.add_argument(
        "--rx-tick-ms",
        type=float,
        default=0.0,
        help="pause after sweeps of small reads (0: read as soon as epoll reports; adds bias)",
    )
    _sweep_args(p)


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 0,1000,5000: {text!r}") from None


def _pollers_args(p: argparse.ArgumentParser) -> None:
    d = pl.Plan()
    p.add_argument(
        "--pollers",
        default=",".join(d.pollers),
        help="pollers to run, in order (epoll is the broker's default and only production one)",
    )
    p.add_argument(
        "--crowd",
        type=_ints,
        default=list(d.crowd),
        help="idle connections at each step, for epoll and poll (default %(default)s)",
    )
    p.add_argument(
        "--select-crowd",
        type=_ints,
        default=list(d.select_crowd),
        help="the same for select, which cannot watch fds >= 1024 (default %(default)s)",
    )
    p.add_argument("--active", type=int, default=d.active, help="active subscribers, one topic")
    p.add_argument("--rate", type=float, default=d.rate, help="publishes per second to them")
    p.add_argument("--duration", type=float, default=d.duration, help="publishing s per step")
    p.add_argument("--rest", type=float, default=d.rest, help="quiet s per step (rest CPU)")
    p.add_argument("--size", type=int, default=d.size, help="payload bytes")
    p.add_argument(
        "--probe", type=int, default=d.probe, help="select: connections tried past its limit"
    )
    p.add_argument("--plot", default="pollers.png", help="PNG to write (needs the bench extra)")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.add_argument(
        "--replot", metavar="JSON", help="run nothing: redraw --plot from an earlier --json"
    )


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="broker-bench",
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="scenario", required=True)
    p = sub.add_parser("idle", help="N idle subscribed connections: RSS/conn, connect rate, CPU")
    _common(p)
    p.add_argument("--conns", type=int, default=19000)
    p.add_argument("--settle", type=float, default=3.0, help="s before RSS is read")
    p.add_argument("--rest", type=float, default=10.0, help="s over which rest CPU is measured")
    p = sub.add_parser("fanout", help="S subscribers on one topic, closed-loop publisher")
    _common(p)
    _fanout_args(p)
    p = sub.add_parser("latency", help="publish-to-delivery latency at a fixed rate (+ sweep)")
    _common(p)
    _latency_args(p)
    p = sub.add_parser("ceiling", help="the fanout load against the trivial server")
    _common(p)
    _fanout_args(p)
    p.add_argument("--rate", type=float, default=50.0, help="latency run: publishes per s")
    _sweep_args(p)
    p = sub.add_parser(
        "pollers",
        help="the seed's thesis: epoll, poll and select brokers, a small active set beside a "
        "growing idle crowd; CPU per wake-up and per delivery, latency; writes a PNG plot",
    )
    _common(p)
    _pollers_args(p)
    p = sub.add_parser("all", help="idle, fanout, latency --sweep and ceiling with defaults")
    _common(p)
    return ap


def options(a: argparse.Namespace) -> sc.Options:
    for url in [a.url, *a.sub_url] if a.url else a.sub_url:
        loopback_target(url)  # refuse non-loopback targets before anything starts
        if a.spawn:
            raise BenchError("--url and --spawn exclude each other")
    if a.tls and a.scenario == "ceiling":
        raise BenchError("the trivial server speaks no TLS: run ceiling without --tls")
    pin = not a.no_pin and can_pin()
    return sc.Options(
        url=a.url,
        sub_urls=a.sub_url,
        pid=a.pid,
        procs=a.procs,
        src_ips=a.src_ips,
        conc=a.conc,
        conn_timeout=a.conn_timeout,
        broker_cpu=a.broker_cpu if pin else None,
        load_cpu=a.load_cpu if pin else None,
        broker_args=a.broker_arg,
        quiet_wait=a.quiet_wait,
        tls=a.tls,
    )


def _latency(opts: sc.Options, a: argparse.Namespace, sweep: bool, kind: str) -> sc.Report:
    sw = sc.Sweep(
        start=a.sweep_start,
        target_ms=a.sweep_target_ms,
        stop_ms=a.sweep_stop_ms,
        factor=a.sweep_factor,
        max_rate=a.sweep_max,
        step_duration=a.step_duration,
    )
    return sc.latency(
        opts,
        subs=a.subs,
        rate=a.rate,
        duration=a.duration,
        size=a.size,
        sweep=sw if sweep else None,
        kind=kind,
        tick=a.rx_tick_ms / 1000.0 if kind == "broker" else 0.0,
    )


def run(a: argparse.Namespace, opts: sc.Options) -> list[sc.Report]:
    s = a.scenario
    if s == "idle":
        return [sc.idle(opts, a.conns, a.settle, a.rest)]
    if s in ("fanout", "ceiling"):
        sc.check_size(a.size)
        kind = "trivial" if s == "ceiling" else "broker"
        tick = a.rx_tick_ms / 1000.0
        reports = [sc.fanout(opts, a.subs, a.duration, a.size, a.window, tick, kind)]
        if s == "ceiling" and a.sweep:
            reports.append(_latency(opts, a, True, kind))
        return reports
    if s == "latency":
        sc.check_size(a.size)
        return [_latency(opts, a, a.sweep, "broker")]
    if s == "pollers":
        sc.check_size(a.size)
        plan = pl.Plan(
            pollers=[p.strip() for p in a.pollers.split(",") if p.strip()],
            crowd=a.crowd,
            select_crowd=a.select_crowd,
            active=a.active,
            rate=a.rate,
            duration=a.duration,
            rest=a.rest,
            size=a.size,
            probe=a.probe,
        )
        return pl.run(opts, plan)
    # all: each scenario's defaults, one after the other (never two loads at once)
    defaults = parser().parse_args(["latency"])
    return [
        sc.idle(opts, 19000, 3.0, 10.0),
        sc.fanout(opts, 1000, 10.0, 64, 100_000, 0.01),
        _latency(opts, defaults, True, "broker"),
        # the generator's ceiling is a plain-WebSocket figure, even in a --tls run
        sc.fanout(dataclasses.replace(opts, tls=False), 1000, 10.0, 64, 100_000, 0.01, "trivial"),
    ]


def _fmt(v: Any, key: str = "") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}" if key not in ("pid", "port") else str(v)
    if isinstance(v, float):
        if v.is_integer() and abs(v) >= 1000:
            return f"{int(v):,}"
        return f"{v:,.3f}".rstrip("0").rstrip(".") if abs(v) < 1000 else f"{v:,.1f}"
    return str(v)


def render(r: sc.Report) -> str:
    lines = [f"== {r.scenario}"]
    lines.append(
        "   " + "  ".join(f"{k}={_fmt(v, k)}" for k, v in r.params.items() if v is not None)
    )
    width = max((len(k) for k in r.results), default=10)
    lines += [f"   {k:<{width}}  {_fmt(v):>14}" for k, v in r.results.items()]
    if r.steps:
        # the table keeps the columns a reader compares; the JSON has every field
        cols = [c for c in STEP_COLUMNS_FOR.get(r.scenario, STEP_COLUMNS) if c in r.steps[0]]
        widths = [max(len(c), *(len(_fmt(s[c])) for s in r.steps)) for c in cols]
        lines.append("   " + "  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
        for s in r.steps:
            cells = [_fmt(s[c]).rjust(w) for c, w in zip(cols, widths, strict=True)]
            lines.append("   " + "  ".join(cells))
    if r.scenario in TARGETS:
        lines.append(f"   target: {TARGETS[r.scenario]}")
    lines += [f"   note: {n}" for n in r.notes]
    return "\n".join(lines)


def document(reports: list[sc.Report], argv: Sequence[str]) -> dict[str, Any]:
    return {
        "command": ["broker-bench", *argv],
        "commit": pl.commit(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "nproc": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
        "reports": [r.as_dict() for r in reports],
    }


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop what we started (by PID)
    signal.signal(signal.SIGTERM, _interrupt)
    plot = a.scenario == "pollers" and not a.no_plot
    if a.scenario == "pollers" and a.replot:
        return _replot(Path(a.replot), Path(a.plot))
    try:
        if plot:
            pl.check_plotting()
        opts = options(a)
        if opts.load_cpu is not None:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, {opts.load_cpu})
        reports = run(a, opts)
    except BenchError as e:
        print(f"broker-bench: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("broker-bench: interrupted", file=sys.stderr)
        return 130
    for r in reports:
        print(render(r), flush=True)
    doc = document(reports, argv)
    if a.json:
        text = json.dumps(doc, indent=2)
        if a.json == "-":
            print(text)
        else:
            Path(a.json).write_text(text + "\n")
    if plot:
        title = pl.caption(doc["reports"], doc["time_utc"], doc["commit"])
        pl.plot(doc["reports"], Path(a.plot), title)
        print(f"plot: {a.plot}")
    return 0


def _replot(source: Path, out: Path) -> int:
    """Redraw the pollers plot from the JSON of an earlier run (its own date and commit)."""
    try:
        pl.check_plotting()
        doc = json.loads(source.read_text())
    except (OSError, ValueError, BenchError) as e:
        print(f"broker-bench: {e}", file=sys.stderr)
        return 2
    title = pl.caption(doc["reports"], doc["time_utc"], doc.get("commit", "?"))
    pl.plot(doc["reports"], out, title)
    print(f"plot: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
