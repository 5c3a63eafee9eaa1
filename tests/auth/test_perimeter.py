"""The perimeter without sockets: origin matching, address keys, token buckets, check order."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.auth.perimeter import (
    HandshakeRate,
    OriginListError,
    OriginPolicy,
    Perimeter,
    PerimeterError,
    client_key,
    parse_origin,
)


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("127.0.0.2", "127.0.0.2"),
        ("2001:db8::1", "2001:db8::/64"),
        ("2001:db8::ffff:1", "2001:db8::/64"),  # same /64: one key
        ("2001:db8:0:1::1", "2001:db8:0:1::/64"),
        ("::ffff:10.0.0.1", "10.0.0.1"),  # IPv4-mapped: counted with IPv4
        ("fe80::1%eth0", "fe80::/64"),
    ],
)
def test_client_key(host: str, key: str) -> None:
    assert client_key(host) == key


def test_client_key_is_shared_per_address() -> None:
    a, b = "".join(["127.0.", "0.9"]), "".join(["127.0.0", ".9"])
    assert a is not b
    assert client_key(a) is client_key(b)  # one str kept per address, not per connection


POLICY = OriginPolicy(
    "https://app.example.com, http://localhost:8080 ,https://*.example.org,HTTPS://Admin.Example.NET"
)


@pytest.mark.parametrize(
    "origin",
    [
        "https://app.example.com",
        "HTTPS://APP.EXAMPLE.COM",
        "https://app.example.com:443",  # the default port, spelled out
        "http://localhost:8080",
        "https://a.example.org",
        "https://a.b.example.org",
        "https://admin.example.net",
    ],
)
def test_allowed_origins(origin: str) -> None:
    assert POLICY.allows(origin)


@pytest.mark.parametrize(
    "origin",
    [
        "http://app.example.com",  # scheme
        "https://app.example.com:8443",  # port
        "http://localhost",  # port 80 is not 8080
        "https://example.org",  # the wildcard needs a subdomain
        "https://example.org.evil.net",
        "https://evilexample.org",
        "https://a.example.org.",  # a trailing dot is another name
        "https://app.example.com/",  # an origin has no path
        "https://user@app.example.com",
        "null",
        "",
        "https://app.example.com, https://evil.com",
        "https://app.example.com:99999",
    ],
)
def test_refused_origins(origin: str) -> None:
    assert not POLICY.allows(origin)


@pytest.mark.parametrize(
    "spec",
    [
        "example.com",
        "https://",
        "https://a.com/path",
        "https://*.",
        "https://a.*.com",
        "https://*",
        "*",
        "https://[::1",
        "https://a.com:70000",
        "https://*.[::1]",
        " , ",
    ],
)
def test_bad_entries_are_refused_at_start(spec: str) -> None:
    with pytest.raises(OriginListError):
        OriginPolicy(spec)


LABELS = st.sampled_from(["example", "org", "evil", "a", "b-c", "exampleorg", "net", "EXAMPLE"])


@given(st.lists(LABELS, min_size=1, max_size=5), st.sampled_from(["https", "http"]))
def test_wildcard_matches_exactly_the_subdomains(labels: list[str], scheme: str) -> None:
    host = ".".join(labels)
    policy = OriginPolicy("https://*.example.org")
    lower = [label.lower() for label in labels]
    expected = scheme == "https" and len(lower) > 2 and lower[-2:] == ["example", "org"]
    assert policy.allows(f"{scheme}://{host}") == expected


def test_parse_origin() -> None:
    assert parse_origin("https://A.b:443") == ("https", "a.b", 443)
    assert parse_origin("http://[::1]:8080") == ("http", "[::1]", 8080)
    assert parse_origin("chrome-extension://abc") == ("chrome-extension", "abc", None)
    assert parse_origin("https://a b") is None


def test_token_bucket_burst_refill_and_retry_after() -> None:
    rate = HandshakeRate(rate=2.0, burst=3)
    assert [rate.take("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert rate.take("a", 0.0) == pytest.approx(0.5)  # one token back in 1/rate seconds
    assert rate.take("b", 0.0) == 0.0  # another address has its own bucket
    assert rate.take("a", 0.5) == 0.0
    assert rate.take("a", 0.6) == pytest.approx(0.4)


def test_full_buckets_are_forgotten_and_the_table_is_capped() -> None:
    rate = HandshakeRate(rate=10.0, burst=5, max_buckets=100)
    # 10,000 addresses, one handshake each, 100 per second: each bucket is full again after
    # burst/rate = 0.5 s, so about 50 are remembered at any time.
    for i in range(10_000):
        rate.take(f"10.0.{i >> 8}.{i & 255}", i / 100)
        assert len(rate.buckets) <= 51
    # A burst of new addresses within one instant: the cap holds, least recently used first out.
    for i in range(1000):
        rate.take(f"10.1.{i >> 8}.{i & 255}", 200.0)
    assert len(rate.buckets) == 100
    assert next(iter(rate.buckets)) == "10.1.3.132"  # 1000 - 100 = 900 = 3 * 256 + 132


OK_ORIGIN = [(b"origin", b"https://ok.example")]
BAD_ORIGIN = [(b"origin", b"https://evil.example")]


def test_check_order_statuses_and_counts() -> None:
    p = Perimeter("https://ok.example", max_per_ip=1, rate=1.0, burst=1)
    assert p.admit("a", OK_ORIGIN, 0.0) is True  # counted: "a" holds its one place
    with pytest.raises(PerimeterError) as err:
        p.admit("a", BAD_ORIGIN, 0.1)  # rate is checked first
    assert (err.value.reason, err.value.status) == ("rate", 429)
    assert (b"retry-after", b"1") in err.value.headers  # 0.9 s, rounded up
    with pytest.raises(PerimeterError) as err:
        p.admit("a", BAD_ORIGIN, 5.0)  # a token again; per address before origin
    assert (err.value.reason, err.value.status) == ("per_ip", 503)
    assert (b"retry-after", b"5") in err.value.headers
    p.release("a")
    with pytest.raises(PerimeterError) as err:
        p.admit("a", BAD_ORIGIN, 10.0)
    assert (err.value.reason, err.value.status) == ("origin", 403)
    assert p.counts == {}  # a refused upgrade never held a place
    assert p.admit("b", [(b"host", b"x")], 20.0)  # no Origin: not a browser, allowed
    with pytest.raises(PerimeterError):  # two Origin headers: which one? refused
        p.admit("c", OK_ORIGIN * 2, 30.0)
    p.release("b")
    assert p.counts == {}  # nothing kept for an address with no connection


def test_counts_per_address() -> None:
    p = Perimeter(max_per_ip=3)
    assert [p.admit("a", [], 0.0) for _ in range(3)] == [True] * 3
    with pytest.raises(PerimeterError):
        p.admit("a", [], 0.0)
    assert p.admit("b", [], 0.0)
    assert p.counts == {"a": 3, "b": 1}
    p.release("a")
    assert p.admit("a", [], 0.0)


def test_everything_off_by_default() -> None:
    p = Perimeter()
    assert not p.active
    assert p.admit("a", BAD_ORIGIN, 0.0) is False  # nothing counted either
