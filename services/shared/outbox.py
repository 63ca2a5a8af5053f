"""Transactional outbox: events are written in the same transaction as the change that
causes them, and a relay delivers them afterwards, retrying until acknowledged.

Delivery is at least once; receivers de-duplicate by the message id (the audit service
appends idempotently by event id).

A topic is delivered in batches acknowledged together (the default) or, with a
`DeliveryPolicy(per_message=True)`, one message at a time so one receiver's failure does not
resend what others acknowledged; a policy can also give a message up after a period and hand it
to a dead-letter sink (in the same transaction that takes it out of the outbox).

Each delivery lane (`DeliveryPolicy.lane`) has its own relay task claiming only its topics, so
a receiver that hangs (a hospital's webhook) holds up its own lane and never the audit trail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Column, Index, Integer, LargeBinary, MetaData, String, Table, bindparam, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.shared.db import UtcDateTime, utcnow
from services.shared.metrics import OUTBOX_DEAD_LETTERS, OUTBOX_DELIVERED, OUTBOX_FAILURES, owner_cancelled

_log = logging.getLogger(__name__)

# A sender delivers a batch of payloads of one topic; it raises if the batch was not acknowledged.
Sender = Callable[[Sequence[bytes]], Awaitable[None]]
# Keeps a message the outbox gives up on: (session, message id, topic, payload, attempts, last error).
DeadLetterSink = Callable[[AsyncSession, str, str, bytes, int, str], Awaitable[None]]
# Records one delivery attempt in the transaction that records its outcome: (session, message id,
# payload, attempt number, the exception or None on success, whether it was dead-lettered).
AttemptRecorder = Callable[[AsyncSession, str, bytes, int, BaseException | None, bool], Awaitable[None]]
_BATCH = 200
_MAX_BACKOFF = timedelta(minutes=5)
_LEASE = timedelta(seconds=30)


def outbox_table(metadata: MetaData) -> Table:
    """The outbox table, in a component's own metadata (and so in its own schema)."""
    return Table(
        "outbox",
        metadata,
        Column("id", String(36), primary_key=True),
        Column("topic", String(64), nullable=False),
        Column("payload", LargeBinary, nullable=False),
        Column("created_at", UtcDateTime, nullable=False),
        Column("attempts", Integer, nullable=False, default=0),
        Column("next_attempt_at", UtcDateTime, nullable=False),
        Column("delivered_at", UtcDateTime, nullable=True),
        Column("last_error", String(200), nullable=True),
        Index("ix_outbox_pending", "delivered_at", "next_attempt_at"),
    )


@dataclass(frozen=True)
class DeliveryPolicy:
    """How one topic's messages are delivered and retried."""

    per_message: bool = False
    # Backoff after the n-th failed attempt: base * 2**n, at most max_backoff.
    base_backoff: timedelta = timedelta(seconds=1)
    max_backoff: timedelta = _MAX_BACKOFF
    # A message still failing this long after it was staged goes to the dead-letter sink.
    give_up_after: timedelta | None = None
    dead_letter: DeadLetterSink | None = None
    # Called per message with every attempt's outcome, inside the outbox's own transaction (e.g.
    # to stage an audit event of the attempt with it).
    on_attempt: AttemptRecorder | None = None
    # Topics of one lane are relayed by one task; lanes run independently. Deliveries to
    # third parties (webhooks) go in a lane of their own: their timeouts and retries must not
    # delay the exchange's own deliveries (audit, grants).
    lane: str = "default"

    def backoff(self, attempts: int) -> timedelta:
        return min(self.base_backoff * (2**attempts), self.max_backoff)


