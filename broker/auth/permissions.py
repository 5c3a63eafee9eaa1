"""What a token allows: `Grant`, and the containment rule for subscriptions (`covers`).

Theory of operation. A token's `publish` and `subscribe` claims are lists of patterns in the
protocol's own syntax (`*` = one token, `>` = one or more trailing tokens). Publishing to topic T
is allowed when one `publish` pattern matches T. Subscribing to pattern P is allowed only when
every topic P can match is matched by at least one `subscribe` pattern: the claims must *cover*
P. Coverage is decided for the union of the claims, not one claim at a time: `a.*` and `a.*.>`
together cover `a.>` (one takes the two-token topics, the other the longer ones), though neither
does alone. A sound-but-partial rule would refuse such subscriptions for no reason a user could
see; this one is exact, and cheap (one pass over P, linear in len(P) x len(claims)).

Why one pass is exact. Topic tokens come from an unbounded alphabet, so for every `*` in P there
is a *fresh* token that no claim names; a claim can match that token only with a `*` (or the tail
of its `>`). If the claims cover the topics built from fresh tokens, they cover every topic of P,
because a claim that matches a fresh token at some position matches any token there. So the walk
keeps, position by position, the claims still alive against the "fresh" topic: at a literal of P,
claims with that literal or `*`; at a `*` of P, claims with `*`; a claim whose next token is `>`
covers the rest at once. At a final `>` of P the rest is any non-empty run of fresh tokens, of any
length m >= 1: it is covered iff some alive claim's remainder is `*`x j then `>` (every m > j),
and every shorter m <= j is the exact length of an alive remainder made only of `*`.

The rule is decided over topics of any length: the 255-byte topic limit is ignored, which can
only refuse more (a list like `*`, `*.*`, ... up to 128 tokens would cover `>` under the limit and
is not counted as covering it). tests/auth/test_permissions.py checks `covers` against brute force
over every topic of a bounded alphabet and depth (exact by the same fresh-token argument).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

Tokens = tuple[str, ...]
GRANT_CACHE = 256  # answers remembered per Grant and kind (cleared when full)


def check_pattern(pattern: object) -> str:
    """`pattern` if it is a pattern of the protocol's syntax (a concrete topic is one); else
    ValueError. The claim check at the token's door: a claim that could never match is an
    issuer's bug worth refusing loudly, not a silent "nothing allowed"."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError("a pattern must be a non-empty string")
    tokens = pattern.split(".")
    last = len(tokens) - 1
    for i, token in enumerate(tokens):
        if not token:
            raise ValueError(f"pattern {pattern[:64]!r} has an empty token")
        if (token == ">" and i != last) or (
            token not in ("*", ">") and ("*" in token or ">" in token)
        ):
            raise ValueError(f"pattern {pattern[:64]!r}: '*' and '>' are whole tokens, '>' last")
    return pattern


def _tail_covered(rests: Iterable[Tokens]) -> bool:
    """Do the claim remainders `rests` match every non-empty run of fresh tokens?"""
    shortest_open: int | None = None  # j of the best `*`x j + `>`: covers every length > j
    exact: set[int] = set()  # lengths matched by remainders of only `*`
    for rest in rests:
        if not rest:
            continue
        if rest[-1] == ">":
            if all(t == "*" for t in rest[:-1]):
                j = len(rest) - 1
                if shortest_open is None or j < shortest_open:
                    shortest_open = j
        elif all(t == "*" for t in rest):
            exact.add(len(rest))
    if shortest_open is None:
        return False  # arbitrarily long topics would escape every claim
    return all(m in exact for m in range(1, shortest_open + 1))


def covers_tokens(claims: Iterable[Tokens], pattern: Sequence[str]) -> bool:
    """`covers` on pre-split patterns (a Grant splits its claims once)."""
    alive = list(claims)
    for i, token in enumerate(pattern):
        if token == ">":
            return _tail_covered(c[i:] for c in alive)
        wild = token == "*"
        nxt = []
        for claim in alive:
            if len(claim) <= i:
                continue  # the claim ended; the topic goes on
            ct = claim[i]
            if ct == ">":
                return True  # matches whatever non-empty rest the topic has (it has one)
            if ct == "*" or (not wild and ct == token):
                nxt.append(claim)
        if not nxt:
            return False
        alive = nxt
    n = len(pattern)
    return any(len(c) == n for c in alive)


