"""The application form, informed consent, specialist qualification, on-call rosters, slot
booking and statistics: the rules, kept apart from the servicer (no I/O except `on_call`).

Sources: 远程医疗服务管理规范(试行) — the application (申请) states the patient, the clinical question
and purpose, a record summary and the invited institution / specialist; the patient's written
informed consent (知情同意书) comes before the service, a guardian (监护人) signs for a minor; the
invited physicians hold the qualification the region sets (e.g. at least three years of
independent practice, a title for the type).
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from statistics import median
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from hie.teleconsult.v1 import teleconsult_pb2
from services.shared.errors import FailedPrecondition, InvalidArgument
from services.shared.timestamps import to_datetime
from services.shared.timestamps import to_timestamp_or_none as timestamp
from services.teleconsult import workflow

MULTIDISCIPLINARY = teleconsult_pb2.CONSULTATION_KIND_MULTIDISCIPLINARY
# `qualified(..., kind=ANY_KIND)`: qualified at all, whatever kinds of consultation one takes.
ANY_KIND = teleconsult_pb2.CONSULTATION_KIND_UNSPECIFIED
TITLES = ("住院医师", "主治医师", "副主任医师", "主任医师")
ADULT_AGE = 18  # 民法典: a person under 18 is a minor; the guardian consents.


@dataclass(frozen=True)
class Form:
    mode: int
    urgency: int
    texts: dict[str, str]
    imaging_studies: list[dict[str, str]]


def _invalid(message: str) -> InvalidArgument:
    return InvalidArgument(message, reason="consultation-invalid")


def check_imaging_studies(studies: Sequence[teleconsult_pb2.ImagingStudy]) -> list[dict[str, str]]:
    """Imaging by reference (IHE XDS-I.b / MADO): a Study Instance UID and the WADO-RS endpoint at
    the source PACS; `document_id` names the registry's imaging-study entry consent decides on."""
    checked = []
    for s in studies[:20]:
        uid = s.study_instance_uid.strip()
        if not uid or len(uid) > 64 or not all(part.isdigit() for part in uid.split(".")):
            raise _invalid("a study instance UID is dot-separated digits, at most 64 characters")
        if not s.wado_rs_url.startswith("https://") or len(s.wado_rs_url) > 512:
            raise _invalid("a WADO-RS endpoint is an https URL")
        checked.append({"study_instance_uid": uid, "wado_rs_url": s.wado_rs_url, "document_id": s.document_id[:64]})
    return checked


def check_form(c: teleconsult_pb2.Consultation, *, requester_organization_id: str) -> Form:
    """The application form (InvalidArgument `consultation-invalid` for what is missing)."""
    if not c.patient.local_id or not c.consultant_organization_id or not c.kind:
        raise _invalid("a consultation needs a patient, a consultant organisation and a kind")
    if c.kind not in teleconsult_pb2.ConsultationKind.values():
        raise _invalid("unknown consultation kind")
    if c.consultant_organization_id == requester_organization_id:
        raise InvalidArgument("a consultation invites another organisation", reason="self-consultation")
    if not c.question.strip():
        raise _invalid("the clinical question is required")
    if c.professional_title and c.professional_title not in TITLES:
        raise _invalid(f"professional title is one of {', '.join(TITLES)}")
    mode = int(c.mode or teleconsult_pb2.CONSULTATION_MODE_ASYNCHRONOUS)
    urgency = int(c.urgency or teleconsult_pb2.CONSULTATION_URGENCY_ROUTINE)
    if (
        mode not in teleconsult_pb2.ConsultationMode.values()
        or urgency not in teleconsult_pb2.ConsultationUrgency.values()
    ):
        raise _invalid("unknown mode or urgency")
    if c.kind == MULTIDISCIPLINARY and mode != teleconsult_pb2.CONSULTATION_MODE_INTERACTIVE:
        raise _invalid("an MDT consultation is interactive")
    return Form(
        mode=mode,
        urgency=urgency,
        texts={"question": c.question[:4000], "purpose": c.purpose[:2000], "summary": c.summary[:20000]},
        imaging_studies=check_imaging_studies(c.imaging_studies),
    )


def _age(birth_date: str, today: datetime.date) -> int | None:
    try:
        born = datetime.date.fromisoformat(birth_date[:10])
    except ValueError:
        return None
    return today.year - born.year - ((today.month, today.day) < (born.month, born.day))


