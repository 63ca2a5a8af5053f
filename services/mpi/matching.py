"""Record matching: comparison levels per field, Fellegi–Sunter weights, value frequencies,
EM estimation of m / u, and the link decision (pure: no I/O).

A pair of records is compared field by field; each field lands on one comparison level
(e.g. names: exact characters, same pinyin, pinyin against characters, swapped, similar,
different). Each level weighs log2(m/u) bits, m = P(level | same person) and u = P(level |
different people); a missing value weighs nothing. Agreeing on a name weighs more when the
name is rare: the weight is adjusted by log2(u_exact / share of the value) (Winkler's
frequency-based weights), 王 and 李 counting less than a rare surname. The summed weight is
compared with two thresholds: at or above the link threshold an automatic link, between the two
a review task, below a new person.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from rapidfuzz.distance import DamerauLevenshtein, JaroWinkler

from services.mpi.chinese_names import NameForms, name_forms, pinyin_of
from services.shared import gb11643

DEFAULT_PARAMETERS_FILE = Path(__file__).with_name("match_parameters.json")

# Comparison levels (the names used in the parameters file and in review tasks).
EXACT = "exact"
HOMOPHONE = "homophone"
PINYIN = "pinyin"
SWAPPED = "swapped"
SIMILAR = "similar"
# Latin spellings further apart than a typo but closer than two different names (Jaro–Winkler
# ≥ 0.8 or two edits: "stanfield" / "stanfoeld", "mikaela" / "mikazea").
APPROXIMATE = "approximate"
# One edit apart (a letter wrong, missing, extra, or two adjacent letters transposed) of Latin
# spellings of four letters or more: a typo, stronger evidence than Jaro–Winkler's "similar".
TYPO = "typo"
# A Latin given name and a nickname of it, or two nicknames of one name ("william" / "bill",
# "bill" / "will"): the maintained list of the `nicknames` package.
NICKNAME = "nickname"
# One part of a name in the other part's column, the other part replaced or missing ("james
# reece" / "reece aleisha"): the family level is crossed, the given name no evidence.
CROSSED = "crossed"
DIFFERENT = "different"
ONE_DIGIT = "one_digit"
DAY_MONTH_SWAPPED = "day_month_swapped"
YEAR_ONLY = "year_only"
AGREE = "agree"
DISAGREE = "disagree"
SAME = "same"
PARTIAL = "partial"
MISSING = "missing"

FIELDS = (
    "family",
    "given",
    "birth_date",
    "gender",
    "national_id",
    "phone",
    "address",
    "street_number",
    "postcode",
    "identifier",
    "locality",
)
# Jaro–Winkler similarity of pinyin / Latin spellings at or above which names are "similar" (typos).
SIMILAR_NAME = 0.9
APPROXIMATE_NAME = 0.8
_NAME_AGREEMENT = frozenset({EXACT, HOMOPHONE, PINYIN})
_BIRTH_DATE_DISAGREEMENT = frozenset({DIFFERENT, "year_only"})
_ADDRESS_NOISE = re.compile(r"[\s,，.。、#()（）\-—_/]+")
_ADDRESS_WORDS = ("自治区", "自治州", "特别行政区", "省", "市", "区", "县", "号院", "号楼", "单元")


@dataclass(frozen=True)
class MatchRecord:
    """The comparable form of one patient record."""

    record_id: str
    domain: str
    enterprise_id: str
    name: NameForms
    gender: str = "unknown"
    birth_date: datetime.date | None = None
    national_id: str | None = None
    phones: frozenset[str] = frozenset()
    address: frozenset[str] = frozenset()
    postcode: str = ""
    identifiers: frozenset[tuple[str, str]] = frozenset()
    # The first number of the street address (a house number: its own evidence and a blocking key).
    street_number: str = ""
    # The locality (district / suburb), folded: evidence of its own, and blocking with the name
    # and with the street's words.
    locality: str = ""
    # The first words of a Latin street address (four letters of each, street types left out):
    # blocking by street and locality or postcode, which neither a name nor a date typo changes.
    street_words: tuple[str, ...] = ()


_NUMBER = re.compile(r"\d+")


def street_number(address_line: str) -> str:
    """The first number in an address line (full-width digits folded), "" when there is none."""
    found = _NUMBER.search(unicodedata.normalize("NFKC", address_line))
    return found.group()[:8] if found else ""


# Street types and other words many streets share (of four letters or more: shorter words are
# not street words anyway): no help in telling streets apart.
_STREET_TYPES = frozenset(
    {
        "street",
        "road",
        "avenue",
        "drive",
        "place",
        "crescent",
        "cres",
        "close",
        "court",
        "circuit",
        "lane",
        "parade",
        "terrace",
        "highway",
        "boulevard",
        "grove",
        "square",
        "circle",
        "village",
        "house",
        "unit",
        "flat",
        "apartment",
        "north",
        "south",
        "east",
        "west",
        "upper",
        "lower",
    }
)
_LATIN_WORD = re.compile(r"[a-z]{4,}")


def street_words(address_line: str) -> tuple[str, ...]:
    """The first three words of a Latin street address that are no street type, four letters
    of each ("7 cope place strawberry fields" → cope, stra, fiel); () for a Han address."""
    text = unicodedata.normalize("NFKD", address_line).casefold()
    text = "".join(c for c in text if not unicodedata.combining(c))
    words = [w for w in _LATIN_WORD.findall(text) if w not in _STREET_TYPES]
    return tuple(dict.fromkeys(w[:4] for w in words))[:3]


def _locality(district: str) -> str:
    text = unicodedata.normalize("NFKC", district).casefold()
    return _ADDRESS_NOISE.sub("", text)[:24]


def address_tokens(*parts: str) -> frozenset[str]:
    """Character bigrams of an address with punctuation, spacing and administrative suffixes
    removed, so a reformatted address (北京市西城区… / 西城区…号院) still shares most tokens."""
    text = unicodedata.normalize("NFKC", "".join(parts)).casefold()
    text = _ADDRESS_NOISE.sub("", text)
    for word in _ADDRESS_WORDS:
        text = text.replace(word, "")
    if len(text) < 2:
        return frozenset({text}) if text else frozenset()
    return frozenset(text[i : i + 2] for i in range(len(text) - 1))


def match_record(
    *,
    record_id: str,
    domain: str,
    enterprise_id: str,
    name_text: str,
    family: str = "",
    given: str = "",
    gender: str = "unknown",
    birth_date: datetime.date | None = None,
    national_id: str | None = None,
    phones: Iterable[str] = (),
    province: str = "",
    city: str = "",
    district: str = "",
    address_line: str = "",
    postal_code: str = "",
    identifiers: Iterable[tuple[str, str]] = (),
) -> MatchRecord:
    """Build the comparable form of a record from its stored or registered fields."""
    return MatchRecord(
        record_id=record_id,
        domain=domain,
        enterprise_id=enterprise_id,
        name=name_forms(name_text, family, given),
        gender=gender,
        birth_date=birth_date,
        national_id=national_id or None,
        phones=frozenset(phones),
        address=address_tokens(province, city, district, address_line),
        postcode=postal_code.strip(),
        identifiers=frozenset(identifiers),
        street_number=street_number(address_line),
        locality=_locality(district),
        street_words=street_words(address_line),
    )


# --- blocking ---------------------------------------------------------------------------------


def _match_keys(record: MatchRecord) -> set[str]:
    return set(_match_keys_of(record))


@functools.lru_cache(maxsize=4_096)
def _match_keys_of(record: MatchRecord) -> frozenset[str]:
    # Cached: a bulk batch asks for each new record's keys four times (locks, the batch's
    # lookup, its candidates, the rows it files); with the collector quiet this was a fifth of
    # a load's time. A record is immutable, so its keys are too; callers get a copy.
    keys: set[str] = set()
    if record.national_id:
        keys.add(f"n:{record.national_id}")
    keys.update(f"p:{_phone_key(p)}" for p in record.phones)
    if record.name.full_pinyin:
        year = record.birth_date.year if record.birth_date else ""
        keys.add(f"y:{_sorted_name(record)}:{year}")
        if record.birth_date is not None:
            # Name with month and day: finds a birth year mistyped by a digit (1980 / 1989), which
            # changes both the name + year and the birth date keys.
            keys.add(f"m:{_sorted_name(record)}:{record.birth_date:%m-%d}")
    keys |= _birth_date_and_family_keys(record)
    keys |= _typo_tolerant_keys(record)
    keys.update(f"i:{system}|{value}"[:120] for system, value in record.identifiers)
    return frozenset(keys)


def _birth_date_and_family_keys(record: MatchRecord) -> set[str]:
    # The birth date finds a person whose given name was mistyped or read differently (the name
    # + year key differs then); alone (with gender) its block holds 1 / 73,000 of the population
    # and grows with the index: ~15 records at 1M, ~300 in a region of 20M, read by every
    # registration. With the family name's pinyin it stays a few records (王 / 李 / 张 are ~7 %
    # each); homophone family names (张 / 章) share it. A romanised name's order is not known
    # ("Wei Zhang"), so it files under both parts.
    if record.birth_date is None or not record.name.full_pinyin:
        return set()
    name = record.name
    parts = {name.family_pinyin} if name.han else {name.family_pinyin, name.given_pinyin}
    return {f"d:{record.birth_date.isoformat()}:{part[:20]}" for part in parts if part}


def _typo_tolerant_keys(record: MatchRecord) -> set[str]:
    # Keys that survive a typo in a name part together with a typo in the birth date (the name +
    # year, name + month-day and birth date + family keys all change then), and name order:
    # the birth date with the initial of each name part (a Latin name files under both, its order
    # is not known), and the postcode with the first three letters of each Latin name part (a Han
    # name: with the whole name, as a postcode's 王s are many). Each stays a few records per key
    # (a birth date's people starting with one letter; a postcode's people sharing three letters).
    name = record.name
    parts = [p for p in (name.family_pinyin, name.given_pinyin) if p]
    if name.han:
        parts = parts[:1]
    keys: set[str] = set()
    postcode = record.postcode[:12]
    if record.birth_date is not None:
        born = record.birth_date
        dates = {born.isoformat()}
        if born.day <= 12 and born.day != born.month:
            # Day and month swapped (01/06 read as 6 January or 1 June): filed under both readings.
            dates.add(datetime.date(born.year, born.day, born.month).isoformat())
        keys.update(f"di:{date}:{part[0]}" for date in dates for part in parts)
        if postcode:
            # Birth date and postcode: both name parts replaced or missing.
            keys.add(f"bp:{record.birth_date.isoformat()}:{postcode}")
    for place in (record.locality, postcode):
        # The street with the locality or the postcode: a person whose name parts and birth
        # date are mistyped or missing together (a block is a street's residents, which does not
        # grow with the region).
        if place:
            keys.update(f"sw:{place}:{word}" for word in record.street_words)
    for place, prefix in ((postcode, "p"), (record.street_number, "s"), (record.locality, "l")):
        # Postcode, house number (a postcode mistyped), or locality (a postcode mistyped or its
        # digits transposed, and the street too) with the name. The locality's block is its
        # residents sharing three letters of a name part: a suburb or town does not grow with
        # the region.
        if not place or not parts:
            continue
        if name.han:
            keys.add(f"{prefix}n:{place}:{_sorted_name(record)}")
        else:
            keys.update(f"{prefix}p:{place}:{part[:3]}" for part in parts)
    return keys


def _sorted_name(record: MatchRecord) -> str:
    # Parts sorted, so a swapped name ("Wei Zhang") files under the same key as 张伟.
    return "".join(sorted([record.name.family_pinyin, record.name.given_pinyin]))[:40]


def name_keys(record: MatchRecord) -> set[str]:
    """The name-only key (demographic search by name without a birth date; matching of a
    record without one)."""
    return {f"nm:{_sorted_name(record)}"} if record.name.full_pinyin else set()


def _birth_date_keys(record: MatchRecord) -> set[str]:
    """Birth date with gender: filed for demographic search by birth date without a name (never
    read by matching: its blocks are big)."""
    if record.birth_date is None:
        return set()
    return {_birth_date_key(record.birth_date, _gender_key(record.gender))}


def _birth_date_key(born: datetime.date, gender_key: str) -> str:
    return f"b:{born.isoformat()}:{gender_key}"


def blocking_keys(record: MatchRecord) -> set[str]:
    """The indexed keys a record is filed under; candidates are only ever looked up by these.

    National id; each phone (last 8 digits); pinyin of the name (parts sorted, so a swapped
    name files the same) with the birth year; birth date with the family name's pinyin; other
    identifiers; and, for demographic search, the name alone and the birth date with gender.
    """
    return _match_keys(record) | name_keys(record) | _birth_date_keys(record)


def search_keys(record: MatchRecord) -> set[str]:
    """The keys a registration looks its candidates up by: its own match keys, and the name
    alone when it has no birth date (a bigger block, rarely used)."""
    keys = _match_keys(record)
    if record.birth_date is None:
        keys |= name_keys(record)
    return keys


def lock_keys(record: MatchRecord) -> set[str]:
    """The keys a registration serialises on: any key another registration could find it by
    (its search keys, and its name alone, which a registration without a birth date searches)."""
    return _match_keys(record) | name_keys(record)


def demographic_keys(query: MatchRecord) -> set[str]:
    """The keys a demographic query (PDQ, $match) reads: the match keys, and the broader blocks
    matching leaves out (the name alone without a birth date, the birth date with each gender
    that agrees), so a query finds every record its parameters agree with."""
    keys = _match_keys(query)
    if query.birth_date is None:
        keys |= name_keys(query)
    else:
        genders = ("m", "f", "u") if _gender_key(query.gender) == "u" else (_gender_key(query.gender), "u")
        keys.update(_birth_date_key(query.birth_date, g) for g in genders)
    return keys


def _gender_key(gender: str) -> str:
    return {"male": "m", "female": "f"}.get(gender, "u")


# --- comparison levels ----------------------------------------------------------------------


def compare_name_part(a: str, a_pinyin: str, a_han: bool, b: str, b_pinyin: str, b_han: bool) -> str:
    """Level of one name part (family or given): exact characters (or equal Latin spelling),
    homophone (same pinyin, other characters: 张 / 章), pinyin against characters ("Zhang" / 张),
    similar (Jaro–Winkler of the spellings ≥ 0.9: typos), else different."""
    if not a_pinyin or not b_pinyin:
        return MISSING
    if a_han == b_han:
        if a == b:
            return EXACT
        if a_han and a_pinyin == b_pinyin:
            return HOMOPHONE
    elif a_pinyin == b_pinyin:
        return PINYIN
    similarity = JaroWinkler.similarity(a_pinyin, b_pinyin)
    if (
        not a_han
        and not b_han
        and min(len(a_pinyin), len(b_pinyin)) >= 4
        and DamerauLevenshtein.distance(a_pinyin, b_pinyin, score_cutoff=2) <= 1
    ):
        return TYPO
    if similarity >= SIMILAR_NAME:
        return SIMILAR
    if a_han and b_han and len(a) == len(b) >= 2 and sum(x != y for x, y in zip(a, b, strict=True)) == 1:
        # One character of a two- or three-character name mistyped (a wrong character, not a homophone).
        return SIMILAR
    if a_han or b_han:
        return DIFFERENT
    # Latin spellings (romanised or foreign names): one edit (a letter wrong, missing, extra or
    # two letters transposed) of a name of four letters or more is a typo ("joel" / "jeol");
    # two edits, or Jaro–Winkler ≥ 0.8, are weaker evidence.
    edits = DamerauLevenshtein.distance(a_pinyin, b_pinyin, score_cutoff=3)
    if similarity >= APPROXIMATE_NAME or (edits <= 2 and min(len(a_pinyin), len(b_pinyin)) >= 5):
        return APPROXIMATE
    return DIFFERENT


def compare_names(a: NameForms, b: NameForms) -> tuple[str, str]:
    """(family level, given level). Family and given written the other way round on one side
    ("Wei Zhang" / 张伟) is the swapped level for both parts."""
    family = compare_name_part(a.family, a.family_pinyin, a.han, b.family, b.family_pinyin, b.han)
    given = compare_name_part(a.given, a.given_pinyin, a.han, b.given, b.given_pinyin, b.han)
    if (
        not (family in _NAME_AGREEMENT and given in _NAME_AGREEMENT)
        and a.family_pinyin
        and a.given_pinyin
        and a.family_pinyin != a.given_pinyin
        and a.family_pinyin == b.given_pinyin
        and a.given_pinyin == b.family_pinyin
    ):
        return SWAPPED, SWAPPED
    if (
        family not in _NAME_AGREEMENT
        and given not in _NAME_AGREEMENT
        and not (a.han or b.han)
        and a.family_pinyin
        and a.given_pinyin
        and b.family_pinyin
        and b.given_pinyin
        and a.family_pinyin != a.given_pinyin
        and JaroWinkler.similarity(a.family_pinyin, b.given_pinyin) >= SIMILAR_NAME
        and JaroWinkler.similarity(a.given_pinyin, b.family_pinyin) >= SIMILAR_NAME
    ):
        # Latin parts the other way round, one of them (or both) with a typo.
        return SWAPPED, SWAPPED
    if (
        (family in (MISSING, DIFFERENT) or given in (MISSING, DIFFERENT))
        and a.family_pinyin
        and a.given_pinyin
        and b.family_pinyin
        and b.given_pinyin
        and a.full_pinyin
        and a.full_pinyin == (b.full_pinyin)
    ):
        # The same letters split differently (a compound surname, "Ouyang Nana" / "Ou Yangnana").
        return PINYIN if a.han != b.han else HOMOPHONE, PINYIN if a.han != b.han else HOMOPHONE
    latin = not (a.han or b.han)
    if latin and given in (DIFFERENT, APPROXIMATE) and nicknames_agree(a.given_pinyin, b.given_pinyin):
        given = NICKNAME
    if (
        latin
        and family in _NO_AGREEMENT
        and given in _NO_AGREEMENT
        and (_same_spelling(a.given_pinyin, b.family_pinyin) or _same_spelling(a.family_pinyin, b.given_pinyin))
    ):
        return CROSSED, MISSING
    return family, given


_NO_AGREEMENT = frozenset({MISSING, DIFFERENT, APPROXIMATE})


def _same_spelling(a: str, b: str) -> bool:
    # Equal, or a typo apart (names of four letters or more).
    if not a or not b:
        return False
    return a == b or (min(len(a), len(b)) >= 4 and DamerauLevenshtein.distance(a, b, score_cutoff=2) <= 1)


@functools.cache
def _nicknamer() -> Any:
    from nicknames import NickNamer

    return NickNamer()


@functools.lru_cache(maxsize=65_536)
def nicknames_agree(a: str, b: str) -> bool:
    """Whether one Latin given name is a nickname of the other, or both are of one name."""
    if not a or not b or a == b or not a.isascii() or not b.isascii():
        return False
    namer = _nicknamer()
    if b in namer.nicknames_of(a) or a in namer.nicknames_of(b):
        return True
    return bool(namer.canonicals_of(a) & namer.canonicals_of(b))


@functools.lru_cache(maxsize=65_536)
def _digits(date: datetime.date) -> str:
    # Cached: strftime was a fifth of scoring a pair (a region's birth dates are ~40,000 days).
    return date.strftime("%Y%m%d")


def compare_birth_dates(a: datetime.date | None, b: datetime.date | None) -> str:
    """Exact; one digit off (one digit wrong or two adjacent digits transposed); day and month
    swapped; the same year only; different."""
    if a is None or b is None:
        return MISSING
    if a == b:
        return EXACT
    da, db = _digits(a), _digits(b)
    wrong = [i for i in range(8) if da[i] != db[i]]
    if len(wrong) == 1 or (
        len(wrong) == 2 and wrong[1] == wrong[0] + 1 and da[wrong[0]] == db[wrong[1]] and da[wrong[1]] == db[wrong[0]]
    ):
        return ONE_DIGIT
    if a.year == b.year and a.month == b.day and a.day == b.month:
        return DAY_MONTH_SWAPPED
    if a.year == b.year:
        return YEAR_ONLY
    return DIFFERENT


def compare_gender(a: str, b: str) -> str:
    """Male / female agree or disagree; unknown or other on either side is missing."""
    known = {"male", "female"}
    if a not in known or b not in known:
        return MISSING
    return AGREE if a == b else DISAGREE


def _phone_key(phone: str) -> str:
    # A landline with and without its area code, a mobile with and without +86: the last 8 digits.
    digits = phone.lstrip("+")
    return digits[-8:] if len(digits) >= 8 else digits


def compare_phones(a: frozenset[str], b: frozenset[str]) -> str:
    """Any number in common agrees; otherwise disagree; none on either side is missing."""
    if not a or not b:
        return MISSING
    return AGREE if {_phone_key(p) for p in a} & {_phone_key(p) for p in b} else DISAGREE


def compare_addresses(a: frozenset[str], b: frozenset[str]) -> str:
    """Overlap of address tokens (bigrams), relative to the shorter address: ≥ 0.8 same,
    ≥ 0.5 partial, else different (so a missing province or 号院 still reads as the same)."""
    if not a or not b:
        return MISSING
    overlap = len(a & b) / min(len(a), len(b))
    if overlap >= 0.8:
        return SAME
    if overlap >= 0.5:
        return PARTIAL
    return DIFFERENT


def compare_values(a: str | None, b: str | None) -> str:
    """Agree / disagree on a value both records have; missing otherwise."""
    if not a or not b:
        return MISSING
    return AGREE if a == b else DISAGREE


def compare_postcodes(a: str, b: str) -> str:
    """Agree; one digit off (one wrong or two adjacent transposed: a typo, or a neighbouring
    delivery area); disagree; missing when either has none."""
    if not a or not b:
        return MISSING
    if a == b:
        return AGREE
    if len(a) == len(b) and DamerauLevenshtein.distance(a, b, score_cutoff=2) <= 1:
        return ONE_DIGIT
    return DISAGREE


def compare_localities(a: str, b: str) -> str:
    """The locality (suburb, town, district) as evidence of its own: agree; a typo (one edit of
    a name of four letters or more); disagree; missing when either has none."""
    if not a or not b:
        return MISSING
    if a == b:
        return AGREE
    if min(len(a), len(b)) >= 4 and DamerauLevenshtein.distance(a, b, score_cutoff=2) <= 1:
        return TYPO
    return DISAGREE


def compare_identifiers(a: frozenset[tuple[str, str]], b: frozenset[tuple[str, str]]) -> str:
    """Another identifier (social insurance, health card, passport) in common agrees; the same
    assigning authority with another value disagrees; nothing to compare is missing."""
    if a & b:
        return AGREE
    if {s for s, _ in a} & {s for s, _ in b}:
        return DISAGREE
    return MISSING


def compare(a: MatchRecord, b: MatchRecord) -> dict[str, str]:
    """The comparison vector of a pair: field → level."""
    family, given = compare_names(a.name, b.name)
    return {"family": family, "given": given, **_levels_besides_names(a, b)}


def _levels_besides_names(a: MatchRecord, b: MatchRecord) -> dict[str, str]:
    return {
        "birth_date": compare_birth_dates(a.birth_date, b.birth_date),
        "gender": compare_gender(a.gender, b.gender),
        "national_id": compare_values(a.national_id, b.national_id),
        "phone": compare_phones(a.phones, b.phones),
        "address": compare_addresses(a.address, b.address),
        "street_number": compare_values(a.street_number, b.street_number),
        "postcode": compare_postcodes(a.postcode, b.postcode),
        "identifier": compare_identifiers(a.identifiers, b.identifiers),
        "locality": compare_localities(a.locality, b.locality),
    }


# --- parameters and weights -----------------------------------------------------------------


@dataclass(frozen=True)
class MatchParameters:
    """m and u per field and level, the two thresholds and the frequency adjustment."""

    m: Mapping[str, Mapping[str, float]]
    u: Mapping[str, Mapping[str, float]]
    link_threshold: float
    review_threshold: float
    prior_match: float = 0.01
    frequency_fields: tuple[str, ...] = ("family", "given")
    pseudo_count: float = 2000.0
    max_bonus: float = 4.0
    max_penalty: float = 3.0
    surname_shares: Mapping[str, float] = field(default_factory=dict)
    # Hold a pair whose given names differ and whose birth dates agree for review (twins) while
    # m(given / different) is below this: 1 always, 0 never.
    twin_hold_below: float = 0.1

    # With weights learned from the data (an estimate in force), the thresholds follow from
    # these: the posterior probability of one person at which a pair is linked / reviewed.
    target_precision: float = 0.999
    review_precision: float = 0.5
    # Use the weights learned from the index's records (stored EM estimates) over these.
    learn_weights: bool = True
    # What EM took for matches among the candidate pairs, by their weight: (weight in bits,
    # expected matches), ascending; and the expected matches per sampled record (≤ 1). The link
    # threshold follows from them (`thresholds_for`); empty: from the posterior at the threshold.
    match_weights: tuple[tuple[float, float], ...] = ()
    matches_per_record: float = 1.0

    def holds_twins(self) -> bool:
        """Whether a different given name with agreeing birth dates is held for review."""
        return self.m.get("given", {}).get(DIFFERENT, 0.0) < self.twin_hold_below

    def weight(self, field_name: str, level: str) -> float:
        """log2(m/u) of a level; 0 for a missing value or a level without parameters."""
        if level == MISSING:
            return 0.0
        m = self.m.get(field_name, {}).get(level)
        u = self.u.get(field_name, {}).get(level)
        if not m or not u:
            return 0.0
        return math.log2(m / u)

    def to_json(self) -> dict[str, Any]:
        """The parameters in the shape of the configuration file."""
        return {
            "link_threshold": self.link_threshold,
            "review_threshold": self.review_threshold,
            "prior_match": self.prior_match,
            "twin_hold_below": self.twin_hold_below,
            "target_precision": self.target_precision,
            "review_precision": self.review_precision,
            "learn_weights": self.learn_weights,
            "frequency": {
                "fields": list(self.frequency_fields),
                "pseudo_count": self.pseudo_count,
                "max_bonus": self.max_bonus,
                "max_penalty": self.max_penalty,
            },
            "fields": {
                f: {level: [round(self.m[f][level], 8), round(self.u[f][level], 10)] for level in self.m[f]}
                for f in self.m
            },
            "surname_shares": dict(self.surname_shares),
        }

    def weights_table(self) -> list[tuple[str, str, float, float, float]]:
        """(field, level, m, u, weight in bits) for every level in force."""
        return [
            (f, level, self.m[f][level], self.u[f][level], round(self.weight(f, level), 3))
            for f in self.m
            for level in self.m[f]
        ]


def parameters_from_json(data: Mapping[str, Any]) -> MatchParameters:
    """Parameters from the configuration file's shape; ValueError when it is inconsistent."""
    m: dict[str, dict[str, float]] = {}
    u: dict[str, dict[str, float]] = {}
    for field_name, levels in data["fields"].items():
        if field_name not in FIELDS:
            raise ValueError(f"unknown field {field_name!r} in match parameters")
        m[field_name] = {}
        u[field_name] = {}
        for level, (mv, uv) in levels.items():
            if not (0 < float(mv) <= 1 and 0 < float(uv) <= 1):
                raise ValueError(f"m and u of {field_name}.{level} must be in (0, 1]")
            m[field_name][level], u[field_name][level] = float(mv), float(uv)
    link, review = float(data["link_threshold"]), float(data["review_threshold"])
    if review > link:
        raise ValueError("review_threshold must not exceed link_threshold")
    frequency = data.get("frequency", {})
    return MatchParameters(
        m=m,
        u=u,
        link_threshold=link,
        review_threshold=review,
        prior_match=float(data.get("prior_match", 0.01)),
        frequency_fields=tuple(frequency.get("fields", ("family", "given"))),
        pseudo_count=float(frequency.get("pseudo_count", 2000)),
        max_bonus=float(frequency.get("max_bonus", 4.0)),
        max_penalty=float(frequency.get("max_penalty", 3.0)),
        surname_shares=dict(data.get("surname_shares", {})),
        twin_hold_below=float(data.get("twin_hold_below", 0.1)),
        target_precision=_probability(data.get("target_precision", 0.999), "target_precision"),
        review_precision=_probability(data.get("review_precision", 0.5), "review_precision"),
        learn_weights=bool(data.get("learn_weights", True)),
    )


