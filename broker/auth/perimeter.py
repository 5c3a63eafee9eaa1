"""The perimeter: whether a client address or a web page may open a WebSocket at all.

Checked at the upgrade, before the upgrade's own validity and before authentication, cheapest and
most abusable first; each refusal is an HTTP answer (`PerimeterError`, a `HandshakeError`) with
the label it is counted under in `broker_handshakes_refused_total{reason}`:

    rate     --handshake-rate / --handshake-burst: a token bucket per address      429 Retry-After
    per_ip   --max-connections-per-ip: WebSockets open from one address            503 Retry-After
    origin   --allowed-origins: the page a browser says the request comes from     403

Theory of operation. Sans-IO: the caller gives the client's address key (`client_key` of what
accept() returned), the request headers and the loop's clock; nothing here reads a socket or the
time. The state an attacker can make grow is bounded:

* connection counts exist only for addresses with an open WebSocket (bounded by the connection
  limit), and an address's entry goes when its count returns to zero;
* token buckets are kept in least-recently-used order: a bucket untouched for `burst / rate`
  seconds is full again, so it is forgotten (the oldest are checked first, O(1) amortised per
  handshake), and at most `MAX_BUCKETS` are kept (the least recently used one goes: that address
  starts again with a full bucket, which is what an idle one would have anyway).

Keys: an IPv4 address as is; IPv6 by its /64, because one subscriber line commonly holds a whole
/64 and counting single addresses there would be no limit at all; IPv4-mapped IPv6 as IPv4.

Origin rules (RFC 6454 serialisation: `scheme://host[:port]`, no path): scheme and host compare
case-insensitively, the port exactly, a missing port meaning the scheme's default. An entry
`https://*.example.com` matches any host under example.com (`a.example.com`, `a.b.example.com`)
and not `example.com` itself, `evilexample.com` or `example.com.evil.net`. A request without
`Origin` (any non-browser client) is allowed: the header protects browser users from pages they
visit, it is no authentication. Several `Origin` headers, or one that is not a serialised origin
(`null` included), are refused when a list is set.
"""

from __future__ import annotations

import ipaddress
import math
import re
import sys
from collections import OrderedDict
from collections.abc import Iterable

from broker.errors import HandshakeError

REASONS = ("origin", "per_ip", "rate")
MAX_BUCKETS = 65536  # addresses whose handshake rate is tracked at once (about 200 B each)
PER_IP_RETRY_AFTER = 5  # seconds suggested to a client refused for holding too many connections
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?"
_HOST = rf"{_LABEL}(?:\.{_LABEL})*|\[[0-9a-f:.]+\]"
_ORIGIN = re.compile(rf"([a-z][a-z0-9+.-]*)://({_HOST})(?::([0-9]{{1,5}}))?")
_PATTERN = re.compile(rf"([a-z][a-z0-9+.-]*)://(\*\.)?({_HOST})(?::([0-9]{{1,5}}))?")

Origin = tuple[str, str, int | None]  # scheme, host, port (None: a scheme without a default)


