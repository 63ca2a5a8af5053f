"""HL7 v2 ADT messages as the exchange reads and answers them: charset, parsing, the PID → mpi
Patient mapping and the acknowledgement (pure: no I/O).

Framing and parsing are the `hl7` package's (`hl7.parse`; asyncio MLLP streams in `feed.py`).
Accepted: ADT^A01 / A04 / A08 / A28 / A31 (register or update: PID) and ADT^A40 (merge: PID
survivor, MRG prior patient). MSH-18 selects the character set: UNICODE UTF-8 (the default when
absent) or GB 18030-2000; the ACK is written in the same one. Acknowledgement: HL7 v2.5 original
mode (chapter 2.9), MSA-1 AA / AE / AR with an ERR segment carrying a table 0357 code.
"""

from __future__ import annotations

import datetime
import uuid
from dataclasses import dataclass

import hl7

from hie.common.v1 import common_pb2
from hie.mpi.v1 import mpi_pb2

# The mpi reads an identifier of this type as the resident's national id (services/mpi/domain.py).
NATIONAL_ID_TYPE = "NNCHN"
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
_GENDERS = {
    "M": mpi_pb2.GENDER_MALE,
    "F": mpi_pb2.GENDER_FEMALE,
    "O": mpi_pb2.GENDER_OTHER,
    "U": mpi_pb2.GENDER_UNKNOWN,
}
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
    "same-record": (_DUPLICATE_KEY, "MRG^1^1"),
    # The exchange could not take the message now (AR: the sender resends it later).
    "mpi-unavailable": (_INTERNAL, ""),
    "registry-unavailable": (_INTERNAL, ""),
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


def patient_of(message: hl7.Message, facility: str) -> mpi_pb2.Patient:
    """PID as the mpi's Patient message of the facility's domain. Only mapped here: the mpi
    validates it by the same rules as a FHIR or REST registration (its reasons come back as AE)."""
    patient = mpi_pb2.Patient(ref=common_pb2.PatientRef(domain=facility))
    for n in _repetitions(message, "PID", 3):
        value = _get(message, f"PID.F3.R{n}.C1")
        kind = _get(message, f"PID.F3.R{n}.C5").upper()
        authority = _get(message, f"PID.F3.R{n}.C4")
        if not value:
            continue
        if kind in _NATIONAL_ID_TYPES:
            patient.identifiers.append(common_pb2.Identifier(type=NATIONAL_ID_TYPE, value=value))
        elif not patient.ref.local_id and (kind in ("MR", "PI", "") and authority in ("", facility)):
            patient.ref.local_id = value
        else:
            patient.identifiers.append(
                common_pb2.Identifier(system=authority or f"urn:hie:{kind.lower()}", value=value, type=kind)
            )
    family, given = _get(message, "PID.F5.R1.C1"), _get(message, "PID.F5.R1.C2")
    han = any("\u4e00" <= ch <= "\u9fff" for ch in family + given)
    name = f"{family}{given}" if han else " ".join(p for p in (family, given) if p)
    patient.name.CopyFrom(mpi_pb2.HumanName(text=name, family=family, given=given))
    patient.gender = _GENDERS.get(_get(message, "PID.F8").upper()[:1], mpi_pb2.GENDER_UNKNOWN)
    born = _get(message, "PID.F7.R1.C1")[:8]
    # HL7 DT / DTM (YYYYMMDD...) → ISO 8601; an impossible date reaches the mpi and is refused there.
    patient.birth_date = f"{born[:4]}-{born[4:6]}-{born[6:8]}" if len(born) == 8 else ""
    for n in _repetitions(message, "PID", 13):
        number = _get(message, f"PID.F13.R{n}.C1") or _get(message, f"PID.F13.R{n}.C12")
        if number and len(patient.phones) < 5:
            patient.phones.append(number)
    patient.address.CopyFrom(
        mpi_pb2.Address(
            province=_get(message, "PID.F11.R1.C4"),
            city=_get(message, "PID.F11.R1.C3"),
            district=_get(message, "PID.F11.R1.C9"),
            line=" ".join(p for p in (_get(message, "PID.F11.R1.C1"), _get(message, "PID.F11.R1.C2")) if p),
            postal_code=_get(message, "PID.F11.R1.C5"),
        )
    )
    return patient


def merge_of(message: hl7.Message, facility: str) -> tuple[str, str]:
    """ADT^A40: (survivor local id from PID-3, subsumed local id from MRG-1)."""
    survivor = patient_of(message, facility).ref.local_id
    subsumed = _get(message, "MRG.F1.R1.C1")
    if not subsumed:
        raise Rejected("mrg-missing")
    return survivor, subsumed


@dataclass(frozen=True)
class Envelope:
    """What the MSH says about a message the feed accepts for processing."""

    facility: str
    control_id: str
    event: str


def envelope_of(message: hl7.Message) -> Envelope:
    """MSH-4, MSH-9 and MSH-10 checked; Rejected (AR) when the message is not an ADT event the
    exchange takes."""
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
    return Envelope(facility=facility, control_id=control_id, event=event)


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
    if outcome.reason.startswith("national-id-") and outcome.reason not in _ERRORS:
        (code, text), location = _DATA_TYPE, "PID^1^3"
    return f"{ack}\rERR||{location}|{code}^{text}^HL70357|E||||{outcome.reason}"


def _escaped(value: str) -> str:
    """A value copied into the ACK, with this ACK's delimiters escaped (HL7 v2.5 2.7)."""
    out = value.replace("\\", "\\E\\")
    for char, escape in (("|", "\\F\\"), ("^", "\\S\\"), ("~", "\\R\\"), ("&", "\\T\\")):
        out = out.replace(char, escape)
    return out[:64]
