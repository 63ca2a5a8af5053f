"""The registry service as the process runner sees it: the document registry and repository,
and the notification broker."""

from pathlib import Path

from hie.registry.v1 import notifications_pb2, notifications_pb2_grpc, registry_pb2, registry_pb2_grpc
from services.registry.broker import NotificationBrokerServicer, NotificationSettings, Notifier
from services.registry.servicer import DocumentRegistryServicer
from services.registry.store import metadata
from services.shared.process import ServiceRuntime, ServiceSpec
from services.shared.protection.rotation import WrappedContentKeys


def _build(runtime: ServiceRuntime) -> list:
    notifier = Notifier(runtime, NotificationSettings.from_env(runtime.options.environ()))
    return [
        (
            registry_pb2_grpc.add_DocumentRegistryServicer_to_server,
            DocumentRegistryServicer(runtime, notifier),
            registry_pb2.DESCRIPTOR.services_by_name["DocumentRegistry"].full_name,
        ),
        (
            notifications_pb2_grpc.add_NotificationBrokerServicer_to_server,
            NotificationBrokerServicer(runtime, notifier),
            notifications_pb2.DESCRIPTOR.services_by_name["NotificationBroker"].full_name,
        ),
    ]


SPEC = ServiceSpec(
    name="registry",
    metadata=metadata,
    versions=Path(__file__).parent / "migrations",
    build=_build,
    # Document content is envelope-encrypted (services/shared/protection/envelope.py).
    protects_personal_data=True,
    protected=(WrappedContentKeys(table="document_entry", document_id_column="id", wrapped_column="content_key"),),
)
