"""The C speedups against their Python twins: built and in use, and doing exactly what the twins do.

`fan_out` (broker/pubsub/_speedups.c) is compared with `Router._fan_out_py` on random sessions
around half and past the high-water mark (hypothesis: the same starting state, run once in C and
once in Python, must end the same). `flush` (broker/net/_speedups.c) is compared with
`_flush_steady` on real loopback TCP connections in this process, one for each case the C code
sends or hands back (steady, several parts, IOV_MAX parts, short send, stalled, failed send, and
every state it must leave to Python), and end to end on broker processes run both ways
(BROKER_NO_SPEEDUPS=1 for the Python twins).
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import socket
import struct
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import speedups
from broker.config import Config, SlowConsumerPolicy
from broker.errors import Closed
from broker.metrics import Stats
from broker.net import connection as connection_module
from broker.net.connection import DRAINING, EPOLLOUT, LINGER, OPEN, READING, Connection, flush_all
from broker.pubsub import router as router_module
from broker.pubsub.overflow import CONFLATE, DISCONNECT, DROP, Conflated
from broker.pubsub.router import Router
from broker.pubsub.session import Session
from broker.server import Server
from tests.conftest import REPO, BrokerProcess
from tests.loopback import Pairs, after, fill, read_exactly
from tests.wsraw import OP_TEXT, RawWs, encode_frame

Ws = Callable[..., RawWs]
S = TypeVar("S", bound=Session)
IOV_MAX = os.sysconf("SC_IOV_MAX")  # what <limits.h> gives the C code (1024 on Linux)


# -- built and in use --------------------------------------------------------------------------


def test_every_speedup_is_built_and_in_use() -> None:
    built = speedups.status()
    assert len(built) == len(speedups.MODULES) and all(built.values()), (
        f"C speedups missing: {built}. The test command installs with a C compiler present "
        "(`.venv/bin/pip install -e .` builds broker/*/_speedups*.so); a broker without them "
        f"serves on the slower Python twins ({speedups.DISABLE}="
        f"{os.environ.get(speedups.DISABLE)!r})"
    )
    for module in (router_module._speedups, connection_module._speedups):
        assert module is not None
        # The extension built from this checkout, not one installed elsewhere.
        assert Path(module.__file__ or "").resolve().is_relative_to(REPO / "broker"), module


def _in_subprocess(code: str, disable: str) -> Any:
    """Run `code` (which prints one JSON value) in a fresh interpreter with BROKER_NO_SPEEDUPS
    set to `disable`; returns the value."""
    env = {**os.environ, "PYTHONPATH": str(REPO), speedups.DISABLE: disable}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


_STATUS = """
import json
from broker import speedups
from broker.net import connection
from broker.pubsub import router
print(json.dumps([speedups.status(), router._speedups is None, connection._speedups is None]))
"""


@pytest.mark.parametrize(("disable", "on"), [("1", False), ("yes", False), ("0", True), ("", True)])
def test_the_variable_turns_both_off(disable: str, on: bool) -> None:
    status, router_off, connection_off = _in_subprocess(_STATUS, disable)
    assert status and set(status.values()) == {on}, status
    assert router_off is not on
    assert connection_off is not on


def test_the_c_functions_refuse_to_run_unbound() -> None:
    # Imported alone, before router.py and connection.py bind them to their classes.
    code = """
import json
from broker.pubsub import _speedups as fan
from broker.net import _speedups as net
errors = []
for call in (lambda: fan.fan_out((), b"", [], 0), lambda: net.flush([])):
    try:
        call()
    except RuntimeError as exc:
        errors.append(str(exc))
print(json.dumps(errors))
"""
    assert _in_subprocess(code, "") == ["fan_out before bind", "flush before bind"]


# -- fan_out: C and Python agree ---------------------------------------------------------------


class SlottedSession(Session):
    """A subclass with slots of its own: the C code reads the base's slots at their offsets."""

    __slots__ = ("extra_a", "extra_b")

    def __init__(self) -> None:
        super().__init__()
        self.extra_a = "a"
        self.extra_b = "b"


class DictSession(Session):
    """A subclass with a __dict__."""


class ListSubclass(list[bytes | memoryview]):
    pass


class Duck:
    """Not a Session at all, but with every attribute the Python twin uses: C must hand it
    back untouched, and the Python twin then serves it."""

    def __init__(self) -> None:
        self.out: list[bytes | memoryview] = []
        self.queued = 0
        self.slow = 0
        self.since = 0.0
        self.dropped = 0
        self.conflated: Conflated | None = None


