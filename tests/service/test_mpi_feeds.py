"""The mpi's feeds on a real database: HL7 v2 over real sockets through the ingress
(gateway/mllp) to a real mpi gRPC server (AA, AE, AR, GB 18030, retries, A40 merge) and the bulk
loader interrupted and resumed."""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import gc
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from gateway.mllp.feed import StaticDirectory
from services.mpi import bench, domain, matching, records, store, tables
from services.mpi.bulk import BatchPipeline, bulk_caller, load_csv
from services.mpi.index import BatchLink, MasterIndex, Registered
from services.mpi.matching import Outcome
from services.mpi.service import SPEC as MPI
from services.mpi.standalone import IndexHandle, open_index
from services.shared import gb11643
from services.shared.auth import Caller
from services.shared.config import Settings
from services.shared.process import start_service
from tests.conftest import _backends, base_settings, drop_schemas
from tests.support.factories import fresh_national_id
from tests.support.mllp import running_ingress, send

FACILITY = "hosp-his-1"


@pytest.fixture(params=_backends())
def settings(request: pytest.FixtureRequest, tmp_path: Path, keys_dir: Path) -> Settings:
    return base_settings(tmp_path, keys_dir, request.param)


@pytest.fixture
async def index(settings: Settings) -> AsyncIterator[IndexHandle]:
    async with open_index(settings) as handle:
        yield handle
    await drop_schemas(settings)


@pytest.fixture
async def listener(settings: Settings, index: IndexHandle) -> AsyncIterator[int]:
    """The ingress for FACILITY, calling a real mpi gRPC server on the index's database."""
    mpi = await start_service(MPI, settings, listen="127.0.0.1:0")
    try:
        async with running_ingress(
            dataclasses.replace(settings, targets={**settings.targets, "mpi": f"127.0.0.1:{mpi.port}"}),
            directory=StaticDirectory({FACILITY}),
        ) as port:
            yield port
    finally:
        await mpi.stop(grace=None)


def adt(event: str, control_id: str, pid: str, *, charset: str = "UNICODE UTF-8", facility: str = FACILITY) -> str:
    msh = (
        f"MSH|^~\\&|HIS|{facility}|HIE|HIE|20250101120000||ADT^{event}^ADT_{event}|{control_id}|P|2.5|||||CHN|{charset}"
    )
    return "\r".join([msh, f"EVN|{event}|20250101120000", pid])


async def exchange(port: int, payload: bytes) -> bytes:
    return await send(port, payload, wait=10)


def msa(ack: str) -> list[str]:
    return next(s for s in ack.split("\r") if s.startswith("MSA")).split("|")


async def _record(index: IndexHandle, local_id: str) -> tables.PatientRecord | None:
    async with index.sessions() as session:
        return await store.find_record(session, domain=FACILITY, local_id=local_id)


async def test_a01_in_utf8_is_applied_and_acknowledged_aa(index: IndexHandle, listener: int) -> None:
    nid = fresh_national_id()
    pid = (
        f"PID|1||MLLP-1^^^{FACILITY}^MR~{nid}^^^CHN^NNCHN||张^伟||19800101|M|||"
        "西直门南大街2号^^北京市^北京市^100035||13800138000"
    )
    ack = (await exchange(listener, adt("A01", "MSG-1", pid).encode())).decode()
    assert msa(ack)[1:3] == ["AA", "MSG-1"]
    record = await _record(index, "MLLP-1")
    assert record is not None
    assert (record.name_text, record.family, record.given, record.national_id) == ("张伟", "张", "伟", nid)
    assert (record.city, record.postal_code) == ("北京市", "100035")


async def test_gb18030_message_is_read_and_answered_in_gb18030(index: IndexHandle, listener: int) -> None:
    pid = f"PID|1||MLLP-2^^^{FACILITY}^MR||欧阳^娜娜||19900203|F|||||13912345678"
    raw = adt("A04", "MSG-2", pid, charset="GB 18030-2000").encode("gb18030")
    ack = (await exchange(listener, raw)).decode("gb18030")
    assert msa(ack)[1] == "AA"
    assert ack.split("\r")[0].split("|")[17] == "GB 18030-2000"
    record = await _record(index, "MLLP-2")
    assert record is not None
    assert (record.name_text, record.family) == ("欧阳娜娜", "欧阳")


