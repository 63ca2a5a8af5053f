"""Unit tests for services.mpi.domain: registration validation and the link decision."""

from __future__ import annotations

import dataclasses
import datetime

import pytest

from services.mpi.domain import (
    NATIONAL_ID_SYSTEM,
    NATIONAL_ID_TYPE,
    Candidate,
    EnterpriseId,
    Gender,
    Identifier,
    LinkMethod,
    Registration,
    claim_lease,
    decide_link,
    national_id_agrees,
    normalize_phone,
    validate_registration,
)
from services.shared.errors import InvalidArgument
from services.shared.gb11643 import check_digit

TODAY = datetime.date(2025, 6, 1)

# Synthetic bodies: 北京 西城区 (110105), born 1980-01-01; the 17th digit's parity codes the gender.
MALE_BODY = "11010519800101001"
FEMALE_BODY = "11010519800101002"
MALE_ID = MALE_BODY + check_digit(MALE_BODY)
FEMALE_ID = FEMALE_BODY + check_digit(FEMALE_BODY)
OTHER_BODY = "31010419850615003"  # 上海 徐汇区, born 1985-06-15, male
OTHER_ID = OTHER_BODY + check_digit(OTHER_BODY)
CODED_BIRTH = datetime.date(1980, 1, 1)

_FULL_WIDTH = str.maketrans("0123456789X", "０１２３４５６７８９Ｘ")


def register(**overrides: object) -> Registration:
    fields: dict[str, object] = {
        "domain": "urn:hie:org:bj-xicheng-hospital",
        "local_id": "MRN-0001",
        "name_text": "张伟",
        "today": TODAY,
    }
    fields.update(overrides)
    return validate_registration(**fields)  # type: ignore[arg-type]


def reason_of(**overrides: object) -> str:
    with pytest.raises(InvalidArgument) as info:
        register(**overrides)
    return info.value.reason


def wrong_check_digit(national_id: str) -> str:
    return national_id[:17] + ("0" if national_id[17] != "0" else "1")


# --- a complete registration ---------------------------------------------------------------


def test_complete_registration_is_normalised() -> None:
    reg = register(
        local_id="bj.xc:2025-000123",
        name_text="  欧阳娜娜 ",
        family="欧阳",
        given="娜娜",
        gender=Gender.FEMALE,
        birth_date="1980-01-01",
        national_id=FEMALE_ID,
        phones=["+86 138 0013 8000", "010-6601-2345"],
        province="北京市",
        city="北京市",
        district="西城区",
        address_line=" 北京市西城区西直门南大街2号 ",
        postal_code="100035",
        identifiers=[Identifier(system="urn:hie:identifier:mrn", value="000123", type="MR")],
    )
    assert reg.local_id == "bj.xc:2025-000123"
    assert reg.name_text == "欧阳娜娜"
    assert (reg.family, reg.given) == ("欧阳", "娜娜")
    assert reg.birth_date == CODED_BIRTH
    assert reg.national_id == FEMALE_ID
    assert reg.phones == ("13800138000", "01066012345")
    assert reg.district == "西城区"
    assert reg.address_line == "北京市西城区西直门南大街2号"
    assert reg.identifiers == (Identifier(system="urn:hie:identifier:mrn", value="000123", type="MR"),)


def test_optional_fields_default_to_empty() -> None:
    reg = register()
    assert reg.birth_date is None
    assert reg.national_id is None
    assert reg.phones == ()
    assert reg.identifiers == ()
    assert reg.gender is Gender.UNKNOWN


# --- local id --------------------------------------------------------------------------------


@pytest.mark.parametrize("local_id", ["A", "0", "MRN-0001", "a.b_c:d-e", "X" * 64])
def test_valid_local_ids_are_kept(local_id: str) -> None:
    assert register(local_id=local_id).local_id == local_id


@pytest.mark.parametrize(
    "local_id",
    ["", "-123", ".abc", "_abc", "X" * 65, "MRN 0001", "MRN/0001", "病历号1", "MRN-0001\n", "ＭＲＮ１"],
)
def test_invalid_local_ids_are_rejected(local_id: str) -> None:
    assert reason_of(local_id=local_id) == "local-id-invalid"


# --- name ------------------------------------------------------------------------------------


