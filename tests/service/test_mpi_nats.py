"""The mpi publishing link changes to a real NATS JetStream (HIE_NATS_URL): the relay delivers each
`mpi.link.changed` event once, the stream de-duplicates a redelivery by its Nats-Msg-Id.

Needs a NATS server with JetStream at nats://127.0.0.1:4222 (`nats-server -js`); skipped only when
none answers there."""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select, update

from services.mpi.index import LINK_TOPIC
from services.mpi.service import NATS_ENV
from services.mpi.service import SPEC as MPI
from services.shared.process import RunningService, start_service
from tests.conftest import base_settings
from tests.support.factories import fresh_national_id
from tests.support.hospital import Hospital

pytestmark = pytest.mark.filterwarnings("ignore")

NATS_URL = "nats://127.0.0.1:4222"
# The stream this test creates when none carries the subject yet (a deployment provisions its own).
_STREAM = "HIE_MPI_LINKS"


async def _jetstream() -> tuple[object, object]:
    import nats
    from nats.js.api import StreamConfig
    from nats.js.errors import NotFoundError

    # A plain TCP probe first: nats.connect keeps retrying a refused initial connection.
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", 4222), timeout=2)
    except (OSError, TimeoutError):
        pytest.skip(f"no NATS server at {NATS_URL}")
    writer.close()
    client = await nats.connect(NATS_URL, connect_timeout=2)
    stream = client.jetstream()
    try:
        await stream.find_stream_name_by_subject(LINK_TOPIC)
    except NotFoundError:
        # Kept small and short-lived: the broker may be shared by other test runs.
        await stream.add_stream(StreamConfig(name=_STREAM, subjects=[LINK_TOPIC], max_age=3600, duplicate_window=120))
    return client, stream


@pytest.fixture
async def broker() -> AsyncIterator[tuple[object, object]]:
    client, stream = await _jetstream()
    try:
        yield client, stream
    finally:
        await client.close()  # type: ignore[attr-defined]


@pytest.fixture
async def mpi_with_nats(
    broker: tuple[object, object],
    tmp_path: Path,
    keys_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[RunningService]:
    monkeypatch.setenv(NATS_ENV, NATS_URL)
    running = await start_service(MPI, base_settings(tmp_path, keys_dir, "sqlite"), listen="127.0.0.1:0")
    # Relayed by hand below (no audit service runs here: audit events stay pending).
    running.runtime.outbox.poll_interval = 3600
    try:
        yield running
    finally:
        await running.stop(grace=None)


async def _link_rows(running: RunningService, domains: set[str]) -> list[tuple[str, dict, object]]:
    table = MPI.metadata.tables["outbox"]
    async with running.runtime.sessions() as session:
        rows = (
            await session.execute(
                select(table.c.id, table.c.payload, table.c.delivered_at).where(table.c.topic == LINK_TOPIC)
            )
        ).all()
    events = [(r.id, json.loads(r.payload), r.delivered_at) for r in rows]
    return [e for e in events if e[1]["domain"] in domains]


async def _relay_links(running: RunningService, domains: set[str]) -> list[tuple[str, dict, object]]:
    for _ in range(100):
        await running.runtime.outbox.relay_once()
        rows = await _link_rows(running, domains)
        if rows and all(delivered is not None for _, _, delivered in rows):
            return rows
        await asyncio.sleep(0.05)
    raise AssertionError("link events were not delivered to NATS")


async def _published(stream: object, since: datetime.datetime, domains: set[str], want: int) -> list[object]:
    """Every message on the subject since `since` of these domains (an ephemeral ordered consumer)."""
    from nats.js.api import ConsumerConfig, DeliverPolicy

    subscription = await stream.subscribe(  # type: ignore[attr-defined]
        LINK_TOPIC,
        ordered_consumer=True,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=since.isoformat().replace("+00:00", "Z")
        ),
    )
    found: list[object] = []
    try:
        while True:
            try:
                message = await subscription.next_msg(timeout=1.0 if len(found) < want else 0.5)
            except TimeoutError:
                break
            if json.loads(message.data)["domain"] in domains:
                found.append(message)
    finally:
        await subscription.unsubscribe()
    return found


async def test_link_changes_reach_jetstream_once_each(
    mpi_with_nats: RunningService, broker: tuple[object, object], keys_dir: Path
) -> None:
    _, stream = broker
    since = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=1)
    a, b = Hospital(mpi_with_nats, keys_dir), Hospital(mpi_with_nats, keys_dir)
    nid = fresh_national_id()
    first = await a.register("A-N", "欧阳明", national_id=nid, birth_date="")
    second = await b.register("B-N", "欧阳明", national_id=nid, birth_date="")
    assert second.patient.enterprise_id == first.patient.enterprise_id  # linked by the national id
    domains = {a.org, b.org}

    rows = await _relay_links(mpi_with_nats, domains)
    messages = await _published(stream, since, domains, want=len(rows))
    events = [json.loads(m.data) for m in messages]
    assert sorted(e["event_id"] for e in events) == sorted(e["event_id"] for _, e, _ in rows)
    assert all(m.headers["Nats-Msg-Id"] == json.loads(m.data)["event_id"] for m in messages)
    by_domain = {e["domain"]: e for e in events}
    assert by_domain[b.org]["enterprise_id"] == first.patient.enterprise_id
    assert by_domain[b.org]["method"] == "national-id"
    assert by_domain[a.org]["change"] == by_domain[b.org]["change"] == "register"
    raw = b"".join(m.data for m in messages).decode()
    assert "欧阳" not in raw
    assert nid not in raw

    # The relay sends one again (as after a crash between publish and acknowledgement): the
    # stream keeps it once, by its Nats-Msg-Id.
    table = MPI.metadata.tables["outbox"]
    redelivered_id = rows[0][0]
    async with mpi_with_nats.runtime.sessions() as session, session.begin():
        await session.execute(
            update(table)
            .where(table.c.id == redelivered_id)
            .values(delivered_at=None, next_attempt_at=datetime.datetime.now(datetime.UTC))
        )
    await _relay_links(mpi_with_nats, domains)
    again = await _published(stream, since, domains, want=len(rows))
    assert sorted(json.loads(m.data)["event_id"] for m in again) == sorted(e["event_id"] for e in events)
    ack = await stream.publish(LINK_TOPIC, messages[0].data, headers={"Nats-Msg-Id": events[0]["event_id"]})  # type: ignore[attr-defined]
    assert ack.duplicate
