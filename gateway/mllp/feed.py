"""The HL7 v2 ingress: ADT messages from a legacy HIS applied through the mpi's own gRPC API.

Beside the gateway and part of it (DESIGN.md: "an ingress beside the gateway"), it writes no
table of any service: a register / update (A01 / A04 / A08 / A28 / A31) is the mpi's
`RegisterPatient`, a merge (A40) its `MergePatients`, the calls FHIR and REST make, so the mpi's
rules, audit events and notifications apply exactly as for them. The sending facility (MSH-4)
must be an active member hospital in the gateway's organisation registry; the call carries that
hospital's identity the way the gateway carries a hospital's: an access token for the
organisation, signed with the gateway's token key, and a user assertion for the feed (see
`FeedCredentials`). The idempotency key is built from the facility and MSH-10, so a retried
message gets the mpi's first answer and is never applied twice; a different message under a used
control id is refused by the mpi (idempotency-key-reused) and answered AR 205.

ACK (HL7 v2.5 original mode, ch. 2.9): AA only once the mpi answered (it commits before it
answers); AE with the mpi's reason when the message was understood but refused by the mpi's rules;
AR when it is malformed or not acceptable, and AR 207 when the exchange cannot take it now (the
mpi or the organisation registry unreachable): "the receiving application failed to process the
message for reasons unrelated to its content or format", so the sender resends it later and,
as nothing was applied, nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from pathlib import Path
from typing import Protocol

import grpc
import hl7
import hl7.mllp
import jwt
from opentelemetry import trace
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway import store
from gateway.client import Practitioner, user_assertion
from gateway.mllp.hl7v2 import (
    MERGE_EVENTS,
    Header,
    Outcome,
    Rejected,
    acknowledgement,
    envelope_of,
    header_of,
    merge_of,
    parse,
    patient_of,
)
from hie.mpi.v1 import mpi_pb2, mpi_pb2_grpc
from services.shared.auth import CLIENT_ADDRESS_KEY, USER_ASSERTION_KEY
from services.shared.config import TOKEN_AUDIENCE
from services.shared.errors import PermissionDenied, Unauthenticated, Unavailable, error_from_rpc
from services.shared.idempotency import MAX_KEY_LENGTH
from services.shared.keys import PrivateKey, algorithm_for, generate_ec_key, load_private_key, public_jwk, thumbprint

_log = logging.getLogger(__name__)
_tracer = trace.get_tracer("gateway.mllp")

# The acting "person" of every feed message: the HIS interface itself, as the hospital's
# administrator (the role that registers and merges its own records, services/mpi/servicer.py).
FEED_PRACTITIONER = Practitioner(id="hl7v2-feed", name="HL7 v2 ADT feed", role="admin", department="")
FEED_PURPOSE = "operations"
FEED_SCOPES = "system/Patient.cu"
TOKEN_LIFETIME_SECONDS = 300
RPC_TIMEOUT_SECONDS = 10.0


class FacilityDirectory(Protocol):
    """Whether a sending facility (MSH-4) is a member hospital of the exchange."""

    async def is_member(self, facility: str) -> bool: ...


class OrganisationRegistry:
    """The gateway's organisation registry, read only (it is the gateway's own; this process
    never migrates or writes it). A facility's standing is cached for `ttl` seconds, as the
    gateway caches a client's (gateway/standing.py)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], *, ttl: float = 10.0) -> None:
        self._sessions = sessions
        self._ttl = ttl
        self._cache: dict[str, tuple[float, bool]] = {}

    async def is_member(self, facility: str) -> bool:
        now = time.monotonic()
        cached = self._cache.get(facility)
        if cached and now - cached[0] < self._ttl:
            return cached[1]
        try:
            async with self._sessions() as session:
                org = await store.organization(session, facility[:64])
        except (SQLAlchemyError, OSError) as exc:
            raise Unavailable("the organisation registry is unavailable", reason="registry-unavailable") from exc
        member = org is not None and org.type == "hospital" and org.status == "active"
        if len(self._cache) >= 10_000:
            self._cache.clear()  # bounded: a sender cycling through made-up MSH-4 values
        self._cache[facility] = (now, member)
        return member


