"""Referral rules that need no I/O: ICD-10 codes, the referral number, attachment limits, care
plans, the worklist's overdue flag and the regional statistics."""

from __future__ import annotations

import datetime
import re
import secrets
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from services.shared.errors import InvalidArgument

# Attachments: at most this many documents, each at most this large, all together at most this.
MAX_DOCUMENTS = 20
MAX_DOCUMENT_BYTES = 20 * 1024 * 1024
MAX_TOTAL_BYTES = 100 * 1024 * 1024
MAX_CANDIDATES = 5
MAX_FOLLOW_UPS = 20
MAX_TEXT = 4000

URGENCIES = ("routine", "urgent", "emergency")
SERVICES = ("outpatient", "admission", "examination", "rehabilitation")

# ICD-10 (WHO; GB/T 14396 in China adds digits after the point): a letter, two digits, then
# optionally a point and up to four more characters. The three-character category must lie in a
# chapter's range: the exchange checks the form and the category, not the full list of codes.
_ICD10 = re.compile(r"^([A-Z])(\d\d)(?:\.([0-9A-Z]{1,4}))?$")
_CHAPTER_RANGES = (
    ("A00", "B99"),
    ("C00", "D48"),
    ("D50", "D89"),
    ("E00", "E90"),
    ("F00", "F99"),
    ("G00", "G99"),
    ("H00", "H59"),
    ("H60", "H95"),
    ("I00", "I99"),
    ("J00", "J99"),
    ("K00", "K93"),
    ("L00", "L99"),
    ("M00", "M99"),
    ("N00", "N99"),
    ("O00", "O99"),
    ("P00", "P96"),
    ("Q00", "Q99"),
    ("R00", "R99"),
    ("S00", "T98"),
    ("U00", "U85"),
    ("V01", "Y98"),
    ("Z00", "Z99"),
)


def check_icd10(code: str, *, field: str = "diagnosis.code") -> str:
    """The code normalised (upper case); InvalidArgument naming `field` when it is not ICD-10."""
    normalised = code.strip().upper()
    match = _ICD10.fullmatch(normalised)
    if match is None or not any(lo <= normalised[:3] <= hi for lo, hi in _CHAPTER_RANGES):
        raise InvalidArgument(f"{field} is not a known ICD-10 code (e.g. I20.0)", reason="referral-diagnosis")
    return normalised


def referral_number(now: datetime.datetime) -> str:
    """A number both sides quote: ZZ + the date + six hex characters (unique by constraint)."""
    return f"ZZ{now:%Y%m%d}-{secrets.token_hex(3).upper()}"


def check_text(value: str, *, field: str, limit: int = MAX_TEXT) -> str:
    if len(value) > limit:
        raise InvalidArgument(f"{field} is longer than {limit} characters", reason="referral-invalid")
    if any(ord(ch) < 0x20 and ch not in "\n\r\t" for ch in value):
        raise InvalidArgument(f"{field} contains control characters", reason="referral-invalid")
    return value


def check_attachments(sizes: Sequence[int]) -> None:
    """Attachment limits (stated in the README): count, each document, the total."""
    if len(sizes) > MAX_DOCUMENTS:
        raise InvalidArgument(f"at most {MAX_DOCUMENTS} documents: document_ids", reason="referral-documents")
    if any(size > MAX_DOCUMENT_BYTES for size in sizes):
        raise InvalidArgument(
            f"an attached document is larger than {MAX_DOCUMENT_BYTES // (1024 * 1024)} MiB: document_ids",
            reason="referral-documents",
        )
    if sum(sizes) > MAX_TOTAL_BYTES:
        raise InvalidArgument(
            f"the attached documents exceed {MAX_TOTAL_BYTES // (1024 * 1024)} MiB together: document_ids",
            reason="referral-documents",
        )


@dataclass(frozen=True)
class FollowUpPlan:
    description: str
    due: datetime.datetime


