"""Who a patient is across the region: the mpi's cross-reference, asked by another exchange
service under its own platform identity, inside an operation it has already authorised and
audits itself."""

from __future__ import annotations

import grpc

from hie.common.v1 import common_pb2
from hie.mpi.v1 import mpi_pb2, mpi_pb2_grpc
from hie.registry.v1 import registry_pb2, registry_pb2_grpc
from services.shared.errors import FailedPrecondition, NotFound, Unavailable, error_from_rpc
from services.shared.process import ServiceRuntime


async def cross_reference(runtime: ServiceRuntime, ref: common_pb2.PatientRef) -> mpi_pb2.CrossReferenceResponse:
    """Every identity of the person, records merged into it included (a merged-away record resolves
    to its survivor's person); NotFound when the domain has no such patient."""
    try:
        return await mpi_pb2_grpc.PatientIndexStub(runtime.channel("mpi")).CrossReference(
            mpi_pb2.CrossReferenceRequest(ref=ref, include_merged=True), metadata=runtime.credentials.metadata()
        )
    except grpc.aio.AioRpcError as exc:
        raise error_from_rpc(exc) from None


async def registered_person(runtime: ServiceRuntime, ref: common_pb2.PatientRef) -> str:
    """The enterprise id of a patient the caller's domain must already have registered."""
    try:
        return (await cross_reference(runtime, ref)).enterprise_id
    except NotFound:
        raise FailedPrecondition("register the patient first", reason="patient-not-registered") from None


async def cross_reference_by_enterprise_id(
    runtime: ServiceRuntime, enterprise_id: str
) -> mpi_pb2.CrossReferenceResponse:
    """Every active record of the person with this enterprise id; NotFound when there is none."""
    try:
        return await mpi_pb2_grpc.PatientIndexStub(runtime.channel("mpi")).CrossReference(
            mpi_pb2.CrossReferenceRequest(enterprise_id=enterprise_id), metadata=runtime.credentials.metadata()
        )
    except grpc.aio.AioRpcError as exc:
        raise error_from_rpc(exc) from None


async def document_source(runtime: ServiceRuntime, document_id: str) -> registry_pb2.DocumentEntry | None:
    """The registry's entry for a document id (asked under the service's platform identity: the
    caller's operation is already authorised), or None when the id names no registered document."""
    try:
        response = await registry_pb2_grpc.DocumentRegistryStub(runtime.channel("registry")).GetDocumentEntry(
            registry_pb2.GetDocumentEntryRequest(document_id=document_id[:64]),
            metadata=runtime.credentials.metadata(),
        )
    except grpc.aio.AioRpcError as exc:
        error = error_from_rpc(exc)
        if isinstance(error, NotFound):
            return None
        if isinstance(error, Unavailable):
            raise error from None
        raise Unavailable("the registry could not check the document", reason="upstream") from None
    return response.entry


async def require_own_documents(
    runtime: ServiceRuntime, organization_id: str, patient: common_pb2.PatientRef, document_ids: list[str]
) -> None:
    """Documents a referral or consultation attaches (and so grants the receiver) are the
    requester's own, about this patient: another hospital's document ids are not theirs to share."""
    for document_id in dict.fromkeys(document_ids):
        entry = await document_source(runtime, document_id)
        if (
            entry is None
            or entry.source_organization_id != organization_id
            or (entry.patient.domain, entry.patient.local_id) != (patient.domain, patient.local_id)
        ):
            raise FailedPrecondition(
                "attach only documents your organisation registered for this patient", reason="document-not-own"
            )
