"""Overflow policies without sockets: which rule wins, and what drop, conflate and disconnect do
to a session over the high-water mark (and only to it)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from broker import config
from broker.config import Config
from broker.metrics import Stats
from broker.pubsub.overflow import CONFLATE, DISCONNECT, DROP, OverflowPolicies, matches
from broker.pubsub.router import Router
from broker.pubsub.session import Session

from .test_router import frames


def make(*rules: str, default: str = "disconnect", **overrides: Any) -> Router:
    cfg = dataclasses.replace(Config(), overflow=rules, slow_consumer_policy=default, **overrides)
    return Router(cfg, Stats())


def drain(session: Session) -> None:
    session.out.clear()
    session.queued = 0


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("a.b", "a.b", True),
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.>", "a.b.c", True),
        ("a.>", "a", False),
        (">", "a", True),
        ("a.b.c", "a.b", False),
    ],
)
def test_matches(pattern: str, topic: str, expected: bool) -> None:
    assert matches(pattern.split("."), topic.split(".")) is expected


def test_most_specific_rule_wins_whatever_the_order() -> None:
    rules = ["a.>=drop", "a.*.c=conflate", "a.b.c=disconnect", ">=conflate", "a.b.*=drop"]
    for order in (rules, rules[::-1]):
        p = OverflowPolicies(order, "disconnect")
        assert p.resolve("a.b.c") == DISCONNECT  # literal beats every wildcard
        assert p.resolve("a.x.c") == CONFLATE  # one wildcard, three tokens
        assert p.resolve("a.b.d") == DROP  # a.b.* (3 tokens) beats a.> (2 tokens)
        assert p.resolve("a.x") == DROP  # a.> beats > (more tokens)
        assert p.resolve("z") == CONFLATE
    # Same wildcard count and length: * beats >; then the first given.
    assert OverflowPolicies(["a.>=drop", "a.*=conflate"], "drop").resolve("a.b") == CONFLATE
    assert OverflowPolicies(["*.b=drop", "a.*=conflate"], "drop").resolve("a.b") == DROP
    # No rule matches: the default (--slow-consumer-policy).
    assert OverflowPolicies(["a.>=drop"], "conflate").resolve("b.c") == CONFLATE


def test_overflow_flag_is_repeatable_and_the_variable_a_list() -> None:
    cfg = config.parse(
        ["--overflow", "ticker.>=conflate", "--overflow", "orders.*=drop"], environ={}
    )
    assert cfg.overflow == ("ticker.>=conflate", "orders.*=drop")
    env = {"BROKER_OVERFLOW": "ticker.>=conflate, orders.*=drop  chat.>=disconnect"}
    assert config.parse([], environ=env).overflow == (
        "ticker.>=conflate",
        "orders.*=drop",
        "chat.>=disconnect",
    )
    # Flags replace the variable's list.
    assert config.parse(["--overflow", "x=drop"], environ=env).overflow == ("x=drop",)
    assert config.parse([], environ={}).overflow == ()
    assert config.parse(
        ["--slow-consumer-policy", "conflate"], environ={}
    ).slow_consumer_policy == ("conflate")


@pytest.mark.parametrize(
    "rule", ["ticker", "=drop", "a.>=stall", "a.>.b=drop", "a.b*=drop", "a..b=drop"]
)
def test_bad_overflow_rules_are_refused(rule: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        config.parse(["--overflow", rule], environ={})
    assert exc.value.code == 2
    assert "--overflow" in capsys.readouterr().err


def fill(r: Router, session: Session, topic: str = "t") -> None:
    """Publish until `session` is over the mark (another subscriber keeps up)."""
    while session.queued <= r.config.outbound_high_water:
        r.publish(topic, "x" * 100)


def test_drop_counts_per_session_and_never_lists_it_for_closing() -> None:
    r = make(default="drop", outbound_high_water=1000)
    slow = Session()
    r.subscribe(slow, "t")
    fill(r, slow)
    before = slow.queued
    for _ in range(5):
        assert r.publish("t", "y") == 0
    assert slow.queued == before
    assert slow.dropped == 5 == r.stats.dropped["slow_consumer"]
    assert r.over == []
    assert r.stats.slow_consumers == {"disconnect": 0, "drop": 1, "conflate": 0}
    assert slow.since == r.now  # stamped when it went over within the iteration


def test_conflate_keeps_the_newest_per_topic_and_releases_in_order() -> None:
    r = make("ticker.>=conflate", outbound_high_water=1000)
    slow, fast = Session(), Session()
    for s in (slow, fast):
        r.subscribe(s, "ticker.>")
    fill(r, slow, "ticker.a")
    drain(fast)
    backlog = frames(slow)  # what was queued before the mark: delivered as it is
    slow.queued = 2000  # still over the mark (as if the socket held it)
    fast_got = []
    for i in range(10):
        for topic in ("ticker.a", "ticker.b", "ticker.c"):
            assert r.publish(topic, i) == 2  # kept for both: conflation is a delivery
        fast_got += frames(fast)  # this one keeps up
    assert len(fast_got) == 30, "the fast subscriber gets everything"
    assert slow.out == []
    assert slow.conflated is not None
    assert list(slow.conflated.frames) == ["ticker.a", "ticker.b", "ticker.c"]
    assert slow.dropped == 27 == r.stats.dropped["conflated"]
    assert r.over == []
    assert r.stats.slow_consumers["conflate"] == 1
    slow.queued = 0
    r.release(slow)
    assert slow.conflated is None
    got = frames(slow)
    assert [(m["topic"], m["data"]) for m in got] == [
        ("ticker.a", 9),
        ("ticker.b", 9),
        ("ticker.c", 9),
    ]
    last_a = backlog[-1]["seq"]
    assert got[0]["seq"] == last_a + 10, "the seq jump tells the subscriber what it skipped"


def test_conflate_past_the_mark_in_distinct_topics_disconnects() -> None:
    r = make(">=conflate", outbound_high_water=1000)
    slow = Session()
    r.subscribe(slow, ">")
    fill(r, slow, "a")
    n = 0
    while not r.over:
        r.publish(f"topic.{n}", "x" * 100)
        n += 1
    assert r.over == [slow]
    assert slow.conflated is not None and slow.conflated.size <= 1000
    assert r.stats.slow_consumers["conflate"] == 1
    assert r.stats.slow_consumers["disconnect"] == 1
    r.publish(f"topic.{n}", "x")
    assert r.over == [slow], "listed once"


def test_policy_is_per_topic_for_one_session() -> None:
    r = make("live.>=conflate", "log.>=drop", outbound_high_water=1000)
    slow = Session()
    for pattern in ("live.>", "log.>", "orders.>"):
        r.subscribe(slow, pattern)
    fill(r, slow, "log.x")
    r.publish("live.a", 1)
    r.publish("log.x", 2)
    assert r.over == []
    r.publish("orders.1", 3)  # the default: disconnect
    assert r.over == [slow]
    assert r.stats.slow_consumers == {"disconnect": 1, "drop": 1, "conflate": 1}
    assert slow.dropped == 2  # log.x and orders.1; live.a is kept
    r.drop(slow)
    assert slow.conflated is None
