"""Data-protection keys: versioned data keys for field encryption and key wrapping, and the
blind-index key, under one of two cipher suites (international or the national SM algorithms).

The embedded default keeps the keys in a JSON key file (mode 0600) or in HIE_DATA_KEYS; a
production deployment plugs an external KMS in through `KeyEncryptionService`, which only ever
sees data keys to wrap or unwrap, never patient data.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "SUITES",
    "CipherSuite",
    "DataKey",
    "DataKeyring",
    "KeyEncryptionService",
    "KeyringError",
    "KeyringFile",
    "UnknownKeyError",
    "load_or_create",
    "write_secret_file",
]


class KeyringError(RuntimeError):
    """The key file is missing, malformed or unsafe."""


class UnknownKeyError(KeyringError):
    """A ciphertext names a key id this process does not hold (retired too early, or foreign data)."""


@dataclass(frozen=True)
class CipherSuite:
    """An authenticated cipher plus the MAC used for blind indexes, chosen together.

    `aes` is AES-256-GCM with HMAC-SHA-256; `sm` is SM4-GCM (GB/T 32907, 128-bit key, the mode of
    GB/T 36624 / RFC 8998) with HMAC-SM3 (GB/T 32905), for deployments assessed under 密评.
    """

    name: str
    cipher: str
    key_bytes: int
    mac_hash: str


SUITES: dict[str, CipherSuite] = {
    "aes": CipherSuite(name="aes", cipher="AES-256-GCM", key_bytes=32, mac_hash="SHA256"),
    "sm": CipherSuite(name="sm", cipher="SM4-GCM", key_bytes=16, mac_hash="SM3"),
}


@dataclass(frozen=True)
class DataKey:
    """One version of a key. The id travels with every ciphertext so old data stays readable."""

    id: str
    suite: CipherSuite
    material: bytes
    created: str

    def __repr__(self) -> str:  # never print key material
        return f"DataKey(id={self.id!r}, suite={self.suite.name!r})"


class KeyEncryptionService(Protocol):
    """An external KMS (or HSM) that wraps per-document data keys under its own key-encryption key.

    `wrap` returns an opaque blob naming its own key version; `unwrap` must accept every blob it
    ever returned until the operator retires that version. The local implementation is
    `DataKeyring` itself.
    """

    def wrap(self, data_key: bytes, *, context: bytes) -> bytes: ...

    def unwrap(self, wrapped: bytes, *, context: bytes) -> bytes: ...


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)


class DataKeyring:
    """The keys of one exchange: an active data key, older ones still able to decrypt, and the
    blind-index key. Immutable; `rotated()` returns a new keyring."""

    def __init__(self, *, keys: list[DataKey], active: str, index_key: DataKey) -> None:
        by_id = {k.id: k for k in keys}
        if active not in by_id:
            raise KeyringError("the active data key is not in the keyring")
        self._keys = by_id
        self.active = by_id[active]
        self.index_key = index_key

    @classmethod
    def generate(cls, suite: str = "aes") -> DataKeyring:
        """A new keyring with one data key and one index key under the given suite."""
        chosen = SUITES[suite]
        data_key = _new_key(chosen, prefix="dk")
        return cls(keys=[data_key], active=data_key.id, index_key=_new_key(chosen, prefix="ix", size=32))

    def key(self, key_id: str) -> DataKey:
        try:
            return self._keys[key_id]
        except KeyError:
            raise UnknownKeyError("no data key with that id") from None

    @property
    def key_ids(self) -> list[str]:
        return list(self._keys)

    def rotated(self, suite: str | None = None) -> DataKeyring:
        """A keyring whose active key is new (optionally under another suite); old keys stay for
        decryption until every record has been re-encrypted. The index key is kept: blind
        indexes must stay comparable across the rotation."""
        chosen = SUITES[suite] if suite else self.active.suite
        new = _new_key(chosen, prefix="dk")
        return DataKeyring(keys=[*self._keys.values(), new], active=new.id, index_key=self.index_key)

    def without(self, key_ids: set[str]) -> DataKeyring:
        """Drop retired keys once nothing is encrypted under them any more."""
        if self.active.id in key_ids:
            raise KeyringError("cannot retire the active data key")
        kept = [k for k in self._keys.values() if k.id not in key_ids]
        return DataKeyring(keys=kept, active=self.active.id, index_key=self.index_key)

    # -- KeyEncryptionService, local flavour: the active data key is the key-encryption key.
    def wrap(self, data_key: bytes, *, context: bytes) -> bytes:
        from services.shared.protection.fields import seal

        return seal(self.active, data_key, context=b"wrap|" + context)

    def unwrap(self, wrapped: bytes, *, context: bytes) -> bytes:
        from services.shared.protection.fields import open_sealed

        return open_sealed(self, wrapped, context=b"wrap|" + context)

    # -- persistence
    def to_json(self) -> dict[str, Any]:
        def entry(k: DataKey) -> dict[str, str]:
            return {"id": k.id, "suite": k.suite.name, "material": _b64(k.material), "created": k.created}

        return {
            "format": "hie-data-keys/1",
            "active": self.active.id,
            "keys": [entry(k) for k in self._keys.values()],
            "index_key": entry(self.index_key),
        }

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> DataKeyring:
        try:
            if document.get("format") != "hie-data-keys/1":
                raise KeyringError("unknown key file format")

            def key(entry: dict[str, str]) -> DataKey:
                suite = SUITES[entry["suite"]]
                material = _unb64(entry["material"])
                if len(material) not in {suite.key_bytes, 32}:
                    raise KeyringError("a key has the wrong length for its suite")
                return DataKey(id=entry["id"], suite=suite, material=material, created=entry.get("created", ""))

            return cls(
                keys=[key(e) for e in document["keys"]], active=document["active"], index_key=key(document["index_key"])
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise KeyringError("malformed key file") from exc

    @classmethod
    def load(cls, path: Path) -> DataKeyring:
        """Read a key file, refusing one that others can read or the group can change (group read
        is allowed: Kubernetes mounts Secrets group-readable for the pod's fsGroup)."""
        if os.name == "posix" and path.stat().st_mode & 0o027:
            raise KeyringError("the data key file must not be readable by others nor group-writable (chmod 600)")
        return cls.from_json(json.loads(path.read_text()))

    def save(self, path: Path, *, exclusive: bool = False) -> None:
        """Write atomically with mode 0600, so a crash never leaves a half-written key file.

        `exclusive` refuses to replace an existing file (FileExistsError): several processes
        starting at once must not each create their own keys.
        """
        write_secret_file(path, json.dumps(self.to_json(), indent=2).encode(), exclusive=exclusive)


def write_secret_file(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Write a secret atomically with mode 0600. `exclusive` raises FileExistsError instead of
    replacing an existing file, so processes starting together create it exactly once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _new_key(suite: CipherSuite, *, prefix: str, size: int | None = None) -> DataKey:
    created = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    return DataKey(
        id=f"{prefix}-{suite.name}-{created}-{secrets.token_hex(2)}",
        suite=suite,
        material=secrets.token_bytes(size or suite.key_bytes),
        created=created,
    )


class KeyringFile:
    """A key file that running processes follow: after `hie keys rotate-data` rewrites it, every
    process picks the new active key up within `check_seconds`, and at once when it meets a
    ciphertext under a key it does not know yet (written by a process that reloaded first)."""

    def __init__(self, path: Path, keyring: DataKeyring, *, check_seconds: float = 1.0) -> None:
        self.path = path
        self._keyring = keyring
        self._check_seconds = check_seconds
        self._checked = time.monotonic()
        self._mtime = path.stat().st_mtime_ns if path.exists() else 0

    def current(self) -> DataKeyring:
        now = time.monotonic()
        if now - self._checked >= self._check_seconds:
            self._checked = now
            self.reload_if_changed()
        return self._keyring

    def reload_if_changed(self) -> bool:
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return False
        if mtime == self._mtime:
            return False
        self._keyring, self._mtime = DataKeyring.load(self.path), mtime
        return True


def load_or_create(path: Path, *, environ: dict[str, str] | None = None, suite: str = "aes") -> DataKeyring:
    """The keyring of this deployment: HIE_DATA_KEYS (a JSON key document) when set, otherwise the
    key file, created on first use (the embedded default needs nothing configured)."""
    # The settings hand the variables over (Settings.protection_environ): no environment read here.
    env = environ or {}
    inline = env.get("HIE_DATA_KEYS")
    if inline:
        return DataKeyring.from_json(json.loads(inline))
    if path.exists():
        return DataKeyring.load(path)
    keyring = DataKeyring.generate(env.get("HIE_CRYPTO_SUITE", suite))
    try:
        keyring.save(path, exclusive=True)
    except FileExistsError:
        return DataKeyring.load(path)  # another process created it first: use theirs
    return keyring
