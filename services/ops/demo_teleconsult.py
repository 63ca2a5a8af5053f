"""The remote-consultation part of `hie demo`: the community hospital asks the tertiary hospital
to read a chest CT; the report comes back signed with the consulting hospital's own key, filed in
the registry, and the requester verifies the signature with the published keys."""

from __future__ import annotations

import base64
import hashlib
from typing import TYPE_CHECKING

import jwt

from gateway.client import HospitalClient, Practitioner
from services.teleconsult import report as consultation_report

if TYPE_CHECKING:
    from services.ops.demo import DemoReport

STUDY_UID = "1.2.156.112605.14038.20261205.4711"


async def consultation_steps(
    report: DemoReport, *, requester: HospitalClient, consultant: HospitalClient, patient_local_id: str, run: str
) -> str:
    """Request → consent → accept → review → signed report → verified → closed; returns the id."""
    from services.ops.demo import DemoFailed

    echo = report.echo
    radiologist = Practitioner(id="A-RAD-01", name="赵主任", role="doctor", department="影像科")
    admin = Practitioner(id="A-ADM-01", name="信息科", role="admin", department="信息科")
    study = report.step(
        "B registers the chest CT by reference (Study Instance UID + WADO-RS, XDS-I.b)",
        await requester.call(
            "POST",
            "/api/v1/documents",
            json={
                "source_document_id": f"B-CT-{run}",
                "patient_local_id": patient_local_id,
                "type": {"system": "http://loinc.org", "code": "18748-4", "display": "胸部CT"},
                "title": "胸部CT平扫",
                "imaging_study": {
                    "study_instance_uid": STUDY_UID,
                    "wado_rs_url": f"https://pacs.chc-b.example/wado-rs/studies/{STUDY_UID}",
                },
            },
        ),
        201,
    )
    form_content = "远程会诊知情同意书（患者本人签字）".encode()
    form = report.step(
        "B files the patient's signed informed-consent form (知情同意书)",
        await requester.call(
            "POST",
            "/api/v1/documents",
            json={
                "source_document_id": f"B-IC-{run}",
                "patient_local_id": patient_local_id,
                "type": {"system": "http://loinc.org", "code": "59284-0", "display": "知情同意书"},
                "title": "远程会诊知情同意书",
                "mime_type": "text/plain",
                "sha256": hashlib.sha256(form_content).hexdigest(),
                "size": len(form_content),
                "content_base64": base64.b64encode(form_content).decode(),
            },
        ),
        201,
    )
    report.step(
        "A lists its radiologist in the specialist directory",
        await consultant.call(
            "PUT",
            f"/api/v1/specialists/{radiologist.id}",
            as_user=admin,
            json={
                "name": radiologist.name,
                "department": "影像科",
                "professional_title": "主任医师",
                "years_independent_practice": 15,
                "kinds": ["imaging"],
            },
        ),
        200,
    )
    created = report.step(
        "B requests a remote imaging diagnosis (远程影像诊断) from A",
        await requester.call(
            "POST",
            "/api/v1/consultations",
            purpose="consultation",
            json={
                "patient_local_id": patient_local_id,
                "consultant_organization_id": consultant.org_id,  # type: ignore[attr-defined]
                "kind": "imaging",
                "urgency": "urgent",
                "question": "右肺上叶结节，性质待定",
                "purpose": "明确诊断，决定是否转诊",
                "summary": "咳嗽两周，低热",
                "invited_practitioner_id": radiologist.id,
                "imaging_studies": [
                    {
                        "study_instance_uid": STUDY_UID,
                        "wado_rs_url": f"https://pacs.chc-b.example/wado-rs/studies/{STUDY_UID}",
                        "document_id": study["document_id"],
                    }
                ],
            },
        ),
        201,
    )
    cid = created["consultation_id"]
    if echo:
        print(f"      consultation_id: {cid}  turnaround due: {created['clocks'][0]['due']}")

    async def move(who: HospitalClient, name: str, title: str, **body: object) -> dict:
        return report.step(
            title,
            await who.call(
                "POST", f"/api/v1/consultations/{cid}/{name}", purpose="consultation", json=body, as_user=None
            ),
            200,
        )

    await move(
        requester,
        "record-consent",
        "B records the patient's informed consent",
        informed_consent={"evidence_document_id": form["document_id"], "signer": "patient"},
    )
    consultant.practitioner = radiologist
    await move(consultant, "accept", "A accepts (consent granted for purpose consultation)")
    await move(consultant, "start-review", "A's radiologist starts the review")
    draft = report.step(
        "A renders the report to sign",
        await consultant.call(
            "POST",
            f"/api/v1/consultations/{cid}/report-draft",
            purpose="consultation",
            json={
                "report": {
                    "findings": "右肺上叶见 8mm 磨玻璃结节，边界清",
                    "impression": "考虑原位腺癌可能",
                    "recommendations": "建议 3 个月后复查薄层 CT",
                }
            },
        ),
        200,
    )
    resource = draft["diagnostic_report"]
    signed = await move(
        consultant,
        "sign",
        "A signs the report with its own key (DiagnosticReport + Provenance, ES384 detached JWS)",
        diagnostic_report=resource,
        signature=consultation_report.sign(resource, consultant.key),
    )
    got = report.step(
        "B reads the signed report",
        await requester.call("GET", f"/api/v1/consultations/{cid}/report", purpose="consultation"),
        200,
    )
    final = got["versions"][0]
    keys = report.step(
        "B fetches A's published keys",
        await requester.http.get(f"{requester.base_url}/api/v1/organizations/{consultant.org_id}/jwks.json"),  # type: ignore[attr-defined]
        200,
    )["keys"]
    jws = base64.b64decode(final["provenance"]["signature"][0]["data"]).decode()
    kid = jwt.get_unverified_header(jws)["kid"]
    key = next((k for k in keys if k["kid"] == kid), None)
    if key is None:
        raise DemoFailed("the report's signing key is not among A's published keys")
    try:
        jwt.api_jws.PyJWS().decode_complete(
            jws,
            key=jwt.PyJWK(key),
            algorithms=[key.get("alg", "ES384")],
            detached_payload=consultation_report.canonical(final["diagnostic_report"]),
        )
    except jwt.PyJWTError:
        raise DemoFailed("the report's signature does not verify") from None
    filed = await requester.call("GET", f"/api/v1/documents/{final['document_id']}/content", purpose="treatment")
    report.step("B retrieves the consultation record filed in the registry", filed, 200)
    if hashlib.sha256(filed.content).hexdigest() != final["sha256"]:
        raise DemoFailed("the filed consultation record does not match its hash")
    if echo:
        print(f"      signature verified with key {kid[:16]}…; record {final['document_id']} hash checked")
        print(f"      impression: {final['impression']}")
    await move(
        requester,
        "close",
        "B closes the consultation (the inviting doctor keeps the decision)",
        reason="已阅报告，纳入诊疗计划",
    )
    if signed["state"] != "report_final":
        raise DemoFailed("the consultation did not reach a final report")
    return cid
