"""Bulk load of a hospital's historical patients from CSV: batches, one transaction each, with
the load's progress committed in the same transaction (table `bulk_load`), so a load stopped at
any point and started again neither loses nor repeats a row. Rejected rows are written to a file
with their row number and a reason code (never the row's content)."""

from __future__ import annotations

import asyncio
import csv
import gc
import hashlib
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from services.mpi import domain, estimation, matching
from services.mpi.index import BULK_LOAD_LOCK, BatchLink, MasterIndex, Registered
from services.mpi.matching import MatchRecord, Outcome
from services.mpi.standalone import IndexHandle
from services.mpi.store import (
    DecodedRecords,
    active_count,
    bulk_load,
    match_record_of_registration,
    save_bulk_load,
)
from services.shared.auth import Caller
from services.shared.errors import DomainError

FIELDS = (
    "local_id",
    "family",
    "given",
    "name",
    "gender",
    "birth_date",
    "national_id",
    "phone",
    "address",
    "province",
    "city",
    "district",
    "postcode",
)
# Other identifiers: a column mapped to `identifier:<system>` (e.g. identifier:urn:hie:identifier:health-card).
IDENTIFIER_PREFIX = "identifier:"
_GENDERS = {
    "male": domain.Gender.MALE,
    "m": domain.Gender.MALE,
    "男": domain.Gender.MALE,
    "1": domain.Gender.MALE,
    "female": domain.Gender.FEMALE,
    "f": domain.Gender.FEMALE,
    "女": domain.Gender.FEMALE,
    "2": domain.Gender.FEMALE,
}


class GrowingTables:
    """Keeps PostgreSQL's statistics and visibility map of the tables a bulk load grows current:
    ANALYZE whenever they have doubled since last analysed (and once early, after the first
    batch), VACUUM of the tables read by index whenever they have grown by an eighth.

    A load multiplies the index's size; with statistics from when it was small (or none: a
    database without autovacuum, or autovacuum lagging behind a load) the planner reads the blocking
    key and patient tables whole for each batch's lookups, and the load slows as it grows. Seen
    here: 19 million blocking-key rows read by sequential scans in the first 55,000 records.

    VACUUM sets the visibility map of the pages the load filled, so a block's members are read
    from the blocking-key index alone (an index-only scan) instead of a bitmap heap scan and a
    sort per key: a third of the time per key, measured on a 200k-record index. A table that only
    grows has no dead rows: each run visits the pages filled since the last one (the map lets it
    skip the rest), so running it often costs little more in all than running it once. ANALYZE
    samples the whole table each time, so it keeps to the doubling schedule."""

    TABLES = ("patient", "blocking_key", "patient_identifier", "name_frequency")
    # Read by index lookups of the load (block members; known local ids).
    VACUUMED = ("patient", "blocking_key")
    # Vacuum again once the patient table has grown by this share since the last time.
    GROWTH = 0.125

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._postgres = engine.dialect.name == "postgresql"
        self._size: int | None = None  # patient rows, as far as this load knows
        self._analysed: int | None = None  # that size when last analysed
        self._vacuumed: int | None = None  # that size when last vacuumed

    async def grew(self, rows: int) -> None:
        """`rows` more records were committed."""
        if not self._postgres:
            return
        if self._size is None:
            async with self._engine.connect() as conn:
                known = await conn.scalar(text("SELECT reltuples FROM pg_class WHERE oid = 'patient'::regclass"))
            self._size = max(int(known or 0), 0)  # -1: never analysed
        self._size += rows
        analyse = self._analysed is None or self._size >= 2 * max(self._analysed, 500)
        vacuum = self._vacuumed is None or self._size >= (1 + self.GROWTH) * max(self._vacuumed, 500)
        if not (analyse or vacuum):
            return
        async with self._engine.connect() as conn:
            # VACUUM cannot run inside a transaction block.
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            if vacuum:
                await conn.execute(text(f"VACUUM {', '.join(self.VACUUMED)}"))
                self._vacuumed = self._size
            if analyse:
                await conn.execute(text(f"ANALYZE {', '.join(self.TABLES)}"))
                self._analysed = self._size