def test_name_falls_back_to_family_and_given() -> None:
    assert register(name_text="", family="欧阳", given="娜娜").name_text == "欧阳娜娜"


@pytest.mark.parametrize("name", ["", "   ", "\u3000"])
def test_name_is_required(name: str) -> None:
    assert reason_of(name_text=name) == "name-missing"


def test_name_is_nfc_normalised() -> None:
    decomposed = "Zoe\u0308 王"
    reg = register(name_text=decomposed, family="Zoe\u0308")
    assert reg.name_text == "Zo\u00eb 王"
    assert reg.family == "Zo\u00eb"


@pytest.mark.parametrize(
    "name",
    ["张\x00伟", "张\n伟", "张\t伟", "张\u200b伟", "张\u202e伟", "张\ue000伟", "\x7f张伟"],
    ids=["nul", "newline", "tab", "zero-width-space", "rtl-override", "private-use", "del"],
)
def test_name_with_control_characters_is_rejected(name: str) -> None:
    assert reason_of(name_text=name) == "name-invalid"


def test_surrounding_whitespace_is_not_a_control_character_problem() -> None:
    assert register(name_text="\n张伟\t ").name_text == "张伟"


def test_name_length_limit() -> None:
    assert register(name_text="张" * 64).name_text == "张" * 64
    assert reason_of(name_text="张" * 65) == "name-too-long"


@pytest.mark.parametrize(
    ("field", "limit", "what"),
    [
        ("family", 64, "family"),
        ("given", 64, "given"),
        ("province", 32, "province"),
        ("city", 32, "city"),
        ("district", 32, "district"),
        ("address_line", 200, "address"),
        ("postal_code", 12, "postcode"),
    ],
)
def test_other_text_fields_have_limits_and_reject_control_characters(field: str, limit: int, what: str) -> None:
    assert getattr(register(**{field: "区" * limit}), field) == "区" * limit
    assert reason_of(**{field: "区" * (limit + 1)}) == f"{what}-too-long"
    assert reason_of(**{field: "西城\x07区"}) == f"{what}-invalid"


# --- birth date ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1980-01-01", datetime.date(1980, 1, 1)),
        ("1880-01-01", datetime.date(1880, 1, 1)),
        ("2000-02-29", datetime.date(2000, 2, 29)),
        ("2025-06-01", TODAY),
        ("", None),
    ],
)
def test_birth_date_is_parsed(value: str, expected: datetime.date | None) -> None:
    assert register(birth_date=value).birth_date == expected


@pytest.mark.parametrize(
    "value",
    ["1980/01/01", "01-01-1980", "1980-13-01", "1981-02-29", "yesterday", "1879-12-31", "2025-06-02"],
)
def test_bad_or_out_of_range_birth_date_is_rejected(value: str) -> None:
    assert reason_of(birth_date=value) == "birth-date-invalid"


# --- national id -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (MALE_ID, MALE_ID),
        (f"  {MALE_ID}  ", MALE_ID),
        ("110105800101001", MALE_ID),  # legacy 15-digit form: century inserted, check digit added
        (MALE_ID.translate(_FULL_WIDTH), MALE_ID),
        ("110105800101001".translate(_FULL_WIDTH), MALE_ID),
    ],
    ids=["canonical", "padded", "legacy-15", "full-width", "full-width-legacy"],
)
def test_national_id_is_normalised(raw: str, expected: str) -> None:
    assert register(national_id=raw).national_id == expected


def test_national_id_with_lower_case_x_is_upper_cased() -> None:
    # Find a body whose check character is X, so the x/X handling is exercised.
    body = next(f"110105198001010{n:02d}" for n in range(100) if check_digit(f"110105198001010{n:02d}") == "X")
    assert register(national_id=body + "x").national_id == body + "X"
    assert register(national_id=body + "ｘ").national_id == body + "X"


@pytest.mark.parametrize(
    "identifier",
    [
        Identifier(system=NATIONAL_ID_SYSTEM, value=MALE_ID, type=NATIONAL_ID_TYPE),
        Identifier(system="urn:some:other-authority", value=MALE_ID, type=NATIONAL_ID_TYPE),
        Identifier(system=NATIONAL_ID_SYSTEM, value=MALE_ID),
    ],
    ids=["system-and-type", "type-only", "system-only"],
)
def test_national_id_given_as_identifier(identifier: Identifier) -> None:
    reg = register(identifiers=[identifier])
    assert reg.national_id == MALE_ID
    assert reg.identifiers == ()  # it is not kept as an ordinary identifier


