"""Unit tests for services.shared.gb11643 (GB 11643-1999 citizen identity numbers)."""

from __future__ import annotations

import datetime
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.shared import gb11643
from services.shared.gb11643 import (
    InvalidNationalId,
    birth_date,
    check_digit,
    from_legacy,
    gender,
    is_valid,
    mask,
    normalize,
)

# All ids below are synthetic; the first two are the worked examples commonly quoted for the standard.
TODAY = datetime.date(2025, 1, 1)

VALID_IDS = [
    "11010519491231002X",  # GB 11643-1999's own example (北京 西城区, check character X)
    "440524188001010014",  # 广东 汕头, born on the 1880-01-01 floor
    "11010119900307002X",  # another X check character
    "110101199003070011",
    "310104198506150031",  # 上海 徐汇区
    "440306199202290040",  # 深圳, leap day
    "510107200001011235",  # 成都
    "650102197511200516",  # 乌鲁木齐
    "532627196307071571",  # 云南 文山
    "210202202311300333",  # 大连, recent birth
    "460003199912319993",  # 海南, sequence 999
    "810000199807080024",  # 香港居民居住证
    "820000200103150079",  # 澳门居民居住证
    "830000198901010099",  # 台湾居民居住证
]

# (id, birth date, gender)
DEMOGRAPHICS = [
    ("11010519491231002X", datetime.date(1949, 12, 31), "female"),
    ("440524188001010014", datetime.date(1880, 1, 1), "male"),
    ("110101199003070011", datetime.date(1990, 3, 7), "male"),
    ("11010119900307002X", datetime.date(1990, 3, 7), "female"),
    ("440306199202290040", datetime.date(1992, 2, 29), "female"),
    ("510107200001011235", datetime.date(2000, 1, 1), "male"),
    ("650102197511200516", datetime.date(1975, 11, 20), "male"),
    ("460003199912319993", datetime.date(1999, 12, 31), "male"),
]

# (legacy 15-digit id, expected 18-character id)
LEGACY_IDS = [
    ("110105491231002", "11010519491231002X"),
    ("440524800101001", "440524198001010013"),
    ("310104850615003", "310104198506150031"),
    ("510107751120051", "510107197511200517"),
    ("110101900307002", "11010119900307002X"),
]

# Province-level prefixes as specified for the module (GB/T 2260 + 81/82/83 residence permits).
PROVINCE_CODES = sorted(
    f"{code:02d}"
    for code in (
        *range(11, 16),
        *range(21, 24),
        *range(31, 38),
        *range(41, 47),
        *range(50, 55),
        *range(61, 66),
        71,
        81,
        82,
        83,
    )
)
BAD_PROVINCE_CODES = sorted({f"{code:02d}" for code in range(100)} - set(PROVINCE_CODES))

CHECK_CHARS = "0123456789X"
FULL_WIDTH = str.maketrans("0123456789X", "０１２３４５６７８９Ｘ")


def reference_check_digit(body17: str) -> str:
    """ISO 7064 MOD 11-2 by its recursive (Horner) definition, independent of the module's weights."""
    p = 0
    for ch in body17:
        p = ((p + int(ch)) * 2) % 11
    value = (12 - p) % 11
    return "X" if value == 10 else str(value)


def make_id(area: str, born: str, seq: str) -> str:
    body = f"{area}{born}{seq}"
    return body + reference_check_digit(body)


def reason_of(raw: str, *, today: datetime.date | None = TODAY) -> str:
    with pytest.raises(InvalidNationalId) as excinfo:
        normalize(raw, today=today)
    return excinfo.value.reason


def assert_no_leak(exc: InvalidNationalId) -> None:
    text = f"{exc} {exc!r} {exc.args!r}"
    assert not any(ch.isdigit() for ch in text), text
    assert exc.__cause__ is None


# --- check_digit --------------------------------------------------------------------------------------