class QuietCollector:
    """While a bulk load runs, the cyclic garbage collector leaves alone what the process held
    before it (`gc.freeze`) and runs its young collections less often.

    Profiled (py-spy --native, bench 200k on PostgreSQL): a third of the load's time was
    `gc_collect_main`, rescanning the objects the process already held (the caller's rows, the
    matcher's tables, imported modules) and each batch's thousands of short-lived rows; the more
    the process held, the slower the load, which is why the rate fell in its last stretch. A
    batch's objects are freed by reference counting when it ends; the collector still runs
    (it is not disabled), only less often, and on exit everything is as it was (thresholds
    restored, objects unfrozen: they move to the oldest generation). Nested or concurrent
    pipelines in one process share one freeze; a freeze the process made itself is left alone."""

    _depth = 0
    _saved: tuple[int, int, int] | None = None
    _froze = False
    # Young collections per this many net allocations (CPython's default is 700).
    YOUNG_THRESHOLD = 50_000

    def __enter__(self) -> QuietCollector:
        cls = type(self)
        if cls._depth == 0:
            cls._saved = gc.get_threshold()
            cls._froze = gc.get_freeze_count() == 0
            if cls._froze:
                gc.freeze()
            gc.set_threshold(max(cls._saved[0], self.YOUNG_THRESHOLD), *cls._saved[1:])
        cls._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        cls = type(self)
        cls._depth -= 1
        if cls._depth == 0:
            if cls._saved is not None:
                gc.set_threshold(*cls._saved)
            if cls._froze:
                gc.unfreeze()
            cls._saved, cls._froze = None, False


BatchResults = list[Registered | DomainError]
BatchFinish = Callable[[AsyncSession, BatchResults], Awaitable[None]]
BatchCommitted = Callable[[BatchResults], Awaitable[None]]


@dataclass
class _InFlight:
    task: asyncio.Task[BatchResults]
    scored: asyncio.Future[dict[str, Any]]
    local_ids: frozenset[tuple[str, str]]