def test_same_national_id_twice_in_different_forms_is_not_a_conflict() -> None:
    reg = register(
        national_id="110105800101001",
        identifiers=[Identifier(system=NATIONAL_ID_SYSTEM, value=MALE_ID, type=NATIONAL_ID_TYPE)],
    )
    assert reg.national_id == MALE_ID


@pytest.mark.parametrize(
    "identifiers",
    [
        [Identifier(system=NATIONAL_ID_SYSTEM, value=OTHER_ID, type=NATIONAL_ID_TYPE)],
        [Identifier(system="urn:x", value=OTHER_ID, type=NATIONAL_ID_TYPE)],
    ],
)
def test_two_different_national_ids_conflict(identifiers: list[Identifier]) -> None:
    assert reason_of(national_id=MALE_ID, identifiers=identifiers) == "national-id-conflict"


def test_two_different_national_id_identifiers_conflict() -> None:
    identifiers = [
        Identifier(system=NATIONAL_ID_SYSTEM, value=MALE_ID, type=NATIONAL_ID_TYPE),
        Identifier(system=NATIONAL_ID_SYSTEM, value=FEMALE_ID, type=NATIONAL_ID_TYPE),
    ]
    assert reason_of(identifiers=identifiers) == "national-id-conflict"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (wrong_check_digit(MALE_ID), "national-id-check_digit"),
        ("9901051980010100" + "1" + check_digit("99010519800101001"), "national-id-region"),
        ("11010519801301001" + check_digit("11010519801301001"), "national-id-birth_date"),
        ("11010520300101001" + check_digit("11010520300101001"), "national-id-birth_date"),
        ("1101051980010100", "national-id-format"),
        ("11010519800101001A", "national-id-format"),
        ("   ", "national-id-format"),
    ],
    ids=["check-digit", "region", "bad-date", "future-date", "too-short", "bad-check-char", "blank"],
)
def test_invalid_national_id_reason_and_message_without_digits(raw: str, reason: str) -> None:
    for kwargs in (
        {"national_id": raw},
        {"identifiers": [Identifier(system=NATIONAL_ID_SYSTEM, value=raw, type=NATIONAL_ID_TYPE)]},
    ):
        with pytest.raises(InvalidArgument) as info:
            register(**kwargs)
        assert info.value.reason == reason
        assert not any(ch.isdigit() for ch in str(info.value))
        assert not any(ch.isdigit() for ch in info.value.message)


# --- phones ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("13800138000", "13800138000"),
        ("+8613800138000", "13800138000"),
        ("+86 138 0013 8000", "13800138000"),
        ("+86-138-0013-8000", "13800138000"),
        ("138 0013 8000", "13800138000"),
        ("010-6601-2345", "01066012345"),
        ("  13800138000  ", "13800138000"),
        ("+1 415 555 0100", "+14155550100"),  # only the mainland country code is dropped
    ],
)
def test_phone_is_normalised(raw: str, expected: str) -> None:
    assert normalize_phone(raw) == expected
    assert register(phones=[raw]).phones == (expected,)


@pytest.mark.parametrize(
    "raw",
    ["", "12345", "(010) 6601 2345", "138.0013.8000", "1" * 21, "-13800138000", "++8613800138000", "电话"],
)
def test_invalid_phone_is_rejected(raw: str) -> None:
    assert reason_of(phones=[raw]) == "phone-invalid"


@pytest.mark.parametrize("raw", ["+86 -----", "1-----", "9 - - -"])
def test_phone_without_enough_digits_is_rejected(raw: str) -> None:
    assert reason_of(phones=[raw]) == "phone-invalid"


def test_same_phone_in_two_spellings_is_kept_once() -> None:
    reg = register(phones=["13800138000", "+86 138 0013 8000", "010-6601-2345"])
    assert reg.phones == ("13800138000", "01066012345")


def test_at_most_five_phones() -> None:
    five = [f"1380013800{n}" for n in range(5)]
    assert len(register(phones=five).phones) == 5
    assert reason_of(phones=[*five, "13800138009"]) == "phone-invalid"