KINDS: dict[str, Callable[[], Any]] = {
    "session": Session,
    "slotted": SlottedSession,
    "dict": DictSession,
    "duck": Duck,
}
TOPICS = ("t.a", "t.b", "u.c")
RULES = ("t.*=drop", "t.a=conflate", "u.>=disconnect", "t.b=conflate")
HIGH_WATERS = (1, 2, 7, 64, 1000)


@dataclasses.dataclass(frozen=True)
class SessionSpec:
    kind: str
    queued: int
    out_subclass: bool
    slow: int
    since: float
    dropped: int
    conflated: tuple[tuple[str, int], ...]  # (topic, frame size) held before the fan-outs


@dataclasses.dataclass(frozen=True)
class FanOutCase:
    high_water: int
    default: SlowConsumerPolicy
    rules: tuple[str, ...]
    sessions: tuple[SessionSpec, ...]
    deliveries: tuple[tuple[tuple[int, ...], str, int], ...]  # (subs by index, topic, size)


@st.composite
def fan_out_cases(draw: st.DrawFn) -> FanOutCase:
    high_water = draw(st.sampled_from(HIGH_WATERS))
    half = high_water >> 1
    near = [0, 1, half - 1, half, half + 1, high_water - 1, high_water, high_water + 1]
    queued = st.one_of(
        st.sampled_from(near),
        st.integers(0, 3 * high_water + 3),
        st.sampled_from([-1, 2**70]),  # off the C path: negative, too large for Py_ssize_t
    )
    # Exotic: also sessions C declines for their shape (not a Session; `out` not a list).
    exotic = draw(st.booleans())
    session = st.builds(
        SessionSpec,
        kind=st.sampled_from(sorted(KINDS) if exotic else ["dict", "session", "slotted"]),
        queued=queued,
        out_subclass=st.booleans() if exotic else st.just(False),
        slow=st.sampled_from([0, DROP, CONFLATE, DISCONNECT, DROP | CONFLATE]),
        since=st.sampled_from([0.0, 5.0]),
        dropped=st.sampled_from([0, 3]),
        conflated=st.lists(
            st.tuples(st.sampled_from(TOPICS), st.integers(1, high_water + 1)),
            max_size=2,
            unique_by=lambda held: held[0],
        ).map(tuple),
    )
    sessions = draw(st.lists(session, max_size=10).map(tuple))
    subs = (
        st.lists(st.integers(0, len(sessions) - 1), max_size=12).map(tuple)
        if sessions
        else st.just(())
    )
    delivery = st.tuples(
        subs,  # repeats allowed: order and state must hold
        st.sampled_from(TOPICS),
        st.integers(1, high_water + 2),
    )
    return FanOutCase(
        high_water=high_water,
        default=draw(st.sampled_from(["drop", "conflate", "disconnect"])),
        rules=tuple(draw(st.lists(st.sampled_from(RULES), max_size=2, unique=True))),
        sessions=sessions,
        deliveries=tuple(draw(st.lists(delivery, min_size=1, max_size=4))),
    )


def _build(case: FanOutCase) -> tuple[Router, list[Any]]:
    cfg = dataclasses.replace(
        Config(),
        outbound_high_water=case.high_water,
        slow_consumer_policy=case.default,
        overflow=case.rules,
    )
    router = Router(cfg, Stats())
    router.now = 42.0
    sessions = []
    for spec in case.sessions:
        s = KINDS[spec.kind]()
        # `out` consistent with `queued` (a placeholder where no list could be)
        out: list[bytes | memoryview] = ListSubclass() if spec.out_subclass else []
        if 0 < spec.queued <= 4 * case.high_water + 4:
            out.append(b"q" * spec.queued)
        elif spec.queued:
            out.append(b"?")
        s.out = out
        s.queued = spec.queued
        s.slow = spec.slow
        s.since = spec.since
        s.dropped = spec.dropped
        if spec.conflated:
            s.conflated = Conflated()
            for topic, size in spec.conflated:
                s.conflated.frames[topic] = b"c" * size
                s.conflated.size += size
        sessions.append(s)
    return router, sessions


