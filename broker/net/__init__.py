"""I/O: the only code that touches sockets, epoll and signals (loop, listener, connections)."""
