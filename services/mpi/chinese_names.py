"""Chinese personal names for matching: family / given split, toneless pinyin, Latin spellings.

A name reaches the index as Chinese characters (张伟), as Latin letters (passport or pinyin-only
systems: "Zhang Wei", "ZHANG, Wei", "Wei Zhang") or both. Matching compares characters where
both sides have them and toneless pinyin otherwise, so homophones (张伟 / 章伟) and romanised
names ("Zhang Wei" / 张伟) meet. Pure: no I/O (pypinyin's dictionary ships with the package).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

from pypinyin import Style, lazy_pinyin

# Two-character surnames (复姓) that must not be split after the first character.
COMPOUND_SURNAMES = frozenset(
    [
        "欧阳",
        "司马",
        "诸葛",
        "上官",
        "东方",
        "皇甫",
        "令狐",
        "慕容",
        "尉迟",
        "公孙",
        "夏侯",
        "司徒",
        "长孙",
        "宇文",
        "轩辕",
        "端木",
        "万俟",
        "独孤",
        "南宫",
        "西门",
        "申屠",
        "公羊",
        "澹台",
        "太史",
        "闻人",
        "呼延",
        "赫连",
        "钟离",
        "宗政",
        "濮阳",
        "淳于",
        "单于",
        "拓跋",
        "百里",
        "东郭",
        "司空",
        "第五",
    ]
)
# Characters whose reading as a surname differs from the dictionary's first reading (多音字姓氏):
# 曾 is zeng (not ceng), 单 is shan (not dan), and so on.
SURNAME_READINGS: dict[str, str] = {
    "曾": "zeng",
    "单": "shan",
    "解": "xie",
    "仇": "qiu",
    "区": "ou",
    "朴": "piao",
    "查": "zha",
    "盖": "ge",
    "乐": "yue",
    "覃": "qin",
    "翟": "zhai",
    "缪": "miao",
    "召": "shao",
    "秘": "bi",
    "种": "chong",
    "繁": "po",
    "员": "yun",
    "宓": "mi",
    "任": "ren",
    "沈": "shen",
    "折": "she",
    "隗": "wei",
    "冼": "xian",
    "重": "chong",
    "句": "gou",
    "祭": "zhai",
    "长孙": "zhangsun",
    "万俟": "moqi",
    "尉迟": "yuchi",
    "单于": "chanyu",
}
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")
_LATIN_TOKEN = re.compile(r"[a-z]+")
# Passport and older romanisations of ü (吕 LYU / LV / LU) compared as one spelling.
_U_SPELLINGS = (("lyu", "lu"), ("nyu", "nu"), ("lv", "lu"), ("nv", "nu"), ("ü", "u"))


def has_han(text: str) -> bool:
    """The text contains Chinese characters."""
    return bool(_HAN.search(text))


def _fold_latin(text: str) -> str:
    """Lower-case ASCII letters only: accents, tone marks, spaces and punctuation removed."""
    decomposed = unicodedata.normalize("NFKD", text.casefold().replace("ü", "v"))
    letters = "".join(ch for ch in decomposed if "a" <= ch <= "z")
    for old, new in _U_SPELLINGS:
        letters = letters.replace(old, new)
    return letters


def fold_latin(text: str) -> str:
    """Latin letters as the index compares them (lower-case ASCII; see `_fold_latin`)."""
    return _fold_latin(text)


@lru_cache(maxsize=65_536)
def pinyin_of(text: str, *, surname: bool = False) -> str:
    """Toneless pinyin of Chinese characters, syllables run together ("张伟" -> "zhangwei");
    Latin letters are folded the same way. As a surname, surname readings apply (曾 -> zeng)."""
    if not text:
        return ""
    if surname and text in SURNAME_READINGS:
        return SURNAME_READINGS[text]
    if surname and text[0] in SURNAME_READINGS:
        return SURNAME_READINGS[text[0]] + pinyin_of(text[1:])
    syllables = lazy_pinyin(text, style=Style.NORMAL, errors="default")
    return _fold_latin("".join(syllables))


def split_han_name(text: str) -> tuple[str, str]:
    """(family, given) of a name written in characters: a compound surname when it is one."""
    chars = "".join(ch for ch in text if not ch.isspace() and ch not in "·•.")
    if len(chars) > 2 and chars[:2] in COMPOUND_SURNAMES:
        return chars[:2], chars[2:]
    return chars[:1], chars[1:]


def split_latin_name(text: str) -> tuple[str, str]:
    """(family, given) of a romanised name: "ZHANG, Wei" names the family first explicitly;
    otherwise the Chinese order is assumed ("Zhang Wei"); a reversed order shows up as the
    swapped comparison level, not here."""
    if "," in text:
        family, _, given = text.partition(",")
        return _fold_latin(family), _fold_latin(given)
    tokens = _LATIN_TOKEN.findall(unicodedata.normalize("NFKD", text.casefold().replace("ü", "v")))
    if not tokens:
        return "", ""
    return _fold_latin(tokens[0]), _fold_latin("".join(tokens[1:]))


@dataclass(frozen=True)
class NameForms:
    """The forms of one name that matching compares.

    `family` / `given` are characters when the record has them, else folded Latin letters;
    `family_pinyin` / `given_pinyin` are always toneless Latin letters.
    """

    family: str
    given: str
    family_pinyin: str
    given_pinyin: str
    han: bool

    @property
    def full_pinyin(self) -> str:
        return self.family_pinyin + self.given_pinyin

    @property
    def empty(self) -> bool:
        return not (self.family_pinyin or self.given_pinyin)


@lru_cache(maxsize=65_536)
def name_forms(text: str, family: str = "", given: str = "") -> NameForms:
    """The comparable forms of a name as registered (full text and / or family and given)."""
    family, given, text = family.strip(), given.strip(), text.strip()
    if (family and has_han(family)) or has_han(given) or (not family and not given and has_han(text)):
        if not family and not given:
            family, given = split_han_name(text)
        family = "".join(family.split())
        given = "".join(given.split())
        return NameForms(family, given, pinyin_of(family, surname=True), pinyin_of(given), han=True)
    if family or given:
        fam, giv = _fold_latin(family), _fold_latin(given)
    else:
        fam, giv = split_latin_name(text)
    return NameForms(fam, giv, fam, giv, han=False)
