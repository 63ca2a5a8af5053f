"""Patient registration rules and the link decision (pure: no I/O)."""

from __future__ import annotations

import datetime
import re
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NewType

from services.shared import gb11643
from services.shared.errors import InvalidArgument
from services.shared.text import clean_text

EnterpriseId = NewType("EnterpriseId", str)

# HL7 v2 table 0203 identifier type for a national person identifier: "NN" + ISO 3166 alpha-3.
NATIONAL_ID_TYPE = "NNCHN"
# The exchange's name for the resident identity card number's assigning authority.
NATIONAL_ID_SYSTEM = "urn:hie:identifier:cn-resident-id"
_LOCAL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,63}$")
_PHONE = re.compile(r"^\+?[0-9][0-9 \-]{5,19}$")
_MAX_NAME = 64


class Gender(StrEnum):
    MALE = "male"
    FEMALE = "female"
    OTHER = "other"
    UNKNOWN = "unknown"


class LinkMethod(StrEnum):
    NEW = "new"
    NATIONAL_ID = "national-id"
    PROBABILISTIC = "probabilistic"
    STEWARD = "steward"
    MERGE = "merge"


def new_enterprise_id() -> EnterpriseId:
    return EnterpriseId(str(uuid.uuid4()))


@dataclass(frozen=True)
class Identifier:
    system: str
    value: str
    type: str = ""


@dataclass(frozen=True)
class Registration:
    """A validated patient record of one hospital domain."""

    domain: str
    local_id: str
    name_text: str
    family: str = ""
    given: str = ""
    gender: Gender = Gender.UNKNOWN
    birth_date: datetime.date | None = None
    national_id: str | None = None
    phones: tuple[str, ...] = ()
    province: str = ""
    city: str = ""
    district: str = ""
    address_line: str = ""
    postal_code: str = ""
    identifiers: tuple[Identifier, ...] = field(default_factory=tuple)


def validate_local_id(local_id: str) -> str:
    if not _LOCAL_ID.fullmatch(local_id or ""):
        raise InvalidArgument(
            "local id must be 1-64 letters, digits or . _ : - and start with a letter or digit",
            reason="local-id-invalid",
        )
    return local_id


def parse_birth_date(value: str, *, today: datetime.date | None = None) -> datetime.date | None:
    if not value:
        return None
    try:
        born = datetime.date.fromisoformat(value)
    except ValueError:
        raise InvalidArgument("birth date must be YYYY-MM-DD", reason="birth-date-invalid") from None
    if born > (today or datetime.date.today()) or born.year < 1880:
        raise InvalidArgument("birth date is out of range", reason="birth-date-invalid")
    return born


def normalize_phone(value: str) -> str:
    text = value.strip()
    if not _PHONE.fullmatch(text):
        raise InvalidArgument("phone number has an invalid format", reason="phone-invalid")
    digits = re.sub(r"[ \-]", "", text)
    # A mainland number written with the country code is the same number.
    digits = digits.removeprefix("+86") if digits.startswith("+86") else digits
    if not 6 <= len(digits.lstrip("+")) <= 15:
        raise InvalidArgument("phone number has an invalid format", reason="phone-invalid")
    return digits


def validate_registration(
    *,
    domain: str,
    local_id: str,
    name_text: str,
    family: str = "",
    given: str = "",
    gender: Gender = Gender.UNKNOWN,
    birth_date: str = "",
    national_id: str = "",
    phones: list[str] | tuple[str, ...] = (),
    province: str = "",
    city: str = "",
    district: str = "",
    address_line: str = "",
    postal_code: str = "",
    identifiers: list[Identifier] | tuple[Identifier, ...] = (),
    today: datetime.date | None = None,
) -> Registration:
    """Check and normalise a registration; InvalidArgument names the field, never its value."""
    validate_local_id(local_id)
    name = clean_text(name_text or f"{family}{given}", what="name", limit=_MAX_NAME)
    if not name:
        raise InvalidArgument("a patient name is required", reason="name-missing")
    born = parse_birth_date(birth_date, today=today)
    normalized_id: str | None = None
    other_identifiers: list[Identifier] = []
    raw_ids = [national_id] if national_id else []
    for ident in identifiers:
        if ident.type == NATIONAL_ID_TYPE or ident.system == NATIONAL_ID_SYSTEM:
            raw_ids.append(ident.value)
        else:
            if not ident.system or not ident.value or len(ident.value) > 128 or len(ident.system) > 256:
                raise InvalidArgument("identifier needs a system and a value", reason="identifier-invalid")
            other_identifiers.append(ident)
    for raw in raw_ids:
        try:
            value = gb11643.normalize(raw, today=today)
        except gb11643.InvalidNationalId as exc:
            raise InvalidArgument(str(exc), reason=f"national-id-{exc.reason}") from None
        if normalized_id is not None and normalized_id != value:
            raise InvalidArgument("two different national ids given", reason="national-id-conflict")
        normalized_id = value
    if len(phones) > 5:
        raise InvalidArgument("at most 5 phone numbers", reason="phone-invalid")
    return Registration(
        domain=domain,
        local_id=local_id,
        name_text=name,
        family=clean_text(family, what="family", limit=_MAX_NAME),
        given=clean_text(given, what="given", limit=_MAX_NAME),
        gender=gender,
        birth_date=born,
        national_id=normalized_id,
        phones=tuple(dict.fromkeys(normalize_phone(p) for p in phones)),
        province=clean_text(province, what="province", limit=32),
        city=clean_text(city, what="city", limit=32),
        district=clean_text(district, what="district", limit=32),
        address_line=clean_text(address_line, what="address", limit=200),
        postal_code=clean_text(postal_code, what="postcode", limit=12),
        identifiers=tuple(other_identifiers),
    )