# --- other identifiers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "identifier",
    [
        Identifier(system="", value="000123"),
        Identifier(system="urn:hie:identifier:mrn", value=""),
        Identifier(system="urn:hie:identifier:mrn", value="x" * 129),
        Identifier(system="urn:" + "x" * 253, value="000123"),
    ],
    ids=["no-system", "no-value", "value-too-long", "system-too-long"],
)
def test_other_identifiers_need_system_and_value(identifier: Identifier) -> None:
    assert reason_of(identifiers=[identifier]) == "identifier-invalid"


def test_other_identifiers_at_their_limits_are_kept() -> None:
    ident = Identifier(system="urn:" + "x" * 252, value="x" * 128, type="MR")
    assert register(identifiers=[ident]).identifiers == (ident,)


# --- national_id_agrees ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("national_id", "birth_date", "gender", "agrees"),
    [
        (MALE_ID, "1980-01-01", Gender.MALE, True),
        (FEMALE_ID, "1980-01-01", Gender.FEMALE, True),
        (MALE_ID, "", Gender.UNKNOWN, True),
        (MALE_ID, "", Gender.OTHER, True),
        (MALE_ID, "1980-01-02", Gender.MALE, False),
        (MALE_ID, "1980-01-01", Gender.FEMALE, False),
        (FEMALE_ID, "", Gender.MALE, False),
        ("", "1980-01-01", Gender.MALE, False),
    ],
)
def test_national_id_agrees(national_id: str, birth_date: str, gender: Gender, agrees: bool) -> None:
    reg = register(national_id=national_id, birth_date=birth_date, gender=gender)
    assert national_id_agrees(reg) is agrees


# --- decide_link -----------------------------------------------------------------------------

KNOWN = EnterpriseId("7b1c2f56-0000-4000-8000-000000000001")


def candidate(**overrides: object) -> Candidate:
    base = Candidate(
        enterprise_id=KNOWN, national_id=MALE_ID, birth_date=CODED_BIRTH, gender=Gender.MALE, name_text="张伟"
    )
    return dataclasses.replace(base, **overrides)


def male_registration(**overrides: object) -> Registration:
    fields: dict[str, object] = {
        "national_id": MALE_ID,
        "birth_date": "1980-01-01",
        "gender": Gender.MALE,
        "local_id": "XW-88",
        "domain": "urn:hie:org:bj-xuanwu-hospital",
    }
    fields.update(overrides)
    return register(**fields)


@pytest.mark.parametrize(
    ("theirs", "ours", "links"),
    [
        ("张伟", "张伟", True),
        ("张 伟", "张伟", True),
        ("Zhang Wei", "zhang wei", True),
        ("张伟", "章伟", False),
        ("张伟", "Zhang Wei", False),
        ("张伟", "李娜", False),
    ],
)
def test_equal_national_id_links_only_when_the_names_are_the_same(theirs: str, ours: str, links: bool) -> None:
    """Same national id, different names: never an automatic link (steward review decides)."""
    decision = decide_link(male_registration(name_text=ours), [candidate(name_text=theirs)])
    assert (decision.method is LinkMethod.NATIONAL_ID) is links


def test_equal_national_id_with_agreeing_birth_date_and_gender_links() -> None:
    decision = decide_link(male_registration(), [candidate()])
    assert decision.method is LinkMethod.NATIONAL_ID
    assert decision.enterprise_id == KNOWN


def test_link_picks_the_candidate_with_the_equal_national_id() -> None:
    other = candidate(enterprise_id=EnterpriseId("other"), national_id=OTHER_ID)
    decision = decide_link(male_registration(), [other, candidate()])
    assert decision == decide_link(male_registration(), [candidate()])
    assert decision.enterprise_id == KNOWN


