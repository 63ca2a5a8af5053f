"""Document submission rules (pure: no I/O)."""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import re
import uuid
from dataclasses import dataclass

from services.shared.errors import DataCorruption, FailedPrecondition, InvalidArgument, NotFound
from services.shared.text import clean_text as clean_text

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


# --- streamed content ---------------------------------------------------------------------

# The repository stores content in chunks of at most this size; retrieval streams them.
CHUNK_BYTES = 1024 * 1024


class ContentHasher:
    """SHA-256 and size of content that arrives in chunks, never held whole."""

    def __init__(self, *, limit: int = MAX_CONTENT_BYTES) -> None:
        self._hash = hashlib.sha256()
        self._limit = limit
        self.size = 0

    def update(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self._limit:
            raise InvalidArgument("document content exceeds 50 MB", reason="content-too-large")
        self._hash.update(chunk)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


def check_declaration(declared_sha256: str) -> str:
    """The declared hash, lower-cased; it must be given up front (before any chunk arrives)."""
    sha = declared_sha256.lower()
    if not _SHA256.fullmatch(sha):
        raise InvalidArgument("declared sha256 must be 64 hex digits", reason="hash-invalid")
    return sha


def check_received(hasher: ContentHasher, *, declared_sha256: str, declared_size: int) -> ContentDigest:
    """XDS: the repository computes hash and size and rejects a submission that disagrees."""
    if hasher.size == 0:
        raise InvalidArgument("document content is empty", reason="content-empty")
    if hasher.sha256 != declared_sha256:
        raise InvalidArgument("content does not match the declared sha256", reason="hash-mismatch")
    if declared_size and declared_size != hasher.size:
        raise InvalidArgument("content does not match the declared size", reason="size-mismatch")
    return ContentDigest(hasher.sha256, hasher.size)


def check_retrieved(hasher: ContentHasher, *, sha256: str, size: int) -> None:
    """On retrieve, after the last chunk was read and before it is sent."""
    if hasher.sha256 != sha256 or hasher.size != size:
        raise DataCorruption("stored document content failed its integrity check", reason="content-corrupt")


# --- imaging study references ------------------------------------------------------------------

# DICOM UIDs: dot-separated digit components, at most 64 characters (PS3.5 §9.1).
_DICOM_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


def check_imaging_study(study_instance_uid: str, wado_rs_url: str) -> tuple[str, str]:
    """A PACS study reference: a valid DICOM UID and an http(s) WADO-RS URL naming that study."""
    uid = study_instance_uid.strip()
    if len(uid) > 64 or not _DICOM_UID.fullmatch(uid):
        raise InvalidArgument("study instance uid is not a DICOM UID", reason="study-uid-invalid")
    url = wado_rs_url.strip()
    if (
        len(url) > 512
        or not url.startswith(("https://", "http://"))
        or any(ch.isspace() or ord(ch) < 0x20 for ch in url)
        or f"/studies/{uid}" not in url
    ):
        raise InvalidArgument(
            "wado-rs url must be an http(s) URL of the study (…/studies/<uid>)", reason="wado-url-invalid"
        )
    return uid, url


# --- relations and status (XDS document entry life cycle) ---------------------------------------

CURRENT, SUPERSEDED, ENTERED_IN_ERROR = 1, 2, 3
REPLACES, APPENDS, TRANSFORMS = 1, 2, 3


def check_relation(
    relation: int,
    *,
    target_status: int,
    target_source_organization_id: str,
    target_enterprise_id: str,
    organization_id: str,
    enterprise_id: str,
) -> None:
    """XDS: a replacement, addendum or transformation names an approved (current) entry of the same
    patient; here also of the same source organisation, the only one that may revise its documents."""
    if relation not in {REPLACES, APPENDS, TRANSFORMS}:
        raise InvalidArgument("relation type must be replaces, appends or transforms", reason="relation-invalid")
    if target_source_organization_id != organization_id:
        raise NotFound("no such document", reason="document-not-found")
    if target_status != CURRENT:
        raise FailedPrecondition("only a current document can be replaced or amended", reason="target-not-current")
    if target_enterprise_id != enterprise_id:
        raise InvalidArgument("the related document is of another patient", reason="relation-patient-mismatch")


def check_entered_in_error(*, status: int, source_organization_id: str, organization_id: str) -> None:
    if source_organization_id != organization_id:
        raise NotFound("no such document", reason="document-not-found")
    if status == ENTERED_IN_ERROR:
        raise FailedPrecondition("the document is already marked entered-in-error", reason="already-entered-in-error")


# --- query cursor --------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryCursor:
    """Where the next page starts: after the entry with this service time and id (keyset paging)."""

    service_time: datetime.datetime
    document_id: str

    def encode(self) -> str:
        raw = f"{self.service_time.astimezone(datetime.UTC).isoformat()}|{self.document_id}"
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> QueryCursor | None:
        if not token:
            return None
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
            when, _, document_id = raw.partition("|")
            moment = datetime.datetime.fromisoformat(when)
            if moment.tzinfo is None or len(document_id) != 36:
                raise ValueError(document_id)
            return cls(moment, str(uuid.UUID(document_id)))
        except (ValueError, UnicodeDecodeError, binascii.Error):
            raise InvalidArgument("bad page token", reason="page-token") from None
