"""Referral rules through the gateway: races (accept vs cancel on one version, two candidates
accepting, many referrals booking one slot, two admissions for one bed) — exactly one wins —,
rejection with a coded reason and advice, hold and supply pausing the accept clock, cancellation
confirmed by the target once scheduled, and the regional statistics of a known set."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from gateway.client import HospitalClient, Practitioner
from gateway.organizations import set_tier
from tests.conftest import Exchange
from tests.support.factories import document, person

SCOPES = "system/Patient.crs system/DocumentReference.crs system/ServiceRequest.crus system/AuditEvent.rs"
GP = Practitioner(id="C-GP-2", name="全科医生", role="doctor", department="全科")
DOCTOR = Practitioner(id="T-DOC-2", name="专科医生", role="doctor", department="心内科")


@dataclass
class Region:
    exchange: Exchange
    community: HospitalClient
    hospitals: list[HospitalClient]
    community_org: str
    hospital_orgs: list[str]

    async def referral(self, local_id: str = "RR-C-1", **fields: Any) -> httpx.Response:
        body = {"patient_local_id": local_id, "reason": "转诊", "diagnosis": {"code": "E11.9"}, **fields}
        if "candidate_organization_ids" not in fields:
            body.setdefault("target_organization_id", self.hospital_orgs[0])
        return await self.community.call("POST", "/api/v1/referrals", json=body, purpose="referral")


async def _region(exchange: Exchange, hospitals: int = 2) -> Region:
    community = await exchange.member(scopes=SCOPES, name="城南社区卫生服务中心")
    community.practitioner = GP
    members = [await exchange.member(scopes=SCOPES, name=f"第{i + 1}人民医院") for i in range(hospitals)]
    for m in members:
        m.practitioner = DOCTOR
        await set_tier(exchange.settings, org_id=m.org_id, tier="tertiary")  # type: ignore[attr-defined]
    await set_tier(exchange.settings, org_id=community.org_id, tier="community")  # type: ignore[attr-defined]
    patient = person("孙十八")
    assert (await community.call("POST", "/api/v1/patients", json={"local_id": "RR-C-1", **patient})).status_code == 201
    for i, m in enumerate(members):
        assert (await m.call("POST", "/api/v1/patients", json={"local_id": f"RR-H-{i}", **patient})).status_code == 201
    return Region(
        exchange,
        community,
        members,
        community.org_id,  # type: ignore[attr-defined]
        [m.org_id for m in members],  # type: ignore[attr-defined]
    )


@pytest.fixture
async def region(exchange: Exchange) -> AsyncIterator[Region]:
    r = await _region(exchange)
    try:
        yield r
    finally:
        for client in (r.community, *r.hospitals):
            await client.aclose()


async def _move(
    client: HospitalClient, referral_id: str, move: str, version: int | None = None, **body: Any
) -> httpx.Response:
    return await client.call(
        "POST",
        f"/api/v1/referrals/{referral_id}/{move}",
        json=body,
        purpose="referral",
        headers={"If-Match": f'W/"{version}"'} if version is not None else None,
    )


def _statuses(responses: list[httpx.Response]) -> list[int]:
    return sorted(r.status_code for r in responses)


async def _slot(hospital: HospitalClient, department: str = "心内科") -> str:
    start = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=2)
    made = await hospital.call(
        "POST",
        "/api/v1/referral-slots",
        json={
            "slots": [
                {
                    "department": department,
                    "start": start.isoformat(),
                    "end": (start + datetime.timedelta(minutes=20)).isoformat(),
                }
            ]
        },
    )
    assert made.status_code == 201, made.text
    return str(made.json()["slots"][0]["slot_id"])


async def test_accept_and_cancel_on_one_version_exactly_one_wins(region: Region) -> None:
    hospital = region.hospitals[0]
    for _ in range(3):
        created = (await region.referral()).json()
        both = await asyncio.gather(
            _move(hospital, created["referral_id"], "accept", version=created["version"]),
            _move(region.community, created["referral_id"], "cancel", version=created["version"]),
        )
        assert _statuses(both) == [200, 422], [r.text for r in both]
        loser = next(r for r in both if r.status_code == 422).json()["error"]
        assert loser["reason"] in {"referral-state", "referral-version"}
        final = (
            await region.community.call("GET", f"/api/v1/referrals/{created['referral_id']}", purpose="referral")
        ).json()
        assert len(final["history"]) == 1
        assert final["state"] in {"accepted", "cancelled"}


async def test_two_candidates_accepting_exactly_one_wins(region: Region) -> None:
    created = await region.referral(candidate_organization_ids=region.hospital_orgs)
    assert created.status_code == 201, created.text
    referral_id = created.json()["referral_id"]
    assert created.json()["target_organization_id"] == ""
    both = await asyncio.gather(*(_move(h, referral_id, "accept") for h in region.hospitals))
    assert _statuses(both) == [200, 422], [r.text for r in both]
    winner = region.hospital_orgs[[r.status_code for r in both].index(200)]
    loser = region.hospitals[[r.status_code for r in both].index(422)]
    final = (await region.community.call("GET", f"/api/v1/referrals/{referral_id}", purpose="referral")).json()
    assert (final["state"], final["target_organization_id"], final["direction"]) == ("accepted", winner, "up")
    # The loser can no longer act on it, and sees it as accepted by another.
    late = await _move(loser, referral_id, "reject", rejection_code="no-capacity")
    assert (late.status_code, late.json()["error"]["reason"]) == (422, "referral-state")


async def test_a_candidate_declining_leaves_the_others(region: Region) -> None:
    created = (await region.referral(candidate_organization_ids=region.hospital_orgs)).json()
    first = await _move(region.hospitals[0], created["referral_id"], "reject", rejection_code="no-capacity")
    assert (first.status_code, first.json()["state"]) == (200, "requested")
    again = await _move(region.hospitals[0], created["referral_id"], "accept")
    assert (again.status_code, again.json()["error"]["reason"]) == (403, "referral-party")
    last = await _move(region.hospitals[1], created["referral_id"], "reject", rejection_code="no-capacity")
    assert (last.status_code, last.json()["state"], last.json()["rejection_code"]) == (200, "rejected", "no-capacity")


async def test_one_slot_is_booked_by_exactly_one_of_many(region: Region) -> None:
    hospital = region.hospitals[0]
    slot_id = await _slot(hospital)
    attempts = await asyncio.gather(*(region.referral(urgency="urgent", book_slot_id=slot_id) for _ in range(6)))
    assert _statuses(attempts) == [201] + [422] * 5, [r.text for r in attempts]
    assert {r.json()["error"]["reason"] for r in attempts if r.status_code == 422} == {"referral-slot-taken"}
    slots = (await hospital.call("GET", "/api/v1/referral-slots", params={"department": "心内科"})).json()["slots"]
    assert [s["status"] for s in slots if s["slot_id"] == slot_id] == ["busy"]
    routine = await region.referral(book_slot_id=slot_id)
    assert (routine.status_code, routine.json()["error"]["reason"]) == (400, "referral-slot")


async def test_one_bed_goes_to_one_admission_and_cancelling_frees_it(region: Region) -> None:
    hospital = region.hospitals[0]
    beds = await hospital.call("PUT", "/api/v1/referral-beds/心内科", json={"total": 1})
    assert beds.json() == {
        "organization_id": region.hospital_orgs[0],
        "department": "心内科",
        "total": 1,
        "reserved": 0,
        "free": 1,
    }
    ids = []
    for _ in range(2):
        created = (await region.referral(service="admission", urgency="urgent")).json()
        assert (await _move(hospital, created["referral_id"], "accept")).status_code == 200
        ids.append(created["referral_id"])
    both = await asyncio.gather(*(_move(hospital, i, "schedule", bed_department="心内科") for i in ids))
    assert _statuses(both) == [200, 422], [r.text for r in both]
    assert {r.json()["error"]["reason"] for r in both if r.status_code == 422} == {"referral-no-bed"}
    scheduled = ids[[r.status_code for r in both].index(200)]
    # The origin's cancel of a scheduled referral waits for the target's confirmation.
    asked = await _move(region.community, scheduled, "cancel", reason="患者要求就近住院")
    assert (asked.json()["state"], asked.json()["business_status"]) == ("cancel_requested", "5.2")
    refused = await _move(region.community, scheduled, "confirm-cancel")
    assert (refused.status_code, refused.json()["error"]["reason"]) == (403, "referral-party")
    confirmed = await _move(hospital, scheduled, "confirm-cancel")
    assert (confirmed.json()["state"], confirmed.json()["business_status"]) == ("cancelled", "6.0")
    listed = (await hospital.call("GET", "/api/v1/referral-beds")).json()["beds"]
    assert [(b["department"], b["reserved"]) for b in listed] == [("心内科", 0)]


async def test_rejection_carries_code_and_advice_and_frees_the_slot(region: Region) -> None:
    hospital = region.hospitals[0]
    slot_id = await _slot(hospital, "内分泌科")
    created = (await region.referral(urgency="emergency", book_slot_id=slot_id)).json()
    uncoded = await _move(hospital, created["referral_id"], "reject")
    assert (uncoded.status_code, uncoded.json()["error"]["reason"]) == (400, "referral-rejection-code")
    rejected = await _move(
        hospital, created["referral_id"], "reject", rejection_code="inappropriate", advice="建议转内分泌专科医院"
    )
    body = rejected.json()
    assert (body["state"], body["business_status"], body["rejection_code"], body["advice"]) == (
        "rejected",
        "4.0",
        "inappropriate",
        "建议转内分泌专科医院",
    )
    assert all(c["stopped"] for c in body["clocks"])
    free = (
        await hospital.call("GET", "/api/v1/referral-slots", params={"free": "true", "department": "内分泌科"})
    ).json()
    assert slot_id in {s["slot_id"] for s in free["slots"]}
    late = await _move(hospital, created["referral_id"], "accept")
    assert "rejected" in late.json()["error"]["message"]


async def test_hold_pauses_the_accept_clock_until_the_referrer_supplies(region: Region) -> None:
    hospital = region.hospitals[0]
    created = (await region.referral()).json()
    held = (await _move(hospital, created["referral_id"], "hold", advice="请补充近期血糖记录")).json()
    assert (held["state"], held["advice"]) == ("on_hold", "请补充近期血糖记录")
    assert [(c["name"], c["paused"]) for c in held["clocks"]] == [("accept", True)]
    wrong = await _move(hospital, created["referral_id"], "supply")
    assert (wrong.status_code, wrong.json()["error"]["reason"]) == (403, "referral-party")
    supplied = (await _move(region.community, created["referral_id"], "supply", reason="已补充")).json()
    assert supplied["state"] == "received"
    assert [(c["name"], c["paused"]) for c in supplied["clocks"]] == [("accept", False)]


async def test_statistics_of_a_known_set(exchange: Exchange) -> None:
    r = await _region(exchange, hospitals=1)
    hospital = r.hospitals[0]
    authority = await exchange.member(type="authority", name="市卫健委")
    try:
        ids = [(await r.referral()).json()["referral_id"] for _ in range(4)]
        # 0: the whole loop; 1: rejected; 2: cancelled before any decision; 3: accepted only.
        for move in ("accept", "schedule", "arrive"):
            extra = {"slot_id": await _slot(hospital, "统计科")} if move == "schedule" else {}
            assert (await _move(hospital, ids[0], move, **extra)).status_code == 200
        outcome = await hospital.call("POST", "/api/v1/documents", json=document("RR-H-0", "会诊记录".encode()))
        assert (
            await _move(hospital, ids[0], "complete", outcome_document_id=outcome.json()["document_id"])
        ).status_code == 200
        assert (await _move(r.community, ids[0], "acknowledge")).status_code == 200
        assert (await _move(hospital, ids[1], "reject", rejection_code="duplicate")).status_code == 200
        assert (await _move(r.community, ids[2], "cancel")).status_code == 200
        assert (await _move(hospital, ids[3], "accept")).status_code == 200

        stats = await authority.call(
            "GET", "/api/v1/referral-statistics", params={"organization_id": r.community_org}, purpose="audit"
        )
        assert stats.status_code == 200, stats.text
        s = stats.json()
        assert s["total"] == 4
        assert s["by_direction"] == {"up": 4}
        assert s["by_tier_pair"] == {"community->tertiary": 4}
        assert s["by_state"] == {"accepted": 1, "cancelled": 1, "closed": 1, "rejected": 1}
        assert s["acceptance_rate"] == pytest.approx(2 / 3)
        assert s["loop_closure_rate"] == 1.0
        assert s["durations"]["accept"]["samples"] == 2
        assert s["durations"]["outcome"]["samples"] == 1
        assert s["breaches"] == 0
        month = datetime.datetime.now(datetime.UTC).strftime("%Y-%m")
        rows = {(row["organization_id"], row["month"]): row for row in s["by_organization_month"]}
        assert (rows[(r.community_org, month)]["sent"], rows[(r.community_org, month)]["closed"]) == (4, 1)
        # A hospital sees its own figures only.
        own = await hospital.call("GET", "/api/v1/referral-statistics", purpose="referral")
        assert own.json()["total"] == 4
        other = await hospital.call(
            "GET", "/api/v1/referral-statistics", params={"organization_id": r.community_org}, purpose="referral"
        )
        assert (other.status_code, other.json()["error"]["reason"]) == (403, "referral-statistics")
    finally:
        for client in (r.community, hospital, authority):
            await client.aclose()
