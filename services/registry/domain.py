"""Document submission rules (pure: no I/O)."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass

from services.shared.errors import DataCorruption, InvalidArgument

MAX_CONTENT_BYTES = 50 * 1024 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SOURCE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-^]{0,127}$")
_TOKEN = r"[a-z0-9!#$&^_.+\-]+"  # noqa: S105 - an RFC 2045 token pattern
_MIME = re.compile(
    rf'^[a-z0-9][a-z0-9!#$&^_.+\-]*/[a-z0-9][a-z0-9!#$&^_.+\-]*(;[ \t]*{_TOKEN}=({_TOKEN}|"[^"\x00-\x1f\x7f]*"))*$'
)
# HL7 v3 Confidentiality codes.
CONFIDENTIALITY = frozenset({"U", "L", "M", "N", "R", "V"})


@dataclass(frozen=True)
class ContentDigest:
    sha256: str
    size: int


def digest(content: bytes) -> ContentDigest:
    return ContentDigest(hashlib.sha256(content).hexdigest(), len(content))


def check_declared(content: bytes, *, declared_sha256: str, declared_size: int) -> ContentDigest:
    """XDS: the repository computes hash and size and rejects a submission that disagrees."""
    if not content:
        raise InvalidArgument("document content is empty", reason="content-empty")
    if len(content) > MAX_CONTENT_BYTES:
        raise InvalidArgument("document content exceeds 50 MB", reason="content-too-large")
    actual = digest(content)
    sha = declared_sha256.lower()
    if not _SHA256.fullmatch(sha):
        raise InvalidArgument("declared sha256 must be 64 hex digits", reason="hash-invalid")
    if sha != actual.sha256:
        raise InvalidArgument("content does not match the declared sha256", reason="hash-mismatch")
    if declared_size and declared_size != actual.size:
        raise InvalidArgument("content does not match the declared size", reason="size-mismatch")
    return actual


def check_stored(content: bytes, *, sha256: str, size: int) -> None:
    """On retrieve: content that no longer matches its registered hash is never served."""
    actual = digest(content)
    if actual.sha256 != sha256 or actual.size != size:
        raise DataCorruption("stored document content failed its integrity check", reason="content-corrupt")


def clean_text(value: str, *, what: str, limit: int, required: bool = False) -> str:
    text = unicodedata.normalize("NFC", value).strip()
    if required and not text:
        raise InvalidArgument(f"{what} is required", reason=f"{what}-missing")
    if len(text) > limit:
        raise InvalidArgument(f"{what} is longer than {limit} characters", reason=f"{what}-too-long")
    if any(unicodedata.category(ch) in {"Cc", "Cf", "Cs", "Co"} for ch in text):
        raise InvalidArgument(f"{what} contains control characters", reason=f"{what}-invalid")
    return text


def check_source_document_id(value: str) -> str:
    if not _SOURCE_ID.fullmatch(value or ""):
        raise InvalidArgument(
            "source document id must be 1-128 letters, digits or . _ : - ^",
            reason="source-document-id-invalid",
        )
    return value


def check_mime_type(value: str) -> str:
    mime = value.strip().lower()
    if not _MIME.fullmatch(mime) or len(mime) > 100:
        raise InvalidArgument("mime type is not valid", reason="mime-type-invalid")
    return mime


def check_confidentiality(value: str) -> str:
    code = value or "N"
    if code not in CONFIDENTIALITY:
        raise InvalidArgument("confidentiality must be an HL7 v3 Confidentiality code", reason="confidentiality")
    return code
