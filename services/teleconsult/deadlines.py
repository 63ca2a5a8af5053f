"""Turnaround clocks per consultation type and urgency (pure).

Defaults after common regional practice (胸痛中心 / 卒中中心: an emergency ECG or stroke imaging read
within 30 minutes); configurable with HIE_TELECONSULT_DEADLINES, a comma-separated list of
`<type>/<urgency>=<period>` where type is a consultation kind or `*`, urgency routine | urgent |
emergency, and period `<n>m` / `<n>h` / `<n>d`, e.g. `ecg/emergency=20m,*/routine=48h`. The most
specific rule wins (type/urgency over */urgency).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from hie.teleconsult.v1 import teleconsult_pb2
from services.shared.errors import InvalidArgument
from services.teleconsult.workflow import TURNAROUND

KINDS = {
    "imaging": teleconsult_pb2.CONSULTATION_KIND_IMAGING,
    "ecg": teleconsult_pb2.CONSULTATION_KIND_ECG,
    "pathology": teleconsult_pb2.CONSULTATION_KIND_PATHOLOGY,
    "ultrasound": teleconsult_pb2.CONSULTATION_KIND_ULTRASOUND,
    "specialist": teleconsult_pb2.CONSULTATION_KIND_SPECIALIST,
    "multidisciplinary": teleconsult_pb2.CONSULTATION_KIND_MULTIDISCIPLINARY,
}
URGENCIES = {
    "routine": teleconsult_pb2.CONSULTATION_URGENCY_ROUTINE,
    "urgent": teleconsult_pb2.CONSULTATION_URGENCY_URGENT,
    "emergency": teleconsult_pb2.CONSULTATION_URGENCY_EMERGENCY,
}
_PERIOD = re.compile(r"(\d{1,5})([mhd])")
_UNIT = {"m": 60, "h": 3600, "d": 86400}
_DEFAULTS = {
    ("ecg", "emergency"): datetime.timedelta(minutes=30),
    ("imaging", "emergency"): datetime.timedelta(minutes=30),
    ("*", "emergency"): datetime.timedelta(hours=2),
    ("*", "urgent"): datetime.timedelta(hours=24),
    ("*", "routine"): datetime.timedelta(hours=72),
}


@dataclass(frozen=True)
class DeadlinePolicy:
    """The turnaround period of a consultation by its kind and urgency."""

    rules: Mapping[tuple[str, str], datetime.timedelta] = field(default_factory=lambda: dict(_DEFAULTS))

    @classmethod
    def parse(cls, text: str) -> DeadlinePolicy:
        """Defaults overridden by `text` (see the module docstring); InvalidArgument if malformed."""
        rules = dict(_DEFAULTS)
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, _, period = item.partition("=")
            kind, _, urgency = key.strip().partition("/")
            match = _PERIOD.fullmatch(period.strip())
            if (kind != "*" and kind not in KINDS) or urgency not in URGENCIES or match is None:
                raise InvalidArgument(f"turnaround rule {item!r} is not <type>/<urgency>=<n>m|h|d")
            rules[(kind, urgency)] = datetime.timedelta(seconds=int(match[1]) * _UNIT[match[2]])
        return cls(rules)

    def period(self, kind: int, urgency: int) -> datetime.timedelta | None:
        kind_name = next((k for k, v in KINDS.items() if v == kind), "")
        urgency_name = next((k for k, v in URGENCIES.items() if v == urgency), "routine")
        return self.rules.get((kind_name, urgency_name)) or self.rules.get(("*", urgency_name))

    def __call__(self, clock: str, facts: Mapping[str, object]) -> datetime.timedelta | None:
        """The engine's DeadlinePolicy: only the turnaround clock runs."""
        if clock != TURNAROUND:
            return None
        return self.period(int(facts.get("kind", 0)), int(facts.get("urgency", 0)))  # type: ignore[call-overload]
