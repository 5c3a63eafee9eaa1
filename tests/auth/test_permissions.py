"""The containment rule (broker/auth/permissions.py) against brute force, plus named cases.

The oracle enumerates every topic over the literals the patterns use plus one token none of them
uses, of every length up to one more than the longest pattern: exact for the unbounded topic
space, because a token no pattern names stands for all such tokens, and topics longer than every
pattern are matched (or not) alike (only `>` patterns reach them, through their prefix).
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.auth.permissions import Grant, check_pattern, covers

FRESH = "zz"  # a token no generated pattern uses


def matches(pattern: str, topic: str) -> bool:
    """The protocol's matching rule, written plainly (independent of broker.pubsub.topics)."""
    p, t = pattern.split("."), topic.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(t) > i
        if i >= len(t) or (token != "*" and token != t[i]):
            return False
    return len(t) == len(p)


def brute_covers(claims: list[str], pattern: str) -> bool:
    patterns = [*claims, pattern]
    literals = sorted({t for p in patterns for t in p.split(".") if t not in ("*", ">")})
    alphabet = [*literals, FRESH]
    depth = max(len(p.split(".")) for p in patterns) + 1
    for n in range(1, depth + 1):
        for tokens in itertools.product(alphabet, repeat=n):
            topic = ".".join(tokens)
            if matches(pattern, topic) and not any(matches(c, topic) for c in claims):
                return False
    return True


def patterns(max_tokens: int = 4) -> st.SearchStrategy[str]:
    token = st.sampled_from(["a", "b", "c", "*"])
    body = st.lists(token, min_size=0, max_size=max_tokens)

    def build(tokens: list[str], tail: bool) -> str:
        if tail:
            return ".".join([*tokens, ">"])
        return ".".join(tokens) if tokens else "a"

    return st.builds(build, body, st.booleans())


@settings(max_examples=1500, deadline=None)
@given(st.lists(patterns(), max_size=5), patterns())
def test_covers_equals_brute_force(claims: list[str], pattern: str) -> None:
    assert covers(claims, pattern) == brute_covers(claims, pattern), (claims, pattern)


# Unions where no single claim covers the pattern make the hardest cases: generate claims from
# wildcards only (the ones that can combine) and check them too.
@settings(max_examples=800, deadline=None)
@given(
    st.lists(
        st.builds(
            lambda n, tail, head: ".".join([head, *["*"] * n, *([">"] if tail else [])]),
            st.integers(0, 3),
            st.booleans(),
            st.sampled_from(["a", "*"]),
        ),
        max_size=6,
    ),
    patterns(3),
)
def test_wildcard_unions_equal_brute_force(claims: list[str], pattern: str) -> None:
    assert covers(claims, pattern) == brute_covers(claims, pattern), (claims, pattern)


@pytest.mark.parametrize(
    ("claims", "pattern", "allowed"),
    [
        (["orders.>"], "orders.*", True),
        (["orders.>"], "orders.eu.>", True),
        (["orders.>"], "orders.eu.42", True),
        (["orders.>"], "orders", False),
        (["orders.*"], "orders.>", False),
        (["orders.*"], "orders.eu", True),
        (["orders.eu"], "orders.*", False),  # a literal never covers a wildcard
        (["orders.*", "orders.*.>"], "orders.>", True),  # a union covers what neither does
        (["orders.*.*", "orders.*.*.>"], "orders.>", False),  # orders.x escapes
        (["*", "*.>"], ">", True),
        (["*.>"], ">", False),  # one-token topics escape
        ([">"], ">", True),
        ([">"], "a", True),
        ([], "a", False),
        (["a.b.c"], "a.b.c", True),
        (["a.*.c", "a.b.>"], "a.*.c", True),
        (["a.b.c", "a.c.c"], "a.*.c", False),
    ],
)
def test_named_cases(claims: list[str], pattern: str, allowed: bool) -> None:
    assert covers(claims, pattern) is allowed
    assert brute_covers(claims, pattern) is allowed  # the oracle agrees with the docs


def test_grant_checks_and_fast_paths() -> None:
    g = Grant(sub="u", publish=["chat.*"], subscribe=["chat.>", "news"])
    assert g.may_publish("chat.room") and not g.may_publish("chat.room.1")
    assert g.may_subscribe("chat.*.x") and g.may_subscribe("news")
    assert not g.may_subscribe("news.>") and not g.may_subscribe(">")
    everything = Grant(publish=[">"], subscribe=[">"])
    assert everything.may_publish("x.y.z") and everything.may_subscribe(">")
    nothing = Grant()
    assert not nothing.may_publish("a") and not nothing.may_subscribe("a")


def test_grant_answers_stay_right_past_its_cache() -> None:
    g = Grant(publish=["t.*"], subscribe=["t.>"])
    topics = [f"t.{i}" for i in range(300)] + [f"u.{i}" for i in range(300)]  # over GRANT_CACHE
    for _ in range(2):
        assert [g.may_publish(t) for t in topics] == [t.startswith("t.") for t in topics]
        assert [g.may_subscribe(t) for t in topics] == [t.startswith("t.") for t in topics]


@pytest.mark.parametrize("bad", ["", "a..b", "a.>.b", "a*", "a.b>", ">a", 7, None])
def test_invalid_claim_patterns_are_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        check_pattern(bad)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.sampled_from(["a", "b", "*"]), max_size=2),
    st.integers(0, 3),
    st.sets(st.integers(0, 4), max_size=2),
    st.lists(patterns(3), max_size=2),
)
def test_near_miss_unions_equal_brute_force(
    prefix: list[str], j: int, dropped: set[int], noise: list[str]
) -> None:
    """`prefix.>` against the union that exactly covers it (`prefix` + `*` x k for k = 1..j,
    and `prefix` + `*` x j + `>`), with some members dropped and unrelated claims added: random
    generation almost never builds these, where a rule that looks at claims one by one fails."""
    members = [".".join([*prefix, *["*"] * k]) for k in range(1, j + 1)]
    members.append(".".join([*prefix, *["*"] * j, ">"]))
    claims = [m for i, m in enumerate(members) if i not in dropped] + noise
    pattern = ".".join([*prefix, ">"])
    assert covers(claims, pattern) == brute_covers(claims, pattern), (claims, pattern)
