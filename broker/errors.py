"""The broker's error vocabulary: the three outcomes of a bad input, each with one home.

    RequestError        a bad request: answered with {"op":"error"}; the connection stays open
    HandshakeError      a bad HTTP request or upgrade: answered with an HTTP status, then closed
    Closed (enum)       why a connection ended: the WebSocket close code sent and the metric label

A frame-level violation (wire.inbound.Violation) or a broken limit is terminal and becomes a Closed
reason with its RFC 6455 close code. A bug while serving one connection is Closed.INTERNAL_ERROR
(1011): logged once, counted, and the loop goes on.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """Codes of {"op":"error"} replies (protocol v1)."""

    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    NOT_FOUND = "not_found"
    UNAVAILABLE = "unavailable"  # the backplane (hub or Redis) cannot take the request now
    INTERNAL = "internal"


# Why a token was refused: the label of broker_auth_failures_total (broker/auth/tokens.py).
AUTH_FAILURE_REASONS = (
    "missing",
    "malformed",
    "signature",
    "expired",
    "not_yet_valid",
    "audience",
    "issuer",
    "other",
)
# What a refusal for lack of permission refused: the label of broker_forbidden_total.
FORBIDDEN_OPS = ("publish", "subscribe", "history", "admin")


class RequestError(Exception):
    """A request the broker refuses; the reply carries `code` and `message`."""

    def __init__(self, code: ErrorCode, message: str, request_id: object = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


class HandshakeError(Exception):
    """An HTTP request the broker refuses with `status` (RFC 6455 section 4.2.2 for upgrades)."""

    def __init__(
        self, status: int, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class Closed(enum.Enum):
    """Why a connection ended. `value` is (metric label, WebSocket close code or 0 for none)."""

    CLIENT_CLOSE = ("client_close", 1000)
    CLIENT_GONE = ("client_gone", 0)
    PROTOCOL_ERROR = ("protocol_error", 1002)
    INVALID_UTF8 = ("invalid_utf8", 1007)
    TOO_LARGE = ("too_large", 1009)
    SLOW_CONSUMER = ("slow_consumer", 1008)
    HANDSHAKE_TIMEOUT = ("handshake_timeout", 0)
    PING_TIMEOUT = ("ping_timeout", 1001)
    BAD_HANDSHAKE = ("bad_handshake", 0)
    HTTP_DONE = ("http_done", 0)
    SHUTDOWN = ("shutdown", 1001)
    INTERNAL_ERROR = ("internal_error", 1011)
    MAX_CONNECTIONS = ("max_connections", 0)
    TLS_ERROR = ("tls_error", 0)  # a failed TLS handshake or a bad record: no close frame
    TOKEN_EXPIRED = ("token_expired", 4001)
    # --redis: what a Redis outage cost this node's subscribers is no longer in Redis (1012:
    # service restart, reconnect; the client's `since` then says recovered false).
    BACKPLANE_GAP = ("backplane_gap", 1012)
    POLLER_FD_LIMIT = ("poller_fd_limit", 0)  # --poller select: fd >= FD_SETSIZE, closed at accept

    @property
    def label(self) -> str:
        return self.value[0]

    @property
    def code(self) -> int:
        return self.value[1]