class BatchPipeline:
    """Registers bulk batches two at a time, each in its own transaction: while one batch writes
    and commits (PostgreSQL's work), the next reads its candidates and scores (this process's
    work), so the two cores are both busy. The later batch scores with the earlier one's records
    as decided (`index.BatchLink`), and commits after it; a failed batch fails the one after it.

    On PostgreSQL; on SQLite (one writer, and a transaction that read before another's commit
    cannot write after it) batches run one after the other. One load runs at a time in an index
    (a session advisory lock, held while the pipeline is open): the batches of one load lock
    their keys shared, so another load's batches must not run alongside them. A batch naming a
    record of the batch before it waits for that one's commit (it updates the row that one
    inserts).

    `submit` returns once the batch before the submitted one has committed; `finish(session,
    results)` runs in the batch's transaction after the batch before it committed (the load's
    progress, so it is saved in order), `committed(results)` after its commit."""

    def __init__(self, engine: AsyncEngine, sessions: Callable[[], AsyncSession], master: MasterIndex) -> None:
        self._engine = engine
        self._sessions = sessions
        self._master = master
        self._in_flight: _InFlight | None = None
        self._guard: AsyncConnection | None = None
        self._collector = QuietCollector()
        # Candidates read by one batch are read again by later ones: built once (store.DecodedRecords).
        self._decoded = DecodedRecords()
        self._tally = matching.ScreenTally()

    @property
    def decoded(self) -> DecodedRecords:
        """The load's comparable records built from the rows it read (hits and misses counted)."""
        return self._decoded

    @property
    def tally(self) -> matching.ScreenTally:
        """Candidates the load's batches scored in full and screened out (`matching.decide`)."""
        return self._tally

    async def __aenter__(self) -> BatchPipeline:
        self._collector.__enter__()
        try:
            await self._lock_loads()
        except BaseException:
            self._collector.__exit__()
            raise
        return self

    async def _lock_loads(self) -> None:
        if self._engine.dialect.name == "postgresql":
            self._guard = await self._engine.connect()
            await self._guard.execute(
                text("SELECT pg_advisory_lock(hashtext(current_schema()), :k)"), {"k": BULK_LOAD_LOCK}
            )
            await self._guard.commit()

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        try:
            await self._close(kind)
        finally:
            self._collector.__exit__()

    async def _close(self, kind: type[BaseException] | None) -> None:
        try:
            if kind is None:
                await self.drain()
            elif self._in_flight is not None:
                self._in_flight.task.cancel()
                await asyncio.gather(self._in_flight.task, return_exceptions=True)
        finally:
            self._in_flight = None
            if self._guard is not None:
                guard, self._guard = self._guard, None
                try:
                    # Released by hand: a pooled connection's session, and its locks, outlive close().
                    await guard.execute(
                        text("SELECT pg_advisory_unlock(hashtext(current_schema()), :k)"), {"k": BULK_LOAD_LOCK}
                    )
                    await guard.commit()
                except BaseException:
                    await guard.invalidate()  # a lost connection ends the session, and its lock
                    raise
                finally:
                    await guard.close()

    async def submit(
        self,
        who: Caller,
        registrations: Sequence[domain.Registration],
        finish: BatchFinish | None = None,
        committed: BatchCommitted | None = None,
    ) -> None:
        previous = self._in_flight
        local_ids = frozenset((r.domain, r.local_id) for r in registrations)
        if previous is not None and (self._guard is None or previous.local_ids & local_ids):
            # SQLite has one writer: there the batches run one after the other.
            await previous.task
            previous = None
        scored: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._run(who, registrations, finish, committed, previous, scored))
        self._in_flight = _InFlight(task, scored, local_ids)
        if previous is not None:
            try:
                await previous.task
            except BaseException:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                self._in_flight = None
                raise

    async def drain(self) -> BatchResults:
        """Wait for the last batch's commit; its results."""
        in_flight, self._in_flight = self._in_flight, None
        return await in_flight.task if in_flight is not None else []

    async def _run(
        self,
        who: Caller,
        registrations: Sequence[domain.Registration],
        finish: BatchFinish | None,
        committed: BatchCommitted | None,
        previous: _InFlight | None,
        scored: asyncio.Future[dict[str, Any]],
    ) -> BatchResults:
        link = BatchLink(
            previous=previous.scored if previous is not None else None,
            scored=scored,
            committed=previous.task if previous is not None else None,
            decoded=self._decoded,
            tally=self._tally,
        )
        async with self._sessions() as session, session.begin():
            results = await self._master.register_batch(session, who, registrations, link=link)
            if previous is not None:
                await previous.task
            if finish is not None:
                await finish(session, results)
        if committed is not None:
            await committed(results)
        return results


@dataclass
class LoadCounts:
    new: int = 0
    linked: int = 0
    review: int = 0
    updated: int = 0
    rejected: int = 0
    rows: int = 0
    # Records kept without their birth date (not a valid date).
    birth_dates_dropped: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class LoadReport:
    load_id: str
    counts: LoadCounts
    resumed_from: int
    seconds: float = 0.0
    rejects_file: Path | None = None
    reasons: dict[str, int] = field(default_factory=dict)
    # The whole file had been loaded by an earlier run: nothing was read or changed.
    already_loaded: bool = False
    # EM estimates stored by this load (source, estimate): before it, from its rows against the
    # index; after it, from the index.
    estimates: list[tuple[str, estimation.Estimate]] = field(default_factory=list)


