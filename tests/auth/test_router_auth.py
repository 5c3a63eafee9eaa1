"""Permissions in the router, sans-IO: sessions with grants, requests in, frames out."""

from __future__ import annotations

import dataclasses
import json

from broker.auth.permissions import Grant
from broker.auth.tokens import TokenVerifier
from broker.config import Config
from broker.metrics import Stats
from broker.pubsub.router import Router
from broker.pubsub.session import Session
from tests.pubsub.test_router import frames

from .keys import SECRET, claims, sign


def make(auth: bool = True) -> Router:
    config = dataclasses.replace(Config(), auth_secret=SECRET if auth else "")
    return Router(config, Stats(), TokenVerifier.from_config(config))


def send(r: Router, s: Session, **msg: object) -> None:
    r.handle(s, json.dumps(msg), binary=False)


def test_refused_requests_have_no_effect() -> None:
    r = make()
    watcher, limited = Session(), Session()
    watcher.grant = Grant(subscribe=[">"])
    limited.grant = Grant(publish=["a.*"], subscribe=["a.>"])
    send(r, watcher, op="subscribe", topic=">", id=1)
    send(r, limited, op="publish", topic="b.x", data=1, id=2)
    send(r, limited, op="subscribe", topic="b.>", id=3)
    send(r, limited, op="publish", topic="a.x", data=2, id=4)
    assert frames(limited) == [
        {
            "op": "error",
            "id": 2,
            "code": "forbidden",
            "message": "the token does not allow publishing to this topic",
        },
        {
            "op": "error",
            "id": 3,
            "code": "forbidden",
            "message": "the token does not allow subscribing to this pattern",
        },
        {"op": "ack", "id": 4, "delivered": 1},
    ]
    assert frames(watcher) == [
        {"op": "ack", "id": 1},
        {"op": "message", "topic": "a.x", "data": 2, "seq": 1},  # seq: b.x never counted
    ]
    assert r.stats.forbidden == {"publish": 1, "subscribe": 1, "history": 0, "admin": 0}
    assert r.sublist.subscriptions == 1


def test_auth_op_revokes_and_rearms() -> None:
    r = make()
    rearmed: list[Session] = []
    r.on_grant = rearmed.append
    s = Session()
    s.grant = Grant(subscribe=["a.>", "b"])
    for i, topic in enumerate(["a.*", "a.b.>", "b"]):
        send(r, s, op="subscribe", topic=topic, id=i)
    frames(s)
    send(r, s, op="auth", token=sign(claims([], ["a.*"])), id="x")
    assert frames(s) == [{"op": "ack", "id": "x", "revoked": ["a.b.>", "b"]}]
    assert s.patterns == {"a.*"} and rearmed == [s] and s.grant.subscribe == ("a.*",)
    before = s.grant
    send(r, s, op="auth", token="junk", id="y")
    assert frames(s)[0]["code"] == "unauthorized"
    assert s.grant is before and rearmed == [s]
    assert r.stats.auth_failures["malformed"] == 1


def test_auth_off_costs_no_grant_and_acks_auth() -> None:
    r = make(auth=False)
    s = Session()
    assert s.grant is None and r.verifier is None
    send(r, s, op="auth", token="anything", id=1)
    send(r, s, op="publish", topic="x", data=1, id=2)
    assert frames(s) == [
        {"op": "ack", "id": 1, "revoked": []},
        {"op": "ack", "id": 2, "delivered": 0},
    ]
