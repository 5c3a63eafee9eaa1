"""`broker --workers N`: a parent that supervises N worker processes and is their hub.

Theory of operation: the parent binds the port first (SO_REUSEPORT, not listening: it only
reserves the number, so `--port 0` works), then starts each worker as `python -m broker` with the
same flags, its index and its end of a socketpair (`BROKER_WORKER_INDEX`, `BROKER_WORKER_FD`).
Every worker listens on the port with SO_REUSEPORT, so the kernel spreads connections over them
by a hash of the 4-tuple, and each worker is a whole broker with its own fd limit (20,000 here):
N workers hold N times as many sockets. The parent serves no client; its loop runs the hub
(broker/net/hub.py), which numbers, retains and routes messages between workers.

Supervision: a worker's end of the socketpair closes when it exits, which the hub's loop sees at
once. A worker that exits while the parent is not stopping is restarted after a back-off that
doubles with each quick death (one that lived under `STABLE` seconds) up to `MAX_BACKOFF`, and
counted (`broker_worker_restarts_total`); its clients reconnect to the others (or to it) and
recover from the hub's history. A worker that exits with an error before it said it was
listening (a certificate that does not load...) stops the whole broker with its exit code, as
the single process would fail: restarting it would fail the same way. SIGTERM/SIGINT are
passed to every worker as SIGTERM (each drains its clients with 1001); the parent exits 0 once
all have exited, killing any still alive after --shutdown-timeout plus a grace. SIGHUP is
passed on (TLS reload).

Hung workers (`--worker-timeout`, as gunicorn's worker timeout): an exit is seen at once, a hang
is not (a handler in an endless loop, a SIGSTOP: the socket stays open). So each worker's loop
sends a heartbeat over its socket once a second (net/hub.py); a watch timer here, on the same
cadence, SIGKILLs a listening worker the hub has read nothing from for longer than the timeout,
counted in `broker_worker_timeouts_total`. Its exit then takes the path of any other (reaped,
restarted with the back-off). A worker still starting sends no heartbeats yet: it has
`START_GRACE` (or the timeout, if longer) from its start to report listening, and a worker
killed that way is restarted too, never taken for one that cannot start.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from broker.config import Config
from broker.metrics import Stats
from broker.net.hub import Hub, heartbeat_interval
from broker.net.loop import EventLoop

log = logging.getLogger("broker.supervisor")

STABLE = 10.0  # a worker that lived this long resets its back-off
MAX_BACKOFF = 5.0
FIRST_BACKOFF = 0.1
KILL_GRACE = 5.0  # after --shutdown-timeout, then SIGKILL
REAP_INTERVAL = 0.05
START_GRACE = 30.0  # seconds a worker may take to report listening (imports, TLS, a busy host)


def worker_count(cfg: Config) -> int:
    if cfg.workers > 0:
        return cfg.workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Worker:
    __slots__ = ("failures", "index", "killed", "listening", "proc", "ready", "restarts", "started")

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.failures = 0  # quick deaths in a row
        self.restarts = 0
        self.ready = False  # this worker has started once (said so over its socket)
        self.listening = False  # this process of it said so (heartbeats due from then on)
        self.killed = False  # this process was killed for its silence (--worker-timeout)


class Supervisor:
    def __init__(self, cfg: Config, argv: Sequence[str], fd_limit: int) -> None:
        self.config = cfg
        self.argv = list(argv)
        self.stats = Stats()
        self.loop = EventLoop(self.stats, fd_limit)
        self.hub = Hub(cfg, self.loop, self.stats)
        family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        # Reserves the port for the workers' listeners (bound, never listening: no connection
        # is ever queued here).
        self.reserved = socket.socket(family, socket.SOCK_STREAM)
        self.reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.reserved.bind((cfg.host, cfg.port))
        self.port: int = self.reserved.getsockname()[1]
        self.workers = [Worker(i) for i in range(worker_count(cfg))]
        self.restarts = 0
        self.timeouts = 0  # workers killed by _watch
        self.stopping = False
        self.exit_code = 0
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)
        self.registry.register(_HubCollector(self))
        self.hub.render_own = lambda: generate_latest(self.registry)
        self.hub.on_detach = self._detached
        self.hub.on_ready = self._ready
        self.loop.on_signal = self._on_signal

    # -- workers -----------------------------------------------------------------------------

    def spawn(self, worker: Worker) -> None:
        if self.stopping:
            return
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env["BROKER_WORKER_INDEX"] = str(worker.index)
        env["BROKER_WORKER_FD"] = str(theirs.fileno())
        cmd = [sys.executable, "-m", "broker", *self.argv, "--port", str(self.port)]
        try:
            worker.proc = subprocess.Popen(cmd, env=env, pass_fds=(theirs.fileno(),))
        except OSError as exc:
            log.error("cannot start worker %d: %s", worker.index, exc)  # noqa: TRY400
            ours.close()
            theirs.close()
            self._schedule_restart(worker)
            return
        theirs.close()
        worker.started = time.monotonic()
        worker.listening = worker.killed = False
        self.hub.attach(worker.index, ours)
        log.info("worker %d started, pid %d", worker.index, worker.proc.pid)

    def _ready(self, index: int) -> None:
        worker = self.workers[index]
        worker.ready = worker.listening = True

    def _watch(self) -> None:
        """Kill (SIGKILL) every worker silent past --worker-timeout: its loop is stuck. Runs
        every heartbeat interval; the hub's `seen` is updated by any read from the worker."""
        if self.stopping:
            return
        timeout = self.config.worker_timeout
        now = self.loop.now
        for worker in self.workers:
            link = self.hub.links.get(worker.index)
            proc = worker.proc
            if link is None or proc is None or worker.killed:
                continue  # not running, being reaped, or already killed
            if worker.listening:
                silent, allowed = now - link.seen, timeout
            else:  # no heartbeats before listening: the start grace, from its start
                silent, allowed = now - worker.started, max(timeout, START_GRACE)
            if silent <= allowed:
                continue
            if worker.listening:
                log.warning(
                    "worker %d (pid %d) silent for %.1f s (--worker-timeout %g): hung; killing it",
                    worker.index,
                    proc.pid,
                    silent,
                    timeout,
                )
            else:
                log.warning(
                    "worker %d (pid %d) not listening %.1f s after its start: hung; killing it",
                    worker.index,
                    proc.pid,
                    silent,
                )
            worker.killed = True
            self.timeouts += 1
            proc.kill()  # its socket closes: _detached reaps and restarts it
        self.loop.call_later(heartbeat_interval(timeout), self._watch)

    def _detached(self, index: int) -> None:
        """Worker `index` closed its socket: reap it, then restart it unless stopping."""
        self._reap(self.workers[index], time.monotonic() + KILL_GRACE)

    def _reap(self, worker: Worker, kill_at: float) -> None:
        proc = worker.proc
        if proc is None:
            return
        code = proc.poll()
        if code is None:
            if time.monotonic() > kill_at:
                proc.kill()
            self.loop.call_later(REAP_INTERVAL, lambda: self._reap(worker, kill_at))
            return
        worker.proc = None
        if self.stopping:
            log.info("worker %d exited (%s)", worker.index, code)
            if all(w.proc is None for w in self.workers):
                self.loop.stop()
            return
        if not worker.ready and code and not worker.killed:
            # It never started (a certificate that does not load, a port taken...): so would
            # every restart. Fail as a single process would, with its exit code.
            log.error("worker %d could not start (exit %s); stopping", worker.index, code)
            self.exit_code = code
            self.shutdown()
            return
        log.warning("worker %d (pid %d) exited with %s; restarting", worker.index, proc.pid, code)
        self._schedule_restart(worker)

    def _schedule_restart(self, worker: Worker) -> None:
        if time.monotonic() - worker.started < STABLE:
            worker.failures += 1
        else:
            worker.failures = 0
        delay = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** max(0, worker.failures - 1))
        worker.restarts += 1
        self.restarts += 1
        self.loop.call_later(delay, lambda: self.spawn(worker))

    # -- signals -----------------------------------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.shutdown()
        elif signum == signal.SIGHUP:
            self._signal_all(signal.SIGHUP)

    def _signal_all(self, signum: int) -> None:
        for worker in self.workers:
            if worker.proc is not None and worker.proc.poll() is None:
                worker.proc.send_signal(signum)

    def shutdown(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        log.info("shutting down: stopping %d workers", len(self.workers))
        self._signal_all(signal.SIGTERM)
        kill_at = time.monotonic() + self.config.shutdown_timeout + KILL_GRACE
        for worker in self.workers:
            self._reap(worker, kill_at)
        if all(w.proc is None for w in self.workers):
            self.loop.stop()

    def run(self) -> int:
        self.loop.handle_signals(signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        for worker in self.workers:
            self.spawn(worker)
        if self.config.worker_timeout > 0:
            self.loop.call_later(heartbeat_interval(self.config.worker_timeout), self._watch)
        log.info(
            "broker supervising %d workers on %s:%d (ws://%s:%d/ws); pid %d",
            len(self.workers),
            self.config.host,
            self.port,
            self.config.host,
            self.port,
            os.getpid(),
        )
        try:
            self.loop.run()
        finally:
            self.reserved.close()
            self.loop.close()
        return self.exit_code


class _HubCollector(Collector):
    """The parent's own series: workers, restarts, the hub's traffic and the history it holds."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup

    def collect(self) -> Iterator[Metric]:
        sup = self.sup
        hub = sup.hub
        s = sup.stats
        yield GaugeMetricFamily(
            "broker_workers",
            "Worker processes running",
            value=sum(w.proc is not None for w in sup.workers),
        )
        yield CounterMetricFamily(
            "broker_worker_restarts", "Workers restarted after they died", value=sup.restarts
        )
        yield CounterMetricFamily(
            "broker_worker_timeouts",
            "Workers killed (SIGKILL, then restarted) for no heartbeat within --worker-timeout",
            value=sup.timeouts,
        )
        yield CounterMetricFamily(
            "broker_hub_messages", "Messages numbered and routed by the hub", value=s.published
        )
        yield CounterMetricFamily(
            "broker_hub_forwarded",
            "Messages sent to workers (one per message and worker with a subscriber)",
            value=s.delivered,
        )
        yield CounterMetricFamily(
            "broker_hub_dropped",
            "Messages not sent to a worker whose buffer was over its bound",
            value=hub.dropped,
        )
        yield GaugeMetricFamily(
            "broker_hub_buffered_bytes",
            "Bytes queued by the hub to workers, not yet written",
            value=sum(len(link.channel.out) for link in hub.links.values()),
        )
        streams = hub.streams
        yield GaugeMetricFamily(
            "broker_history_topics", "Topics holding history", value=streams.topics
        )
        yield GaugeMetricFamily(
            "broker_history_messages", "Messages held in history", value=streams.messages
        )
        yield GaugeMetricFamily(
            "broker_history_bytes",
            "Bytes of history, as counted against --history-memory",
            value=streams.held_bytes,
        )
        evictions = CounterMetricFamily(
            "broker_history_evictions",
            "Messages removed from history, by reason",
            labels=["reason"],
        )
        for reason, count in s.history_evictions.items():
            evictions.add_metric([reason], count)
        yield evictions