def column_map(mapping: list[str], header: list[str]) -> dict[str, str]:
    """csv column → field, from `csvcol=field` items; unmapped columns named like a field map to it."""
    result = {c: c for c in header if c in FIELDS}
    for item in mapping:
        column, sep, target = item.partition("=")
        if not sep or not column or (target not in FIELDS and not target.startswith(IDENTIFIER_PREFIX)):
            raise ValueError(f"--map needs csvcol=field with field one of {', '.join(FIELDS)} or identifier:<system>")
        if column not in header:
            raise ValueError(f"--map names a column the file does not have: {column}")
        result[column] = target
    if "local_id" not in result.values():
        raise ValueError("no column is mapped to local_id")
    return result


_DATE_SEPARATORS = str.maketrans({"/": "-", ".": "-"})
_DATE_SHAPE = re.compile(r"\d{4}-\d{2}-\d{2}")


def birth_date_text(value: str) -> str:
    """A birth date as exported, in ISO form: YYYY-MM-DD, YYYYMMDD, YYYY/MM/DD or YYYY.MM.DD;
    "" when it has a date's shape but is no valid date (a typo such as 19651332, or out of
    range): the record is kept without it (a missing birth date is no evidence either way, a
    rejected row loses the patient). Text that is no date at all is returned as it is (the row
    is rejected: the column is probably mapped wrong)."""
    text = value.strip().translate(_DATE_SEPARATORS)
    if len(text) == 8 and text.isdigit():
        text = f"{text[:4]}-{text[4:6]}-{text[6:]}"
    if not _DATE_SHAPE.fullmatch(text):
        return value.strip()  # not a date at all: validation rejects the row
    try:
        domain.parse_birth_date(text)
    except DomainError:
        return ""
    return text


def registration_from_row(row: dict[str, str], mapping: dict[str, str], domain_id: str) -> domain.Registration:
    """One CSV row as a validated registration (InvalidArgument names the field, never its value).
    A birth date that is not a valid date is left out (counted by the load), not a rejection."""
    values: dict[str, str] = {}
    identifiers = []
    for column, target in mapping.items():
        value = (row.get(column) or "").strip()
        if target.startswith(IDENTIFIER_PREFIX):
            if value:
                identifiers.append(domain.Identifier(system=target.removeprefix(IDENTIFIER_PREFIX), value=value))
        else:
            values[target] = value
    phones = [p for p in values.get("phone", "").replace(";", ",").split(",") if p.strip()]
    return domain.validate_registration(
        domain=domain_id,
        local_id=values.get("local_id", ""),
        name_text=values.get("name", ""),
        family=values.get("family", ""),
        given=values.get("given", ""),
        gender=_GENDERS.get(values.get("gender", "").lower(), domain.Gender.UNKNOWN),
        birth_date=birth_date_text(values.get("birth_date", "")),
        national_id=values.get("national_id", ""),
        phones=phones[:5],
        province=values.get("province", ""),
        city=values.get("city", ""),
        district=values.get("district", ""),
        address_line=values.get("address", ""),
        postal_code=values.get("postcode", ""),
        identifiers=identifiers,
    )


def _birth_date_value(row: dict[str, str], mapping: dict[str, str]) -> str:
    return next(((row.get(c) or "").strip() for c, target in mapping.items() if target == "birth_date"), "")


def load_id_of(path: Path, domain_id: str) -> str:
    """A load is one file (by content) into one domain."""
    digest = hashlib.sha256(domain_id.encode() + b"\0")
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:64]


# Encodings a hospital's export may come in: UTF-8 (a BOM is skipped), and GB18030 / GBK from
# Chinese hospital systems (GB18030 is a superset of GBK, so GBK files read as GB18030).
ENCODINGS = {"utf-8": "utf-8-sig", "utf8": "utf-8-sig", "gb18030": "gb18030", "gbk": "gb18030"}


class EncodingError(ValueError):
    """The file's bytes are not in the encoding asked for (the message names `--encoding`)."""


def codec_of(encoding: str) -> str:
    """The Python codec of an accepted `--encoding` value; EncodingError for any other."""
    codec = ENCODINGS.get(encoding.strip().lower())
    if codec is None:
        raise EncodingError(f"--encoding must be one of {', '.join(sorted(ENCODINGS))}")
    return codec


