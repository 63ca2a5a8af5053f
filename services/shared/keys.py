"""Signing keys and JSON Web Key Sets (RFC 7517), with RFC 7638 thumbprints as key ids."""

from __future__ import annotations

import base64
import hashlib
import json
import os
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


def ensure_exchange_keys(directory: Path) -> dict[str, Path]:
    """Create the gateway's and the platform's signing keys and the trusted JWKS, if missing.

    The trusted JWKS is what every service verifies bearer tokens against.
    """
    paths = {
        "gateway": directory / "gateway.pem",
        "platform": directory / "platform.pem",
        "trusted": directory / "trusted.jwks.json",
    }
    for name in ("gateway", "platform"):
        if not paths[name].exists():
            write_private_key(paths[name], generate_ec_key())
    trusted = jwks(load_private_key(paths["gateway"]), load_private_key(paths["platform"]))
    paths["trusted"].write_text(json.dumps(trusted, indent=2))
    return paths
