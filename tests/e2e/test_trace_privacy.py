"""No span attribute carries a patient's name, national id, phone number or local id."""

from __future__ import annotations

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.conftest import Exchange
from tests.support.factories import document, person


async def test_spans_carry_no_patient_identifiers(exchange: Exchange, spans: InMemorySpanExporter) -> None:
    a = await exchange.member()
    b = await exchange.member()
    patient = person("欧阳修", phones=["13912345678"])
    secrets_in_play = [patient["name"], patient["national_id"], "13912345678", "SPAN-MRN-77", "SPAN-B-88", "欧阳"]
    assert (await a.call("POST", "/api/v1/patients", json={"local_id": "SPAN-MRN-77", **patient})).status_code == 201
    assert (await b.call("POST", "/api/v1/patients", json={"local_id": "SPAN-B-88", **patient})).status_code == 201
    registered = await a.call("POST", "/api/v1/documents", json=document("SPAN-MRN-77", "欧阳修的出院小结".encode()))
    assert registered.status_code == 201
    found = await b.call("GET", "/api/v1/documents", params={"patient_local_id": "SPAN-B-88"})
    assert found.status_code == 200
    document_id = found.json()["entries"][0]["document_id"]
    assert (await b.call("GET", f"/api/v1/documents/{document_id}/content")).status_code == 200
    assert (await b.call("GET", "/api/v1/patients/SPAN-B-88/cross-references")).status_code == 200
    await exchange.audit_settled()
    finished = spans.get_finished_spans()
    assert len(finished) > 20
    for span in finished:
        flat = " ".join([span.name, *(f"{k}={v}" for k, v in (span.attributes or {}).items())])
        for event in span.events:
            flat += " " + " ".join(f"{k}={v}" for k, v in (event.attributes or {}).items())
        for value in secrets_in_play:
            assert value not in flat, f"{value!r} leaked into span {span.name}"
    # The operation is still named by its route template.
    routes = {s.attributes.get("http.route") for s in finished if s.attributes}
    assert "/api/v1/patients/{local_id}/cross-references" in routes
    for member in (a, b):
        await member.aclose()
