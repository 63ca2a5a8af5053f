"""FHIR search values the facade's searches share: a date (with its prefix and the implicit range
of its precision) and a token's code."""

from __future__ import annotations

import datetime
import re

from gateway.errors import ApiError

_FHIR_DATE = re.compile(
    r"(?P<year>\d{4})(?:-(?P<month>\d{2})(?:-(?P<day>\d{2})"
    r"(?:T(?P<hour>\d{2}):(?P<minute>\d{2})(?::(?P<second>\d{2})(?P<fraction>\.\d{1,9})?)?"
    r"(?P<zone>Z|[+-]\d{2}:\d{2})?)?)?)?"
)
_DATE_PREFIXES = {"eq", "ge", "gt", "le", "lt"}
_UNENCODED_PLUS = re.compile(r" (\d{2}:\d{2})$")


def _bad(reason: str, message: str) -> ApiError:
    # Messages name the parameter only, never its value (it may be a patient id).
    return ApiError(400, reason, message)


def date_range(value: str) -> tuple[str, datetime.datetime, datetime.datetime]:
    """(prefix, start, end) of a FHIR date search value: the implicit range [start, end) of its precision."""
    prefix = value[:2] if value[:2].isalpha() else "eq"
    text = value[2:] if value[:2].isalpha() else value
    text = _UNENCODED_PLUS.sub(r"+\1", text)
    match = _FHIR_DATE.fullmatch(text)
    if prefix not in _DATE_PREFIXES or match is None:
        raise _bad("date-invalid", "date: [eq|ge|gt|le|lt]YYYY[-MM[-DD[Thh:mm[:ss[.fff]]±hh:mm|Z]]]")
    part = match.groupdict()
    if part["hour"] is not None and part["zone"] is None:
        raise _bad("date-invalid", "date: a time needs a time zone")
    try:
        year = int(part["year"])
        if part["month"] is None:
            start = datetime.datetime(year, 1, 1, tzinfo=datetime.UTC)
            return prefix, start, start.replace(year=year + 1)
        month = int(part["month"])
        if part["day"] is None:
            start = datetime.datetime(year, month, 1, tzinfo=datetime.UTC)
            end = start.replace(year=year + 1, month=1) if month == 12 else start.replace(month=month + 1)
            return prefix, start, end
        if part["hour"] is None:
            start = datetime.datetime(year, month, int(part["day"]), tzinfo=datetime.UTC)
            return prefix, start, start + datetime.timedelta(days=1)
        zone = datetime.datetime.strptime(part["zone"].replace("Z", "+00:00"), "%z").tzinfo
        fraction = (part["fraction"] or "")[1:7]
        start = datetime.datetime(
            year,
            month,
            int(part["day"]),
            int(part["hour"]),
            int(part["minute"]),
            int(part["second"] or 0),
            int(fraction.ljust(6, "0")) if fraction else 0,
            tzinfo=zone,
        )
        if fraction:
            step = datetime.timedelta(microseconds=10 ** (6 - len(fraction)))
        elif part["second"] is not None:
            step = datetime.timedelta(seconds=1)
        else:
            step = datetime.timedelta(minutes=1)
        return prefix, start, start + step
    except (ValueError, OverflowError):
        raise _bad("date-invalid", "date: not a valid date") from None


def token_code(name: str, value: str, systems: set[str]) -> str:
    """The code of a token search value `[system|]code`; the system, if given, must be one of `systems`."""
    system, bar, code = value.rpartition("|")
    if bar and system and system not in systems:
        raise _bad("search-value-invalid", f"{name}: unknown code system")
    if not code:
        raise _bad("search-value-invalid", f"{name}: a code is required")
    return code
