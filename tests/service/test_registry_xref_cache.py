"""The registry's cross-reference cache: only the mpi may make it drop its entries, and an answer
the mpi gave before an invalidation is never kept after it."""

from __future__ import annotations

import asyncio
import hashlib
import secrets

import grpc
import pytest

from hie.common.v1 import common_pb2
from hie.registry.v1 import registry_pb2, registry_pb2_grpc
from services.registry.xref_cache import CrossReferenceCache
from services.shared.auth import PlatformCredentials
from tests.conftest import Exchange
from tests.support.factories import grpc_metadata as metadata
from tests.support.factories import person


async def test_only_the_mpi_invalidates_cross_references(exchange: Exchange) -> None:
    hospital = await exchange.member(name="第六人民医院")
    key_file = exchange.settings.service_signing_key_file
    as_mpi = PlatformCredentials.from_file(key_file, service="mpi", issuer="urn:hie:service:mpi")
    as_consent = PlatformCredentials.from_file(key_file, service="consent", issuer="urn:hie:service:consent")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{exchange.services['registry'].port}") as channel:
        stub = registry_pb2_grpc.DocumentRegistryStub(channel)
        request = registry_pb2.InvalidateCrossReferencesRequest()
        for refused in (metadata(hospital, await hospital.access_token()), as_consent.metadata()):
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await stub.InvalidateCrossReferences(request, metadata=refused)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        first = await stub.InvalidateCrossReferences(request, metadata=as_mpi.metadata())
        second = await stub.InvalidateCrossReferences(request, metadata=as_mpi.metadata())
        # Monotonic: every acknowledged invalidation moves the registry's generation on.
        assert second.generation > first.generation > 0
    await hospital.aclose()


async def test_an_answer_in_flight_during_an_invalidation_is_not_kept(exchange: Exchange) -> None:
    hospital = await exchange.member(name="第七人民医院")
    local_id = f"XC-{secrets.token_hex(3)}"
    registered = await hospital.call("POST", "/api/v1/patients", json={"local_id": local_id, **person("诸葛兰")})
    assert registered.status_code == 201, registered.text
    ref = common_pb2.PatientRef(domain=hospital.org_id, local_id=local_id)  # type: ignore[attr-defined]
    runtime = exchange.services["registry"].runtime
    cache = CrossReferenceCache(ttl=30)
    # The mpi is asked; an invalidation arrives before its answer does: the answer is returned
    # (it was true when asked) but not kept, since it may predate the change invalidated for.
    asking = asyncio.create_task(cache.cross_reference(runtime, ref))
    await asyncio.sleep(0)
    cache.invalidate()
    assert (await asking).enterprise_id == registered.json()["enterprise_id"]
    assert (ref.domain, ref.local_id) not in cache
    # Undisturbed, the same answer is kept.
    await cache.cross_reference(runtime, ref)
    assert (ref.domain, ref.local_id) in cache
    await hospital.aclose()


async def test_registrations_one_by_one_ask_the_mpi_once_and_never_keep_an_unknown_patient(
    exchange: Exchange,
) -> None:
    hospital = await exchange.member(name="第八人民医院")
    local_id = f"XR-{secrets.token_hex(3)}"
    registered = await hospital.call("POST", "/api/v1/patients", json={"local_id": local_id, **person("欧阳敏")})
    assert registered.status_code == 201, registered.text
    cache = exchange.services["registry"].servicers["hie.registry.v1.DocumentRegistry"]._xrefs
    key = (hospital.org_id, local_id)  # type: ignore[attr-defined]
    unknown = (hospital.org_id, f"XR-{secrets.token_hex(3)}")  # type: ignore[attr-defined]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{exchange.services['registry'].port}") as channel:
        stub = registry_pb2_grpc.DocumentRegistryStub(channel)
        md = metadata(hospital, await hospital.access_token())

        async def register(patient: str) -> registry_pb2.RegisterDocumentResponse:
            content = f"<ClinicalDocument>{secrets.token_hex(4)}</ClinicalDocument>".encode()
            entry = registry_pb2.DocumentEntry(
                source_document_id=f"DOC-{secrets.token_hex(5)}",
                patient=common_pb2.PatientRef(local_id=patient),
                type_code=registry_pb2.Coding(system="http://loinc.org", code="18842-5"),
                title="出院小结",
                mime_type="text/xml",
                sha256=hashlib.sha256(content).hexdigest(),
                size=len(content),
            )
            request = registry_pb2.RegisterDocumentRequest(entry=entry, content=content)
            return await stub.RegisterDocument(request, metadata=md)

        cache.invalidate()
        first = await register(local_id)
        # The person the first registration asked the mpi for is kept for the next one.
        assert key in cache
        second = await register(local_id)
        assert first.entry.enterprise_id == second.entry.enterprise_id == registered.json()["enterprise_id"]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await register(unknown[1])
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # Not kept: the patient may be registered in the mpi right after.
        assert unknown not in cache
    await hospital.aclose()