def estimate_json(params: MatchParameters, *, population: int) -> dict[str, Any]:
    """What an EM estimate changes, as stored: m / u per field and level, the share of matches
    among the candidate pairs, and the index's size (`population`) the thresholds follow from."""
    return {
        "candidate_match_share": params.prior_match,
        "population": population,
        "fields": {f: {level: [params.m[f][level], params.u[f][level]] for level in params.m[f]} for f in params.m},
        "match_weights": [[w, round(n, 3)] for w, n in params.match_weights],
        "matches_per_record": round(params.matches_per_record, 4),
    }


def _log2_odds(probability: float) -> float:
    return math.log2(probability / (1 - probability))


def thresholds_for(params: MatchParameters, population: int) -> tuple[float, float]:
    """(link, review) thresholds in bits from the target precisions: with u counted from random
    pairs, a pair's weight is its log-likelihood ratio against two people drawn at random, whose
    prior odds of being one person are about 1 : population (a record has at most a few others
    of its person among them). A pair is reviewed from a posterior probability of being one
    person of `review_precision`.

    The link threshold is the lowest at which the links are expected to be right at
    `target_precision` (the precision of the links made, not of the weakest one): with the
    distribution of match weights EM found (`match_weights`), a threshold t links an expected
    π·P_m(W ≥ t) matches per record and population·P_u(W ≥ t) others, and under the model
    P_u(W ≥ t) = E_m[2^−W; W ≥ t] (u = m·2^−w for every comparison vector). So the links'
    error rate is population / π × E_m[2^−W | W ≥ t]: mostly matches far above t keep it low
    even where the weakest link's own posterior is lower. Never below the review threshold (a
    pair more likely two people than one is not linked), never above the threshold at which
    the weakest link's posterior reaches `target_precision` (what is used without a
    distribution)."""
    prior = math.log2(max(population, 2))
    link = _log2_odds(params.target_precision) + prior
    review = min(_log2_odds(params.review_precision) + prior, link)
    if params.match_weights:
        # The largest share of false links the target allows, as a bound on E_m[2^−W | W ≥ t].
        allowed = (1 - params.target_precision) / params.target_precision * params.matches_per_record / population
        mass = spread = 0.0
        for weight, matches in reversed(params.match_weights):
            if weight < review:
                break
            mass += matches
            spread += matches * 2.0**-weight
            if mass and spread / mass > allowed:
                break
            # No lower than matches were seen at: below them the sample says nothing.
            link = min(link, weight)
    return round(link, 2), round(review, 2)