def test_weights_follow_the_standards_formula() -> None:
    # Wi = 2^(i-1) (mod 11) for positions i = 18 .. 2 counted from the right.
    assert tuple(2 ** (i - 1) % 11 for i in range(18, 1, -1)) == gb11643._WEIGHTS
    assert gb11643._WEIGHTS == (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


@pytest.mark.parametrize("national_id", VALID_IDS)
def test_check_digit_of_known_ids(national_id: str) -> None:
    assert check_digit(national_id[:17]) == national_id[17]
    assert reference_check_digit(national_id[:17]) == national_id[17]


@pytest.mark.parametrize(
    ("weighted_sum_mod_11", "expected"),
    list(zip(range(11), "10X98765432", strict=True)),
)
def test_check_digit_mapping_table(weighted_sum_mod_11: int, expected: str) -> None:
    # Only the last two body digits (weights 4 and 2) are non-zero; find a pair hitting each residue.
    for tail in range(100):
        body = f"{'0' * 15}{tail:02d}"
        if (int(body[15]) * 4 + int(body[16]) * 2) % 11 == weighted_sum_mod_11:
            assert check_digit(body) == expected
            return
    pytest.fail("no body found for residue")


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "1101051949123100",  # 16 digits
        "110105194912310023",  # 18 digits
        "11010519491231002X",  # contains X
        "1101051949123100a",
        " 1101051949123100",
        "１１０１０５１９４９１２３１００２",  # full-width digits are only accepted by normalize()
        "١١٠١٠٥١٩٤٩١٢٣١٠٠٢",  # Arabic-Indic digits: str.isdigit() but not ASCII
    ],
)
def test_check_digit_rejects_non_17_ascii_digits(bad: str) -> None:
    with pytest.raises(InvalidNationalId) as excinfo:
        check_digit(bad)
    assert excinfo.value.reason == "format"
    assert_no_leak(excinfo.value)


# --- valid ids and input normalisation ------------------------------------------------------------------


@pytest.mark.parametrize("national_id", VALID_IDS)
def test_valid_ids_accepted(national_id: str) -> None:
    assert normalize(national_id, today=TODAY) == national_id
    assert normalize(national_id) == national_id  # default today
    assert is_valid(national_id, today=TODAY)
    assert is_valid(national_id)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("11010519491231002x", "11010519491231002X"),  # lowercase x
        ("11010519491231002ｘ", "11010519491231002X"),  # full-width lowercase x
        ("11010519491231002Ｘ", "11010519491231002X"),  # full-width X
        ("１１０１０５１９４９１２３１００２Ｘ", "11010519491231002X"),  # all full-width
        ("４４０５２４１８８００１０１００１４", "440524188001010014"),
        ("4405241880０１０１００１４", "440524188001010014"),  # mixed widths
        ("  440524188001010014  ", "440524188001010014"),
        ("\t11010519491231002x\n", "11010519491231002X"),
        ("\u300011010519491231002X\u3000", "11010519491231002X"),  # ideographic space
        (" ４４０５２４８００１０１００１ ", "440524198001010013"),  # full-width legacy
    ],
)
def test_normalize_canonicalises_input(raw: str, expected: str) -> None:
    assert normalize(raw, today=TODAY) == expected
    assert is_valid(raw, today=TODAY)


@pytest.mark.parametrize("national_id", VALID_IDS)
def test_normalize_is_idempotent(national_id: str) -> None:
    once = normalize(national_id.lower().translate(FULL_WIDTH), today=TODAY)
    assert normalize(once, today=TODAY) == once == national_id


# --- single substitutions and transpositions ------------------------------------------------------------


@pytest.mark.parametrize("national_id", VALID_IDS)
def test_every_single_digit_substitution_is_rejected(national_id: str) -> None:
    # MOD 11-2 with weights that are all non-zero mod 11 (a prime) detects every single substitution.
    altered_count = 0
    for position in range(17):
        for digit in string.digits:
            if digit == national_id[position]:
                continue
            altered = f"{national_id[:position]}{digit}{national_id[position + 1 :]}"
            assert not is_valid(altered, today=TODAY), (position, digit)
            altered_count += 1
            if position >= 14:
                # The sequence code is never checked by anything but the check character.
                assert reason_of(altered) == "check_digit"
    assert altered_count == 17 * 9


@pytest.mark.parametrize("national_id", VALID_IDS)
def test_every_wrong_check_character_is_rejected(national_id: str) -> None:
    wrong = [ch for ch in CHECK_CHARS if ch != national_id[17]]
    assert len(wrong) == 10
    for ch in wrong:
        altered = national_id[:17] + ch
        assert not is_valid(altered, today=TODAY)
        assert reason_of(altered) == "check_digit"
        assert reason_of(altered.lower()) == "check_digit"