async def test_understood_but_invalid_is_ae_with_err_and_no_patient_data(index: IndexHandle, listener: int) -> None:
    pid = f"PID|1||MLLP-3^^^{FACILITY}^MR||李^四||19801345|M"
    ack = (await exchange(listener, adt("A08", "MSG-3", pid).encode())).decode()
    assert msa(ack)[1] == "AE"
    err = next(s for s in ack.split("\r") if s.startswith("ERR"))
    assert "birth-date-invalid" in err
    assert "李" not in ack
    assert await _record(index, "MLLP-3") is None
    # A retry of the same message gets the same answer.
    again = (await exchange(listener, adt("A08", "MSG-3", pid).encode())).decode()
    assert msa(again)[1] == "AE"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"this is not HL7", "msh-missing"),
        (adt("A01", "MSG-4", "PID|1||X^^^^MR||王^五", charset="KOI8-R").encode(), "charset-unsupported"),
        (b"MSH|^~\\&|HIS|hosp-his-1|HIE|HIE|20250101||ORU^R01|MSG-5|P|2.5\rOBX|1", "message-type-unsupported"),
        (adt("A01", "MSG-6", "PID|1||X-1^^^^MR||王^五", facility="hosp-unknown").encode(), "facility-unknown"),
    ],
    ids=["not-hl7", "charset", "message-type", "facility"],
)
async def test_malformed_or_unacceptable_is_ar(listener: int, payload: bytes, reason: str) -> None:
    ack = (await exchange(listener, payload)).decode()
    assert msa(ack)[1] == "AR"
    assert reason in next(s for s in ack.split("\r") if s.startswith("ERR"))


async def test_retried_message_is_not_applied_twice_and_a40_merges(index: IndexHandle, listener: int) -> None:
    first = adt("A28", "MSG-7", f"PID|1||MLLP-7^^^{FACILITY}^MR||赵^六||19700707|M")
    second = adt("A28", "MSG-8", f"PID|1||MLLP-8^^^{FACILITY}^MR||赵^六||19700707|M")
    for message in (first, first, second):
        assert msa((await exchange(listener, message.encode())).decode())[1] == "AA"
    merge = "\r".join(
        [
            adt("A40", "MSG-9", f"PID|1||MLLP-7^^^{FACILITY}^MR||赵^六||19700707|M"),
            f"MRG|MLLP-8^^^{FACILITY}^MR",
        ]
    )
    assert msa((await exchange(listener, merge.encode())).decode())[1] == "AA"
    survivor, subsumed = await _record(index, "MLLP-7"), await _record(index, "MLLP-8")
    assert subsumed is not None
    assert survivor is not None
    assert subsumed.merged_into == survivor.id
    async with index.sessions() as session:
        history = await store.link_history(session, [survivor.id])
    assert [h.reason for h in history] == ["register"]  # MSG-7 twice applied once


