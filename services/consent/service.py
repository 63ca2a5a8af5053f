"""The consent service as the process runner sees it."""

from pathlib import Path

from hie.consent.v1 import consent_pb2, consent_pb2_grpc
from hie.registry.v1 import notifications_pb2_grpc
from services.consent.servicer import BREAK_GLASS_TOPIC, ConsentDecisionPointServicer, break_glass_notice_sender
from services.consent.store import metadata
from services.shared.process import ServiceRuntime, ServiceSpec


def _build(runtime: ServiceRuntime) -> list:
    # The channel is opened on first delivery: the registry's address may be settled after start.
    runtime.outbox.register(
        BREAK_GLASS_TOPIC,
        break_glass_notice_sender(
            lambda: notifications_pb2_grpc.NotificationBrokerStub(runtime.channel("registry")), runtime.credentials
        ),
    )
    return [
        (
            consent_pb2_grpc.add_ConsentDecisionPointServicer_to_server,
            ConsentDecisionPointServicer(runtime),
            consent_pb2.DESCRIPTOR.services_by_name["ConsentDecisionPoint"].full_name,
        )
    ]


SPEC = ServiceSpec(name="consent", metadata=metadata, versions=Path(__file__).parent / "migrations", build=_build)
