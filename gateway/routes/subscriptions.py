"""Subscriptions to exchange events and the notification dead-letter list (REST), and the key
set receivers verify notification signatures with."""

from __future__ import annotations

import datetime
import json
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from gateway.deps import Context, IdempotencyKey
from gateway.errors import ApiError
from gateway.routes import rpc
from hie.common.v1 import common_pb2
from hie.registry.v1 import notifications_pb2, notifications_pb2_grpc
from services.shared.keys import ISSUER_MEMBER, RETIRED_MEMBER
from services.shared.timestamps import isoformat, to_timestamp

router = APIRouter(prefix="/api/v1", tags=["subscriptions"])
_TOPICS = {
    "patient-document": notifications_pb2.TOPIC_PATIENT_DOCUMENT,
    "document-type": notifications_pb2.TOPIC_DOCUMENT_TYPE,
    "workflow-state": notifications_pb2.TOPIC_WORKFLOW_STATE,
}
_TOPIC_NAMES = {v: k for k, v in _TOPICS.items()}


class SubscriptionIn(BaseModel):
    topic: Literal["patient-document", "document-type", "workflow-state"]
    patient_local_id: str = Field(default="", max_length=64)
    type_code: str = Field(default="", max_length=64)
    endpoint_url: str = Field(min_length=1, max_length=512)
    expires: datetime.datetime


def _broker(request: Request) -> notifications_pb2_grpc.NotificationBrokerStub:
    return notifications_pb2_grpc.NotificationBrokerStub(request.app.state.channels["registry"])


def subscription_json(sub: notifications_pb2.Subscription) -> dict[str, Any]:
    return {
        "subscription_id": sub.subscription_id,
        "topic": _TOPIC_NAMES.get(sub.topic, "unknown"),
        "patient_local_id": sub.patient.local_id or None,
        "type_code": sub.type_code or None,
        "endpoint_url": sub.endpoint_url,
        "expires": isoformat(sub.expires),
        "created": isoformat(sub.created),
    }


def dead_letter_json(dead: notifications_pb2.DeadLetter) -> dict[str, Any]:
    return {
        "event_id": dead.event_id,
        "subscription_id": dead.subscription_id,
        "endpoint_url": dead.endpoint_url,
        "event_type": dead.event_type,
        "attempts": dead.attempts,
        "last_error": dead.last_error,
        "created": isoformat(dead.created),
        "dead_lettered": isoformat(dead.dead_lettered),
    }


@router.post("/subscriptions", status_code=201)
async def subscribe(body: SubscriptionIn, ctx: Context, request: Request, key: IdempotencyKey) -> dict[str, Any]:
    """Subscribe the caller's organisation to new documents of a patient it treats, to documents of
    a type, or to its referrals' and consultations' state changes, until `expires`. With an
    `Idempotency-Key` a retry gets the first answer (one subscription); the key with another
    request is 409 `idempotency-key-reused`."""
    ctx.require_scope("DocumentReference", "r")
    if body.expires.tzinfo is None:
        raise ApiError(400, "expiry-invalid", "expires must carry a time zone")
    expires = to_timestamp(body.expires.astimezone(datetime.UTC))
    result = await rpc(
        _broker(request).Subscribe(
            notifications_pb2.SubscribeRequest(
                topic=_TOPICS[body.topic],
                patient=common_pb2.PatientRef(local_id=body.patient_local_id),
                type_code=body.type_code,
                endpoint_url=body.endpoint_url,
                expires=expires,
                idempotency_key=key,
            ),
            metadata=ctx.metadata,
        )
    )
    return subscription_json(result.subscription)


@router.get("/subscriptions")
async def list_subscriptions(ctx: Context, request: Request) -> dict[str, Any]:
    ctx.require_scope("DocumentReference", "r")
    result = await rpc(
        _broker(request).ListSubscriptions(notifications_pb2.ListSubscriptionsRequest(), metadata=ctx.metadata)
    )
    return {"subscriptions": [subscription_json(s) for s in result.subscriptions]}


@router.delete("/subscriptions/{subscription_id}", status_code=204)
async def unsubscribe(subscription_id: str, ctx: Context, request: Request, key: IdempotencyKey) -> None:
    """End a subscription. With an `Idempotency-Key` a retry is 204 again (not 404)."""
    ctx.require_scope("DocumentReference", "r")
    await rpc(
        _broker(request).Unsubscribe(
            notifications_pb2.UnsubscribeRequest(subscription_id=subscription_id[:64], idempotency_key=key),
            metadata=ctx.metadata,
        )
    )


@router.get("/notifications/dead-letters")
async def list_dead_letters(ctx: Context, request: Request) -> dict[str, Any]:
    """The caller organisation's notifications that could not be delivered in time (role admin)."""
    ctx.require_scope("DocumentReference", "r")
    result = await rpc(
        _broker(request).ListDeadLetters(notifications_pb2.ListDeadLettersRequest(), metadata=ctx.metadata)
    )
    return {"dead_letters": [dead_letter_json(d) for d in result.dead_letters]}


@router.post("/notifications/dead-letters/{event_id}/replay")
async def replay_dead_letter(event_id: str, ctx: Context, request: Request, key: IdempotencyKey) -> dict[str, Any]:
    """Deliver a dead-lettered notification again, with its original event id (role admin). With
    an `Idempotency-Key` a retry gets the first answer and replays nothing."""
    ctx.require_scope("DocumentReference", "r")
    result = await rpc(
        _broker(request).ReplayDeadLetter(
            notifications_pb2.ReplayDeadLetterRequest(event_id=event_id[:64], idempotency_key=key),
            metadata=ctx.metadata,
        )
    )
    return dead_letter_json(result.dead_letter)


@router.get("/notifications/jwks.json")
async def notification_keys(request: Request) -> dict[str, Any]:
    """The public keys notification signatures (X-HIE-Signature, a detached JWS) verify against:
    the exchange's platform key. Public, like any JWKS."""
    trusted = json.loads(request.app.state.settings.trusted_jwks_file.read_text())
    return {
        "keys": [
            {k: v for k, v in key.items() if k not in {ISSUER_MEMBER, RETIRED_MEMBER}}
            for key in trusted["keys"]
            if key.get(ISSUER_MEMBER) == "platform"
        ]
    }


@router.get("/notifications/sm2-key")
async def notification_sm2_key(ctx: Context, request: Request) -> dict[str, Any]:
    """The SM2 public key of the X-HIE-Signature-SM2 co-signature (national-algorithms option):
    hex of the uncompressed point and the signer id of the SM3 pre-hash; 404 when notifications
    are not SM2-signed."""
    result = await rpc(
        _broker(request).GetSigningKeys(notifications_pb2.GetSigningKeysRequest(), metadata=ctx.metadata)
    )
    if not result.sm2_public_key:
        raise ApiError(404, "sm2-not-configured", "notifications are not SM2-signed on this exchange")
    return {"algorithm": "SM2", "public_key": result.sm2_public_key, "signer_id": result.sm2_signer_id}