async def test_mpi_down_is_answered_ar_and_the_resent_message_is_applied_once_it_is_back(
    settings: Settings, index: IndexHandle
) -> None:
    mpi = await start_service(MPI, settings, listen="127.0.0.1:0")
    port = mpi.port
    target = dataclasses.replace(settings, targets={**settings.targets, "mpi": f"127.0.0.1:{port}"})
    message = adt("A04", "DOWN-1", f"PID|1||MLLP-D^^^{FACILITY}^MR||钱^七||19750505|F").encode()
    async with running_ingress(target, directory=StaticDirectory({FACILITY})) as listener:
        assert (
            msa(
                (
                    await exchange(listener, adt("A04", "UP-1", f"PID|1||MLLP-U^^^{FACILITY}^MR||钱^八").encode())
                ).decode()
            )[1]
            == "AA"
        )
        await mpi.stop(grace=None)
        ack = (await exchange(listener, message)).decode()
        # Not AA: AR (HL7 v2.5 2.9: not processed for a reason unrelated to its content, the
        # sender resends) with table 0357's 207 and the reason, never a traceback.
        assert msa(ack)[1:3] == ["AR", "DOWN-1"]
        err = next(s for s in ack.split("\r") if s.startswith("ERR")).split("|")
        assert (err[3].split("^")[0], err[8]) == ("207", "mpi-unavailable")
        assert "Traceback" not in ack
        assert await _record(index, "MLLP-D") is None
        mpi = await start_service(MPI, settings, listen=f"127.0.0.1:{port}")
        try:
            # The sender resends as interface engines do, until it is acknowledged.
            for _ in range(100):
                ack = (await exchange(listener, message)).decode()
                if msa(ack)[1] == "AA":
                    break
                await asyncio.sleep(0.1)
            assert msa(ack)[1:3] == ["AA", "DOWN-1"]
            assert msa((await exchange(listener, message)).decode())[1:3] == ["AA", "DOWN-1"]
        finally:
            await mpi.stop(grace=None)
    record = await _record(index, "MLLP-D")
    assert record is not None
    assert record.name_text == "钱七"
    async with index.sessions() as session:
        history = await store.link_history(session, [record.id])
    assert [h.reason for h in history] == ["register"]


# --- bulk load ------------------------------------------------------------------------------


def _write_population(path: Path, rows: int) -> set[int]:
    """A CSV of distinct people with some invalid rows; returns the invalid rows' numbers."""
    invalid = set()
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["mrn", "xm", "xb", "csrq", "sfzh", "dh"])
        for n in range(1, rows + 1):
            born = f"19{50 + n % 40}-{n % 12 + 1:02d}-{n % 28 + 1:02d}"
            if n % 97 == 0:
                born = "unknown"  # no date at all: rejected (a mistyped date is left out, the row kept)
                invalid.add(n)
            writer.writerow([f"H-{n:05d}", f"测试{n:05d}", "男" if n % 2 else "女", born, "", f"137{n:08d}"])
    return invalid


class PowerCut(Exception):
    pass


class CrashingIndex(MasterIndex):
    """A real index whose connection is lost (as in a power cut) after writing its n-th batch,
    before the batch commits."""

    def __init__(self, base: MasterIndex, crash_at: int) -> None:
        super().__init__(audit=base.audit, outbox=base.outbox, params=base.params)
        self.batches = 0
        self.crash_at = crash_at

    async def register_batch(self, session, who: Caller, registrations: list[domain.Registration], **options):  # type: ignore[no-untyped-def]
        results = await super().register_batch(session, who, registrations, **options)
        self.batches += 1
        if self.batches == self.crash_at:
            raise PowerCut
        return results


async def test_bulk_load_interrupted_then_resumed_loses_and_duplicates_nothing(
    index: IndexHandle, tmp_path: Path
) -> None:
    source = tmp_path / "patients.csv"
    invalid = _write_population(source, 1000)
    rejects = tmp_path / "rejects.csv"
    mapping = ["mrn=local_id", "xm=name", "xb=gender", "csrq=birth_date", "sfzh=national_id", "dh=phone"]
    # First run: stopped cleanly after 3 batches.
    first = await load_csv(
        index, source, domain_id=FACILITY, mapping=mapping, rejects=rejects, batch_size=100, stop_after_batches=3
    )
    assert first.counts.rows == 300
    # Second run: the process dies in the middle of a batch (uncommitted work is rolled back).
    crashing = IndexHandle(
        engine=index.engine, sessions=index.sessions, outbox=index.outbox, master=CrashingIndex(index.master, 3)
    )
    with pytest.raises(PowerCut):
        await load_csv(crashing, source, domain_id=FACILITY, mapping=mapping, rejects=rejects, batch_size=100)
    # Third run: resumes after the last committed batch and finishes.
    done = await load_csv(index, source, domain_id=FACILITY, mapping=mapping, rejects=rejects, batch_size=100)
    assert done.resumed_from == 500  # two batches of the crashed run committed
    assert done.counts.rows == 1000
    assert done.counts.rejected == len(invalid)
    assert done.counts.new + done.counts.linked + done.counts.review == 1000 - len(invalid)
    async with index.sessions() as session:
        stored = await session.scalar(
            select(func.count()).select_from(tables.PatientRecord).where(tables.PatientRecord.domain == FACILITY)
        )
        distinct = await session.scalar(
            select(func.count(func.distinct(tables.PatientRecord.local_id))).where(
                tables.PatientRecord.domain == FACILITY
            )
        )
    assert stored == distinct == 1000 - len(invalid)
    lines = rejects.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "row,reason"
    assert sorted(int(line.split(",")[0]) for line in lines[1:]) == sorted(invalid)
    assert all(line.split(",")[1] == "birth-date-invalid" for line in lines[1:])
    assert "测试" not in rejects.read_text(encoding="utf-8")
    # Loading the finished file again changes nothing.
    again = await load_csv(index, source, domain_id=FACILITY, mapping=mapping, rejects=rejects, batch_size=100)
    assert again.counts.as_dict() == done.counts.as_dict()


