"""A bug while serving one connection closes that connection with 1011 and nothing else.

The broker runs in this process (its loop in a thread) so that a fault can be injected into the
router; the sockets, frames and clients are real.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from broker.config import Config
from broker.errors import Closed
from broker.pubsub.http_api import HttpApi
from broker.pubsub.router import Router
from broker.server import Server
from tests.wsraw import RawWs


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server(dataclasses.replace(Config(), port=0), fd_limit=1024)
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            srv.loop.run_once()

    srv.loop.call_later(0.05, lambda: None)  # keeps epoll_wait short so `stop` is seen
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield srv
    stop.set()
    srv.loop.wake()
    thread.join(5)
    for conn in srv._connections():
        conn.abort(Closed.SHUTDOWN)
    srv.listener.close()
    srv.loop.close()


def test_exception_closes_only_that_connection(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    real: Callable[..., Any] = Router.handle

    def faulty(self: Router, session: Any, payload: Any, *rest: Any) -> None:
        if "boom" in str(payload):
            raise RuntimeError("injected bug")
        real(self, session, payload, *rest)

    monkeypatch.setattr(Router, "handle", faulty)
    port = server.listener.address[1]
    victim, bystander = RawWs(port), RawWs(port)
    try:
        bystander.send_json({"op": "subscribe", "topic": "t", "id": 1})
        assert bystander.recv_json().items() >= {"op": "ack", "id": 1}.items()
        victim.send_json({"op": "publish", "topic": "boom", "data": 1})
        assert victim.expect_close() == (1011, "internal error")
        assert victim.at_eof()
        bystander.send_json({"op": "publish", "topic": "t", "data": "still here", "id": 2})
        replies = [bystander.recv_json(), bystander.recv_json()]
        assert {"op": "message", "topic": "t", "data": "still here", "seq": 1} in replies
        assert server.stats.internal_errors == 1
    finally:
        victim.close()
        bystander.close()


def test_exception_in_an_http_route_answers_500(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    def faulty(self: HttpApi, req: Any) -> None:
        raise RuntimeError("injected bug")

    monkeypatch.setattr(HttpApi, "handle", faulty)
    port = server.listener.address[1]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
        response = b""
        while chunk := s.recv(4096):
            response += chunk
    assert response.startswith(b"HTTP/1.1 500 ")
    assert server.stats.internal_errors == 1
    deadline = time.monotonic() + 5  # counted once the broker sees our side close too
    while server.stats.closed[Closed.INTERNAL_ERROR] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.stats.closed[Closed.INTERNAL_ERROR] == 1
