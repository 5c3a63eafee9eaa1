"""What the router knows of a connection: its encoding, its patterns and its outbound buffer.

`net.connection.Connection` extends `Session`; the router and the HTTP API only see this part, so
routing stays sans-IO. `out` holds frames not yet written to the socket: the router appends to it
and the loop flushes it once per iteration. It is a bytearray, not a list of frames, so that a
flush is one `send` of one buffer and a partial send is one `del out[:n]` (O(1) in CPython).
"""

from __future__ import annotations

from broker.wire.codec import Encoding


class Session:
    __slots__ = ("encoding", "out", "patterns", "rate_at", "rate_tokens", "slow")

    def __init__(self, encoding: Encoding = Encoding.JSON) -> None:
        self.encoding = encoding
        self.out = bytearray()
        self.patterns: set[str] | None = None  # None until the first subscribe: idle memory
        self.slow = False  # over the high-water mark since the last drain
        self.rate_tokens = 0.0
        self.rate_at = 0.0
