"""Audit delivery batches many requests' events into one append and keeps every trace reachable."""

from __future__ import annotations

import secrets

from gateway.client import new_traceparent
from tests.conftest import Exchange
from tests.support.factories import person


async def test_one_append_carries_the_events_of_several_traces_and_links_each(exchange: Exchange, spans) -> None:  # type: ignore[no-untyped-def]
    hospital = await exchange.member(name="市第二人民医院")
    registered = await hospital.call("POST", "/api/v1/patients", json={"local_id": "RELAY-1", **person("李四")})
    assert registered.status_code == 201, registered.text
    await exchange.audit_settled()
    outbox = exchange.services["mpi"].runtime.outbox
    # The relay paused, so the three requests' events are pending together.
    await outbox.stop()
    try:
        traces = [secrets.token_hex(16) for _ in range(3)]
        spans.clear()
        for trace in traces:
            answered = await hospital.call(
                "GET", "/api/v1/patients/RELAY-1/cross-references", traceparent=new_traceparent(trace)
            )
            assert answered.status_code == 200
        assert await outbox.relay_once() == 3
    finally:
        outbox.start()
    relays = [s for s in spans.get_finished_spans() if s.name == "audit.relay"]
    assert len(relays) == 1
    relay = relays[0]
    assert relay.attributes["hie.audit.events"] == 3  # type: ignore[index]
    # It continues the first request's trace and links to the other two.
    assert format(relay.context.trace_id, "032x") == traces[0]
    assert [format(link.context.trace_id, "032x") for link in relay.links] == traces[1:]
    # One append reached the audit service, inside the relay's trace.
    appends = [s for s in spans.get_finished_spans() if s.name == "/hie.audit.v1.AuditLog/Append"]
    assert {format(s.context.trace_id, "032x") for s in appends} == {traces[0]}

    auditor = await exchange.member(type="authority", scopes="system/AuditEvent.rs", name="市卫健委")
    for trace in traces:
        listed = await auditor.call("GET", "/api/v1/audit/events", params={"trace_id": trace}, purpose="audit")
        assert [e["type"] for e in listed.json()["events"]] == ["patient.pix-query"]
