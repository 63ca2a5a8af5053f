"""HL7 v2 conformance of the MLLP ingress (gateway/mllp), driven with the `hl7` package's MLLP client as an
interface engine sends: every frame answered on a connection that stays open, MSA-2 filled
whenever MSH-10 is readable, table 0357 error codes, control ids never silently reused, LF and
CRLF segment separators; what is applied is then found through the FHIR facade. Issue 16, 7-9."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

import hl7
import hl7.mllp
import pytest

from gateway.client import HospitalClient
from tests.conftest import Exchange
from tests.support.factories import fresh_national_id
from tests.support.fhir_rules import check_fhir
from tests.support.mllp import running_ingress


@dataclass
class Listener:
    port: int
    facility: str
    hospital: HospitalClient


@pytest.fixture
async def listener(exchange: Exchange) -> AsyncIterator[Listener]:
    """The HL7 v2 ingress (gateway/mllp) in front of the running exchange's mpi, with the
    gateway's organisation registry as its list of member hospitals, as `hie up` runs it."""
    hospital = await exchange.member(name="县人民医院")
    facility = hospital.org_id  # type: ignore[attr-defined]
    try:
        async with running_ingress(exchange.settings) as port:
            yield Listener(port, facility, hospital)
    finally:
        await hospital.aclose()


def adt(facility: str, control_id: str, pid: str, *, event: str = "A04", separator: str = "\r") -> str:
    msh = (
        f"MSH|^~\\&|HIS|{facility}|HIE|HIE|20261201120000||ADT^{event}^ADT_{event}|{control_id}|P|2.5"
        "|||||CHN|UNICODE UTF-8"
    )
    return separator.join([msh, f"EVN|{event}|20261201120000", pid])


def pid(local_id: str, facility: str, name: tuple[str, str] = ("钱", "多多"), born: str = "19850312") -> str:
    return f"PID|1||{local_id}^^^{facility}^MR~{fresh_national_id()}^^^CHN^NNCHN||{name[0]}^{name[1]}||{born}|F"


class Connection:
    """One MLLP connection kept open across messages, as an interface engine keeps it."""

    def __init__(self, reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, message: str | bytes) -> hl7.Message:
        self.writer.writeblock(message.encode() if isinstance(message, str) else message)
        await self.writer.drain()
        block = await asyncio.wait_for(self.reader.readblock(), timeout=30)
        return hl7.parse(block.decode())


@pytest.fixture
async def connection(listener: Listener) -> AsyncIterator[Connection]:
    reader, writer = await hl7.mllp.open_hl7_connection("127.0.0.1", listener.port)
    try:
        yield Connection(reader, writer)
    finally:
        writer.close()


def msa(ack: hl7.Message) -> tuple[str, str]:
    segment = ack.segment("MSA")
    return str(segment(1)), str(segment(2)) if len(segment) > 2 else ""


def err(ack: hl7.Message) -> tuple[str, str, str]:
    """ERR-2 (location), ERR-3.1 (table 0357 code), ERR-8 (the reason)."""
    segment = ack.segment("ERR")
    return str(segment(2)), str(segment(3)(1)(1)), str(segment(8))


async def test_every_frame_is_answered_and_the_connection_stays_open(listener: Listener, connection) -> None:
    # An MSH with fewer than ten fields: answered AR with an ERR segment, not a dropped connection.
    short = await connection.send("MSH|^~\\&|HIS|" + listener.facility + "|HIE|HIE\rPID|1")
    assert msa(short)[0] == "AR"
    assert err(short)[1] == "101"
    # Not HL7 at all: AR, segment sequence error.
    garbage = await connection.send(b"hello")
    assert msa(garbage)[0] == "AR"
    assert err(garbage)[1] == "100"
    # The same connection then carries a good message.
    local = f"V2-{secrets.token_hex(3)}"
    applied = await connection.send(adt(listener.facility, "C-1" + local, pid(local, listener.facility)))
    assert msa(applied) == ("AA", "C-1" + local)
    found = await listener.hospital.call(
        "GET",
        "/fhir/R4/DocumentReference",
        params={"patient.identifier": f"urn:hie:patient-id:{listener.facility}|{local}"},
    )
    assert found.status_code == 200, found.text
    await check_fhir(found.json(), base=listener.hospital.base_url)