async def test_bulk_load_keeps_the_planner_statistics_of_the_growing_tables(index: IndexHandle, tmp_path: Path) -> None:
    if index.engine.dialect.name != "postgresql":
        pytest.skip("planner statistics are PostgreSQL's")

    async def analysed_rows() -> float:
        async with index.engine.connect() as conn:
            return float(await conn.scalar(text("SELECT reltuples FROM pg_class WHERE oid = 'patient'::regclass")))

    source = tmp_path / "patients.csv"
    invalid = _write_population(source, 1200)
    mapping = ["mrn=local_id", "xm=name", "xb=gender", "csrq=birth_date", "sfzh=national_id", "dh=phone"]
    rejects = tmp_path / "rejects.csv"
    # A new index: never analysed (PostgreSQL says -1).
    assert await analysed_rows() == -1
    first = await load_csv(
        index, source, domain_id=FACILITY, mapping=mapping, rejects=rejects, batch_size=100, stop_after_batches=1
    )
    # Analysed after the first batch, not before: the planner knows of its rows.
    assert await analysed_rows() == first.counts.new + first.counts.linked + first.counts.review
    await load_csv(index, source, domain_id=FACILITY, mapping=mapping, rejects=rejects, batch_size=100)
    # And again as the table grew: the statistics are not those of the first batch.
    assert await analysed_rows() >= 1000 - len([n for n in invalid if n <= 1000])
    # Vacuumed too (this server may run no autovacuum): the pages the load filled are marked all
    # visible, so a block's members are read from the blocking-key index alone.
    async with index.engine.connect() as conn:
        pages, visible = (
            await conn.execute(
                text("SELECT relpages, relallvisible FROM pg_class WHERE oid = 'blocking_key'::regclass")
            )
        ).one()
        plan = "\n".join(
            await conn.scalars(
                text("EXPLAIN SELECT patient_id FROM blocking_key WHERE key = 'k' ORDER BY patient_id LIMIT 501")
            )
        )
    assert visible > 0
    assert visible >= pages / 2
    assert "Index Only Scan" in plan


# --- two batches in flight ------------------------------------------------------------------------


def _person(domain_id: str, local_id: str, national_id: str) -> domain.Registration:
    return domain.validate_registration(
        domain=domain_id,
        local_id=local_id,
        name_text="欧阳春晓",
        gender=domain.Gender.MALE if gb11643.gender(national_id) == "male" else domain.Gender.FEMALE,
        birth_date=gb11643.birth_date(national_id).isoformat(),
        national_id=national_id,
    )


