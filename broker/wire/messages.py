"""Protocol v1 messages (docs/protocol.md): requests in, replies and deliveries out.

Theory of operation: a client message is decoded (codec), then validated into a `Request`, or
refused with a `RequestError` that carries the request's id when one was readable, so the error
reply can name the request it answers. Every refusal is `bad_request` except where the protocol
names another code. Validation is strict about what the broker reads (op, topic, id) and ignores
fields it does not know, so that later protocol versions can add fields compatibly.

Positions (section "History and recovery"): `since` is `{"epoch": str, "seq": int}` and `limit`
a non-negative integer; both are checked for type and range here, since they come from the
network like everything else. `since` and `history` need a concrete topic: positions are kept
per concrete topic, and a pattern matches topics whose seqs have nothing to do with each other.

Topic syntax (section "Topics"): 1..255 bytes of UTF-8, `.`-separated non-empty tokens, no
whitespace or control characters; `*` (one token) and `>` (one or more trailing tokens) are whole
tokens and only allowed where a pattern is: subscribe and unsubscribe, never publish.
"""

from __future__ import annotations

import base64
import math
import re
from json import encoder as json_encoder
from typing import Any, NamedTuple

from broker.errors import ErrorCode, RequestError
from broker.wire import codec
from broker.wire.codec import Encoding
from broker.wire.frames import OP_TEXT, TEXT_HEADERS, header

_json_string = json_encoder.encode_basestring_ascii  # what json.dumps uses for str (ensure_ascii)

MAX_TOPIC_BYTES = 255
_TOPIC_CHARS = re.compile(r"[^\s\x00-\x1f\x7f]+")

SUBSCRIBE = "subscribe"
UNSUBSCRIBE = "unsubscribe"
PUBLISH = "publish"
PING = "ping"
AUTH = "auth"
HISTORY = "history"
OPS = frozenset((SUBSCRIBE, UNSUBSCRIBE, PUBLISH, PING, AUTH, HISTORY))
MAX_EPOCH_CHARS = 64
MAX_SEQ = (1 << 63) - 1
MAX_HISTORY_LIMIT = 1000  # messages in one history reply; a larger `limit` is capped


class Since(NamedTuple):
    epoch: str
    seq: int


class Request(NamedTuple):
    op: str
    topic: str
    data: Any
    id: int | float | str | None
    since: Since | None = None
    limit: int = MAX_HISTORY_LIMIT


# Concrete topics already found valid: a publish to a known topic costs one dict lookup instead
# of the checks below (~1 us). Bounded: emptied when full, so made-up topics cannot grow it.
_VALID_CONCRETE: dict[str, None] = {}
_VALID_CONCRETE_MAX = 16384


def check_topic(topic: object, pattern: bool) -> str:
    """`topic` if it is a valid concrete topic (or pattern, when `pattern`); else RequestError."""
    if type(topic) is str and topic in _VALID_CONCRETE:
        return topic
    checked = _check_topic(topic, pattern)
    if not pattern or not is_pattern(checked):
        if len(_VALID_CONCRETE) >= _VALID_CONCRETE_MAX:
            _VALID_CONCRETE.clear()
        _VALID_CONCRETE[checked] = None
    return checked


def _check_topic(topic: object, pattern: bool) -> str:
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


def check_seq(seq: object) -> int:
    # bool is an int subclass and JSON 5.0 is a float: neither is a seq.
    if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
        raise RequestError(ErrorCode.BAD_REQUEST, "seq must be an integer 0..2**63-1")
    return seq


def check_epoch(epoch: object) -> str:
    if type(epoch) is not str or not 0 < len(epoch) <= MAX_EPOCH_CHARS:
        raise RequestError(ErrorCode.BAD_REQUEST, f"epoch must be a string of 1..{MAX_EPOCH_CHARS}")
    return epoch


def check_since(since: object) -> Since:
    if not isinstance(since, dict):
        raise RequestError(ErrorCode.BAD_REQUEST, 'since must be {"epoch": E, "seq": N}')
    return Since(check_epoch(since.get("epoch")), check_seq(since.get("seq")))


def check_limit(limit: object) -> int:
    if limit is None:
        return MAX_HISTORY_LIMIT
    if type(limit) is not int or limit < 0:
        raise RequestError(ErrorCode.BAD_REQUEST, "limit must be a non-negative integer")
    return min(limit, MAX_HISTORY_LIMIT)


def check_history_topic(topic: object) -> str:
    return _concrete(topic, "history")


def _concrete(topic: object, what: str) -> str:
    checked = check_topic(topic, True)
    if is_pattern(checked):
        raise RequestError(
            ErrorCode.BAD_REQUEST, f"{what} needs a concrete topic: positions are per topic"
        )
    return checked


