"""The registry over real gRPC: entry life cycle (replace, append, entered-in-error), submission sets,
idempotency, consent-filtered keyset pages, filters, shared document types, imaging study
references, and content streamed in chunks with hash and size checked both ways."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import secrets
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import func, select, update

from gateway.client import HospitalClient
from hie.common.v1 import common_pb2
from hie.registry.v1 import registry_pb2, registry_pb2_grpc
from services.registry import store
from tests.conftest import Exchange
from tests.support.factories import grpc_metadata as metadata
from tests.support.factories import person

LOINC = "http://loinc.org"
SHARED = "urn:hie:shared-document-type"
CDA = (
    "<ClinicalDocument xmlns='urn:hl7-org:v3'><title>出院小结</title><text>好转出院</text></ClinicalDocument>".encode()
)


class Hospital:
    """A member hospital talking gRPC to the registry directly, as the gateway would."""

    def __init__(self, client: HospitalClient, token: str, channel: grpc.aio.Channel) -> None:
        self.client = client
        self.org_id: str = client.org_id  # type: ignore[attr-defined]
        self.token = token
        self.stub = registry_pb2_grpc.DocumentRegistryStub(channel)

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return metadata(self.client, self.token)

    async def register(
        self, local_id: str, content: bytes, *, relation: registry_pb2.DocumentRelation | None = None, **entry: object
    ) -> registry_pb2.RegisterDocumentResponse:
        fields: dict[str, object] = {
            "source_document_id": f"DOC-{secrets.token_hex(5)}",
            "patient": common_pb2.PatientRef(local_id=local_id),
            "type_code": registry_pb2.Coding(system=LOINC, code="18842-5", display="出院小结"),
            "title": "出院小结",
            "mime_type": "text/xml",
            "sha256": hashlib.sha256(content).hexdigest(),
            "size": len(content),
            **entry,
        }
        request = registry_pb2.RegisterDocumentRequest(
            entry=registry_pb2.DocumentEntry(**fields), content=content, relation=relation
        )
        return await self.stub.RegisterDocument(request, metadata=self.md)

    async def find(self, local_id: str, **query: object) -> registry_pb2.FindDocumentsResponse:
        request = registry_pb2.FindDocumentsRequest(patient=common_pb2.PatientRef(local_id=local_id), **query)
        return await self.stub.FindDocuments(request, metadata=self.md)

    async def find_all(self, local_id: str, page_size: int, **query: object) -> list[list[str]]:
        pages: list[list[str]] = []
        token = ""
        while True:
            result = await self.find(
                local_id, page=common_pb2.PageRequest(page_size=page_size, page_token=token), **query
            )
            pages.append([e.document_id for e in result.entries])
            token = result.page.next_page_token
            if not token:
                return pages

    async def retrieve(self, document_id: str) -> tuple[registry_pb2.DocumentEntry, list[bytes]]:
        entry = registry_pb2.DocumentEntry()
        chunks: list[bytes] = []
        call = self.stub.RetrieveDocumentStream(
            registry_pb2.RetrieveDocumentStreamRequest(document_id=document_id), metadata=self.md
        )
        async for message in call:
            if message.HasField("entry"):
                entry = message.entry
            else:
                chunks.append(message.chunk)
        return entry, chunks


@pytest.fixture
async def hospitals(exchange: Exchange) -> AsyncIterator[tuple[Hospital, Hospital, str]]:
    """Two hospitals, each with a record of one person (linked by national id): A-local, B-local."""
    a_client = await exchange.member(name="第一人民医院")
    b_client = await exchange.member(name="社区卫生服务中心")
    patient = person("王芳")
    local = f"P-{secrets.token_hex(4)}"
    for client in (a_client, b_client):
        registered = await client.call("POST", "/api/v1/patients", json={"local_id": local, **patient})
        assert registered.status_code == 201, registered.text
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{exchange.services['registry'].port}")
    a = Hospital(a_client, await a_client.access_token(), channel)
    b = Hospital(b_client, await b_client.access_token(), channel)
    try:
        yield a, b, local
    finally:
        await channel.close()
        await a_client.aclose()
        await b_client.aclose()


def _at(days_ago: int) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(datetime.datetime(2026, 11, 1, tzinfo=datetime.UTC) - datetime.timedelta(days=days_ago))
    return ts


def _reason(error: grpc.aio.AioRpcError) -> str:
    return dict(error.trailing_metadata() or ()).get("hie-error-reason", "")  # type: ignore[return-value]


async def test_shared_document_type_is_recorded_with_its_loinc_code_and_found_by_either(hospitals) -> None:
    a, b, local = hospitals
    registered = await a.register(
        local,
        "血常规：白细胞 6.1".encode(),
        type_code=registry_pb2.Coding(system=SHARED, code="lab-report"),
        title="检验报告",
        mime_type="text/plain; charset=utf-8",
    )
    entry = registered.entry
    assert (entry.type_code.system, entry.type_code.code, entry.type_code.display) == (LOINC, "11502-2", "检验报告")
    assert (entry.shared_type.code, entry.shared_type.display) == ("lab-report", "检验报告")
    assert (entry.class_code.system, entry.class_code.code) == ("urn:hie:document-class", "report")
    for code in ("lab-report", "11502-2"):
        found = await b.find(local, type_codes=[code])
        assert [e.document_id for e in found.entries] == [entry.document_id]
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await a.register(local, b"x", type_code=registry_pb2.Coding(system=SHARED, code="no-such-type"))
    assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _reason(unknown.value) == "type-code-unknown"


async def test_replace_supersedes_and_both_versions_stay_retrievable(hospitals) -> None:
    a, b, local = hospitals
    first = (await a.register(local, "出院小结 第一版".encode())).entry
    replaces = registry_pb2.DocumentRelation(
        type=registry_pb2.RELATION_TYPE_REPLACES, target_document_id=first.document_id
    )
    second = (await a.register(local, "出院小结 第二版".encode(), relation=replaces)).entry
    assert second.status == registry_pb2.DOCUMENT_STATUS_CURRENT
    assert [(r.type, r.target_document_id) for r in second.relations] == [
        (registry_pb2.RELATION_TYPE_REPLACES, first.document_id)
    ]
    old = await b.stub.GetDocumentEntry(
        registry_pb2.GetDocumentEntryRequest(document_id=first.document_id), metadata=b.md
    )
    assert old.entry.status == registry_pb2.DOCUMENT_STATUS_SUPERSEDED
    assert [r.target_document_id for r in old.entry.related_by] == [second.document_id]
    # Both versions retrievable by id; a query shows the current one unless asked for more.
    assert b"".join((await b.retrieve(first.document_id))[1]) == "出院小结 第一版".encode()
    assert b"".join((await b.retrieve(second.document_id))[1]) == "出院小结 第二版".encode()
    assert [e.document_id for e in (await b.find(local)).entries] == [second.document_id]
    both = await b.find(local, statuses=[registry_pb2.DOCUMENT_STATUS_CURRENT, registry_pb2.DOCUMENT_STATUS_SUPERSEDED])
    assert {e.document_id for e in both.entries} == {first.document_id, second.document_id}
    # A superseded entry cannot be replaced again; another hospital cannot replace at all.
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await a.register(local, b"third", relation=replaces)
    assert (again.value.code(), _reason(again.value)) == (grpc.StatusCode.FAILED_PRECONDITION, "target-not-current")
    with pytest.raises(grpc.aio.AioRpcError) as foreign:
        await b.register(
            local,
            b"not mine",
            relation=registry_pb2.DocumentRelation(
                type=registry_pb2.RELATION_TYPE_REPLACES, target_document_id=second.document_id
            ),
        )
    assert foreign.value.code() == grpc.StatusCode.NOT_FOUND
    assert (await b.find(local)).entries[0].document_id == second.document_id


async def test_addendum_keeps_the_original_current(hospitals) -> None:
    a, b, local = hospitals
    original = (await a.register(local, "检查报告".encode())).entry
    addendum = (
        await a.register(
            local,
            "补充报告：复查无异常".encode(),
            relation=registry_pb2.DocumentRelation(
                type=registry_pb2.RELATION_TYPE_APPENDS, target_document_id=original.document_id
            ),
        )
    ).entry
    found = {e.document_id: e for e in (await b.find(local)).entries}
    assert set(found) == {original.document_id, addendum.document_id}
    assert found[original.document_id].status == registry_pb2.DOCUMENT_STATUS_CURRENT


async def test_entered_in_error_leaves_queries_and_only_the_source_may_mark_it(hospitals) -> None:
    a, b, local = hospitals
    entry = (await a.register(local, "错误录入".encode())).entry
    with pytest.raises(grpc.aio.AioRpcError) as foreign:
        await b.stub.MarkEnteredInError(
            registry_pb2.MarkEnteredInErrorRequest(document_id=entry.document_id), metadata=b.md
        )
    assert foreign.value.code() == grpc.StatusCode.NOT_FOUND
    marked = await a.stub.MarkEnteredInError(
        registry_pb2.MarkEnteredInErrorRequest(document_id=entry.document_id), metadata=a.md
    )
    assert marked.entry.status == registry_pb2.DOCUMENT_STATUS_ENTERED_IN_ERROR
    assert len(marked.audit_event_ids) == 1
    assert (await b.find(local)).entries == []
    listed = await b.find(local, statuses=[registry_pb2.DOCUMENT_STATUS_ENTERED_IN_ERROR])
    assert [e.document_id for e in listed.entries] == [entry.document_id]
    with pytest.raises(grpc.aio.AioRpcError) as twice:
        await a.stub.MarkEnteredInError(
            registry_pb2.MarkEnteredInErrorRequest(document_id=entry.document_id), metadata=a.md
        )
    assert _reason(twice.value) == "already-entered-in-error"


async def test_register_is_idempotent_by_source_id_and_by_idempotency_key(hospitals) -> None:
    a, _b, local = hospitals
    content = "门诊病历".encode()
    first = await a.register(local, content, source_document_id="OPD-1")
    again = await a.register(local, content, source_document_id="OPD-1")
    assert (first.created, again.created) == (True, False)
    assert again.entry.document_id == first.entry.document_id
    key = secrets.token_hex(8)
    request = registry_pb2.RegisterDocumentRequest(
        entry=registry_pb2.DocumentEntry(
            source_document_id="OPD-2",
            patient=common_pb2.PatientRef(local_id=local),
            type_code=registry_pb2.Coding(system=SHARED, code="outpatient-record"),
            title="门诊病历",
            mime_type="text/plain",
            sha256=hashlib.sha256(content).hexdigest(),
        ),
        content=content,
        idempotency_key=key,
    )
    keyed = await a.stub.RegisterDocument(request, metadata=a.md)
    retried = await a.stub.RegisterDocument(request, metadata=a.md)
    # A keyed retry gets the first answer again: created, and the same audit event.
    assert keyed.created
    assert len(keyed.audit_event_ids) == 1
    assert retried == keyed
    request.entry.source_document_id = "OPD-3"
    with pytest.raises(grpc.aio.AioRpcError) as reused:
        await a.stub.RegisterDocument(request, metadata=a.md)
    assert (reused.value.code(), _reason(reused.value)) == (grpc.StatusCode.ALREADY_EXISTS, "idempotency-key-reused")


async def test_consent_filtered_pages_are_full_and_in_service_time_order(hospitals) -> None:
    a, b, local = hospitals
    permitted: list[tuple[int, str]] = []
    for day in range(9):
        labels = ["PSY"] if day % 3 == 1 else []
        entry = (await a.register(local, f"记录 {day}".encode(), service_start=_at(day), security_labels=labels)).entry
        if not labels:
            permitted.append((day, entry.document_id))
    expected = [document_id for _day, document_id in sorted(permitted)]  # newest service time first
    pages = await b.find_all(local, page_size=2)
    assert [len(p) for p in pages[:-1]] == [2] * (len(pages) - 1)
    assert [d for page in pages for d in page] == expected
    # The registering hospital sees its restricted documents too.
    assert len([d for page in await a.find_all(local, page_size=4) for d in page]) == 9


async def test_pages_merge_the_identities_of_a_person_in_service_time_order(hospitals) -> None:
    """A person known at two hospitals: each identity's entries are read in order and merged (the
    query reads one page per identity, not all of them); pages cross from one identity's entries
    to the other's, and filters and the cursor apply to both."""
    a, b, local = hospitals
    written: list[tuple[int, str, str]] = []
    for day in range(10):
        hospital = a if day % 3 else b  # A: 1, 2, 4, 5, 7, 8; B: 0, 3, 6, 9
        code = "11502-2" if day % 2 else "18842-5"
        entry = (
            await hospital.register(
                local,
                f"记录 {day}".encode(),
                service_start=_at(day),
                type_code=registry_pb2.Coding(system=LOINC, code=code),
            )
        ).entry
        written.append((day, code, entry.document_id))
    newest_first = [document_id for _day, _code, document_id in sorted(written)]
    for reader in (a, b):
        for size in (1, 3, 4, 10, 11):
            pages = await reader.find_all(local, page_size=size)
            assert [d for page in pages for d in page] == newest_first, size
            assert all(len(page) == size for page in pages[:-1])
    lab = [document_id for _day, code, document_id in sorted(written) if code == "11502-2"]
    pages = await b.find_all(local, page_size=2, type_codes=["11502-2"])
    assert [d for page in pages for d in page] == lab
    recent = [document_id for day, _code, document_id in sorted(written) if 2 <= day < 8]
    pages = await a.find_all(local, page_size=4, service_from=_at(7), service_to=_at(1))
    assert [d for page in pages for d in page] == recent
    both = await b.find(local, statuses=[registry_pb2.DOCUMENT_STATUS_CURRENT, registry_pb2.DOCUMENT_STATUS_SUPERSEDED])
    assert [e.document_id for e in both.entries] == newest_first


