"""Subscriptions by pattern: a token trie with `*` and `>`, plus a cache of exact-topic matches.

Theory of operation (after nats-server's Sublist): a pattern `a.*.c` is a path of tokens in a trie;
each node holds the subscribers whose pattern ends there. Matching a concrete topic walks the trie
once per token, following the literal child, the `*` child and, for `>`, taking the `>` child's
subscribers outright. The cost depends on the topic's depth and the wildcards along its path, not
on how many unrelated subscriptions exist.

Publishing to the same topics again and again is the common case, so match results are cached
per concrete topic, already deduplicated (a connection matching through two patterns gets one
delivery) and split into groups (the router groups by encoding, so each group shares one frame).
A change to a literal pattern drops that one cache entry; a change to a wildcard pattern clears
the cache, since it may touch any entry. The cache is bounded and simply cleared when full.

Invariant: no node is left without subscribers or children, so unsubscribe and disconnect return
the trie to exactly its previous size.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

S = TypeVar("S", bound=Hashable)

Groups = tuple[tuple[S, ...], ...]


class _Node(Generic[S]):
    __slots__ = ("children", "subs")

    def __init__(self) -> None:
        self.children: dict[str, _Node[S]] | None = None
        self.subs: dict[S, None] | None = None  # an ordered set: fan-out order is subscribe order


class Sublist(Generic[S]):
    """Patterns to subscribers; `match(topic)` returns the subscribers split by `group(sub)`."""

    def __init__(self, group: Callable[[S], int], groups: int = 1, cache_size: int = 4096) -> None:
        self._root: _Node[S] = _Node()
        self._group = group
        self._groups = groups
        self._cache: dict[str, Groups[S]] = {}
        self._cache_size = cache_size
        self.subscriptions = 0  # (pattern, subscriber) pairs
        self.patterns = 0  # distinct patterns with at least one subscriber

    def insert(self, pattern: str, sub: S) -> bool:
        """Add `sub` under `pattern`; False if it was already there."""
        node = self._root
        for token in pattern.split("."):
            if node.children is None:
                node.children = {}
            child = node.children.get(token)
            if child is None:
                child = node.children[token] = _Node()
            node = child
        if node.subs is None:
            node.subs = {}
            self.patterns += 1
        elif sub in node.subs:
            return False
        node.subs[sub] = None
        self.subscriptions += 1
        self._invalidate(pattern)
        return True

    def remove(self, pattern: str, sub: S) -> bool:
        """Remove `sub` from `pattern`, pruning empty nodes; False if it was not there."""
        path: list[tuple[_Node[S], str]] = []
        node = self._root
        for token in pattern.split("."):
            children = node.children
            child = children.get(token) if children is not None else None
            if child is None:
                return False
            path.append((node, token))
            node = child
        if node.subs is None or sub not in node.subs:
            return False
        del node.subs[sub]
        self.subscriptions -= 1
        if not node.subs:
            node.subs = None
            self.patterns -= 1
        for parent, token in reversed(path):
            if node.subs is not None or node.children:
                break
            assert parent.children is not None
            del parent.children[token]
            if not parent.children:
                parent.children = None
            node = parent
        self._invalidate(pattern)
        return True

    def match(self, topic: str) -> Groups[S]:
        """Subscribers of concrete `topic`, deduplicated, as one tuple per group."""
        found = self._cache.get(topic)
        if found is not None:
            return found
        subs: dict[S, None] = {}
        _collect(self._root, topic.split("."), 0, subs)
        if self._groups == 1:
            result: Groups[S] = (tuple(subs),)
        else:
            lists: list[list[S]] = [[] for _ in range(self._groups)]
            group = self._group
            for sub in subs:
                lists[group(sub)].append(sub)
            result = tuple(tuple(x) for x in lists)
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[topic] = result
        return result

    def _invalidate(self, pattern: str) -> None:
        if "*" in pattern or ">" in pattern:
            self._cache.clear()
        else:
            self._cache.pop(pattern, None)

    def count(self, topic: str) -> int:
        """How many subscribers a publish to concrete `topic` reaches; leaves the cache alone (for
        introspection, which must not evict the publishers' entries)."""
        found = self._cache.get(topic)
        if found is not None:
            return sum(map(len, found))
        subs: dict[S, None] = {}
        _collect(self._root, topic.split("."), 0, subs)
        return len(subs)

    def holders(self, pattern: str) -> int:
        """How many subscribers hold exactly `pattern` (what `counts` gives for it)."""
        node: _Node[S] | None = self._root
        for token in pattern.split("."):
            children = node.children if node is not None else None
            node = children.get(token) if children is not None else None
        return len(node.subs) if node is not None and node.subs is not None else 0

    def counts(self) -> Iterator[tuple[str, int]]:
        """(pattern, subscribers holding exactly that pattern) for every subscribed pattern."""
        stack: list[tuple[str, _Node[S]]] = [("", self._root)]
        while stack:
            prefix, node = stack.pop()
            if node.subs:
                yield prefix, len(node.subs)
            if node.children:
                for token, child in node.children.items():
                    stack.append((f"{prefix}.{token}" if prefix else token, child))

    @property
    def empty(self) -> bool:
        return self._root.children is None and self._root.subs is None


def _collect(node: _Node[S], tokens: list[str], i: int, out: dict[S, None]) -> None:
    children = node.children
    if i == len(tokens):
        if node.subs:
            out.update(node.subs)
        return
    if children is None:
        return
    child = children.get(tokens[i])
    if child is not None:
        _collect(child, tokens, i + 1, out)
    child = children.get("*")
    if child is not None:
        _collect(child, tokens, i + 1, out)
    child = children.get(">")
    if child is not None and child.subs:
        out.update(child.subs)