def check_informed_consent(
    ic: teleconsult_pb2.InformedConsent, *, birth_date: str, today: datetime.date, now: datetime.datetime
) -> dict[str, str]:
    """The written informed consent: its evidence (the signed form, a registry document), who
    signed; a minor's guardian must sign for them (FailedPrecondition `consultation-guardian-required`)."""
    if not ic.evidence_document_id or ic.signer not in {"patient", "guardian"}:
        raise InvalidArgument(
            "informed consent needs its evidence document and the signer (patient or guardian)",
            reason="consultation-consent-invalid",
        )
    if ic.signer == "guardian" and (not ic.guardian_name.strip() or not ic.guardian_relationship.strip()):
        raise InvalidArgument(
            "a guardian's consent names the guardian and their relationship", reason="consultation-consent-invalid"
        )
    age = _age(birth_date, today)
    if ic.signer == "patient" and age is not None and age < ADULT_AGE:
        raise FailedPrecondition("a minor's guardian signs the consent", reason="consultation-guardian-required")
    signed = to_datetime(ic.signed) if ic.signed.seconds else now
    return {
        "evidence_document_id": ic.evidence_document_id[:64],
        "signer": ic.signer,
        "guardian_name": ic.guardian_name[:64] if ic.signer == "guardian" else "",
        "guardian_relationship": ic.guardian_relationship[:32] if ic.signer == "guardian" else "",
        "signed": signed.isoformat(),
    }


@dataclass(frozen=True)
class QualificationRules:
    """Who may be assigned (configurable: HIE_TELECONSULT_MIN_PRACTICE_YEARS, default 3)."""

    min_practice_years: int = 3
    # An MDT gathers at least this many specialists.
    mdt_min_participants: int = 2
    # Titles that may read each kind alone (empty: any title).
    titles: Mapping[int, tuple[str, ...]] = field(default_factory=dict)

    def qualified(self, s: Any, *, kind: int) -> bool:
        if not s.active or s.years_independent_practice < self.min_practice_years:
            return False
        if kind and kind not in json.loads(s.kinds):
            return False
        allowed = self.titles.get(kind)
        return not allowed or s.professional_title in allowed

    def check_assignees(self, chosen: Sequence[str], specialists: Mapping[str, Any], *, kind: int) -> None:
        """FailedPrecondition `consultation-not-qualified` for anyone not in the directory or not
        meeting the rules; `consultation-mdt-size` for an MDT with too few."""
        if kind == MULTIDISCIPLINARY and len(set(chosen)) < self.mdt_min_participants:
            raise FailedPrecondition(
                f"an MDT needs at least {self.mdt_min_participants} specialists", reason="consultation-mdt-size"
            )
        for practitioner_id in chosen:
            s = specialists.get(practitioner_id)
            if s is None or not self.qualified(s, kind=ANY_KIND if kind == MULTIDISCIPLINARY else kind):
                raise FailedPrecondition(
                    f"specialist {practitioner_id} does not meet the qualification for this consultation "
                    f"(directory entry, type, at least {self.min_practice_years} years of independent practice)",
                    reason="consultation-not-qualified",
                )


def check_specialist(s: teleconsult_pb2.Specialist) -> dict[str, Any]:
    if not s.practitioner_id or not s.name:
        raise InvalidArgument("a specialist needs an id and a name", reason="consultation-specialist-invalid")
    if s.professional_title and s.professional_title not in TITLES:
        raise InvalidArgument(
            f"professional title is one of {', '.join(TITLES)}", reason="consultation-specialist-invalid"
        )
    if not 0 <= s.years_independent_practice <= 70:
        raise InvalidArgument("years of independent practice out of range", reason="consultation-specialist-invalid")
    return {
        "practitioner_id": s.practitioner_id[:64],
        "name": s.name[:64],
        "role": s.role[:32] or "doctor",
        "department": s.department[:64],
        "specialty": s.specialty[:64],
        "professional_title": s.professional_title,
        "years_independent_practice": s.years_independent_practice,
        "kinds": json.dumps(sorted({int(k) for k in s.kinds if k})),
        "active": True,
    }


async def on_call(session: AsyncSession, organization_id: str, kind: int, at: datetime.datetime) -> list[str]:
    """Who is on call for `kind` at `at` (earliest shift first)."""
    from services.teleconsult.store import RosterShiftRecord as R

    rows = await session.scalars(
        select(R.practitioner_id)
        .where(R.organization_id == organization_id, R.kind == kind, R.start_at <= at, R.end_at > at)
        .order_by(R.start_at)
    )
    return list(dict.fromkeys(rows))


