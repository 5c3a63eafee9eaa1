"""Plain HTTP on the broker's port: health, metrics, stats, publish, and the live page.

Sans-IO: a parsed request in, (status, content type, body) out. `/ws` never gets here; the
connection hands it to the WebSocket handshake. Routes (every GET route answers HEAD too, with
the same headers and no body):

    GET  /healthz           200 "ok"; 503 "degraded" while the backplane (Redis) is down
    GET  /metrics           Prometheus text, generated on request
    GET  /stats             JSON for the live page (connections, rates, busiest topics)
    GET  /connections       JSON: the connections that lag most (?sort=lag|age|dropped&limit=N)
    GET  /topics            JSON: the busiest topics (?sort=rate|subscribers&limit=N)
    POST /publish/{topic}   body = data (application/json, application/msgpack,
                            application/octet-stream) -> 202 {"delivered": n}
    GET  /history/{topic}?epoch=E&since=N&limit=L
                            the `history` op's answer as JSON (docs/protocol.md); with auth
                            on, a Bearer token whose `subscribe` claim covers the topic
    GET  /  and /client.js  the live page and the browser client, from package data

With auth on (docs/security.md), `/publish` needs `Authorization: Bearer <token>` whose `publish`
claim matches the topic, and `/stats`, `/connections` and `/topics` a token with `"admin": true`:
401 with a `WWW-Authenticate` challenge without a valid token, 403 when the token does not allow
it. `/metrics` needs the `--metrics-token` as a Bearer token when one is set. `/healthz`, `/` and
`/client.js` stay open (the page asks for a token when /stats refuses it).

With a backplane (`--workers`, `--redis`) `/publish` and `/history` go through the hub and
`/metrics` may be gathered from every worker (`metrics_source`): `handle` then returns a
`Deferred`, which the connection answers when it resolves. A publish the backplane cannot take
now is refused with 503 (and `Retry-After`).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, unquote, urlsplit

from broker.auth.permissions import Grant
from broker.auth.tokens import AuthError, bearer_token, query_token
from broker.errors import ErrorCode, HandshakeError, RequestError
from broker.pubsub.router import Router
from broker.wire import codec, messages
from broker.wire.codec import Encoding
from broker.wire.handshake import HttpRequest
from broker.wire.messages import Since, check_topic


class Response(NamedTuple):
    status: int
    body: bytes
    content_type: bytes = b"text/plain; charset=utf-8"
    headers: tuple[tuple[bytes, bytes], ...] = ()


class Deferred:
    """A response that comes later (the backplane answers); the connection sets `callback`."""

    __slots__ = ("callback", "response")

    def __init__(self) -> None:
        self.callback: Callable[[Response], None] | None = None
        self.response: Response | None = None

    def resolve(self, response: Response) -> None:
        if self.callback is None:
            self.response = response
        else:
            self.callback(response)


_RETRY = ((b"retry-after", b"1"),)


def _unavailable(message: str) -> Response:
    return _json(503, {"error": message})._replace(headers=_RETRY)


JSON_TYPE = b"application/json"
_METRICS_TYPE = b"text/plain; version=0.0.4"
_STATIC = {
    "/": ("index.html", b"text/html; charset=utf-8"),
    "/client.js": ("client.js", b"text/javascript; charset=utf-8"),
}
_NO_CACHE = ((b"cache-control", b"no-cache"),)


def _json(status: int, value: Any) -> Response:
    return Response(status, json.dumps(value).encode(), JSON_TYPE)


def _error(status: int, message: str) -> Response:
    return _json(status, {"error": message})


# RFC 6750 section 3: the challenge of a 401 (with error="invalid_token" when a token was given)
# and of a 403 (the token is valid but does not allow the request).
_CHALLENGE = b'Bearer realm="broker"'
_INVALID = ((b"www-authenticate", _CHALLENGE + b', error="invalid_token"'),)
_NO_TOKEN = ((b"www-authenticate", _CHALLENGE),)
_SCOPE = ((b"www-authenticate", _CHALLENGE + b', error="insufficient_scope"'),)


def _forbidden(message: str) -> Response:
    body = json.dumps({"error": message}).encode()
    return Response(403, body, JSON_TYPE, _SCOPE)


class HttpApi:
    def __init__(
        self,
        router: Router,
        render_metrics: Callable[[], bytes],
        snapshot: Callable[[], dict[str, Any]],
        metrics_token: str = "",
        views: Mapping[str, Callable[[Mapping[str, str]], Any]] | None = None,
    ) -> None:
        self.router = router
        # Set with --workers: gathers every process's metrics and calls back with the text.
        self.metrics_source: Callable[[Callable[[bytes], None]], None] | None = None
        # Set with --workers: /stats for the whole host (every worker's snapshot, summed).
        self.stats_source: Callable[[Callable[[dict[str, Any]], None]], None] | None = None
        # Admin JSON views by path (the server's /connections, /topics): query parameters in,
        # a JSON value out; ValueError is the caller's bad parameter (400).
        self.views = dict(views or {})
        # Set with --workers: a view for the whole host, (path, params, done) (the hub merges
        # every worker's; this worker's own answer, computed first, checks the parameters).
        self.view_source: Callable[[str, dict[str, str], Callable[[Any], None]], None] | None = None
        self.render_metrics = render_metrics
        self.snapshot = snapshot
        self.metrics_token = metrics_token.encode()
        self._static: dict[str, bytes] = {}

    def authenticate(self, req: HttpRequest, allow_query: bool = False) -> Grant | None:
        """The Grant of the request's token (None when auth is off), else HandshakeError 401.

        The token is the `Authorization: Bearer` header's; with `allow_query` (the WebSocket
        upgrade, which browsers cannot give headers) else the `?token=` query parameter's."""
        verifier = self.router.verifier
        if verifier is None:
            return None
        token = bearer_token(req.header(b"authorization"))
        if token is None and allow_query:
            token = query_token(req.target)
        try:
            return verifier.verify(token)
        except AuthError as exc:
            self.router.stats.auth_failures[exc.reason] += 1
            headers = _NO_TOKEN if token is None else _INVALID
            raise HandshakeError(401, f"unauthorized: {exc.reason}", headers) from None

    def handle(self, req: HttpRequest) -> Response | Deferred:
        try:
            return self._route(req)
        except HandshakeError as exc:
            return _json(exc.status, {"error": exc.message})._replace(headers=exc.headers)

    def _route(self, req: HttpRequest) -> Response | Deferred:
        path = req.path
        method = req.method
        if path.startswith("/publish/"):
            if method != b"POST":
                return Response(405, b"use POST\n", headers=((b"allow", b"POST"),))
            return self._publish(path[len("/publish/") :], req, self.authenticate(req))
        # HEAD is GET without the body (RFC 9110 section 9.3.2); the exchange leaves the body out.
        if method not in (b"GET", b"HEAD"):
            return Response(405, b"method not allowed\n", headers=((b"allow", b"GET, HEAD"),))
        if path.startswith("/history/"):
            return self._history(path[len("/history/") :], req, self.authenticate(req))
        if path == "/healthz":
            backplane = self.router.backplane
            if backplane is not None and not backplane.up:
                # Readiness for load balancers: publishes are refused here (docs/operations.md).
                return Response(503, b"degraded\n", headers=((b"retry-after", b"1"),))
            return Response(200, b"ok")
        if path == "/metrics":
            if self.metrics_token:
                given = bearer_token(req.header(b"authorization"))
                if given is None or not hmac.compare_digest(given.encode(), self.metrics_token):
                    headers = _NO_TOKEN if given is None else _INVALID
                    return Response(401, b"unauthorized\n", headers=headers)
            if self.metrics_source is not None:
                deferred = Deferred()
                self.metrics_source(
                    lambda text: deferred.resolve(Response(200, text, _METRICS_TYPE))
                )
                return deferred
            return Response(200, self.render_metrics(), _METRICS_TYPE)
        if path == "/stats" or path in self.views:
            grant = self.authenticate(req)
            if grant is not None and not grant.admin:
                self.router.stats.forbidden["admin"] += 1
                return _forbidden("the token is not an admin token")
            if path == "/stats" and self.stats_source is not None:
                deferred = Deferred()
                self.stats_source(
                    lambda v: deferred.resolve(
                        Response(200, json.dumps(v).encode(), JSON_TYPE, _NO_CACHE)
                    )
                )
                return deferred
            if path == "/stats":
                value = self.snapshot()
            else:
                query = urlsplit(req.target.decode("ascii", "replace")).query
                params = dict(parse_qsl(query))
                try:
                    value = self.views[path](params)
                except ValueError as exc:
                    return _error(400, str(exc))
                if self.view_source is not None:
                    deferred = Deferred()
                    self.view_source(
                        path,
                        params,
                        lambda v: deferred.resolve(
                            Response(200, json.dumps(v).encode(), JSON_TYPE, _NO_CACHE)
                        ),
                    )
                    return deferred
            return Response(200, json.dumps(value).encode(), JSON_TYPE, _NO_CACHE)
        if path in _STATIC:
            name, content_type = _STATIC[path]
            body = self._load(name)
            if body is not None:
                return Response(200, body, content_type, _NO_CACHE)
        return Response(404, b"not found\n")

    def _load(self, name: str) -> bytes | None:
        if name not in self._static:
            try:
                self._static[name] = resources.files("broker").joinpath("static", name).read_bytes()
            except OSError:
                return None
        return self._static[name]

    def _history(
        self, raw_topic: str, req: HttpRequest, grant: Grant | None
    ) -> Response | Deferred:
        try:
            topic = unquote(raw_topic, errors="strict")
            query = _query(req.target)
            since = None
            if "epoch" in query or "since" in query:
                if "epoch" not in query or "since" not in query:
                    return _error(400, "epoch and since go together")
                since = Since(messages.check_epoch(query["epoch"]), _int(query["since"], "since"))
            raw_limit = query.get("limit")
            limit = messages.check_limit(None if raw_limit is None else _int(raw_limit, "limit"))
            req_topic = messages.check_history_topic(topic)
        except UnicodeDecodeError:
            return _error(400, "not valid UTF-8")
        except RequestError as exc:
            return _error(400, exc.message)
        if grant is not None and not grant.may_subscribe(req_topic):
            self.router.stats.forbidden["history"] += 1
            return _forbidden("the token does not allow reading this topic")
        if self.router.backplane is not None:
            return self._history_remote(req_topic, since, limit)
        return _history_response(self.router.history_body(req_topic, since, limit, Encoding.JSON))

    def _history_remote(self, topic: str, since: Since | None, limit: int) -> Response | Deferred:
        backplane = self.router.backplane
        assert backplane is not None
        deferred = Deferred()

        def done(result: Any) -> None:
            if isinstance(result, RequestError):
                deferred.resolve(_unavailable(result.message))
                return
            epoch, seq, recovered, found = result
            body = messages.history_body(epoch, seq, recovered, found, Encoding.JSON)
            deferred.resolve(_history_response(body))

        try:
            budget = self.router.config.max_message_size
            backplane.history(topic, since, limit, budget, done)
        except RequestError as exc:
            return _unavailable(exc.message)
        return deferred

    def _publish(
        self, raw_topic: str, req: HttpRequest, grant: Grant | None
    ) -> Response | Deferred:
        try:
            topic = check_topic(unquote(raw_topic, errors="strict"), pattern=False)
        except UnicodeDecodeError:
            return _error(400, "topic is not valid UTF-8")
        except RequestError as exc:
            return _error(400, exc.message)
        if grant is not None and not grant.may_publish(topic):
            self.router.stats.forbidden["publish"] += 1
            return _forbidden("the token does not allow publishing to this topic")
        content_type = (req.header(b"content-type") or JSON_TYPE).split(b";")[0].strip().lower()
        data: Any
        if content_type == b"application/octet-stream":
            data = req.body
        elif content_type in (JSON_TYPE, b"application/msgpack", b"application/x-msgpack"):
            try:
                data = codec.decode(req.body, binary=content_type != JSON_TYPE)
            except codec.DecodeError as exc:
                return _error(400, f"invalid body: {exc}")
        else:
            return _error(415, "content-type must be application/json, msgpack or octet-stream")
        if self.router.backplane is None:
            return _json(202, {"delivered": self.router.publish(topic, data, len(req.body))})
        deferred = Deferred()

        def done(result: Any) -> None:
            if isinstance(result, RequestError):
                deferred.resolve(_unavailable(result.message))
            else:
                deferred.resolve(_json(202, {"delivered": result[2]}))

        try:
            self.router.publish_remote(topic, data, len(req.body), done)
        except RequestError as exc:
            return _unavailable(exc.message)
        return deferred


