"""The event loop: one epoll instance, a table of handlers by fd, timers, and signal wake-ups.

(`--poller poll|select` swaps epoll for a poller of the same interface, broker/net/pollers.py, to
measure the seed's thesis; everything below is written for epoll, the only production choice.)

Some facts about epoll, and the choices they lead to (see also docs/design.md):

* Level-triggered, deliberately. With edge-triggered mode a reader must drain a socket until
  EAGAIN on every wake-up or it never hears of that data again; draining lets one flooding client
  hold the loop for as long as it keeps sending. Level-triggered lets each connection take one
  bounded `recv` per iteration and come back on the next, which is fair by construction and costs
  nothing extra for idle sockets (the kernel's ready list only holds ready ones). The price of LT is
  that an interest we cannot serve must be removed, or the loop spins: so EPOLLIN is dropped while a
  connection is paused (outbound over the high-water mark) and EPOLLOUT is armed only while output
  is pending. Connections compute the mask they want from their state and call `modify` only when it
  changes (as trio's _io_epoll does), so steady traffic costs no epoll_ctl calls.
* EPOLLHUP and EPOLLERR are always reported, wanted or not; we hand them to the reader, whose
  `recv` returns the EOF or raises the socket error. EPOLLRDHUP is asked for so a peer's shutdown is
  seen even while reading is paused.
* epoll's `data` field is where C servers keep a pointer to the connection; Python's epoll gives
  back only the fd. The fd indexes `Table.slots`, and each slot carries a generation: a token is
  (generation << 32 | fd), so deferred work that holds a token finds nothing, rather than a
  stranger, after its connection closed and the kernel reused the fd.
* A handler is unregistered before its socket is closed: closing an fd removes it from the epoll
  set only once no other descriptor refers to the same open file, and an unregister of a closed fd
  fails with EBADF.
* Signals reach the loop through `signal.set_wakeup_fd` on a socketpair registered in epoll. The
  Python-level handler only records the signal number; the loop acts on it between iterations, so a
  signal never interrupts a handler in the middle of a write.
* Other threads (the Redis link's address lookup) hand work back the same way:
  `call_soon_threadsafe` appends to a deque and writes the wake-up byte; the wake-up reader has
  the deque drained with this iteration's timers, after dispatch, so a socket a callback opens
  never takes the fd of an event still waiting in the batch. Nothing is added per iteration.
* The epoll_wait timeout is the time to the next due timer. Timers are few and loop-wide (the
  keepalive sweep, a listener back-off, the shutdown deadline): per-connection deadlines are fields
  checked by the sweep, never timer objects.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import select
import signal
import socket
import time
from array import array
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from broker.config import PollerName
from broker.metrics import Stats
from broker.net.pollers import open_poller

MAX_EVENTS = 1024


class Handler(Protocol):
    def on_event(self, mask: int) -> None: ...


class Timer:
    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Table:
    """Handlers by fd, with a generation per slot so that a token never reaches a stranger."""

    def __init__(self, size: int) -> None:
        self.slots: list[Any] = [None] * size
        self.generations = array("L", bytes(array("L").itemsize * size))

    def add(self, fd: int, handler: Any) -> int:
        if fd >= len(self.slots):  # only if the fd limit rose after start: grow
            grow = fd + 1 - len(self.slots)
            self.slots.extend([None] * grow)
            self.generations.extend([0] * grow)
        self.generations[fd] = (self.generations[fd] + 1) & 0xFFFFFFFF
        self.slots[fd] = handler
        return (self.generations[fd] << 32) | fd

    def remove(self, fd: int) -> None:
        self.slots[fd] = None

    def get(self, token: int) -> Any:
        """The connection `token` was issued for, or None if it has gone."""
        fd = token & 0xFFFFFFFF
        if fd < len(self.slots) and self.generations[fd] == token >> 32:
            return self.slots[fd]
        return None


class EventLoop:
    def __init__(self, stats: Stats, fd_limit: int, poller: PollerName = "epoll") -> None:
        self.stats = stats
        self.poller_name = poller
        # fd_ceiling: fds at or above it cannot be watched (select's FD_SETSIZE; else no limit)
        self.poller, self.fd_ceiling = open_poller(poller)
        self._wait = self.poller.poll  # for epoll, the C method itself: nothing added per wait
        # Listener, wake-up socket and connections share one fd-indexed table of handlers.
        self.table = Table(fd_limit)
        self._timers: list[tuple[float, int, Timer]] = []
        self._timer_seq = itertools.count()
        self.now = time.monotonic()
        self.ready = 0  # events this iteration's wait returned
        self.signals: list[int] = []
        self.on_signal: Callable[[int], None] = lambda signum: None
        self.after_events: list[Callable[[], None]] = []  # run once per iteration, in order
        self.from_threads: deque[Callable[[], None]] = deque()  # see call_soon_threadsafe
        self.running = False
        # Set by the server while it holds deliveries back (Server._end_of_iteration): the
        # next wait must not block, or held output would wait for input that may not come.
        self.no_wait = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.register(self._wake_r.fileno(), _WakeReader(self), select.EPOLLIN)

    # -- registration --------------------------------------------------------------------------

    def register(self, fd: int, handler: Handler, mask: int) -> int:
        """Watch `fd` for `mask`, dispatching to `handler`; returns the handler's token."""
        token = self.table.add(fd, handler)
        self.poller.register(fd, mask)
        return token

    def modify(self, fd: int, mask: int) -> None:
        self.poller.modify(fd, mask)

    def unregister(self, fd: int) -> None:
        self.table.remove(fd)
        with contextlib.suppress(OSError, ValueError):  # already gone with its socket
            self.poller.unregister(fd)

    # -- timers --------------------------------------------------------------------------------

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(self.now + delay, callback)
        heapq.heappush(self._timers, (timer.when, next(self._timer_seq), timer))
        return timer

    def _run_timers(self) -> None:
        timers = self._timers
        while timers and timers[0][0] <= self.now:
            timer = heapq.heappop(timers)[2]
            if not timer.cancelled:
                timer.callback()

    def _timeout(self) -> float:
        if self.no_wait:
            return 0
        timers = self._timers
        while timers and timers[0][2].cancelled:
            heapq.heappop(timers)
        if not timers:
            return -1
        return max(0.0, timers[0][0] - time.monotonic())

    # -- signals -------------------------------------------------------------------------------

    def handle_signals(self, *signums: int) -> None:
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for signum in signums:
            signal.signal(signum, self._record_signal)

    def _record_signal(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # already woken
            self._wake_w.send(b"\0")

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        """From any thread: run `callback` on the loop thread soon, with the timers of the
        iteration that sees the wake-up. After `close` it is never run."""
        self.from_threads.append(callback)  # deque.append is atomic: no lock
        # Appended before the byte is sent, so the wake-up that follows finds it. The buffer
        # full: a wake-up is already pending; closed (EBADF): the loop is gone.
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _run_from_threads(self) -> None:
        calls = self.from_threads
        while calls:
            calls.popleft()()

    # -- running -------------------------------------------------------------------------------

    def run(self) -> None:
        self.running = True
        while self.running:
            self.run_once()

    def stop(self) -> None:
        self.running = False

    def run_once(self) -> None:
        stats = self.stats
        try:
            events = self._wait(self._timeout(), MAX_EVENTS)
        except InterruptedError:
            events = []
        start = time.perf_counter_ns()
        self.now = time.monotonic()
        self.ready = len(events)
        stats.record_wait(self.ready)
        # Counted in the dispatch loop: `Counter.update` cost ~20 us per wake-up after a
        # long sleep (its Mapping check, cold), more than the loop's own work for one event.
        masks = stats.event_masks
        slots = self.table.slots
        for fd, mask in events:
            masks[mask] = masks.get(mask, 0) + 1
            handler = slots[fd]
            if handler is not None:
                handler.on_event(mask)
        if self.signals:
            pending, self.signals = self.signals, []
            for signum in pending:
                self.on_signal(signum)
        self._run_timers()
        for step in self.after_events:
            step()
        stats.record_iteration(time.perf_counter_ns() - start)

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        self.poller.close()
        self._wake_r.close()
        self._wake_w.close()


class _WakeReader:
    """Drains the wake-up socket (the signal numbers it carries are recorded by the handler),
    then has callbacks from other threads run with this iteration's timers."""

    def __init__(self, loop: EventLoop) -> None:
        self.loop = loop
        self.sock = loop._wake_r

    def on_event(self, mask: int) -> None:
        try:
            while self.sock.recv(4096):
                pass
        except BlockingIOError:
            pass
        # Checked after draining: a callback appended later sends its own byte, seen next time.
        loop = self.loop
        if loop.from_threads:
            loop.call_later(0, loop._run_from_threads)