def check_encoding(path: Path, codec: str) -> int:
    """The number of data rows; EncodingError naming `--encoding` when the bytes do not decode
    (read whole before anything is loaded, so a load never stops half-way on a bad byte)."""
    try:
        with path.open(encoding=codec, newline="") as handle:
            return max(sum(1 for _ in csv.reader(handle)) - 1, 0)
    except UnicodeDecodeError:
        raise EncodingError(
            f"the file is not valid {codec.removesuffix('-sig').upper()}: name its encoding with "
            "--encoding (gb18030 or gbk for exports of Chinese hospital systems)"
        ) from None


def _rows(path: Path, codec: str = "utf-8-sig") -> Iterator[dict[str, str]]:
    with path.open(encoding=codec, newline="") as handle:
        yield from csv.DictReader(handle)


def header_of(path: Path, codec: str = "utf-8-sig") -> list[str]:
    with path.open(encoding=codec, newline="") as handle:
        return next(csv.reader(handle), [])


def bulk_caller(domain_id: str) -> Caller:
    return Caller(
        organization_id=domain_id,
        organization_type="hospital",
        client_id="bulk-load",
        role="bulk-load",
        purpose_of_use="operations",
    )


def _keep_rejects_before(path: Path, row: int) -> None:
    """Drop reject lines of rows not committed (a batch interrupted before its commit)."""
    if not path.exists():
        path.write_text("row,reason\n", encoding="utf-8")
        return
    kept = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()[1:]
        if line.split(",", 1)[0].isdigit() and int(line.split(",", 1)[0]) <= row
    ]
    path.write_text("row,reason\n" + "".join(f"{line}\n" for line in kept), encoding="utf-8")


async def load_csv(
    handle: IndexHandle,
    path: Path,
    *,
    domain_id: str,
    mapping: list[str],
    rejects: Path,
    batch_size: int = 500,
    progress: Callable[[int], None] = lambda n: None,
    stop_after_batches: int | None = None,
    encoding: str = "utf-8",
) -> LoadReport:
    """Load (or resume loading) a CSV file into the domain; `progress(n)` is told of every n rows
    done. `stop_after_batches` stops early, as an interruption would (for tests and benchmarks).
    A file loaded to its end before is not read again (`LoadReport.already_loaded`)."""
    codec = codec_of(encoding)
    header = header_of(path, codec)
    columns = column_map(mapping, header)
    load_id = load_id_of(path, domain_id)
    async with handle.sessions() as session:
        state = await bulk_load(session, load_id)
    done = state.rows_done if state else 0
    counts = LoadCounts(**json.loads(state.counts)) if state else LoadCounts()
    if state is not None and state.rows_done >= check_encoding(path, codec):
        return LoadReport(load_id=load_id, counts=counts, resumed_from=done, rejects_file=rejects, already_loaded=True)
    estimates: list[tuple[str, estimation.Estimate]] = []
    if handle.master.use_estimates and done == 0:
        before = await _estimate_before(handle, path, codec, columns, domain_id)
        if before is not None:
            estimates.append(("bulk-load", before))
    reasons: dict[str, int] = {}
    _keep_rejects_before(rejects, done)
    who = bulk_caller(domain_id)
    master: MasterIndex = handle.master
    started = time.perf_counter()
    batch: list[tuple[int, dict[str, str]]] = []
    batches = 0
    growing = GrowingTables(handle.engine)
    progress(done)

    def submitted(
        rows: list[tuple[int, dict[str, str]]],
    ) -> tuple[list[domain.Registration], BatchFinish, BatchCommitted]:
        """A batch's valid registrations, what its transaction does after them (counts, rejects
        and the load's progress, committed with the batch) and what follows its commit."""
        rejected_lines = []
        valid: list[tuple[int, domain.Registration]] = []
        dropped = 0
        for number, row in rows:
            try:
                registration = registration_from_row(row, columns, domain_id)
                valid.append((number, registration))
                dropped += registration.birth_date is None and bool(_birth_date_value(row, columns))
            except DomainError as exc:
                rejected_lines.append((number, exc.reason))

        async def finish(session: AsyncSession, results: BatchResults) -> None:
            nonlocal done
            rejected = list(rejected_lines)
            counts.birth_dates_dropped += dropped
            for (number, _), result in zip(valid, results, strict=True):
                if isinstance(result, DomainError):
                    rejected.append((number, result.reason))
                elif not result.created:
                    counts.updated += 1
                elif result.outcome is Outcome.LINK:
                    counts.linked += 1
                elif result.outcome is Outcome.REVIEW:
                    counts.review += 1
                else:
                    counts.new += 1
            for _, reason in rejected:
                counts.rejected += 1
                reasons[reason] = reasons.get(reason, 0) + 1
            counts.rows = rows[-1][0]
            with rejects.open("a", encoding="utf-8") as out:
                out.writelines(f"{number},{reason}\n" for number, reason in sorted(rejected))
            await save_bulk_load(
                session, load_id, domain=domain_id, rows_done=rows[-1][0], counts=json.dumps(counts.as_dict())
            )
            done = rows[-1][0]

        async def committed(results: BatchResults) -> None:
            progress(len(rows))
            await growing.grew(len(results))

        return [r for _, r in valid], finish, committed

    async with BatchPipeline(handle.engine, handle.sessions, master) as pipeline:
        for number, row in enumerate(_rows(path, codec), start=1):
            if number <= done:
                continue
            batch.append((number, row))
            if len(batch) >= batch_size:
                await pipeline.submit(who, *submitted(batch))
                batch = []
                batches += 1
                if stop_after_batches is not None and batches >= stop_after_batches:
                    break
        else:
            if batch:
                await pipeline.submit(who, *submitted(batch))
    seconds = time.perf_counter() - started
    if handle.master.use_estimates and counts.rows - (state.rows_done if state else 0) >= estimation.MIN_RECORDS:
        after = await _estimate_after(handle)
        if after is not None:
            estimates.append(("index", after))
    return LoadReport(
        load_id=load_id,
        counts=counts,
        resumed_from=state.rows_done if state else 0,
        seconds=seconds,
        rejects_file=rejects,
        reasons=reasons,
        estimates=estimates,
    )