@pytest.mark.parametrize("national_id", VALID_IDS)
def test_adjacent_transpositions_are_rejected(national_id: str) -> None:
    # Adjacent weights (including the check character's weight 1) are pairwise different mod 11, so
    # swapping two different adjacent characters always changes the weighted sum.
    swaps = 0
    for position in range(17):
        a, b = national_id[position], national_id[position + 1]
        if a == b:
            continue
        swapped = f"{national_id[:position]}{b}{a}{national_id[position + 2 :]}"
        assert not is_valid(swapped, today=TODAY), position
        swaps += 1
    assert swaps > 0


def test_transposition_detection_holds_for_all_digit_pairs() -> None:
    weights = (*gb11643._WEIGHTS, 1)
    for position in range(17):
        assert (weights[position] - weights[position + 1]) % 11 != 0
    body = "11010519491231002"
    for position in range(16):
        for a in string.digits:
            for b in string.digits:
                if a == b:
                    continue
                first = f"{body[:position]}{a}{b}{body[position + 2 :]}"
                second = f"{body[:position]}{b}{a}{body[position + 2 :]}"
                assert check_digit(first) != check_digit(second)


# --- legacy 15-digit ids --------------------------------------------------------------------------------


@pytest.mark.parametrize(("legacy", "expected"), LEGACY_IDS)
def test_legacy_ids_are_converted(legacy: str, expected: str) -> None:
    assert from_legacy(legacy) == expected
    assert normalize(legacy, today=TODAY) == expected
    assert normalize(f" {legacy} ", today=TODAY) == expected
    assert is_valid(legacy, today=TODAY)


@pytest.mark.parametrize(
    ("legacy", "reason"),
    [
        ("110105490230002", "birth_date"),  # Feb 30
        ("110105491301002", "birth_date"),  # month 13
        ("110105000229002", "birth_date"),  # 1900 is not a leap year
        ("990105491231002", "region"),
        ("000105491231002", "region"),
        ("11010549123100X", "format"),  # legacy ids have no check character
        ("11010549123100", "format"),
        ("1101054912310021", "format"),
        ("11010549-231002", "format"),
    ],
)
def test_invalid_legacy_ids_are_rejected(legacy: str, reason: str) -> None:
    assert reason_of(legacy) == reason
    if len(legacy) == 15 and reason != "format":
        with pytest.raises(InvalidNationalId) as excinfo:
            from_legacy(legacy)
        assert excinfo.value.reason == reason
        assert_no_leak(excinfo.value)


@pytest.mark.parametrize("bad", ["11010519491231002X", "１１０１０５４９１２３１００２", "", "11010549123100"])
def test_from_legacy_requires_exactly_15_ascii_digits(bad: str) -> None:
    with pytest.raises(InvalidNationalId) as excinfo:
        from_legacy(bad)
    assert excinfo.value.reason == "format"


# --- birth date rules -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "born",
    [
        "19490230",  # Feb 30
        "19490231",
        "19990229",  # not a leap year
        "19000229",  # century, not a leap year
        "19991301",  # month 13
        "19990001",  # month 0
        "19990100",  # day 0
        "19990132",  # day 32
        "19990431",  # April has 30 days
        "18791231",  # before the 1880-01-01 floor
        "00000101",
        "20250102",  # after TODAY
        "29991231",  # far future
    ],
)
def test_invalid_birth_dates_are_rejected(born: str) -> None:
    national_id = make_id("110105", born, "002")  # correct check character, so only the date is wrong
    assert reason_of(national_id) == "birth_date"
    assert not is_valid(national_id, today=TODAY)


@pytest.mark.parametrize("born", ["20000229", "19960229", "18800101", "19491231", "20250101"])
def test_edge_birth_dates_are_accepted(born: str) -> None:
    national_id = make_id("110105", born, "002")
    assert normalize(national_id, today=TODAY) == national_id


def test_future_birth_date_relative_to_today() -> None:
    today = datetime.date(2024, 6, 1)
    born_today = make_id("320102", "20240601", "123")
    born_tomorrow = make_id("320102", "20240602", "123")
    assert normalize(born_today, today=today) == born_today
    assert reason_of(born_tomorrow, today=today) == "birth_date"
    # ...and the same id becomes valid once that day has come.
    assert is_valid(born_tomorrow, today=datetime.date(2024, 6, 2))


def test_default_today_rejects_future_dates() -> None:
    future = datetime.date.today() + datetime.timedelta(days=400)
    national_id = make_id("110105", future.strftime("%Y%m%d"), "001")
    assert reason_of(national_id, today=None) == "birth_date"
    assert not is_valid(national_id)


# --- region rules ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("province", PROVINCE_CODES)
def test_every_valid_province_code_is_accepted(province: str) -> None:
    national_id = make_id(f"{province}0102", "19800101", "001")
    assert normalize(national_id, today=TODAY) == national_id


