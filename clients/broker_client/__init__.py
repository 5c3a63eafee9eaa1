"""Python clients for the broker's wire protocol v1: `AsyncClient` (asyncio) and `Client`
(blocking).

Both are built on the `websockets` library and one sans-IO core (`broker_client.session`), speak
JSON or msgpack, authenticate with a token (refreshed before it expires when given a callback),
reconnect with capped exponential backoff and jitter, re-subscribe after a reconnect and recover
what was missed (or say it could not: `on_unrecovered`), report connection state changes and raise
the typed exceptions of `broker_client.errors`. docs/clients.md has examples; `broker-cli`
(`broker_client.cli`) is the command-line client built on `AsyncClient`.

    from broker_client import Client

    with Client("ws://127.0.0.1:8765/ws") as client:
        sub = client.subscribe("sensors.>")
        print(client.publish("sensors.kitchen", {"t": 21.5}))   # delivered count
        print(sub.get(timeout=5))
"""

from .aio import AsyncClient, AsyncSubscription
from .blocking import Client, Subscription
from .errors import (
    BadRequestError,
    BrokerClientError,
    BrokerConnectionError,
    BrokerError,
    BrokerInternalError,
    ClientClosedError,
    ConnectError,
    ConnectionLostError,
    Forbidden,
    ForbiddenError,
    HandshakeForbiddenError,
    HandshakeUnauthorizedError,
    NotFoundError,
    ProtocolError,
    RateLimitedError,
    RequestTimeoutError,
    TokenExpired,
    TokenExpiredError,
    TooLargeError,
    Unauthorized,
    UnauthorizedError,
)
from .protocol import (
    DEFAULT_URL,
    JSON_SUBPROTOCOL,
    MSGPACK_SUBPROTOCOL,
    Backoff,
    ConnectionState,
    Encoding,
    History,
    Message,
    Position,
    StateChange,
    parse_position,
    topic_matches,
)
from .session import SessionStats, Unrecovered

__all__ = [
    "DEFAULT_URL",
    "JSON_SUBPROTOCOL",
    "MSGPACK_SUBPROTOCOL",
    "AsyncClient",
    "AsyncSubscription",
    "Backoff",
    "BadRequestError",
    "BrokerClientError",
    "BrokerConnectionError",
    "BrokerError",
    "BrokerInternalError",
    "Client",
    "ClientClosedError",
    "ConnectError",
    "ConnectionLostError",
    "ConnectionState",
    "Encoding",
    "Forbidden",
    "ForbiddenError",
    "HandshakeForbiddenError",
    "HandshakeUnauthorizedError",
    "History",
    "Message",
    "NotFoundError",
    "Position",
    "ProtocolError",
    "RateLimitedError",
    "RequestTimeoutError",
    "SessionStats",
    "StateChange",
    "Subscription",
    "TokenExpired",
    "TokenExpiredError",
    "TooLargeError",
    "Unauthorized",
    "UnauthorizedError",
    "Unrecovered",
    "parse_position",
    "topic_matches",
]
