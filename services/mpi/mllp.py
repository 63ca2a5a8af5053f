"""HL7 v2 ADT feed over MLLP: legacy HIS systems register, update and merge patients.

Framing and parsing are the `hl7` package's (asyncio MLLP streams, `hl7.parse`, `create_ack`).
Accepted: ADT^A01 / A04 / A08 / A28 / A31 (register or update: PID) and ADT^A40 (merge: PID
survivor, MRG prior patient). The sending facility (MSH-4) is the hospital domain; a
`FacilityCheck` decides whether it is a registered member.

Acknowledgement (HL7 v2.5 original mode, chapter 2.9): AA when applied and committed (the ACK
is written only after the commit, so an acknowledged message is never lost); AE with an ERR
segment when the message was understood but could not be applied (bad content, unknown record);
AR when it is malformed, not a supported message, or from an unknown facility. MSH-18 selects the
character set: UNICODE UTF-8 (the default when absent) or GB 18030-2000; the ACK is sent in the
same one. A message retried with the same control id (MSH-10) gets its first ACK again, not a
second application (table `inbound_message`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import hl7
import hl7.mllp
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.mpi import domain, store
from services.mpi.index import MasterIndex
from services.shared.auth import Caller
from services.shared.errors import DomainError

_log = logging.getLogger(__name__)

FacilityCheck = Callable[[str], Awaitable[bool]]
REGISTER_EVENTS = frozenset({"A01", "A04", "A08", "A28", "A31"})
MERGE_EVENTS = frozenset({"A40"})
# MSH-18 values (HL7 table 0211) → Python codecs. Absent: UTF-8 (a superset of the ASCII default).
CHARSETS = {
    "": "utf-8",
    "ASCII": "ascii",
    "UNICODE UTF-8": "utf-8",
    "UTF-8": "utf-8",
    "GB 18030-2000": "gb18030",
    "GB18030": "gb18030",
    "8859/1": "latin-1",
}
_GENDERS = {"M": domain.Gender.MALE, "F": domain.Gender.FEMALE, "O": domain.Gender.OTHER, "U": domain.Gender.UNKNOWN}
_NATIONAL_ID_TYPES = frozenset({"NNCHN", "NI"})
# HL7 v2.5 table 0357 (message error condition codes) for each refusal reason: where the ERR
# segment points (ERR-2, segment^sequence^field) and the code (ERR-3).
_SEGMENT_SEQUENCE = ("100", "Segment sequence error")
_REQUIRED_FIELD = ("101", "Required field missing")
_DATA_TYPE = ("102", "Data type error")
_TABLE_VALUE = ("103", "Table value not found")
_UNSUPPORTED_TYPE = ("200", "Unsupported message type")
_UNSUPPORTED_EVENT = ("201", "Unsupported event code")
_UNKNOWN_KEY = ("204", "Unknown key identifier")
_DUPLICATE_KEY = ("205", "Duplicate key identifier")
_INTERNAL = ("207", "Application internal error")
_ERRORS: dict[str, tuple[tuple[str, str], str]] = {
    "msh-missing": (_SEGMENT_SEQUENCE, "MSH^1"),
    "malformed": (_SEGMENT_SEQUENCE, "MSH^1"),
    "message-type-missing": (_REQUIRED_FIELD, "MSH^1^9"),
    "control-id-missing": (_REQUIRED_FIELD, "MSH^1^10"),
    "facility-missing": (_REQUIRED_FIELD, "MSH^1^4"),
    "charset-unsupported": (_TABLE_VALUE, "MSH^1^18"),
    # MSH-4 is a Facility (user table 0362): the exchange's member list.
    "facility-unknown": (_TABLE_VALUE, "MSH^1^4"),
    "message-type-unsupported": (_UNSUPPORTED_TYPE, "MSH^1^9"),
    "event-unsupported": (_UNSUPPORTED_EVENT, "MSH^1^9"),
    # A control id already used by a different message (MSH-10 must identify a message uniquely).
    "control-id-reused": (_DUPLICATE_KEY, "MSH^1^10"),
    "mrg-missing": (_REQUIRED_FIELD, "MRG^1^1"),
    "name-missing": (_REQUIRED_FIELD, "PID^1^5"),
    "local-id-invalid": (_DATA_TYPE, "PID^1^3"),
    "identifier-invalid": (_DATA_TYPE, "PID^1^3"),
    "national-id-conflict": (_DATA_TYPE, "PID^1^3"),
    "birth-date-invalid": (_DATA_TYPE, "PID^1^7"),
    "phone-invalid": (_DATA_TYPE, "PID^1^13"),
    "patient-not-found": (_UNKNOWN_KEY, "MRG^1^1"),
    "patient-merged": (_UNKNOWN_KEY, "PID^1^3"),
}


class Rejected(Exception):
    """The message is malformed or not acceptable at all (ACK AR)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Outcome:
    code: str  # AA, AE, AR
    reason: str = ""


