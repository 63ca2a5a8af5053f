"""Envelope encryption of document content, chunk by chunk, so 50 MB never sits whole in memory.

Each document gets its own data key, wrapped by the key-encryption service (the local keyring or an
external KMS); only the wrapped key is stored. Every chunk is sealed with a fresh nonce and
associated data naming the document, the chunk's position and whether it is the last one, so
chunks cannot be reordered, swapped between documents or cut off at the end without detection.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from services.shared.protection.fields import TamperedCiphertextError, aead_decrypt, aead_encrypt
from services.shared.protection.keyring import SUITES, DataKey, KeyEncryptionService

__all__ = ["ContentKey", "new_content_key", "open_content_key", "rewrap"]

_NONCE = 12


@dataclass(frozen=True)
class ContentKey:
    """A document's data key, in clear (memory only) and wrapped (what is stored)."""

    document_id: str
    key: DataKey
    wrapped: bytes

    def seal_chunk(self, index: int, data: bytes, *, final: bool) -> bytes:
        nonce = secrets.token_bytes(_NONCE)
        return nonce + aead_encrypt(self.key, nonce, data, self._aad(index, final))

    def open_chunk(self, index: int, blob: bytes, *, final: bool) -> bytes:
        if len(blob) < _NONCE:
            raise TamperedCiphertextError("truncated chunk")
        return aead_decrypt(self.key, blob[:_NONCE], blob[_NONCE:], self._aad(index, final))

    def _aad(self, index: int, final: bool) -> bytes:
        return f"content|{self.document_id}|{index}|{int(final)}".encode()


def new_content_key(kek: KeyEncryptionService, *, document_id: str, suite: str) -> ContentKey:
    """A fresh data key for one document, wrapped under the current key-encryption key."""
    chosen = SUITES[suite]
    material = secrets.token_bytes(chosen.key_bytes)
    wrapped = chosen.name.encode() + b"|" + kek.wrap(material, context=document_id.encode())
    return ContentKey(document_id, DataKey(id="content", suite=chosen, material=material, created=""), wrapped)


def open_content_key(kek: KeyEncryptionService, *, document_id: str, wrapped: bytes) -> ContentKey:
    """Unwrap a stored document key; a wrapped key moved to another document fails authentication."""
    suite_name, _, blob = wrapped.partition(b"|")
    suite = SUITES.get(suite_name.decode(errors="replace"))
    if suite is None:
        raise TamperedCiphertextError("unknown content key suite")
    material = kek.unwrap(blob, context=document_id.encode())
    return ContentKey(document_id, DataKey(id="content", suite=suite, material=material, created=""), wrapped)


def rewrap(kek: KeyEncryptionService, *, document_id: str, wrapped: bytes) -> bytes:
    """Re-wrap a document key under the current key-encryption key (key rotation touches only
    these few bytes per document, never the content)."""
    key = open_content_key(kek, document_id=document_id, wrapped=wrapped)
    return key.key.suite.name.encode() + b"|" + kek.wrap(key.key.material, context=document_id.encode())