async def test_a_batch_links_to_a_record_the_batch_before_it_decided_but_has_not_committed(
    index: IndexHandle,
) -> None:
    national_id = fresh_national_id()
    earlier = _person("hosp-a", "A-1", national_id)
    # The batch before, still committing: its record is not in the database, only handed on.
    carried = records.match_record_of_registration(earlier, record_id="r-earlier", enterprise_id="e-earlier")
    loop = asyncio.get_running_loop()
    previous: asyncio.Future[dict[str, list[matching.MatchRecord]]] = loop.create_future()
    previous.set_result({key: [carried] for key in matching.blocking_keys(carried)})
    scored: asyncio.Future[dict[str, list[matching.MatchRecord]]] = loop.create_future()
    async with index.sessions() as session, session.begin():
        [result] = await index.master.register_batch(
            session, bulk_caller("hosp-b"), [_person("hosp-b", "B-1", national_id)], link=BatchLink(previous, scored)
        )
        record = await store.find_record(session, domain="hosp-b", local_id="B-1")
    assert isinstance(result, Registered)
    assert result.outcome is Outcome.LINK
    assert record is not None
    assert record.enterprise_id == "e-earlier"
    # And hands its own on to the batch after it, as linked.
    handed = {r.record_id: r.enterprise_id for records in scored.result().values() for r in records}
    assert handed == {record.id: "e-earlier"}


async def test_a_failed_batch_fails_the_one_after_it_and_neither_commits(index: IndexHandle) -> None:
    async def cut(session: object, results: object) -> None:
        raise PowerCut

    first = [_person(FACILITY, f"F-{n}", fresh_national_id()) for n in range(3)]
    second = [_person(FACILITY, f"S-{n}", fresh_national_id()) for n in range(3)]

    async def load() -> None:
        async with BatchPipeline(index.engine, index.sessions, index.master) as pipeline:
            await pipeline.submit(bulk_caller(FACILITY), first, cut)
            await pipeline.submit(bulk_caller(FACILITY), second)

    with pytest.raises(PowerCut):
        await load()
    async with index.sessions() as session:
        assert await session.scalar(select(func.count()).select_from(tables.PatientRecord)) == 0
    # The index is usable again: nothing is left locked.
    async with BatchPipeline(index.engine, index.sessions, index.master) as pipeline:
        await pipeline.submit(bulk_caller(FACILITY), second)
        await pipeline.submit(bulk_caller(FACILITY), first)
    async with index.sessions() as session:
        assert await session.scalar(select(func.count()).select_from(tables.PatientRecord)) == 6


async def test_one_bulk_load_runs_at_a_time(index: IndexHandle) -> None:
    if index.engine.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer anyway")
    first = BatchPipeline(index.engine, index.sessions, index.master)
    second = BatchPipeline(index.engine, index.sessions, index.master)
    await first.__aenter__()
    waiting = asyncio.create_task(second.__aenter__())
    await asyncio.sleep(0.5)
    assert not waiting.done()
    await first.__aexit__(None, None, None)
    await asyncio.wait_for(waiting, 10)
    await second.__aexit__(None, None, None)


async def test_a_batch_updating_a_record_runs_alongside_the_next_batch_sharing_its_keys(
    index: IndexHandle, tmp_path: Path
) -> None:
    mapping = ["mrn=local_id", "xm=name", "csrq=birth_date", "dh=phone", "dz=address"]
    header = ["mrn", "xm", "csrq", "dh", "dz"]
    shared_phone = "13712345678"

    def write(path: Path, rows: list[list[str]]) -> Path:
        with path.open("w", encoding="utf-8", newline="") as handle:
            csv.writer(handle).writerows([header, *rows])
        return path

    first = write(tmp_path / "first.csv", [["A-1", "张三丰", "1950-04-09", shared_phone, "武当山1号"]])
    await load_csv(index, first, domain_id=FACILITY, mapping=mapping, rejects=tmp_path / "r1.csv")
    # Batch 1 updates A-1 after registering 199 others (its keys are locked by the update then),
    # while batch 2, in flight, holds the same phone's key shared and waits for batch 1's commit.
    others = [[f"N-{n}", f"测试{n:03d}", f"1970-01-{n % 28 + 1:02d}", f"136{n:08d}", ""] for n in range(199)]
    second = write(
        tmp_path / "second.csv",
        [
            *others,
            ["A-1", "张三丰", "1950-04-09", shared_phone, "武当山紫霄宫2号"],
            ["D-1", "赵敏", "1990-03-03", shared_phone, ""],
        ],
    )
    report = await asyncio.wait_for(
        load_csv(index, second, domain_id=FACILITY, mapping=mapping, rejects=tmp_path / "r2.csv", batch_size=200), 30
    )
    assert report.counts.updated == 1
    assert report.counts.new + report.counts.review + report.counts.linked == 200
    async with index.sessions() as session:
        updated = await store.find_record(session, domain=FACILITY, local_id="A-1")
    assert updated is not None
    assert updated.address_line == "武当山紫霄宫2号"


