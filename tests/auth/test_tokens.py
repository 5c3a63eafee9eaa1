"""TokenVerifier (broker/auth/tokens.py) with real keys and tokens: every algorithm family, every
failure reason, the attacks (alg none, algorithm confusion, unknown kid), and token sources."""

from __future__ import annotations

import base64
import dataclasses
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jwt.warnings import InsecureKeyLengthWarning

from broker.auth.tokens import (
    AuthConfigError,
    AuthError,
    TokenVerifier,
    bearer_token,
    load_jwks,
    load_public_key,
    query_token,
)
from broker.config import Config
from broker.errors import AUTH_FAILURE_REASONS

from .keys import LONG_SECRET, SECRET, claims, forge, public_pem, sign, write_jwks, write_public_key

JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


def verifier(**flags: object) -> TokenVerifier:
    v = TokenVerifier.from_config(dataclasses.replace(Config(), **flags))  # type: ignore[arg-type]
    assert v is not None
    return v


def reason(v: TokenVerifier, token: str | None) -> str:
    with pytest.raises(AuthError) as info:
        v.verify(token)
    return info.value.reason


def test_auth_is_off_without_a_key_source() -> None:
    assert TokenVerifier.from_config(Config()) is None


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_hmac_algorithms_and_the_grant(alg: str) -> None:
    v = verifier(auth_secret=LONG_SECRET)
    payload = claims(["chat.*"], ["chat.>"], admin=True)
    grant = v.verify(sign(payload, alg, LONG_SECRET))
    assert (grant.sub, grant.publish, grant.subscribe, grant.admin) == (
        "tester",
        ("chat.*",),
        ("chat.>",),
        True,
    )
    assert grant.expires == payload["exp"]


def test_hmac_algorithms_are_limited_by_the_secret_length() -> None:
    v = verifier(auth_secret=SECRET)  # 40 bytes: HS256 only
    assert v.verify(sign(claims(), "HS256", SECRET))
    with pytest.warns(InsecureKeyLengthWarning):  # PyJWT signs it, with a warning
        weak = sign(claims(), "HS512", SECRET)
    assert reason(v, weak) == "signature"
    with pytest.raises(AuthConfigError, match="32 bytes"):
        verifier(auth_secret="short")


@pytest.mark.parametrize(
    ("kind", "alg"), [("rsa", "RS256"), ("rsa", "PS384"), ("ec", "ES256"), ("ed", "EdDSA")]
)
def test_public_keys(tmp_path: Path, kind: str, alg: str) -> None:
    v = verifier(auth_public_key=write_public_key(tmp_path, kind))
    assert v.verify(sign(claims(["a"]), alg, kind)).publish == ("a",)


def test_public_key_algorithms_come_from_the_key_type(tmp_path: Path) -> None:
    assert load_public_key(write_public_key(tmp_path, "rsa"))[1][:3] == ["RS256", "RS384", "RS512"]
    assert load_public_key(write_public_key(tmp_path, "ec"))[1] == ["ES256"]
    assert load_public_key(write_public_key(tmp_path, "ed"))[1] == ["EdDSA"]
    # An RSA-signed token against the EC key: refused before any crypto (wrong family).
    v = verifier(auth_public_key=write_public_key(tmp_path, "ec"))
    assert reason(v, sign(claims(), "RS256", "rsa")) == "signature"


def test_algorithm_confusion_and_alg_none_are_refused(tmp_path: Path) -> None:
    v = verifier(auth_public_key=write_public_key(tmp_path, "rsa"))
    # The classic attack: HS256 "signed" with the server's public key as the HMAC secret.
    confused = forge(claims([">"], [">"]), {"alg": "HS256", "typ": "JWT"}, public_pem("rsa"))
    assert reason(v, confused) == "signature"
    unsigned = forge(claims([">"], [">"]), {"alg": "none", "typ": "JWT"}, None)
    assert reason(v, unsigned) == "signature"
    assert reason(verifier(auth_secret=SECRET), unsigned) == "signature"
    for alg in ("None", "NONE", ""):
        assert reason(v, forge(claims(), {"alg": alg}, None)) == "signature"


def test_jwks_picks_the_key_by_kid(tmp_path: Path) -> None:
    v = verifier(auth_jwks=write_jwks(tmp_path, {"one": "rsa", "two": "ec"}))
    assert v.verify(sign(claims(["x"]), "RS256", "rsa", kid="one")).publish == ("x",)
    assert v.verify(sign(claims(["y"]), "ES256", "ec", kid="two")).publish == ("y",)
    # Right key, wrong kid; an unknown kid; no kid among several keys; a key not in the set.
    assert reason(v, sign(claims(), "RS256", "rsa", kid="two")) == "signature"
    assert reason(v, sign(claims(), "RS256", "rsa", kid="three")) == "signature"
    assert reason(v, sign(claims(), "RS256", "rsa")) == "signature"
    assert reason(v, sign(claims(), "RS256", "rsa2", kid="one")) == "signature"
    confused = forge(claims(), {"alg": "HS256", "kid": "one"}, public_pem("rsa"))
    assert reason(v, confused) == "signature"
    for junk in ("garbage", "a\ud800.b.c", forge(claims(), {"alg": "RS256", "kid": 7}, None)):
        assert reason(v, junk) == "malformed"


def test_jwks_with_one_key_accepts_tokens_without_kid(tmp_path: Path) -> None:
    v = verifier(auth_jwks=write_jwks(tmp_path, {"only": "ed"}))
    assert v.verify(sign(claims(), "EdDSA", "ed"))


