"""Fixtures shared by the whole suite: a real broker process on a free loopback port, and a
real redis-server for the --redis tests."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import hiredis
import pytest

from broker.config import Config
from broker.errors import Closed
from broker.server import Server

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "tests" / "artifacts"
_broker_numbers = itertools.count(1)  # numbers each broker of the session: one log file each


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BrokerProcess:
    """A broker started as a real process (`python -m broker`), stopped by PID."""

    def __init__(
        self,
        *args: str,
        port: int | None = None,
        env: dict[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
    ):
        self.port = port or free_port()
        self.args = args
        self.env = env or {}
        self.tls = tls  # a client context trusting the broker's certificate: wss:// and https://
        self.proc: subprocess.Popen[bytes] | None = None
        # A log of this broker's own, started empty: ports are reused (restarts on the same port,
        # later sessions), and a reader (first line, counts, "Traceback" not in it) must see
        # this process's lines only.
        self.log_path = ARTIFACTS / f"broker-{self.port}-{next(_broker_numbers)}.log"

    @property
    def url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://127.0.0.1:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> BrokerProcess:
        env = {**os.environ, "PYTHONPATH": str(REPO), **self.env}
        cmd = [sys.executable, "-m", "broker", "--host", "127.0.0.1", "--port", str(self.port)]
        with self.open_log() as log:
            self.proc = subprocess.Popen([*cmd, *self.args], env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited with {self.proc.returncode}: {self.log_tail()}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(self.http + "/healthz", timeout=1, context=self.tls) as r,
            ):
                if r.status == 200:
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"broker did not become healthy: {self.log_tail()}")

    def open_log(self) -> BinaryIO:
        """The log file for a process being started: truncated the first time (a file left by an
        earlier session on this port is not ours), appended to when this object starts again."""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        return open(self.log_path, "wb" if self.proc is None else "ab")

    def log(self) -> str:
        """Everything this broker wrote (stdout and stderr), whole: checks such as "no Traceback"
        must not miss an early line."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, size: int = 4000) -> str:
        """The end of the log, for error messages."""
        return self.log()[-size:]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def metric(self, name: str, labels: str = "") -> float:
        """One sample from /metrics; `labels` is the exact label text, e.g. 'kind="in"'. Without
        labels, a family that has them is summed over them."""
        with urllib.request.urlopen(self.http + "/metrics", timeout=5, context=self.tls) as r:
            text = r.read().decode()
        wanted = f"{name}{{{labels}}}" if labels else name
        total = None  # without labels, a labelled family's sum (broker_slow_consumers_total)
        for line in text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.split()[-1])
            if not labels and line.startswith(name + "{"):
                total = (total or 0.0) + float(line.split()[-1])
        if total is not None:
            return total
        raise KeyError(wanted)

    def wait_metric(
        self,
        name: str,
        labels: str = "",
        *,
        equals: float | None = None,
        at_least: float | None = None,
        timeout: float = 10.0,
    ) -> float:
        """Poll /metrics until the sample equals `equals`, or reaches `at_least` (one of the
        two), bounded by `timeout`; returns the last value."""
        assert (equals is None) != (at_least is None), "give equals or at_least"

        def done(value: float) -> bool:
            return value == equals if at_least is None else value >= at_least

        deadline = time.monotonic() + timeout
        value = self.metric(name, labels)
        while not done(value) and time.monotonic() < deadline:
            time.sleep(0.05)
            value = self.metric(name, labels)
        return value

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.terminate(timeout=10.0)
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


@pytest.fixture
def broker_factory() -> Iterator[Callable[..., BrokerProcess]]:
    """Start brokers with extra command-line flags; all are stopped at teardown."""
    started: list[BrokerProcess] = []

    def start(
        *args: str,
        port: int | None = None,
        env: dict[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> BrokerProcess:
        b = BrokerProcess(*args, port=port, env=env, tls=tls).start()
        started.append(b)
        return b

    yield start
    for b in started:
        b.stop()


@pytest.fixture
def broker(broker_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    """A broker on its defaults (but a free port)."""
    return broker_factory()


@pytest.fixture(params=["epoll", "poll", "select"])
def polled_broker(
    request: pytest.FixtureRequest, broker_factory: Callable[..., BrokerProcess]
) -> BrokerProcess:
    """A broker on each of the loop's pollers (--poller): the clients must not see which."""
    return broker_factory("--poller", request.param)


@pytest.fixture
def raw_ws() -> Iterator[Callable[..., Any]]:
    """Open raw-socket WebSocket clients (tests/wsraw.py); all are closed at teardown."""
    from tests.wsraw import RawWs

    opened: list[RawWs] = []

    def open_ws(broker: BrokerProcess, **kw: Any) -> RawWs:
        c = RawWs(broker.port, **kw)
        opened.append(c)
        return c

    yield open_ws
    for c in opened:
        c.close()


REDIS = shutil.which("redis-server")
assert REDIS, "redis-server is needed (Debian package redis-server; make test installs it)"


class RedisServer:
    """A real redis-server on a free port, no persistence, stopped by PID. With `password` it
    requires AUTH; with `tls` (a client context trusting `args`' certificate) it speaks TLS only
    (pass the server's --tls-* options in `args`)."""

    def __init__(
        self,
        port: int | None = None,
        args: tuple[str, ...] = (),
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.port = port or free_port()
        self.args = args
        self.password = password
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        log = open(ARTIFACTS / f"redis-{self.port}.log", "ab")  # noqa: SIM115
        port = ["--port", str(self.port)]
        if self.tls:
            port = ["--port", "0", "--tls-port", str(self.port)]
        cmd = [REDIS, *port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        if self.password:
            cmd += ["--requirepass", self.password]
        self.proc = subprocess.Popen(
            [*cmd, "--daemonize", "no", *self.args], stdout=log, stderr=log, cwd=ARTIFACTS
        )
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if self.call("PING") == b"PONG":
                    return self
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def call(self, *args: Any) -> Any:
        """One command over a fresh connection (tests only)."""
        s = socket.create_connection(("127.0.0.1", self.port), timeout=2)
        if self.tls is not None:
            try:
                s = self.tls.wrap_socket(s, server_hostname="127.0.0.1")
            except OSError:
                s.close()
                raise
        with s:
            wanted = 1
            if self.password:
                s.sendall(hiredis.pack_command(("AUTH", self.password)))
                wanted = 2
            s.sendall(hiredis.pack_command(args))
            reader = hiredis.Reader()
            replies: list[Any] = []
            while len(replies) < wanted:
                reply = reader.gets()
                if reply is not False:
                    replies.append(reply)
                    continue
                data = s.recv(65536)
                if not data:
                    raise OSError("closed")
                reader.feed(data)
            return replies[-1]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    """A fresh redis-server for one test (the --redis cluster tests, the observability ones)."""
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def servers() -> Iterator[Callable[[], Server]]:
    """Servers whose loop never runs: the test calls the flush itself on connections it made
    over real loopback sockets. Everything is closed at teardown."""
    made: list[Server] = []

    def make() -> Server:
        srv = Server(dataclasses.replace(Config(), port=0), fd_limit=1024)
        made.append(srv)
        return srv

    yield make
    for srv in made:
        for conn in srv._connections():
            conn.abort(Closed.SHUTDOWN)
        srv.listener.close()
        srv.loop.close()
