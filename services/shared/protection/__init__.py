"""Personal-data protection shared by every service: field encryption, blind indexes, content
envelopes, the masking policy and the national-algorithms option. No service writes its own crypto."""

from __future__ import annotations

from dataclasses import dataclass

from services.shared.config import Settings
from services.shared.protection.envelope import ContentKey, new_content_key, open_content_key
from services.shared.protection.fields import BlindIndex, FieldCipher, TamperedCiphertextError
from services.shared.protection.keyring import DataKeyring, KeyringError, KeyringFile, UnknownKeyError, load_or_create
from services.shared.protection.masking import MaskingPolicy, default_policy

__all__ = ["DataProtection", "TamperedCiphertextError"]


@dataclass
class DataProtection:
    """The protection a process applies: one per service runtime and one in the gateway."""

    source: KeyringFile
    fields: FieldCipher
    index: BlindIndex
    masking: MaskingPolicy

    @classmethod
    def from_settings(cls, settings: Settings) -> DataProtection:
        """Keys from HIE_DATA_KEYS / the data key file (created on first use in development;
        production must provision it, see `hie keys init`), the masking policy in force."""
        path = settings.data_keys_file
        if settings.environment == "production" and not path.exists():
            raise KeyringError("production needs a provisioned data key file (HIE_DATA_KEYS_FILE)")
        keyring = load_or_create(path, environ=settings.protection_environ(), suite=settings.crypto_suite)
        source = KeyringFile(path, keyring)
        return cls(
            source=source,
            fields=FieldCipher(keyring, source=source),
            index=BlindIndex(keyring),
            masking=default_policy(settings.protection_environ()),
        )

    @property
    def keyring(self) -> DataKeyring:
        return self.source.current()

    def new_content_key(self, document_id: str) -> ContentKey:
        """A fresh data key for one document, wrapped by the current key-encryption key."""
        keyring = self.keyring
        return new_content_key(keyring, document_id=document_id, suite=keyring.active.suite.name)

    def open_content_key(self, document_id: str, wrapped: bytes) -> ContentKey:
        keyring = self.keyring
        try:
            return open_content_key(keyring, document_id=document_id, wrapped=wrapped)
        except UnknownKeyError:
            # Wrapped by a process that picked up a rotation first.
            if not self.source.reload_if_changed():
                raise
            return open_content_key(self.keyring, document_id=document_id, wrapped=wrapped)
