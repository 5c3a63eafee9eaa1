"""Client-to-server WebSocket frames, parsed straight out of the receive buffer (RFC 6455 s. 5).

Theory of operation: `parse` takes the bytes of one `recv` (plus the unfinished frame left over
from the previous ones) and returns, in one batch, the messages and pings of every complete frame
in them, how many bytes it consumed, and why it stopped: the bytes ran out (the caller keeps the
rest), the peer's close frame, or a violation with the close code to send. It is a pure function
of its arguments: a connection with nothing pending holds no parser object at all, and one with a
fragmented message in progress holds a small `Message`.

The common case costs a few comparisons: a complete, final, masked text or binary frame with no
reserved bits and a 7- or 16-bit length is unmasked in one step and decoded (in C when the
speedup is built: `_speedups.frames` takes such frames and stops at the first other one, which
the loop below parses). Everything else goes through the same loop's slower branches, which
apply wsproto's rules one by one, in wsproto's order, with wsproto's close codes
(tests/wire/test_inbound.py checks that the two agree on generated frame sequences cut at every
byte):

* 1002: an unknown opcode, a fragmented or over-125-byte control frame, a length not written in
  its shortest form or with the 64-bit MSB set, reserved bits (no extension is negotiated), an
  unmasked frame, a continuation outside a message or a new message inside one, a close frame
  with a 1-byte payload or an invalid code.
* 1007: text (or a close reason) that is not UTF-8, checked per frame as the fragments arrive.
* 1009: a data frame whose header announces more than `limit` bytes (counting the fragments
  already received), refused as soon as the header is in, before any of its payload is read.

Pongs are consumed and dropped (the broker sends no pings it waits on beyond "any input").
"""

from __future__ import annotations

import codecs
from typing import NamedTuple

from broker.speedups import load

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
_OPCODES = frozenset((OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG))

PROTOCOL_ERROR = 1002
INVALID_DATA = 1007
TOO_BIG = 1009
NO_STATUS = 1005  # a close frame without a code (section 7.4.1)

# Close codes a peer may send (RFC 6455 7.4.1 and 7.4.2, as wsproto accepts them): the defined
# ones except those reserved for local use (1005, 1006, 1015), and anything in 3000-4999.
_DEFINED_CODES = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013))

_XOR = [bytes(a ^ b for a in range(256)) for b in range(256)]
_from_bytes = int.from_bytes
_utf8 = codecs.getincrementaldecoder("utf-8")

# The C twin of the common case below (wire/_speedups.c), None when not built or turned off.
_speedups = load("broker.wire._speedups")

# Payloads up to this size are unmasked with one integer XOR; larger ones by the four
# `bytes.translate` lanes (measured: the integer path wins below ~0.5 KB, loses 4x at 64 KB).
_SMALL = 512


class Ping(NamedTuple):
    payload: bytes


class PeerClose(NamedTuple):
    """The peer's close frame: its code (1005 when it sent none) and reason."""

    code: int
    reason: str


class Violation(NamedTuple):
    """A frame the broker refuses: the close code to answer with, and why."""

    code: int
    reason: str


class Message:
    """A fragmented message in progress: its kind, the parts so far, and their size in bytes."""

    __slots__ = ("decoder", "parts", "size")

    def __init__(self, text: bool) -> None:
        self.decoder: codecs.IncrementalDecoder | None = _utf8() if text else None
        self.parts: list[str] | list[bytes] = []
        self.size = 0


Event = str | bytes | Ping
End = PeerClose | Violation


def unmask(data: bytes, key_at: int, length: int) -> bytes:
    """The `length` bytes after the 4-byte masking key at `key_at`, unmasked (section 5.3)."""
    start = key_at + 4
    if length <= _SMALL:
        key = data[key_at:start] * ((length >> 2) + 1)
        value = _from_bytes(data[start : start + length], "little") ^ _from_bytes(
            key[:length], "little"
        )
        return value.to_bytes(length, "little")
    out = bytearray(data[start : start + length])
    for lane in range(4):
        out[lane::4] = out[lane::4].translate(_XOR[data[key_at + lane]])
    return bytes(out)


