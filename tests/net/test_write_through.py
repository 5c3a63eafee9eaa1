"""Write-through (Router.handle_batch's `lone`, Server.lone_read): a read that carried one
message and was the loop's only event has its deliveries written at once, during the fan-out;
any other read leaves them to the end-of-iteration flush, which writes each buffer once. Either
way each subscriber gets the same bytes in the same order. Real loopback sockets, the server's
connections driven in this process, with the C speedup and with its Python twin."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any

import pytest

from broker.net import connection as connection_module
from broker.net.connection import Connection
from broker.server import Server
from tests.loopback import Pairs, after
from tests.wsraw import OP_TEXT, RawWs, encode_frame

Sub = tuple[Connection, socket.socket]


@pytest.fixture(params=["c", "python"])
def twin(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "python":
        monkeypatch.setattr(connection_module, "_speedups", None)
    else:
        assert connection_module._speedups is not None, "the C speedup is not in use"
    return str(request.param)


class World:
    """A server whose loop never runs, a publisher and three subscribers of "t"."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.pairs = Pairs(server)
        self.pub, self.pub_peer = self.pairs.open()
        self.subs: list[Sub] = [self.pairs.open() for _ in range(3)]
        for conn, _ in self.subs:
            assert server.router.subscribe(conn, "t")

    def read(self, data: bytes, ready: int = 1) -> None:
        """The publisher's read of `data`, in an iteration whose wait returned `ready` events."""
        self.server.loop.ready = ready
        self.pub._received(data)

    def end_iteration(self) -> None:
        """The end of the iteration, and of the next if the first held deliveries back."""
        for _ in range(2):
            self.server._end_of_iteration()
            if not self.server.router.dirty:
                return
        raise AssertionError("deliveries still held back")


@pytest.fixture
def world(servers: Callable[[], Server]) -> Any:
    w = World(servers())
    yield w
    w.pairs.close()


def _publish(data: str, req_id: int | None = None) -> bytes:
    body: dict[str, Any] = {"op": "publish", "topic": "t", "data": data}
    if req_id is not None:
        body["id"] = req_id
    return encode_frame(OP_TEXT, json.dumps(body).encode())


def _next(peer: socket.socket) -> dict[str, Any]:
    peer.settimeout(5)
    got: dict[str, Any] = RawWs.adopt(peer).recv_json()
    return got


def _data(peer: socket.socket, n: int) -> list[Any]:
    ws = RawWs.adopt(peer)  # one reader for all n: frames sent together may share a recv
    peer.settimeout(5)
    return [ws.recv_json()["data"] for _ in range(n)]


def test_a_lone_publish_is_written_before_the_end_of_the_iteration(world: World, twin: str) -> None:
    stats = world.server.stats
    world.read(_publish("one"))
    assert world.server.router.dirty == []  # nothing left to the flush
    assert stats.sends == len(world.subs)
    assert sum(stats.queue_age) == len(world.subs)  # timed as the flush times its buffers
    for _, peer in world.subs:
        assert _next(peer) == {"op": "message", "topic": "t", "data": "one", "seq": 1}
    world.end_iteration()
    assert stats.sends == len(world.subs)
    for _, peer in world.subs:
        assert after(peer) == "nothing"


@pytest.mark.parametrize(
    "why", ["two messages in the read", "another event", "a full read", "a hold in progress"]
)
def test_any_other_read_leaves_its_deliveries_to_the_flush(
    world: World, twin: str, why: str
) -> None:
    server = world.server
    two = why == "two messages in the read"
    if why == "a full read":
        server.busy = True  # as on_readable sets it when a recv fills --read-size
    elif why == "a hold in progress":
        server.held_since = server.loop.now
    sends = server.stats.sends
    world.read(
        _publish("one") + (_publish("two") if two else b""),
        ready=2 if why == "another event" else 1,
    )
    for _, peer in world.subs:
        assert after(peer) == "nothing"
    assert len(server.router.dirty) == len(world.subs)
    world.end_iteration()
    assert server.stats.sends == sends + len(world.subs)  # one send each, both frames in it
    for _, peer in world.subs:
        assert _data(peer, 2 if two else 1) == (["one", "two"] if two else ["one"])


def test_a_buffer_with_something_queued_gets_the_message_behind_it(world: World, twin: str) -> None:
    first, first_peer = world.subs[0]
    note = encode_frame(OP_TEXT, b'{"op":"note"}', mask=False)
    world.server.router.reply(first, note)
    world.read(_publish("one"))
    assert world.server.router.dirty == [first]
    assert after(first_peer) == "nothing"
    for _, peer in world.subs[1:]:
        assert _next(peer)["data"] == "one"
    world.end_iteration()
    ws = RawWs.adopt(first_peer)
    first_peer.settimeout(5)
    assert [ws.recv_json()["op"] for _ in range(2)] == ["note", "message"]


def test_a_publisher_of_its_own_topic_gets_the_message_then_the_ack(
    world: World, twin: str
) -> None:
    assert world.server.router.subscribe(world.pub, "t")
    world.read(_publish("mine", req_id=7))
    world.end_iteration()
    ws = RawWs.adopt(world.pub_peer)
    world.pub_peer.settimeout(5)
    message, ack = ws.recv_json(), ws.recv_json()
    assert (message["op"], message["data"]) == ("message", "mine")
    assert ack == {"op": "ack", "id": 7, "delivered": 4}