def with_estimate(base: MatchParameters, estimate: Mapping[str, Any]) -> MatchParameters:
    """The base parameters (frequency settings, census priors) with a stored estimate's m / u for
    the levels both know (a level added since keeps its prior values), the thresholds from the
    target precisions at the estimate's population, and the prior share of matches of a random
    pair (1 / population: what `Comparison.probability` weighs against)."""
    m = {f: dict(levels) for f, levels in base.m.items()}
    u = {f: dict(levels) for f, levels in base.u.items()}
    for f, levels in estimate.get("fields", {}).items():
        for level, (mv, uv) in levels.items():
            if f in m and level in m[f] and 0 < float(mv) <= 1 and 0 < float(uv) <= 1:
                m[f][level], u[f][level] = float(mv), float(uv)
    population = int(estimate.get("population", 0))
    if population < 2:
        return replace(base, m=m, u=u)
    learned = replace(
        base,
        m=m,
        u=u,
        match_weights=tuple((float(w), float(n)) for w, n in estimate.get("match_weights", ())),
        matches_per_record=min(max(float(estimate.get("matches_per_record", 1.0)), 1e-3), 1.0),
    )
    link, review = thresholds_for(learned, population)
    return replace(learned, prior_match=1 / population, link_threshold=link, review_threshold=review)


