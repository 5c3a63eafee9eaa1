"""JWT verification: a token in, a `Grant` out, or an `AuthError` with one of a few reasons.

House rules. The algorithms a key may verify are fixed by the configuration, never read from the
token (RFC 8725 section 2.1): an HMAC secret verifies HS256/384/512 only (and only those its length
allows, RFC 7518 section 3.2: at least as many bytes as the hash), a PEM public key verifies the
family of its type only (RSA: RS*/PS*, EC: the ES* of its curve, Ed25519/Ed448: EdDSA), a JWKS key
its own `alg`. So `alg: none`, and the classic confusion attack (an HS256 token whose "secret" is
the server's public key), are refused as `signature` failures before any crypto runs.

Reasons (`AUTH_FAILURE_REASONS`, the label of `broker_auth_failures_total`): `missing` (no token),
`malformed` (not a JWT, or header fields or claims of the wrong type), `signature` (bad
signature, an algorithm or `kid` we do not accept), `expired`, `not_yet_valid` (`nbf` or `iat` in
the future), `audience`, `issuer`, `other` (anything else PyJWT refuses). `exp` and `nbf` are
honoured with `--auth-leeway` seconds of tolerance; a token valid now stays valid until
`exp + leeway`.

Verified tokens are remembered (a small LRU keyed by the token string): a reconnect storm of
clients holding the same tokens costs one signature check per token, not per connection, and
every connection with that token shares one `Grant`. A remembered token is still checked for
expiry on every use; nothing else about it can change while the process runs.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from broker.auth.permissions import Grant, Rules
from broker.config import Config
from broker.errors import AUTH_FAILURE_REASONS

CACHE_SIZE = 1024  # verified tokens remembered
RULES_SIZE = 4096  # distinct claim lists interned (the table restarts when full)
CACHEABLE_TOKEN = 4096  # longer tokens are verified each time (bounds the cache's memory)
MAX_TOKEN = 16 * 1024  # longer is refused unread: no base64/JSON work for a hostile megabyte
MIN_RSA_BITS = 2048
FAR_FUTURE = 1 << 40  # an exp past this (year 36812) is treated as no expiry
_HMAC = (("HS256", 32), ("HS384", 48), ("HS512", 64))
_RSA = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_EC = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512", "secp256k1": "ES256K"}
_HANDLED = {
    # PyJWT's exception -> our reason; the first match in this order wins (subclasses first).
    jwt.InvalidSignatureError: "signature",
    jwt.InvalidAlgorithmError: "signature",
    jwt.ExpiredSignatureError: "expired",
    jwt.ImmatureSignatureError: "not_yet_valid",
    jwt.InvalidAudienceError: "audience",
    jwt.InvalidIssuerError: "issuer",
    jwt.InvalidIssuedAtError: "malformed",
    jwt.exceptions.InvalidSubjectError: "malformed",
    jwt.exceptions.InvalidJTIError: "malformed",
    jwt.DecodeError: "malformed",
    jwt.InvalidTokenError: "malformed",  # the rest: header fields of the wrong type (kid, crit)
}
_MISSING_CLAIM = {"aud": "audience", "iss": "issuer"}


class AuthError(Exception):
    """A token refused; `reason` is one of AUTH_FAILURE_REASONS (safe to show the client)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in AUTH_FAILURE_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class AuthConfigError(ValueError):
    """The auth configuration cannot be used (unreadable key, weak secret, ...): refuse to start."""


# -- where tokens come from ----------------------------------------------------------------------


