"""GB 11643-1999 citizen identity number (居民身份证号码) parsing, validation and masking."""

from __future__ import annotations

import datetime
import functools
from typing import Final, Literal

__all__ = [
    "InvalidNationalId",
    "Reason",
    "birth_date",
    "check_digit",
    "from_legacy",
    "gender",
    "is_valid",
    "mask",
    "normalize",
]

Reason = Literal["format", "region", "birth_date", "check_digit"]

# Messages are fixed per reason, and contain no digits at all, so that no part of the id number (personal
# data) can ever end up in an exception message, a log line or an API error body.
_MESSAGES: Final[dict[str, str]] = {
    "format": "national id has an invalid format or length",
    "region": "national id region code is not a valid province-level code",
    "birth_date": "national id birth date is not a valid past date",
    "check_digit": "national id check digit does not match",
}

# GB 11643-1999: "∑(ai×Wi)(mod 11) ... Wi 表示第i位置上的加权因子，其数值依据公式 Wi = 2^(i-1) (mod 11)
# 计算得出", where i counts positions from the right with the check character at i = 1.  These are the
# weights for i = 18 .. 2, i.e. for the 17 body digits read left to right.
_WEIGHTS: Final[tuple[int, ...]] = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)

# ISO 7064:1983 MOD 11-2 as used by GB 11643-1999: check character for S = ∑(ai×Wi) mod 11 = 0..10.
# "当校验码值为10时用罗马数字符X表示" - a value of 10 is written as the Roman numeral X.
_CHECK_CHARS: Final[str] = "10X98765432"

# Province-level prefixes of the GB/T 2260 administrative division code (地址码 first two digits), plus
# 81/82/83, used for the residence permits of Hong Kong, Macao and Taiwan residents (港澳台居民居住证).
# 91.. (and any other 9x) is the 2023 foreigners' permanent residence id card, which is not a resident id.
_PROVINCE_CODES: Final[frozenset[str]] = frozenset(
    f"{code:02d}"
    for code in (
        *range(11, 16),  # 北京 天津 河北 山西 内蒙古
        *range(21, 24),  # 辽宁 吉林 黑龙江
        *range(31, 38),  # 上海 江苏 浙江 安徽 福建 江西 山东
        *range(41, 47),  # 河南 湖北 湖南 广东 广西 海南
        *range(50, 55),  # 重庆 四川 贵州 云南 西藏
        *range(61, 66),  # 陕西 甘肃 青海 宁夏 新疆
        71,  # 台湾
        81,  # 香港
        82,  # 澳门
        83,  # 台湾居民居住证
    )
)

# Not part of the standard: a sanity floor for the 出生日期码 that excludes obvious garbage years.
_EARLIEST_BIRTH_DATE: Final[datetime.date] = datetime.date(1880, 1, 1)


# Full-width digits ０-９ (U+FF10..U+FF19) and the x/X variants are mapped to ASCII; X is upper-cased.
_TRANSLATION: Final[dict[int, str]] = {
    **{0xFF10 + d: str(d) for d in range(10)},
    ord("ｘ"): "X",
    ord("Ｘ"): "X",
    ord("x"): "X",
}


class InvalidNationalId(ValueError):
    """Raised when a national id number is malformed or fails a GB 11643-1999 rule.

    ``reason`` is a short machine-readable code: "format", "region", "birth_date" or "check_digit".
    The message is a fixed text per reason and never contains the id number or any part of it.
    """

    reason: Reason

    def __init__(self, reason: Reason) -> None:
        if reason not in _MESSAGES:
            raise ValueError(f"unknown InvalidNationalId reason: {reason!r}")
        super().__init__(_MESSAGES[reason])
        self.reason = reason


def _is_ascii_digits(value: str, length: int) -> bool:
    # On an ASCII string isdigit() is exactly 0-9 (superscripts and other digits are not ASCII).
    return len(value) == length and value.isascii() and value.isdigit()


def check_digit(first17: str) -> str:
    """Return the GB 11643-1999 (ISO 7064 MOD 11-2) check character ("0"-"9" or "X") for 17 body digits.

    Raises InvalidNationalId("format") unless ``first17`` is exactly 17 ASCII digits.
    """
    if not isinstance(first17, str) or not _is_ascii_digits(first17, 17):
        raise InvalidNationalId("format")
    # "∑(ai×Wi)(mod 11)": ai is the digit value at position i, Wi its weighting factor.
    total = sum(int(digit) * weight for digit, weight in zip(first17, _WEIGHTS, strict=True))
    return _CHECK_CHARS[total % 11]


def _validate_region(body17: str) -> None:
    # GB 11643-1999: "地址码 表示编码对象常住户口所在县（市、旗、区）的行政区划代码，按GB/T 2260的规定执行".
    # Only the province-level part is checked; county codes change too often to hard-code.
    if body17[:2] not in _PROVINCE_CODES:
        raise InvalidNationalId("region")


