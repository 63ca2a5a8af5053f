"""The first answer to a write carrying an idempotency key, kept in the owning service's
database in the transaction of the write itself.

A retry with the same key and the same request is answered with the stored response, byte for
byte (the first `created` and its audit event ids included), even when the first answer was lost
with a crashed process after its commit. The same key with another request (or another
operation) is refused. Kept beside the change and not in the gateway: a gateway-side cache
commits apart from the change, so a crash between the two loses the answer (or keeps one for a
change that never committed), and a second gateway replica would not see it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, TypeVar

from google.protobuf.message import Message
from sqlalchemy import Column, LargeBinary, MetaData, PrimaryKeyConstraint, String, Table, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from services.shared.db import UtcDateTime, utcnow
from services.shared.errors import AlreadyExists, InvalidArgument

M = TypeVar("M", bound=Message)
MAX_KEY_LENGTH = 128


def idempotency_table(metadata: MetaData) -> Table:
    """The table of first answers, in a service's own metadata (and so in its own schema)."""
    return Table(
        "idempotent_answer",
        metadata,
        Column("organization_id", String(64), nullable=False),
        Column("idempotency_key", String(MAX_KEY_LENGTH), nullable=False),
        Column("operation", String(64), nullable=False),
        # SHA-256 of the request as the service saw it (no data beyond what the change stores).
        Column("fingerprint", String(64), nullable=False),
        Column("response", LargeBinary, nullable=False),
        Column("created_at", UtcDateTime, nullable=False),
        PrimaryKeyConstraint("organization_id", "idempotency_key", name="pk_idempotent_answer"),
    )


def check_key(key: str) -> str:
    """The key as given; refused when too long or not printable."""
    if len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise InvalidArgument(
            f"idempotency key: at most {MAX_KEY_LENGTH} printable characters", reason="idempotency-key-invalid"
        )
    return key


def fingerprint(operation: str, request: Message, *context: str) -> str:
    """What tells a retry from another request under the same key (`context`: what else the
    answer depends on that the request does not carry, e.g. the acting practitioner)."""
    digest = hashlib.sha256(operation.encode())
    for part in context:
        digest.update(b"\0" + part.encode())
    digest.update(b"\0" + request.SerializeToString(deterministic=True))
    return digest.hexdigest()


class AnswerSeal(Protocol):
    """Encrypts kept answers at rest, for a service whose answers carry personal data (the mpi:
    its answers name patients); `context` binds a sealed answer to its organisation and key."""

    def seal(self, answer: bytes, context: str) -> bytes: ...

    def open(self, sealed: bytes, context: str) -> bytes: ...


class FirstAnswers:
    """Looks up and keeps first answers in one service's `idempotent_answer` table."""

    def __init__(self, table: Table, *, seal: AnswerSeal | None = None) -> None:
        self._table = table
        self._seal = seal

    async def first(
        self,
        session: AsyncSession,
        *,
        organization_id: str,
        key: str,
        operation: str,
        request_fingerprint: str,
        response_type: type[M],
    ) -> M | None:
        """The first answer to this key, or None if it is new; the same key with another
        request or operation is refused (409, reason idempotency-key-reused)."""
        t = self._table
        row = (
            await session.execute(
                select(t.c.operation, t.c.fingerprint, t.c.response).where(
                    t.c.organization_id == organization_id, t.c.idempotency_key == key
                )
            )
        ).first()
        if row is None:
            return None
        if row.operation != operation or not hmac.compare_digest(row.fingerprint, request_fingerprint):
            raise AlreadyExists("idempotency key already used for a different request", reason="idempotency-key-reused")
        data = row.response if self._seal is None else self._seal.open(row.response, f"{organization_id}\0{key}")
        answer = response_type()
        answer.ParseFromString(data)
        return answer

    async def keep(
        self,
        session: AsyncSession,
        *,
        organization_id: str,
        key: str,
        operation: str,
        request_fingerprint: str,
        response: Message,
    ) -> None:
        """Keep the answer in the caller's transaction; a concurrent first use of the key fails
        on the primary key at commit (the caller answers that as a retry)."""
        data = response.SerializeToString(deterministic=True)
        if self._seal is not None:
            data = self._seal.seal(data, f"{organization_id}\0{key}")
        await session.execute(
            self._table.insert().values(
                organization_id=organization_id,
                idempotency_key=key,
                operation=operation,
                fingerprint=request_fingerprint,
                response=data,
                created_at=utcnow(),
            )
        )

    async def once(
        self,
        sessions: Callable[[], AsyncSession],
        *,
        organization_id: str,
        key: str,
        operation: str,
        request: Message,
        response_type: type[M],
        change: Callable[[AsyncSession], Awaitable[M]],
        context: Sequence[str] = (),
        request_fingerprint: str = "",
    ) -> tuple[M, bool]:
        """Run `change` in one transaction and keep its answer there when a key is given; a
        retry (same key, same request) gets the kept answer and runs nothing. Returns the answer
        and whether it is a replay (the caller then skips after-commit work such as a relay
        wake-up). The same key with another request is 409 idempotency-key-reused. A service
        whose requests carry personal data passes its own (keyed) `request_fingerprint`."""
        key = check_key(key.strip())
        request_fingerprint = request_fingerprint or fingerprint(operation, request, *context)

        async def kept(session: AsyncSession) -> M | None:
            if not key:
                return None
            return await self.first(
                session,
                organization_id=organization_id,
                key=key,
                operation=operation,
                request_fingerprint=request_fingerprint,
                response_type=response_type,
            )

        try:
            async with sessions() as session, session.begin():
                if (first := await kept(session)) is not None:
                    return first, True
                answer = await change(session)
                if key:
                    await self.keep(
                        session,
                        organization_id=organization_id,
                        key=key,
                        operation=operation,
                        request_fingerprint=request_fingerprint,
                        response=answer,
                    )
        except IntegrityError:
            # A concurrent first use of the key committed first: answer as its retry.
            async with sessions() as session:
                if (first := await kept(session)) is not None:
                    return first, True
            raise
        return answer, False