def covers(claims: Sequence[str], pattern: str) -> bool:
    """True when every topic `pattern` can match is matched by at least one of `claims`.

    A concrete topic is a pattern that matches itself only, so `covers(publish, topic)` is the
    publish rule. Examples: `orders.>` covers `orders.*` and `orders.eu.>`; `orders.*` does not
    cover `orders.>`; only claims covering every topic (such as `>`) cover `>`.
    """
    return covers_tokens((tuple(c.split(".")) for c in claims), pattern.split("."))


class Rules:
    """A token's `publish` and `subscribe` lists, pre-split, with the answers found so far.

    Immutable but for its caches, and shared: users with the same claims (a role) but their own
    `sub` and `exp` hold distinct Grants around one Rules object (the verifier interns them), so
    a distinct token per connection costs a small Grant, not its claim lists again.
    """

    __slots__ = (
        "_pub",
        "_pub_all",
        "_pub_cache",
        "_sub",
        "_sub_all",
        "_sub_cache",
        "publish",
        "subscribe",
    )

    def __init__(self, publish: Sequence[str] = (), subscribe: Sequence[str] = ()) -> None:
        self.publish = tuple(check_pattern(p) for p in publish)
        self.subscribe = tuple(check_pattern(p) for p in subscribe)
        self._pub = tuple(tuple(p.split(".")) for p in self.publish)
        self._sub = tuple(tuple(p.split(".")) for p in self.subscribe)
        self._pub_all = ">" in self.publish
        self._sub_all = ">" in self.subscribe
        # Answers by topic / pattern, made on first use: a publish with auth on then costs a
        # dict lookup (~50 ns) instead of the walk (~1-2 us with a few claims).
        self._pub_cache: dict[str, bool] | None = None
        self._sub_cache: dict[str, bool] | None = None

    def may_publish(self, topic: str) -> bool:
        if self._pub_all:
            return True
        cache = self._pub_cache
        if cache is None:
            cache = self._pub_cache = {}
        ok = cache.get(topic)
        if ok is None:
            ok = covers_tokens(self._pub, topic.split("."))
            if len(cache) >= GRANT_CACHE:
                cache.clear()
            cache[topic] = ok
        return ok

    def may_subscribe(self, pattern: str) -> bool:
        if self._sub_all:
            return True
        cache = self._sub_cache
        if cache is None:
            cache = self._sub_cache = {}
        ok = cache.get(pattern)
        if ok is None:
            ok = covers_tokens(self._sub, pattern.split("."))
            if len(cache) >= GRANT_CACHE:
                cache.clear()
            cache[pattern] = ok
        return ok


class Grant:
    """The permissions of one verified token; shared by every connection that presents it.

    `expires` is the token's `exp` (Unix seconds) or None. Immutable, so one object can be held
    by many sessions (the verifier hands the same Grant to a token it has already verified), and
    the per-connection cost is the one `Session.grant` slot; a Grant itself is four slots, its
    claim lists living in a shared `Rules`.
    """

    __slots__ = ("admin", "expires", "rules", "sub")

    def __init__(
        self,
        sub: str = "",
        publish: Sequence[str] = (),
        subscribe: Sequence[str] = (),
        admin: bool = False,
        expires: float | None = None,
        rules: Rules | None = None,
    ) -> None:
        self.sub = sub
        self.rules = rules if rules is not None else Rules(publish, subscribe)
        self.admin = admin
        self.expires = expires

    @property
    def publish(self) -> tuple[str, ...]:
        return self.rules.publish

    @property
    def subscribe(self) -> tuple[str, ...]:
        return self.rules.subscribe

    def may_publish(self, topic: str) -> bool:
        """Publishing to concrete `topic` is allowed: one `publish` pattern matches it."""
        return self.rules.may_publish(topic)

    def may_subscribe(self, pattern: str) -> bool:
        """Subscribing to `pattern` is allowed: the `subscribe` claims cover it (`covers`)."""
        return self.rules.may_subscribe(pattern)

    def __repr__(self) -> str:
        return (
            f"Grant(sub={self.sub!r}, publish={list(self.publish)}, "
            f"subscribe={list(self.subscribe)}, admin={self.admin}, expires={self.expires})"
        )
