"""Who a patient is across the region: the mpi's cross-reference, asked by another exchange
service under its own platform identity, inside an operation it has already authorised and
audits itself."""

from __future__ import annotations

import grpc

from hie.common.v1 import common_pb2
from hie.mpi.v1 import mpi_pb2, mpi_pb2_grpc
from services.shared.errors import FailedPrecondition, NotFound, error_from_rpc
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