# The publish most clients send, as our clients write it: these keys in this order (compact or
# as json.dumps spaces them), a topic and a string of printable ASCII without escapes, an
# optional small integer id. For such text the JSON decoder, the checks for what it cannot hold
# (lone surrogates, deep nesting) and the dict are not needed: the groups are the values.
# Anything else takes `parse_request`.
_SIMPLE_PUBLISH = re.compile(
    r'\{"op": ?"publish", ?"topic": ?"([!#-\[\]-~]{1,256})", ?"data": ?"([ !#-\[\]-~]*)"'
    r'(?:, ?"id": ?(0|[1-9][0-9]{0,14}))?\}'
).fullmatch


def simple_publish(payload: str) -> tuple[str, str, int | None] | None:
    """(topic, data, id) of a publish in the common form above (`parse_request`'s answer for it,
    in ~half the time), or None: then `parse_request` decides. Raises RequestError (with the id)
    for a topic that is not a valid concrete topic."""
    m = _SIMPLE_PUBLISH(payload)
    if m is None:
        return None
    topic, data, number = m.groups()
    req_id = None if number is None else int(number)
    if topic not in _VALID_CONCRETE:
        try:
            topic = check_topic(topic, False)
        except RequestError as exc:
            exc.request_id = req_id
            raise
    return topic, data, req_id


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
        if op == SUBSCRIBE:
            since = msg.get("since")
            if since is None:
                return Request(op, check_topic(msg.get("topic"), True), None, req_id)
            topic = _concrete(msg.get("topic"), "since")
            return Request(op, topic, None, req_id, check_since(since))
        if op == UNSUBSCRIBE:
            return Request(op, check_topic(msg.get("topic"), True), None, req_id)
        if op == HISTORY:
            topic = _concrete(msg.get("topic"), "history")
            since = msg.get("since")
            return Request(
                op,
                topic,
                None,
                req_id,
                None if since is None else check_since(since),
                check_limit(msg.get("limit")),
            )
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


def position_ack(
    req_id: object, encoding: Encoding, epoch: str, seq: int, recovered: bool | None = None
) -> bytes:
    """The ack of a subscribe to a concrete topic: where the topic stands (and, with `since`,
    whether the messages after it follow)."""
    reply = _with_id({"op": "ack"}, req_id)
    reply["epoch"] = epoch
    reply["seq"] = seq
    if recovered is not None:
        reply["recovered"] = recovered
    return codec.encode(reply, encoding)


def history_body(
    epoch: str, seq: int, recovered: bool, entries: list[tuple[int, Any]], encoding: Encoding
) -> dict[str, Any]:
    """The history answer (op ack, or the HTTP body) without op and id. Binary data on JSON is
    base64 with "encoding":"base64" in that message, as in a delivery."""
    found = []
    for n, data in entries:
        if encoding is Encoding.JSON and isinstance(data, bytes | bytearray):
            b64 = base64.b64encode(data).decode("ascii")
            found.append({"seq": n, "data": b64, "encoding": "base64"})
        else:
            found.append({"seq": n, "data": data})
    return {"epoch": epoch, "seq": seq, "recovered": recovered, "messages": found}


def history_ack(req_id: object, encoding: Encoding, body: dict[str, Any]) -> bytes:
    reply = _with_id({"op": "ack"}, req_id)
    reply.update(body)
    return codec.encode(reply, encoding)


def pong(req_id: object, encoding: Encoding) -> bytes:
    return codec.encode(_with_id({"op": "pong"}, req_id), encoding)


def error(err: RequestError, encoding: Encoding) -> bytes:
    reply = _with_id({"op": "error"}, err.request_id)
    reply["code"] = err.code.value
    reply["message"] = err.message
    return codec.encode(reply, encoding)


# The start of a JSON delivery frame's body per topic, up to its data: made once per topic.
# Bounded like _VALID_CONCRETE (emptied when full).
_STARTS: dict[str, bytes] = {}


def _start(topic: str) -> bytes:
    if len(_STARTS) >= _VALID_CONCRETE_MAX:
        _STARTS.clear()
    start = _STARTS[topic] = b'{"op":"message","topic":%s,"data":' % _json_string(topic).encode()
    return start


def message(topic: str, data: Any, seq: int, encoding: Encoding, plain: bool = False) -> bytes:
    """The delivery frame, built once per publish and encoding and shared by all subscribers.

    Binary data on a JSON connection travels as base64 with "encoding":"base64" (protocol v1).
    Raises codec.EncodeError when `data` has no form in `encoding`. `plain`: `data` is a string
    that `simple_publish` matched, whose JSON form is itself in quotes (no escaping to do).
    """
    if encoding is codec.JSON:
        kind = type(data)
        if kind is str or kind is int:
            # The common case written directly: the same bytes json.dumps would give
            # (compact separators, ASCII escapes), without building a dict and an encoder.
            if plain:
                value = b'"%s"' % data.encode()
            else:
                value = (_json_string(data) if kind is str else int.__repr__(data)).encode()
            start = _STARTS.get(topic)
            if start is None:
                start = _start(topic)
            end = b',"seq":%d}' % seq
            n = len(start) + len(value) + len(end)
            head = TEXT_HEADERS[n] if n < 126 else header(OP_TEXT, n)
            return b"".join((head, start, value, end))  # frame and body in one copy
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
