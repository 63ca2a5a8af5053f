"""What a workflow service's servicer does around the engine, written once for referral and
teleconsultation: the first answer of a keyed write (a move, a follow-up, a slot publication),
the check of the documents a requester attaches, and the one-move RPCs kept for older clients.

Each service keeps its transition table (`workflow.py`), the mapping of its rows onto
`engine.Subject` and the move's own rows; this module holds the shapes the two repeated.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf.message import Message
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from hie.registry.v1 import registry_pb2, registry_pb2_grpc
from services.shared.auth import Caller
from services.shared.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    error_from_rpc,
)
from services.shared.idempotency import FirstAnswers, fingerprint
from services.shared.process import ServiceRuntime

M = TypeVar("M", bound=Message)
# What a keyed write keeps its answer under: (idempotency key, operation, request fingerprint).
Keep = tuple[str, str, str]


class KeyedWrites:
    """A write run once per Idempotency-Key: a keyed retry (same key, same request) gets the first
    answer, which the write keeps in its own transaction (`keep`); without a key it simply runs."""

    def __init__(self, answers: FirstAnswers, runtime: ServiceRuntime) -> None:
        self._answers = answers
        self._rt = runtime
        self._sessions = runtime.sessions

    @property
    def sessions(self) -> Callable[[], AsyncSession]:
        """The service's sessions."""
        return self._sessions

    async def first(self, who: Caller, keep: Keep, response_type: type[M]) -> M | None:
        """The first answer kept under `keep`, or None."""
        async with self._sessions() as session:
            return await self.first_in(session, who, keep, response_type)

    async def first_in(self, session: AsyncSession, who: Caller, keep: Keep, response_type: type[M]) -> M | None:
        """`first`, read in the caller's session."""
        key, operation, request_fingerprint = keep
        return await self._answers.first(
            session,
            organization_id=who.organization_id,
            key=key,
            operation=operation,
            request_fingerprint=request_fingerprint,
            response_type=response_type,
        )

    async def earlier_create(
        self,
        session: AsyncSession,
        who: Caller,
        model: Any,
        keep: Keep,
        compared: Mapping[str, object],
        response_type: type[M],
    ) -> tuple[Any, M | None]:
        """The item an earlier create under this key made (`model` keeps the requester and the key
        in `requester_organization_id` and `idempotency_key`) and the first answer to it; (None,
        None) for a new key. The same key with other `compared` values is refused (409
        idempotency-key-reused)."""
        existing = await session.scalar(
            select(model).where(
                model.requester_organization_id == who.organization_id, model.idempotency_key == keep[0]
            )
        )
        if existing is None:
            return None, None
        if any(getattr(existing, name) != value for name, value in compared.items()):
            raise AlreadyExists("idempotency key already used for a different request", reason="idempotency-key-reused")
        return existing, await self.first_in(session, who, keep, response_type)

    async def keep(self, session: AsyncSession, who: Caller, keep: Keep | None, answer: Message) -> None:
        """Keep `answer` in the write's transaction (nothing without a key)."""
        if keep is not None:
            key, operation, request_fingerprint = keep
            await self._answers.keep(
                session,
                organization_id=who.organization_id,
                key=key,
                operation=operation,
                request_fingerprint=request_fingerprint,
                response=answer,
            )

    async def once(
        self,
        who: Caller,
        key: str,
        operation: str,
        request: Message,
        response_type: type[M],
        change: Callable[[AsyncSession], Awaitable[M]],
    ) -> M:
        """`change` in one transaction, its answer kept there under the key (a retry gets it and
        runs nothing); the outbox relay is woken for what the change recorded (its audit event)."""
        answer, replay = await self._answers.once(
            self._sessions,
            organization_id=who.organization_id,
            key=key,
            operation=operation,
            request=request,
            response_type=response_type,
            change=change,
        )
        if not replay:
            self._rt.outbox.notify()
        return answer

    async def run(
        self,
        who: Caller,
        key: str,
        operation: str,
        request: Message,
        response_type: type[M],
        write: Callable[[Keep | None], Awaitable[M]],
    ) -> M:
        """`write` once per key (it calls `keep` with what it is handed, in its transaction)."""
        if not key:
            return await write(None)
        keep = (key, operation, fingerprint(operation, request))
        if (first := await self.first(who, keep, response_type)) is not None:
            return first
        try:
            return await write(keep)
        except IntegrityError:
            # A concurrent first use of the key committed first: answer as its retry.
            first = await self.first(who, keep, response_type)
            if first is None:
                raise
            return first


