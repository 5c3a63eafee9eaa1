"""HTTP/1.1 on the broker's port, up to the WebSocket upgrade (RFC 9112 via h11, RFC 6455 s. 4).

Theory of operation: every connection starts as an `HttpExchange` around an `h11.Connection`. Bytes
go in with `receive`; a complete request (with its body, capped) comes out, or `HandshakeError`
with the status to answer. The caller routes it: `/ws` goes through `accept_upgrade`, which checks
the upgrade headers (wsproto's rules, plus a strict `Sec-WebSocket-Key` check wsproto leaves out),
picks the subprotocol and returns the 101 response; any other path gets `respond`. After a 101,
`trailing_data` holds the bytes the client sent behind its request (its first frames), and the
exchange is dropped: frames need no object (wire.inbound), only a few slots of the connection.

The 101 is built here, not by `wsproto.WSConnection`: that facade re-serialises and re-parses the
request through a second h11 pair per connection, which costs connect rate during storms for no
extra checking (the checks below are the same ones).
"""

from __future__ import annotations

import base64
import binascii
from http import HTTPStatus
from typing import NamedTuple

import h11
from wsproto.utilities import generate_accept_token

from broker.errors import HandshakeError
from broker.wire.codec import SUBPROTOCOLS, Encoding

MAX_HEADER_BYTES = 16 * 1024
WS_VERSION = b"13"


class HttpRequest(NamedTuple):
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    @property
    def path(self) -> str:
        return self.target.split(b"?", 1)[0].decode("ascii", "replace")

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


class Upgrade(NamedTuple):
    response: bytes
    encoding: Encoding
    trailing_data: bytes


def _tokens(value: bytes) -> list[bytes]:
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