async def test_a_block_is_read_to_its_limit_and_no_further(index: IndexHandle) -> None:
    # More records than the limit share one name-only block (the same name, no birth date).
    registrations = [
        domain.validate_registration(
            domain=FACILITY, local_id=f"W-{n}", name_text="王伟", gender=domain.Gender.MALE, phones=[f"135{n:08d}"]
        )
        for n in range(store.BLOCK_READ_LIMIT + 9)
    ]
    async with index.sessions() as session, session.begin():
        results = await index.master.register_batch(session, bulk_caller(FACILITY), registrations)
    assert all(isinstance(r, Registered) for r in results)
    [key] = matching.name_keys(records.match_record_of_registration(registrations[0], record_id="", enterprise_id=""))
    async with index.sessions() as session:
        found = await store.match_candidates_by_key(session, {key})
        stored = await session.scalar(select(func.count()).select_from(tables.PatientRecord))
    assert stored == store.BLOCK_READ_LIMIT + 9
    assert len(found[key]) == store.BLOCK_READ_LIMIT


async def test_a_bulk_load_scores_only_the_candidates_of_a_big_block_that_could_be_reviewed(
    index: IndexHandle,
) -> None:
    # 120 王伟s of one postcode, born in other years at other addresses, share the name + postcode
    # block (and the name + district block) with a later 王伟 of the postcode; his earlier
    # record at another hospital shares his birth date, address and phone too.
    def wang(hospital: str, local_id: str, born: str, line: str, phone: str) -> domain.Registration:
        return domain.validate_registration(
            domain=hospital,
            local_id=local_id,
            name_text="王伟",
            gender=domain.Gender.MALE,
            birth_date=born,
            phones=[phone],
            province="北京市",
            city="北京市",
            district="海淀区",
            address_line=line,
            postal_code="100081",
        )

    namesakes = [
        wang(FACILITY, f"W-{n}", f"{1930 + n // 4}-{1 + n % 4:02d}-28", f"学院路{n + 101}号", f"139{n:08d}")
        for n in range(120)
    ]
    earlier = wang(FACILITY, "W-true", "1980-05-17", "中关村大街5号", "13812345678")
    async with BatchPipeline(index.engine, index.sessions, index.master) as pipeline:
        await pipeline.submit(bulk_caller(FACILITY), [*namesakes, earlier])
    async with BatchPipeline(index.engine, index.sessions, index.master) as pipeline:
        await pipeline.submit(
            bulk_caller("hosp-his-2"), [wang("hosp-his-2", "B-1", "1980-05-17", "中关村大街5号", "13812345678")]
        )
        [result] = await pipeline.drain()
    assert isinstance(result, Registered)
    assert result.outcome is Outcome.LINK
    # The namesakes were read (they share a key) but screened out before their names were
    # compared: none of them could reach the review threshold.
    assert (pipeline.tally.scored, pipeline.tally.screened_out) == (1, 120)
    async with index.sessions() as session:
        linked = await store.find_record(session, domain="hosp-his-2", local_id="B-1")
        true = await store.find_record(session, domain=FACILITY, local_id="W-true")
    assert linked is not None
    assert true is not None
    assert linked.enterprise_id == true.enterprise_id


