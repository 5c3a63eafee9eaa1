"""How the loop waits for ready sockets: epoll (the product), or poll and select (to measure why).

The seed this broker grew from argues that `select` and `poll` stop scaling because every call
hands the kernel the whole interest set and the kernel scans all of it (O(watched fds), or O(the
highest fd) for select, whose fd_set also stops at FD_SETSIZE), while epoll keeps the interest
set in the kernel and a call costs O(ready). `--poller poll|select` swaps the loop's poller so
that `broker-bench pollers` can show that claim on the real broker; epoll is the default and the
only production choice.

Every poller speaks epoll's vocabulary, so the loop and the connections never know which one
runs: masks are EPOLL* bits, `poll(timeout_seconds, maxevents)` returns [(fd, mask)], a timeout
below 0 waits forever, and register/modify/unregister fail with OSError like epoll's.

* epoll: `select.epoll` itself. The loop calls its C methods directly, so the product pays
  nothing for the choice.
* poll: `select.poll`. On Linux POLLIN, POLLPRI, POLLOUT, POLLERR, POLLHUP and POLLRDHUP have
  the values of their EPOLL* twins (checked below), so masks pass through unchanged. POLLNVAL
  (a registered fd that was closed: a bug, since the loop unregisters first) is reported as
  EPOLLERR, so the handler's `recv` fails and closes it. Each call costs the kernel a pass over
  every registered fd; CPython also rebuilds its pollfd array after any register, modify or
  unregister, a user-space pass over them all.
* select: two fd sets kept here (readers, writers); each call copies them into fd_sets, the
  kernel scans up to the highest fd, and CPython scans the sets again for the ready ones.
  select has no HUP, RDHUP or ERR: a hung-up or failed socket is readable and its `recv`
  returns EOF or raises, which the connection already handles. A connection that paused reading
  (mask EPOLLRDHUP without EPOLLIN) is not watched at all, since watching it for readability
  would spin the level-triggered loop; its peer's hang-up is seen when reading resumes, or by
  the sweep's deadlines. fds >= FD_SETSIZE cannot be watched: `register` raises
  `FdOutOfRangeError`, and the server closes such a connection at accept (Server.accept).
"""

from __future__ import annotations

import errno
import select
from typing import Protocol

from broker.config import PollerName

POLLERS: tuple[PollerName, ...] = ("epoll", "poll", "select")
FD_SETSIZE = 1024  # glibc's fixed fd_set size; CPython's select() refuses fds at or above it
NO_CEILING = 1 << 62

EPOLLIN, EPOLLOUT, EPOLLERR = select.EPOLLIN, select.EPOLLOUT, select.EPOLLERR
_READ_WANTS = select.EPOLLIN | select.EPOLLPRI
POLLNVAL = select.POLLNVAL

for _name in ("IN", "PRI", "OUT", "ERR", "HUP", "RDHUP"):
    # poll masks are passed through as epoll masks: true on Linux, the only platform we run on
    assert getattr(select, "POLL" + _name) == getattr(select, "EPOLL" + _name), _name


class Poller(Protocol):
    """What the loop needs of a poller (select.epoll has exactly this shape)."""

    def register(self, fd: int, eventmask: int, /) -> None: ...
    def modify(self, fd: int, eventmask: int, /) -> None: ...
    def unregister(self, fd: int, /) -> None: ...
    def poll(self, timeout: float, maxevents: int, /) -> list[tuple[int, int]]: ...
    def close(self) -> None: ...


class FdOutOfRangeError(ValueError):
    """select cannot watch an fd at or above FD_SETSIZE."""


class PollPoller:
    """select.poll behind epoll's interface (for measurement; see the module docstring)."""

    def __init__(self) -> None:
        self._poller = select.poll()
        self._wait = self._poller.poll
        self._fds: set[int] = set()

    def register(self, fd: int, eventmask: int, /) -> None:
        if fd in self._fds:
            raise FileExistsError(errno.EEXIST, "already registered", fd)
        self._poller.register(fd, eventmask)
        self._fds.add(fd)

    def modify(self, fd: int, eventmask: int, /) -> None:
        self._poller.modify(fd, eventmask)  # FileNotFoundError when not registered

    def unregister(self, fd: int, /) -> None:
        if fd not in self._fds:
            raise FileNotFoundError(errno.ENOENT, "not registered", fd)
        self._fds.discard(fd)
        self._poller.unregister(fd)

    def poll(self, timeout: float, maxevents: int = -1, /) -> list[tuple[int, int]]:
        events = self._wait(None if timeout < 0 else timeout * 1000.0)  # ms, rounded up
        if any(mask & POLLNVAL for _, mask in events):
            return [(fd, EPOLLERR if mask & POLLNVAL else mask) for fd, mask in events]
        return events

    def close(self) -> None:
        self._fds.clear()


class SelectPoller:
    """select.select over two fd sets behind epoll's interface (for measurement only)."""

    def __init__(self) -> None:
        self._masks: dict[int, int] = {}
        self._readers: set[int] = set()
        self._writers: set[int] = set()

    def register(self, fd: int, eventmask: int, /) -> None:
        if fd >= FD_SETSIZE:
            raise FdOutOfRangeError(
                f"select cannot watch fd {fd}: fds must be below FD_SETSIZE ({FD_SETSIZE}); "
                "use --poller epoll (the default) or poll"
            )
        if fd in self._masks:
            raise FileExistsError(errno.EEXIST, "already registered", fd)
        self._set(fd, eventmask)

    def modify(self, fd: int, eventmask: int, /) -> None:
        if fd not in self._masks:
            raise FileNotFoundError(errno.ENOENT, "not registered", fd)
        self._set(fd, eventmask)

    def unregister(self, fd: int, /) -> None:
        if self._masks.pop(fd, None) is None:
            raise FileNotFoundError(errno.ENOENT, "not registered", fd)
        self._readers.discard(fd)
        self._writers.discard(fd)

    def _set(self, fd: int, mask: int) -> None:
        self._masks[fd] = mask
        if mask & _READ_WANTS:
            self._readers.add(fd)
        else:
            self._readers.discard(fd)
        if mask & EPOLLOUT:
            self._writers.add(fd)
        else:
            self._writers.discard(fd)

    def poll(self, timeout: float, maxevents: int = -1, /) -> list[tuple[int, int]]:
        readable, writable, _ = select.select(
            self._readers, self._writers, (), None if timeout < 0 else timeout
        )
        if not writable:
            return [(fd, EPOLLIN) for fd in readable]
        events = dict.fromkeys(readable, EPOLLIN)
        for fd in writable:
            events[fd] = events.get(fd, 0) | EPOLLOUT
        return list(events.items())

    def close(self) -> None:
        self._masks.clear()
        self._readers.clear()
        self._writers.clear()


def open_poller(name: PollerName) -> tuple[Poller, int]:
    """A new poller and the fd ceiling it can watch (fds must be below it)."""
    if name == "epoll":
        return select.epoll(), NO_CEILING
    if name == "poll":
        return PollPoller(), NO_CEILING
    if name == "select":
        return SelectPoller(), FD_SETSIZE
    raise ValueError(f"unknown poller {name!r}; choose one of {', '.join(POLLERS)}")
