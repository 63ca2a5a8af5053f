"""Signing keys and JSON Web Key Sets (RFC 7517), with RFC 7638 thumbprints as key ids."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


def generate_ec_key() -> ec.EllipticCurvePrivateKey:
    """A P-384 key, for ES384 (the algorithm SMART Backend Services recommends)."""
    return ec.generate_private_key(ec.SECP384R1())


def private_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_private_key(path: Path) -> PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError("only EC and RSA signing keys are supported")
    return key


def write_private_key(path: Path, key: PrivateKey) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem(key))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638: SHA-256 over the required members, lexicographic order, no white space."""
    required = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n")}[jwk["kty"]]
    canonical = json.dumps({k: jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    return _b64(hashlib.sha256(canonical.encode()).digest())


def algorithm_for(key: PrivateKey | PublicKey) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return {"secp384r1": "ES384", "secp256r1": "ES256"}[key.curve.name]
    return "RS384"


def public_jwk(key: PrivateKey | PublicKey, *, use: str = "sig") -> dict[str, Any]:
    """The public JWK of a key, with kid (thumbprint), alg and use."""
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) else key
    if isinstance(public, ec.EllipticCurvePublicKey):
        jwk: dict[str, Any] = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
    jwk["kid"] = thumbprint(jwk)
    jwk["alg"] = algorithm_for(public)
    jwk["use"] = use
    return jwk


def jwks(*keys: PrivateKey | PublicKey) -> dict[str, Any]:
    return {"keys": [public_jwk(k) for k in keys]}


# Which signer a trusted key belongs to (an extra JWK member; RFC 7517 §4 lets verifiers ignore it).
ISSUER_MEMBER = "hie_issuer"
# A retired gateway key stays trusted this long: every token it signed has expired by then.
RETIRED_KEY_RETENTION_SECONDS = 600
# When a trusted key was retired, so verifiers drop it on time even if nobody rewrites the file.
RETIRED_MEMBER = "hie_retired_at"


def _key_paths(directory: Path) -> dict[str, Path]:
    return {
        "gateway": directory / "gateway.pem",
        "platform": directory / "platform.pem",
        "trusted": directory / "trusted.jwks.json",
        "retired": directory / "retired",
    }


def ensure_exchange_keys(directory: Path, *, now: float | None = None) -> dict[str, Path]:
    """Create the gateway's and the platform's signing keys if missing, and write the trusted
    JWKS every service verifies bearer tokens against: the current keys plus gateway keys
    retired less than RETIRED_KEY_RETENTION_SECONDS ago (older ones are pruned)."""
    paths = _key_paths(directory)
    for name in ("gateway", "platform"):
        if not paths[name].exists():
            write_private_key(paths[name], generate_ec_key())
    keys = [
        {**public_jwk(load_private_key(paths["gateway"])), ISSUER_MEMBER: "gateway"},
        {**public_jwk(load_private_key(paths["platform"])), ISSUER_MEMBER: "platform"},
    ]
    cutoff = (time.time() if now is None else now) - RETIRED_KEY_RETENTION_SECONDS
    for retired in sorted(paths["retired"].glob("*.json")) if paths["retired"].exists() else []:
        entry = json.loads(retired.read_text())
        if entry["retired_at"] < cutoff:
            retired.unlink()
        else:
            keys.append({**entry["jwk"], ISSUER_MEMBER: "gateway", RETIRED_MEMBER: int(entry["retired_at"])})
    _write_atomically(paths["trusted"], json.dumps({"keys": keys}, indent=2).encode())
    return paths


def rotate_gateway_key(directory: Path) -> tuple[str, str]:
    """Start signing access tokens with a new gateway key; the old public key stays trusted
    until every token it signed has expired. Returns (old kid, new kid)."""
    paths = ensure_exchange_keys(directory)
    old = public_jwk(load_private_key(paths["gateway"]))
    paths["retired"].mkdir(exist_ok=True)
    (paths["retired"] / f"{old['kid']}.json").write_text(json.dumps({"jwk": old, "retired_at": time.time()}))
    new_key = generate_ec_key()
    tmp = paths["gateway"].with_suffix(".pem.new")
    write_private_key(tmp, new_key)
    os.replace(tmp, paths["gateway"])
    ensure_exchange_keys(directory)
    return old["kid"], public_jwk(new_key)["kid"]


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