def bearer_token(authorization: bytes | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value (scheme case-insensitive)."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    try:
        return token.strip().decode("ascii") or None
    except UnicodeDecodeError:
        return "\ufffd"  # given but not a JWT: a `malformed` refusal, not `missing`


def query_token(target: bytes) -> str | None:
    """The percent-decoded `token` parameter of a request target's query string."""
    _, sep, query = target.partition(b"?")
    if not sep or b"token=" not in query:
        return None
    try:
        pairs = parse_qsl(query.decode("ascii"), max_num_fields=64, errors="strict")
    except (UnicodeDecodeError, ValueError):
        return "\ufffd"
    for name, value in pairs:
        if name == "token":
            return value or None
    return None


# -- keys -------------------------------------------------------------------------------------


def _hmac_algorithms(secret: bytes, where: str) -> list[str]:
    algorithms = [alg for alg, size in _HMAC if len(secret) >= size]
    if not algorithms:
        raise AuthConfigError(
            f"{where}: an HMAC secret needs at least 32 bytes (RFC 7518 3.2); "
            "e.g. `openssl rand -hex 32`"
        )
    return algorithms


def _public_key_algorithms(key: Any, where: str) -> list[str]:
    """The only algorithms a public key may verify; never an HMAC one (algorithm confusion)."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise AuthConfigError(f"{where}: RSA key of {key.key_size} bits, need {MIN_RSA_BITS}")
        return list(_RSA)
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = _EC.get(key.curve.name)
        if alg is None:
            raise AuthConfigError(f"{where}: unsupported EC curve {key.curve.name}")
        return [alg]
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return ["EdDSA"]
    raise AuthConfigError(f"{where}: unsupported public key type {type(key).__name__}")


def load_public_key(path: str) -> tuple[Any, list[str]]:
    """(key, allowed algorithms) from a PEM public key or certificate file."""
    try:
        pem = Path(path).read_bytes()
    except OSError as exc:
        raise AuthConfigError(f"--auth-public-key {path}: {exc.strerror}") from None
    try:
        if b"-----BEGIN CERTIFICATE-----" in pem:
            key: Any = x509.load_pem_x509_certificate(pem).public_key()
        else:
            key = serialization.load_pem_public_key(pem)
    except ValueError:
        raise AuthConfigError(
            f"--auth-public-key {path}: not a PEM public key or certificate"
        ) from None
    return key, _public_key_algorithms(key, f"--auth-public-key {path}")


def load_jwks(path: str) -> dict[str | None, tuple[jwt.PyJWK, list[str]]]:
    """kid -> (key, [its algorithm]) from a JWKS file; every key must be usable, or we refuse."""
    try:
        data = json.loads(Path(path).read_bytes())
    except OSError as exc:
        raise AuthConfigError(f"--auth-jwks {path}: {exc.strerror}") from None
    except ValueError:
        raise AuthConfigError(f"--auth-jwks {path}: not JSON") from None
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, list) or not keys:
        raise AuthConfigError(f'--auth-jwks {path}: expected {{"keys": [...]}} with keys')
    found: dict[str | None, tuple[jwt.PyJWK, list[str]]] = {}
    for i, entry in enumerate(keys):
        where = f"--auth-jwks {path}: key {i}"
        if not isinstance(entry, dict):
            raise AuthConfigError(f"{where}: not an object")
        if entry.get("use", "sig") != "sig":
            raise AuthConfigError(f"{where}: use is {entry.get('use')!r}, not 'sig'")
        try:
            jwk = jwt.PyJWK(entry)
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise AuthConfigError(f"{where}: {exc}") from None
        alg = jwk.algorithm_name
        if entry.get("kty") == "oct":
            if alg not in _hmac_algorithms(jwk.key, where):
                raise AuthConfigError(f"{where}: secret too short for {alg}")
        elif alg not in _public_key_algorithms(jwk.key, where):
            raise AuthConfigError(f"{where}: alg {alg} does not fit its key type")
        kid = entry.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthConfigError(f"{where}: kid must be a string")
        if kid in found:
            raise AuthConfigError(f"{where}: duplicate kid {kid!r}")
        found[kid] = (jwk, [alg])
    if None in found and len(found) > 1:
        raise AuthConfigError(f"--auth-jwks {path}: with several keys, every key needs a kid")
    return found


# -- verification ---------------------------------------------------------------------------


class TokenVerifier:
    """Verifies tokens against one configured key source; see the module docstring."""

    def __init__(
        self,
        *,
        secret: bytes | None = None,
        public_key: tuple[Any, list[str]] | None = None,
        jwks: dict[str | None, tuple[jwt.PyJWK, list[str]]] | None = None,
        issuer: str = "",
        audience: str = "",
        leeway: float = 5.0,
    ) -> None:
        sources = [s for s in (secret, public_key, jwks) if s is not None]
        if len(sources) != 1:
            raise AuthConfigError(
                "give exactly one of --auth-secret, --auth-public-key, --auth-jwks"
            )
        self._single: tuple[Any, list[str]] | None = None
        self._jwks = jwks
        if secret is not None:
            self._single = (secret, _hmac_algorithms(secret, "--auth-secret"))
        elif public_key is not None:
            self._single = public_key
        self.issuer = issuer or None
        self.audience = audience or None
        self.leeway = leeway
        self._cache: OrderedDict[str, Grant] = OrderedDict()
        self._rules: dict[tuple[tuple[str, ...], tuple[str, ...]], Rules] = {}

    @classmethod
    def from_config(cls, config: Config) -> TokenVerifier | None:
        """The verifier the flags ask for, or None when auth is off (no key source given)."""
        common: dict[str, Any] = {
            "issuer": config.auth_issuer,
            "audience": config.auth_audience,
            "leeway": config.auth_leeway,
        }
        if config.auth_secret:
            return cls(secret=config.auth_secret.encode(), **common)
        if config.auth_public_key:
            return cls(public_key=load_public_key(config.auth_public_key), **common)
        if config.auth_jwks:
            return cls(jwks=load_jwks(config.auth_jwks), **common)
        return None

    def verify(self, token: str | None) -> Grant:
        """The Grant of a valid token; AuthError otherwise."""
        if not token:
            raise AuthError("missing")
        if len(token) > MAX_TOKEN or not token.isascii():  # a JWT is base64url and dots
            raise AuthError("malformed")
        cache = self._cache
        grant = cache.get(token)
        if grant is not None:
            if grant.expires is not None and time.time() >= grant.expires + self.leeway:
                del cache[token]
                raise AuthError("expired")
            cache.move_to_end(token)
            return grant
        grant = self._verify(token)
        if len(token) <= CACHEABLE_TOKEN:
            cache[token] = grant
            if len(cache) > CACHE_SIZE:
                cache.popitem(last=False)
        return grant

    def _key(self, token: str) -> tuple[Any, list[str]]:
        if self._single is not None:
            return self._single
        assert self._jwks is not None
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError:
            raise AuthError("malformed") from None
        found = self._jwks.get(kid)
        if found is None and kid is None and len(self._jwks) == 1:
            found = next(iter(self._jwks.values()))
        if found is None:
            raise AuthError("signature", "no key with that kid")
        return found

    def _verify(self, token: str) -> Grant:
        key, algorithms = self._key(token)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
            )
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(_MISSING_CLAIM.get(exc.claim, "other"), str(exc)) from None
        except jwt.PyJWTError as exc:
            for kind, reason in _HANDLED.items():
                if isinstance(exc, kind):
                    raise AuthError(reason, str(exc)) from None
            raise AuthError("other", str(exc)) from None
        except (ValueError, TypeError) as exc:  # e.g. a payload that is JSON but not an object
            raise AuthError("malformed", type(exc).__name__) from None
        return grant_from_claims(claims, self._rules)


def _patterns(claims: dict[str, Any], name: str) -> list[str]:
    value = claims.get(name, [])
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise AuthError("malformed", f"{name} must be a list of patterns")
    return value


def grant_from_claims(
    claims: dict[str, Any], interned: dict[tuple[tuple[str, ...], tuple[str, ...]], Rules]
) -> Grant:
    """The Grant of verified `claims`; AuthError("malformed") for claims of the wrong type.
    Its Rules come from `interned` when another token had the same lists."""
    if not isinstance(claims, dict):
        raise AuthError("malformed", "claims must be an object")
    admin = claims.get("admin", False)
    if not isinstance(admin, bool):
        raise AuthError("malformed", "admin must be true or false")
    expires: float | None = None
    if "exp" in claims:
        exp = int(claims["exp"])  # PyJWT has checked it is a number; it compares int(exp) too
        expires = float(exp) if exp < FAR_FUTURE else None
    key = (tuple(_patterns(claims, "publish")), tuple(_patterns(claims, "subscribe")))
    rules = interned.get(key)
    if rules is None:
        try:
            rules = Rules(*key)
        except ValueError as exc:
            raise AuthError("malformed", str(exc)) from None
        if len(interned) >= RULES_SIZE:
            interned.clear()
        interned[key] = rules
    return Grant(sub=claims.get("sub") or "", admin=admin, expires=expires, rules=rules)