def parse(
    data: bytes, message: Message | None, limit: int, out: list[Event]
) -> tuple[int, int, Message | None, End | None]:
    """Parse the complete frames at the start of `data`; append their events to `out`.

    Returns (consumed, need, message, end): `consumed` bytes were used; if `end` is None the rest
    is an unfinished frame, of which `need` bytes in all (counted from `consumed`) must be in
    before parsing can progress (0 while its header is incomplete: any byte may finish it).
    `message` is the fragmented message in progress. `end` is the peer's close frame (nothing
    after it is parsed) or a violation (nothing after it means anything).
    """
    pos = 0
    n = len(data)
    while n - pos >= 2:
        if message is None and _speedups is not None:
            # The common case in C, up to the first frame that is not (parsed below).
            pos = _speedups.frames(data, pos, limit, out)
            if n - pos < 2:
                break
        b0 = data[pos]
        b1 = data[pos + 1]
        length = b1 & 0x7F
        if 0x81 <= b0 <= 0x82 and b1 & 0x80 and message is None and length <= 126:
            # The common case: a final, masked, unfragmented text or binary frame.
            if length == 126:
                if n - pos < 4:
                    return pos, 0, message, None
                length = (data[pos + 2] << 8) | data[pos + 3]
                if length <= 125:
                    return pos, 0, message, Violation(PROTOCOL_ERROR, "length not minimal")
                key_at = pos + 4
            else:
                key_at = pos + 2
            if n - key_at < 4:
                return pos, 0, message, None
            if length > limit:
                return pos, 0, message, Violation(TOO_BIG, f"message over {limit} bytes")
            end = key_at + 4 + length
            if end > n:
                return pos, end - pos, message, None
            payload = unmask(data, key_at, length)
            pos = end
            if b0 == 0x82:
                out.append(payload)
                continue
            try:
                out.append(payload.decode())
            except UnicodeDecodeError as exc:
                return pos, 0, message, Violation(INVALID_DATA, str(exc))
            continue

        # Anything else, checked in wsproto's order.
        opcode = b0 & 0x0F
        if opcode not in _OPCODES:
            return pos, 0, message, Violation(PROTOCOL_ERROR, f"invalid opcode {opcode:#x}")
        control = opcode & 0x8
        fin = b0 & 0x80
        if control and not fin:
            return pos, 0, message, Violation(PROTOCOL_ERROR, "fragmented control frame")
        if control and length > 125:
            return pos, 0, message, Violation(PROTOCOL_ERROR, "control frame over 125 bytes")
        key_at = pos + 2
        if length == 126:
            if n - key_at < 2:
                return pos, 0, message, None
            length = (data[key_at] << 8) | data[key_at + 1]
            key_at += 2
            if length <= 125:
                return pos, 0, message, Violation(PROTOCOL_ERROR, "length not minimal")
        elif length == 127:
            if n - key_at < 8:
                return pos, 0, message, None
            length = _from_bytes(data[key_at : key_at + 8], "big")
            key_at += 8
            if length <= 0xFFFF:
                return pos, 0, message, Violation(PROTOCOL_ERROR, "length not minimal")
            if length >> 63:
                return pos, 0, message, Violation(PROTOCOL_ERROR, "length has its MSB set")
        if b0 & 0x70:
            return pos, 0, message, Violation(PROTOCOL_ERROR, "reserved bits set")
        if not b1 & 0x80:
            return pos, 0, message, Violation(PROTOCOL_ERROR, "unmasked client frame")
        if n - key_at < 4:
            return pos, 0, message, None
        if not control:
            size = length + (message.size if message is not None and opcode == OP_CONT else 0)
            if size > limit:
                return pos, 0, message, Violation(TOO_BIG, f"message over {limit} bytes")
        end = key_at + 4 + length
        if end > n:
            return pos, end - pos, message, None
        payload = unmask(data, key_at, length)
        pos = end

        if control:
            if opcode == OP_PING:
                out.append(Ping(payload))
            elif opcode == OP_CLOSE:
                return pos, 0, message, _close(payload)
            continue  # a pong

        # A data frame: a fragment, or a whole message arriving while one is in progress.
        if opcode == OP_CONT:
            if message is None:
                return pos, 0, message, Violation(PROTOCOL_ERROR, "unexpected continuation")
        elif message is not None:
            return pos, 0, message, Violation(PROTOCOL_ERROR, "expected a continuation")
        elif fin:  # a final text or binary frame with a 64-bit length
            if opcode == OP_BINARY:
                out.append(payload)
                continue
            try:
                out.append(payload.decode())
            except UnicodeDecodeError as exc:
                return pos, 0, message, Violation(INVALID_DATA, str(exc))
            continue
        else:
            message = Message(opcode == OP_TEXT)
        decoder = message.decoder
        if decoder is None:
            message.parts.append(payload)  # type: ignore[arg-type]
        else:
            try:
                message.parts.append(decoder.decode(payload, bool(fin)))  # type: ignore[arg-type]
            except UnicodeDecodeError as exc:
                return pos, 0, message, Violation(INVALID_DATA, str(exc))
        message.size += length
        if fin:
            if decoder is None:
                out.append(b"".join(message.parts))  # type: ignore[arg-type]
            else:
                out.append("".join(message.parts))  # type: ignore[arg-type]
            message = None
    return pos, 0, message, None


def _close(payload: bytes) -> End:
    """The peer's close frame, or the violation it holds (section 5.5.1, 7.4)."""
    if not payload:
        return PeerClose(NO_STATUS, "")
    if len(payload) == 1:
        return Violation(PROTOCOL_ERROR, "close frame with a 1-byte payload")
    code = (payload[0] << 8) | payload[1]
    if not (code in _DEFINED_CODES or 3000 <= code <= 4999):
        return Violation(PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError as exc:
        return Violation(INVALID_DATA, f"close reason: {exc}")
    return PeerClose(code, reason)


def close_frame(code: int, reason: str) -> bytes:
    """Our close frame: `code` and `reason` cut to fit 125 bytes on a character boundary."""
    data = reason.encode()
    if len(data) > 123:
        data = data[:123].decode(errors="ignore").encode()
    payload = bytes((code >> 8, code & 0xFF)) + data
    return bytes((0x88, len(payload))) + payload


PING_FRAME = b"\x89\x00"


def pong_frame(payload: bytes) -> bytes:
    """The answer to a ping: a pong with the same payload (section 5.5.3)."""
    return bytes((0x8A, len(payload))) + payload
