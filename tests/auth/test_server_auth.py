"""Authentication and authorisation end to end: a broker process with auth on, real tokens, the
`websockets` client and raw sockets (to read exactly what a refused upgrade gets)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.conftest import BrokerProcess

from .keys import SECRET, claims, sign, write_jwks, write_public_key

_OPEN = contextlib.ExitStack()


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    with _OPEN:
        yield


Factory = Callable[..., BrokerProcess]


@pytest.fixture
def secured(broker_factory: Factory) -> BrokerProcess:
    return broker_factory("--auth-secret", SECRET, "--auth-leeway", "1")


def ws(broker: BrokerProcess, token: str | None = None, query: bool = False) -> ClientConnection:
    url, headers = broker.url, {}
    if token is not None and query:
        url += "?token=" + urllib.request.quote(token, safe="")
    elif token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return _OPEN.enter_context(connect(url, additional_headers=headers, open_timeout=5))


def request(c: ClientConnection, msg: dict[str, Any]) -> dict[str, Any]:
    """Send and return the reply with the same id (deliveries before it are skipped)."""
    c.send(json.dumps(msg))
    while True:
        reply = json.loads(c.recv(5))
        if reply.get("id") == msg.get("id") and reply["op"] != "message":
            return reply


def raw_upgrade(broker: BrokerProcess, extra: str = "", target: str = "/ws") -> tuple[int, str]:
    """(status, head + body) of an upgrade sent by hand."""
    key = base64.b64encode(os.urandom(16)).decode()
    req = (
        f"GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
    with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as s:
        s.sendall(req.encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]), data.decode(errors="replace")


def http(
    broker: BrokerProcess, path: str, token: str | None = None, body: bytes | None = None
) -> tuple[int, Message, bytes]:
    """(status, headers (case-insensitive), body)."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(broker.http + path, data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers, err.read()


def metric(broker: BrokerProcess, name: str, labels: str, token: str | None = None) -> float:
    status, _, body = http(broker, "/metrics", token)
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith(f"{name}{{{labels}}} "):
            return float(line.split()[-1])
    raise KeyError(name)


# -- the upgrade ----------------------------------------------------------------------------------


def test_upgrade_without_a_token_gets_401_and_a_challenge(secured: BrokerProcess) -> None:
    status, text = raw_upgrade(secured)
    assert status == 401
    assert 'www-authenticate: Bearer realm="broker"\r\n' in text
    assert "invalid_token" not in text
    assert metric(secured, "broker_auth_failures_total", 'reason="missing"') == 1


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("garbage", "malformed"),
        (sign(claims(), key="x" * 40), "signature"),
        (sign(claims(exp=int(time.time()) - 10)), "expired"),
        # Signed at collection: far enough ahead to stay not yet valid through a long run.
        (sign(claims(nbf=int(time.time()) + 86400)), "not_yet_valid"),
    ],
)
def test_upgrade_with_a_bad_token_gets_401_invalid_token(
    secured: BrokerProcess, token: str, reason: str
) -> None:
    for extra, target in (
        (f"Authorization: Bearer {token}\r\n", "/ws"),
        ("", f"/ws?token={token}"),
    ):
        status, text = raw_upgrade(secured, extra, target)
        assert status == 401, text
        assert 'Bearer realm="broker", error="invalid_token"' in text
        assert reason in text  # the body says why (the reason is no secret)
    assert metric(secured, "broker_auth_failures_total", f'reason="{reason}"') == 2
    with pytest.raises(InvalidStatus) as info:
        ws(secured, token)
    assert info.value.response.status_code == 401


def test_an_invalid_upgrade_is_refused_before_authentication(secured: BrokerProcess) -> None:
    # The upgrade's own validity is checked first: no token needed to learn it is malformed.
    key_missing = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    with socket.create_connection(("127.0.0.1", secured.port), timeout=5) as s:
        s.sendall(key_missing.encode())
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    assert metric(secured, "broker_auth_failures_total", 'reason="missing"') == 0


def test_header_and_query_tokens_open_the_socket(secured: BrokerProcess) -> None:
    token = sign(claims(["a.>"], ["a.>"]))
    for query in (False, True):
        c = ws(secured, token, query)
        assert request(c, {"op": "subscribe", "topic": "a.*", "id": 1}) == {"op": "ack", "id": 1}


# -- publish and subscribe ------------------------------------------------------------------------


