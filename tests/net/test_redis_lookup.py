"""The Redis link looks a host name up off the loop, and the loop hands results back safely.

DNS cannot be broken on a test machine, so the stall is made at the seam the link offers: its
`resolve` callable, here one that blocks on a `threading.Event` per call. Everything else is
real: the loop (run in a thread, as the broker runs it), a redis-server, sockets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from broker.config import Config
from broker.metrics import Stats
from broker.net.loop import EventLoop
from broker.net.redis import AddrInfo, RedisLink, is_ip_literal
from broker.pubsub.router import Router
from tests.conftest import RedisServer

TIMEOUT = 0.5  # --redis-timeout of the link under test


class StallingResolver:
    """Call n (from 1) blocks until `release(n, answer)`; calls in `immediate` answer at once."""

    def __init__(self, immediate: Callable[[int], Sequence[AddrInfo] | None]) -> None:
        self.immediate = immediate
        self.lock = threading.Lock()
        self.calls: list[float] = []  # when each call came, monotonic
        self.threads: list[threading.Thread] = []  # the thread that made each call
        self.gates: dict[int, threading.Event] = {}
        self.answers: dict[int, Sequence[AddrInfo]] = {}

    def __call__(self, host: str, port: int) -> Sequence[AddrInfo]:
        with self.lock:
            self.calls.append(time.monotonic())
            self.threads.append(threading.current_thread())
            n = len(self.calls)
            gate = self.gates.setdefault(n, threading.Event())
        answer = self.immediate(n)
        if answer is not None:
            return answer
        gate.wait(30)  # bounded: a forgotten gate cannot outlive the test run for long
        return self.answers[n]

    def release(self, n: int, answer: Sequence[AddrInfo]) -> None:
        with self.lock:
            self.answers[n] = answer
            gate = self.gates.setdefault(n, threading.Event())
        gate.set()

    def release_all(self, answer: Sequence[AddrInfo]) -> None:
        for n in range(1, 100):
            self.release(n, answer)


def address(port: int) -> list[AddrInfo]:
    return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port))]


class LoopThread:
    """The loop running in a thread until `stop` (a short timer keeps each wait short)."""

    def __init__(self, loop: EventLoop) -> None:
        self.loop = loop
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stopping.is_set():
            self.loop.run_once()

    def start(self) -> None:
        self.loop.call_later(0, self._keepalive)
        self.thread.start()

    def _keepalive(self) -> None:
        if not self.stopping.is_set():
            self.loop.call_later(0.05, self._keepalive)

    def stop(self) -> None:
        self.stopping.set()
        self.loop.wake()
        self.thread.join(5)
        assert not self.thread.is_alive()


class Echo:
    """A second socket served by the same loop: answers every byte with the same byte."""

    def __init__(self, loop: EventLoop) -> None:
        self.ours, self.theirs = socket.socketpair()
        self.ours.setblocking(False)
        self.theirs.settimeout(1.0)
        loop.register(self.ours.fileno(), self, select.EPOLLIN)

    def on_event(self, mask: int) -> None:
        with contextlib.suppress(BlockingIOError):
            self.ours.send(self.ours.recv(4096))

    def round_trip(self) -> float:
        start = time.monotonic()
        self.theirs.sendall(b"x")
        assert self.theirs.recv(1) == b"x"
        return time.monotonic() - start


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@pytest.fixture
def make_link() -> Iterator[Callable[..., tuple[RedisLink, EventLoop]]]:
    """A RedisLink on its own loop (built before the loop thread starts: the loop's timers are
    touched only by its own thread afterwards); all closed at teardown."""
    made: list[tuple[RedisLink, EventLoop]] = []

    def make(url: str, resolve: Callable[[str, int], Sequence[AddrInfo]]) -> Any:
        config = dataclasses.replace(Config(), redis=url, redis_timeout=TIMEOUT)
        stats = Stats()
        loop = EventLoop(stats, 1024)
        link = RedisLink(config, loop, Router(config, stats), stats, resolve=resolve)
        made.append((link, loop))
        return link, loop

    yield make
    for link, loop in made:
        link.close()
        loop.close()


def test_the_loop_serves_while_a_lookup_stalls_and_a_late_answer_is_ignored(
    redis: RedisServer, make_link: Callable[..., tuple[RedisLink, EventLoop]]
) -> None:
    # A listener that must never be connected to: the address the late answer names.
    trap = socket.create_server(("127.0.0.1", 0))
    trap.setblocking(False)
    trap_port = trap.getsockname()[1]
    # Calls 1 and 2 stall; a third (only if attempt 2 timed out too) finds Redis at once.
    resolver = StallingResolver(lambda n: address(redis.port) if n >= 3 else None)
    link, loop = make_link(f"redis://redis.test:{redis.port}/0", resolver)
    echo = Echo(loop)
    runner = LoopThread(loop)
    runner.start()
    try:
        wait_until(lambda: len(resolver.calls) >= 1, 5, "the first attempt never looked up")
        # Attempt 1 stalls: the loop still serves another socket, promptly, many times over.
        trips = []
        while len(resolver.calls) < 2 and len(trips) < 200:  # ~TIMEOUT + 1 s tick + backoff
            trips.append(echo.round_trip())
            time.sleep(0.01)
        assert len(trips) >= 10 and max(trips) < 0.5, trips
        assert not link.up
        # It timed out after --redis-timeout (seen by the 1 s tick) and attempt 2 looked up anew.
        wait_until(lambda: len(resolver.calls) >= 2, 5, "no second attempt")
        waited = resolver.calls[1] - resolver.calls[0]
        assert TIMEOUT <= waited < TIMEOUT + 3, waited
        # Attempt 1's answer now arrives, late: it names the trap, which must see no connection.
        resolver.release(1, address(trap_port))
        resolver.threads[0].join(5)
        assert not resolver.threads[0].is_alive()
        wait_until(lambda: not loop.from_threads, 5, "the late answer was never handed over")
        time.sleep(0.1)
        with pytest.raises(BlockingIOError):
            trap.accept()
        # Attempt 2's answer (or 3's, had 2 timed out meanwhile) is used: Redis is reached.
        resolver.release(2, address(redis.port))
        wait_until(lambda: link.up, 5, "the link never came up")
        with pytest.raises(BlockingIOError):
            trap.accept()
        assert echo.round_trip() < 0.5
    finally:
        runner.stop()
        resolver.release_all(address(trap_port))
        trap.close()
        echo.ours.close()
        echo.theirs.close()


def test_closing_does_not_wait_for_a_stalled_lookup(
    make_link: Callable[..., tuple[RedisLink, EventLoop]],
) -> None:
    """close() returns at once; the answer that comes after the loop closed is dropped quietly
    (an exception in the lookup thread would fail the test: warnings are errors)."""
    resolver = StallingResolver(lambda n: None)
    link, loop = make_link("redis://redis.test:6379/0", resolver)
    wait_until(lambda: len(resolver.calls) == 1, 5, "no lookup")
    threads = list(resolver.threads)
    assert len(threads) == 1 and threads[0].daemon and threads[0].name == "redis-lookup"
    start = time.monotonic()
    link.close()
    loop.close()
    assert time.monotonic() - start < 0.5
    resolver.release(1, address(1))
    for thread in threads:
        thread.join(5)
        assert not thread.is_alive()


def test_an_ip_literal_is_not_looked_up(
    redis: RedisServer, make_link: Callable[..., tuple[RedisLink, EventLoop]]
) -> None:
    def refuse(host: str, port: int) -> Sequence[AddrInfo]:
        raise AssertionError(f"looked up {host}")

    link, loop = make_link(redis.url, refuse)
    assert link.sock is not None  # connecting already, in the constructor's call
    deadline = time.monotonic() + 5
    while not link.up and time.monotonic() < deadline:
        loop.call_later(0.05, lambda: None)
        loop.run_once()
    assert link.up
    assert [is_ip_literal(h) for h in ("10.0.0.5", "::1", "fe80::1%eth0", "redis", "a.b")] == [
        True,
        True,
        True,
        False,
        False,
    ]


def closed_port() -> int:
    """A loopback port nothing listens on: a connect to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_until(loop: EventLoop, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        loop.call_later(0.02, lambda: None)
        loop.run_once()


def test_the_addresses_of_a_name_are_tried_in_order_within_one_attempt(
    redis: RedisServer, make_link: Callable[..., tuple[RedisLink, EventLoop]]
) -> None:
    """Redis bound to 127.0.0.1 only, the name giving ::1 first (as `localhost` may): the
    refused addresses (and an IPv6 one, refused or not openable here) pass to the next."""
    refused = closed_port()
    ipv6 = (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("::1", refused, 0, 0))
    answer = [ipv6, *address(refused), *address(redis.port)]
    resolver = StallingResolver(lambda n: answer)
    link, loop = make_link(f"redis://redis.test:{redis.port}/0", resolver)
    run_until(loop, lambda: link.up, 5)
    assert link.up
    assert len(resolver.calls) == 1  # one lookup: one attempt, no backoff in between


def test_an_attempt_whose_every_address_is_refused_fails_and_is_retried(
    make_link: Callable[..., tuple[RedisLink, EventLoop]],
) -> None:
    resolver = StallingResolver(lambda n: [*address(closed_port()), *address(closed_port())])
    link, loop = make_link("redis://redis.test:6379/0", resolver)
    run_until(loop, lambda: len(resolver.calls) >= 2, 8)  # the next attempt, after a backoff
    assert len(resolver.calls) >= 2
    assert not link.up
