"""Real keys and real signed tokens for the auth tests (PyJWT + cryptography, nothing mocked)."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

SECRET = "s" * 40  # >= 32 bytes: HS256 only (HS384 needs 48, HS512 64)
LONG_SECRET = "L" * 64  # HS256, HS384 and HS512


@functools.cache
def private_key(kind: str) -> Any:
    """One key per kind per test session (RSA generation takes a moment)."""
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "rsa2":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ed":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(kind)


def public_pem(kind: str) -> bytes:
    return (
        private_key(kind)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def write_public_key(tmp: Path, kind: str) -> str:
    path = tmp / f"{kind}.pem"
    path.write_bytes(public_pem(kind))
    return str(path)


def write_jwks(tmp: Path, keys: dict[str, str]) -> str:
    """A JWKS file with the public keys `{kid: kind}`."""
    entries = []
    for kid, kind in keys.items():
        alg = {"rsa": "RS256", "rsa2": "RS256", "ec": "ES256", "ed": "EdDSA"}[kind]
        algo = jwt.get_algorithm_by_name(alg)
        entry = json.loads(algo.to_jwk(private_key(kind).public_key()))
        entries.append({**entry, "kid": kid, "alg": alg, "use": "sig"})
    path = tmp / "jwks.json"
    path.write_text(json.dumps({"keys": entries}))
    return str(path)


def claims(
    publish: list[str] | None = None,
    subscribe: list[str] | None = None,
    ttl: float | None = 300,
    **extra: Any,
) -> dict[str, Any]:
    c: dict[str, Any] = {"sub": "tester", **extra}
    if publish is not None:
        c["publish"] = publish
    if subscribe is not None:
        c["subscribe"] = subscribe
    if ttl is not None and "exp" not in c:
        c["exp"] = int(time.time() + ttl)
    return c


def sign(payload: dict[str, Any], alg: str = "HS256", key: Any = SECRET, **headers: Any) -> str:
    """A token signed with `key` (a secret string or a key kind: rsa, rsa2, ec, ed)."""
    if isinstance(key, str) and key in ("rsa", "rsa2", "ec", "ed"):
        key = private_key(key)
    return jwt.encode(payload, key, algorithm=alg, headers=headers or None)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(payload: dict[str, Any], header: dict[str, Any], hmac_key: bytes | None) -> str:
    """A token built by hand, as an attacker would: any header, HMAC-signed with any bytes
    (PyJWT itself refuses to sign with a PEM key as HMAC secret), or unsigned."""
    head = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(payload).encode())
    if hmac_key is None:
        return head + "."
    return head + "." + _b64(hmac.new(hmac_key, head.encode(), hashlib.sha256).digest())