def _get(message: hl7.Message, path: str) -> str:
    try:
        return str(message[path]).strip()
    except (KeyError, IndexError, ValueError, TypeError):
        return ""


def _repetitions(message: hl7.Message, segment: str, field: int) -> list[int]:
    numbers = []
    for n in range(1, 21):
        try:
            message[f"{segment}.F{field}.R{n}"]
        except (KeyError, IndexError):
            break
        numbers.append(n)
    return numbers


def segments_of(raw: bytes) -> bytes:
    """The message with its segments separated by CR, as HL7 v2 wants (2.5 ch. 2.5.3: "Each
    segment is ended with a carriage return"); interface engines often send LF or CRLF. Neither byte
    occurs inside a UTF-8 or GB 18030 multi-byte character, so this is safe before decoding."""
    return raw.replace(b"\r\n", b"\r").replace(b"\n", b"\r")


@dataclass(frozen=True)
class Header:
    """The MSH fields an answer needs, read from the raw header even when the rest of the message
    cannot be read (field n of MSH is `field(n)`: MSH-1 is the separator itself)."""

    fields: tuple[str, ...]
    component_separator: str

    def field(self, number: int) -> str:
        index = number - 1
        return self.fields[index].strip() if 0 < index < len(self.fields) else ""

    def component(self, number: int, component: int) -> str:
        parts = self.field(number).split(self.component_separator) if self.component_separator else []
        return parts[component - 1].strip() if len(parts) >= component else ""


def header_of(raw: bytes) -> Header | None:
    """The MSH segment's fields, or None when the message does not begin with one."""
    first = segments_of(raw).split(b"\r", 1)[0]
    if not first.startswith(b"MSH") or len(first) < 8:
        return None
    separator = first[3:4]
    declared = first.split(separator)
    charset = declared[17].split(first[4:5])[0].decode("ascii", "replace").strip().upper() if len(declared) > 17 else ""
    codec = CHARSETS.get(charset, "latin-1")
    text = first.decode(codec, "replace")
    fields = text.split(text[3])
    # MSH-1 is the field separator itself: fields[0] is "MSH", fields[1] is MSH-2.
    return Header(fields=tuple(fields), component_separator=text[4])


def charset_of(raw: bytes) -> str:
    """The Python codec named by MSH-18 (read from the MSH segment's ASCII header fields)."""
    header = segments_of(raw).split(b"\r", 1)[0]
    if not header.startswith(b"MSH") or len(header) < 8:
        raise Rejected("msh-missing")
    separator = header[3:4]
    fields = header.split(separator)
    declared = fields[17].split(header[4:5])[0].decode("ascii", "replace").strip().upper() if len(fields) > 17 else ""
    codec = CHARSETS.get(declared)
    if codec is None:
        raise Rejected("charset-unsupported")
    return codec


def parse(raw: bytes) -> tuple[hl7.Message, str]:
    """The parsed message and its codec; Rejected when it cannot be read as HL7 v2."""
    codec = charset_of(raw)
    try:
        text = segments_of(raw).decode(codec)
        message = hl7.parse(text)
        message.segment("MSH")
    except (UnicodeDecodeError, hl7.ParseException, KeyError, IndexError, ValueError):
        raise Rejected("malformed") from None
    return message, codec


