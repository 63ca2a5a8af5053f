"""How long each referral clock runs, per urgency and requested service (pure; configurable).

Defaults (the issue's examples; a region sets its own with `HIE_REFERRAL_DEADLINES`):

| clock | emergency | urgent | routine | starts | stops |
|---|---|---|---|---|---|
| accept | 30 min | 24 h | 72 h | creation | accept, reject, cancel (paused on hold) |
| appointment | 4 h | 72 h | 14 d | accept (again on no-show) | schedule |
| outcome | 3 d | 14 d | 30 d | accept | complete |
| follow-up | 2 d | 3 d | 7 d | accept of a down-referral | its first follow-up done |

`HIE_REFERRAL_DEADLINES` is a JSON object: clock name → urgency → seconds, and optionally
`"<clock>/<service>"` (e.g. `"outcome/admission"`) → urgency → seconds, which wins for that
requested service. A clock or urgency it leaves out keeps its default; 0 turns the clock off.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping

from services.shared.errors import InvalidArgument

_H = 3600
DEFAULTS: dict[str, dict[str, int]] = {
    "accept": {"emergency": 30 * 60, "urgent": 24 * _H, "routine": 72 * _H},
    "appointment": {"emergency": 4 * _H, "urgent": 72 * _H, "routine": 14 * 24 * _H},
    "outcome": {"emergency": 3 * 24 * _H, "urgent": 14 * 24 * _H, "routine": 30 * 24 * _H},
    "follow-up": {"emergency": 2 * 24 * _H, "urgent": 3 * 24 * _H, "routine": 7 * 24 * _H},
}
CLOCKS = tuple(DEFAULTS)
# The side whose move each clock waits for (a breach is attributed to it).
RESPONSIBLE = {"accept": "target", "appointment": "target", "outcome": "target", "follow-up": "target"}


class DeadlinePolicy:
    """Durations per clock, urgency and requested service."""

    def __init__(self, table: Mapping[str, Mapping[str, int]]) -> None:
        self._table = table

    @classmethod
    def parse(cls, text: str) -> DeadlinePolicy:
        """Defaults overlaid with the JSON configuration (refused at start when malformed)."""
        table: dict[str, dict[str, int]] = {k: dict(v) for k, v in DEFAULTS.items()}
        if text.strip():
            try:
                given = json.loads(text)
                for key, per_urgency in given.items():
                    if key.split("/")[0] not in DEFAULTS or not isinstance(per_urgency, dict):
                        raise ValueError(key)
                    for urgency, seconds in per_urgency.items():
                        if urgency not in DEFAULTS["accept"] or not isinstance(seconds, int) or seconds < 0:
                            raise ValueError(urgency)
                        table.setdefault(key, {})[urgency] = seconds
            except (ValueError, AttributeError, json.JSONDecodeError) as exc:
                raise InvalidArgument("HIE_REFERRAL_DEADLINES is malformed (see services/referral/README.md)") from exc
        return cls(table)

    def __call__(self, clock: str, facts: Mapping[str, object]) -> datetime.timedelta | None:
        """The clock's period for the item's facts; None when it does not run for it."""
        if clock == "follow-up" and facts.get("direction") != "down":
            return None
        urgency = str(facts.get("urgency") or "routine")
        service = str(facts.get("service") or "")
        for key in (f"{clock}/{service}", clock):
            seconds = self._table.get(key, {}).get(urgency)
            if seconds is not None:
                return datetime.timedelta(seconds=seconds) if seconds else None
        return None
