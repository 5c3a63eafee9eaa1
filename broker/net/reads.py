"""One receive buffer, reused by every read of its owner.

`sock.recv(n)` allocates n bytes before it reads, then shrinks them to what came. With the broker's
256 KiB reads (--read-size) that allocation is above malloc's mmap threshold whenever the heap has
no room for it, so a read of a 100-byte publish could cost an mmap, the page faults of touching
it and a munmap; whether it did depended on the heap's layout, so an unrelated change moved
W1's connection rate by ~10% (docs/benchmarks.md, "Issue 9, fourth pass"). `recv_into` this
buffer and a copy of the n bytes that came allocates only those. The copy is never shared: the
buffer is overwritten by the next read of the same owner (one loop thread per owner)."""

from __future__ import annotations

import socket


class ReadBuffer:
    __slots__ = ("buf", "size", "view")

    def __init__(self, size: int) -> None:
        self.size = size
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)

    def recv(self, sock: socket.socket) -> bytes:
        """One `recv` of at most `size` bytes (b"" at EOF); raises what `sock.recv` raises."""
        n = sock.recv_into(self.buf)
        return self.view[:n].tobytes()
