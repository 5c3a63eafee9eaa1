"""Small pieces both clients share: turning transport failures into clear, typed errors."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI
from websockets.frames import Close

from .errors import ConnectError, ProtocolError
from .protocol import JSON_SUBPROTOCOL, Ack, Codec, Reply

# The broker accepts messages up to 1 MiB; a delivery adds an envelope, and an octet-stream HTTP
# publish reaches JSON connections as base64 (4/3 the size), so the client accepts well above that.
DEFAULT_MAX_SIZE = 4 * 2**20


@dataclass(frozen=True, slots=True)
class End:
    """The sentinel a subscription's queue ends with: why it ended, None when asked to."""

    error: BaseException | None


def describe_close(rcvd: Close | None, sent: Close | None) -> str:
    """A one-line reason for a closed connection, e.g. 'closed by the broker: 1001 (going away)'."""
    if rcvd is not None:
        reason = f" {rcvd.reason}" if rcvd.reason else ""
        return f"closed by the broker: {rcvd.code}{reason}"
    if sent is not None:
        return f"closed by the client: {sent.code}"
    return "connection dropped without a close frame"


def open_error(url: str, exc: Exception, timeout: float) -> ConnectError:
    """The `ConnectError` for an exception raised while opening a connection."""
    if isinstance(exc, InvalidURI):
        return ConnectError(f"invalid broker URL {url!r}: {exc.msg}")
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        return ConnectError(f"{url}: the server refused the WebSocket handshake with HTTP {status}")
    if isinstance(exc, ConnectionRefusedError):
        return ConnectError(f"cannot connect to {url}: connection refused (is the broker running?)")
    if isinstance(exc, socket.gaierror):
        return ConnectError(f"cannot connect to {url}: unknown host ({exc.strerror})")
    if isinstance(exc, TimeoutError):
        return ConnectError(f"cannot connect to {url}: no answer within {timeout:g} s")
    if isinstance(exc, OSError | InvalidHandshake):
        return ConnectError(f"cannot connect to {url}: {exc}")
    return ConnectError(f"cannot connect to {url}: {type(exc).__name__}: {exc}")


def wrong_subprotocol(codec: Codec, chosen: str | None) -> str | None:
    """Why the negotiated subprotocol is unusable, or None when it fits the codec."""
    # Protocol v1: no subprotocol chosen means JSON, so that is only acceptable for a JSON client.
    effective = chosen or JSON_SUBPROTOCOL
    if effective == codec.subprotocol:
        return None
    return f"the server picked subprotocol {chosen!r}, not {codec.subprotocol!r}"


def log_callback_error(logger: logging.Logger, what: str, where: str) -> None:
    """A user callback raised: log it with its traceback and keep the connection going."""
    logger.exception("%s for %r raised; ignored", what, where)


def delivered_count(reply: Reply) -> int:
    """The count a publish ack carries. Protocol v1 lets acks add "delivered" and our broker always
    does for a publish; without it the caller's `int` would be a guess, so that is an error."""
    if isinstance(reply, Ack) and reply.delivered is not None:
        return reply.delivered
    raise ProtocolError(f"publish answered without a delivered count: {reply!r}")
