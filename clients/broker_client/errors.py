"""Exceptions raised by the broker clients.

Two kinds, as in h11/wsproto: the broker said no (`BrokerError`, which carries the broker's error
`code` from wire protocol v1), or the connection itself failed (`BrokerConnectionError`). Everything
the library raises on purpose derives from `BrokerClientError`, so a script can catch one type;
misuse of the API (wrong argument types, data that cannot be encoded) raises the ordinary
`TypeError`/`ValueError`.

A `BrokerError` is usually an `{"op":"error"}` reply on an open connection; `status` is None then.
The handshake's HTTP 401/403 raise the `Handshake...` subclasses (`status` 401 or 403): catch them
as `UnauthorizedError`/`ForbiddenError` (the broker said no) or, as before auth existed, as
`ConnectError` (no WebSocket was opened).

    BrokerClientError
    ├── BrokerError                 the broker said no; .code, .message, .request_id, .status
    │   ├── BadRequestError         code "bad_request" (bad topic, publish to a wildcard, ...)
    │   ├── ForbiddenError          code "forbidden" (outside the token's claims); alias `Forbidden`
    │   │   └── HandshakeForbiddenError       HTTP 403 at the handshake (also a ConnectError)
    │   ├── UnauthorizedError       code "unauthorized" (a refused `auth`); alias `Unauthorized`
    │   │   └── HandshakeUnauthorizedError    HTTP 401 at the handshake (also a ConnectError)
    │   ├── TooLargeError           code "too_large"
    │   ├── RateLimitedError        code "rate_limited"
    │   ├── NotFoundError           code "not_found"
    │   └── BrokerInternalError     code "internal"
    ├── BrokerConnectionError       the transport failed
    │   ├── ConnectError            could not open (refused, unreachable, handshake refused)
    │   └── ConnectionLostError     dropped under a waiting request, or for good (no reconnect)
    │       └── TokenExpiredError   the broker closed with 4001: the token expired; alias
    │                               `TokenExpired`
    ├── ClientClosedError           the client was closed (by `close()`), so the call cannot go on
    ├── RequestTimeoutError         no answer within the request timeout (also a `TimeoutError`)
    └── ProtocolError               the broker sent something wire protocol v1 does not allow
"""

from __future__ import annotations

__all__ = [
    "BadRequestError",
    "BrokerClientError",
    "BrokerConnectionError",
    "BrokerError",
    "BrokerInternalError",
    "ClientClosedError",
    "ConnectError",
    "ConnectionLostError",
    "Forbidden",
    "ForbiddenError",
    "HandshakeForbiddenError",
    "HandshakeUnauthorizedError",
    "NotFoundError",
    "ProtocolError",
    "RateLimitedError",
    "RequestTimeoutError",
    "TokenExpired",
    "TokenExpiredError",
    "TooLargeError",
    "Unauthorized",
    "UnauthorizedError",
    "error_from_reply",
]


class BrokerClientError(Exception):
    """Base of every exception the client raises on purpose."""


class BrokerError(BrokerClientError):
    """The broker said no: an `{"op":"error"}` reply (the connection stays open), or for the auth
    classes an HTTP status at the handshake (`status`; no connection was opened)."""

    #: The protocol's error code this class stands for (None on the base class: any unknown code).
    CODE: str | None = None

    def __init__(
        self,
        code: str,
        message: str,
        request_id: int | str | None = None,
        *,
        status: int | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.status = status


class BadRequestError(BrokerError):
    CODE = "bad_request"


class ForbiddenError(BrokerError):
    CODE = "forbidden"


class UnauthorizedError(BrokerError):
    CODE = "unauthorized"


class TooLargeError(BrokerError):
    CODE = "too_large"


class RateLimitedError(BrokerError):
    CODE = "rate_limited"


class NotFoundError(BrokerError):
    CODE = "not_found"


class BrokerInternalError(BrokerError):
    CODE = "internal"


class BrokerConnectionError(BrokerClientError):
    """The transport failed: nothing reached the broker, or the answer never came back."""


class ConnectError(BrokerConnectionError):
    """Opening the WebSocket failed: connection refused, DNS, timeout, or handshake refused."""


class ConnectionLostError(BrokerConnectionError):
    """The connection dropped under a waiting request, or for good when reconnect is off."""


class TokenExpiredError(ConnectionLostError):
    """The broker closed the connection with 4001 because the token expired before a refresh."""


class HandshakeUnauthorizedError(UnauthorizedError, ConnectError):
    """HTTP 401 instead of the WebSocket: no token, or one the broker does not accept."""


class HandshakeForbiddenError(ForbiddenError, ConnectError):
    """HTTP 403 instead of the WebSocket: the broker's perimeter refused (e.g. the Origin)."""


class ClientClosedError(BrokerClientError):
    """The client was closed by its owner."""


class RequestTimeoutError(BrokerClientError, TimeoutError):
    """The broker did not answer a request within the client's request timeout."""


class ProtocolError(BrokerClientError):
    """A frame from the broker does not follow wire protocol v1."""


_BY_CODE: dict[str, type[BrokerError]] = {
    cls.CODE: cls
    for cls in (
        BadRequestError,
        ForbiddenError,
        UnauthorizedError,
        TooLargeError,
        RateLimitedError,
        NotFoundError,
        BrokerInternalError,
    )
    if cls.CODE is not None
}


def error_from_reply(code: str, message: str, request_id: int | str | None = None) -> BrokerError:
    """The typed exception for a broker error reply (`BrokerError` itself for unknown codes)."""
    return _BY_CODE.get(code, BrokerError)(code, message, request_id)


# The names docs/protocol.md and the issue use; the classes keep the package's `...Error` style.
Unauthorized = UnauthorizedError
Forbidden = ForbiddenError
TokenExpired = TokenExpiredError
