"""SM2 signatures (GB/T 32918.2, with SM3 and the signer identity of GB/T 35276) for the
national-algorithms option, through GmSSL (the gmssl-pyx binding) rather than home-made curve code."""

from __future__ import annotations

from dataclasses import dataclass

import gmssl_pyx

__all__ = ["DEFAULT_SIGNER_ID", "Sm2SigningKey", "Sm2VerifyingKey"]

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
