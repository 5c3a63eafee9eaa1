"""Sans-IO security: token verification (tokens.py) and topic permissions (permissions.py).

A leaf package: it imports only `broker.config` and `broker.errors`, never a socket, so pubsub
(requests) and net (the upgrade) can both call it, and its tests are plain function calls.
"""