def content_digest(raw: bytes) -> str:
    """SHA-256 of what a message says: its segments (CR-separated) without MSH-7, the time of
    sending, which a sender's retry may stamp anew. Two messages with one control id and different
    digests are different messages."""
    segments = segments_of(raw).rstrip(b"\r").split(b"\r")
    first = segments[0]
    separator = first[3:4]
    if separator:
        fields = first.split(separator)
        if len(fields) > 6:
            fields[6] = b""
        segments[0] = separator.join(fields)
    return hashlib.sha256(b"\r".join(segments)).hexdigest()


def registration_of(message: hl7.Message, facility: str) -> domain.Registration:
    """PID as a registration of the facility's domain (validated by the domain rules)."""
    local_id, national_id = "", ""
    identifiers: list[domain.Identifier] = []
    for n in _repetitions(message, "PID", 3):
        value = _get(message, f"PID.F3.R{n}.C1")
        kind = _get(message, f"PID.F3.R{n}.C5").upper()
        authority = _get(message, f"PID.F3.R{n}.C4")
        if not value:
            continue
        if kind in _NATIONAL_ID_TYPES:
            national_id = value
        elif not local_id and (kind in ("MR", "PI", "") and authority in ("", facility)):
            local_id = value
        else:
            identifiers.append(domain.Identifier(system=authority or f"urn:hie:{kind.lower()}", value=value, type=kind))
    family, given = _get(message, "PID.F5.R1.C1"), _get(message, "PID.F5.R1.C2")
    han = any("\u4e00" <= ch <= "\u9fff" for ch in family + given)
    name = f"{family}{given}" if han else " ".join(p for p in (family, given) if p)
    born = _get(message, "PID.F7.R1.C1")[:8]
    phones = []
    for n in _repetitions(message, "PID", 13):
        number = _get(message, f"PID.F13.R{n}.C1") or _get(message, f"PID.F13.R{n}.C12")
        if number:
            phones.append(number)
    return domain.validate_registration(
        domain=facility,
        local_id=local_id,
        name_text=name,
        family=family,
        given=given,
        gender=_GENDERS.get(_get(message, "PID.F8").upper()[:1], domain.Gender.UNKNOWN),
        birth_date=f"{born[:4]}-{born[4:6]}-{born[6:8]}" if len(born) == 8 else "",
        national_id=national_id,
        phones=phones[:5],
        province=_get(message, "PID.F11.R1.C4"),
        city=_get(message, "PID.F11.R1.C3"),
        district=_get(message, "PID.F11.R1.C9"),
        address_line=" ".join(p for p in (_get(message, "PID.F11.R1.C1"), _get(message, "PID.F11.R1.C2")) if p),
        postal_code=_get(message, "PID.F11.R1.C5"),
        identifiers=identifiers,
    )


def acknowledgement(header: Header | None, outcome: Outcome) -> str:
    """The ACK (HL7 v2.5 original mode): MSA-1 AA / AE / AR and MSA-2 the message's control id
    (MSH-10) whenever it could be read, with an ERR segment (location, table 0357 code, the reason
    as user message) unless accepted. Built from the raw header, so even a message whose MSH is
    short or unreadable is answered. Reasons are codes, never PHI."""
    h = header or Header(fields=(), component_separator="^")
    now = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d%H%M%S")
    event = h.component(9, 2)
    fields = [
        "MSH",
        "^~\\&",
        "HIE-MPI",
        "HIE",
        h.field(3),
        h.field(4),
        now,
        "",
        f"ACK^{event}^ACK" if event else "ACK",
        f"ACK{uuid.uuid4().hex[:17]}",
        h.field(11) or "P",
        h.field(12) or "2.5",
    ]
    charset = h.field(18)
    if charset and charset.upper() in CHARSETS:
        # The ACK declares the character set it is written in, as the message did (MSH-18).
        fields += [""] * (17 - len(fields)) + [charset]
    ack = "|".join(fields) + f"\rMSA|{outcome.code}|{_escaped(h.field(10))}"
    if outcome.code == "AA":
        return ack
    (code, text), location = _ERRORS.get(outcome.reason, (_INTERNAL, ""))
    return f"{ack}\rERR||{location}|{code}^{text}^HL70357|E||||{outcome.reason}"


