"""The loops a service runs for its whole life (metrics samplers, outbox relays) outlive a
CancelledError that is not addressed to them, and a probe that hangs; they end only when their
own task is cancelled. A sampler or relay that silently dies leaves a gauge frozen at its last
value, or messages undelivered, with nothing in the log."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from services.shared import metrics
from services.shared.db import session_factory
from services.shared.outbox import Outbox, outbox_table

SqliteOutbox = tuple[Outbox, async_sessionmaker[AsyncSession]]


@pytest.fixture
async def sqlite_outbox(tmp_path: Path) -> AsyncIterator[SqliteOutbox]:
    """An outbox on a real SQLite file, stopped and disposed of after the test."""
    metadata = MetaData()
    table = outbox_table(metadata)
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'outbox.db'}")
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    sessions = session_factory(engine)
    outbox = Outbox(table, sessions)
    try:
        yield outbox, sessions
    finally:
        await outbox.stop()
        await engine.dispose()


async def _cancelled_under_us() -> None:
    """Await a call that someone else cancels (as a closed gRPC channel cancels its calls): the
    awaiting task gets a CancelledError although nobody cancelled the task."""
    call = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(call.cancel)
    await call


async def _swallowing_cancellation(started: asyncio.Event) -> None:
    """A call that swallows the CancelledError meant for its task and returns (as SQLAlchemy does
    when a cancel hits a connection's rollback: it logs "Exception during reset" and carries on,
    and as Python 3.11's wait_for does when the cancel and the awaited result coincide)."""
    started.set()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(60)


async def _eventually(check, seconds: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + seconds
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "not within the time allowed"
        await asyncio.sleep(0.01)


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_a_sampler_outlives_a_call_cancelled_under_it_and_stops_when_cancelled() -> None:
    samples: list[int] = []

    async def probe() -> None:
        if not samples:
            samples.append(0)
            await _cancelled_under_us()
        samples.append(len(samples))

    task = asyncio.create_task(metrics.sample_forever(probe, 0.01, name="test"))
    await _eventually(lambda: len(samples) >= 3 or task.done())
    assert not task.done(), task
    await _stop(task)


async def test_a_sampler_abandons_a_hung_probe_and_samples_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "PROBE_TIMEOUT_SECONDS", 0.05)
    never = asyncio.Event()
    calls: list[int] = []

    async def probe() -> None:
        calls.append(1)
        if len(calls) == 1:
            await never.wait()

    task = asyncio.create_task(metrics.sample_forever(probe, 0.01, name="test"))
    await _eventually(lambda: len(calls) >= 3)
    await _stop(task)


async def test_a_sampler_ends_when_cancelled_even_if_a_probe_swallows_the_cancel() -> None:
    started = asyncio.Event()
    task = asyncio.create_task(metrics.sample_forever(lambda: _swallowing_cancellation(started), 0.01, name="test"))
    await started.wait()
    task.cancel()
    done, _pending = await asyncio.wait([task], timeout=5)
    assert done == {task}, "the sampler ran on after it was cancelled"
    assert task.cancelled()


async def test_an_outbox_relay_outlives_a_send_cancelled_under_it(sqlite_outbox: SqliteOutbox) -> None:
    outbox, sessions = sqlite_outbox
    outbox.poll_interval, outbox.linger = 0.02, 0.0
    received: list[bytes] = []
    attempts: list[int] = []

    async def sender(payloads: Sequence[bytes]) -> None:
        attempts.append(1)
        if len(attempts) == 1:
            await _cancelled_under_us()
        received.extend(payloads)

    outbox.register("topic", sender)
    async with sessions() as session, session.begin():
        await outbox.add(session, "topic", b"message")
    outbox.lease = timedelta(0)  # the interrupted send's claim is due again at once
    outbox.start()
    try:
        await _eventually(lambda: received == [b"message"])
        assert [task.done() for task in outbox._tasks.values()] == [False]
    finally:
        await outbox.stop()


async def test_stopping_a_relay_ends_it_even_if_a_send_swallows_the_cancel(sqlite_outbox: SqliteOutbox) -> None:
    outbox, sessions = sqlite_outbox
    outbox.poll_interval, outbox.linger = 0.02, 0.0
    started = asyncio.Event()

    async def sender(payloads: Sequence[bytes]) -> None:
        await _swallowing_cancellation(started)

    outbox.register("topic", sender)
    async with sessions() as session, session.begin():
        await outbox.add(session, "topic", b"message")
    outbox.start()
    await started.wait()
    stopping = asyncio.create_task(outbox.stop())
    done, _pending = await asyncio.wait([stopping], timeout=5)
    assert done == {stopping}, "stop() waited for a relay that ran on after it was cancelled"


async def test_concurrent_relay_passes_deliver_each_message_once_on_sqlite(sqlite_outbox: SqliteOutbox) -> None:
    """A relay pass started beside the background relay (a drain on shutdown, a test's settle)
    must not claim what the other holds: SQLite has no SKIP LOCKED, so the claim itself decides."""
    outbox, sessions = sqlite_outbox
    received: list[bytes] = []

    async def sender(payloads: Sequence[bytes]) -> None:
        await asyncio.sleep(0)
        received.extend(payloads)

    outbox.register("topic", sender)
    for round_ in range(5):
        async with sessions() as session, session.begin():
            for i in range(10):
                await outbox.add(session, "topic", f"{round_}-{i}".encode())
        await asyncio.gather(*(outbox.relay_once() for _ in range(4)))
    assert sorted(received) == sorted(f"{r}-{i}".encode() for r in range(5) for i in range(10))