def _history_response(body: dict[str, Any]) -> Response:
    try:
        payload = codec.encode_payload(body, Encoding.JSON)
    except codec.EncodeError:  # a map with binary keys: no JSON form
        body["messages"] = [m for m in body["messages"] if _encodable(m)]
        payload = codec.encode_payload(body, Encoding.JSON)
    return Response(200, payload, JSON_TYPE, _NO_CACHE)


def _query(target: bytes) -> dict[str, str]:
    """The query string's parameters; a repeated one, or a malformed query, is refused."""
    _, _, raw = target.partition(b"?")
    try:
        pairs = parse_qsl(
            raw.decode("ascii"),
            keep_blank_values=True,
            strict_parsing=bool(raw),
            errors="strict",
            max_num_fields=16,
        )
    except ValueError as exc:  # includes UnicodeDecodeError
        raise RequestError(ErrorCode.BAD_REQUEST, f"bad query string: {exc}") from None
    query: dict[str, str] = {}
    for key, value in pairs:
        if key in query:
            raise RequestError(ErrorCode.BAD_REQUEST, f"{key} given twice")
        query[key] = value
    return query


def _int(text: str, name: str) -> int:
    # Decimal digits only: int() would also take "+5", " 5", "5_000" and other spellings.
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        raise RequestError(ErrorCode.BAD_REQUEST, f"{name} must be a non-negative integer")
    return messages.check_seq(int(text))


def _encodable(message: dict[str, Any]) -> bool:
    try:
        codec.encode_payload(message, Encoding.JSON)
    except codec.EncodeError:
        return False
    return True
