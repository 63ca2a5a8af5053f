"""One declarative masking policy for every outbound response and export.

The policy is data (`masking_policy.json`, or the file named by HIE_MASKING_POLICY_FILE): an ordered
list of rules, each naming the roles and / or purposes of use it applies to and, per personal-data
field, how that field is shown. For each field the first rule that matches the caller and names the
field decides; the `default` rule closes the list. Putting purpose rules first means a steward
acting for research still gets de-identified data.

Field kinds: national_id, identifier, phone, address, name, birth_date.
Treatments: clear, partial (national id 110101********1234, phone 138****5678, identifier last four),
district (address down to the district), city (address down to the city), year (birth date to the
year), remove.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.shared import gb11643

__all__ = ["CROSS_DOMAIN_FLOOR", "FIELDS", "TREATMENTS", "MaskingPolicy", "MaskingRule", "default_policy"]

FIELDS = frozenset({"national_id", "identifier", "phone", "address", "name", "birth_date"})
TREATMENTS = frozenset({"clear", "partial", "district", "city", "year", "remove"})
_ADDRESS_DISTRICT = ("province", "city", "district", "country")
# How much each treatment hides, to take the stronger of two.
_STRENGTH = {"clear": 0, "partial": 1, "year": 1, "district": 1, "city": 2, "remove": 3}
# What a hospital sees, at most, of a record another domain registered (a cross-domain search
# picks the right person, it is not a directory): identifiers masked, no phone, no street address.
# It applies whatever the caller's role, so no asserted role turns a search into a directory.
CROSS_DOMAIN_FLOOR: dict[str, str] = {
    "national_id": "partial",
    "identifier": "partial",
    "phone": "remove",
    "address": "district",
}
_ADDRESS_CITY = ("province", "city", "country")


@dataclass(frozen=True)
class MaskingRule:
    """When a rule applies (any of its roles, any of its purposes; empty means any) and its fields."""

    name: str
    roles: frozenset[str]
    purposes: frozenset[str]
    fields: dict[str, str]

    def applies(self, role: str, purpose: str) -> bool:
        return (not self.roles or role in self.roles) and (not self.purposes or purpose in self.purposes)


class MaskingPolicy:
    """The masking decisions of the exchange, and the functions that apply them."""

    def __init__(self, rules: list[MaskingRule]) -> None:
        if not rules or rules[-1].roles or rules[-1].purposes:
            raise ValueError("the last masking rule must be an unconditional default")
        missing = FIELDS - set(rules[-1].fields)
        if missing:
            raise ValueError(f"the default masking rule must cover every field (missing {sorted(missing)})")
        for rule in rules:
            unknown = set(rule.fields) - FIELDS
            bad = set(rule.fields.values()) - TREATMENTS
            if unknown or bad:
                raise ValueError(f"masking rule {rule.name!r} names unknown fields or treatments")
        self.rules = rules

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> MaskingPolicy:
        return cls(
            [
                MaskingRule(
                    name=r["name"],
                    roles=frozenset(r.get("roles", ())),
                    purposes=frozenset(r.get("purposes", ())),
                    fields=dict(r["fields"]),
                )
                for r in document["rules"]
            ]
        )

    def treatment(self, field: str, *, role: str, purpose: str, floor: dict[str, str] | None = None) -> str:
        """How `field` is shown to a caller with this role acting for this purpose; with a floor,
        never less hidden than the floor's treatment of the field."""
        for rule in self.rules:
            if field in rule.fields and rule.applies(role, purpose):
                how = rule.fields[field]
                least = (floor or {}).get(field)
                if least is not None and _STRENGTH.get(least, 0) > _STRENGTH.get(how, 0):
                    return least
                return how
        raise KeyError(field)  # unreachable: the default covers every field

    # -- value-level treatments
    def national_id(self, value: str, *, role: str, purpose: str, floor: dict[str, str] | None = None) -> str | None:
        how = self.treatment("national_id", role=role, purpose=purpose, floor=floor)
        return _text(value, how, partial=gb11643.mask)

    def phone(self, value: str, *, role: str, purpose: str, floor: dict[str, str] | None = None) -> str | None:
        return _text(value, self.treatment("phone", role=role, purpose=purpose, floor=floor), partial=mask_phone)

    def identifier(self, value: str, *, role: str, purpose: str, floor: dict[str, str] | None = None) -> str | None:
        how = self.treatment("identifier", role=role, purpose=purpose, floor=floor)
        return _text(value, how, partial=mask_tail)

    def name(self, value: str, *, role: str, purpose: str) -> str | None:
        return _text(value, self.treatment("name", role=role, purpose=purpose), partial=mask_name)

    def birth_date(self, value: str, *, role: str, purpose: str) -> str | None:
        how = self.treatment("birth_date", role=role, purpose=purpose)
        if how == "year":
            return value[:4]
        return _text(value, how, partial=lambda v: v[:7])

    def address(
        self, address: dict[str, Any], *, role: str, purpose: str, floor: dict[str, str] | None = None
    ) -> dict[str, Any] | None:
        """An address dict (province, city, district, street, postcode, text …) cut to what is allowed."""
        how = self.treatment("address", role=role, purpose=purpose, floor=floor)
        if how == "clear":
            return dict(address)
        if how == "remove":
            return None
        keep = _ADDRESS_CITY if how == "city" else _ADDRESS_DISTRICT
        return {k: v for k, v in address.items() if k in keep}


def _text(value: str, how: str, *, partial: Any) -> str | None:
    if how == "clear":
        return value
    if how == "remove":
        return None
    if how == "partial":
        return partial(value)
    # A treatment meant for another kind of field (e.g. "district" on a phone) hides it entirely.
    return None


def mask_phone(value: str) -> str:
    """138****5678 for a mainland mobile number; anything else keeps only its last four digits."""
    digits = "".join(ch for ch in value if ch.isdigit())
    if len(digits) == 11:
        return f"{digits[:3]}****{digits[7:]}"
    return "*" * max(len(digits) - 4, 0) + digits[-4:] if len(digits) > 4 else "*" * len(digits)


def mask_tail(value: str) -> str:
    return "*" * max(len(value) - 4, 0) + value[-4:] if len(value) > 4 else "*" * len(value)


def mask_name(value: str) -> str:
    """张** for Chinese names (family name kept, the convention of 个人信息去标识化 guidance);
    the first letter of each word for Latin names."""
    if value and all("\u4e00" <= ch <= "\u9fff" for ch in value):
        return value[0] + "*" * (len(value) - 1)
    return " ".join(word[:1] + "*" * (len(word) - 1) for word in value.split())


_DEFAULT_POLICY_FILE = Path(__file__).with_name("masking_policy.json")


def default_policy(environ: dict[str, str] | None = None) -> MaskingPolicy:
    """The policy in force: HIE_MASKING_POLICY_FILE if set, otherwise the shipped regional policy."""
    # The settings hand the variable over (Settings.protection_environ): no environment read here.
    env = environ or {}
    path = Path(env.get("HIE_MASKING_POLICY_FILE") or _DEFAULT_POLICY_FILE)
    return MaskingPolicy.from_json(json.loads(path.read_text(encoding="utf-8")))