@pytest.mark.parametrize(
    ("registration_overrides", "candidate_overrides"),
    [
        ({"gender": Gender.UNKNOWN}, {}),
        ({"gender": Gender.OTHER}, {}),
        ({}, {"gender": Gender.UNKNOWN}),
        ({}, {"gender": Gender.OTHER}),
        ({"birth_date": ""}, {}),
        ({}, {"birth_date": None}),
        ({"birth_date": "", "gender": Gender.UNKNOWN}, {"birth_date": None, "gender": Gender.UNKNOWN}),
    ],
    ids=[
        "reg-gender-unknown",
        "reg-gender-other",
        "cand-gender-unknown",
        "cand-gender-other",
        "reg-no-birth-date",
        "cand-no-birth-date",
        "nothing-but-the-id",
    ],
)
def test_missing_or_unknown_attributes_do_not_block_a_link(
    registration_overrides: dict[str, object], candidate_overrides: dict[str, object]
) -> None:
    decision = decide_link(male_registration(**registration_overrides), [candidate(**candidate_overrides)])
    assert decision.method is LinkMethod.NATIONAL_ID
    assert decision.enterprise_id == KNOWN


@pytest.mark.parametrize(
    ("registration_overrides", "candidate_overrides"),
    [
        ({"birth_date": "1980-01-02"}, {"birth_date": datetime.date(1980, 1, 2)}),
        ({}, {"birth_date": datetime.date(1980, 1, 2)}),
        ({"gender": Gender.FEMALE}, {"gender": Gender.FEMALE}),
        ({}, {"gender": Gender.FEMALE}),
        ({}, {"national_id": OTHER_ID}),
        ({}, {"national_id": None}),
        ({"national_id": ""}, {}),
        ({"national_id": ""}, {"national_id": None}),
    ],
    ids=[
        "declared-birth-date-disagrees-with-id",
        "candidate-birth-date-differs",
        "declared-gender-disagrees-with-id",
        "candidate-gender-differs",
        "different-national-id",
        "candidate-without-national-id",
        "registration-without-national-id",
        "neither-has-national-id",
    ],
)
def test_doubtful_pairs_get_a_new_enterprise_id(
    registration_overrides: dict[str, object], candidate_overrides: dict[str, object]
) -> None:
    decision = decide_link(male_registration(**registration_overrides), [candidate(**candidate_overrides)])
    assert decision.method is LinkMethod.NEW
    assert decision.enterprise_id != KNOWN


def test_no_candidates_means_new() -> None:
    assert decide_link(male_registration(), []).method is LinkMethod.NEW


@pytest.mark.parametrize(
    ("registration_overrides", "candidate_overrides"),
    [
        ({"birth_date": ""}, {"birth_date": datetime.date(1975, 5, 5)}),
        ({"gender": Gender.UNKNOWN}, {"gender": Gender.FEMALE}),
    ],
    ids=["candidate-birth-date-contradicts-id", "candidate-gender-contradicts-id"],
)
def test_candidate_contradicting_the_coded_values_is_not_linked(
    registration_overrides: dict[str, object], candidate_overrides: dict[str, object]
) -> None:
    decision = decide_link(male_registration(**registration_overrides), [candidate(**candidate_overrides)])
    assert decision.method is LinkMethod.NEW


def test_each_new_decision_has_a_fresh_enterprise_id() -> None:
    reg = male_registration(national_id="")
    ids = {decide_link(reg, []).enterprise_id for _ in range(50)}
    assert len(ids) == 50
    assert all(len(i) == 36 and i.count("-") == 4 for i in ids)


# --- the review claim lease ----------------------------------------------------------------------


def test_claim_lease_defaults_to_thirty_minutes_and_reads_its_setting() -> None:
    assert claim_lease(None).seconds == claim_lease("").seconds == 30 * 60
    assert claim_lease(" 90 ").seconds == 90
    lease = claim_lease("600")
    claimed = datetime.datetime(2026, 12, 8, 9, 0, tzinfo=datetime.UTC)
    assert lease.expires(claimed) == claimed + datetime.timedelta(minutes=10)
    assert lease.live(claimed, claimed + datetime.timedelta(seconds=599))
    assert not lease.live(claimed, claimed + datetime.timedelta(seconds=600))
    assert lease.lapsed_before(claimed + datetime.timedelta(seconds=600)) == claimed


@pytest.mark.parametrize("setting", ["0", "-5", "1.5", "abc", "３０", str(31 * 24 * 3600)])
def test_claim_lease_refuses_a_bad_setting(setting: str) -> None:
    with pytest.raises(ValueError, match="whole seconds"):
        claim_lease(setting)