async def test_a_review_task_against_a_record_of_the_batch_before_waits_for_its_commit(index: IndexHandle) -> None:
    # Seen in `hie bench mpi` on PostgreSQL: the batch in flight opened a review task naming a
    # record the batch before had decided but not committed (ForeignKeyViolationError).
    national_id = fresh_national_id()

    async def slow_commit(session: object, results: object) -> None:
        await asyncio.sleep(1.0)  # the batch before holds its transaction open meanwhile

    async with BatchPipeline(index.engine, index.sessions, index.master) as pipeline:
        await pipeline.submit(bulk_caller(FACILITY), [_person(FACILITY, "R-1", national_id)], slow_commit)
        # The same person again in the same hospital: a duplicate, held for review against R-1.
        await pipeline.submit(bulk_caller(FACILITY), [_person(FACILITY, "R-2", national_id)])
    async with index.sessions() as session:
        tasks = (await session.scalars(select(store.ReviewTask))).all()
        first = await store.find_record(session, domain=FACILITY, local_id="R-1")
    assert first is not None
    assert [t.candidate_id for t in tasks] == [first.id]


async def test_a_bulk_load_keeps_the_collector_off_what_the_process_held_and_restores_it(index: IndexHandle) -> None:
    # A third of a 200k load's time was the cyclic collector rescanning the objects the process
    # held before the load (bulk.QuietCollector): during a load they are frozen, young
    # collections run less often, and afterwards, failed load or not, all is as it was.
    threshold, frozen = gc.get_threshold(), gc.get_freeze_count()
    async with BatchPipeline(index.engine, index.sessions, index.master) as pipeline:
        assert gc.get_freeze_count() > frozen
        assert gc.get_threshold()[0] > threshold[0]
        await pipeline.submit(bulk_caller(FACILITY), [_person(FACILITY, "G-1", fresh_national_id())])
    assert (gc.get_threshold(), gc.get_freeze_count()) == (threshold, frozen)

    async def cut(session: object, results: object) -> None:
        raise PowerCut

    with pytest.raises(PowerCut):
        async with BatchPipeline(index.engine, index.sessions, index.master) as pipeline:
            await pipeline.submit(bulk_caller(FACILITY), [_person(FACILITY, "G-2", fresh_national_id())], cut)
    assert (gc.get_threshold(), gc.get_freeze_count()) == (threshold, frozen)
    async with index.sessions() as session:
        assert await session.scalar(select(func.count()).select_from(tables.PatientRecord)) == 1


def _registration(domain_id: str, local_id: str, name: str, national_id: str, phone: str) -> domain.Registration:
    return domain.validate_registration(
        domain=domain_id,
        local_id=local_id,
        name_text=name,
        gender=domain.Gender.MALE if gb11643.gender(national_id) == "male" else domain.Gender.FEMALE,
        birth_date=gb11643.birth_date(national_id).isoformat(),
        national_id=national_id,
        phones=[phone],
    )


async def test_a_record_read_by_an_earlier_batch_and_changed_since_is_compared_as_it_is_now(
    index: IndexHandle,
) -> None:
    # A load builds each candidate's comparable form once (store.DecodedRecords) and reuses it in
    # later batches; a record updated meanwhile (a single registration) must be compared with its
    # new demographics, one moved to another person (a steward's decision) linked to its new
    # enterprise id.
    phone, moved_id, old_id, new_id = "13912345678", fresh_national_id(), fresh_national_id(), fresh_national_id()
    async with BatchPipeline(index.engine, index.sessions, index.master) as pipeline:
        first = [
            _registration("hosp-a", "A-1", "李四", moved_id, phone),
            _registration("hosp-a", "X-1", "赵六", old_id, phone),
        ]
        await pipeline.submit(bulk_caller("hosp-a"), first)
        await pipeline.drain()
        # Another person with the same phone: are read (and built) as its candidates.
        other = _registration("hosp-b", "B-1", "王五", fresh_national_id(), phone)
        await pipeline.submit(bulk_caller("hosp-b"), [other])
        await pipeline.drain()
        async with index.sessions() as session, session.begin():
            # X-1 corrected by its hospital (another name and national id); A-1 joined by a
            # steward to B-1's person (its enterprise id changes, its demographics do not).
            corrected = _registration("hosp-a", "X-1", "欧阳春晓", new_id, phone)
            await index.master.register(session, bulk_caller("hosp-a"), corrected)
            await index.master.link(session, bulk_caller("hosp-a"), ("hosp-a", "A-1"), ("hosp-b", "B-1"))
        # Their persons registered by a third hospital: linked by the national-id rule to the
        # records as they are now, and to their enterprise ids now.
        third = [
            _registration("hosp-c", "C-1", "李四", moved_id, phone),
            _registration("hosp-c", "C-2", "欧阳春晓", new_id, phone),
        ]
        await pipeline.submit(bulk_caller("hosp-c"), third)
    async with index.sessions() as session:
        found = {
            (d, local_id): await store.find_record(session, domain=d, local_id=local_id)
            for d, local_id in [
                ("hosp-a", "A-1"),
                ("hosp-a", "X-1"),
                ("hosp-b", "B-1"),
                ("hosp-c", "C-1"),
                ("hosp-c", "C-2"),
            ]
        }
    eid = {key: record.enterprise_id for key, record in found.items() if record is not None}
    method = {key: record.link_method for key, record in found.items() if record is not None}
    assert eid[("hosp-a", "A-1")] == eid[("hosp-b", "B-1")]
    assert (method[("hosp-c", "C-1")], eid[("hosp-c", "C-1")]) == ("national-id", eid[("hosp-b", "B-1")])
    assert (method[("hosp-c", "C-2")], eid[("hosp-c", "C-2")]) == ("national-id", eid[("hosp-a", "X-1")])


