"""The loop's pollers (broker/net/pollers.py): epoll, poll and select report the same events for
the same socket states, and `--poller select` turns away fds it cannot watch without falling over.

The end-to-end checks that each poller serves a real broker are the `polled_broker` tests
(tests/test_protocol.py, tests/net/test_rfc6455.py) and the `poller`-parametrized ones in
tests/net/test_loop.py and tests/net/test_tls.py.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from broker.net.pollers import FD_SETSIZE, POLLERS, FdOutOfRangeError, Poller, open_poller
from tests.conftest import BrokerProcess
from tests.wsraw import RawWs

IN, OUT, RDHUP, HUP = select.EPOLLIN, select.EPOLLOUT, select.EPOLLRDHUP, select.EPOLLHUP


@pytest.fixture(params=POLLERS)
def poller(request: pytest.FixtureRequest) -> Iterator[Poller]:
    p, _ = open_poller(request.param)
    yield p
    p.close()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    yield a, b
    a.close()
    b.close()


def events(p: Poller, timeout: float = 0.5) -> dict[int, int]:
    return dict(p.poll(timeout, 64))


def test_same_events_for_the_same_socket_states(
    poller: Poller, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair
    fd = a.fileno()
    poller.register(fd, IN | RDHUP)
    assert events(poller, 0) == {}  # nothing to read, not watching for writability
    b.send(b"x")
    assert events(poller)[fd] & IN
    poller.modify(fd, IN | OUT | RDHUP)
    assert events(poller)[fd] & (IN | OUT) == IN | OUT
    assert a.recv(10) == b"x"
    poller.modify(fd, OUT)
    assert events(poller)[fd] & (IN | OUT) == OUT
    poller.modify(fd, IN | RDHUP)
    b.close()  # the peer hangs up: readable everywhere, and recv says EOF
    assert events(poller)[fd] & IN
    assert a.recv(10) == b""
    poller.unregister(fd)
    assert events(poller, 0) == {}


def test_registration_errors_are_oserrors_like_epolls(
    poller: Poller, pair: tuple[socket.socket, socket.socket]
) -> None:
    fd = pair[0].fileno()
    with pytest.raises(OSError):
        poller.modify(fd, IN)
    with pytest.raises(OSError):
        poller.unregister(fd)
    poller.register(fd, IN)
    with pytest.raises(OSError):
        poller.register(fd, IN)
    poller.unregister(fd)


def test_timeout_waits_and_returns_nothing(poller: Poller) -> None:
    t0 = time.monotonic()
    assert poller.poll(0.05, 64) == []
    assert time.monotonic() - t0 >= 0.04


def test_select_refuses_fds_it_cannot_watch() -> None:
    p, ceiling = open_poller("select")
    assert ceiling == FD_SETSIZE == 1024
    with pytest.raises(FdOutOfRangeError, match=r"fd 1024: .*FD_SETSIZE \(1024\).*--poller epoll"):
        p.register(1024, IN)
    for name in ("epoll", "poll"):
        other, ceiling = open_poller(name)
        assert ceiling > 1 << 20
        other.close()


def eof_count(socks: list[socket.socket], seen: set[int], wait: float) -> int:
    """How many of `socks` the broker has closed (EOF), waiting until none more for `wait` s."""
    p = select.poll()
    for s in socks:
        p.register(s, select.POLLIN)
    deadline = time.monotonic() + 20
    quiet_since = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - quiet_since < wait:
        for fd, _ in p.poll(100):
            p.unregister(fd)
            seen.add(fd)
            quiet_since = time.monotonic()
    return len(seen)


def test_select_closes_connections_over_fd_setsize_and_keeps_serving(
    broker_factory: Callable[..., BrokerProcess], raw_ws: Callable[..., RawWs]
) -> None:
    """1,100 TCP connections to a --poller select broker: the ones accepted on fds >= 1024 are
    closed at once (counted, logged once); the rest stay; the broker goes on serving."""
    broker = broker_factory("--poller", "select", "--handshake-timeout", "60")
    socks: list[socket.socket] = []
    try:
        for _ in range(1100):
            socks.append(socket.create_connection(("127.0.0.1", broker.port), timeout=5))
        refused: set[int] = set()
        n = eof_count(socks, refused, wait=1.0)
        assert n >= 1100 - FD_SETSIZE  # at least every connection past fd 1023
        assert n <= 1100 - 900  # and the broker held the ones it could watch
        for s in socks:
            if s.fileno() in refused:
                assert s.recv(10) == b""  # closed, without a word: nothing was sent to it
        held = [s for s in socks if s.fileno() not in refused]
        for s in held[:50]:  # make room below fd 1024 for the scrape and a client
            s.close()
        deadline = time.monotonic() + 10
        turned_away = 0
        while True:
            try:
                closed = broker.metric(
                    "broker_connections_closed_total", 'reason="poller_fd_limit"'
                )
                break
            except OSError:  # the broker had not seen our closes yet: the scrape got fd >= 1024
                turned_away += 1
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert closed == n + turned_away
        c = raw_ws(broker)
        c.send_json({"op": "subscribe", "topic": "t", "id": 1})
        ack = c.recv_json()
        assert (ack["op"], ack["id"]) == ("ack", 1)
        c.send_json({"op": "publish", "topic": "t", "data": "still here"})
        assert c.recv_json()["data"] == "still here"
        assert broker.log().count("cannot watch fd") == 1
    finally:
        for s in socks:
            s.close()
