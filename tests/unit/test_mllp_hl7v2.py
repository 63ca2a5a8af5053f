"""The HL7 v2 ingress's pure parts: PID as the mpi's Patient, the idempotency key of a message,
and the ACK of the mpi's answers (gateway/mllp)."""

from __future__ import annotations

import hl7
import pytest

from gateway.mllp.feed import idempotency_key
from gateway.mllp.hl7v2 import Outcome, acknowledgement, header_of, merge_of, parse, patient_of
from hie.mpi.v1 import mpi_pb2
from services.shared.idempotency import MAX_KEY_LENGTH

MSH = "MSH|^~\\&|HIS|hosp-1|HIE|HIE|20261201120000||ADT^A04^ADT_A04|C-1|P|2.5|||||CHN|UNICODE UTF-8"


def test_pid_becomes_the_patient_the_mpi_validates() -> None:
    raw = (
        MSH + "\rPID|1||L-1^^^hosp-1^MR~110101199003077777^^^CHN^NNCHN~YB-9^^^urn:cn:yb^SS||张^伟||19900307|M|||"
        "西直门南大街2号^^北京市^北京市^100035||13800138000~^^^^^^^^^^^13900139000"
    ).encode()
    message, codec = parse(raw)
    patient = patient_of(message, "hosp-1")
    assert codec == "utf-8"
    assert (patient.ref.domain, patient.ref.local_id) == ("hosp-1", "L-1")
    assert [(i.type, i.system, i.value) for i in patient.identifiers] == [
        ("NNCHN", "", "110101199003077777"),
        ("SS", "urn:cn:yb", "YB-9"),
    ]
    assert (patient.name.text, patient.name.family, patient.name.given) == ("张伟", "张", "伟")
    assert (patient.gender, patient.birth_date) == (mpi_pb2.GENDER_MALE, "1990-03-07")
    assert list(patient.phones) == ["13800138000", "13900139000"]
    assert (patient.address.city, patient.address.postal_code) == ("北京市", "100035")


def test_a_local_id_of_another_authority_is_an_identifier_not_the_local_id() -> None:
    message, _ = parse((MSH + "\rPID|1||X-1^^^other-hosp^MR||王^五").encode())
    patient = patient_of(message, "hosp-1")
    assert patient.ref.local_id == ""  # the mpi refuses it: local-id-invalid
    assert [(i.system, i.value) for i in patient.identifiers] == [("other-hosp", "X-1")]


def test_a40_names_the_survivor_and_the_retired_record() -> None:
    message, _ = parse((MSH.replace("A04", "A40") + "\rPID|1||S-1^^^hosp-1^MR\rMRG|R-1^^^hosp-1^MR").encode())
    assert merge_of(message, "hosp-1") == ("S-1", "R-1")


def test_the_idempotency_key_is_the_facility_and_control_id_and_never_too_long() -> None:
    assert idempotency_key("hosp-1", "C-1") == "hl7v2:hosp-1:C-1"
    assert idempotency_key("hosp-1", "C-1") != idempotency_key("hosp-2", "C-1")
    long = idempotency_key("h" * 64, "c" * 64)
    assert len(long) <= MAX_KEY_LENGTH
    assert long == idempotency_key("h" * 64, "c" * 64)
    assert long != idempotency_key("h" * 64, "c" * 63 + "d")


@pytest.mark.parametrize(
    ("outcome", "err"),
    [
        (Outcome("AR", "mpi-unavailable"), ("", "207", "mpi-unavailable")),
        (Outcome("AE", "national-id-checksum"), ("PID^1^3", "102", "national-id-checksum")),
        (Outcome("AR", "control-id-reused"), ("MSH^1^10", "205", "control-id-reused")),
    ],
)
def test_the_ack_of_the_mpis_answers(outcome: Outcome, err: tuple[str, str, str]) -> None:
    raw = (MSH + "\rPID|1").encode()
    ack = hl7.parse(acknowledgement(header_of(raw), outcome))
    assert str(ack.segment("MSA")(1)) == outcome.code
    assert str(ack.segment("MSA")(2)) == "C-1"
    segment = ack.segment("ERR")
    assert (str(segment(2)), str(segment(3)(1)(1)), str(segment(8))) == err
