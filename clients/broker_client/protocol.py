"""Wire protocol v1 as the client sees it, without any I/O (docs/protocol.md is the contract).

Data flows one way through each function: Python objects -> `Codec.encode` -> a frame (str = text
frame for JSON, bytes = binary frame for msgpack); a frame from the broker -> `Codec.decode` ->
`parse_reply` -> one of `Message`, `Ack`, `ErrorReply`, `Pong` (or None for an op this version does
not know, so a newer broker can add ops without breaking old clients). Malformed input from the
broker raises `ProtocolError` and nothing else.

The encoding is chosen per connection at the handshake by subprotocol; the broker still decodes a
frame by its type, so a reply is decoded by the frame's type here too, whatever was negotiated.
"""

from __future__ import annotations

import base64
import binascii
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

import msgpack

from .errors import ProtocolError

__all__ = [
    "DEFAULT_URL",
    "JSON_SUBPROTOCOL",
    "MSGPACK_SUBPROTOCOL",
    "Ack",
    "Backoff",
    "Codec",
    "ConnectionState",
    "Encoding",
    "ErrorReply",
    "History",
    "Message",
    "Pong",
    "Position",
    "Reply",
    "StateChange",
    "is_concrete",
    "parse_position",
    "parse_reply",
    "token_expiry",
    "topic_matches",
]

DEFAULT_URL = "ws://127.0.0.1:8765/ws"
JSON_SUBPROTOCOL = "pubsub.v1.json"
MSGPACK_SUBPROTOCOL = "pubsub.v1.msgpack"

Encoding = Literal["json", "msgpack"]
RequestId = int | str


@dataclass(frozen=True, slots=True)
class Message:
    """A delivery: `data` as published (bytes for binary payloads); `seq` counts per topic."""

    topic: str
    data: Any
    seq: int


@dataclass(frozen=True, slots=True)
class Position:
    """Where a topic's stream stands: (`epoch`, `seq`) names one message for good. A new epoch means
    the broker's counter started over (a restart, a forgotten topic): older positions are void."""

    epoch: str
    seq: int

    def __str__(self) -> str:
        return f"{self.epoch}:{self.seq}"


@dataclass(frozen=True, slots=True)
class Ack:
    """An acknowledgement; the optional fields are those its request's op adds (docs/protocol.md):
    `delivered` (publish), `epoch`/`seq`/`recovered` (subscribe to a concrete topic, history),
    `revoked` (auth), `messages` (history: (seq, data) pairs)."""

    id: RequestId
    delivered: int | None = None
    epoch: str | None = None
    seq: int | None = None
    recovered: bool | None = None
    revoked: tuple[str, ...] | None = None
    messages: tuple[tuple[int, Any], ...] | None = None

    @property
    def position(self) -> Position | None:
        if self.epoch is None or self.seq is None:
            return None
        return Position(self.epoch, self.seq)


@dataclass(frozen=True, slots=True)
class History:
    """The answer to `history()`: the topic's current position, whether the asked-for range was
    complete (`recovered`; False means messages after `since` are gone or the epoch changed, and
    `messages` are then the oldest retained) and the messages, oldest first."""

    topic: str
    position: Position
    recovered: bool
    messages: list[Message]


@dataclass(frozen=True, slots=True)
class ErrorReply:
    id: RequestId | None
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Pong:
    id: RequestId | None


Reply = Message | Ack | ErrorReply | Pong


