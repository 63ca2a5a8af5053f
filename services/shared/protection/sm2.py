"""SM2 signatures (GB/T 32918.2, with SM3 and the signer identity of GB/T 35276) for the
national-algorithms option, through GmSSL (the gmssl-pyx binding) rather than home-made curve code."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gmssl_pyx

from services.shared.protection.keyring import write_secret_file

__all__ = ["DEFAULT_SIGNER_ID", "Sm2SigningKey", "Sm2VerifyingKey", "load_or_create_signing_key"]

# GB/T 35276-2017 §5.3: the default user identity when none is agreed, "1234567812345678".
DEFAULT_SIGNER_ID = gmssl_pyx.SM2_DEFAULT_SIGNER_ID


@dataclass(frozen=True)
class Sm2VerifyingKey:
    """A public key: the uncompressed point x || y (64 bytes)."""

    point: bytes

    def verify(self, message: bytes, signature: bytes, *, signer_id: bytes = DEFAULT_SIGNER_ID) -> bool:
        try:
            return bool(gmssl_pyx.sm2_verify(self.point, message, signature, signer_id))
        except (gmssl_pyx.InvalidValueError, gmssl_pyx.GmsslInnerError):
            return False

    def hex(self) -> str:
        return self.point.hex()


@dataclass(frozen=True)
class Sm2SigningKey:
    """A private key and its public point."""

    secret: bytes
    public: Sm2VerifyingKey

    @classmethod
    def generate(cls) -> Sm2SigningKey:
        point, secret = gmssl_pyx.sm2_key_generate()
        return cls(secret=secret, public=Sm2VerifyingKey(point))

    def sign(self, message: bytes, *, signer_id: bytes = DEFAULT_SIGNER_ID) -> bytes:
        """A DER-encoded (r, s) signature over SM3(Z || message)."""
        return gmssl_pyx.sm2_sign(self.secret, self.public.point, message, signer_id)

    def __repr__(self) -> str:  # never print the secret
        return f"Sm2SigningKey(public={self.public.hex()[:16]}…)"


def load_or_create_signing_key(path: Path) -> Sm2SigningKey:
    """The platform's SM2 key (hex JSON, 0600), created once even when processes start together."""
    if path.exists():
        document = json.loads(path.read_text())
        return Sm2SigningKey(
            secret=bytes.fromhex(document["secret"]), public=Sm2VerifyingKey(bytes.fromhex(document["public"]))
        )
    key = Sm2SigningKey.generate()
    document = {"algorithm": "SM2", "secret": key.secret.hex(), "public": key.public.hex()}
    try:
        write_secret_file(path, json.dumps(document).encode(), exclusive=True)
    except FileExistsError:
        return load_or_create_signing_key(path)  # another process created it first: use theirs
    return key
