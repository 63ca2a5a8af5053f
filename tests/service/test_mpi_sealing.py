"""Personal data in the mpi's store: sealed at rest, found through blind indexes, a tampered
record refused, re-encrypted online by a key rotation, and an earlier schema's clear rows sealed
by the migration. Real gRPC server, real database (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime
import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from alembic import command

from hie.common.v1 import common_pb2
from hie.mpi.v1 import mpi_pb2
from services.mpi.service import SPEC as MPI
from services.ops.data_keys import keys_in_use, rotate_data_keys
from services.shared import gb11643, migrations
from services.shared.config import Settings
from services.shared.db import engine_for
from services.shared.errors import REASON_METADATA_KEY
from services.shared.process import RunningService, start_service
from tests.conftest import _backends, base_settings, drop_schemas
from tests.support.factories import fresh_national_id
from tests.support.hospital import Hospital, birth, phone
from tests.support.services import Services

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module", params=[(b, suite) for b in _backends() for suite in ("aes", "sm")])
async def mpi(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, keys_dir: Path
) -> AsyncIterator[RunningService]:
    backend, suite = request.param
    # The national-algorithms option (SM4-GCM, HMAC-SM3) is tested the same way as the default.
    started = Services(tmp_path_factory, keys_dir)
    try:
        yield await started.start(MPI, started.settings(backend, crypto_suite=suite), quiet_outbox=True)
    finally:
        await started.close()


async def _stored_text(running: RunningService) -> str:
    """Everything the mpi's personal-data tables hold, as one string."""
    parts = []
    async with running.runtime.engine.connect() as conn:
        for table in ("patient", "patient_identifier", "blocking_key", "name_frequency", "link_history", "outbox"):
            rows = (await conn.execute(sa.select(MPI.metadata.tables[table]))).all()
            parts.append(json.dumps([[str(v) for v in row] for row in rows], ensure_ascii=False))
    return "\n".join(parts)


def _identifier(national_id: str) -> common_pb2.Identifier:
    return common_pb2.Identifier(type="NNCHN", value=national_id)


async def test_personal_data_is_sealed_and_still_found_by_national_id_phone_and_name(
    mpi: RunningService, keys_dir: Path
) -> None:
    hospital = Hospital(mpi, keys_dir)
    national_id, mobile, born = fresh_national_id(), phone(), birth()
    await hospital.register(
        "SEAL-1", "欧阳娜娜", national_id=national_id, phones=[mobile], birth_date=born, line="建国路88号院"
    )

    stored = await _stored_text(mpi)
    for clear in (national_id, national_id[:17], mobile, mobile[-8:], "欧阳", "娜娜", "建国路", "ouyang", "nana"):
        assert clear not in stored, clear
    async with mpi.runtime.engine.connect() as conn:
        sealed = (await conn.execute(sa.text("SELECT sealed FROM patient WHERE local_id = 'SEAL-1'"))).scalar_one()
    assert sealed.startswith(f"e1:dk-{mpi.runtime.settings.crypto_suite}-")

    def found(response: mpi_pb2.SearchPatientsResponse) -> list[str]:
        return [r.patient.ref.local_id for r in response.results if r.patient.ref.domain == hospital.org]

    by_id = await hospital.call("SearchPatients", mpi_pb2.SearchPatientsRequest(identifier=_identifier(national_id)))
    assert found(by_id) == ["SEAL-1"]
    by_phone = await hospital.call("SearchPatients", mpi_pb2.SearchPatientsRequest(name="欧阳娜娜", phone=mobile))
    assert found(by_phone) == ["SEAL-1"]
    by_name = await hospital.call("SearchPatients", mpi_pb2.SearchPatientsRequest(name="Ouyang Nana", birth_date=born))
    assert found(by_name) == ["SEAL-1"]
    other_phone = await hospital.call("SearchPatients", mpi_pb2.SearchPatientsRequest(name="欧阳娜娜", phone=phone()))
    assert found(other_phone) == []

    # Read back opened (the hospital's own doctor sees phone and street; the national id is
    # masked from the opened value).
    got = await hospital.call("GetPatient", mpi_pb2.GetPatientRequest(ref=hospital.ref("SEAL-1")))
    assert got.patient.name.text == "欧阳娜娜"
    assert list(got.patient.phones) == [mobile]
    assert got.patient.address.line == "建国路88号院"
    assert [i.value for i in got.patient.identifiers if i.type == "NNCHN"] == [gb11643.mask(national_id)]


async def test_a_record_whose_ciphertext_was_moved_or_altered_is_data_loss_never_served(
    mpi: RunningService, keys_dir: Path
) -> None:
    hospital = Hospital(mpi, keys_dir)
    await hospital.register("SWAP-1", "司马光", national_id=fresh_national_id(), phones=[phone()])
    await hospital.register("SWAP-2", "诸葛亮", national_id=fresh_national_id(), phones=[phone()])
    async with mpi.runtime.engine.begin() as conn:
        rows = dict(
            (
                await conn.execute(
                    sa.text("SELECT local_id, sealed FROM patient WHERE local_id IN ('SWAP-1', 'SWAP-2')")
                )
            ).all()
        )
        # A valid ciphertext of another record copied over: authentic, but bound to the other row.
        await conn.execute(sa.text("UPDATE patient SET sealed = :s WHERE local_id = 'SWAP-1'"), {"s": rows["SWAP-2"]})
        # One character of the ciphertext body flipped.
        body = rows["SWAP-2"]
        flipped = body[:-5] + ("A" if body[-5] != "A" else "B") + body[-4:]
        await conn.execute(sa.text("UPDATE patient SET sealed = :s WHERE local_id = 'SWAP-2'"), {"s": flipped})

    try:
        for local_id in ("SWAP-1", "SWAP-2"):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await hospital.call("GetPatient", mpi_pb2.GetPatientRequest(ref=hospital.ref(local_id)))
            assert refused.value.code() == grpc.StatusCode.DATA_LOSS
            assert dict(refused.value.trailing_metadata() or ())[REASON_METADATA_KEY] == "record-corrupt"
            assert "司马" not in refused.value.details()
            assert "诸葛" not in refused.value.details()
    finally:
        # Put the originals back (the module's other tests rotate every record).
        async with mpi.runtime.engine.begin() as conn:
            for local_id, sealed in rows.items():
                await conn.execute(
                    sa.text("UPDATE patient SET sealed = :s WHERE local_id = :l"), {"s": sealed, "l": local_id}
                )
    got = await hospital.call("GetPatient", mpi_pb2.GetPatientRequest(ref=hospital.ref("SWAP-1")))
    assert got.patient.name.text == "司马光"