def _probability(value: object, name: str) -> float:
    number = float(value)  # type: ignore[arg-type]
    if not 0 < number < 1:
        raise ValueError(f"{name} must be between 0 and 1 (exclusive)")
    return number


def load_parameters(path: Path | None = None) -> MatchParameters:
    """The parameters in a JSON file (the shipped default when no path is given)."""
    return parameters_from_json(json.loads((path or DEFAULT_PARAMETERS_FILE).read_text(encoding="utf-8")))


# --- value frequencies ----------------------------------------------------------------------


@dataclass(frozen=True)
class ValueFrequencies:
    """How often name values occur in the index (counts by field and pinyin value), blended with
    a prior (census surname shares) so a young index is not misled by a handful of records."""

    counts: Mapping[tuple[str, str], int] = field(default_factory=dict)
    totals: Mapping[str, int] = field(default_factory=dict)

    def share(self, field_name: str, value: str, params: MatchParameters) -> float | None:
        """Estimated share of records with this value; None when nothing is known of the field."""
        prior = _prior_shares(params).get(field_name, {}).get(value)
        u_exact = params.u.get(field_name, {}).get(EXACT)
        if u_exact is None:
            return None
        prior_share = prior if prior is not None else u_exact
        count = self.counts.get((field_name, value), 0)
        total = self.totals.get(field_name, 0)
        return (count + prior_share * params.pseudo_count) / (total + params.pseudo_count)


