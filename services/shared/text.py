"""Free text as the services accept it: NFC-normalised, trimmed, bounded, and without control,
format, surrogate or private-use characters (Unicode categories Cc, Cf, Cs, Co: invisible or
meaningless in a record, and a way to smuggle line breaks or bidi overrides into logs and screens)."""

from __future__ import annotations

import unicodedata

from services.shared.errors import InvalidArgument

CONTROL_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co"})


def has_control_characters(text: str) -> bool:
    """Whether any character of `text` is in CONTROL_CATEGORIES."""
    return any(unicodedata.category(ch) in CONTROL_CATEGORIES for ch in text)


def clean_text(value: str, *, what: str, limit: int, required: bool = False) -> str:
    """`value` NFC-normalised and trimmed; INVALID_ARGUMENT `<what>-missing` (if required and
    empty), `<what>-too-long`, `<what>-invalid` (control characters). Messages name the field,
    never the value."""
    text = unicodedata.normalize("NFC", value).strip()
    if required and not text:
        raise InvalidArgument(f"{what} is required", reason=f"{what}-missing")
    if len(text) > limit:
        raise InvalidArgument(f"{what} is longer than {limit} characters", reason=f"{what}-too-long")
    if has_control_characters(text):
        raise InvalidArgument(f"{what} contains control characters", reason=f"{what}-invalid")
    return text
