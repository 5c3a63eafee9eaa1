"""The frame parser (broker/wire/inbound.py) against wsproto, on generated frame sequences.

The reference is wsproto's server-side `Connection` fed one byte at a time, with the broker's one
addition to it: a data frame whose header announces more than the limit (counting the message's
earlier fragments) is refused with 1009 as soon as that header is complete. The parser must give
the same messages, pings, peer close (code and reason) or violation (close code), whether the
bytes arrive whole, byte by byte, or cut in two at any point.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

from broker.wire import inbound
from broker.wire.inbound import Message, PeerClose, close_frame, parse, unmask

LIMIT = 300


@dataclass(frozen=True)
class Frame:
    opcode: int
    payload: bytes
    fin: bool = True
    rsv: int = 0
    masked: bool = True
    form: int = 0  # 0: shortest length form; 2 or 8: that many extended length bytes
    announce: int | None = None  # a length to announce instead of the payload's (header only)
    key: bytes = b"\x37\xfa\x21\x3d"

    @property
    def length(self) -> int:
        return len(self.payload) if self.announce is None else self.announce

    def header(self) -> bytes:
        n = self.length
        first = (0x80 if self.fin else 0) | (self.rsv << 4) | self.opcode
        mask_bit = 0x80 if self.masked else 0
        form = self.form or (0 if n < 126 else 2 if n < 0x10000 else 8)
        if form == 0:
            head = bytes((first, mask_bit | n))
        elif form == 2:
            head = bytes((first, mask_bit | 126)) + struct.pack("!H", n & 0xFFFF)
        else:
            head = bytes((first, mask_bit | 127)) + struct.pack("!Q", n)
        return head + (self.key if self.masked else b"")

    def encode(self) -> bytes:
        if self.announce is not None:
            return self.header()
        body = self.payload
        if self.masked:
            body = bytes(b ^ self.key[i % 4] for i, b in enumerate(body))
        return self.header() + body


Outcome = tuple[list[object], tuple[str, int, str] | None]

C_SPEEDUP = inbound._speedups  # wire/_speedups.c, or None when not built
TWINS = ("c", "python")


@contextlib.contextmanager
def speedup(twin: str) -> Iterator[None]:
    """Parse with the C speedup of the common case ("c") or with the Python parser alone."""
    saved = inbound._speedups
    inbound._speedups = C_SPEEDUP if twin == "c" else None
    try:
        yield
    finally:
        inbound._speedups = saved


def reference(frames: list[Frame], limit: int = LIMIT) -> Outcome:
    """wsproto, byte by byte, plus the 1009-at-the-header rule."""
    ws = Connection(ConnectionType.SERVER)
    events: list[object] = []
    parts: list[str | bytes] = []
    in_message = 0  # bytes of the fragmented message so far
    for frame in frames:
        data = frame.encode()
        header_end = len(frame.header())
        for i in range(len(data)):
            ws.receive_data(data[i : i + 1])
            for event in ws.events():
                if isinstance(event, TextMessage | BytesMessage):
                    parts.append(event.data)
                    if event.message_finished:
                        text = isinstance(event, TextMessage)
                        events.append("".join(parts) if text else b"".join(parts))  # type: ignore[arg-type]
                        parts = []
                elif isinstance(event, Ping):
                    events.append(inbound.Ping(bytes(event.payload)))
                elif isinstance(event, CloseConnection):
                    if ws.state is ConnectionState.REMOTE_CLOSING:
                        return events, ("close", event.code, event.reason)
                    return events, ("violation", event.code, "")
            if i + 1 == header_end and frame.opcode in (0, 1, 2) and frame.masked:
                size = frame.length + (in_message if frame.opcode == 0 else 0)
                if size > limit:
                    return events, ("violation", 1009, "")
        if frame.opcode in (1, 2):
            in_message = 0 if frame.fin else len(frame.payload)
        elif frame.opcode == 0:
            in_message = 0 if frame.fin else in_message + len(frame.payload)
        if frame.announce is not None:
            break  # nothing follows a header-only frame
    return events, None


def drive(chunks: list[bytes], limit: int = LIMIT) -> Outcome:
    """The parser as a connection uses it: what it did not consume is kept for the next chunk."""
    rest = b""
    message: Message | None = None
    events: list[object] = []
    for chunk in chunks:
        data = rest + chunk
        used, need, message, end = parse(data, message, limit, events)  # type: ignore[arg-type]
        if end is not None:
            if isinstance(end, PeerClose):
                return events, ("close", end.code, end.reason)
            return events, ("violation", end.code, "")
        rest = data[used:]
        assert need == 0 or need > len(rest)
    return events, None


def stream(frames: list[Frame]) -> bytes:
    out = b""
    for frame in frames:
        out += frame.encode()
        if frame.announce is not None:
            break
    return out


# -- strategies ------------------------------------------------------------------------------

texts = st.text(max_size=40).map(str.encode)
bad_utf8 = st.sampled_from(
    [b"\xff", b"caf\xc3", b"\xed\xa0\x80", b"ok\xc0\xaf", b"\xf4\x90\x80\x80"]
)
payloads = st.one_of(
    texts,
    st.binary(max_size=40),
    st.binary(min_size=120, max_size=LIMIT + 40),
    st.tuples(texts, bad_utf8, texts).map(b"".join),
)
close_codes = st.sampled_from(
    [
        1000,
        1001,
        1002,
        1003,
        1004,
        1005,
        1006,
        1007,
        1009,
        1011,
        1014,
        1015,
        1016,
        2999,
        3000,
        4001,
        4999,
        5000,
        999,
        0,
    ]
)
close_payloads = st.one_of(
    st.just(b""),
    st.binary(min_size=1, max_size=1),
    st.tuples(close_codes.map(lambda c: struct.pack("!H", c)), st.one_of(texts, bad_utf8)).map(
        b"".join
    ),
)


@st.composite
def frames_(draw: st.DrawFn) -> Frame:
    kind = draw(st.integers(0, 19))
    if kind < 10:  # the common case
        return Frame(draw(st.sampled_from([1, 2])), draw(payloads))
    if kind < 14:  # fragments
        return Frame(draw(st.sampled_from([0, 0, 1, 2])), draw(payloads), fin=draw(st.booleans()))
    if kind == 14:
        return Frame(draw(st.sampled_from([9, 10])), draw(st.binary(max_size=20)))
    if kind == 15:
        return Frame(8, draw(close_payloads))
    if kind == 16:  # a header-only frame announcing more than the limit
        return Frame(
            draw(st.sampled_from([0, 1, 2])),
            b"",
            fin=draw(st.booleans()),
            announce=draw(st.sampled_from([LIMIT + 1, 70_000, 1 << 40])),
        )
    if kind == 17:  # lengths in a longer form than needed, or with the MSB set
        form = draw(st.sampled_from([2, 8]))
        payload = draw(st.binary(max_size=130))
        if form == 8 and draw(st.booleans()):
            return Frame(2, b"", announce=(1 << 63) + 5, form=8)
        return Frame(draw(st.sampled_from([1, 2, 9])), payload, form=form)
    # broken headers: reserved bits, unmasked, unknown opcodes, fragmented or long control frames
    return Frame(
        draw(st.sampled_from(list(range(16)))),
        draw(st.binary(max_size=130)),
        fin=draw(st.booleans()),
        rsv=draw(st.sampled_from([0, 0, 1, 2, 4, 7])),
        masked=draw(st.booleans()),
    )


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(frames_(), max_size=8))
@example([Frame(1, b'{"op":"ping"}'), Frame(2, b"\x81\xa2op\xa4ping")])
@example([Frame(1, b"caf\xc3", fin=False), Frame(9, b"x"), Frame(0, b"\xa9!", fin=True)])
@example([Frame(1, b"x" * 200, fin=False), Frame(0, b"", announce=101)])  # 1009 on the total
@example([Frame(8, struct.pack("!H", 4000) + b"bye")])
@example([Frame(2, b"x" * 126, form=8)])
@example([Frame(9, b"x" * 126)])  # a control frame over 125 bytes
def test_agrees_with_wsproto_at_every_split(frames: list[Frame]) -> None:
    expected = reference(frames)
    data = stream(frames)
    for twin in TWINS:  # the C speedup of the common case, then the Python parser alone
        with speedup(twin):
            assert drive([data]) == expected, twin
            for cut in range(len(data) + 1):
                assert drive([data[:cut], data[cut:]]) == expected, (twin, cut)
            assert drive([data[i : i + 1] for i in range(len(data))]) == expected, twin


def test_the_c_speedup_is_in_use() -> None:
    # Built by the test command's install; without it the test above compares Python twice.
    assert C_SPEEDUP is not None, "broker/wire/_speedups.c not built (pip install -e . needs gcc)"


def test_the_c_speedup_stops_at_the_first_other_frame() -> None:
    assert C_SPEEDUP is not None
    first = Frame(1, "zé".encode()).encode()
    common = first + Frame(2, b"\x00" * 300).encode()
    for other in (
        Frame(9, b"p"),  # a ping
        Frame(1, b"caf\xc3"),  # not UTF-8
        Frame(2, b"x" * (LIMIT + 1)),  # over the limit
        Frame(1, b"x", fin=False),  # a fragment
        Frame(2, b"x" * 70_000, form=8),  # a 64-bit length
        Frame(1, b"x", masked=False),
        Frame(1, b"x", rsv=4),
    ):
        data = common + other.encode() + common
        out: list[object] = []
        assert C_SPEEDUP.frames(data, 0, LIMIT, out) == len(common), other
        assert out == ["zé", b"\x00" * 300]
    for cut in range(len(common)):  # an incomplete frame stops it too
        out = []
        whole = cut >= len(first)
        assert C_SPEEDUP.frames(common[:cut], 0, LIMIT, out) == (len(first) if whole else 0)
        assert out == (["zé"] if whole else [])


def test_header_announcing_too_much_is_refused_before_its_payload() -> None:
    # Only the header and masking key have arrived: 1009 at once, nothing buffered.
    for length in (LIMIT + 1, 70_000, 1 << 40):
        head = Frame(2, b"", announce=length).header()
        assert drive([head[:-1]]) == ([], None)
        assert drive([head]) == ([], ("violation", 1009, ""))


def test_need_counts_the_whole_frame() -> None:
    data = Frame(1, b"x" * 200).encode()
    events: list[object] = []
    used, need, message, end = parse(data[:10], None, LIMIT, events)  # type: ignore[arg-type]
    assert (used, need, message, end, events) == (0, len(data), None, None, [])


@given(st.binary(max_size=2000), st.binary(min_size=4, max_size=4))
def test_unmask_matches_the_rfc_definition(payload: bytes, key: bytes) -> None:
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    assert unmask(b"hd" + key + masked, 2, len(payload)) == payload


def test_close_frame_matches_wsproto() -> None:
    ws = Connection(ConnectionType.SERVER)
    for code, reason in ((1000, ""), (1009, "message over 1000 bytes"), (1002, "é" * 100)):
        ws = Connection(ConnectionType.SERVER)
        assert close_frame(code, reason) == ws.send(CloseConnection(code=code, reason=reason))