def _run(case: FanOutCase) -> dict[str, Any]:
    """Build the case's router and sessions, run its fan-outs, and describe the outcome."""
    router, sessions = _build(case)
    dirty, over = router.dirty, router.over
    frames = [bytes([65 + k]) * size for k, (_, _, size) in enumerate(case.deliveries)]
    returned = [
        router._fan_out(tuple(sessions[i] for i in subs), frame, topic)
        for (subs, topic, _), frame in zip(case.deliveries, frames, strict=True)
    ]
    assert router.dirty is dirty and router.over is over  # appended to, never replaced

    def part(p: bytes | memoryview) -> Any:
        # The very frame object fan-out was given (no copy), else the bytes.
        same = [k for k, frame in enumerate(frames) if p is frame]
        return ("frame", same[0]) if same else bytes(p)

    index = {id(s): i for i, s in enumerate(sessions)}
    return {
        "returned": returned,
        "sessions": [
            {
                "out": [part(p) for p in s.out],
                "out_type": type(s.out).__name__,
                "queued": s.queued,
                "slow": s.slow,
                "since": s.since,
                "dropped": s.dropped,
                "conflated": None
                if s.conflated is None
                else ([(t, part(f)) for t, f in s.conflated.frames.items()], s.conflated.size),
            }
            for s in sessions
        ],
        "dirty": [index[id(s)] for s in router.dirty],
        "urgent": router.urgent,
        "over": [index[id(s)] for s in router.over],
        "stats_dropped": router.stats.dropped,
        "slow_consumers": router.stats.slow_consumers,
    }


@settings(max_examples=400, deadline=None, derandomize=True)
@given(fan_out_cases())
def test_fan_out_in_c_ends_as_the_python_twin(case: FanOutCase) -> None:
    assert router_module._speedups is not None, "the C fan_out is not in use"
    in_c = _run(case)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(router_module, "_speedups", None)
        in_python = _run(case)
    assert in_c == in_python


# -- fan_out: what the C code takes and what it hands back --------------------------------------


def _session(queued: int, cls: type[S]) -> S:
    s = cls()
    s.out = [b"q" * queued] if queued else []
    s.queued = queued
    return s


def test_fan_out_takes_sessions_up_to_half_and_hands_back_the_rest_in_order() -> None:
    fan = router_module._speedups
    assert fan is not None
    half = 100
    frame = b"f" * 10
    empty, at_half, over_half, slotted = (
        _session(0, Session),
        _session(half, Session),
        _session(half + 1, Session),
        _session(3, SlottedSession),
    )
    far_over = _session(10 * half, Session)
    marker = Session()
    dirty: list[Any] = [marker]
    rest = fan.fan_out((empty, over_half, at_half, slotted, far_over), frame, dirty, half)
    assert rest is not None
    assert [id(s) for s in rest] == [id(over_half), id(far_over)]
    assert dirty == [marker, empty]  # appended to the list given: only the one that was empty
    assert empty.out == [frame] and empty.out[0] is frame and empty.queued == 10
    assert at_half.out[-1] is frame and at_half.queued == half + 10  # exactly half: C's
    assert slotted.out[-1] is frame and slotted.queued == 13
    assert (slotted.extra_a, slotted.extra_b) == ("a", "b")  # its own slots untouched
    for untouched, queued in ((over_half, half + 1), (far_over, 10 * half)):
        assert untouched.out == [b"q" * queued] and untouched.queued == queued
    # Something that is not a session: it and every session after it go back to Python, so
    # that `dirty` gets the order the Python twin gives.
    first, later = _session(0, Session), _session(0, Session)
    stranger = object()
    dirty = []
    rest = fan.fan_out((first, over_half, stranger, later), frame, dirty, half)
    assert rest is not None
    assert [id(s) for s in rest] == [id(over_half), id(stranger), id(later)]
    assert dirty == [first] and first.out == [frame]
    assert later.out == [] and later.queued == 0
    # Every session taken: None, not an empty list.
    assert fan.fan_out((empty, slotted), frame, [], half) is None
    assert fan.fan_out((), frame, [], half) is None


def test_fan_out_hands_back_sessions_whose_slots_it_cannot_use() -> None:
    fan = router_module._speedups
    assert fan is not None
    unset_out, unset_queued, bool_queued, huge, negative, sub_out = (Session() for _ in range(6))
    del unset_out.out
    del unset_queued.queued
    bool_queued.queued = False
    huge.queued = 2**70
    negative.queued = -1
    sub_out.out = ListSubclass()
    subs = (unset_out, unset_queued, bool_queued, huge, negative, sub_out)
    dirty: list[Any] = []
    rest = fan.fan_out(subs, b"f", dirty, 1 << 20)
    assert rest is not None and [id(s) for s in rest] == [id(s) for s in subs]
    assert dirty == []
    assert [s.out for s in subs[1:]] == [[], [], [], [], []]
    assert (bool_queued.queued, huge.queued, negative.queued) == (False, 2**70, -1)