def test_bad_jwks_files_are_refused_at_start(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    for text in (
        "nope",
        "{}",
        '{"keys": [{"kty": "RSA"}]}',
        '{"keys": [{"kty": "oct", "k": "c2hvcnQ"}]}',
    ):
        bad.write_text(text)
        with pytest.raises(AuthConfigError):
            load_jwks(str(bad))
    with pytest.raises(AuthConfigError):
        load_public_key(str(tmp_path / "missing.pem"))


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        (None, "missing"),
        ("", "missing"),
        ("not-a-jwt", "malformed"),
        ("a.b.c", "malformed"),
        ("\ufffd", "malformed"),
        ("a\ud800.b.c", "malformed"),  # a lone surrogate (msgpack can carry one)
        ("a." * 10_000, "malformed"),  # over the size cap: refused unread
    ],
)
def test_unreadable_tokens(token: str | None, expected: str) -> None:
    assert reason(verifier(auth_secret=SECRET), token) == expected


def test_every_claim_failure_has_its_reason() -> None:
    v = verifier(
        auth_secret=SECRET, auth_issuer="https://issuer", auth_audience="broker", auth_leeway=2.0
    )
    good = {"iss": "https://issuer", "aud": "broker"}
    now = int(time.time())
    assert v.verify(sign(claims(**good)))
    assert reason(v, sign(claims(**good), key="x" * 40)) == "signature"
    assert reason(v, sign(claims(**good, exp=now - 3))) == "expired"
    assert v.verify(sign(claims(**good, exp=now - 1)))  # within the leeway
    assert reason(v, sign(claims(**good, nbf=now + 60))) == "not_yet_valid"
    assert reason(v, sign(claims(iss="https://issuer", aud="other"))) == "audience"
    assert reason(v, sign(claims(iss="https://issuer"))) == "audience"
    assert reason(v, sign(claims(iss="https://evil", aud="broker"))) == "issuer"
    assert reason(v, sign(claims(aud="broker"))) == "issuer"
    for wrong in (
        {"publish": "a"},
        {"subscribe": [1]},
        {"admin": "yes"},
        {"publish": ["a..b"]},
        {"sub": 5},
        {"exp": "soon"},
    ):
        assert reason(v, sign({**claims(**good), **wrong})) == "malformed", wrong


def test_tokens_with_an_audience_need_one_configured() -> None:
    # RFC 7519 4.1.3: a principal not named in a present `aud` must reject the token.
    assert reason(verifier(auth_secret=SECRET), sign(claims(aud="someone"))) == "audience"


def test_missing_claims_allow_nothing_and_no_exp_never_expires() -> None:
    grant = verifier(auth_secret=SECRET).verify(sign(claims(ttl=None)))
    assert grant.publish == () and grant.subscribe == () and grant.expires is None
    assert not grant.may_publish("a") and not grant.admin


def test_a_remembered_token_still_expires() -> None:
    v = verifier(auth_secret=SECRET, auth_leeway=0.0)
    token = sign(claims(exp=int(time.time()) + 1))
    first = v.verify(token)
    assert v.verify(token) is first  # one Grant per token, shared
    time.sleep(max(0.0, first.expires - time.time()) + 0.05)  # type: ignore[operator]
    assert reason(v, token) == "expired"


def test_token_sources() -> None:
    assert bearer_token(b"Bearer abc.def.ghi") == "abc.def.ghi"
    assert bearer_token(b"bearer  abc ") == "abc"
    assert bearer_token(b"Basic dXNlcjpwdw==") is None
    assert bearer_token(None) is None
    assert bearer_token(b"Bearer \xff") == "\ufffd"
    assert query_token(b"/ws?token=a.b%2Ec&x=1") == "a.b.c"
    assert query_token(b"/ws?x=1") is None
    assert query_token(b"/ws") is None
    assert query_token(b"/ws?token=%ff") == "\ufffd"
    assert (
        query_token(b"/ws?" + b"&".join(b"a=%d" % i for i in range(100)) + b"&token=t") == "\ufffd"
    )


_FUZZ_VERIFIER: list[TokenVerifier] = []


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.text(max_size=300),
        st.lists(st.text(max_size=60), min_size=1, max_size=4).map(".".join),
        st.lists(st.binary(max_size=60), min_size=3, max_size=3).map(
            lambda parts: ".".join(base64.urlsafe_b64encode(p).decode().rstrip("=") for p in parts)
        ),
        st.builds(
            lambda header, payload: forge(payload, header, SECRET.encode()),
            st.dictionaries(st.sampled_from(["alg", "kid", "typ", "crit", "b64"]), JSONISH).map(
                lambda h: {**h, "alg": "HS256"} if len(h) % 2 else h  # signed right, half the time
            ),
            st.dictionaries(
                st.sampled_from(["exp", "nbf", "iat", "aud", "iss", "sub", "publish", "admin"]),
                JSONISH,
            ),
        ),
    )
)
def test_hostile_tokens_raise_only_auth_error(token: str) -> None:
    """Whatever the string, verify answers with a Grant or an AuthError of a known reason."""
    if not _FUZZ_VERIFIER:
        _FUZZ_VERIFIER.append(verifier(auth_secret=SECRET))
    try:
        _FUZZ_VERIFIER[0].verify(token)
    except AuthError as exc:
        assert exc.reason in AUTH_FAILURE_REASONS