class StaticDirectory:
    """A fixed list of facilities (`--facility`), for a listener that serves named senders only."""

    def __init__(self, facilities: set[str]) -> None:
        self._facilities = frozenset(facilities)

    async def is_member(self, facility: str) -> bool:
        return facility in self._facilities


class FeedCredentials:
    """The sending facility's identity on calls to the mpi, as the gateway issues it to a
    hospital's client: an access token (org = the facility, org_type hospital, scope
    system/Patient.cu, client id `hl7v2:<facility>`) signed with the gateway's token key, which
    every service already trusts, and per message a user assertion naming the feed, signed with
    this process's own key whose thumbprint the token lists (`client_jkt`), as the console does
    for a person signed in through it. The key file is re-read when it changes (`hie keys rotate`)."""

    def __init__(self, *, signing_key_file: Path, issuer: str) -> None:
        self._key_file = signing_key_file
        self._issuer = issuer
        self._key_mtime = -1.0
        self._signing_key: PrivateKey | None = None
        self._assertion_key = generate_ec_key()
        self._assertion_jkt = thumbprint(public_jwk(self._assertion_key))
        self._tokens: dict[str, tuple[float, str]] = {}

    def _load(self) -> PrivateKey:
        mtime = self._key_file.stat().st_mtime
        if mtime != self._key_mtime or self._signing_key is None:
            self._signing_key = load_private_key(self._key_file)
            self._key_mtime = mtime
            self._tokens.clear()
        return self._signing_key

    def check(self) -> None:
        """Fail at start, not on the first message, when the signing key cannot be read."""
        self._load()

    @staticmethod
    def client_id(facility: str) -> str:
        return f"hl7v2:{facility}"[:64]

    def _token(self, facility: str) -> str:
        key = self._load()
        now = time.time()
        cached = self._tokens.get(facility)
        if cached and cached[0] - now > 60:
            return cached[1]
        client_id = self.client_id(facility)
        claims = {
            "iss": self._issuer,
            "sub": client_id,
            "aud": TOKEN_AUDIENCE,
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now) + TOKEN_LIFETIME_SECONDS,
            "jti": str(uuid.uuid4()),
            "scope": FEED_SCOPES,
            "client_id": client_id,
            "org": facility,
            "org_type": "hospital",
            "client_jkt": [self._assertion_jkt],
        }
        kid = public_jwk(key)["kid"]
        token = jwt.encode(claims, key, algorithm=algorithm_for(key), headers={"kid": kid, "typ": "at+jwt"})
        self._tokens[facility] = (now + TOKEN_LIFETIME_SECONDS, token)
        return token

    def metadata(self, facility: str, peer: str) -> tuple[tuple[str, str], ...]:
        """The gRPC metadata of one message's call: token, user assertion, the sender's address."""
        assertion = user_assertion(
            key=self._assertion_key,
            client_id=self.client_id(facility),
            practitioner=FEED_PRACTITIONER,
            purpose=FEED_PURPOSE,
            lifetime=120,
        )
        pairs = [("authorization", f"Bearer {self._token(facility)}"), (USER_ASSERTION_KEY, assertion)]
        if peer:
            pairs.append((CLIENT_ADDRESS_KEY, peer[:64]))
        return tuple(pairs)


def idempotency_key(facility: str, control_id: str) -> str:
    """The mpi's idempotency key of a message: its facility and MSH-10 (hashed when too long)."""
    key = f"hl7v2:{facility}:{control_id}"
    if len(key) <= MAX_KEY_LENGTH and key.isprintable():
        return key
    return "hl7v2:" + hashlib.sha256(f"{facility}\0{control_id}".encode()).hexdigest()