async def test_query_filters_class_date_range_source_and_status(hospitals) -> None:
    a, b, local = hospitals
    ecg = (
        await a.register(
            local, b"ECG", type_code=registry_pb2.Coding(system=SHARED, code="ecg-report"), service_start=_at(10)
        )
    ).entry
    summary = (await a.register(local, b"DS", service_start=_at(2))).entry
    own = (await b.register(local, "社区随访".encode(), service_start=_at(5))).entry

    async def ids(**query: object) -> set[str]:
        return {e.document_id for e in (await b.find(local, **query)).entries}

    assert await ids(class_codes=["report"]) == {ecg.document_id}
    assert await ids(service_from=_at(6), service_to=_at(1)) == {summary.document_id, own.document_id}
    assert await ids(source_organization_ids=[b.org_id]) == {own.document_id}
    assert await ids(statuses=[registry_pb2.DOCUMENT_STATUS_SUPERSEDED]) == set()
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await b.find(local, page=common_pb2.PageRequest(page_token="not-a-cursor"))
    assert _reason(bad.value) == "page-token"


async def test_imaging_study_reference_keeps_the_images_at_the_source_pacs(hospitals) -> None:
    a, b, local = hospitals
    uid = "1.2.840.113619.2.55.3.604688119.868.1234567890.1"
    url = f"https://pacs.hospital-a.example/dicom-web/studies/{uid}"
    registered = await a.register(
        local,
        b"",
        type_code=registry_pb2.Coding(system=SHARED, code="examination-report"),
        title="胸部CT",
        mime_type="",
        sha256="",
        size=0,
        imaging_study=registry_pb2.ImagingStudyReference(study_instance_uid=uid, wado_rs_url=url),
    )
    entry = registered.entry
    assert entry.content_kind == registry_pb2.CONTENT_KIND_IMAGING_STUDY
    assert (entry.mime_type, entry.size) == ("application/dicom", 0)
    got, chunks = await b.retrieve(entry.document_id)
    assert (got.imaging_study.study_instance_uid, got.imaging_study.wado_rs_url, chunks) == (uid, url, [])
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await a.register(
            local,
            b"",
            sha256="",
            imaging_study=registry_pb2.ImagingStudyReference(
                study_instance_uid="1.2.3", wado_rs_url="ftp://x/studies/1.2.3"
            ),
        )
    assert _reason(bad.value) == "wado-url-invalid"


