"""What a connection over the outbound high-water mark gets: the overflow policy of each topic.

Theory of operation: `--overflow PATTERN=POLICY` rules (and `--slow-consumer-policy` for every
topic no rule matches) name one of three policies:

    DISCONNECT  close the connection with 1008 "slow consumer" (it recovers through history)
    DROP        drop the new message; the subscriber sees a gap in `seq`
    CONFLATE    keep only the newest message of the topic for that connection, to be queued
                when it catches up: it ends on the latest state, not on a backlog of stale ones

When several rules match a topic the most specific wins, decided in this order:
    1. fewer wildcard tokens (`*` or `>`); a literal pattern has none and beats any wildcard
    2. more tokens (`a.b.*` beats `a.>` for `a.b.c`)
    3. `*` before `>` at equal counts (`a.*` beats `a.>` for `a.b`)
    4. the rule given first

A policy matters only for a connection already over the mark, so `resolve` is off the fan-out
fast path: the router asks it only when a delivery finds a session over the mark, and remembers
the answer per concrete topic in a bounded dict (cleared when full, like the match cache).

The policies are bits, so a session's `slow` field can record which ones an episode of being over
the mark has applied (each is counted once per episode in broker_slow_consumers_total{policy}).
"""

from __future__ import annotations

from collections.abc import Sequence

from broker.config import parse_overflow

DROP = 1
CONFLATE = 2
DISCONNECT = 4
POLICIES = {"drop": DROP, "conflate": CONFLATE, "disconnect": DISCONNECT}
NAMES = {bit: name for name, bit in POLICIES.items()}


def specificity(pattern: str, order: int) -> tuple[int, int, int, int]:
    """Sort key of a rule: smaller is more specific (see the module docstring)."""
    tokens = pattern.split(".")
    wild = sum(t in ("*", ">") for t in tokens)
    return (wild, -len(tokens), tokens[-1] == ">", order)


def matches(pattern: Sequence[str], topic: Sequence[str]) -> bool:
    """Does the pre-split `pattern` match the pre-split concrete `topic`?"""
    for i, token in enumerate(pattern):
        if token == ">":
            return len(topic) > i
        if i >= len(topic) or (token != "*" and token != topic[i]):
            return False
    return len(pattern) == len(topic)


class OverflowPolicies:
    """The rules, most specific first, and the policy of each topic seen so far."""

    def __init__(self, rules: Sequence[str], default: str, cache_size: int = 4096) -> None:
        parsed = [parse_overflow(rule) for rule in rules]
        ordered = sorted(enumerate(parsed), key=lambda item: specificity(item[1][0], item[0]))
        self.rules = [(tuple(p.split(".")), POLICIES[policy]) for _, (p, policy) in ordered]
        self.default = POLICIES[default]
        self._cache: dict[str, int] = {}
        self._cache_size = cache_size

    def resolve(self, topic: str) -> int:
        """The policy bit for concrete `topic`."""
        if not self.rules:
            return self.default
        policy = self._cache.get(topic)
        if policy is None:
            policy = self.default
            tokens = topic.split(".")
            for pattern, rule_policy in self.rules:
                if matches(pattern, tokens):
                    policy = rule_policy
                    break
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[topic] = policy
        return policy


class Conflated:
    """A backed-up session's newest frame per conflated topic, waiting for it to catch up."""

    __slots__ = ("frames", "size")

    def __init__(self) -> None:
        self.frames: dict[str, bytes] = {}  # insertion order: the order topics first backed up
        self.size = 0
