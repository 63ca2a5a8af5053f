"""Document queries follow the patient index: after a merge and after an unmerge, without
re-registering any document."""

from __future__ import annotations

import secrets

from gateway.client import Practitioner
from tests.conftest import Exchange
from tests.support.factories import document, person

ADMIN = Practitioner(id="AD-9", name="郑信息", role="admin", department="信息科")
SCOPES = "system/Patient.crus system/DocumentReference.crs"


async def test_a_query_follows_a_merge_and_an_unmerge(exchange: Exchange) -> None:
    a = await exchange.member(scopes=SCOPES, name="市第二人民医院")
    b = await exchange.member(scopes=SCOPES, name="城南社区卫生服务中心")
    tag = secrets.token_hex(3)
    same = person("欧阳娜")
    # A holds the person twice (an old record with a mistyped birth date, so no match); B once,
    # linked to A's main record.
    main = await a.call("POST", "/api/v1/patients", json={"local_id": f"FM-1-{tag}", **same})
    at_b = await b.call("POST", "/api/v1/patients", json={"local_id": f"FB-{tag}", **same})
    old = await a.call(
        "POST",
        "/api/v1/patients",
        json={"local_id": f"FM-2-{tag}", "name": "欧阳娜", "gender": same["gender"], "birth_date": "1901-02-03"},
    )
    assert main.status_code == old.status_code == at_b.status_code == 201
    assert at_b.json()["enterprise_id"] == main.json()["enterprise_id"]
    note = await a.call("POST", "/api/v1/documents", json=document(f"FM-2-{tag}", "门诊病历：高血压复诊".encode()))
    assert note.status_code == 201, note.text

    async def seen_by_b() -> set[str]:
        found = await b.call("GET", "/api/v1/documents", params={"patient_local_id": f"FB-{tag}"})
        assert found.status_code == 200, found.text
        return {e["document_id"] for e in found.json()["entries"]}

    note_id = note.json()["document_id"]
    before = await seen_by_b()
    merged = await a.call(
        "POST",
        "/api/v1/patients/merge",
        json={"survivor_local_id": f"FM-1-{tag}", "subsumed_local_id": f"FM-2-{tag}"},
        as_user=ADMIN,
    )
    assert merged.status_code == 200, merged.text
    after_merge = await seen_by_b()
    # Retrieval follows too: the document is filed under the record merged away.
    retrieved = await b.call("GET", f"/api/v1/documents/{note_id}/content")
    assert retrieved.status_code == 200, retrieved.text
    unmerged = await a.call("POST", f"/api/v1/patients/FM-2-{tag}/unmerge", as_user=ADMIN)
    assert unmerged.status_code == 200, unmerged.text
    after_unmerge = await seen_by_b()
    # Merged: the old record's documents are the person's. Unmerged: apart again.
    assert (note_id in before, note_id in after_merge, note_id in after_unmerge) == (False, True, False)
