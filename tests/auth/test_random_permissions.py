"""Randomised authorisation against a real broker: many connections with random claims issue
random subscribes, publishes, history reads and re-authentications; every ack, refusal,
`delivered` count, `revoked` list and delivery is checked against the brute-force oracle of
test_permissions.
Zero escapes: no connection ever receives a topic its subscribe claims do not allow."""

from __future__ import annotations

import contextlib
import json
import random
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect

from tests.conftest import BrokerProcess

from .keys import SECRET, claims, sign
from .test_permissions import brute_covers, matches

CONNECTIONS = 12
ROUNDS = 3  # claims, then two re-authentications
REQUESTS = 8  # subscribes and publishes per connection per round


def random_pattern(rng: random.Random, concrete: bool = False) -> str:
    tokens = [rng.choice("abc") for _ in range(rng.randint(1, 3))]
    if concrete:
        return ".".join(tokens)
    tokens = [t if rng.random() < 0.6 else "*" for t in tokens]
    if rng.random() < 0.35:
        tokens[-1] = ">"
    return ".".join(tokens)


def random_claims(rng: random.Random) -> tuple[list[str], list[str]]:
    def some() -> list[str]:
        return [random_pattern(rng) for _ in range(rng.choice([0, 1, 1, 2, 2, 3]))]

    return some(), some()


class Peer:
    """One connection and what the oracle says it holds."""

    def __init__(self, ws: ClientConnection, publish: list[str], subscribe: list[str]) -> None:
        self.ws = ws
        self.publish = publish
        self.subscribe = subscribe
        self.subs: set[str] = set()  # accepted subscriptions
        self.inbox: list[tuple[str, Any]] = []
        self.next_id = 0

    def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.next_id += 1
        msg["id"] = self.next_id
        self.ws.send(json.dumps(msg))
        while True:
            reply = json.loads(self.ws.recv(5))
            if reply["op"] == "message":
                self.inbox.append((reply["topic"], reply["data"]))
            elif reply.get("id") == self.next_id:
                return reply
            else:
                raise AssertionError(f"unexpected {reply}")


@pytest.fixture
def peers_open() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as stack:
        yield stack


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_claims_never_leak(
    broker_factory: Callable[..., BrokerProcess], peers_open: contextlib.ExitStack, seed: int
) -> None:
    rng = random.Random(seed)
    broker = broker_factory("--auth-secret", SECRET)
    peers = []
    for _ in range(CONNECTIONS):
        publish, subscribe = random_claims(rng)
        token = sign(claims(publish, subscribe))
        ws = peers_open.enter_context(
            connect(broker.url, additional_headers={"Authorization": f"Bearer {token}"})
        )
        peers.append(Peer(ws, publish, subscribe))
    counts: Counter[str] = Counter()
    serial = 0
    for round_ in range(ROUNDS):
        if round_:
            for peer in peers:  # re-authenticate with new random claims
                publish, subscribe = random_claims(rng)
                reply = peer.request({"op": "auth", "token": sign(claims(publish, subscribe))})
                expected = sorted(p for p in peer.subs if not brute_covers(subscribe, p))
                assert reply["op"] == "ack" and reply["revoked"] == expected, (reply, subscribe)
                peer.subs -= set(expected)
                counts["revoked"] += len(expected)
                peer.publish, peer.subscribe = publish, subscribe
        for peer in peers:
            for _ in range(REQUESTS):
                pattern = random_pattern(rng)
                reply = peer.request({"op": "subscribe", "topic": pattern})
                if brute_covers(peer.subscribe, pattern):
                    assert reply["op"] == "ack", (reply, pattern, peer.subscribe)
                    peer.subs.add(pattern)
                    counts["subscribe ok"] += 1
                else:
                    assert reply.get("code") == "forbidden", (reply, pattern, peer.subscribe)
                    counts["subscribe refused"] += 1
            for _ in range(REQUESTS // 2):  # history reads need the subscribe permission
                topic = random_pattern(rng, concrete=True)
                reply = peer.request({"op": "history", "topic": topic})
                if brute_covers(peer.subscribe, topic):
                    assert reply["op"] == "ack" and "messages" in reply, (reply, topic)
                    counts["history ok"] += 1
                else:
                    assert reply.get("code") == "forbidden", (reply, topic, peer.subscribe)
                    counts["history refused"] += 1
        expected_inbox: dict[int, list[tuple[str, Any]]] = {id(p): [] for p in peers}
        for peer in peers:
            for _ in range(REQUESTS):
                topic = random_pattern(rng, concrete=True)
                serial += 1
                reply = peer.request({"op": "publish", "topic": topic, "data": serial})
                if any(matches(p, topic) for p in peer.publish):
                    receivers = [q for q in peers if any(matches(s, topic) for s in q.subs)]
                    assert reply == {"op": "ack", "id": peer.next_id, "delivered": len(receivers)}
                    for q in receivers:
                        expected_inbox[id(q)].append((topic, serial))
                    counts["publish ok"] += 1
                else:
                    assert reply.get("code") == "forbidden", (reply, topic, peer.publish)
                    counts["publish refused"] += 1
        for peer in peers:  # every delivery precedes the pong (each publish was acked first)
            assert peer.request({"op": "ping"})["op"] == "pong"
            assert sorted(peer.inbox) == sorted(expected_inbox[id(peer)])
            for topic, _ in peer.inbox:  # zero escapes, checked directly against the claims
                assert any(matches(p, topic) for p in peer.subscribe), (topic, peer.subscribe)
            counts["delivered"] += len(peer.inbox)
            peer.inbox.clear()
    # The run exercised both outcomes of every check.
    keys = ("subscribe ok", "subscribe refused", "publish ok", "publish refused", "delivered")
    keys += ("history ok", "history refused")
    for key in (*keys, "revoked"):
        assert counts[key] > 0, counts
    print(dict(counts))
