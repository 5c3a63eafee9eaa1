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
    "Message",
    "Pong",
    "Reply",
    "StateChange",
    "parse_reply",
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
class Ack:
    id: RequestId
    delivered: int | None = None


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
        except (ValueError, msgpack.UnpackException) as exc:
            raise ProtocolError(f"undecodable frame from the broker: {exc}") from exc
        if not isinstance(obj, dict):
            raise ProtocolError(f"frame from the broker is not a map: {type(obj).__name__}")
        return obj


def _request_id(obj: dict[str, Any]) -> RequestId | None:
    rid = obj.get("id")
    if rid is None or (isinstance(rid, int | str) and not isinstance(rid, bool)):
        return rid
    raise ProtocolError(f"bad id in {obj!r:.200}")


def parse_reply(obj: dict[str, Any]) -> Reply | None:
    """The typed form of a decoded server frame; None for an op unknown to protocol v1."""
    op = obj.get("op")
    if op == "message":
        topic, seq = obj.get("topic"), obj.get("seq")
        if not isinstance(topic, str) or not isinstance(seq, int) or "data" not in obj:
            raise ProtocolError(f"malformed message: {obj!r:.200}")
        data = obj["data"]
        # An HTTP octet-stream publish reaches JSON connections as base64 text with this marker.
        if obj.get("encoding") == "base64":
            if not isinstance(data, str):
                raise ProtocolError("base64 message whose data is not a string")
            try:
                data = base64.b64decode(data, validate=True)
            except ValueError as exc:
                raise ProtocolError(f"bad base64 data: {exc}") from exc
        return Message(topic, data, seq)
    if op == "ack":
        rid = _request_id(obj)
        delivered = obj.get("delivered")
        if rid is None or not (delivered is None or isinstance(delivered, int)):
            raise ProtocolError(f"malformed ack: {obj!r:.200}")
        return Ack(rid, delivered)
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