async def test_a_load_builds_a_candidate_once_and_keeps_at_most_its_limit(index: IndexHandle) -> None:
    registrations = [
        _registration(FACILITY, f"K-{n}", "欧阳春晓", fresh_national_id(), f"137{n:08d}") for n in range(3)
    ]
    async with index.sessions() as session, session.begin():
        await index.master.register_batch(session, bulk_caller(FACILITY), registrations)
    # Each record's phone key: a block of its own.
    phone_keys = [
        {
            k
            for k in matching.blocking_keys(records.match_record_of_registration(r, record_id="", enterprise_id=""))
            if k.startswith("p:")
        }
        for r in registrations
    ]
    decoded = store.DecodedRecords(limit=2)
    async with index.sessions() as session:

        async def read(*which: int) -> dict[str, list[matching.MatchRecord]]:
            return await store.match_candidates_by_key(
                session, set().union(*(phone_keys[n] for n in which)), decoded=decoded
            )

        both = await read(0, 1)  # built
        assert (decoded.misses, decoded.hits) == (2, 0)
        assert await read(0) == {k: v for k, v in both.items() if k in phone_keys[0]}  # reused
        assert (decoded.misses, decoded.hits) == (2, 1)
        await read(2)  # built; K-1, the least recently read, is dropped for the limit
        assert len(decoded) == 2
        await read(0)
        await read(1)  # built again
        assert (decoded.misses, decoded.hits) == (4, 2)
        # The same comparable records as without reuse.
        assert await read(0, 1, 2) == await store.match_candidates_by_key(session, set().union(*phone_keys))


async def test_a_record_a_load_writes_is_kept_as_its_stored_row_reads(index: IndexHandle) -> None:
    # A load keeps the comparable form of each record it writes (`DecodedRecords.remember`): a
    # later batch reading the row reuses it instead of opening the row. What it keeps must be
    # what the stored row builds, field for field, and the row must be recognised as unchanged.
    rows, _ = bench.population(400, 5, seed=3)
    registrations: dict[str, list[domain.Registration]] = {}
    for _, domain_id, local_id, fields in rows:
        registrations.setdefault(domain_id, []).append(bench._registration(domain_id, local_id, fields))
    async with BatchPipeline(index.engine, index.sessions, index.master) as pipeline:
        for domain_id, batch in registrations.items():
            await pipeline.submit(bulk_caller(domain_id), batch)
        await pipeline.drain()
    decoded = pipeline.decoded
    assert len(decoded) == 400
    patient = tables.PatientRecord.__table__
    async with index.sessions() as session:
        stored = (await session.execute(select(patient))).mappings().all()
        sealing = store.sealing_of(session)
        for row in stored:
            assert decoded.record_of(row, sealing) == records.match_record_of_row(row, sealing)
    assert len(stored) == 400
    # No row was opened: not by the load's later batches, nor here.
    assert decoded.misses == 0
