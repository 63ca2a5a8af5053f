"""A workflow's consent grant (referral, consultation), kept in step with the workflow through the
workflow service's transactional outbox: the state change and the grant message commit together,
and the relay calls the consent service (under the workflow service's platform identity) until it
answers, so a crash or a consent outage between the two loses nothing.

Messages may arrive out of order after a failed delivery; the consent service merges them
monotonically (a revocation is final, an end once set stays), so they converge.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from enum import StrEnum

import grpc

from hie.common.v1 import common_pb2
from hie.consent.v1 import consent_pb2, consent_pb2_grpc
from services.shared.auth import PlatformCredentials
from services.shared.db import utcnow
from services.shared.errors import error_from_rpc
from services.shared.outbox import Sender
from services.shared.timestamps import to_timestamp

GRANT_TOPIC = "consent.grant"


class GrantEffect(StrEnum):
    """What a workflow transition does to the receiving organisation's grant."""

    NONE = "none"
    GRANT = "grant"
    CLOSE = "close"
    REVOKE = "revoke"


def grant_message(
    effect: GrantEffect,
    *,
    reference: str,
    organization_id: str,
    purpose_of_use: str,
    patient: common_pb2.PatientRef,
    document_ids: Sequence[str],
) -> bytes:
    """The outbox payload for the grant change a transition causes (`reference` names the workflow
    item, e.g. `ServiceRequest/<id>`: one grant per reference)."""
    if effect is GrantEffect.REVOKE:
        rpc = "RevokeGrant"
        body = consent_pb2.RevokeGrantRequest(reference=reference).SerializeToString()
    else:
        rpc = "GrantAccess"
        closed = None
        if effect is GrantEffect.CLOSE:
            closed = to_timestamp(utcnow())
        body = consent_pb2.GrantAccessRequest(
            grant=consent_pb2.AccessGrant(
                organization_id=organization_id,
                purpose_of_use=purpose_of_use,
                patient=patient,
                document_ids=list(document_ids),
                include_summary=True,
                reference=reference,
            ),
            closed=closed,
        ).SerializeToString()
    return json.dumps({"rpc": rpc, "request": base64.b64encode(body).decode()}).encode()


def consent_grant_sender(channel: grpc.aio.Channel, credentials: PlatformCredentials) -> Sender:
    """Delivers grant messages in order; raises (the relay retries the batch) until consent answers."""
    stub = consent_pb2_grpc.ConsentDecisionPointStub(channel)

    async def send(payloads: Sequence[bytes]) -> None:
        for payload in payloads:
            envelope = json.loads(payload)
            body = base64.b64decode(envelope["request"])
            try:
                if envelope["rpc"] == "RevokeGrant":
                    await stub.RevokeGrant(
                        consent_pb2.RevokeGrantRequest.FromString(body), metadata=credentials.metadata()
                    )
                else:
                    await stub.GrantAccess(
                        consent_pb2.GrantAccessRequest.FromString(body), metadata=credentials.metadata()
                    )
            except grpc.aio.AioRpcError as exc:
                # Including NOT_FOUND for a revocation whose grant has not arrived yet (its own
                # delivery failed): it is retried until the grant is there.
                raise error_from_rpc(exc) from None

    return send