class PerimeterError(HandshakeError):
    """A handshake refused at the perimeter; `reason` is its metric label."""

    def __init__(
        self,
        reason: str,
        status: int,
        message: str,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        super().__init__(status, message, headers)
        self.reason = reason


class OriginListError(ValueError):
    """`--allowed-origins` does not parse; the message names the entry."""


def client_key(host: str) -> str:
    """The key limits count against, from the host part of accept()'s address."""
    if ":" not in host:
        return sys.intern(host)  # one str shared by every connection from the address
    try:
        addr = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host
    if addr.ipv4_mapped is not None:
        return sys.intern(str(addr.ipv4_mapped))
    return sys.intern(str(ipaddress.IPv6Network((addr, 64), strict=False)))


def _port(scheme: str, digits: str | None) -> int | None:
    if digits is None:
        return DEFAULT_PORTS.get(scheme)
    port = int(digits)
    if port > 65535:
        raise OriginListError(f"port {port} out of range")
    return port


def parse_origin(value: str) -> Origin | None:
    """(scheme, host, port) of a serialised origin, or None if `value` is not one."""
    match = _ORIGIN.fullmatch(value.strip().lower())
    if match is None:
        return None
    scheme, host, digits = match.groups()
    try:
        return scheme, host, _port(scheme, digits)
    except ValueError:
        return None


class OriginPolicy:
    """The origins allowed to open a WebSocket, from `--allowed-origins`."""

    __slots__ = ("exact", "wildcards")

    def __init__(self, spec: str) -> None:
        """Parse a comma-separated list; OriginListError names the first entry that is not an
        origin or a `scheme://*.domain[:port]` pattern."""
        self.exact: set[Origin] = set()
        self.wildcards: list[tuple[str, str, int | None]] = []  # scheme, ".suffix", port
        for raw in spec.split(","):
            entry = raw.strip().lower()
            if not entry:
                continue
            match = _PATTERN.fullmatch(entry)
            if match is None:
                raise OriginListError(f"not an origin (scheme://host[:port]): {raw.strip()!r}")
            scheme, star, host, digits = match.groups()
            port = _port(scheme, digits)
            if star:
                if host.startswith("["):
                    raise OriginListError(f"a wildcard needs a domain name: {raw.strip()!r}")
                self.wildcards.append((scheme, "." + host, port))
            else:
                self.exact.add((scheme, host, port))
        if not self.exact and not self.wildcards:
            raise OriginListError("no origins listed")

    def allows(self, value: str) -> bool:
        origin = parse_origin(value)
        if origin is None:
            return False
        if origin in self.exact:
            return True
        scheme, host, port = origin
        return any(
            scheme == w_scheme and port == w_port and host.endswith(suffix)
            for w_scheme, suffix, w_port in self.wildcards
        )


class HandshakeRate:
    """Token buckets per address: `burst` handshakes at once, refilled at `rate` per second."""

    __slots__ = ("buckets", "burst", "max_buckets", "rate", "refill")

    def __init__(self, rate: float, burst: int, max_buckets: int = MAX_BUCKETS) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.refill = burst / rate  # seconds after which any bucket is full again
        self.max_buckets = max_buckets
        # key -> (tokens, time of the last handshake); least recently used first.
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str, now: float) -> float:
        """Spend a token of `key`'s bucket: 0.0 if it had one, else the seconds until it will."""
        buckets = self.buckets
        while buckets:  # forget the buckets that have refilled, oldest first
            oldest = next(iter(buckets))
            if now - buckets[oldest][1] < self.refill:
                break
            del buckets[oldest]
        last = buckets.pop(key, None)
        if last is None:
            tokens = self.burst
        else:
            tokens = min(self.burst, last[0] + (now - last[1]) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        buckets[key] = (tokens, now)
        if len(buckets) > self.max_buckets:
            buckets.popitem(last=False)
        return wait


class Perimeter:
    """The three checks and the per-address connection counts; one per server."""

    __slots__ = ("counts", "max_per_ip", "origins", "rate")

    def __init__(
        self, allowed_origins: str = "", max_per_ip: int = 0, rate: float = 0.0, burst: int = 1
    ) -> None:
        self.origins = OriginPolicy(allowed_origins) if allowed_origins.strip() else None
        self.max_per_ip = max_per_ip
        self.rate = HandshakeRate(rate, burst) if rate > 0 else None
        self.counts: dict[str, int] = {}  # admitted connections open, by key (max_per_ip only)

    @property
    def active(self) -> bool:
        return self.origins is not None or self.max_per_ip > 0 or self.rate is not None

    # -- the upgrade ---------------------------------------------------------------------------

    def admit(self, key: str, headers: Iterable[tuple[bytes, bytes]], now: float) -> bool:
        """Raise `PerimeterError` if the upgrade from `key` with `headers` may not go on.

        Returns True when the connection now counts against its address (`--max-connections-per-
        ip`); the caller then owes one `release(key)` when it closes, whichever way it closes.
        Only upgrades that pass every check count: a refused one never held a place.
        """
        if self.rate is not None:
            wait = self.rate.take(key, now)
            if wait:
                raise PerimeterError(
                    "rate",
                    429,
                    "too many handshakes from this address",
                    ((b"retry-after", b"%d" % max(1, math.ceil(wait))),),
                )
        limit = self.max_per_ip
        if limit and self.counts.get(key, 0) >= limit:
            raise PerimeterError(
                "per_ip",
                503,
                "too many connections from this address",
                ((b"retry-after", b"%d" % PER_IP_RETRY_AFTER),),
            )
        if self.origins is not None:
            values = [value for name, value in headers if name == b"origin"]
            if values and (len(values) > 1 or not self.origins.allows(values[0].decode("latin-1"))):
                raise PerimeterError("origin", 403, "origin not allowed")
        if limit:
            counts = self.counts
            counts[key] = counts.get(key, 0) + 1
            return True
        return False

    def release(self, key: str) -> None:
        """A connection `admit` counted has closed."""
        counts = self.counts
        left = counts[key] - 1
        if left:
            counts[key] = left
        else:
            del counts[key]