class Outbox:
    """Writes messages into a component's outbox table and relays them to their senders."""

    def __init__(self, table: Table, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._table = table
        self._sessions = sessions
        # Built once: building the insert per message was a third of staging an audit event
        # (1.8 % of the registry's samples per document query, issue 21's `hie bench load`).
        self._insert = table.insert().values(
            id=bindparam("id"),
            topic=bindparam("topic"),
            payload=bindparam("payload"),
            created_at=bindparam("created_at"),
            attempts=0,
            next_attempt_at=bindparam("next_attempt_at"),
        )
        # Messages of `add_now` waiting for the insert in progress to finish, and that insert.
        self._staged: list[tuple[dict[str, object], asyncio.Future[None]]] = []
        self._inserting: asyncio.Task[None] | None = None
        self._senders: dict[str, Sender] = {}
        self._policies: dict[str, DeliveryPolicy] = {}
        self._wakes: dict[str, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.poll_interval = 2.0
        # How long a claim lasts (HIE_OUTBOX_LEASE_SECONDS).
        self.lease = _LEASE
        # After a commit wakes the relay it waits this long, so the messages of many requests go
        # out in one pass (one claim, one send, one acknowledgement) instead of one pass each:
        # under load a pass per request doubled the work of a read request.
        self.linger = 0.2
        # The owning component, as the outbox metrics' `component` attribute.
        self.component = "unknown"

    def register(self, topic: str, sender: Sender, policy: DeliveryPolicy | None = None) -> None:
        self._senders[topic] = sender
        self._policies[topic] = policy or DeliveryPolicy()
        self._wakes.setdefault(self._policies[topic].lane, asyncio.Event())

    def _lanes(self) -> dict[str, list[str]]:
        lanes: dict[str, list[str]] = {}
        for topic, policy in self._policies.items():
            lanes.setdefault(policy.lane, []).append(topic)
        return lanes

    async def add(self, session: AsyncSession, topic: str, payload: bytes) -> str:
        """Stage a message in the caller's transaction; it is sent only if that commits."""
        message_id = str(uuid.uuid4())
        now = utcnow()
        await session.execute(
            self._insert,
            {"id": message_id, "topic": topic, "payload": payload, "created_at": now, "next_attempt_at": now},
        )
        return message_id

    async def add_now(self, topic: str, payload: bytes) -> str:
        """Stage a message committed before this returns, in no caller's transaction (the audit
        event of a read, which changes nothing else). Messages staged concurrently go in together:
        one multi-row insert while the previous one runs (group commit), so a burst of reads pays
        one statement and one commit instead of one each, and a lone read waits for nobody."""
        now = utcnow()
        row = {"id": str(uuid.uuid4()), "topic": topic, "payload": payload, "created_at": now, "next_attempt_at": now}
        done = asyncio.get_running_loop().create_future()
        self._staged.append((row, done))
        if self._inserting is None:
            # A task of its own: a caller cancelled while waiting must not strand the others.
            self._inserting = asyncio.create_task(self._insert_staged())
        await done
        self.notify()
        return str(row["id"])

    async def _insert_staged(self) -> None:
        try:
            while self._staged:
                batch, self._staged = self._staged, []
                try:
                    async with self._sessions() as session:
                        # One INSERT ... VALUES (...), (...) is atomic on its own: no BEGIN / COMMIT.
                        connection = await session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
                        await connection.execute(self._insert, [row for row, _done in batch])
                except Exception as exc:
                    for _row, done in batch:
                        if not done.done():
                            done.set_exception(exc)
                    continue
                for _row, done in batch:
                    if not done.done():
                        done.set_result(None)
        finally:
            self._inserting = None

    def notify(self) -> None:
        """Tell the relays a commit added messages, so they need not wait for their next poll."""
        for wake in self._wakes.values():
            wake.set()

    def start(self) -> None:
        for lane, topics in self._lanes().items():
            if lane not in self._tasks:
                self._tasks[lane] = asyncio.create_task(self._run(lane, topics), name=f"outbox-relay-{lane}")

    async def stop(self) -> None:
        tasks, self._tasks = list(self._tasks.values()), {}
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self, lane: str, topics: list[str]) -> None:
        wake = self._wakes[lane]
        while True:
            try:
                # A pass that claimed a full batch may have left more due; a shorter one left
                # nothing (what commits meanwhile sets the wake event): no empty pass after it.
                while (await self._relay(topics))[0] >= _BATCH:
                    pass
            except asyncio.CancelledError:
                # stop() cancels the task; a CancelledError that escaped from a sender or the
                # database driver (a call cancelled under it) must not end the relay silently.
                if owner_cancelled():
                    raise
                _log.warning("outbox relay pass was cancelled from inside; relaying on")
            except Exception as exc:  # the relay must outlive any one failure
                _log.warning("outbox relay pass failed: %s", type(exc).__name__)
            if owner_cancelled():
                # stop() cancelled this task but something below swallowed the CancelledError
                # (SQLAlchemy logs "Exception during reset" and carries on when a cancel hits a
                # connection's rollback): end now, or stop() waits for a relay that runs forever.
                raise asyncio.CancelledError
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=self.poll_interval)
            if wake.is_set():
                await asyncio.sleep(self.linger)
            wake.clear()

    async def relay_once(self) -> int:
        """Deliver one batch of due messages of every lane; returns how many were acknowledged.

        Rows are claimed with a lease in a short transaction, so no lock is held while
        sending and a relay that dies mid-send leaves them due again after the lease.
        """
        passes = [self._relay(topics) for topics in self._lanes().values()] or [self._relay([])]
        return sum(acknowledged for _claimed, acknowledged in await asyncio.gather(*passes))

    async def _relay(self, topics: list[str]) -> tuple[int, int]:
        """One pass over the given topics (none registered: every topic): (messages claimed,
        messages acknowledged)."""
        t = self._table
        now = utcnow()
        async with self._sessions() as session, session.begin():
            query = (
                select(t.c.id, t.c.topic, t.c.payload, t.c.attempts, t.c.created_at)
                .where(t.c.delivered_at.is_(None), t.c.next_attempt_at <= now)
                .order_by(t.c.created_at)
                .limit(_BATCH)
            )
            if topics:
                query = query.where(t.c.topic.in_(topics))
            if session.bind.dialect.name == "postgresql":
                # Several replicas may relay at once; each claims rows no other holds.
                query = query.with_for_update(skip_locked=True)
            rows = (await session.execute(query)).all()
            if rows:
                # The claim keeps only rows still due: on SQLite (no SKIP LOCKED) two passes may
                # read the same rows, and the one whose update comes second must not send them too.
                claimed = set(
                    (
                        await session.execute(
                            update(t)
                            .where(t.c.id.in_([r.id for r in rows]), t.c.delivered_at.is_(None))
                            .where(t.c.next_attempt_at <= now)
                            .values(next_attempt_at=utcnow() + self.lease)
                            .returning(t.c.id)
                        )
                    ).scalars()
                )
                rows = [r for r in rows if r.id in claimed]
        by_topic: dict[str, list[_Claimed]] = {}
        for row in rows:
            by_topic.setdefault(row.topic, []).append(_Claimed(row.id, row.payload, row.attempts, row.created_at))
        delivered = 0
        for topic, items in by_topic.items():
            policy = self._policies.get(topic, DeliveryPolicy())
            if policy.per_message:
                results = await asyncio.gather(*(self._deliver(topic, [item], policy) for item in items))
                delivered += sum(results)
            else:
                delivered += await self._deliver(topic, items, policy)
        return len(rows), delivered

    async def _deliver(self, topic: str, items: list[_Claimed], policy: DeliveryPolicy) -> int:
        """Send messages acknowledged together; record the outcome. Returns how many were delivered."""
        t = self._table
        ids = [item.id for item in items]
        sender = self._senders.get(topic)
        try:
            if sender is None:
                raise LookupError(f"no sender for topic {topic}")
            await sender([item.payload for item in items])
        except Exception as exc:
            attempts = max(item.attempts for item in items) + 1
            error = type(exc).__name__[:200]
            oldest = min(item.created_at for item in items)
            async with self._sessions() as session, session.begin():
                if policy.give_up_after is not None and utcnow() - oldest >= policy.give_up_after:
                    for item in items:
                        if policy.dead_letter is not None:
                            await policy.dead_letter(session, item.id, topic, item.payload, item.attempts + 1, error)
                        if policy.on_attempt is not None:
                            await policy.on_attempt(session, item.id, item.payload, item.attempts + 1, exc, True)
                    await session.execute(
                        update(t)
                        .where(t.c.id.in_(ids))
                        .values(attempts=t.c.attempts + 1, delivered_at=utcnow(), last_error="dead-lettered")
                    )
                    _log.warning("outbox gave up delivering %d message(s) to %s (%s)", len(ids), topic, error)
                    OUTBOX_DEAD_LETTERS.add(len(ids), {"component": self.component, "topic": topic})
                    return 0
                if policy.on_attempt is not None:
                    for item in items:
                        await policy.on_attempt(session, item.id, item.payload, item.attempts + 1, exc, False)
                await session.execute(
                    update(t)
                    .where(t.c.id.in_(ids))
                    .values(
                        attempts=t.c.attempts + 1,
                        next_attempt_at=utcnow() + policy.backoff(attempts),
                        last_error=error,
                    )
                )
            _log.warning("outbox delivery to %s failed (%s); will retry", topic, error)
            OUTBOX_FAILURES.add(len(ids), {"component": self.component, "topic": topic})
            return 0
        async with self._sessions() as session, session.begin():
            await session.execute(
                update(t).where(t.c.id.in_(ids)).values(delivered_at=utcnow(), attempts=t.c.attempts + 1)
            )
            if policy.on_attempt is not None:
                for item in items:
                    await policy.on_attempt(session, item.id, item.payload, item.attempts + 1, None, False)
        OUTBOX_DELIVERED.add(len(ids), {"component": self.component, "topic": topic})
        return len(ids)

    async def pending(self) -> int:
        """Messages not yet acknowledged."""
        async with self._sessions() as session:
            count = await session.scalar(
                select(func.count()).select_from(self._table).where(self._table.c.delivered_at.is_(None))
            )
        return int(count or 0)

    async def backlog(self) -> tuple[int, datetime | None]:
        """Messages not yet acknowledged and when the oldest of them was staged (for metrics)."""
        t = self._table
        async with self._sessions() as session:
            count, oldest = (
                await session.execute(select(func.count(), func.min(t.c.created_at)).where(t.c.delivered_at.is_(None)))
            ).one()
        if isinstance(oldest, str):  # SQLite's MIN() over a type-decorated column returns text
            oldest = datetime.fromisoformat(oldest)
        if oldest is not None and oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=UTC)
        return int(count or 0), oldest


@dataclass(frozen=True)
class _Claimed:
    id: str
    payload: bytes
    attempts: int
    created_at: datetime
