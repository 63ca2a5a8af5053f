"""Field-level authenticated encryption and keyed blind indexes.

A protected field is stored as text `e1:<key id>:<base64url(nonce || ciphertext || tag)>`. The key
id lets old rows stay readable after a rotation and lets the rotation find what is left to do.
The associated data binds a ciphertext to its place (table, column, row), so a value copied into
another row or column fails authentication instead of being read as someone else's data.

Exact-match lookups use a blind index: HMAC(index key, kind || NUL || normalised value), so the
database can compare and index without ever holding the value.
"""

from __future__ import annotations

import base64
import hmac as std_hmac
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.shared.protection.keyring import DataKey, DataKeyring, KeyringFile, UnknownKeyError

__all__ = [
    "BlindIndex",
    "FieldCipher",
    "TamperedCiphertextError",
    "aead_decrypt",
    "aead_encrypt",
    "field_key_id",
    "open_sealed",
    "seal",
]

_PREFIX = "e1"
_NONCE = 12
_TAG = 16


class TamperedCiphertextError(ValueError):
    """Authentication failed: the ciphertext, its key id or its context was altered. The value is
    never returned; callers report data corruption."""


def aead_encrypt(key: DataKey, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    if key.suite.name == "aes":
        return AESGCM(key.material).encrypt(nonce, plaintext, aad)
    encryptor = Cipher(algorithms.SM4(key.material), modes.GCM(nonce)).encryptor()
    encryptor.authenticate_additional_data(aad)
    return encryptor.update(plaintext) + encryptor.finalize() + encryptor.tag


def aead_decrypt(key: DataKey, nonce: bytes, sealed: bytes, aad: bytes) -> bytes:
    try:
        if key.suite.name == "aes":
            return AESGCM(key.material).decrypt(nonce, sealed, aad)
        if len(sealed) < _TAG:
            raise InvalidTag
        decryptor = Cipher(algorithms.SM4(key.material), modes.GCM(nonce, sealed[-_TAG:])).decryptor()
        decryptor.authenticate_additional_data(aad)
        return decryptor.update(sealed[:-_TAG]) + decryptor.finalize()
    except InvalidTag:
        raise TamperedCiphertextError("ciphertext failed authentication") from None


def seal(key: DataKey, plaintext: bytes, *, context: bytes) -> bytes:
    """Binary envelope: key id length, key id, nonce, ciphertext and tag."""
    key_id = key.id.encode()
    nonce = secrets.token_bytes(_NONCE)
    aad = key_id + b"|" + context
    return bytes([len(key_id)]) + key_id + nonce + aead_encrypt(key, nonce, plaintext, aad)


def open_sealed(keyring: DataKeyring, blob: bytes, *, context: bytes) -> bytes:
    """Open a `seal` envelope; raises TamperedCiphertextError on any alteration."""
    if not blob:
        raise TamperedCiphertextError("empty ciphertext")
    size = blob[0]
    key_id = blob[1 : 1 + size]
    nonce = blob[1 + size : 1 + size + _NONCE]
    if len(nonce) != _NONCE:
        raise TamperedCiphertextError("truncated ciphertext")
    key = keyring.key(key_id.decode(errors="replace"))
    return aead_decrypt(key, nonce, blob[1 + size + _NONCE :], key_id + b"|" + context)


class FieldCipher:
    """Encrypts and decrypts text fields under the keyring's active key.

    With a `source` (a KeyringFile) the cipher follows key rotations made while it runs.
    """

    def __init__(self, keyring: DataKeyring, *, source: KeyringFile | None = None) -> None:
        self._keyring = keyring
        self._source = source

    @property
    def keyring(self) -> DataKeyring:
        if self._source is not None:
            self._keyring = self._source.current()
        return self._keyring

    def encrypt(self, plaintext: str, *, context: str) -> str:
        key = self.keyring.active
        nonce = secrets.token_bytes(_NONCE)
        aad = f"{_PREFIX}:{key.id}|{context}".encode()
        body = nonce + aead_encrypt(key, nonce, plaintext.encode("utf-8"), aad)
        return f"{_PREFIX}:{key.id}:{base64.urlsafe_b64encode(body).rstrip(b'=').decode()}"

    def decrypt(self, token: str, *, context: str) -> str:
        try:
            prefix, key_id, body_text = token.split(":", 2)
            body = base64.urlsafe_b64decode(body_text + "=" * (-len(body_text) % 4))
        except ValueError:
            raise TamperedCiphertextError("not a protected field value") from None
        if prefix != _PREFIX or len(body) < _NONCE + _TAG:
            raise TamperedCiphertextError("not a protected field value")
        try:
            key = self.keyring.key(key_id)
        except UnknownKeyError:
            # Written under a key another process started using first: reload once, then give up.
            if self._source is None or not self._source.reload_if_changed():
                raise
            key = self.keyring.key(key_id)
        aad = f"{_PREFIX}:{key_id}|{context}".encode()
        return aead_decrypt(key, body[:_NONCE], body[_NONCE:], aad).decode("utf-8")

    def open_text(self, stored: str, *, context: str) -> str:
        """A stored free-text value: decrypted when protected, as it is when written in clear
        before the column was protected (empty stays empty)."""
        if not stored.startswith(f"{_PREFIX}:"):
            return stored
        return self.decrypt(stored, context=context)

    def needs_rotation(self, token: str) -> bool:
        return field_key_id(token) != self.keyring.active.id

    def active_prefix(self) -> str:
        """`LIKE` prefix of values already under the active key."""
        return f"{_PREFIX}:{self.keyring.active.id}:"


def field_key_id(token: str) -> str:
    """The key a stored field value is encrypted under (rotation progress, keys still in use)."""
    return token.split(":", 2)[1]


class BlindIndex:
    """Keyed, deterministic digests for equality search over encrypted fields.

    `kind` separates domains (a phone number and an MRN with the same digits must not collide).
    Callers normalise values first (e.g. national id upper-cased and upgraded to 18 digits) so equal
    values give equal digests. 128 bits are kept: collisions are negligible and indexes stay small.
    """

    def __init__(self, keyring: DataKeyring) -> None:
        key = keyring.index_key
        self._key = key.material
        self._hash = hashes.SM3() if key.suite.name == "sm" else hashes.SHA256()

    def digest(self, kind: str, value: str) -> str:
        mac = hmac.HMAC(self._key, self._hash)
        mac.update(kind.encode() + b"\x00" + value.encode("utf-8"))
        return mac.finalize()[:16].hex()

    def matches(self, kind: str, value: str, digest: str) -> bool:
        return std_hmac.compare_digest(self.digest(kind, value), digest)
