"""Plain HTTP on the broker's port: health, metrics, stats, publish, and the live page.

Sans-IO: a parsed request in, (status, content type, body) out. `/ws` never gets here; the
connection hands it to the WebSocket handshake. Routes (every GET route answers HEAD too, with
the same headers and no body):

    GET  /healthz           200 "ok"
    GET  /metrics           Prometheus text, generated on request
    GET  /stats             JSON for the live page (connections, rates, busiest topics)
    POST /publish/{topic}   body = data (application/json, application/msgpack,
                            application/octet-stream) -> 202 {"delivered": n}
    GET  /  and /client.js  the live page and the browser client, from package data
"""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib import resources
from typing import Any, NamedTuple
from urllib.parse import unquote

from broker.errors import RequestError
from broker.pubsub.router import Router
from broker.wire import codec
from broker.wire.handshake import HttpRequest
from broker.wire.messages import check_topic


class Response(NamedTuple):
    status: int
    body: bytes
    content_type: bytes = b"text/plain; charset=utf-8"
    headers: tuple[tuple[bytes, bytes], ...] = ()


JSON_TYPE = b"application/json"
_STATIC = {
    "/": ("index.html", b"text/html; charset=utf-8"),
    "/client.js": ("client.js", b"text/javascript; charset=utf-8"),
}
_NO_CACHE = ((b"cache-control", b"no-cache"),)


def _json(status: int, value: Any) -> Response:
    return Response(status, json.dumps(value).encode(), JSON_TYPE)


def _error(status: int, message: str) -> Response:
    return _json(status, {"error": message})


class HttpApi:
    def __init__(
        self,
        router: Router,
        render_metrics: Callable[[], bytes],
        snapshot: Callable[[], dict[str, Any]],
    ) -> None:
        self.router = router
        self.render_metrics = render_metrics
        self.snapshot = snapshot
        self._static: dict[str, bytes] = {}

    def handle(self, req: HttpRequest) -> Response:
        path = req.path
        method = req.method
        if path.startswith("/publish/"):
            if method != b"POST":
                return Response(405, b"use POST\n", headers=((b"allow", b"POST"),))
            return self._publish(path[len("/publish/") :], req)
        # HEAD is GET without the body (RFC 9110 section 9.3.2); the exchange leaves the body out.
        if method not in (b"GET", b"HEAD"):
            return Response(405, b"method not allowed\n", headers=((b"allow", b"GET, HEAD"),))
        if path == "/healthz":
            return Response(200, b"ok")
        if path == "/metrics":
            return Response(200, self.render_metrics(), b"text/plain; version=0.0.4")
        if path == "/stats":
            return Response(200, json.dumps(self.snapshot()).encode(), JSON_TYPE, _NO_CACHE)
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

    def _publish(self, raw_topic: str, req: HttpRequest) -> Response:
        try:
            topic = check_topic(unquote(raw_topic, errors="strict"), pattern=False)
        except UnicodeDecodeError:
            return _error(400, "topic is not valid UTF-8")
        except RequestError as exc:
            return _error(400, exc.message)
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
        return _json(202, {"delivered": self.router.publish(topic, data)})
