"""broker: a WebSocket pub/sub broker on its own epoll loop.

Layers, imports pointing one way: `net` (sockets, epoll) -> `pubsub` (routing, sessions) -> `wire`
(bytes <-> events, sans-IO). `config`, `errors` and `metrics` are leaves; `server` wires it all.
"""

__version__ = "0.1.0"