# --- streamed content ---------------------------------------------------------------------------


async def _upload(
    hospital: Hospital, local: str, content: bytes, *, mime_type: str, piece: int = 64 * 1024, sha256: str = ""
) -> registry_pb2.RegisterDocumentStreamResponse:
    header = registry_pb2.RegisterDocumentRequest(
        entry=registry_pb2.DocumentEntry(
            source_document_id=f"UP-{secrets.token_hex(5)}",
            patient=common_pb2.PatientRef(local_id=local),
            type_code=registry_pb2.Coding(system=SHARED, code="examination-report"),
            title="检查报告",
            mime_type=mime_type,
            sha256=sha256 or hashlib.sha256(content).hexdigest(),
            size=len(content),
        )
    )

    async def messages() -> AsyncIterator[registry_pb2.RegisterDocumentStreamRequest]:
        yield registry_pb2.RegisterDocumentStreamRequest(header=header)
        for i in range(0, len(content), piece):
            yield registry_pb2.RegisterDocumentStreamRequest(chunk=content[i : i + piece])

    return await hospital.stub.RegisterDocumentStream(messages(), metadata=hospital.md)


FHIR_BUNDLE = json.dumps(
    {
        "resourceType": "Bundle",
        "type": "document",
        "entry": [{"resource": {"resourceType": "Composition", "title": "出院小结"}}],
    },
    ensure_ascii=False,
).encode()


