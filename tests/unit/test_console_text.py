"""Every interface text the console's templates use exists in Chinese and English."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.console.i18n import _TEXT, translator

TEMPLATES = Path(__file__).resolve().parents[2] / "gateway" / "console" / "templates"
_LITERAL_KEY = re.compile(r"t\(lang, '([a-z_.-]+)'\)")


def test_every_literal_key_of_the_templates_is_translated() -> None:
    used = {key for path in TEMPLATES.glob("*.html") for key in _LITERAL_KEY.findall(path.read_text("utf-8"))}
    assert used, "no keys found: the pattern no longer matches the templates"
    assert sorted(used - set(_TEXT)) == []


def test_both_languages_are_filled() -> None:
    for key, (chinese, english) in _TEXT.items():
        assert chinese, key
        assert english, key
        assert translator("zh", key) == chinese
        assert translator("en", key) == english