_PRIOR_CACHE: dict[int, dict[str, dict[str, float]]] = {}


def _prior_shares(params: MatchParameters) -> dict[str, dict[str, float]]:
    """Census surname shares keyed by their pinyin (homophone surnames 张 / 章 add up)."""
    key = id(params.surname_shares)
    if key not in _PRIOR_CACHE:
        by_pinyin: dict[str, float] = {}
        for surname, share in params.surname_shares.items():
            reading = pinyin_of(surname, surname=True)
            by_pinyin[reading] = by_pinyin.get(reading, 0.0) + float(share)
        _PRIOR_CACHE[key] = {"family": by_pinyin}
    return _PRIOR_CACHE[key]


def frequency_values(record: MatchRecord) -> dict[str, str]:
    """The values of a record whose frequencies are counted (pinyin of family and given name)."""
    return {"family": record.name.family_pinyin, "given": record.name.given_pinyin}


# --- scoring ---------------------------------------------------------------------------------

# Fields that go with the address: no evidence of their own when the whole address differs.
_ADDRESS_PARTS = frozenset({"street_number", "postcode", "locality"})


@dataclass(frozen=True)
class Comparison:
    """A scored pair: level and weight per field, and the total weight."""

    levels: Mapping[str, str]
    weights: Mapping[str, float]
    total: float

    def probability(self, prior_match: float) -> float:
        """Posterior probability that the pair is one person, given the prior share of matches."""
        odds = math.log2(prior_match / (1 - prior_match)) + self.total
        if odds > 60:
            return 1.0
        return 1.0 / (1.0 + 2.0 ** (-odds))


