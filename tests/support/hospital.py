"""A hospital's system calling the mpi over gRPC directly (as the gateway forwards it), with the
random telephone numbers and birth dates the mpi tests register."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import grpc
import jwt

from gateway.client import Practitioner, user_assertion
from hie.common.v1 import common_pb2
from hie.mpi.v1 import mpi_pb2, mpi_pb2_grpc
from services.shared import gb11643
from services.shared.config import TOKEN_AUDIENCE
from services.shared.keys import generate_ec_key, load_private_key, public_jwk
from services.shared.process import RunningService


class Hospital:
    """A hospital's system calling the mpi directly (as the gateway forwards it)."""

    def __init__(self, running: RunningService, keys_dir: Path, *, org_type: str = "hospital") -> None:
        self.org = f"hosp-{secrets.token_hex(4)}"
        self.running = running
        self.keys_dir = keys_dir
        self.org_type = org_type
        # The acting practitioner (a subclass may act as several stewards of one hospital).
        self.practitioner = "S01"

    def metadata(self, role: str = "doctor") -> tuple[tuple[str, str], ...]:
        hospital_key = generate_ec_key()
        client_id = f"client-{self.org}"
        gateway_key = load_private_key(self.keys_dir / "gateway.pem")
        now = int(time.time())
        claims = {
            "iss": "gateway",
            "sub": client_id,
            "client_id": client_id,
            "aud": TOKEN_AUDIENCE,
            "iat": now,
            "exp": now + 120,
            "org": self.org,
            # Data stewards are the platform operator's staff (services/shared/user_assertion.py).
            "org_type": "platform-admin" if role == "data-steward" else self.org_type,
            "scope": "system/Patient.crus",
            "client_jkt": [public_jwk(hospital_key)["kid"]],
        }
        token = jwt.encode(claims, gateway_key, algorithm="ES384", headers={"kid": public_jwk(gateway_key)["kid"]})
        practitioner = Practitioner(id=self.practitioner, name="李管理", role=role, department="信息科")
        assertion = user_assertion(
            key=hospital_key, client_id=client_id, practitioner=practitioner, purpose="treatment"
        )
        return (("authorization", f"Bearer {token}"), ("x-hie-user-assertion", assertion))

    async def call(self, method: str, request: object, *, role: str = "doctor") -> object:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.running.port}") as channel:
            stub = mpi_pb2_grpc.PatientIndexStub(channel)
            return await getattr(stub, method)(request, metadata=self.metadata(role))

    async def register(self, local_id: str, name: str, *, role: str = "doctor", **fields: object) -> object:
        identifiers = []
        nid = str(fields.pop("national_id", "") or "")
        if nid:
            identifiers.append(common_pb2.Identifier(type="NNCHN", value=nid))
            # The gender coded in the id, unless the test says otherwise.
            fields.setdefault("gender", _GENDERS[gb11643.gender(nid)])
        patient = mpi_pb2.Patient(
            ref=common_pb2.PatientRef(local_id=local_id),
            name=mpi_pb2.HumanName(text=name),
            identifiers=identifiers,
            gender=fields.pop("gender", mpi_pb2.GENDER_MALE),
            birth_date=str(fields.pop("birth_date", "1980-01-01")),
            phones=list(fields.pop("phones", [])),
            address=mpi_pb2.Address(
                line=str(fields.pop("line", "")),
                postal_code=str(fields.pop("postal_code", "")),
                district=str(fields.pop("district", "")),
            ),
        )
        return await self.call("RegisterPatient", mpi_pb2.RegisterPatientRequest(patient=patient), role=role)

    def ref(self, local_id: str) -> common_pb2.PatientRef:
        return common_pb2.PatientRef(domain=self.org, local_id=local_id)


_GENDERS = {"male": mpi_pb2.GENDER_MALE, "female": mpi_pb2.GENDER_FEMALE}


def phone() -> str:
    """A random mobile number."""
    return f"139{secrets.randbelow(10**8):08d}"


def birth() -> str:
    """A random birth date in the 20th century."""
    return f"19{secrets.randbelow(80) + 20}-0{secrets.randbelow(9) + 1}-1{secrets.randbelow(9)}"


async def tasks_for(hospital: Hospital, local_id: str) -> list[mpi_pb2.ReviewTask]:
    """The review tasks that name the hospital's `local_id` on either side."""
    listed = await hospital.call("ListReviewTasks", mpi_pb2.ListReviewTasksRequest(page_size=200), role="data-steward")
    return [t for t in listed.tasks if local_id in {t.patient.ref.local_id, t.candidate.ref.local_id}]
