"""The referral screen offers a person only the moves their side and role may make, and a move
made there is the person's own through the public API (over plain HTTP, in English): a nurse of
the receiving hospital sees the nurse's moves of an accepted referral, not the doctor's, and her
note lands in the referral's history under her name and role."""

from __future__ import annotations

import re
import secrets

import httpx

from gateway.client import Practitioner
from gateway.console.admin import add_console_user
from gateway.organizations import set_tier
from tests.conftest import Exchange
from tests.support.factories import person

SCOPES = "system/Patient.crs system/DocumentReference.crs system/ServiceRequest.crus system/AuditEvent.rs"
PASSWORD = "一个足够长的密码-2026"
CARDIO = Practitioner(id="T-CARD-9", name="心内科医生", role="doctor", department="心内科")


async def _sign_in(http: httpx.AsyncClient, exchange: Exchange, org: str, username: str) -> None:
    form = await http.get(f"{exchange.base_url}/console/login")
    fields = dict(re.findall(r'name="([a-z_]+)" value="([^"]*)"', form.text))
    fields.pop("method", None)
    fields.update({"org": org, "username": username, "password": PASSWORD})
    landed = await http.post(f"{exchange.base_url}/oauth2/authorize", data=fields)
    assert landed.url.path == "/console/clinician", landed.text


async def test_a_nurse_sees_the_nurse_moves_and_her_note_is_hers(exchange: Exchange) -> None:
    community = await exchange.member(scopes=SCOPES, name="城西社区卫生服务中心")
    hospital = await exchange.member(scopes=SCOPES, name="市第二人民医院")
    c_org, h_org = community.org_id, hospital.org_id  # type: ignore[attr-defined]
    await set_tier(exchange.settings, org_id=c_org, tier="community")
    await set_tier(exchange.settings, org_id=h_org, tier="tertiary")
    hospital.practitioner = CARDIO
    local = f"RN-{secrets.token_hex(3)}"
    made = await community.call("POST", "/api/v1/patients", json={"local_id": local, **person("慕容雪")})
    assert made.status_code == 201, made.text
    created = await community.call(
        "POST",
        "/api/v1/referrals",
        json={"patient_local_id": local, "target_organization_id": h_org, "reason": "腰痛三月，需专科评估"},
        purpose="referral",
        headers={"Idempotency-Key": secrets.token_hex(8)},
    )
    assert created.status_code == 201, created.text
    rid = created.json()["referral_id"]
    accepted = await hospital.call(
        "POST", f"/api/v1/referrals/{rid}/accept", json={}, purpose="referral",
        headers={"Idempotency-Key": secrets.token_hex(8)},
    )  # fmt: skip
    assert accepted.status_code == 200, accepted.text
    nurse = f"nurse{secrets.token_hex(3)}"
    await add_console_user(
        exchange.settings, org_id=h_org, username=nurse, display_name="端木护士", role="nurse",
        department="心内科", password=PASSWORD,
    )  # fmt: skip

    async with httpx.AsyncClient(follow_redirects=True, headers={"accept-language": "en-GB"}) as http:
        await _sign_in(http, exchange, h_org, nurse)
        page = await http.get(f"{exchange.base_url}/console/referrals/{rid}")
        assert page.status_code == 200
        assert 'data-state="accepted"' in page.text
        assert "Accepted" in page.text
        offered = set(re.findall(r'name="move" value="([a-z-]+)"', page.text))
        # The receiving side may schedule, note, complete… a nurse only notes here (arrival comes
        # after scheduling); the doctor's moves are not offered to her.
        assert offered == {"note"}
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        key = re.search(r'name="request_key" value="([^"]+)"', page.text)
        assert csrf is not None
        assert key is not None
        noted = await http.post(
            f"{exchange.base_url}/console/referrals/{rid}/move",
            data={"csrf": csrf.group(1), "request_key": key.group(1), "move": "note", "reason": "已电话通知患者"},
        )
        assert noted.status_code == 200, noted.text
        assert "Done" in noted.text
        # A doctor's move sent anyway (a forged form) is refused by the referral service.
        forged = await http.post(
            f"{exchange.base_url}/console/referrals/{rid}/move",
            data={"csrf": csrf.group(1), "move": "complete", "outcome_document_id": "x"},
        )
        assert forged.status_code == 403
        assert "role" in forged.text

    history = (await hospital.call("GET", f"/api/v1/referrals/{rid}", purpose="referral")).json()["history"]
    assert (history[-1]["move"], history[-1]["practitioner_id"], history[-1]["role"], history[-1]["reason"]) == (
        "note",
        nurse,
        "nurse",
        "已电话通知患者",
    )
    for client in (community, hospital):
        await client.aclose()