def score(
    a: MatchRecord, b: MatchRecord, params: MatchParameters, frequencies: ValueFrequencies | None = None
) -> Comparison:
    """Compare two records and weigh every field (frequency-adjusted for names).

    A wholly different address (a move, or another household) is weighed once, by the address
    level: the house number is part of the address line and a postcode and locality go with the
    address, so their disagreeing then is no further evidence (nearly every moved person's and
    every other household's do). Weighed as well, they would count one move up to four times
    (−4 to −5 bits for the house number and postcode alone, as much as a birth date typo). Their
    agreeing is still evidence (a move within the postcode or town), and EM still learns every
    level from the comparison vectors as they are."""
    return Scorer(a, params, frequencies).score(b)


_WEIGHT_TABLES: dict[int, tuple[MatchParameters, dict[tuple[str, str], float]]] = {}


def _weight_table(params: MatchParameters) -> dict[tuple[str, str], float]:
    """(field, level) → `params.weight(field, level)` for every level the parameters name (any
    other level weighs 0), computed once per parameters (the parameters are immutable)."""
    entry = _WEIGHT_TABLES.get(id(params))
    if entry is None or entry[0] is not params:
        if len(_WEIGHT_TABLES) >= 64:
            _WEIGHT_TABLES.clear()
        table = {(f, level): params.weight(f, level) for f in params.m for level in params.m[f]}
        entry = _WEIGHT_TABLES[id(params)] = (params, table)
    return entry[1]


# Bits by which a screened-out candidate's highest possible weight is under the threshold at
# least: more than the rounding of its field weights (4 decimals, 11 fields) could add.
_SCREEN_MARGIN = 0.001


class Scorer:
    """Weighs candidates against one record (`score` as a function does), with what depends on
    that record alone worked out once: the weight of each level, and the frequency adjustment of
    its names (a name's share is the record's own, whatever the candidate).

    `screened` also tells a candidate that cannot reach a threshold before its names are
    compared: the fields besides the names are compared and weighed as they will be (cheap:
    equality, a few set operations), and the names are taken at the highest weight either part
    could have with this record (its agreement with the frequency adjustment). A candidate whose
    total cannot reach the review threshold is neither linked nor reviewed (unless its national
    id agrees: a national-id rule or conflict), so `decide` drops it unscored."""

    def __init__(self, record: MatchRecord, params: MatchParameters, frequencies: ValueFrequencies | None = None):
        self.record = record
        self.params = params
        self._weights = _weight_table(params)
        self._adjust: dict[str, float] = {}
        if frequencies is not None:
            values = frequency_values(record)
            for field_name in params.frequency_fields:
                if field_name not in values:
                    continue
                share = frequencies.share(field_name, values[field_name], params)
                u_exact = params.u.get(field_name, {}).get(EXACT)
                if share and u_exact:
                    self._adjust[field_name] = min(
                        params.max_bonus, max(-params.max_penalty, math.log2(u_exact / share))
                    )
        self._name_ceiling: float | None = None

    def score(self, candidate: MatchRecord) -> Comparison:
        """The candidate compared with the record and weighed."""
        family, given = compare_names(self.record.name, candidate.name)
        return self._weigh({"family": family, "given": given, **_levels_besides_names(self.record, candidate)})

    def screened(self, candidate: MatchRecord, threshold: float) -> Comparison | None:
        """As `score`, or None when the candidate's weight cannot reach `threshold` whatever
        its names compare as (and its national id does not agree)."""
        others = _levels_besides_names(self.record, candidate)
        if others["national_id"] != AGREE:
            moved = others["address"] == DIFFERENT
            weights = self._weights
            ceiling = self.name_ceiling()
            for field_name, level in others.items():
                if not (moved and level == DISAGREE and field_name in _ADDRESS_PARTS):
                    ceiling += weights.get((field_name, level), 0.0)
            if ceiling < threshold - _SCREEN_MARGIN:
                return None
        family, given = compare_names(self.record.name, candidate.name)
        return self._weigh({"family": family, "given": given, **others})

    def name_ceiling(self) -> float:
        """The highest weight the family and given names together can have against this record
        (a level the parameters do not name weighs 0)."""
        if self._name_ceiling is None:
            ceiling = 0.0
            for field_name in ("family", "given"):
                best = 0.0
                for level in self.params.m.get(field_name, {}):
                    w = self._weights.get((field_name, level), 0.0)
                    if level in _NAME_AGREEMENT:
                        w += self._adjust.get(field_name, 0.0)
                    best = max(best, w)
                ceiling += best
            self._name_ceiling = ceiling
        return self._name_ceiling

    def _weigh(self, levels: dict[str, str]) -> Comparison:
        weights: dict[str, float] = {}
        moved = levels["address"] == DIFFERENT
        table = self._weights
        adjust = self._adjust
        for field_name, level in levels.items():
            if moved and level == DISAGREE and field_name in _ADDRESS_PARTS:
                weights[field_name] = 0.0
                continue
            w = table.get((field_name, level), 0.0)
            if level in _NAME_AGREEMENT and field_name in adjust:
                w += adjust[field_name]
            weights[field_name] = round(w, 4)
        return Comparison(levels=levels, weights=weights, total=round(sum(weights.values()), 4))


# --- the link decision ------------------------------------------------------------------------


class Outcome(StrEnum):
    LINK = "link"
    REVIEW = "review"
    NEW = "new"


class Rule(StrEnum):
    NATIONAL_ID = "national-id"
    PROBABILISTIC = "probabilistic"


@dataclass(frozen=True)
class ScoredCandidate:
    """A candidate record, its comparison with the new record, and why it may not auto-link."""

    record: MatchRecord
    comparison: Comparison
    rule: Rule | None = None
    # Why an automatic link is ruled out whatever the score (the pair goes to review instead).
    hold: str = ""


@dataclass
class ScreenTally:
    """Candidates `decide` was given: scored in full, and screened out (could not reach review)."""

    scored: int = 0
    screened_out: int = 0

    def add(self, scored: bool) -> None:
        if scored:
            self.scored += 1
        else:
            self.screened_out += 1


