"""Python clients for the broker's wire protocol v1: `AsyncClient` (asyncio) and `Client`
(blocking).

Both are built on the `websockets` library, speak JSON or msgpack, reconnect with capped exponential
backoff and jitter, re-subscribe after a reconnect, report connection state changes and raise the
typed exceptions of `broker_client.errors`. docs/clients.md has examples; `broker-cli`
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
    ForbiddenError,
    NotFoundError,
    ProtocolError,
    RateLimitedError,
    RequestTimeoutError,
    TooLargeError,
)
from .protocol import (
    DEFAULT_URL,
    JSON_SUBPROTOCOL,
    MSGPACK_SUBPROTOCOL,
    Backoff,
    ConnectionState,
    Encoding,
    Message,
    StateChange,
    topic_matches,
)

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
    "ForbiddenError",
    "Message",
    "NotFoundError",
    "ProtocolError",
    "RateLimitedError",
    "RequestTimeoutError",
    "StateChange",
    "Subscription",
    "TooLargeError",
    "topic_matches",
]
