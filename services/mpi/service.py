"""The mpi service as the process runner sees it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hie.mpi.v1 import mpi_pb2, mpi_pb2_grpc
from services.mpi import metrics
from services.mpi.domain import claim_lease
from services.mpi.index import LINK_TOPIC, MasterIndex
from services.mpi.matching import load_parameters
from services.mpi.sealing import sealed_context, sealed_sessions
from services.mpi.servicer import PatientIndexServicer
from services.mpi.tables import metadata
from services.shared.nats_publisher import JetStreamPublisher
from services.shared.outbox import DeliveryPolicy, Sender
from services.shared.process import ServiceRuntime, ServiceSpec
from services.shared.protection.rotation import ProtectedColumns

# A JSON file of match parameters (m / u per level, thresholds) replacing the shipped default.
PARAMETERS_ENV = "HIE_MPI_MATCH_PARAMETERS"
# NATS server URL: link-change events are published to JetStream subject `mpi.link.changed`.
NATS_ENV = "HIE_NATS_URL"
# How long a steward's claim on a review task holds (whole seconds; default 30 minutes).
CLAIM_ENV = "HIE_MPI_REVIEW_CLAIM_SECONDS"


def master_index(runtime: ServiceRuntime) -> MasterIndex:
    """The index over the runtime's store, with the configured match parameters."""
    path = runtime.options.get(PARAMETERS_ENV)
    params = load_parameters(Path(path) if path else None)
    # The latest stored EM estimate over them, unless they say `"learn_weights": false`.
    return MasterIndex(audit=runtime.audit, outbox=runtime.outbox, params=params, use_estimates=params.learn_weights)


def _nats_sender(url: str) -> Sender:
    """Publish link changes to NATS JetStream; the message id de-duplicates redeliveries."""
    return JetStreamPublisher(url, subject=lambda _event: LINK_TOPIC)


async def _no_subscriber(payloads: Sequence[bytes]) -> None:
    """No broker configured: nobody to deliver to; GetLinkHistory keeps every change."""


def _build(runtime: ServiceRuntime) -> list:
    assert runtime.protection is not None
    sealed_sessions(runtime.sessions, runtime.protection)
    url = runtime.options.get(NATS_ENV)
    # Its own relay lane: a NATS server that stalls does not hold up the audit trail.
    runtime.outbox.register(LINK_TOPIC, _nats_sender(url) if url else _no_subscriber, DeliveryPolicy(lane="broker"))
    master = master_index(runtime)
    metrics.watch(runtime)
    try:
        lease = claim_lease(runtime.options.get(CLAIM_ENV))
    except ValueError as exc:
        raise ValueError(f"{CLAIM_ENV}: {exc}") from None
    return [
        (
            mpi_pb2_grpc.add_PatientIndexServicer_to_server,
            PatientIndexServicer(runtime, master, claim_lease=lease),
            mpi_pb2.DESCRIPTOR.services_by_name["PatientIndex"].full_name,
        )
    ]


SPEC = ServiceSpec(
    name="mpi",
    metadata=metadata,
    versions=Path(__file__).parent / "migrations",
    build=_build,
    protects_personal_data=True,
    protected=(ProtectedColumns(table="patient", columns={"sealed": lambda row: sealed_context(row["id"])}),),
)
