"""PDQ search criteria (pure): a search as a record to compare candidates with, the parameters
every result must agree on, and FHIR string search on the name parts (prefix, exact, contains, on
characters or pinyin)."""

from __future__ import annotations

import dataclasses
import unicodedata

from hie.mpi.v1 import mpi_pb2
from services.mpi import domain, index, matching, records, tables
from services.mpi.chinese_names import NameForms, fold_latin, has_han, name_forms
from services.mpi.messages import GENDER_FROM_PROTO
from services.shared.errors import InvalidArgument


def without_name(query: matching.MatchRecord) -> matching.MatchRecord:
    """A query without a name compares no name (the placeholder is dropped)."""
    return dataclasses.replace(query, name=NameForms("", "", "", "", han=False))


@dataclasses.dataclass(frozen=True)
class Criteria:
    """What every PDQ result must agree on (the parameters given)."""

    has_name: bool
    birth_date: bool
    gender: bool
    national_id: bool
    identifier: bool
    phone: bool

    def require_enough(self) -> None:
        """The minimum a search across the region needs: an identifier the caller holds (the
        national id from the patient's card, another identifier), or a name with a birth date or
        a phone number. A birth date or a name alone would list strangers."""
        if self.national_id or self.identifier:
            return
        if self.has_name and (self.birth_date or self.phone):
            return
        raise InvalidArgument(
            "search with an identifier, or a name with a birth date or phone number", reason="search-too-broad"
        )


def search_query(request: mpi_pb2.SearchPatientsRequest) -> tuple[matching.MatchRecord, Criteria]:
    """A PDQ search as a record to compare candidates with, and the parameters that must agree."""
    identifiers = []
    national_id = ""
    if request.HasField("identifier"):
        ident = request.identifier
        if ident.type == domain.NATIONAL_ID_TYPE or ident.system == domain.NATIONAL_ID_SYSTEM:
            national_id = ident.value
        elif ident.system and ident.value:
            identifiers.append(domain.Identifier(system=ident.system, value=ident.value, type=ident.type))
        else:
            raise InvalidArgument("identifier needs a system and a value", reason="identifier-invalid")
    name = request.name or f"{request.family}{' ' if request.family and request.given else ''}{request.given}"
    if not (name or request.birth_date or national_id or identifiers or request.phone):
        raise InvalidArgument("give a name, birth date, identifier or phone", reason="search-too-broad")
    registration = domain.validate_registration(
        domain="",
        local_id="query",
        name_text=name or "-",
        family=request.family,
        given=request.given,
        gender=GENDER_FROM_PROTO.get(request.gender, domain.Gender.UNKNOWN),
        birth_date=request.birth_date,
        national_id=national_id,
        phones=[request.phone] if request.phone else [],
        identifiers=identifiers,
    )
    query = records.match_record_of_registration(registration, record_id="", enterprise_id="")
    if not name:
        query = without_name(query)
    criteria = Criteria(
        has_name=bool(name),
        birth_date=bool(request.birth_date),
        gender=request.gender in (mpi_pb2.GENDER_MALE, mpi_pb2.GENDER_FEMALE),
        national_id=bool(national_id),
        identifier=bool(identifiers),
        phone=bool(request.phone),
    )
    return query, criteria


# Name levels that are the same name written another way (characters / pinyin, a homophone, the
# parts the other way round). A PDQ search is a FHIR string search: a spelling merely similar
# (司徒 for 司马, a typo) is not the name sought; `$match` (MatchPatient) scores those.
SAME_NAME = frozenset({matching.EXACT, matching.HOMOPHONE, matching.PINYIN, matching.SWAPPED, matching.MISSING})


def names_agree(levels: dict[str, str]) -> bool:
    """The same name in another writing: each part exact, homophone, pinyin or swapped (or not
    given), not both missing."""
    if levels["family"] not in SAME_NAME or levels["given"] not in SAME_NAME:
        return False
    return not (levels["family"] == matching.MISSING and levels["given"] == matching.MISSING)


def folded(text: str) -> set[str]:
    """A value as a case- and accent-insensitive string search compares it: Han characters as
    they are (compatibility forms unified, spaces dropped); Latin letters folded as the index's
    pinyin is (lower-case ASCII, ü as v: lü -> lv) and plainly (accents dropped: Müller -> muller)."""
    text = unicodedata.normalize("NFKC", text)
    if has_han(text):
        return {"".join(text.split())} - {""}
    plain = unicodedata.normalize("NFKD", text.casefold())
    return {fold_latin(text), "".join(ch for ch in plain if ch.isalnum() and not unicodedata.combining(ch))} - {""}