# A claim on a review task holds this long unless configured (HIE_MPI_REVIEW_CLAIM_SECONDS); at
# most thirty days (a longer lease is the blocked-for-good claim again).
DEFAULT_CLAIM_SECONDS = 30 * 60
MAX_CLAIM_SECONDS = 30 * 24 * 3600


@dataclass(frozen=True)
class ClaimLease:
    """A steward's claim on a review task is a lease from the moment it was made: once it lapses
    the task is free again (another steward may take it, anyone may decide it), so a steward who
    walked away does not block it for good. Claiming a task one holds renews the lease. Expiry is
    computed from the stored claim time, so a changed setting applies to every claim at once."""

    seconds: int = DEFAULT_CLAIM_SECONDS

    def expires(self, claimed_at: datetime.datetime) -> datetime.datetime:
        return claimed_at + datetime.timedelta(seconds=self.seconds)

    def live(self, claimed_at: datetime.datetime, now: datetime.datetime) -> bool:
        return now < self.expires(claimed_at)

    def lapsed_before(self, now: datetime.datetime) -> datetime.datetime:
        """Claims made at or before this instant have lapsed."""
        return now - datetime.timedelta(seconds=self.seconds)


def claim_lease(setting: str | None) -> ClaimLease:
    """The lease from its setting (whole seconds, 1 to 30 days); unset: 30 minutes."""
    if setting is None or not setting.strip():
        return ClaimLease()
    text = setting.strip()
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= MAX_CLAIM_SECONDS:
        raise ValueError(f"the review claim lease must be whole seconds from 1 to {MAX_CLAIM_SECONDS}")
    return ClaimLease(int(text))


@dataclass(frozen=True)
class Candidate:
    """An existing record that shares a blocking key with a new registration."""

    enterprise_id: EnterpriseId
    national_id: str | None
    birth_date: datetime.date | None
    gender: Gender
    name_text: str = ""


@dataclass(frozen=True)
class LinkDecision:
    method: LinkMethod
    enterprise_id: EnterpriseId


def _agrees_with_id(national_id: str, birth_date: datetime.date | None, gender: Gender) -> bool:
    """A record's declared birth date and gender (when known) agree with those the id encodes."""
    if birth_date is not None and birth_date != gb11643.birth_date(national_id):
        return False
    return gender not in {Gender.MALE, Gender.FEMALE} or gender.value == gb11643.gender(national_id)


def national_id_agrees(registration: Registration) -> bool:
    """The birth date and gender coded in the national id agree with the declared ones."""
    if registration.national_id is None:
        return False
    return _agrees_with_id(registration.national_id, registration.birth_date, registration.gender)


def _same_name(a: str, b: str) -> bool:
    return "".join(a.split()).casefold() == "".join(b.split()).casefold()


def decide_link(registration: Registration, candidates: list[Candidate]) -> LinkDecision:
    """Deterministic rule: an equal, valid national id links two records when the birth date and
    gender coded in it agree with both records and the names are the same (ignoring spaces and
    case); anything less starts a new enterprise id. Candidates are taken oldest first.

    Never linking two different people outweighs missing a link: a doubtful pair is left
    apart (probabilistic matching and steward review refine this).
    """
    if registration.national_id and national_id_agrees(registration):
        for candidate in candidates:
            if (
                candidate.national_id == registration.national_id
                and _agrees_with_id(registration.national_id, candidate.birth_date, candidate.gender)
                and _same_name(candidate.name_text, registration.name_text)
            ):
                return LinkDecision(LinkMethod.NATIONAL_ID, candidate.enterprise_id)
    return LinkDecision(LinkMethod.NEW, new_enterprise_id())