def test_forbidden_publish_and_subscribe(secured: BrokerProcess) -> None:
    watcher = ws(secured, sign(claims([], [">"])))
    assert request(watcher, {"op": "subscribe", "topic": ">", "id": 1})["op"] == "ack"
    c = ws(secured, sign(claims(["chat.*"], ["chat.>"])))
    refused = request(c, {"op": "publish", "topic": "admin.x", "data": 1, "id": "p1"})
    assert refused["op"] == "error" and refused["code"] == "forbidden" and refused["id"] == "p1"
    refused = request(c, {"op": "subscribe", "topic": ">", "id": "s1"})
    assert (refused["code"], refused["id"]) == ("forbidden", "s1")
    assert request(c, {"op": "subscribe", "topic": "chat.*.x", "id": 2}) == {"op": "ack", "id": 2}
    ok = request(c, {"op": "publish", "topic": "chat.room", "data": 2, "id": 3})
    assert ok == {"op": "ack", "id": 3, "delivered": 1}
    # The watcher sees the allowed publish only: the refused one was never delivered.
    assert json.loads(watcher.recv(5))["topic"] == "chat.room"
    assert request(watcher, {"op": "ping", "id": 9}) == {"op": "pong", "id": 9}
    assert metric(secured, "broker_forbidden_total", 'op="publish"') == 1
    assert metric(secured, "broker_forbidden_total", 'op="subscribe"') == 1
    # The connection stays open after refusals.
    assert request(c, {"op": "ping", "id": 4}) == {"op": "pong", "id": 4}


# -- re-authentication ---------------------------------------------------------------------------


def test_auth_op_replaces_the_grant_and_lists_revoked(secured: BrokerProcess) -> None:
    c = ws(secured, sign(claims(["a.x"], ["a.>", "b.>"])))
    for i, topic in enumerate(["a.*", "a.x.>", "b.y", "b.>"]):
        assert request(c, {"op": "subscribe", "topic": topic, "id": i})["op"] == "ack"
    new = sign(claims(["b.x"], ["a.*", "b.y"]))
    reply = request(c, {"op": "auth", "token": new, "id": "r"})
    assert reply == {"op": "ack", "id": "r", "revoked": ["a.x.>", "b.>"]}
    assert request(c, {"op": "publish", "topic": "a.x", "data": 0, "id": 5})["code"] == "forbidden"
    got = request(c, {"op": "publish", "topic": "b.x", "data": 0, "id": 6})
    assert got == {"op": "ack", "id": 6, "delivered": 0}  # b.> was revoked, b.y does not match
    assert request(c, {"op": "unsubscribe", "topic": "b.>", "id": 7})["code"] == "not_found"


def test_an_invalid_auth_changes_nothing(secured: BrokerProcess) -> None:
    c = ws(secured, sign(claims(["a"], ["a"])))
    assert request(c, {"op": "subscribe", "topic": "a", "id": 1})["op"] == "ack"
    for bad in ("nope", sign(claims([">"], [">"]), key="y" * 40), sign(claims(ttl=-60))):
        reply = request(c, {"op": "auth", "token": bad, "id": 2})
        assert (reply["op"], reply["code"], reply["id"]) == ("error", "unauthorized", 2)
    assert request(c, {"op": "auth", "id": 3})["code"] == "bad_request"
    assert request(c, {"op": "publish", "topic": "a", "data": 1, "id": 4})["delivered"] == 1
    assert request(c, {"op": "publish", "topic": "b", "data": 1, "id": 5})["code"] == "forbidden"
    assert metric(secured, "broker_auth_failures_total", 'reason="signature"') == 1


def test_auth_op_with_auth_off_is_acked(broker: BrokerProcess) -> None:
    c = ws(broker)
    assert request(c, {"op": "auth", "token": "anything", "id": 1}) == {
        "op": "ack",
        "id": 1,
        "revoked": [],
    }


# -- expiry ---------------------------------------------------------------------------------------


def test_expiry_closes_4001_within_a_second_of_exp_plus_leeway(secured: BrokerProcess) -> None:
    exp = int(time.time()) + 2
    c = ws(secured, sign(claims([">"], [">"], exp=exp)))
    refreshed = ws(secured, sign(claims([">"], [">"], exp=exp)))
    # Refreshing with a later token keeps that connection open past the first expiry.
    reply = request(refreshed, {"op": "auth", "token": sign(claims([">"], [">"], ttl=60)), "id": 1})
    assert reply["revoked"] == []
    with pytest.raises(ConnectionClosed) as info:
        while True:
            c.recv(10)
    closed_at = time.time()
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (4001, "token expired")
    due = exp + 1  # leeway 1 s
    assert due - 0.05 <= closed_at <= due + 1.0, closed_at - due
    assert request(refreshed, {"op": "ping", "id": 2}) == {"op": "pong", "id": 2}
    assert (
        secured.wait_metric("broker_connections_closed_total", 'reason="token_expired"', equals=1)
        == 1
    )


def test_a_refresh_to_a_sooner_expiry_closes_at_the_sooner_one(secured: BrokerProcess) -> None:
    c = ws(secured, sign(claims([">"], [">"], ttl=120)))
    exp = int(time.time()) + 2
    assert (
        request(c, {"op": "auth", "token": sign(claims([], [], exp=exp)), "id": 1})["op"] == "ack"
    )
    with pytest.raises(ConnectionClosed) as info:
        while True:
            c.recv(10)
    assert info.value.rcvd is not None and info.value.rcvd.code == 4001
    assert exp + 1 - 0.05 <= time.time() <= exp + 1 + 1.0


# -- HTTP -----------------------------------------------------------------------------------------