@pytest.mark.parametrize(
    "args",
    [
        ([Session()], b"f", [], 1),  # subs: a tuple, not a list
        ((), "f", [], 1),
        ((), bytearray(b"f"), [], 1),
        ((), b"f", (), 1),
        ((), b"f", [], 1.0),
        ((), b"f", []),
        ((), b"f", [], 1, None),
    ],
)
def test_fan_out_checks_its_argument_types(args: tuple[Any, ...]) -> None:
    fan = router_module._speedups
    assert fan is not None
    with pytest.raises(TypeError, match=r"fan_out\(tuple, bytes, list, int\)"):
        fan.fan_out(*args)


def test_fan_out_half_beyond_py_ssize_t_is_an_overflow_error() -> None:
    fan = router_module._speedups
    assert fan is not None
    s = _session(0, Session)
    with pytest.raises(OverflowError):
        fan.fan_out((s,), b"f", [], 2**70)
    assert s.out == [] and s.queued == 0


def test_bind_refuses_what_is_not_a_class() -> None:
    fan = router_module._speedups
    net = connection_module._speedups
    assert fan is not None and net is not None
    with pytest.raises(TypeError, match="takes a class"):
        fan.bind(Session())
    with pytest.raises(TypeError):
        net.bind(Connection.__new__(Connection), READING, OPEN)
    with pytest.raises(TypeError, match="must be a list"):
        net.flush((1, 2))


# -- flush: real loopback sockets in this process ------------------------------------------------


class SubConnection(Connection):
    __slots__ = ()


class DuckConnection:
    """Not a Connection: both flushes must call its own `flush`, once."""

    def __init__(self) -> None:
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1


@dataclasses.dataclass
class Case:
    name: str
    expect: str  # what C's flush does: "sent", "skip" (empty), "back" (None), "failed", "short"
    target: Any
    peer: socket.socket | None = None
    wire: bytes = b""  # what the connection owes its peer, in order (backlog, then out)
    prefill: int = 0  # bytes written to the peer before the flush


def _frame(size: int, tag: int) -> bytes:
    return (b"%d:" % tag).ljust(size, b".")


def _queue(conn: Connection, parts: list[bytes | memoryview]) -> bytes:
    conn.out = list(parts)
    conn.queued = sum(map(len, parts))
    return b"".join(parts)


def _add(
    pairs: Pairs,
    cases: list[Case],
    name: str,
    expect: str,
    parts: list[bytes | memoryview],
    **kw: Any,
) -> Connection:
    """A connection for one case: `parts` queued, `kw` set on it (`cls`, `small` and `fill`
    shape its socket: see Pairs.open and fill)."""
    cls = kw.pop("cls", Connection)
    full = kw.pop("fill", False)
    conn, peer = pairs.open(cls, small=kw.pop("small", False))
    for attr, value in kw.items():
        setattr(conn, attr, value)
    prefill = fill(conn) if full else 0
    wire = b"".join(conn.backlog or ()) + _queue(conn, parts)
    cases.append(Case(name, expect, conn, peer, wire, prefill))
    if "mask" in kw:  # epoll must agree with the slot
        pairs.server.loop.modify(conn.fd, kw["mask"])
    return conn


def _reset(conn: Connection, peer: socket.socket | None) -> None:
    """The peer resets the connection: the broker's next send fails (ECONNRESET or EPIPE)."""
    assert peer is not None
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()
    poller = select.poll()
    poller.register(conn.sock, select.POLLERR | select.POLLHUP)
    assert poller.poll(2000), "the reset did not arrive"


def _cases(pairs: Pairs) -> tuple[list[Case], list[Any]]:
    """One connection per case flush must tell apart; returns the cases and the list to flush
    (in which the first connection appears twice: it is written once)."""
    cases: list[Case] = []

    def add(name: str, expect: str, parts: list[bytes | memoryview], **kw: Any) -> Connection:
        return _add(pairs, cases, name, expect, parts, **kw)

    loop = pairs.server.loop
    add("one part", "sent", [_frame(300, 1)])
    add("several parts", "sent", [_frame(10, 1), _frame(2000, 2), _frame(5000, 3)])
    add("IOV_MAX parts", "sent", [_frame(4, k) for k in range(IOV_MAX)])
    add("empty", "skip", [])
    add("IOV_MAX + 1 parts", "back", [_frame(4, k) for k in range(IOV_MAX + 1)])
    add("memoryview tail", "back", [b"ab", memoryview(b"xcdef")[1:]])
    add("EPOLLOUT armed", "back", [_frame(100, 1)], mask=READING | EPOLLOUT)
    add("backlog stamp", "back", [_frame(100, 1)], since=loop.now - 1.0)
    add("paced replay", "back", [_frame(70, 3)], backlog=deque([_frame(50, 1), _frame(60, 2)]))
    add("draining", "back", [_frame(80, 1)], state=DRAINING)
    http = add("HTTP", "back", [b"HTTP/1.1 204 No Content\r\n\r\n"])
    http.state = connection_module.HTTP
    add("subclass", "back", [_frame(90, 1)], cls=SubConnection)
    closed = add("closed", "back", [])
    closed.abort(Closed.CLIENT_CLOSE)
    cases.append(Case("not a connection", "back", DuckConnection()))
    gone = add("peer reset", "failed", [_frame(100, 1)])
    _reset(gone, cases[-1].peer)
    add("short send", "short", [_frame(65536, k) for k in range(16)], small=True)
    add("stalled", "short", [_frame(1000, 1)], small=True, fill=True)
    sessions = [c.target for c in cases]
    return cases, [cases[0].target, *sessions]