def check_booking(
    slots: Sequence[Any], *, slot_ids: Sequence[str], participants: Sequence[str]
) -> tuple[datetime.datetime, datetime.datetime]:
    """One free slot of the consultant organisation per participant, all overlapping one period:
    FailedPrecondition otherwise. The free check here is advisory; the booking itself is the
    conditional UPDATE in the move's transaction."""
    if len(slots) != len(slot_ids) or not slots:
        raise InvalidArgument("book one published slot of each participant", reason="consultation-slot-invalid")
    owners = sorted(s.practitioner_id for s in slots)
    if owners != sorted(participants):
        raise FailedPrecondition(
            "book exactly one slot for each assigned specialist", reason="consultation-slot-invalid"
        )
    if any(s.consultation_id for s in slots):
        raise FailedPrecondition("a slot is already booked; choose another", reason="consultation-slot-taken")
    start, end = max(s.start_at for s in slots), min(s.end_at for s in slots)
    if end <= start:
        raise FailedPrecondition("the participants' slots do not overlap", reason="consultation-slot-invalid")
    return start, end


def specialist_message(s: Any) -> teleconsult_pb2.Specialist:
    return teleconsult_pb2.Specialist(
        organization_id=s.organization_id,
        practitioner_id=s.practitioner_id,
        name=s.name,
        role=s.role,
        department=s.department,
        specialty=s.specialty,
        professional_title=s.professional_title,
        years_independent_practice=s.years_independent_practice,
        kinds=json.loads(s.kinds),
        active=s.active,
    )


def shift_message(r: Any) -> teleconsult_pb2.RosterShift:
    return teleconsult_pb2.RosterShift(
        shift_id=r.id,
        practitioner_id=r.practitioner_id,
        kind=r.kind,
        start=timestamp(r.start_at),
        end=timestamp(r.end_at),
    )


def slot_message(r: Any, *, show_consultation: bool = True) -> teleconsult_pb2.Slot:
    return teleconsult_pb2.Slot(
        slot_id=r.id,
        organization_id=r.organization_id,
        practitioner_id=r.practitioner_id,
        start=timestamp(r.start_at),
        end=timestamp(r.end_at),
        status="busy" if r.consultation_id else "free",
        consultation_id=(r.consultation_id or "") if show_consultation else "",
    )


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    # Nearest rank.
    index = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


def statistics(rows: Sequence[Any], breached: set[str]) -> teleconsult_pb2.ConsultationStatisticsResponse:
    """Volume by type and mode, by state; turnaround (request → first signed report) median and
    p90 in hours; breaches; per organisation and month."""
    kind_name = {v: k.removeprefix("CONSULTATION_KIND_").lower() for k, v in teleconsult_pb2.ConsultationKind.items()}
    mode_name = {v: k.removeprefix("CONSULTATION_MODE_").lower() for k, v in teleconsult_pb2.ConsultationMode.items()}
    by_kind_mode: dict[str, int] = {}
    by_state: dict[str, int] = {}
    hours: list[float] = []
    per: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        key = f"{kind_name.get(r.kind, r.kind)}/{mode_name.get(r.mode, r.mode)}"
        by_kind_mode[key] = by_kind_mode.get(key, 0) + 1
        state = workflow.state_name(r.state)
        by_state[state] = by_state.get(state, 0) + 1
        month = r.created_at.strftime("%Y-%m")
        turnaround = (r.reported_at - r.created_at).total_seconds() / 3600 if r.reported_at else None
        if turnaround is not None:
            hours.append(turnaround)
        for org, role in ((r.requester_organization_id, "requested"), (r.consultant_organization_id, "received")):
            row = per.setdefault(
                (org, month), {"requested": 0, "received": 0, "reported": 0, "breaches": 0, "hours": []}
            )
            row[role] += 1
            if role == "received":
                if turnaround is not None:
                    row["reported"] += 1
                    row["hours"].append(turnaround)
                if r.id in breached:
                    row["breaches"] += 1
    return teleconsult_pb2.ConsultationStatisticsResponse(
        total=len(rows),
        by_kind_mode=[teleconsult_pb2.CountRow(key=k, count=v) for k, v in sorted(by_kind_mode.items())],
        by_state=[teleconsult_pb2.CountRow(key=k, count=v) for k, v in sorted(by_state.items())],
        reported=len(hours),
        turnaround_median_hours=median(hours) if hours else 0.0,
        turnaround_p90_hours=_percentile(hours, 0.9),
        breaches=len(breached),
        by_organization_month=[
            teleconsult_pb2.OrganizationMonthRow(
                organization_id=org,
                month=month,
                requested=v["requested"],
                received=v["received"],
                reported=v["reported"],
                breaches=v["breaches"],
                turnaround_median_hours=median(v["hours"]) if v["hours"] else 0.0,
                turnaround_p90_hours=_percentile(v["hours"], 0.9),
            )
            for (org, month), v in sorted(per.items())
        ],
    )