class HttpExchange:
    """One HTTP connection: parse requests (bodies capped at `max_body`), write responses."""

    __slots__ = ("_body", "_body_size", "_h11", "_max_body", "_request", "_start", "waiting")

    def __init__(self, max_body: int) -> None:
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self._max_body = max_body
        self._request: h11.Request | None = None
        self._body: list[bytes] = []
        self._body_size = 0
        # The first bytes of the request in progress: a request h11 refuses still gets a HEAD
        # answer (no body) when it began with "HEAD ", as its sender will read it that way.
        self._start = b""
        # A response is owed that the broker's backplane has not answered yet (http_api's
        # Deferred): pipelined bytes wait in h11 until it is written.
        self.waiting = False

    def receive(self, data: bytes) -> HttpRequest | None:
        """Feed bytes (b"" for EOF); a whole request once one is complete, else None."""
        if len(self._start) < 5 and self._request is None:
            self._start += data[: 5 - len(self._start)]
        if data or self._h11.their_state is not h11.DONE:
            self._h11.receive_data(data)
        return self.next_request()

    def next_request(self) -> HttpRequest | None:
        """The next complete request already buffered (pipelined clients), else None."""
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                # h11's message may quote the client's bytes; answer with the status only.
                status = exc.error_status_hint
                raise HandshakeError(status, f"malformed HTTP request ({status})") from None
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return None
            if isinstance(event, h11.Request):
                self._request = event
                length = _content_length(event)
                if length is not None and length > self._max_body:
                    raise HandshakeError(413, "request body too large")
            elif isinstance(event, h11.Data):
                self._body_size += len(event.data)
                if self._body_size > self._max_body:
                    raise HandshakeError(413, "request body too large")
                self._body.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                req = self._request
                assert req is not None
                body = b"".join(self._body)
                self._body = []
                self._body_size = 0
                return HttpRequest(req.method, req.target, list(req.headers), body)
            elif isinstance(event, h11.ConnectionClosed):
                return None

    def respond(
        self,
        status: int,
        body: bytes,
        content_type: bytes = b"text/plain; charset=utf-8",
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> bytes:
        """The whole response; afterwards the exchange is ready for the next request or closing.

        The answer to a HEAD request carries the headers (Content-Length included) and no body
        (RFC 9110 section 9.3.2); h11 refuses to send one, so it is left out here, for every
        status, refusals included.
        """
        hdrs = [
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
            *headers,
        ]
        if self._h11.their_state is not h11.DONE and (b"connection", b"close") not in headers:
            # The request was cut short (an error mid-request): h11 cannot keep the connection.
            hdrs.append((b"connection", b"close"))
        head = self._head
        if head and self._request is None:
            # A HEAD request h11 refused: h11 would expect the body, so write the answer by hand.
            return _plain_response(status, b"", hdrs)
        try:
            response = h11.Response(status_code=status, headers=hdrs, reason=_reason(status))
            out = self._h11.send(response) or b""
        except h11.LocalProtocolError:
            # h11 is in an error state (a malformed request): write the response by hand.
            return _plain_response(status, b"" if head else body, hdrs)
        if not head:
            out += self._h11.send(h11.Data(data=body)) or b""
        out += self._h11.send(h11.EndOfMessage()) or b""
        return out

    @property
    def _head(self) -> bool:
        if self._request is None:
            return self._start == b"HEAD "
        return self._request.method == b"HEAD"

    @property
    def must_close(self) -> bool:
        return self._h11.our_state is not h11.DONE or self._h11.their_state is not h11.DONE

    def next_cycle(self) -> bool:
        """Ready the connection for the next request (keep-alive); False if it must close."""
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
            self._request = None
            self._start = bytes(self._h11.trailing_data[0][:5])  # a pipelined next request
            return True
        return False

    @property
    def idle(self) -> bool:
        """No request in progress: an idle keep-alive connection."""
        return self._h11.their_state is h11.IDLE and not self._h11.trailing_data[0]

    def accept_upgrade(
        self,
        request: HttpRequest,
        checked: tuple[bytes, Encoding, str | None] | None = None,
        extra: tuple[tuple[bytes, bytes], ...] = (),
    ) -> Upgrade:
        """Check an upgrade request (RFC 6455 section 4.2.1) and answer it with 101.

        `checked` is `check_upgrade(request)` when the caller already ran it (it authenticates
        between the check and the 101)."""
        key, encoding, subprotocol = checked or check_upgrade(request)
        headers = [
            (b"upgrade", b"websocket"),
            (b"connection", b"Upgrade"),
            (b"sec-websocket-accept", generate_accept_token(key)),
        ]
        if subprotocol is not None:
            headers.append((b"sec-websocket-protocol", subprotocol.encode()))
        headers.extend(extra)
        response = self._h11.send(
            h11.InformationalResponse(
                status_code=101, headers=headers, reason=b"Switching Protocols"
            )
        )
        return Upgrade(response or b"", encoding, self._h11.trailing_data[0])


def check_upgrade(request: HttpRequest) -> tuple[bytes, Encoding, str | None]:
    """(key, encoding, chosen subprotocol) of a valid upgrade request, else HandshakeError."""
    if request.method != b"GET":
        raise HandshakeError(400, "a WebSocket upgrade must be a GET")
    connection: list[bytes] = []
    upgrade: list[bytes] = []
    offered: list[str] = []
    key = version = None
    for name, value in request.headers:
        if name == b"connection":
            connection += _tokens(value)
        elif name == b"upgrade":
            upgrade += _tokens(value)
        elif name == b"sec-websocket-key":
            key = value
        elif name == b"sec-websocket-version":
            version = value
        elif name == b"sec-websocket-protocol":
            offered += [t.decode("ascii", "replace") for t in _tokens(value)]
    if b"upgrade" not in connection or b"websocket" not in upgrade:
        raise HandshakeError(400, "not a WebSocket upgrade (Connection/Upgrade headers)")
    if version != WS_VERSION:
        # Section 4.4: answer an unsupported version with the versions we speak.
        raise HandshakeError(
            426 if version else 400,
            "unsupported Sec-WebSocket-Version",
            ((b"sec-websocket-version", WS_VERSION),),
        )
    if key is None or not _valid_key(key):
        raise HandshakeError(400, "Sec-WebSocket-Key must be 16 bytes in base64")
    # The client lists subprotocols in its order of preference (section 4.1); take the first we
    # speak. Offering only unknown ones is not an error: we select none and speak JSON, and a
    # client that required one fails the connection itself (section 4.1, step 6 of the response).
    for proto in offered:
        if proto in SUBPROTOCOLS:
            return key, SUBPROTOCOLS[proto], proto
    return key, Encoding.JSON, None


def _valid_key(key: bytes) -> bool:
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except binascii.Error:
        return False


def _content_length(request: h11.Request) -> int | None:
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)  # h11 has already checked it is a number
    return None


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _plain_response(status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    lines = [b"HTTP/1.1 %d %s" % (status, _reason(status))]
    lines += [k + b": " + v for k, v in headers if k != b"connection"]
    lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