class Codec:
    """Encode requests in the connection's encoding; decode replies by their frame type."""

    __slots__ = ("encoding", "subprotocol")

    def __init__(self, encoding: Encoding = "json") -> None:
        if encoding not in ("json", "msgpack"):
            raise ValueError(f"encoding must be 'json' or 'msgpack', not {encoding!r}")
        self.encoding: Encoding = encoding
        self.subprotocol = JSON_SUBPROTOCOL if encoding == "json" else MSGPACK_SUBPROTOCOL

    def encode(self, request: dict[str, Any]) -> str | bytes:
        """One request as a frame payload: str for a text frame (JSON), bytes for msgpack."""
        if self.encoding == "msgpack":
            try:
                return msgpack.packb(request, use_bin_type=True)
            except (TypeError, ValueError, OverflowError) as exc:
                raise TypeError(f"data cannot be encoded as msgpack: {exc}") from exc
        try:
            # allow_nan=False: NaN/Infinity are not JSON (RFC 8259 section 6); the broker would
            # reject them.
            return json.dumps(request, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            hint = " (bytes need encoding='msgpack')" if "bytes" in str(exc) else ""
            raise TypeError(f"data cannot be encoded as JSON: {exc}{hint}") from exc

    @staticmethod
    def decode(frame: str | bytes) -> dict[str, Any]:
        """A frame from the broker as a map; text frames are JSON, binary frames msgpack."""
        try:
            if isinstance(frame, str):
                obj = json.loads(frame)
            else:
                obj = msgpack.unpackb(frame, raw=False, strict_map_key=False)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            # TypeError: a msgpack map whose key is a map or an array (unhashable).
            raise ProtocolError(f"undecodable frame from the broker: {exc}") from exc
        if not isinstance(obj, dict):
            raise ProtocolError(f"frame from the broker is not a map: {type(obj).__name__}")
        return obj


def _request_id(obj: dict[str, Any]) -> RequestId | None:
    rid = obj.get("id")
    if rid is None or (isinstance(rid, int | str) and not isinstance(rid, bool)):
        return rid
    raise ProtocolError(f"bad id in {obj!r:.200}")


def _payload(obj: dict[str, Any]) -> Any:
    """A message's data; an HTTP octet-stream publish reaches JSON connections as base64 text."""
    data = obj["data"]
    if obj.get("encoding") == "base64":
        if not isinstance(data, str):
            raise ProtocolError("base64 message whose data is not a string")
        try:
            return base64.b64decode(data, validate=True)
        except ValueError as exc:
            raise ProtocolError(f"bad base64 data: {exc}") from exc
    return data


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_ack(obj: dict[str, Any]) -> Ack:
    rid = _request_id(obj)
    delivered, epoch, seq = obj.get("delivered"), obj.get("epoch"), obj.get("seq")
    recovered, revoked, messages = obj.get("recovered"), obj.get("revoked"), obj.get("messages")
    if (
        rid is None
        or not (delivered is None or _is_int(delivered))
        or not (epoch is None or isinstance(epoch, str))
        or not (seq is None or (_is_int(seq) and seq >= 0))
        or not (recovered is None or isinstance(recovered, bool))
        or not (
            revoked is None
            or (isinstance(revoked, list) and all(isinstance(p, str) for p in revoked))
        )
        or not (messages is None or isinstance(messages, list))
    ):
        raise ProtocolError(f"malformed ack: {obj!r:.200}")
    entries: tuple[tuple[int, Any], ...] | None = None
    if messages is not None:
        parsed = []
        for entry in messages:
            if not isinstance(entry, dict) or not _is_int(entry.get("seq")) or "data" not in entry:
                raise ProtocolError(f"malformed history entry: {entry!r:.200}")
            parsed.append((entry["seq"], _payload(entry)))
        entries = tuple(parsed)
    return Ack(
        rid,
        delivered,
        epoch,
        seq,
        recovered,
        tuple(revoked) if revoked is not None else None,
        entries,
    )


def parse_reply(obj: dict[str, Any]) -> Reply | None:
    """The typed form of a decoded server frame; None for an op unknown to protocol v1."""
    op = obj.get("op")
    if op == "message":
        topic, seq = obj.get("topic"), obj.get("seq")
        if not isinstance(topic, str) or not isinstance(seq, int) or "data" not in obj:
            raise ProtocolError(f"malformed message: {obj!r:.200}")
        return Message(topic, _payload(obj), seq)
    if op == "ack":
        return _parse_ack(obj)
    if op == "error":
        code, message = obj.get("code"), obj.get("message", "")
        if not isinstance(code, str) or not isinstance(message, str):
            raise ProtocolError(f"malformed error: {obj!r:.200}")
        return ErrorReply(_request_id(obj), code, message)
    if op == "pong":
        return Pong(_request_id(obj))
    if isinstance(op, str):
        return None
    raise ProtocolError(f"frame without op: {obj!r:.200}")


def topic_matches(pattern: str, topic: str) -> bool:
    """Whether a concrete topic matches a pattern: `*` one token, a final `>` one or more."""
    want = pattern.split(".")
    have = topic.split(".")
    for i, token in enumerate(want):
        if token == ">" and i == len(want) - 1:
            return len(have) > i
        if i >= len(have) or (token not in ("*", have[i])):
            return False
    return len(want) == len(have)


def is_concrete(topic: str) -> bool:
    """Whether a subscription names one topic (it has a position) rather than a pattern."""
    return not any(token in ("*", ">") for token in topic.split("."))


def parse_position(text: str) -> Position:
    """`EPOCH:SEQ` (as `broker-cli subscribe --show-seq` prints it) as a `Position`."""
    epoch, sep, seq = text.rpartition(":")
    if not sep or not epoch or not seq.isdigit():
        raise ValueError(f"position must be EPOCH:SEQ (e.g. Xa3kq9Zb:42), not {text!r}")
    return Position(epoch, int(seq))


def token_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT (Unix time), read without verifying: the client holds no key and
    only needs to know when to ask for a new token. None for a token without a readable `exp`."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        # base64url without padding (RFC 7515 section 2); pad back to a multiple of 4.
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(payload)
    except (ValueError, binascii.Error):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, int | float) and not isinstance(exp, bool):
        return float(exp)
    return None


class ConnectionState(StrEnum):
    IDLE = "idle"  # created, connect() not called yet
    CONNECTING = "connecting"  # opening the WebSocket (first time or after a loss)
    CONNECTED = "connected"  # open, and every subscription is acknowledged again
    RECONNECTING = "reconnecting"  # lost; waiting out the backoff delay before the next attempt
    CLOSED = "closed"  # final: closed by the owner, or lost with reconnect disabled


@dataclass(frozen=True, slots=True)
class StateChange:
    """What state-change callbacks receive. `error` says why a connection went away or an attempt
    failed; `delay` is the wait before the next attempt (RECONNECTING only); `attempt` counts
    attempts since the last successful connection.
    """

    state: ConnectionState
    previous: ConnectionState
    error: BaseException | None = None
    delay: float | None = None
    attempt: int = 0


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff with jitter for reconnect attempts.

    The n-th delay is `min(maximum, initial * factor**n)` scaled by a random factor in [1 - jitter,
    1]. Jitter matters when a broker restarts under thousands of clients: without it they all come
    back in the same millisecond, every round (the "thundering herd" in AWS's "Exponential Backoff
    And Jitter").
    """

    initial: float = 0.1
    maximum: float = 5.0
    factor: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not (0 < self.initial <= self.maximum) or self.factor < 1 or not 0 <= self.jitter <= 1:
            raise ValueError(f"invalid backoff {self}")

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        rand = rng.random if rng is not None else random.random
        delay = self.initial
        while True:
            yield delay * (1.0 - self.jitter * rand())
            delay = min(self.maximum, delay * self.factor)