@dataclass(frozen=True)
class MatchDecision:
    outcome: Outcome
    # The enterprise id to link to (LINK), else empty.
    enterprise_id: str = ""
    rule: Rule | None = None
    best: ScoredCandidate | None = None
    # Candidates a data steward should look at (REVIEW, or alongside a NEW / LINK decision).
    review: tuple[ScoredCandidate, ...] = ()


def _coded_values_agree(national_id: str, record: MatchRecord) -> bool:
    if record.birth_date is not None and record.birth_date != gb11643.birth_date(national_id):
        return False
    return record.gender not in {"male", "female"} or record.gender == gb11643.gender(national_id)


def _exact_name(a: NameForms, b: NameForms) -> bool:
    return a.han == b.han and (a.family, a.given) == (b.family, b.given)


def _clearly_different(levels: Mapping[str, str]) -> bool:
    """Names or birth dates that cannot be one person's, even with typos."""
    return (
        levels["family"] == DIFFERENT or levels["given"] == DIFFERENT or levels["birth_date"] in (DIFFERENT, YEAR_ONLY)
    )


def assess(
    new: MatchRecord,
    candidate: MatchRecord,
    params: MatchParameters,
    frequencies: ValueFrequencies | None = None,
) -> ScoredCandidate:
    """Score one candidate and apply the rules that outrank the score.

    - Equal valid national id, the birth date and gender it encodes agreeing with both records,
      and the same name: linked by rule (LINK_METHOD_NATIONAL_ID), whatever the weights.
    - Equal national id with clearly different names or birth dates: held for review, never an
      automatic link (a shared or mistyped id number, or an identity fraud).
    - A family or given name that is no variant of the other (twins), two different national
      ids, or two records of the same hospital domain (the hospital says
      they are two patients; a duplicate is for the hospital to merge): held for review.
    """
    return _ruled(new, candidate, params, score(new, candidate, params, frequencies))


def _ruled(
    new: MatchRecord, candidate: MatchRecord, params: MatchParameters, comparison: Comparison
) -> ScoredCandidate:
    levels = comparison.levels
    if levels["national_id"] == AGREE and new.national_id:
        coded = gb11643.birth_date(new.national_id)
        contradicted = any(compare_birth_dates(r.birth_date, coded) in (DIFFERENT, YEAR_ONLY) for r in (new, candidate))
        if contradicted or _clearly_different(levels):
            return ScoredCandidate(candidate, comparison, hold="national-id-conflict")
        if (
            _exact_name(new.name, candidate.name)
            and new.domain != candidate.domain
            and _coded_values_agree(new.national_id, new)
            and _coded_values_agree(new.national_id, candidate)
        ):
            return ScoredCandidate(candidate, comparison, rule=Rule.NATIONAL_ID)
    if levels["national_id"] == DISAGREE:
        return ScoredCandidate(candidate, comparison, hold="national-id-differs")
    if levels["given"] == DIFFERENT and (levels["birth_date"] in _BIRTH_DATE_DISAGREEMENT or params.holds_twins()):
        # A given name that is no variant of the other: with birth dates that disagree this is
        # how a household looks (siblings, parent and child share a surname, an address and a
        # phone; weights learned under independence of fields add those up as if unrelated),
        # with birth dates that agree (or one missing) how twins look. Never linked without a
        # person looking at it. Twins are left to the weights only when the data say a
        # different given name is common among matches (m of given / different ≥
        # `twin_hold_below`, learned by EM: an export whose given names are often replaced or
        # garbled); a different given name is then far more often an entry error than a twin
        # (≈ 2 % of births). A family name that differs (a married name, a surname mistyped
        # beyond recognition) is left to the weights.
        return ScoredCandidate(candidate, comparison, hold="name-differs")
    if new.domain == candidate.domain:
        return ScoredCandidate(candidate, comparison, hold="same-domain")
    return ScoredCandidate(candidate, comparison, rule=Rule.PROBABILISTIC)


def decide(
    new: MatchRecord,
    candidates: Sequence[MatchRecord],
    params: MatchParameters,
    frequencies: ValueFrequencies | None = None,
    *,
    different: frozenset[str] = frozenset(),
    max_review: int = 3,
    tally: ScreenTally | None = None,
) -> MatchDecision:
    """Decide what a new or changed record links to.

    `different` holds the record ids a data steward declared a different person from `new`:
    their enterprise ids are never proposed again. Each enterprise id is represented by its best
    scoring record. One enterprise id at or above the link threshold (or linked by rule) is
    linked; two or more are ambiguous and go to review, unless exactly one of them is linked by the
    national-id rule: that one is linked and the others go to review alongside (a LINK decision
    with `review`); enterprise ids between the thresholds (or held by a rule) go to review, and
    the record gets a new enterprise id meanwhile.

    A candidate whose weight cannot reach the review threshold, whatever its names compare as,
    is dropped before its names are compared (`Scorer.screened`): it could be neither linked nor
    reviewed, so the decision is the one scoring every candidate gives (`best` of a NEW
    decision is the best candidate that could reach review, if any). `tally` counts both.
    """
    excluded = {c.enterprise_id for c in candidates if c.record_id in different}
    best: dict[str, ScoredCandidate] = {}
    scorer = Scorer(new, params, frequencies)
    for candidate in candidates:
        if candidate.record_id == new.record_id or candidate.enterprise_id in excluded:
            continue
        comparison = scorer.screened(candidate, params.review_threshold)
        if tally is not None:
            tally.add(comparison is not None)
        if comparison is None:
            continue
        scored = _ruled(new, candidate, params, comparison)
        current = best.get(candidate.enterprise_id)
        if current is None or _rank(scored) > _rank(current):
            best[candidate.enterprise_id] = scored
    ranked = sorted(best.values(), key=_rank, reverse=True)
    linkable = [
        s for s in ranked if not s.hold and (s.rule is Rule.NATIONAL_ID or s.comparison.total >= params.link_threshold)
    ]
    reviewable = [
        s for s in ranked if s.comparison.total >= params.review_threshold or s.hold == "national-id-conflict"
    ]
    if len(linkable) == 1:
        chosen = linkable[0]
        return MatchDecision(
            Outcome.LINK, enterprise_id=chosen.record.enterprise_id, rule=chosen.rule, best=chosen, review=()
        )
    ruled = [s for s in linkable if s.rule is Rule.NATIONAL_ID]
    clear_best = len(linkable) > 1 and linkable[0].comparison.total - linkable[1].comparison.total >= _CLEAR_MARGIN
    if len(ruled) == 1 or (not ruled and clear_best):
        # One person by the national-id rule, others by score only: the rule decides, as it would
        # alone. The others look like the same person split earlier (a record held for review got
        # an enterprise id of its own): a steward decides whether they join.
        chosen = ruled[0] if ruled else linkable[0]
        others = tuple(s for s in reviewable if s is not chosen)
        return MatchDecision(
            Outcome.LINK,
            enterprise_id=chosen.record.enterprise_id,
            rule=chosen.rule,
            best=chosen,
            review=others[:max_review],
        )
    if reviewable:
        return MatchDecision(Outcome.REVIEW, best=reviewable[0], review=tuple(reviewable[:max_review]))
    return MatchDecision(Outcome.NEW, best=ranked[0] if ranked else None)