def _observe(case: Case) -> tuple[dict[str, Any], int]:
    """A case's outcome, with what varies from run to run (how much of a short send the kernel
    took) left out; and the bytes its peer received from the flush."""
    target = case.target
    if isinstance(target, DuckConnection):
        return {"flushes": target.flushes}, 0
    tail = b"".join(target.out)
    seen: dict[str, Any] = {
        "state": target.state,
        "mask": target.mask,
        "short": bool(tail),
        "queued is the tail": target.queued == len(tail),
        "tail parts": [type(p).__name__ for p in target.out],
        "stamped": target.since > 0,
        "slow": target.slow,
        "backlog": target.backlog is None,
    }
    if target.state == connection_module.CLOSED:
        return seen, 0
    assert case.peer is not None
    sent = len(case.wire) - len(tail)
    got = read_exactly(case.peer, case.prefill + sent)
    assert got[case.prefill :] == case.wire[:sent], case.name
    seen["after"] = after(case.peer)
    return seen, sent


def test_flush_sends_the_steady_state_and_hands_back_everything_else(
    servers: Callable[[], Server],
) -> None:
    net = connection_module._speedups
    assert net is not None, "the C flush is not in use"
    server = servers()
    pairs = Pairs(server)
    try:
        cases, sessions = _cases(pairs)
        before = {id(c.target): list(getattr(c.target, "out", ())) for c in cases}
        sends, sent_bytes, rest = net.flush(sessions)
        handed = {id(conn): sent for conn, sent in rest}
        assert [id(conn) for conn, _ in rest] == [
            id(c.target) for c in cases if c.expect in ("back", "failed", "short")
        ], "handed back in the order given, each once"
        total = 0
        for case in cases:
            target = case.target
            if case.expect in ("sent", "skip"):
                assert id(target) not in handed, case.name
                assert target.out == [] and target.queued == 0, case.name
                assert case.peer is not None
                assert read_exactly(case.peer, len(case.wire)) == case.wire, case.name
                assert after(case.peer) == "nothing", case.name
                total += len(case.wire)
                continue
            # Whatever C hands back it leaves as it was: Python finishes the job.
            assert getattr(target, "out", []) == before[id(target)], case.name
            sent = handed[id(target)]
            if case.expect == "back":
                assert sent is None, case.name
            elif case.expect == "failed":
                assert sent == -1, case.name
                assert target.state == OPEN  # closing is Python's (abort)
            else:
                assert isinstance(sent, int) and 0 <= sent < len(case.wire), (case.name, sent)
                assert case.peer is not None
                got = read_exactly(case.peer, case.prefill + sent)
                assert got[case.prefill :] == case.wire[:sent], case.name
                assert after(case.peer) == "nothing", case.name
                total += sent
        assert any(case.expect == "short" and handed[id(case.target)] for case in cases)
        # One send per connection written (the repeated one only once), the short ones too.
        assert sends == sum(c.expect in ("sent", "short") for c in cases)
        assert sent_bytes == total
    finally:
        pairs.close()


