"""Unit tests for the client's sans-IO core (`broker_client.session`) and the token helpers:
positions, recovery after a reconnect, seq checks, revoked subscriptions, the reconnect policy.
Frames in, events out; no broker and no sockets."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from broker_client import errors
from broker_client.protocol import (
    Ack,
    Backoff,
    Codec,
    History,
    Message,
    Position,
    parse_position,
    parse_reply,
    token_expiry,
)
from broker_client.session import ReconnectPolicy, Session, Unrecovered, refresh_delay


class _Sub:
    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.got: list[Message] = []
        self.ended: list[BaseException | None] = []

    def _deliver(self, message: Message) -> None:
        self.got.append(message)

    def _end(self, error: BaseException | None) -> None:
        self.ended.append(error)


class _Harness:
    """A session with its callbacks recorded, and helpers that speak like the broker."""

    def __init__(self) -> None:
        self.errors: list[errors.BrokerClientError] = []
        self.unrecovered: list[Unrecovered] = []
        self.session = Session(Codec("json"), self.errors.append, self.unrecovered.append)
        self.answers: list[Any] = []

    def subscribe(self, topic: str, since: Position | None = None, **ack: Any) -> _Sub:
        sub = _Sub(topic)
        assert self.session.add(sub)
        rid, frame = self.session.request(
            "subscribe", self.answers.append, topic=topic, since=since
        )
        sent = json.loads(frame)
        assert sent.get("since") == (
            None if since is None else {"epoch": since.epoch, "seq": since.seq}
        )
        self.feed({"op": "ack", "id": rid, **ack})
        return sub

    def feed(self, obj: dict[str, Any]) -> bool:
        return self.session.receive(json.dumps(obj))

    def message(self, topic: str, seq: int, data: Any = None) -> bool:
        return self.feed({"op": "message", "topic": topic, "seq": seq, "data": data})

    def resubscribe(self) -> dict[str, dict[str, Any]]:
        return {f["topic"]: f for f in map(json.loads, self.session.begin_resubscribe())}


def test_subscribe_ack_sets_the_position_and_messages_advance_it() -> None:
    h = _Harness()
    sub = h.subscribe("orders.eu", epoch="E1", seq=7)
    assert h.session.position("orders.eu") == Position("E1", 7)
    h.message("orders.eu", 8, "a")
    h.message("orders.eu", 9, "b")
    assert [m.seq for m in sub.got] == [8, 9]
    assert h.session.position("orders.eu") == Position("E1", 9)
    assert (h.session.stats.gaps, h.session.stats.out_of_order) == (0, 0)
    assert h.errors == []


def test_a_seq_that_goes_back_is_delivered_counted_and_reported_never_hidden() -> None:
    h = _Harness()
    sub = h.subscribe("t", epoch="E", seq=0)
    for seq in (1, 2, 2, 1, 5):
        h.message("t", seq)
    assert [m.seq for m in sub.got] == [1, 2, 2, 1, 5]  # nothing dropped
    assert h.session.stats.out_of_order == 2
    assert h.session.stats.gaps == 1  # 1 -> 5
    assert all(isinstance(e, errors.ProtocolError) for e in h.errors)
    assert "seq 2 on 't' after 2" in str(h.errors[0])


def test_reconnect_resubscribes_concrete_topics_first_with_since() -> None:
    h = _Harness()
    h.subscribe("a.*")
    h.subscribe("a.b", epoch="E", seq=3)
    h.subscribe("c", epoch="F", seq=0)
    h.message("a.b", 4)
    h.session.connection_lost(errors.ConnectionLostError("cut"))
    frames = [json.loads(f) for f in h.session.begin_resubscribe()]
    assert [f["topic"] for f in frames] == ["a.b", "c", "a.*"]
    assert frames[0]["since"] == {"epoch": "E", "seq": 4}
    assert frames[1]["since"] == {"epoch": "F", "seq": 0}
    assert "since" not in frames[2]  # a pattern has no position


def test_recovered_resubscription_replays_then_goes_live_without_an_event() -> None:
    h = _Harness()
    sub = h.subscribe("t", epoch="E", seq=2)
    frames = h.resubscribe()
    assert h.feed({"op": "ack", "id": frames["t"]["id"], "epoch": "E", "seq": 5, "recovered": True})
    for seq in (3, 4, 5, 6):  # the replay, then live
        h.message("t", seq)
    assert [m.seq for m in sub.got] == [3, 4, 5, 6]
    assert h.unrecovered == [] and h.errors == []
    assert h.session.stats.recovered == 1
    assert h.session.position("t") == Position("E", 6)


def test_unrecovered_resubscription_raises_one_event_and_restarts_from_the_ack() -> None:
    h = _Harness()
    h.subscribe("t", epoch="E", seq=2)
    h.subscribe("p.>")
    frames = h.resubscribe()
    # A broker restart: a new epoch, nothing replayed.
    assert not h.feed(
        {"op": "ack", "id": frames["t"]["id"], "epoch": "N", "seq": 0, "recovered": False}
    )
    assert h.feed({"op": "ack", "id": frames["p.>"]["id"]})  # the round is complete
    assert h.unrecovered == [
        Unrecovered("t", Position("E", 2), Position("N", 0)),
        Unrecovered("p.>", None, None),
    ]
    assert "epoch changed" in h.unrecovered[0].reason
    assert h.session.position("t") == Position("N", 0)
    h.message("t", 1)
    assert h.session.stats.out_of_order == 0 and h.session.stats.unrecovered == 2


def test_same_epoch_but_history_gone_is_unrecovered_with_its_reason() -> None:
    h = _Harness()
    h.subscribe("t", epoch="E", seq=2)
    frames = h.resubscribe()
    h.feed({"op": "ack", "id": frames["t"]["id"], "epoch": "E", "seq": 900, "recovered": False})
    assert h.unrecovered[0].reason == "the messages after it are no longer retained"


def test_explicit_since_on_first_subscribe() -> None:
    h = _Harness()
    h.subscribe("t", since=Position("E", 1), epoch="E", seq=4, recovered=True)
    assert h.session.position("t") == Position("E", 1)  # the replay 2..4 follows
    assert h.unrecovered == []
    h.subscribe("u", since=Position("old", 1), epoch="E", seq=4, recovered=False)
    assert h.unrecovered == [Unrecovered("u", Position("old", 1), Position("E", 4))]


def test_broker_without_positions_still_works_and_reports_unrecovered_after_reconnect() -> None:
    h = _Harness()
    sub = h.subscribe("t")  # an ack without epoch/seq (history off, or an older broker)
    assert h.session.position("t") is None
    h.message("t", 5)
    assert len(sub.got) == 1
    frames = h.resubscribe()
    assert "since" not in frames["t"]
    h.feed({"op": "ack", "id": frames["t"]["id"]})
    assert h.unrecovered == [Unrecovered("t", None, None)]


def test_auth_ack_ends_revoked_subscriptions_with_forbidden() -> None:
    h = _Harness()
    kept, lost = h.subscribe("a", epoch="E", seq=0), h.subscribe("b.>")
    rid, frame = h.session.request("auth", h.answers.append, token="T2")
    assert json.loads(frame) == {"op": "auth", "token": "T2", "id": rid}
    h.feed({"op": "ack", "id": rid, "revoked": ["b.>"]})
    assert isinstance(h.answers[-1], Ack) and h.answers[-1].revoked == ("b.>",)
    assert kept.ended == [] and isinstance(lost.ended[0], errors.ForbiddenError)
    assert h.session.patterns() == ["a"]


def test_history_ack_parses_entries_and_base64() -> None:
    h = _Harness()
    rid, frame = h.session.request("history", h.answers.append, topic="t", since=None, limit=2)
    assert json.loads(frame) == {"op": "history", "topic": "t", "limit": 2, "id": rid}
    raw = base64.b64encode(b"\x00\x01").decode()
    h.feed(
        {
            "op": "ack",
            "id": rid,
            "epoch": "E",
            "seq": 9,
            "recovered": True,
            "messages": [
                {"seq": 8, "data": {"x": 1}},
                {"seq": 9, "data": raw, "encoding": "base64"},
            ],
        }
    )
    history = Session.history("t", h.answers[-1])
    assert history == History(
        "t", Position("E", 9), True, [Message("t", {"x": 1}, 8), Message("t", b"\x00\x01", 9)]
    )


@pytest.mark.parametrize(
    "obj",
    [
        {"op": "ack", "id": 1, "epoch": 3},
        {"op": "ack", "id": 1, "seq": -1},
        {"op": "ack", "id": 1, "recovered": "yes"},
        {"op": "ack", "id": 1, "revoked": "a"},
        {"op": "ack", "id": 1, "messages": [{"seq": "1", "data": 1}]},
    ],
)
def test_malformed_new_ack_fields_are_protocol_errors(obj: dict[str, Any]) -> None:
    with pytest.raises(errors.ProtocolError):
        parse_reply(obj)


def test_outcome_maps_error_codes_to_types() -> None:
    from broker_client.protocol import ErrorReply

    with pytest.raises(errors.Unauthorized):
        Session.outcome(ErrorReply(1, "unauthorized", "bad token"))
    with pytest.raises(errors.Forbidden):
        Session.outcome(ErrorReply(1, "forbidden", "not yours"))
    assert issubclass(errors.TokenExpired, errors.ConnectionLostError)


def _jwt(payload: dict[str, Any]) -> str:
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'HS256'})}.{part(payload)}.c2ln"


def test_token_expiry_reads_the_payload_without_a_key() -> None:
    assert token_expiry(_jwt({"sub": "u", "exp": 1700000000})) == 1700000000.0
    assert token_expiry(_jwt({"sub": "u"})) is None
    assert token_expiry("not-a-jwt") is None
    assert token_expiry("a.!!!.c") is None
    assert token_expiry(_jwt({"exp": True})) is None


def test_refresh_delay_is_ahead_of_expiry_and_early_for_short_tokens() -> None:
    assert refresh_delay(expires=1000, obtained=0, now=0, before=30) == 970
    assert refresh_delay(expires=3, obtained=0, now=0, before=30) == 2  # a third of its life early
    assert refresh_delay(expires=10, obtained=0, now=20, before=30) == 0


def test_policy_gives_up_on_403_retries_401_once_with_a_callback() -> None:
    lost = errors.ConnectionLostError("cut")
    unauthorized = errors.HandshakeUnauthorizedError("unauthorized", "", status=401)
    forbidden = errors.HandshakeForbiddenError("forbidden", "", status=403)

    def tries(policy: ReconnectPolicy, failures: list[BaseException]) -> int:
        attempts = policy.attempts(lost)
        n = 0
        for n, _ in attempts:
            if n > len(failures):
                break
            attempts.failed(failures[n - 1])
        return n

    renewable = ReconnectPolicy(Backoff(), reconnect=True, renewable=True)
    static = ReconnectPolicy(Backoff(), reconnect=True, renewable=False)
    assert tries(static, [forbidden]) == 1
    assert tries(static, [unauthorized]) == 1
    assert tries(renewable, [unauthorized, unauthorized]) == 2
    assert tries(renewable, [unauthorized, errors.ConnectError("x"), unauthorized]) == 4
    assert tries(static, [errors.ConnectError("x")] * 5) == 6  # other failures: keep trying
    expired = errors.TokenExpiredError("4001")
    assert renewable.after_loss(expired) and not static.after_loss(expired)
    assert not ReconnectPolicy(Backoff(), reconnect=False, renewable=True).after_loss(lost)


def test_parse_position() -> None:
    assert parse_position("Xa3:42") == Position("Xa3", 42)
    assert str(Position("Xa3", 42)) == "Xa3:42"
    for bad in ("42", ":1", "E:", "E:-1", "E:x"):
        with pytest.raises(ValueError, match="EPOCH:SEQ"):
            parse_position(bad)