# Bits by which the best of several linkable people must outscore the next for a link (2^5: 32
# times likelihood ratio); closer, they are ambiguous.
_CLEAR_MARGIN = 5.0


def _rank(scored: ScoredCandidate) -> tuple[int, float]:
    return (1 if scored.rule is Rule.NATIONAL_ID and not scored.hold else 0, scored.comparison.total)


# --- EM estimation of m and u ----------------------------------------------------------------


# Fields whose m EM learns from the other fields' posteriors without feeding them back: the
# locality is also in the address's tokens, and counting it twice in the posteriors would move
# what EM takes for a match (and so every other field's m).
_NOT_IN_POSTERIOR = frozenset({"locality"})


def estimate_parameters(
    vectors: Sequence[Mapping[str, str]],
    start: MatchParameters,
    *,
    iterations: int = 50,
    tolerance: float = 1e-6,
    random_vectors: Sequence[Mapping[str, str]] = (),
    prior_weight: float = 20.0,
) -> MatchParameters:
    """Estimate m, u and the share of matches from unlabelled comparison vectors (EM under
    conditional independence of fields). `vectors` are the levels of candidate pairs (e.g. from
    blocking); `start` gives the levels and starting values. Missing levels carry no
    information and are skipped. Probabilities are kept ≥ 1e-6 so no level weighs infinitely.

    With `random_vectors` (pairs of records drawn at random: almost all different people) the
    weights use u counted from those: candidate pairs share a blocking key, so among them
    different people agree on names, streets and localities far more often than in the
    population, and their u would make an agreeing name worth little. During EM, though, u is
    learned among the candidates (starting from the random pairs' values): held at the random
    pairs' values there, different people found by a key (neighbours sharing a street and
    locality) could only be explained as matches, and m came out polluted (faker-typo:
    m(birth date / different) 0.43, a different birth date weighing −1.2 bits instead of −11).
    The result then also carries what EM took for matches by their weight (`match_weights`,
    for the link threshold: `thresholds_for`).
    """
    if not vectors:
        return start
    m = {f: dict(levels) for f, levels in start.m.items()}
    u = {f: dict(levels) for f, levels in start.u.items()}
    random_u = _level_shares(random_vectors, start.u) if random_vectors else None
    if random_u is not None:
        u = {f: dict(levels) for f, levels in random_u.items()}
    p = min(max(start.prior_match, 1e-4), 0.5)
    floor = 1e-6
    for _ in range(iterations):
        m_sum = {f: dict.fromkeys(levels, 0.0) for f, levels in m.items()}
        u_sum = {f: dict.fromkeys(levels, 0.0) for f, levels in u.items()}
        g_total = 0.0
        for vector in vectors:
            g = _posterior(vector, m, u, p)
            g_total += g
            for f, level in vector.items():
                if f in m and level in m[f]:
                    m_sum[f][level] += g
                    u_sum[f][level] += 1 - g
        new_p = min(max(g_total / len(vectors), 1e-6), 1 - 1e-6)
        change = abs(new_p - p)
        for f in m:
            m_total = sum(m_sum[f].values())
            u_total = sum(u_sum[f].values())
            for level in m[f]:
                # A Dirichlet prior of `prior_weight` pairs at the starting values: a level the
                # few matches of a small sample never reached is rare, not impossible.
                new_m = max((m_sum[f][level] + prior_weight * start.m[f][level]) / (m_total + prior_weight), floor)
                new_u = max(u_sum[f][level] / u_total, floor) if u_total else u[f][level]
                change = max(change, abs(new_m - m[f][level]), abs(new_u - u[f][level]))
                m[f][level], u[f][level] = new_m, new_u
        p = new_p
        if change < tolerance:
            break
    # A level no pair reached (homophones in data without Chinese characters) is no evidence
    # either way: it keeps its starting values rather than the floor (which would weigh it at
    # −6 bits on the day it first occurs).
    seen = {(f, level) for vector in (*vectors, *random_vectors) for f, level in vector.items()}
    for f in m:
        for level in m[f]:
            if (f, level) not in seen:
                m[f][level], u[f][level] = start.m[f][level], start.u[f][level]
    if random_u is None:
        return replace(start, m=m, u=u, prior_match=p)
    # What EM took for matches, by the weight they have with the u of random pairs.
    posteriors = [_posterior(vector, m, u, p) for vector in vectors]
    for f in random_u:
        for level in random_u[f]:
            if (f, level) in seen:
                u[f][level] = random_u[f][level]
    learned = replace(start, m=m, u=u, prior_match=p)
    return replace(learned, match_weights=_match_weights(vectors, posteriors, learned))


def _posterior(
    vector: Mapping[str, str], m: Mapping[str, Mapping[str, float]], u: Mapping[str, Mapping[str, float]], p: float
) -> float:
    log_m, log_u = math.log(p), math.log(1 - p)
    for f, level in vector.items():
        if f in m and level in m[f] and f not in _NOT_IN_POSTERIOR:
            log_m += math.log(m[f][level])
            log_u += math.log(u[f][level])
    diff = log_u - log_m
    return 0.0 if diff > 700 else 1.0 / (1.0 + math.exp(diff))


# Width (bits) of the bins of the match-weight distribution an estimate stores.
_WEIGHT_BIN = 0.25


def _match_weights(
    vectors: Sequence[Mapping[str, str]], posteriors: Sequence[float], params: MatchParameters
) -> tuple[tuple[float, float], ...]:
    """(weight, expected matches) of the candidate pairs, weights as scored (without the
    name-frequency adjustment) rounded down to a bin, ascending."""
    table = _weight_table(params)
    bins: dict[float, float] = {}
    for vector, g in zip(vectors, posteriors, strict=True):
        if g < 1e-6:
            continue
        moved = vector.get("address") == DIFFERENT
        total = sum(
            0.0 if moved and level == DISAGREE and f in _ADDRESS_PARTS else table.get((f, level), 0.0)
            for f, level in vector.items()
        )
        key = math.floor(total / _WEIGHT_BIN) * _WEIGHT_BIN
        bins[key] = bins.get(key, 0.0) + g
    return tuple(sorted(bins.items()))


def _level_shares(
    vectors: Sequence[Mapping[str, str]], start: Mapping[str, Mapping[str, float]]
) -> dict[str, dict[str, float]]:
    """Share of each level among the non-missing values of a field (with one pseudo-count per
    level, so a level never seen is rare, not impossible); a field never compared keeps its
    starting values."""
    shares: dict[str, dict[str, float]] = {}
    for f, levels in start.items():
        counts = dict.fromkeys(levels, 1.0)
        seen = 0
        for vector in vectors:
            level = vector.get(f)
            if level in counts:
                counts[level] += 1
                seen += 1
        if not seen:
            shares[f] = dict(levels)
            continue
        total = sum(counts.values())
        shares[f] = {level: counts[level] / total for level in levels}
    return shares