def test_flush_all_in_c_ends_as_the_python_twin(servers: Callable[[], Server]) -> None:
    assert connection_module._speedups is not None, "the C flush is not in use"
    runs: list[dict[str, Any]] = []
    for twin in ("c", "python"):
        server = servers()
        pairs = Pairs(server)
        try:
            cases, sessions = _cases(pairs)
            with pytest.MonkeyPatch.context() as mp:
                if twin == "python":
                    mp.setattr(connection_module, "_speedups", None)
                flush_all(sessions, server.stats)
            seen = {}
            received = 0
            for case in cases:
                seen[case.name], n = _observe(case)
                received += n
            stats = server.stats
            assert stats.bytes_sent == received, twin
            runs.append(
                {
                    "cases": seen,
                    "sends": stats.sends,
                    "backpressure": stats.backpressure,
                    "timed_flushes": stats.timed_flushes,
                    "queue ages": sum(stats.queue_age),
                    "closed": {k.label: v for k, v in stats.closed.items() if v},
                }
            )
        finally:
            pairs.close()
    in_c, in_python = runs
    assert in_c == in_python
    # The cases did what they are there for (not both runs sending nothing, say).
    cases_seen = in_c["cases"]
    assert cases_seen["short send"]["short"] and cases_seen["stalled"]["short"]
    assert cases_seen["peer reset"]["state"] == connection_module.CLOSED
    assert cases_seen["draining"]["state"] == LINGER and cases_seen["draining"]["after"] == "eof"
    assert cases_seen["not a connection"] == {"flushes": 1}
    assert in_c["closed"] == {"client_gone": 1, "client_close": 1}


# -- write_through: a lone read's deliveries written at once --------------------------------------


def _through_cases(pairs: Pairs) -> tuple[list[Case], tuple[Any, ...]]:
    """One connection per case `write_through` must tell apart, in the order given; `expect`:
    "sent" (written at once), "back" (handed back untouched), "short" (a partial send)."""
    cases: list[Case] = []

    def add(name: str, expect: str, parts: list[bytes | memoryview], **kw: Any) -> Connection:
        return _add(pairs, cases, name, expect, parts, **kw)

    loop = pairs.server.loop
    add("steady", "sent", [])
    add("something queued", "back", [_frame(100, 1)])
    add("EPOLLOUT armed", "back", [], mask=READING | EPOLLOUT)
    add("backlog stamp", "back", [], since=loop.now - 1.0)
    add("paced replay", "back", [], backlog=deque([_frame(50, 1)]))
    add("draining", "back", [], state=DRAINING)
    http = add("HTTP", "back", [])
    http.state = connection_module.HTTP
    add("subclass", "back", [], cls=SubConnection)
    closed = add("closed", "back", [])
    closed.abort(Closed.CLIENT_CLOSE)
    cases.append(Case("a plain session", "back", Session()))
    gone = add("peer reset", "back", [])
    _reset(gone, cases[-1].peer)
    add("stalled", "short", [], small=True, fill=True)
    add("steady too", "sent", [])
    return cases, tuple(c.target for c in cases)


THROUGH = _frame(300, 7)


def test_write_through_writes_the_steady_empty_buffers_and_hands_back_the_rest(
    servers: Callable[[], Server],
) -> None:
    net = connection_module._speedups
    assert net is not None, "the C speedup is not in use"
    pairs = Pairs(servers())
    try:
        cases, subs = _through_cases(pairs)
        before = [(list(c.target.out), c.target.queued) for c in cases]
        sends, sent_bytes, skipped, partial = net.write_through(subs, THROUGH)
        assert skipped == [c.target for c in cases if c.expect == "back"], "in order, each once"
        stalled = next(c.target for c in cases if c.expect == "short")
        assert partial == [(stalled, 0)]
        assert sends == 3 and sent_bytes == 2 * len(THROUGH)
        for case, was in zip(cases, before, strict=True):
            # C changes no session: the partial one's tail is Python's (`write_through`).
            assert (case.target.out, case.target.queued) == was, case.name
            if case.expect == "sent":
                assert case.peer is not None
                assert read_exactly(case.peer, len(THROUGH)) == THROUGH, case.name
                assert after(case.peer) == "nothing", case.name
        # A partial send of more than nothing: a big frame into a small window.
        conn, peer = pairs.open(small=True)
        big = _frame(1 << 20, 9)
        sends, sent_bytes, skipped, partial = net.write_through((conn,), big)
        assert skipped is None and partial == [(conn, sent_bytes)] and sends == 1
        assert 0 < sent_bytes < len(big)
        assert read_exactly(peer, sent_bytes) == big[:sent_bytes]
    finally:
        pairs.close()


def _through_seen(case: Case, frame: bytes) -> dict[str, Any]:
    """A case's state after `write_through`, with how much of a partial send went left out."""
    target = case.target
    if type(target) is Session:
        return {"out": target.out, "queued": target.queued}
    tail = b"".join(target.out)
    seen: dict[str, Any] = {
        "state": target.state,
        "mask": target.mask,
        "queued": target.queued == len(tail),
        "tail parts": [type(p).__name__ for p in target.out],
        "stamped": target.since > 0,
    }
    if target.state == connection_module.CLOSED or case.peer is None or case.peer.fileno() < 0:
        return seen  # closed, or its peer reset it
    if case.expect == "sent":
        seen["got"] = read_exactly(case.peer, len(frame)) == frame
    elif case.expect == "short":
        sent = len(frame) - len(tail)
        got = read_exactly(case.peer, case.prefill + sent)
        seen["got"] = got[case.prefill :] + tail == frame
    seen["after"] = after(case.peer)
    return seen