@pytest.mark.parametrize(
    ("content", "mime_type"),
    [
        (CDA * 40_000, "application/hl7-cda+xml"),  # ~4 MB: several storage chunks
        (FHIR_BUNDLE, "application/fhir+json"),
        (secrets.token_bytes(2 * 1024 * 1024 + 17), "application/pdf"),
    ],
    ids=["cda", "fhir-json", "binary"],
)
async def test_streamed_round_trip(hospitals, content: bytes, mime_type: str) -> None:
    a, b, local = hospitals
    registered = await _upload(a, local, content, mime_type=mime_type)
    assert registered.created
    assert registered.entry.size == len(content)
    entry, chunks = await b.retrieve(registered.entry.document_id)
    assert b"".join(chunks) == content
    assert entry.sha256 == hashlib.sha256(content).hexdigest()
    assert entry.mime_type == mime_type
    assert len(chunks) == -(-len(content) // (1024 * 1024))


async def test_streamed_register_with_wrong_hash_leaves_nothing(exchange: Exchange, hospitals) -> None:
    a, b, local = hospitals
    content = secrets.token_bytes(1_500_000)
    with pytest.raises(grpc.aio.AioRpcError) as wrong:
        await _upload(a, local, content, mime_type="application/pdf", sha256=hashlib.sha256(b"other").hexdigest())
    assert (wrong.value.code(), _reason(wrong.value)) == (grpc.StatusCode.INVALID_ARGUMENT, "hash-mismatch")
    assert (await b.find(local)).entries == []
    async with exchange.services["registry"].runtime.sessions() as session:
        orphans = await session.execute(
            select(store.DocumentChunk.document_id)
            .outerjoin(store.DocumentEntryRecord, store.DocumentEntryRecord.id == store.DocumentChunk.document_id)
            .where(store.DocumentEntryRecord.id.is_(None))
        )
        assert orphans.first() is None


@pytest.mark.parametrize("size", [300_000, 3 * 1024 * 1024], ids=["one-chunk", "several-chunks"])
async def test_tampered_storage_is_never_served(exchange: Exchange, hospitals, size: int) -> None:
    a, b, local = hospitals
    content = secrets.token_bytes(size)
    document_id = (await _upload(a, local, content, mime_type="application/pdf")).entry.document_id
    last = (size - 1) // (1024 * 1024)
    async with exchange.services["registry"].runtime.sessions() as session, session.begin():
        await session.execute(
            update(store.DocumentChunk)
            .where(store.DocumentChunk.document_id == document_id, store.DocumentChunk.seq == last)
            .values(data=b"tampered")
        )
    received: list[bytes] = []

    async def read_all() -> None:
        call = b.stub.RetrieveDocumentStream(
            registry_pb2.RetrieveDocumentStreamRequest(document_id=document_id), metadata=b.md
        )
        async for message in call:
            if not message.HasField("entry"):
                received.append(message.chunk)

    with pytest.raises(grpc.aio.AioRpcError) as corrupt:
        await read_all()
    assert (corrupt.value.code(), _reason(corrupt.value)) == (grpc.StatusCode.DATA_LOSS, "content-corrupt")
    # The stream ended before the (tampered) last chunk: never the whole content.
    assert len(received) == last
    with pytest.raises(grpc.aio.AioRpcError) as unary:
        await b.stub.RetrieveDocument(registry_pb2.RetrieveDocumentRequest(document_id=document_id), metadata=b.md)
    assert unary.value.code() == grpc.StatusCode.DATA_LOSS


async def test_query_follows_a_link_made_after_the_document_was_registered(exchange: Exchange) -> None:
    a_client = await exchange.member(name="先登记医院")
    b_client = await exchange.member(name="后登记医院")
    patient = person("郑十")
    local = f"L-{secrets.token_hex(4)}"
    assert (await a_client.call("POST", "/api/v1/patients", json={"local_id": local, **patient})).status_code == 201
    async with grpc.aio.insecure_channel(f"127.0.0.1:{exchange.services['registry'].port}") as channel:
        a = Hospital(a_client, await a_client.access_token(), channel)
        b = Hospital(b_client, await b_client.access_token(), channel)
        document_id = (await a.register(local, "先前的出院小结".encode())).entry.document_id
        # Hospital B meets the person only now: mpi links its record; nothing is re-registered.
        linked = await b_client.call("POST", "/api/v1/patients", json={"local_id": f"B{local}", **patient})
        assert linked.json()["link_method"] == "national-id"
        found = await b.find(f"B{local}")
        assert [e.document_id for e in found.entries] == [document_id]
        assert found.enterprise_id == linked.json()["enterprise_id"]
    await a_client.aclose()
    await b_client.aclose()


async def test_concurrent_replacements_of_one_version_let_exactly_one_win(hospitals) -> None:
    a, b, local = hospitals
    original = (await a.register(local, "原始版本".encode())).entry
    replaces = registry_pb2.DocumentRelation(
        type=registry_pb2.RELATION_TYPE_REPLACES, target_document_id=original.document_id
    )
    results = await asyncio.gather(
        *(a.register(local, f"修订版 {i}".encode(), relation=replaces) for i in range(4)),
        return_exceptions=True,
    )
    won = [r for r in results if isinstance(r, registry_pb2.RegisterDocumentResponse)]
    lost = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(won) == 1
    assert len(lost) == 3
    assert {_reason(e) for e in lost} == {"target-not-current"}
    current = await b.find(local)
    assert [e.document_id for e in current.entries] == [won[0].entry.document_id]


async def test_content_is_encrypted_at_rest_and_chunks_cannot_be_swapped(exchange: Exchange, hospitals) -> None:
    a, b, local = hospitals
    content = ("出院诊断：社区获得性肺炎。" * 120_000).encode()  # ~4.7 MB: several chunks
    document_id = (await _upload(a, local, content, mime_type="text/plain")).entry.document_id
    registry = exchange.services["registry"].runtime
    async with registry.sessions() as session:
        stored = [
            row[0]
            for row in await session.execute(
                select(store.DocumentChunk.data)
                .where(store.DocumentChunk.document_id == document_id)
                .order_by(store.DocumentChunk.seq)
            )
        ]
        wrapped = await session.scalar(
            select(store.DocumentEntryRecord.content_key).where(store.DocumentEntryRecord.id == document_id)
        )
    assert len(stored) == -(-len(content) // (1024 * 1024)) > 1
    assert wrapped is not None
    assert all("社区获得性肺炎".encode() not in chunk for chunk in stored)  # ciphertext only
    _entry, chunks = await b.retrieve(document_id)
    assert b"".join(chunks) == content

    # Two valid ciphertext chunks swapped in storage: authentication fails, nothing is served.
    async with registry.sessions() as session, session.begin():
        for seq, data in ((0, stored[1]), (1, stored[0])):
            await session.execute(
                update(store.DocumentChunk)
                .where(store.DocumentChunk.document_id == document_id, store.DocumentChunk.seq == seq)
                .values(data=data)
            )
    with pytest.raises(grpc.aio.AioRpcError) as swapped:
        await b.stub.RetrieveDocument(registry_pb2.RetrieveDocumentRequest(document_id=document_id), metadata=b.md)
    assert (swapped.value.code(), _reason(swapped.value)) == (grpc.StatusCode.DATA_LOSS, "content-corrupt")


async def test_data_key_rotation_rewraps_document_keys_and_content_stays_readable(
    exchange: Exchange, hospitals
) -> None:
    from services.ops.data_keys import keys_in_use, rotate_data_keys
    from services.registry.service import SPEC as REGISTRY

    a, b, local = hospitals
    content = "检验报告：血常规正常".encode()
    document_id = (await _upload(a, local, content, mime_type="text/plain")).entry.document_id
    settings = exchange.services["registry"].runtime.settings
    report = await rotate_data_keys(settings, specs=[REGISTRY], settle_seconds=0, echo=lambda _: None)
    assert [p.unreadable for _name, p in report.tables] == [[]]
    assert await keys_in_use(settings, specs=[REGISTRY]) == {report.new_key}
    _entry, chunks = await b.retrieve(document_id)
    assert b"".join(chunks) == content


async def test_concurrent_registrations_commit_each_exactly_once(hospitals) -> None:
    """Many registrations at once: each good one is stored once with its content, a concurrent
    duplicate is answered as the retry, a bad one leaves nothing."""
    a, _b, local = hospitals
    bodies = {f"GC-{secrets.token_hex(3)}-{n}": f"出院小结 第{n}份：病情稳定。".encode() for n in range(24)}
    duplicated = list(bodies)[:6]

    async def good(source_id: str) -> registry_pb2.RegisterDocumentResponse:
        return await a.register(local, bodies[source_id], source_document_id=source_id)

    async def bad(n: int) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await a.register(local, "被篡改的内容".encode(), sha256="0" * 64, source_document_id=f"GC-BAD-{n}")
        return refused.value

    results = await asyncio.gather(
        *(good(s) for s in [*bodies, *duplicated]), *(bad(n) for n in range(6)), return_exceptions=False
    )
    registered = results[: len(bodies) + len(duplicated)]
    refusals = results[len(bodies) + len(duplicated) :]
    assert all(_reason(r) == "hash-mismatch" for r in refusals)  # type: ignore[arg-type]
    by_source: dict[str, set[str]] = {}
    created = 0
    for response in registered:
        by_source.setdefault(response.entry.source_document_id, set()).add(response.entry.document_id)  # type: ignore[union-attr]
        created += response.created  # type: ignore[union-attr]
    assert created == len(bodies)
    assert all(len(ids) == 1 for ids in by_source.values())
    found = [e for page in await a.find_all(local, 50) for e in page]
    assert sorted(found) == sorted(next(iter(ids)) for ids in by_source.values())
    for source_id, ids in list(by_source.items())[:5]:
        _entry, chunks = await a.retrieve(next(iter(ids)))
        assert b"".join(chunks) == bodies[source_id]


# --- submission sets --------------------------------------------------------------------------

SET_CDA = "<ClinicalDocument xmlns='urn:hl7-org:v3'><title>{title}</title><text>{text}</text></ClinicalDocument>"


def _set_document(local_id: str, content: bytes, **entry: object) -> registry_pb2.RegisterDocumentRequest:
    fields: dict[str, object] = {
        "source_document_id": f"SET-{secrets.token_hex(5)}",
        "patient": common_pb2.PatientRef(local_id=local_id),
        "type_code": registry_pb2.Coding(system=LOINC, code="11502-2", display="检验报告"),
        "title": "检验报告",
        "mime_type": "text/xml",
        "sha256": hashlib.sha256(content).hexdigest(),
        "size": len(content),
        **entry,
    }
    return registry_pb2.RegisterDocumentRequest(entry=registry_pb2.DocumentEntry(**fields), content=content)


def _set_contents(n: int) -> list[bytes]:
    return [SET_CDA.format(title="检验报告", text=f"血常规第{i}次：白细胞 {5 + i}.2×10⁹/L").encode() for i in range(n)]


async def _entries_named(exchange: Exchange, source_document_id: str) -> int:
    async with exchange.services["registry"].runtime.sessions() as session:
        count = await session.scalar(
            select(func.count())
            .select_from(store.DocumentEntryRecord)
            .where(store.DocumentEntryRecord.source_document_id == source_document_id)
        )
        return int(count or 0)


async def _register_set(
    hospital: Hospital, documents: list[registry_pb2.RegisterDocumentRequest]
) -> registry_pb2.RegisterSubmissionSetResponse:
    return await hospital.stub.RegisterSubmissionSet(
        registry_pb2.RegisterSubmissionSetRequest(documents=documents), metadata=hospital.md
    )


async def test_a_set_registers_every_document_and_each_is_found_and_retrieved(exchange: Exchange, hospitals) -> None:
    a, b, local = hospitals
    contents = _set_contents(5)
    documents = [_set_document(local, c) for c in contents]
    answer = await _register_set(a, documents)
    assert [d.created for d in answer.documents] == [True] * 5
    assert [d.entry.source_document_id for d in answer.documents] == [d.entry.source_document_id for d in documents]
    assert {d.entry.enterprise_id for d in answer.documents} == {answer.enterprise_id}
    # One audit event for the set, naming every document it registered.
    assert len({tuple(d.audit_event_ids) for d in answer.documents}) == 1
    assert len(answer.documents[0].audit_event_ids) == 1

    # The other hospital finds all five through its own record of the person, and reads each.
    found = await b.find(local)
    ids = [d.entry.document_id for d in answer.documents]
    assert sorted(e.document_id for e in found.entries) == sorted(ids)
    for document_id, content in zip(ids, contents, strict=True):
        entry, chunks = await b.retrieve(document_id)
        assert b"".join(chunks) == content
        assert entry.sha256 == hashlib.sha256(content).hexdigest()

    await exchange.audit_settled()
    auditor = await exchange.member(type="authority", scopes="system/AuditEvent.rs", name="市卫健委")
    listed = await auditor.call(
        "GET",
        "/api/v1/audit/events",
        params={"type": "document.register", "organization_id": a.org_id},
        purpose="audit",
    )
    events = [e for e in listed.json()["events"] if e["event_id"] == answer.documents[0].audit_event_ids[0]]
    assert len(events) == 1
    assert sorted(x["id"] for x in events[0]["entities"]) == sorted(ids)


async def test_resubmitting_a_set_registers_nothing_twice(exchange: Exchange, hospitals) -> None:
    a, _b, local = hospitals
    documents = [_set_document(local, c) for c in _set_contents(3)]
    first = await _register_set(a, documents)
    # A retry with one more document: the three are answered as they were, the new one registered.
    extra = _set_document(local, b"<ClinicalDocument>addendum</ClinicalDocument>")
    again = await _register_set(a, [*documents, extra])
    assert [d.created for d in again.documents] == [False, False, False, True]
    assert [d.entry.document_id for d in again.documents[:3]] == [d.entry.document_id for d in first.documents]
    for request in documents:
        assert await _entries_named(exchange, request.entry.source_document_id) == 1


async def test_one_bad_document_refuses_the_whole_set_and_leaves_nothing(exchange: Exchange, hospitals) -> None:
    a, b, local = hospitals
    contents = _set_contents(4)
    documents = [_set_document(local, c) for c in contents]
    documents[2].entry.sha256 = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _register_set(a, documents)
    assert (refused.value.code(), _reason(refused.value)) == (grpc.StatusCode.INVALID_ARGUMENT, "hash-mismatch")
    assert "document 3 of the submission set" in (refused.value.details() or "")
    assert "白细胞" not in (refused.value.details() or "")
    for request in documents:
        assert await _entries_named(exchange, request.entry.source_document_id) == 0
    assert (await b.find(local)).entries == []


@pytest.mark.parametrize(
    ("shape", "reason"),
    [
        ("two-patients", "submission-set-patient-mismatch"),
        ("duplicate", "submission-set-duplicate"),
        ("empty", "submission-set-empty"),
        ("unregistered", "patient-not-registered"),
    ],
)
async def test_malformed_sets_are_refused_with_a_reason(hospitals, shape: str, reason: str) -> None:
    a, _b, local = hospitals
    one, two = (_set_document(local, c) for c in _set_contents(2))
    if shape == "two-patients":
        two.entry.patient.local_id = "SOMEONE-ELSE"
        documents = [one, two]
    elif shape == "duplicate":
        two.entry.source_document_id = one.entry.source_document_id
        documents = [one, two]
    elif shape == "empty":
        documents = []
    else:
        documents = [_set_document("NEVER-REGISTERED", b"<x/>")]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _register_set(a, documents)
    assert _reason(refused.value) == reason
    expected = grpc.StatusCode.FAILED_PRECONDITION if shape == "unregistered" else grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.code() == expected


async def test_a_set_may_replace_an_earlier_document(hospitals) -> None:
    a, b, local = hospitals
    original = await a.register(local, b"<ClinicalDocument>v1</ClinicalDocument>")
    replacement = _set_document(local, b"<ClinicalDocument>v2</ClinicalDocument>")
    replacement.relation.CopyFrom(
        registry_pb2.DocumentRelation(
            type=registry_pb2.RELATION_TYPE_REPLACES, target_document_id=original.entry.document_id
        )
    )
    answer = await _register_set(a, [replacement, _set_document(local, b"<x>other</x>")])
    assert len(answer.documents[0].audit_event_ids) == 2  # registered, and the original superseded
    current = {e.document_id for e in (await b.find(local)).entries}
    assert answer.documents[0].entry.document_id in current
    assert original.entry.document_id not in current