def check_care_plan(follow_ups: Iterable[FollowUpPlan], *, direction: str, now: datetime.datetime) -> None:
    plans = list(follow_ups)
    if plans and direction != "down":
        raise InvalidArgument("a care plan goes with a down-referral: care_plan", reason="referral-care-plan")
    if len(plans) > MAX_FOLLOW_UPS:
        raise InvalidArgument(f"at most {MAX_FOLLOW_UPS} follow-ups: care_plan", reason="referral-care-plan")
    for plan in plans:
        if not plan.description.strip():
            raise InvalidArgument("a follow-up needs a description: care_plan.follow_ups", reason="referral-care-plan")
        if plan.due < now - datetime.timedelta(days=1):
            raise InvalidArgument("a follow-up is due in the future: care_plan.follow_ups", reason="referral-care-plan")


# --- statistics -------------------------------------------------------------------------------


@dataclass
class ReferralFacts:
    """What the statistics read of one referral (no patient data)."""

    origin: str
    target: str
    direction: str
    tier_pair: str
    state: str
    created: datetime.datetime
    accepted: datetime.datetime | None = None
    scheduled: datetime.datetime | None = None
    completed: datetime.datetime | None = None
    closed: bool = False
    decided: bool = False
    breaches: list[str] = field(default_factory=list)


def _quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    # Nearest rank: the smallest value with at least q of the samples at or below it.
    index = max(0, min(len(ordered) - 1, -(-int(q * 100) * len(ordered) // 100) - 1))
    return ordered[index]


@dataclass
class Statistics:
    total: int
    by_direction: dict[str, int]
    by_tier_pair: dict[str, int]
    by_state: dict[str, int]
    acceptance_rate: float
    durations: dict[str, tuple[int, float, float]]
    loop_closure_rate: float
    breaches: int
    breaches_by_clock: dict[str, int]
    by_organization_month: dict[tuple[str, str], dict[str, int]]


def statistics_of(items: Sequence[ReferralFacts]) -> Statistics:
    """Counts by direction, tier pair and state; acceptance rate (accepted of those decided);
    median and p90 hours to accept, to appointment (creation → scheduled), to outcome (creation →
    completed); loop-closure rate (closed of completed or closed); breaches; per organisation and
    month of creation."""
    hours: dict[str, list[float]] = {"accept": [], "appointment": [], "outcome": []}
    per_org: dict[tuple[str, str], dict[str, int]] = defaultdict(Counter)  # type: ignore[arg-type]
    breaches_by_clock: Counter[str] = Counter()
    for r in items:
        if r.accepted:
            hours["accept"].append((r.accepted - r.created).total_seconds() / 3600)
        if r.scheduled:
            hours["appointment"].append((r.scheduled - r.created).total_seconds() / 3600)
        if r.completed:
            hours["outcome"].append((r.completed - r.created).total_seconds() / 3600)
        month = f"{r.created:%Y-%m}"
        per_org[(r.origin, month)]["sent"] += 1
        if r.target:
            per_org[(r.target, month)]["received"] += 1
            if r.accepted:
                per_org[(r.target, month)]["accepted"] += 1
            per_org[(r.target, month)]["breaches"] += len(r.breaches)
        if r.closed:
            per_org[(r.origin, month)]["closed"] += 1
        breaches_by_clock.update(r.breaches)
    decided = [r for r in items if r.decided]
    finished = [r for r in items if r.completed]
    return Statistics(
        total=len(items),
        by_direction=dict(Counter(r.direction or "unknown" for r in items)),
        by_tier_pair=dict(Counter(r.tier_pair or "unknown" for r in items)),
        by_state=dict(Counter(r.state for r in items)),
        acceptance_rate=(sum(1 for r in decided if r.accepted) / len(decided)) if decided else 0.0,
        durations={name: (len(v), statistics.median(v) if v else 0.0, _quantile(v, 0.9)) for name, v in hours.items()},
        loop_closure_rate=(sum(1 for r in finished if r.closed) / len(finished)) if finished else 0.0,
        breaches=sum(breaches_by_clock.values()),
        breaches_by_clock=dict(breaches_by_clock),
        by_organization_month={k: dict(v) for k, v in per_org.items()},
    )