@pytest.mark.parametrize("province", BAD_PROVINCE_CODES)
def test_invalid_province_codes_are_rejected(province: str) -> None:
    national_id = make_id(f"{province}0102", "19800101", "001")
    assert reason_of(national_id) == "region"


def test_foreigner_permanent_residence_ids_are_not_resident_ids() -> None:
    # The 2023 foreigners' permanent residence id card starts with 9.
    national_id = make_id("911101", "19800101", "001")
    assert reason_of(national_id) == "region"


# --- format rules ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "   ",
        "1",
        "11010519491231",  # 14
        "1101051949123100",  # 16
        "11010519491231002",  # 17: check character missing
        "11010519491231002X1",  # 19
        "110105194912310021X",  # 19
        "1101051949123100XX",  # X outside the last position
        "X10105194912310022",
        "11010519491231002Y",
        "1101051949123I002X",  # letter I for digit 1
        "11010519491231OO2X",  # letter O for digit 0
        "110105-19491231-002X",
        "110105 19491231 002X",
        "110105194912310O2",  # 17 chars
        "11010519491231002*",
        "11010519491231002\u00d7",  # multiplication sign ×
        "١١٠١٠٥١٩٤٩١٢٣١٠٠٢X",  # Arabic-Indic digits
        "110105491231002X",  # 16: legacy plus X
        "11010549123100x",  # legacy with x
    ],
)
def test_malformed_input_is_rejected_as_format(bad: str) -> None:
    assert reason_of(bad) == "format"
    assert not is_valid(bad)


def test_non_string_input_is_rejected_as_format() -> None:
    with pytest.raises(InvalidNationalId) as excinfo:
        normalize(11010519491231002)  # type: ignore[arg-type]
    assert excinfo.value.reason == "format"
    assert not is_valid(None)  # type: ignore[arg-type]


# --- exception contract ---------------------------------------------------------------------------------


def test_exception_is_a_value_error_with_reason() -> None:
    exc = InvalidNationalId("check_digit")
    assert isinstance(exc, ValueError)
    assert exc.reason == "check_digit"
    assert str(exc) == "national id check digit does not match"
    with pytest.raises(ValueError, match="unknown"):
        InvalidNationalId("nonsense")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("11010519491231002Y", "format"),
        ("12345", "format"),
        ("991101198001010012", "region"),
        (make_id("110105", "19490230", "002"), "birth_date"),
        (make_id("110105", "19491301", "002"), "birth_date"),
        ("110105194912310021", "check_digit"),
        ("110105490230002", "birth_date"),
    ],
)
def test_error_messages_never_contain_the_input(raw: str, reason: str) -> None:
    with pytest.raises(InvalidNationalId) as excinfo:
        normalize(raw, today=TODAY)
    assert excinfo.value.reason == reason
    assert_no_leak(excinfo.value)
    assert raw not in str(excinfo.value)


# --- birth_date / gender / mask -------------------------------------------------------------------------


@pytest.mark.parametrize(("national_id", "born", "sex"), DEMOGRAPHICS)
def test_birth_date_and_gender(national_id: str, born: datetime.date, sex: str) -> None:
    assert birth_date(national_id) == born
    assert gender(national_id) == sex


@pytest.mark.parametrize(
    ("raw", "born", "sex"),
    [
        ("110105491231002", datetime.date(1949, 12, 31), "female"),  # legacy: 15th digit is the sequence end
        ("440524800101001", datetime.date(1980, 1, 1), "male"),
        ("11010519491231002x", datetime.date(1949, 12, 31), "female"),
    ],
)
def test_birth_date_and_gender_of_unnormalized_input(raw: str, born: datetime.date, sex: str) -> None:
    assert birth_date(raw) == born
    assert gender(raw) == sex


@pytest.mark.parametrize("digit", string.digits)
def test_gender_follows_parity_of_17th_digit(digit: str) -> None:
    national_id = make_id("110105", "19900101", f"00{digit}")
    assert gender(national_id) == ("male" if int(digit) % 2 else "female")


@pytest.mark.parametrize("bad", ["110105194912310021", "11010519491231", "991101198001010012"])
def test_birth_date_and_gender_reject_invalid_ids(bad: str) -> None:
    with pytest.raises(InvalidNationalId):
        birth_date(bad)
    with pytest.raises(InvalidNationalId):
        gender(bad)