async def test_a_reused_control_id_with_different_content_is_refused(listener: Listener, connection) -> None:
    local = f"V2-{secrets.token_hex(3)}"
    control = f"R-{local}"
    first = adt(listener.facility, control, pid(local, listener.facility))
    assert msa(await connection.send(first)) == ("AA", control)
    # A retry (same content; a sender may stamp a new MSH-7): the first answer again.
    retry = first.replace("|20261201120000||ADT", "|20261201120500||ADT")
    assert msa(await connection.send(retry)) == ("AA", control)
    # A different message under the used id (an engine whose counter was reset): refused, with why.
    other = adt(listener.facility, control, pid(f"{local}-X", listener.facility, name=("孙", "悟空")))
    refused = await connection.send(other)
    assert msa(refused) == ("AR", control)
    assert err(refused)[1:] == ("205", "control-id-reused")
    pdq = await listener.hospital.call("GET", "/fhir/R4/Patient", params={"name": "孙悟空", "birthdate": "1985-03-12"})
    assert pdq.status_code == 200, pdq.text
    await check_fhir(pdq.json(), base=listener.hospital.base_url)
    assert "entry" not in pdq.json()


@pytest.mark.parametrize(
    ("message", "code", "location"),
    [
        ("MSH|^~\\&|HIS|{f}|HIE|HIE|20261201||ORU^R01|{c}|P|2.5\rOBX|1", "200", "MSH^1^9"),
        ("MSH|^~\\&|HIS|{f}|HIE|HIE|20261201||ADT^A99|{c}|P|2.5\rPID|1", "201", "MSH^1^9"),
        ("MSH|^~\\&|HIS|{f}|HIE|HIE|20261201||ADT^A04|{c}|P|2.5|||||CHN|KOI8-R\rPID|1", "103", "MSH^1^18"),
        ("MSH|^~\\&|HIS|unknown-hospital|HIE|HIE|20261201||ADT^A04|{c}|P|2.5\rPID|1||X^^^^MR||王^五", "103", "MSH^1^4"),
        (
            "MSH|^~\\&|HIS|{f}|HIE|HIE|20261201||ADT^A04|{c}|P|2.5\rPID|1||L1^^^{f}^MR||李^四||19801345|M",
            "102",
            "PID^1^7",
        ),
        ("MSH|^~\\&|HIS|{f}|HIE|HIE|20261201||ADT^A04|{c}|P|2.5\rPID|1||L2^^^{f}^MR||||19800101|M", "101", "PID^1^5"),
        (
            "MSH|^~\\&|HIS|{f}|HIE|HIE|20261201||ADT^A40|{c}|P|2.5\rPID|1||L3^^^{f}^MR||周^一||19800101|M\rMRG|NOPE^^^{f}^MR",
            "204",
            "MRG^1^1",
        ),
    ],
    ids=["type", "event", "charset", "facility", "data-type", "required", "unknown-key"],
)
async def test_errors_carry_table_0357_codes_and_msa_2(
    listener: Listener, connection, message: str, code: str, location: str
) -> None:
    control = f"E-{secrets.token_hex(4)}"
    ack = await connection.send(message.format(f=listener.facility, c=control))
    assert msa(ack)[0] in ("AR", "AE")
    assert msa(ack)[1] == control  # MSA-2 whenever MSH-10 is readable
    assert err(ack)[:2] == (location, code)


@pytest.mark.parametrize("separator", ["\n", "\r\n"], ids=["lf", "crlf"])
async def test_lf_and_crlf_segment_separators_are_accepted(listener: Listener, connection, separator: str) -> None:
    local = f"V2-{secrets.token_hex(3)}"
    control = f"S-{local}"
    ack = await connection.send(adt(listener.facility, control, pid(local, listener.facility), separator=separator))
    assert msa(ack) == ("AA", control)
    found = await listener.hospital.call(
        "GET",
        "/api/v1/patients/" + local + "/cross-references",
    )
    assert found.status_code == 200, found.text