class MoveAnswer(Generic[M]):
    """The answer of one move, for the engine's `answer` hook: built in the move's transaction
    (so the answer kept under the Idempotency-Key is the one the caller gets) by `build(session,
    audit_event_ids)`; a move the engine answered without a transaction (a retry that reached the
    state already) is built afterwards from what is there."""

    def __init__(
        self,
        writes: KeyedWrites,
        who: Caller,
        keep: Keep | None,
        build: Callable[[AsyncSession, list[str]], Awaitable[M]],
    ) -> None:
        self._writes = writes
        self._who = who
        self._keep = keep
        self._build = build
        self._answer: M | None = None

    async def __call__(self, session: AsyncSession, audit_event_ids: list[str]) -> None:
        answer = await self._build(session, audit_event_ids)
        await self._writes.keep(session, self._who, self._keep, answer)
        self._answer = answer

    async def result(self, audit_event_ids: list[str]) -> M:
        """The answer built in the move's transaction, else one built now."""
        if self._answer is not None:
            return self._answer
        async with self._writes.sessions() as session:
            return await self._build(session, audit_event_ids)


def statistics_scope(who: Caller, organization_id: str, *, reason: str) -> str:
    """The organisation a workflow's statistics cover ("" for the region): the authority's
    auditors see the region or any one organisation; a hospital's doctors and administrators their
    own organisation only (another is PermissionDenied with `reason`)."""
    if who.organization_type == "authority":
        who.require_scope("AuditEvent", "r")
        who.require_role("auditor")
        return organization_id[:64]
    who.require_scope("ServiceRequest", "r")
    who.require_role("doctor", "admin")
    if organization_id and organization_id != who.organization_id:
        raise PermissionDenied("a hospital sees its own statistics only", reason=reason)
    return who.organization_id


async def check_attachments(
    runtime: ServiceRuntime,
    document_ids: Sequence[str],
    *,
    enterprise_id: str,
    requester: str,
    reason: str,
    name: Callable[[int], str],
) -> list[int]:
    """The sizes of the documents a requester attaches to a workflow item, each checked: readable
    by the caller (the registry is asked under the caller's identity: it checks consent and
    audits the read), of this patient, and registered by the requester itself (the other side is
    granted them, so they must be the requester's to share). `name(index)` names a document in a
    refusal (never its id: the message reaches the client)."""
    stub = registry_pb2_grpc.DocumentRegistryStub(runtime.channel("registry"))
    sizes = []
    for index, document_id in enumerate(document_ids):
        try:
            entry = (await stub.GetDocumentEntry(registry_pb2.GetDocumentEntryRequest(document_id=document_id))).entry
        except grpc.aio.AioRpcError as exc:
            error = error_from_rpc(exc)
            if isinstance(error, (NotFound, PermissionDenied, InvalidArgument)):
                raise InvalidArgument(f"{name(index)} is not a document the caller may attach", reason=reason) from None
            raise error from None
        if entry.enterprise_id != enterprise_id:
            raise InvalidArgument(f"{name(index)} is not a document of this patient", reason=reason)
        if entry.source_organization_id != requester:
            raise FailedPrecondition(
                f"{name(index)} was registered by another organisation: attach your own documents",
                reason="document-not-own",
            )
        sizes.append(int(entry.size))
    return sizes


def one_move_rpc(
    move: str, response_type: type[Message], *, move_request: type[Message], item_id: str, item: str
) -> Callable[..., Awaitable[Any]]:
    """A one-move RPC kept for older clients (`AcceptReferral`, `CancelConsultation`…): the
    servicer's general move (`_move`, answering (item, audit event ids)) with `move` named. Its
    request carries the item id field `item_id`, `reason` and `idempotency_key`; its answer the
    item under `item` and the audit event ids."""

    async def rpc(self: Any, request: Any, context: object) -> Any:
        moved, events = await self._move(
            move_request(
                **{item_id: getattr(request, item_id)},
                move=move,
                reason=request.reason,
                idempotency_key=request.idempotency_key,
            )
        )
        return response_type(**{item: moved, "audit_event_ids": events})

    rpc.__doc__ = f"The {move} move, as the general move RPC with move={move!r}."
    return rpc