def _parse_birth_date(body17: str, today: datetime.date | None) -> datetime.date:
    # GB 11643-1999: "出生日期码 表示编码对象出生的年、月、日，按GB/T 7408的规定执行，年、月、日代码之间不用
    # 分隔符" - YYYYMMDD at positions 7-14, which must be a real calendar date and not in the future.
    try:
        born = datetime.date(int(body17[6:10]), int(body17[10:12]), int(body17[12:14]))
    except ValueError:
        raise InvalidNationalId("birth_date") from None
    if today is None:
        today = datetime.date.today()
    if born < _EARLIEST_BIRTH_DATE or born > today:
        raise InvalidNationalId("birth_date")
    return born


def _validate_body(body17: str, today: datetime.date | None) -> None:
    _validate_region(body17)
    _parse_birth_date(body17, today)


def from_legacy(id15: str, *, today: datetime.date | None = None) -> str:
    """Convert a legacy 15-digit id number to the 18-character GB 11643-1999 form.

    The 15-digit form is a 6-digit area code, a YYMMDD birth date in the 1900s and a 3-digit sequence
    code.  The 18-character form inserts the century "19" after the area code and appends the check
    character.  Region and birth date are validated; raises InvalidNationalId on failure.
    """
    if not isinstance(id15, str) or not _is_ascii_digits(id15, 15):
        raise InvalidNationalId("format")
    body17 = f"{id15[:6]}19{id15[6:]}"
    _validate_body(body17, today)
    return body17 + check_digit(body17)


def normalize(raw: str, *, today: datetime.date | None = None) -> str:
    """Validate a national id number and return its canonical 18-character form.

    Surrounding whitespace is stripped, full-width digits and x/ｘ/Ｘ are converted to ASCII with an
    upper-case X, and legacy 15-digit numbers are converted with :func:`from_legacy`.  ``today`` is the
    reference date for the "not in the future" birth date rule (defaults to the local current date).

    Raises InvalidNationalId with reason "format", "region", "birth_date" or "check_digit".
    """
    if not isinstance(raw, str):
        raise InvalidNationalId("format")
    # Matching normalises the same ids many times over (each record against each candidate):
    # the answer for one string on one day is cached; an invalid one is cached as its reason.
    outcome = _normalized(raw, today or datetime.date.today())
    if isinstance(outcome, InvalidNationalId):
        raise InvalidNationalId(outcome.reason)
    return outcome


@functools.lru_cache(maxsize=65536)
def _normalized(raw: str, today: datetime.date) -> str | InvalidNationalId:
    try:
        return _normalize(raw, today)
    except InvalidNationalId as exc:
        return exc


def _normalize(raw: str, today: datetime.date) -> str:
    value = raw.strip().translate(_TRANSLATION)
    if len(value) == 15:
        return from_legacy(value, today=today)
    # GB 11643-1999: "公民身份号码是特征组合码，由十七位数字本体码和一位数字校验码组成" - 17 body digits
    # (6 address, 8 birth date, 3 sequence) followed by one check character.
    if len(value) != 18 or not _is_ascii_digits(value[:17], 17) or value[17] not in _CHECK_CHARS:
        raise InvalidNationalId("format")
    body17 = value[:17]
    _validate_body(body17, today)
    if value[17] != check_digit(body17):
        raise InvalidNationalId("check_digit")
    return value


def is_valid(raw: str, *, today: datetime.date | None = None) -> bool:
    """Return True if ``raw`` is a valid national id number (in any form :func:`normalize` accepts)."""
    try:
        normalize(raw, today=today)
    except InvalidNationalId:
        return False
    return True


def birth_date(national_id: str) -> datetime.date:
    """Return the birth date encoded in a national id number (validated via :func:`normalize`)."""
    return _parse_birth_date(normalize(national_id)[:17], None)


def gender(national_id: str) -> Literal["male", "female"]:
    """Return "male" or "female" from the sequence code of a national id number.

    GB 11643-1999: "顺序码的奇数分配给男性，偶数分配给女性" - odd sequence codes are assigned to men, even
    ones to women; the parity is that of the 17th digit.
    """
    return "male" if int(normalize(national_id)[16]) % 2 == 1 else "female"


def mask(national_id: str) -> str:
    """Mask an 18-character id for display/logging: first 6 and last 4 kept, e.g. "110101********1234".

    Anything that is not exactly 18 characters is fully masked so that nothing leaks; never raises for
    a string argument.
    """
    if len(national_id) != 18:
        return "*" * len(national_id)
    return f"{national_id[:6]}{'*' * 8}{national_id[14:]}"
