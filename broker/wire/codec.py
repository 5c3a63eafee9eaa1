"""The two encodings of protocol v1: JSON in text frames, msgpack in binary frames.

A connection picks its encoding at the handshake (subprotocol); a client frame is decoded by its
own frame type, whatever the connection picked, and everything the server sends uses the
connection's encoding. `decode` raises only `DecodeError`; `encode` raises only `EncodeError`
(a value the encoding cannot carry, e.g. a 2**70 integer in msgpack). Both are pure functions.

Every value `decode` returns can be written back in JSON (unless it holds msgpack-only values:
binary keys, non-finite floats, extension types) and in msgpack (unless it holds integers over
64 bits), so an echoed id or published data never fails to encode for a reason the sender could
have been told about. Hence three refusals at decode:

* nesting deeper than `MAX_DEPTH` (msgpack's packer stops at 511 levels, and the recursion limit
  near 1000 would make the outcome depend on the call depth);
* a JSON number that overflows to infinity (`1e999`): it would be echoed as `Infinity`, not JSON;
* a JSON string holding a lone surrogate (`"\\ud800"`): it has no UTF-8 form, so neither msgpack
  nor a strict JSON reader can take it back.

The checks cost nothing for ordinary messages: the depth walk runs only when the payload holds
more than `MAX_DEPTH` container openers, the string walk only when a surrogate escape occurs.
"""

from __future__ import annotations

import base64
import enum
import json
import math
import re
from typing import Any

import msgpack

from broker.wire.frames import OP_BINARY, OP_TEXT, frame


class Encoding(enum.IntEnum):
    JSON = 0
    MSGPACK = 1


JSON = Encoding.JSON  # bound once: a member lookup on the enum class costs ~0.1 us

SUBPROTOCOLS = {"pubsub.v1.json": Encoding.JSON, "pubsub.v1.msgpack": Encoding.MSGPACK}
SUBPROTOCOL_NAMES = {v: k for k, v in SUBPROTOCOLS.items()}


class DecodeError(ValueError):
    """The payload is not one value of its encoding."""


class EncodeError(ValueError):
    """The value cannot be written in the requested encoding."""


MAX_DEPTH = 128  # levels of arrays and objects/maps in one message, the message itself included


def _reject_constant(name: str) -> None:
    # json.loads accepts NaN and Infinity by default; RFC 8259 does not.
    raise DecodeError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise DecodeError(f"number out of range: {text[:24]}")
    return value


# A \uD800-\uDFFF escape: the only way a lone surrogate gets into a decoded str (UTF-8 decoding
# of text frames, HTTP bodies and msgpack strings refuses encoded surrogates).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# Bytes that can start a msgpack array or map: fixmap, fixarray, array16/32, map16/32.
_NOT_MSGPACK_CONTAINER = bytes(b for b in range(256) if not (0x80 <= b <= 0x9F or b >= 0xDC))


def _check(value: Any, depth: bool, strings: bool) -> None:
    """Walk `value` without recursion: nesting over MAX_DEPTH, or (`strings`) a str that has no
    UTF-8 form, raises DecodeError."""
    stack = [(value, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        item, level = pop()
        if type(item) is dict:
            if strings:
                for key in item:
                    if type(key) is str:
                        _check_str(key)
            children: Any = item.values()
        else:
            children = item
        if level > MAX_DEPTH and depth:
            raise DecodeError(f"nested deeper than {MAX_DEPTH} levels")
        for child in children:
            kind = type(child)
            if kind is dict or kind is list:
                push((child, level + 1))
            elif strings and kind is str:
                _check_str(child)


def _check_str(text: str) -> None:
    try:
        text.encode()
    except UnicodeEncodeError:
        raise DecodeError("a string holds a lone surrogate (\\ud800-\\udfff)") from None


def _decode_json(text: str) -> Any:
    # The C scanner straight away (what JSONDecoder.decode runs after two Python-level steps);
    # anything unusual (whitespace around the value, an error) goes the long way for its message.
    try:
        value, end = _json_scan(text, 0)
    except (StopIteration, ValueError):
        end = -1
    if end != len(text):
        value = _json_decode(text)
    if type(value) is dict or type(value) is list:
        # Deeper than MAX_DEPTH takes more than MAX_DEPTH openers and as many closers.
        deep = len(text) > 2 * MAX_DEPTH and text.count("[") + text.count("{") > MAX_DEPTH
        strings = _SURROGATE_ESCAPE.search(text) is not None
        if deep or strings:
            _check(value, deep, strings)
    elif type(value) is str:
        _check_str(value)
    return value


def _decode_msgpack(payload: bytes) -> Any:
    value = msgpack.unpackb(payload, raw=False, timestamp=0)
    if (
        len(payload) > MAX_DEPTH
        and (type(value) is dict or type(value) is list)
        and len(payload.translate(None, _NOT_MSGPACK_CONTAINER)) > MAX_DEPTH
    ):
        _check(value, True, False)
    return value


def _bytes_as_base64(value: object) -> str:
    # Nested binary (from msgpack or HTTP) has no JSON form; base64 is the documented stand-in.
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


_json_decoder = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
_json_decode = _json_decoder.decode
_json_scan = _json_decoder.scan_once  # type: ignore[attr-defined]
# allow_nan=False: a non-finite float (from msgpack) is an EncodeError, never `Infinity` sent.
_json_encode = json.JSONEncoder(
    separators=(",", ":"), default=_bytes_as_base64, allow_nan=False
).encode
_packer = msgpack.Packer(use_bin_type=True)


def decode(payload: str | bytes, binary: bool) -> Any:
    """One value from a text (JSON) or binary (msgpack) message."""
    try:
        if isinstance(payload, str):
            return _decode_json(payload)
        if binary:
            return _decode_msgpack(payload)
        return _decode_json(payload.decode())
    except DecodeError:
        raise
    except (ValueError, TypeError, RecursionError, msgpack.UnpackException) as exc:
        raise DecodeError(str(exc) or type(exc).__name__) from None


def encode_payload(value: Any, encoding: Encoding) -> bytes:
    try:
        if encoding is JSON:
            return _json_encode(value).encode()
        return _packer.pack(value)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        _packer.reset()
        raise EncodeError(str(exc)) from None


def encode(value: Any, encoding: Encoding) -> bytes:
    """A complete WebSocket frame carrying `value` in `encoding`."""
    opcode = OP_TEXT if encoding is JSON else OP_BINARY
    return frame(opcode, encode_payload(value, encoding))
