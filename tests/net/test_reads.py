"""Reads into one reused buffer (net/reads.py): each read's bytes are a copy that later reads do
not touch, and a small read allocates about its own size, not --read-size (256 KiB, which malloc
could serve with an mmap, page faults and a munmap per read). Real loopback sockets."""

from __future__ import annotations

import socket
import tracemalloc
from collections.abc import Callable, Iterator

import pytest

from broker.net.connection import Connection
from broker.net.reads import ReadBuffer
from broker.server import Server
from tests.loopback import Pairs
from tests.wsraw import OP_TEXT, RawWs, encode_frame


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.settimeout(5)
    yield a, b
    a.close()
    b.close()


def _peak(read: Callable[[], object]) -> int:
    """The most memory `read` had allocated at once (tracemalloc sees every Python allocation)."""
    tracemalloc.start()
    try:
        read()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_each_read_is_a_copy_later_reads_leave_alone(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    reader = ReadBuffer(64)
    b.sendall(b"first")
    first = reader.recv(a)
    b.sendall(b"SECOND!")
    second = reader.recv(a)
    assert (first, second) == (b"first", b"SECOND!")
    assert type(first) is bytes
    b.sendall(bytes(range(100)))
    assert reader.recv(a) == bytes(range(64))  # at most `size`
    assert reader.recv(a) == bytes(range(64, 100))
    b.close()
    assert reader.recv(a) == b""  # EOF


def test_a_small_read_allocates_its_size_not_the_buffer(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    reader = ReadBuffer(256 * 1024)
    b.sendall(b"x" * 100)
    peak = _peak(lambda: reader.recv(a))
    assert peak < 4096, peak
    b.sendall(b"x" * 100)
    assert _peak(lambda: a.recv(256 * 1024)) > 256 * 1024  # what recv(n) would have cost


def test_a_connection_reads_a_publish_without_a_read_size_allocation(
    servers: Callable[[], Server],
) -> None:
    server = servers()
    pairs = Pairs(server)
    try:
        pub, peer = pairs.open()
        sub, sub_peer = pairs.open()
        assert server.router.subscribe(sub, "t")
        peer.sendall(encode_frame(OP_TEXT, b'{"op":"publish","topic":"t","data":"x"}'))
        assert server.config.read_size >= 64 * 1024
        peak = _peak(lambda: _read_once(pub))
        assert peak < 16 * 1024, peak
        server._end_of_iteration()
        sub_peer.settimeout(5)
        assert RawWs.adopt(sub_peer).recv_json()["data"] == "x"
    finally:
        pairs.close()


def _read_once(conn: Connection) -> None:
    conn.server.loop.ready = 2  # not alone: delivered by the end-of-iteration flush
    conn.on_readable()