def test_write_through_in_c_ends_as_the_python_twin(servers: Callable[[], Server]) -> None:
    assert connection_module._speedups is not None, "the C speedup is not in use"
    runs: list[dict[str, Any]] = []
    for twin in ("c", "python"):
        server = servers()
        pairs = Pairs(server)
        try:
            cases, subs = _through_cases(pairs)
            short, _ = pairs.open(small=True)
            cases.append(Case("short", "short", short, pairs.peers[-1]))
            big = _frame(1 << 20, 9)
            with pytest.MonkeyPatch.context() as mp:
                if twin == "python":
                    mp.setattr(connection_module, "_speedups", None)
                now = server.loop.now
                rest = connection_module.write_through(subs, THROUGH, server.stats, now)
                rest_big = connection_module.write_through((short,), big, server.stats, now)
            runs.append(
                {
                    "rest": [
                        cases.index(next(c for c in cases if c.target is s)) for s in rest or ()
                    ],
                    "rest big": rest_big,
                    "cases": {
                        c.name: _through_seen(c, big if c.target is short else THROUGH)
                        for c in cases
                    },
                    "sends": server.stats.sends,
                    "timed_flushes": server.stats.timed_flushes,
                    "queue ages": sum(server.stats.queue_age),
                }
            )
        finally:
            pairs.close()
    in_c, in_python = runs
    assert in_c == in_python
    seen = in_c["cases"]
    assert seen["steady"]["got"] and seen["steady too"]["got"]
    for name in ("stalled", "short"):  # the tail kept, EPOLLOUT armed, the backlog stamped
        assert seen[name]["got"] and seen[name]["tail parts"] == ["memoryview"], name
        assert seen[name]["mask"] & EPOLLOUT and seen[name]["stamped"], name
    assert seen["peer reset"]["state"] == OPEN  # handed back: the flush will meet the error
    assert in_c["sends"] == 4 and in_c["rest big"] is None
    assert in_c["queue ages"] == 2  # the two written whole; the tails are timed as they drain


# -- end to end: broker processes with and without the speedups ----------------------------------


@pytest.fixture(params=["c", "python"])
def start(
    request: pytest.FixtureRequest, broker_factory: Callable[..., BrokerProcess]
) -> Callable[..., BrokerProcess]:
    """Start a broker with the C speedups (param "c") or the Python twins ("python"), and check
    which the process has loaded."""
    c = request.param == "c"

    def start_broker(*args: str) -> BrokerProcess:
        broker = broker_factory(*args, env={speedups.DISABLE: "0" if c else "1"})
        maps = Path(f"/proc/{broker.pid}/maps").read_text()
        loaded = {name for name in ("pubsub", "net") if f"/broker/{name}/_speedups" in maps}
        assert loaded == ({"pubsub", "net"} if c else set()), loaded
        return broker

    return start_broker


def _publish(topic: str, data: str) -> bytes:
    body = json.dumps({"op": "publish", "topic": topic, "data": data}, separators=(",", ":"))
    return encode_frame(OP_TEXT, body.encode())


def _subscriber(raw_ws: Ws, broker: BrokerProcess, topic: str, **kw: Any) -> RawWs:
    c = raw_ws(broker, **kw)
    c.send_json({"op": "subscribe", "topic": topic, "id": 1})
    assert c.recv_json().items() >= {"op": "ack", "id": 1}.items()
    return c


def _sync(pub: RawWs) -> None:
    """Return once the broker has run everything `pub` sent before."""
    pub.send_json({"op": "ping", "id": "sync"})
    assert pub.recv_json()["op"] == "pong"


def _messages(c: RawWs, n: int) -> list[tuple[int, str]]:
    got = []
    for _ in range(n):
        m = c.recv_json()
        assert m["op"] == "message", m
        got.append((m["seq"], m["data"]))
    return got


def test_every_subscriber_gets_every_message_in_order(
    start: Callable[..., BrokerProcess], raw_ws: Ws
) -> None:
    broker = start()
    subs = [_subscriber(raw_ws, broker, "burst") for _ in range(16)]
    pub = raw_ws(broker)
    # One message at a time: a flush of one part each.
    for i in range(3):
        pub.sock.sendall(_publish("burst", f"single {i}"))
        for s in subs:
            assert _messages(s, 1) == [(i + 1, f"single {i}")]
    # A burst in one write: routed in one iteration, so each subscriber's flush has many parts.
    rounds = 40
    sends = broker.metric("broker_socket_sends_total")
    pub.sock.sendall(b"".join(_publish("burst", f"burst {i}") for i in range(rounds)))
    want = [(4 + i, f"burst {i}") for i in range(rounds)]
    for s in subs:
        assert _messages(s, rounds) == want
    sends = broker.metric("broker_socket_sends_total") - sends
    assert sends < len(subs) * rounds / 4, f"{sends} sends: the burst's frames were not coalesced"


