"""Sans-IO security: token verification (tokens.py), topic permissions (permissions.py), and
who may open a WebSocket at all (perimeter.py).

A leaf package: it imports only `broker.config` and `broker.errors`, never a socket, so pubsub
(requests) and net (the upgrade) can both call it, and its tests are plain function calls.
"""