@pytest.mark.parametrize(
    ("national_id", "masked"),
    [
        ("11010519491231002X", "110105********002X"),
        ("440524188001010014", "440524********0014"),
        ("110101199003071234", "110101********1234"),
    ],
)
def test_mask_keeps_first_6_and_last_4(national_id: str, masked: str) -> None:
    assert mask(national_id) == masked
    assert len(mask(national_id)) == 18
    assert national_id[6:14] not in mask(national_id)


@pytest.mark.parametrize(
    "raw",
    ["", "1", "110105491231002", "11010519491231002", "11010519491231002X1", " 11010519491231002X"],
)
def test_mask_hides_everything_when_not_18_chars(raw: str) -> None:
    assert mask(raw) == "*" * len(raw)


# --- property-based tests -------------------------------------------------------------------------------

area_codes = st.builds(
    lambda province, rest: province + rest,
    st.sampled_from(PROVINCE_CODES),
    st.text(alphabet=string.digits, min_size=4, max_size=4),
)
birth_dates = st.dates(min_value=datetime.date(1880, 1, 1), max_value=TODAY)
sequences = st.integers(min_value=0, max_value=999).map(lambda n: f"{n:03d}")


@st.composite
def valid_ids(draw: st.DrawFn) -> str:
    body = draw(area_codes) + draw(birth_dates).strftime("%Y%m%d") + draw(sequences)
    return body + check_digit(body)


@settings(max_examples=200, deadline=None)
@given(national_id=valid_ids())
def test_property_built_ids_normalize_to_themselves(national_id: str) -> None:
    assert normalize(national_id, today=TODAY) == national_id
    assert normalize(national_id.lower().translate(FULL_WIDTH), today=TODAY) == national_id
    assert birth_date(national_id) == datetime.date(
        int(national_id[6:10]), int(national_id[10:12]), int(national_id[12:14])
    )


@settings(max_examples=100, deadline=None)
@given(national_id=valid_ids())
def test_property_any_single_digit_change_is_invalid(national_id: str) -> None:
    for position in range(18):
        for replacement in CHECK_CHARS if position == 17 else string.digits:
            if replacement == national_id[position]:
                continue
            altered = f"{national_id[:position]}{replacement}{national_id[position + 1 :]}"
            assert not is_valid(altered, today=TODAY), (position, replacement)


@settings(max_examples=200, deadline=None)
@given(
    national_id=valid_ids(),
    position=st.integers(min_value=0, max_value=17),
    data=st.data(),
)
def test_property_single_change_reports_a_reason(national_id: str, position: int, data: st.DataObject) -> None:
    alphabet = CHECK_CHARS if position == 17 else string.digits
    replacement = data.draw(st.sampled_from([ch for ch in alphabet if ch != national_id[position]]))
    altered = f"{national_id[:position]}{replacement}{national_id[position + 1 :]}"
    with pytest.raises(InvalidNationalId) as excinfo:
        normalize(altered, today=TODAY)
    assert excinfo.value.reason in {"region", "birth_date", "check_digit"}
    assert_no_leak(excinfo.value)


@settings(max_examples=300, deadline=None)
@given(body=st.text(alphabet=string.digits, min_size=17, max_size=17))
def test_property_check_digit_matches_iso7064_reference(body: str) -> None:
    assert check_digit(body) == reference_check_digit(body)


@settings(max_examples=200, deadline=None)
@given(
    area=area_codes,
    born=st.dates(min_value=datetime.date(1900, 1, 1), max_value=datetime.date(1999, 12, 31)),
    seq=sequences,
)
def test_property_legacy_conversion(area: str, born: datetime.date, seq: str) -> None:
    legacy = f"{area}{born.strftime('%y%m%d')}{seq}"
    expected = make_id(area, born.strftime("%Y%m%d"), seq)
    assert from_legacy(legacy) == expected
    assert normalize(legacy, today=TODAY) == expected


@settings(max_examples=300, deadline=None)
@given(raw=st.text(max_size=25))
def test_property_arbitrary_text_only_raises_invalid_national_id(raw: str) -> None:
    error: InvalidNationalId | None = None
    try:
        result = normalize(raw, today=TODAY)
    except InvalidNationalId as exc:
        error = exc
    if error is not None:
        assert error.reason in {"format", "region", "birth_date", "check_digit"}
        assert_no_leak(error)
    else:
        assert len(result) == 18
        assert is_valid(result, today=TODAY)
    assert len(mask(raw)) == len(raw)