def test_a_stalled_subscriber_catches_up_with_everything_in_order(
    start: Callable[..., BrokerProcess], raw_ws: Ws
) -> None:
    # The kernel's send buffer grows to 4 MiB at most (tcp_wmem): ~6 MB cannot fit it, and
    # stays under a 64 MiB mark, so no overflow policy applies, only backpressure.
    broker = start("--outbound-high-water", str(64 << 20))
    slow = _subscriber(raw_ws, broker, "s", rcvbuf=4096)  # then stops reading
    fast = _subscriber(raw_ws, broker, "s")
    pub = raw_ws(broker)
    backpressure = broker.metric("broker_backpressure_total")
    count, size = 120, 50_000
    datas = [f"{i:06d}".ljust(size, "x") for i in range(count)]
    for i in range(0, count, 10):
        pub.sock.sendall(b"".join(_publish("s", d) for d in datas[i : i + 10]))
        # The other subscriber is served meanwhile.
        assert _messages(fast, 10) == [(n + 1, datas[n]) for n in range(i, i + 10)]
    _sync(pub)
    assert broker.wait_metric("broker_backpressure_total", at_least=backpressure + 1) > backpressure
    assert broker.metric("broker_outbound_queued_bytes") > 0, "the stalled reader's tail is kept"
    slow.sock.settimeout(10)
    assert _messages(slow, count) == [(n + 1, d) for n, d in enumerate(datas)]
    assert broker.wait_metric("broker_outbound_queued_bytes", equals=0) == 0
    # Caught up: back in the steady state, served as before.
    pub.sock.sendall(_publish("s", "after"))
    for c in (slow, fast):
        assert _messages(c, 1) == [(count + 1, "after")]
    assert broker.metric("broker_slow_consumers_total") == 0
    assert broker.metric("broker_messages_dropped_total") == 0


def test_vanished_subscribers_are_closed_and_counted_while_the_others_are_served(
    start: Callable[..., BrokerProcess], raw_ws: Ws
) -> None:
    broker = start()
    keep = [_subscriber(raw_ws, broker, "v") for _ in range(3)]
    gone = [_subscriber(raw_ws, broker, "v") for _ in range(8)]
    pub = raw_ws(broker)
    first = 20
    pub.sock.sendall(b"".join(_publish("v", f"m{i}") for i in range(first)))
    for c in keep:
        assert _messages(c, first) == [(i + 1, f"m{i}") for i in range(first)]
    _sync(pub)
    closed = broker.metric("broker_connections_closed_total", 'reason="client_gone"')
    # A burst routed while the resets arrive: sends to reset sockets fail (ECONNRESET, EPIPE),
    # or a read finds the reset first; either way each is closed once, as client_gone.
    rounds = 2000
    burst = b"".join(_publish("v", f"b{i}") for i in range(rounds))
    pub.sock.sendall(burst)
    for c in gone:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
    want = [(first + 1 + i, f"b{i}") for i in range(rounds)]
    for c in keep:
        assert _messages(c, rounds) == want
    now = broker.wait_metric(
        "broker_connections_closed_total", 'reason="client_gone"', equals=closed + len(gone)
    )
    assert now == closed + len(gone)
    pub.sock.sendall(_publish("v", "still here"))
    for c in keep:
        assert _messages(c, 1) == [(first + rounds + 1, "still here")]
    assert broker.metric("broker_internal_errors_total") == 0
    assert "Traceback" not in broker.log()


def test_a_failed_bind_changes_nothing() -> None:
    """bind resolves every slot before it keeps any: a class it refuses leaves the old layout."""
    fan = router_module._speedups
    assert fan is not None

    class Decoy:  # `out` at another offset than Session's, and no `queued`
        __slots__ = (*(f"s{i}" for i in range(12)), "out")

    with pytest.raises(AttributeError):
        fan.bind(Decoy)
    s = _session(0, SlottedSession)
    s.extra_a = []  # type: ignore[assignment]
    assert fan.fan_out((s,), b"F", [], 100) is None
    assert s.out == [b"F"] and s.queued == 1 and s.extra_a == []