def test_http_publish_needs_a_token_that_allows_the_topic(secured: BrokerProcess) -> None:
    status, headers, _ = http(secured, "/publish/a.b", body=b"1")
    assert status == 401 and headers["WWW-Authenticate"] == 'Bearer realm="broker"'
    status, headers, _ = http(secured, "/publish/a.b", "junk", b"1")
    assert status == 401 and "invalid_token" in headers["WWW-Authenticate"]
    token = sign(claims(["a.*"]))
    status, headers, _ = http(secured, "/publish/z.b", token, b"1")
    assert status == 403 and "insufficient_scope" in headers["WWW-Authenticate"]
    status, _, body = http(secured, "/publish/a.b", token, b"1")
    assert (status, json.loads(body)) == (202, {"delivered": 0})
    assert metric(secured, "broker_forbidden_total", 'op="publish"') == 1


def test_stats_need_an_admin_token(secured: BrokerProcess) -> None:
    assert http(secured, "/stats")[0] == 401
    assert http(secured, "/stats", sign(claims()))[0] == 403
    status, _, body = http(secured, "/stats", sign(claims(admin=True)))
    assert status == 200 and "connections" in json.loads(body)
    assert http(secured, "/healthz")[0] == 200
    assert http(secured, "/")[0] == 200  # the page itself is open; it asks for a token
    assert metric(secured, "broker_forbidden_total", 'op="admin"') == 1


def test_metrics_token(broker_factory: Factory, tmp_path: Path) -> None:
    b = broker_factory("--metrics-token", "m" * 20)
    assert http(b, "/metrics")[0] == 401
    assert http(b, "/metrics", "wrong")[0] == 401
    assert http(b, "/metrics", "m" * 20)[0] == 200
    assert http(b, "/stats")[0] == 200  # auth off: only /metrics is guarded
    token_file = tmp_path / "metrics-token"
    token_file.write_text("from-a-file\n")
    b2 = broker_factory("--metrics-token-file", str(token_file))
    assert http(b2, "/metrics", "from-a-file")[0] == 200
    assert http(b2, "/metrics")[0] == 401


# -- key sources end to end ----------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "alg"), [("rsa", "RS256"), ("ec", "ES256"), ("ed", "EdDSA")])
def test_public_key_brokers(broker_factory: Factory, tmp_path: Path, kind: str, alg: str) -> None:
    b = broker_factory("--auth-public-key", write_public_key(tmp_path, kind))
    c = ws(b, sign(claims(["t"], ["t"]), alg, kind))
    assert (
        request(c, {"op": "subscribe", "topic": "t", "id": 1}).items()
        >= {"op": "ack", "id": 1}.items()
    )
    assert raw_upgrade(b, f"Authorization: Bearer {sign(claims())}\r\n")[0] == 401  # HS256


def test_jwks_broker(broker_factory: Factory, tmp_path: Path) -> None:
    b = broker_factory("--auth-jwks", write_jwks(tmp_path, {"k1": "rsa", "k2": "ec"}))
    for alg, kind, kid in (("RS256", "rsa", "k1"), ("ES256", "ec", "k2")):
        c = ws(b, sign(claims(["t"], ["t"]), alg, kind, kid=kid))
        assert request(c, {"op": "ping", "id": 1}) == {"op": "pong", "id": 1}
    wrong_kid = sign(claims(), "RS256", "rsa", kid="k2")
    assert raw_upgrade(b, f"Authorization: Bearer {wrong_kid}\r\n")[0] == 401


def test_bad_auth_configuration_refuses_to_start(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import REPO

    for args in (
        ["--auth-secret", "short"],
        ["--auth-public-key", str(tmp_path / "missing.pem")],
        ["--auth-secret", SECRET, "--auth-jwks", "x.json"],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "broker", "--port", "0", *args],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert proc.returncode == 2, (args, proc.stderr)


def test_history_needs_the_subscribe_permission(secured: BrokerProcess) -> None:
    """The `history` op and GET /history are reads: the `subscribe` claim must cover the topic."""
    c = ws(secured, sign(claims(["chat.*"], ["chat.>"])))
    assert request(c, {"op": "publish", "topic": "chat.a", "data": 1, "id": 1})["op"] == "ack"
    ok = request(c, {"op": "history", "topic": "chat.a", "id": 2})
    assert ok["op"] == "ack" and ok["messages"] == [{"seq": 1, "data": 1}]
    refused = request(c, {"op": "history", "topic": "admin.x", "id": 3})
    assert (refused["op"], refused["code"]) == ("error", "forbidden")
    assert http(secured, "/history/chat.a")[0] == 401
    assert http(secured, "/history/chat.a", "junk")[0] == 401
    status, _, _ = http(secured, "/history/chat.a", sign(claims(["chat.*"], ["other.>"])))
    assert status == 403
    status, _, body = http(secured, "/history/chat.a", sign(claims([], ["chat.a"])))
    assert status == 200 and json.loads(body)["messages"] == [{"seq": 1, "data": 1}]
    assert metric(secured, "broker_forbidden_total", 'op="history"') == 2