class AdtFeed:
    """Answers each ADT message with its ACK, after the mpi applied it (or refused it)."""

    def __init__(
        self,
        *,
        channel: grpc.aio.Channel,
        directory: FacilityDirectory,
        credentials: FeedCredentials,
        timeout: float = RPC_TIMEOUT_SECONDS,
    ) -> None:
        self._stub = mpi_pb2_grpc.PatientIndexStub(channel)
        self._directory = directory
        self._credentials = credentials
        self._timeout = timeout

    async def handle(self, raw: bytes, *, peer: str = "") -> bytes:
        """The encoded ACK for one message. Every message is answered: what cannot be read is AR
        with an ERR segment, and a failure of the exchange itself is AR 207 (the sender resends)."""
        header: Header | None = header_of(raw)
        codec = "utf-8"
        # One trace per message, from here through the mpi to its audit record (which keeps the
        # trace id). Attributes: the facility, the event and the answer; never patient data.
        with _tracer.start_as_current_span("HL7v2 ADT", kind=trace.SpanKind.SERVER) as span:
            try:
                message, codec = parse(raw)
                outcome = await self._apply(message, peer)
            except Rejected as exc:
                outcome = Outcome("AR", exc.reason)
            except Exception as exc:  # the sender must get an answer; the detail stays in the log
                _log.warning("HL7 v2 message not applied: %s", type(exc).__name__)
                outcome = Outcome("AR", "internal")
            if span.is_recording() and header is not None:
                span.set_attributes(
                    {
                        "hie.organization_id": header.component(4, 1)[:64],
                        "hl7.message_type": header.field(9)[:16],
                        "hl7.ack_code": outcome.code,
                        "hl7.error_reason": outcome.reason,
                    }
                )
        return acknowledgement(header, outcome).encode(codec, "replace")

    async def _apply(self, message: hl7.Message, peer: str) -> Outcome:
        envelope = envelope_of(message)
        try:
            member = await self._directory.is_member(envelope.facility)
        except Unavailable as exc:
            _log.warning("HL7 v2 message not applied: the organisation registry is unavailable")
            return Outcome("AR", exc.reason)
        if not member:
            raise Rejected("facility-unknown")
        metadata = self._credentials.metadata(envelope.facility, peer)
        key = idempotency_key(envelope.facility, envelope.control_id)
        try:
            if envelope.event in MERGE_EVENTS:
                survivor, subsumed = merge_of(message, envelope.facility)
                await self._stub.MergePatients(
                    mpi_pb2.MergePatientsRequest(
                        survivor_local_id=survivor, subsumed_local_id=subsumed, idempotency_key=key
                    ),
                    metadata=metadata,
                    timeout=self._timeout,
                )
            else:
                await self._stub.RegisterPatient(
                    mpi_pb2.RegisterPatientRequest(patient=patient_of(message, envelope.facility), idempotency_key=key),
                    metadata=metadata,
                    timeout=self._timeout,
                )
        except grpc.aio.AioRpcError as exc:
            return _outcome_of(error_from_rpc(exc))
        return Outcome("AA")


def _outcome_of(error: Exception) -> Outcome:
    """The ACK of an mpi refusal: its reason (a code, never PHI) goes into ERR-8."""
    reason = getattr(error, "reason", "") or "internal"
    if isinstance(error, Unavailable):
        # Down, restarting or timed out: nothing was applied (or, if it was, the resend gets the
        # first answer through the idempotency key). AR 207 tells the sender to resend later.
        _log.warning("HL7 v2 message not applied: the mpi is unavailable (%s)", reason)
        return Outcome("AR", "mpi-unavailable")
    if reason == "idempotency-key-reused":
        return Outcome("AR", "control-id-reused")
    if isinstance(error, Unauthenticated | PermissionDenied):
        # The feed's own identity refused: a deployment fault (keys), not the sender's message.
        _log.warning("HL7 v2 message not applied: the mpi refused the feed's identity (%s)", reason)
        return Outcome("AR", "internal")
    return Outcome("AE", reason)


async def serve(feed: AdtFeed, *, host: str, port: int) -> asyncio.AbstractServer:
    """Start the MLLP listener; returns the asyncio server (port 0: see server.sockets)."""

    async def connected(reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        address = peer[0] if isinstance(peer, tuple) else ""
        try:
            while not writer.is_closing():
                block = await reader.readblock()
                writer.writeblock(await feed.handle(block, peer=address))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except hl7.mllp.InvalidBlockError:
            _log.warning("MLLP framing error; connection closed")
        except Exception as exc:  # one connection's failure must not stop the listener
            _log.warning("MLLP connection failed: %s", type(exc).__name__)
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    return await hl7.mllp.start_hl7_server(connected, host=host, port=port)