def _escaped(value: str) -> str:
    """A value copied into the ACK, with this ACK's delimiters escaped (HL7 v2.5 2.7)."""
    out = value.replace("\\", "\\E\\")
    for char, escape in (("|", "\\F\\"), ("^", "\\S\\"), ("~", "\\R\\"), ("&", "\\T\\")):
        out = out.replace(char, escape)
    return out[:64]


def _caller(facility: str, peer: str) -> Caller:
    return Caller(
        organization_id=facility,
        organization_type="hospital",
        client_id=f"hl7v2:{facility}"[:64],
        role="hl7-feed",
        purpose_of_use="operations",
        client_address=peer[:64],
    )


class AdtFeed:
    """Applies ADT messages to the index, one transaction per message."""

    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        master: MasterIndex,
        facility_check: FacilityCheck,
        notify: Callable[[], None] = lambda: None,
    ) -> None:
        self._sessions = sessions
        self._index = master
        self._facility_check = facility_check
        self._notify = notify
        # SQLite has one writer; the listener serialises its own transactions.
        self._lock = asyncio.Lock()

    async def handle(self, raw: bytes, *, peer: str = "") -> bytes:
        """The encoded ACK for one message (after its change committed, when accepted). Every
        message is answered: what cannot be read is AR with an ERR segment, and a failure of the
        exchange itself is AR 207 (not remembered, so the sender's retry is applied)."""
        header = header_of(raw)
        codec = "utf-8"
        try:
            message, codec = parse(raw)
            outcome = await self._apply(message, raw, peer)
        except Rejected as exc:
            outcome = Outcome("AR", exc.reason)
        except Exception as exc:  # the sender must get an answer; the detail stays in the log
            _log.warning("HL7 v2 message not applied: %s", type(exc).__name__)
            outcome = Outcome("AR", "internal")
        return acknowledgement(header, outcome).encode(codec, "replace")

    async def _apply(self, message: hl7.Message, raw: bytes, peer: str) -> Outcome:
        message_type = _get(message, "MSH.F9.R1.C1")
        event = _get(message, "MSH.F9.R1.C2")
        facility = _get(message, "MSH.F4.R1.C1")
        control_id = _get(message, "MSH.F10")
        if not message_type:
            raise Rejected("message-type-missing")
        if message_type != "ADT":
            raise Rejected("message-type-unsupported")
        if event not in REGISTER_EVENTS | MERGE_EVENTS:
            raise Rejected("event-unsupported")
        if not facility:
            raise Rejected("facility-missing")
        if not control_id or len(control_id) > 64:
            raise Rejected("control-id-missing")
        if not await self._facility_check(facility):
            raise Rejected("facility-unknown")
        who = _caller(facility, peer)
        digest = content_digest(raw)
        async with self._lock:
            try:
                async with self._sessions() as session, session.begin():
                    seen = await store.inbound_message(session, facility, control_id)
                    if seen is not None:
                        if seen.digest and seen.digest != digest:
                            # HL7 v2.5 2.14.9.10: MSH-10 "uniquely identifies the message"; a
                            # different message under a used id (a sender whose counter was
                            # reset) is refused, never silently taken for a retry.
                            return Outcome("AR", "control-id-reused")
                        return Outcome(seen.ack_code, seen.reason)
                    if event in MERGE_EVENTS:
                        await self._merge(session, who, message, facility)
                    else:
                        await self._index.register(session, who, registration_of(message, facility))
                    await store.add_inbound_message(
                        session, facility, control_id, ack_code="AA", reason="", digest=digest
                    )
            except DomainError as exc:
                # Understood but not applicable; remembered so a retry is answered the same way.
                async with self._sessions() as session, session.begin():
                    if await store.inbound_message(session, facility, control_id) is None:
                        await store.add_inbound_message(
                            session, facility, control_id, ack_code="AE", reason=exc.reason, digest=digest
                        )
                return Outcome("AE", exc.reason)
        self._notify()
        return Outcome("AA")

    async def _merge(self, session: AsyncSession, who: Caller, message: hl7.Message, facility: str) -> None:
        survivor = registration_of(message, facility).local_id
        subsumed = _get(message, "MRG.F1.R1.C1")
        if not subsumed:
            raise Rejected("mrg-missing")
        domain.validate_local_id(subsumed)
        await self._index.merge(session, who, facility, survivor, subsumed)


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
