"""Server-to-client WebSocket frames built once, as complete bytes (RFC 6455 section 5.2).

Fan-out encodes each message once and queues the same bytes object to every subscriber, so the
frame must be complete and final here: FIN set, unmasked (servers never mask, section 5.1), no
extensions (permessage-deflate is not negotiated: it would make every copy different).
Client frames are parsed by wire.inbound; this module only writes.
"""

from __future__ import annotations

import struct

OP_TEXT = 0x1
OP_BINARY = 0x2

_LEN16 = struct.Struct("!BBH")
_LEN64 = struct.Struct("!BBQ")


# The 2-byte headers of final text frames of 0..125 bytes, made once (messages.message).
TEXT_HEADERS = tuple(bytes((0x80 | OP_TEXT, n)) for n in range(126))


def header(opcode: int, n: int) -> bytes:
    """The header of a final, unmasked frame of `n` payload bytes."""
    first = 0x80 | opcode
    if n < 126:
        return bytes((first, n))
    if n < 0x10000:
        return _LEN16.pack(first, 126, n)
    return _LEN64.pack(first, 127, n)


def frame(opcode: int, payload: bytes) -> bytes:
    """One final, unmasked frame carrying `payload`."""
    return header(opcode, len(payload)) + payload