async def _estimate_before(
    handle: IndexHandle, path: Path, codec: str, columns: dict[str, str], domain_id: str
) -> estimation.Estimate | None:
    """Weights for this load, learned before it decides anything: a sample of the file's rows
    against the index's records of other domains (when both are large enough). Stored and in
    force at once when reliable."""
    sample: list[MatchRecord] = []
    rows = 0
    for number, row in enumerate(_rows(path, codec), start=1):
        rows = number
        if len(sample) >= estimation.SAMPLE:
            continue  # counted: the index's size after the load
        try:
            registration = registration_from_row(row, columns, domain_id)
        except DomainError:
            continue
        sample.append(
            match_record_of_registration(registration, record_id=f"row-{number}", enterprise_id=f"row-{number}")
        )
    if len(sample) < estimation.MIN_RECORDS:
        return None
    async with handle.sessions() as session, session.begin():
        stored = await active_count(session)
        if stored < estimation.MIN_INDEX:
            return None
        result = await estimation.estimate(session, sample, handle.master.base_params, population=stored + rows)
        if not result.reliable:
            return None
        await estimation.save(session, result, source="bulk-load")
    async with handle.sessions() as session:
        await handle.master.refresh_parameters(session, force=True)
    return result


async def _estimate_after(handle: IndexHandle) -> estimation.Estimate | None:
    """Weights learned from the index as the load left it (for the registrations that follow)."""
    async with handle.sessions() as session, session.begin():
        result = await estimation.estimate_from_index(session, handle.master.base_params)
        if not result.reliable:
            return None
        await estimation.save(session, result, source="index")
    async with handle.sessions() as session:
        await handle.master.refresh_parameters(session, force=True)
    return result