async def test_rotation_reencrypts_every_record_online_and_each_still_opens(
    mpi: RunningService, keys_dir: Path
) -> None:
    hospital = Hospital(mpi, keys_dir)
    names = {f"ROT-{i}": f"测试{secrets.choice('甲乙丙丁戊')}{i}" for i in range(12)}
    for local_id, name in names.items():
        await hospital.register(local_id, name, phones=[phone()], birth_date=birth())
    settings: Settings = mpi.runtime.settings
    before = await keys_in_use(settings, specs=[MPI])

    # The settle time lets the running service pick the new key up (it re-reads the key file each second).
    report = await rotate_data_keys(settings, specs=[MPI], settle_seconds=1.5, echo=lambda _: None)

    assert report.new_key not in before
    assert await keys_in_use(settings, specs=[MPI]) == {report.new_key}
    [(component, progress)] = report.tables
    assert component == "mpi"
    assert progress.unreadable == []
    assert progress.reencrypted >= len(names)
    # The running service follows the rotation: old records open, new ones are sealed under the new key.
    await hospital.register("ROT-after", "测试新", phones=[phone()])
    for local_id, name in {**names, "ROT-after": "测试新"}.items():
        got = await hospital.call("GetPatient", mpi_pb2.GetPatientRequest(ref=hospital.ref(local_id)))
        assert got.patient.name.text == name
    assert await keys_in_use(settings, specs=[MPI]) == {report.new_key}


@pytest.mark.parametrize("backend", _backends())
async def test_the_migration_seals_the_clear_rows_of_an_earlier_schema(
    backend: str, tmp_path: Path, keys_dir: Path
) -> None:
    settings = base_settings(tmp_path, keys_dir, backend)
    national_id, mobile = fresh_national_id(), phone()
    engine = engine_for(settings, "mpi")
    try:
        async with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                await conn.execute(sa.text(f'CREATE SCHEMA "{settings.schema_for("mpi")}"'))
            await conn.run_sync(
                lambda sync: command.upgrade(migrations.alembic_config(MPI.versions, MPI.metadata, sync), "0002")
            )
            now = datetime.datetime(2026, 11, 1, 8, tzinfo=datetime.UTC)
            await conn.execute(
                sa.text(
                    "INSERT INTO patient (id, domain, local_id, enterprise_id, name_text, family, given, gender, "
                    "birth_date, national_id, phones, province, city, district, address_line, postal_code, "
                    "link_method, created_at, updated_at) VALUES ('p-old', 'hosp-old', 'OLD-1', 'e-old', "
                    ":name, '', '', 'male', :born, :nid, :phones, '北京市', '北京市', '东城区', "
                    "'东四十条1号', '100010', 'new', :now, :now)"
                ),
                {
                    "name": "慕容复",
                    "born": datetime.date(1980, 1, 1),
                    "nid": national_id,
                    "phones": json.dumps([mobile]),
                    "now": now,
                },
            )
            await conn.execute(
                sa.text(
                    "INSERT INTO patient_identifier (patient_id, system, value, type) "
                    "VALUES ('p-old', 'urn:hie:identifier:health-card', 'HC-778899', 'HC')"
                )
            )
            await conn.execute(
                sa.text("INSERT INTO blocking_key (key, patient_id) VALUES (:k, 'p-old')"), {"k": f"n:{national_id}"}
            )
            await conn.execute(
                sa.text("INSERT INTO name_frequency (field, value, count) VALUES ('family', 'murong', 1)")
            )
    finally:
        await engine.dispose()

    running = await start_service(MPI, settings, listen="127.0.0.1:0")
    running.runtime.outbox.poll_interval = 3600
    try:
        stored = await _stored_text(running)
        for clear in (national_id, mobile, "慕容复", "东四十条", "HC-778899", "murong"):
            assert clear not in stored, clear
        hospital = Hospital(running, keys_dir)
        hospital.org = "hosp-old"
        got = await hospital.call("GetPatient", mpi_pb2.GetPatientRequest(ref=hospital.ref("OLD-1")))
        assert got.patient.name.text == "慕容复"
        assert got.patient.address.line == "东四十条1号"
        assert {i.value for i in got.patient.identifiers} == {gb11643.mask(national_id), "HC-778899"}
        found = await hospital.call(
            "SearchPatients", mpi_pb2.SearchPatientsRequest(identifier=_identifier(national_id))
        )
        assert [r.patient.ref.local_id for r in found.results] == ["OLD-1"]
    finally:
        await running.stop(grace=None)
        await drop_schemas(settings)
