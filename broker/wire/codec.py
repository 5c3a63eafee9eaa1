"""The two encodings of protocol v1: JSON in text frames, msgpack in binary frames.

A connection picks its encoding at the handshake (subprotocol); a client frame is decoded by its
own frame type, whatever the connection picked, and everything the server sends uses the
connection's encoding. `decode` raises only `DecodeError`; `encode` raises only `EncodeError`
(a value the encoding cannot carry, e.g. a 2**70 integer in msgpack). Both are pure functions.
"""

from __future__ import annotations

import base64
import enum
import json
from typing import Any

import msgpack

from broker.wire.frames import OP_BINARY, OP_TEXT, frame


class Encoding(enum.IntEnum):
    JSON = 0
    MSGPACK = 1


SUBPROTOCOLS = {"pubsub.v1.json": Encoding.JSON, "pubsub.v1.msgpack": Encoding.MSGPACK}
SUBPROTOCOL_NAMES = {v: k for k, v in SUBPROTOCOLS.items()}


class DecodeError(ValueError):
    """The payload is not one value of its encoding."""


class EncodeError(ValueError):
    """The value cannot be written in the requested encoding."""


def _reject_constant(name: str) -> None:
    # json.loads accepts NaN and Infinity by default; RFC 8259 does not.
    raise DecodeError(f"{name} is not JSON")


def _bytes_as_base64(value: object) -> str:
    # Nested binary (from msgpack or HTTP) has no JSON form; base64 is the documented stand-in.
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


_json_decode = json.JSONDecoder(parse_constant=_reject_constant).decode
# ensure_ascii keeps the output valid UTF-8 even for lone surrogates that JSON escapes can carry.
_json_encode = json.JSONEncoder(separators=(",", ":"), default=_bytes_as_base64).encode
_packer = msgpack.Packer(use_bin_type=True)


def decode(payload: str | bytes, binary: bool) -> Any:
    """One value from a text (JSON) or binary (msgpack) message."""
    try:
        if isinstance(payload, str):
            return _json_decode(payload)
        if binary:
            return msgpack.unpackb(payload, raw=False, timestamp=0)
        return _json_decode(payload.decode())
    except DecodeError:
        raise
    except (ValueError, TypeError, RecursionError, msgpack.UnpackException) as exc:
        raise DecodeError(str(exc) or type(exc).__name__) from None


def encode_payload(value: Any, encoding: Encoding) -> bytes:
    try:
        if encoding is Encoding.JSON:
            return _json_encode(value).encode()
        return _packer.pack(value)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        _packer.reset()
        raise EncodeError(str(exc)) from None


def encode(value: Any, encoding: Encoding) -> bytes:
    """A complete WebSocket frame carrying `value` in `encoding`."""
    opcode = OP_TEXT if encoding is Encoding.JSON else OP_BINARY
    return frame(opcode, encode_payload(value, encoding))
