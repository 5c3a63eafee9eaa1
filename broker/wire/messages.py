"""Protocol v1 messages (docs/protocol.md): requests in, replies and deliveries out.

Theory of operation: a client message is decoded (codec), then validated into a `Request`, or
refused with a `RequestError` that carries the request's id when one was readable, so the error
reply can name the request it answers. Every refusal is `bad_request` except where the protocol
names another code. Validation is strict about what the broker reads (op, topic, id) and ignores
fields it does not know, so that later protocol versions can add fields compatibly.

Topic syntax (section "Topics"): 1..255 bytes of UTF-8, `.`-separated non-empty tokens, no
whitespace or control characters; `*` (one token) and `>` (one or more trailing tokens) are whole
tokens and only allowed where a pattern is: subscribe and unsubscribe, never publish.
"""

from __future__ import annotations

import base64
import math
import re
from typing import Any, NamedTuple

from broker.errors import ErrorCode, RequestError
from broker.wire import codec
from broker.wire.codec import Encoding

MAX_TOPIC_BYTES = 255
_TOPIC_CHARS = re.compile(r"[^\s\x00-\x1f\x7f]+")

SUBSCRIBE = "subscribe"
UNSUBSCRIBE = "unsubscribe"
PUBLISH = "publish"
PING = "ping"
AUTH = "auth"
OPS = frozenset((SUBSCRIBE, UNSUBSCRIBE, PUBLISH, PING, AUTH))


class Request(NamedTuple):
    op: str
    topic: str
    data: Any
    id: int | float | str | None


def check_topic(topic: object, pattern: bool) -> str:
    """`topic` if it is a valid concrete topic (or pattern, when `pattern`); else RequestError."""
    if not isinstance(topic, str):
        raise RequestError(ErrorCode.BAD_REQUEST, "topic must be a string")
    try:
        size = len(topic.encode())
    except UnicodeEncodeError:
        raise RequestError(ErrorCode.BAD_REQUEST, "topic is not valid UTF-8") from None
    if not 0 < size <= MAX_TOPIC_BYTES:
        raise RequestError(ErrorCode.BAD_REQUEST, f"topic must be 1..{MAX_TOPIC_BYTES} bytes")
    if _TOPIC_CHARS.fullmatch(topic) is None:
        raise RequestError(ErrorCode.BAD_REQUEST, "topic has whitespace or control characters")
    tokens = topic.split(".")
    last = len(tokens) - 1
    for i, token in enumerate(tokens):
        if not token:
            raise RequestError(ErrorCode.BAD_REQUEST, "topic has an empty token")
        if token == "*" or (token == ">" and i == last):
            if not pattern:
                raise RequestError(ErrorCode.BAD_REQUEST, "cannot publish to a wildcard topic")
        elif "*" in token or ">" in token:
            raise RequestError(
                ErrorCode.BAD_REQUEST, "'*' and '>' must be whole tokens, '>' only the last"
            )
    return topic


def is_pattern(topic: str) -> bool:
    return "*" in topic or ">" in topic


def parse_request(payload: str | bytes, binary: bool) -> Request:
    """Decode and validate one client message."""
    try:
        msg = codec.decode(payload, binary)
    except codec.DecodeError as exc:
        kind = "msgpack" if binary else "JSON"
        raise RequestError(ErrorCode.BAD_REQUEST, f"invalid {kind}: {exc}") from None
    if not isinstance(msg, dict):
        raise RequestError(ErrorCode.BAD_REQUEST, "a request must be an object")
    req_id = msg.get("id")
    if req_id is not None and not _valid_id(req_id):
        raise RequestError(ErrorCode.BAD_REQUEST, "id must be a number or a string")
    op = msg.get("op")
    try:
        if op == PUBLISH:
            if "data" not in msg:
                raise RequestError(ErrorCode.BAD_REQUEST, "publish needs data")
            return Request(PUBLISH, check_topic(msg.get("topic"), False), msg["data"], req_id)
        if op in (SUBSCRIBE, UNSUBSCRIBE):
            return Request(op, check_topic(msg.get("topic"), True), None, req_id)
        if op == PING:
            return Request(PING, "", None, req_id)
        if op == AUTH:
            token = msg.get("token")
            if not isinstance(token, str):
                raise RequestError(ErrorCode.BAD_REQUEST, "auth needs a token string")
            return Request(AUTH, "", token, req_id)
        if op is None:
            raise RequestError(ErrorCode.BAD_REQUEST, "missing op")
        raise RequestError(ErrorCode.BAD_REQUEST, f"unknown op {str(op)[:32]!r}")
    except RequestError as exc:
        exc.request_id = req_id
        raise


def _valid_id(req_id: object) -> bool:
    """An id every encoding can echo: a 63-bit integer, a finite float (msgpack can carry
    infinities, JSON cannot) or a string (codec.decode has refused lone surrogates)."""
    kind = type(req_id)
    if kind is int:
        return isinstance(req_id, int) and req_id.bit_length() <= 63
    if kind is float:
        return isinstance(req_id, float) and math.isfinite(req_id)
    return kind is str


def _with_id(reply: dict[str, Any], req_id: object) -> dict[str, Any]:
    if req_id is not None:
        reply["id"] = req_id
    return reply


def ack(req_id: object, encoding: Encoding, delivered: int | None = None) -> bytes:
    reply = _with_id({"op": "ack"}, req_id)
    if delivered is not None:
        reply["delivered"] = delivered
    return codec.encode(reply, encoding)


def auth_ack(req_id: object, encoding: Encoding, revoked: list[str]) -> bytes:
    """The answer to `auth`: the subscriptions the new token no longer allows were removed."""
    reply = _with_id({"op": "ack"}, req_id)
    reply["revoked"] = revoked
    return codec.encode(reply, encoding)


def pong(req_id: object, encoding: Encoding) -> bytes:
    return codec.encode(_with_id({"op": "pong"}, req_id), encoding)


def error(err: RequestError, encoding: Encoding) -> bytes:
    reply = _with_id({"op": "error"}, err.request_id)
    reply["code"] = err.code.value
    reply["message"] = err.message
    return codec.encode(reply, encoding)


def message(topic: str, data: Any, seq: int, encoding: Encoding) -> bytes:
    """The delivery frame, built once per publish and encoding and shared by all subscribers.

    Binary data on a JSON connection travels as base64 with "encoding":"base64" (protocol v1).
    Raises codec.EncodeError when `data` has no form in `encoding`.
    """
    if encoding is Encoding.JSON and isinstance(data, bytes | bytearray):
        body = {
            "op": "message",
            "topic": topic,
            "data": base64.b64encode(data).decode("ascii"),
            "seq": seq,
            "encoding": "base64",
        }
        return codec.encode(body, encoding)
    return codec.encode({"op": "message", "topic": topic, "data": data, "seq": seq}, encoding)
