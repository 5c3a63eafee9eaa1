"""The listening socket: accept in bounded batches, back off when out of descriptors.

A connection storm fills the accept queue faster than one accept per wake-up could empty it, so
each wake-up accepts until EAGAIN, up to `BATCH` (the listener is level-triggered: what is left is
reported again next iteration, after the established connections have had their turn).
EMFILE/ENFILE leave the listener readable forever; accepting again at once would spin the loop,
so the listener stops watching for `BACKOFF` seconds (as asyncio's selector_events does).
"""

from __future__ import annotations

import errno
import logging
import select
import socket
from collections.abc import Callable

from broker.net.loop import EventLoop

log = logging.getLogger("broker.listener")

BATCH = 1024
BACKOFF = 0.1
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class Listener:
    def __init__(
        self,
        loop: EventLoop,
        host: str,
        port: int,
        backlog: int,
        on_accept: Callable[[socket.socket, str], None],
        reuse_port: bool = False,
    ) -> None:
        self.loop = loop
        self.on_accept = on_accept
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:  # --workers: every worker listens on the port; the kernel spreads them
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.sock.bind((host, port))
        self.sock.listen(backlog)
        self.sock.setblocking(False)
        self.address: tuple[str, int] = self.sock.getsockname()[:2]
        self.fd = self.sock.fileno()
        loop.register(self.fd, self, select.EPOLLIN)
        self._warned = False

    def on_event(self, mask: int) -> None:
        accept = self.sock.accept
        for _ in range(BATCH):
            try:
                sock, addr = accept()
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self._back_off(exc)
                    return
                # ECONNABORTED, EPROTO...: that one connection is gone; keep accepting.
                continue
            self.on_accept(sock, addr[0])  # the peer's host: no getpeername() later

    def _back_off(self, exc: OSError) -> None:
        if not self._warned:
            log.warning("accept failed (%s); pausing accepts for %.1fs at a time", exc, BACKOFF)
            self._warned = True
        self.loop.modify(self.fd, 0)
        self.loop.call_later(BACKOFF, self._resume)

    def _resume(self) -> None:
        if self.sock.fileno() >= 0:
            self.loop.modify(self.fd, select.EPOLLIN)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.loop.unregister(self.fd)
            self.sock.close()