@dataclasses.dataclass(frozen=True)
class NameFilter:
    """FHIR string search on family, given and name (`SearchPatientsRequest.*_match`).

    - prefix (no modifier): the part starts with the value, case- and accent-insensitive, on
      its characters or on its toneless pinyin (a Latin value: `zhang` / `zh` find 张三丰); the
      same name written another way (homophone 章 for 张, pinyin against characters, parts
      swapped) also matches, ranked by its weight below the exact spellings; a merely similar
      spelling (司徒 for 司马, a typo) does not;
    - exact: the part as registered, whole and case-sensitive;
    - contains: the value anywhere in the part, case- and accent-insensitive, on characters
      or pinyin.
    `name` is any part of the name: family, given, or the whole name (either order).
    """

    checks: tuple[tuple[str, str, int], ...]

    @classmethod
    def of(cls, search: mpi_pb2.SearchPatientsRequest) -> NameFilter:
        """The name checks of a search (one per name parameter given)."""
        return cls(
            tuple(
                (field, value.strip(), mode)
                for field, value, mode in (
                    ("family", search.family, search.family_match),
                    ("given", search.given, search.given_match),
                    ("name", search.name, search.name_match),
                )
                if value.strip()
            )
        )

    def accepts(self, ranked: index.Ranked, criteria: Criteria) -> bool:
        """Whether a candidate's name satisfies every name parameter of the search."""
        if not criteria.has_name:
            return True
        agree = names_agree(ranked.comparison.levels)
        if not self.checks:
            return agree
        record = ranked.record
        forms = name_forms(record.name_text, record.family, record.given)
        for field, value, mode in self.checks:
            if mode == mpi_pb2.NAME_MATCH_EXACT:
                if value not in registered_parts(record, field):
                    return False
                continue
            wanted = folded(value)
            parts = search_forms(forms, field) | {
                f for part in registered_parts(record, field) if not has_han(part) for f in folded(part)
            }
            if mode == mpi_pb2.NAME_MATCH_CONTAINS:
                if not any(w in p for w in wanted for p in parts):
                    return False
            elif not (agree or any(p.startswith(w) for w in wanted for p in parts)):
                return False
        return True


def registered_parts(record: tables.PatientRecord, field: str) -> set[str]:
    """A record's name parts as registered (`:exact` compares these whole)."""
    family, given = (record.family or "").strip(), (record.given or "").strip()
    if field == "family":
        return {family}
    if field == "given":
        return {given}
    parts = {family, given, (record.name_text or "").strip()}
    if family and given:
        parts |= {family + given, f"{given} {family}", f"{family} {given}"}
    return parts - {""}


def search_forms(forms: NameForms, field: str) -> set[str]:
    """The folded forms a case-insensitive search compares: the characters (or Latin letters)
    and the toneless pinyin of the part; for `name`, of each part and of the whole name in
    either order."""
    family = {forms.family, forms.family_pinyin}
    given = {forms.given, forms.given_pinyin}
    if field == "family":
        return family - {""}
    if field == "given":
        return given - {""}
    whole = {
        forms.family + forms.given,
        forms.family_pinyin + forms.given_pinyin,
        forms.given_pinyin + forms.family_pinyin,
    }
    return (family | given | whole) - {""}


def rank_key(ranked: index.Ranked) -> tuple[float, str, str]:
    """The ranking's order (index.rank): weight descending, then domain and local id."""
    return (-ranked.comparison.total, ranked.record.domain, ranked.record.local_id)


def satisfies(levels: dict[str, str], criteria: Criteria) -> bool:
    """PDQ: every parameter given must agree (the birth date exactly; the gender; the identifier;
    the phone). Names are `NameFilter`'s."""
    if criteria.birth_date and levels["birth_date"] != matching.EXACT:
        return False
    if criteria.gender and levels["gender"] == matching.DISAGREE:
        return False
    if criteria.national_id and levels["national_id"] != matching.AGREE:
        return False
    if criteria.identifier and levels["identifier"] != matching.AGREE:
        return False
    return not (criteria.phone and levels["phone"] != matching.AGREE)
