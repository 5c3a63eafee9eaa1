"""The subscription trie against a brute-force matcher, and its clean-up invariant."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.pubsub.topics import Sublist

TOKENS = ["a", "b", "c"]


def brute_match(pattern: str, topic: str) -> bool:
    """The protocol's definition, written the obvious way."""
    p, t = pattern.split("."), topic.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(t) > i
        if i >= len(t) or (token != "*" and token != t[i]):
            return False
    return len(p) == len(t)


topics = st.lists(st.sampled_from(TOKENS), min_size=1, max_size=4).map(".".join)
patterns = st.lists(st.sampled_from([*TOKENS, "*"]), min_size=1, max_size=4).flatmap(
    lambda toks: st.sampled_from([".".join(toks), ".".join([*toks[:-1], ">"])])
)
subscriptions = st.lists(st.tuples(patterns, st.integers(0, 5)), max_size=30)


def sublist(cache_size: int = 4096) -> Sublist[int]:
    return Sublist(lambda sub: sub % 2, groups=2, cache_size=cache_size)


@settings(max_examples=300)
@given(subscriptions, st.lists(topics, min_size=1, max_size=10), st.integers(1, 8))
def test_match_agrees_with_brute_force(
    subs: list[tuple[str, int]], probes: list[str], cache_size: int
) -> None:
    sl = sublist(cache_size)
    for pattern, sub in subs:
        sl.insert(pattern, sub)
    for topic in probes * 2:  # twice: the second answer may come from the cache
        expected = {sub for pattern, sub in subs if brute_match(pattern, topic)}
        even, odd = sl.match(topic)
        assert set(even) | set(odd) == expected
        assert len(even) + len(odd) == len(expected), "each subscriber once"
        assert all(s % 2 == 0 for s in even) and all(s % 2 == 1 for s in odd)


@settings(max_examples=300)
@given(subscriptions, subscriptions, st.lists(topics, max_size=5))
def test_cache_follows_inserts_and_removes(
    first: list[tuple[str, int]], second: list[tuple[str, int]], probes: list[str]
) -> None:
    sl = sublist()
    live: set[tuple[str, int]] = set()
    for pattern, sub in first:
        sl.insert(pattern, sub)
        live.add((pattern, sub))
    for topic in probes:
        sl.match(topic)  # fill the cache
    for pattern, sub in second:
        if (pattern, sub) in live:
            assert sl.remove(pattern, sub)
            live.discard((pattern, sub))
        else:
            assert sl.insert(pattern, sub)
            live.add((pattern, sub))
        for topic in probes:
            expected = {s for p, s in live if brute_match(p, topic)}
            assert set(sum(sl.match(topic), ())) == expected
    assert sl.subscriptions == len(live)
    assert sl.patterns == len({p for p, _ in live})


@given(subscriptions)
def test_removing_everything_leaves_an_empty_trie(subs: list[tuple[str, int]]) -> None:
    sl = sublist()
    for pattern, sub in subs:
        sl.insert(pattern, sub)
    for pattern, sub in reversed(subs):
        sl.remove(pattern, sub)
    assert sl.empty
    assert sl.subscriptions == 0 and sl.patterns == 0


def test_duplicate_insert_and_missing_remove() -> None:
    sl = sublist()
    assert sl.insert("a.b", 1)
    assert not sl.insert("a.b", 1)
    assert not sl.remove("a.c", 1)
    assert not sl.remove("a.b", 2)
    assert not sl.remove("a.b.c", 1)
    assert sl.subscriptions == 1


def test_fan_out_order_is_subscribe_order() -> None:
    sl: Sublist[int] = Sublist(lambda s: 0)
    for sub in (5, 3, 9, 1):
        sl.insert("x", sub)
    assert sl.match("x") == ((5, 3, 9, 1),)


def test_wildcard_tail_needs_at_least_one_token() -> None:
    sl: Sublist[int] = Sublist(lambda s: 0)
    sl.insert("a.>", 1)
    sl.insert("a.*", 2)
    assert sl.match("a") == ((),)
    assert set(sl.match("a.b")[0]) == {1, 2}
    assert sl.match("a.b.c") == ((1,),)


@given(subscriptions, st.lists(patterns, max_size=5))
def test_holders_counts_exactly_the_pattern(subs: list[tuple[str, int]], probes: list[str]) -> None:
    sl = sublist()
    for pattern, sub in subs:
        sl.insert(pattern, sub)
    held = dict(sl.counts())
    for pattern in [p for p, _ in subs] + probes:
        assert sl.holders(pattern) == len({s for p, s in subs if p == pattern})
        assert sl.holders(pattern) == held.get(pattern, 0)
