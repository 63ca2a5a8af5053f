"""The FHIR R4 Patient resource of the facade, shared by its IHE transactions (pdqm.py, pixm.py,
feed.py, match.py): the identifier systems, one index record as a Patient and a Patient's
demographics as the index takes them, the caller's own local ids, and the CapabilityStatement entry.

- `Patient.id` is the index's record id; the hospital's local id is an identifier with system
  `urn:hie:patient-id:<domain>`, the enterprise id one with system `urn:hie:enterprise-id`, the
  national id (masked unless the caller's role needs it) one with the resident id system.
- `search.score` is the posterior probability that the record is the person sought (0..1).
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import Request

from gateway.deps import Context
from gateway.errors import ApiError
from gateway.routes import rpc
from hie.common.v1 import common_pb2
from hie.mpi.v1 import mpi_pb2

# The one identifier system of a hospital's local patient id, everywhere on the facade (Patient,
# PIXm, ITI-104, DocumentReference, Consent). The older `urn:hie:patient:<domain>` is still
# accepted on input (LEGACY_LOCAL_ID_SYSTEM_PREFIX) and never written.
LOCAL_ID_SYSTEM_PREFIX = "urn:hie:patient-id:"
LEGACY_LOCAL_ID_SYSTEM_PREFIX = "urn:hie:patient:"
ENTERPRISE_ID_SYSTEM = "urn:hie:enterprise-id"
NATIONAL_ID_SYSTEM = "urn:hie:identifier:cn-resident-id"
# Record ids are UUIDs; anything else is not a Patient of this exchange.
RECORD_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
IDENTIFIER_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0203"
MATCH_GRADE_EXTENSION = "http://hl7.org/fhir/StructureDefinition/match-grade"
GENDERS = {
    "male": mpi_pb2.GENDER_MALE,
    "female": mpi_pb2.GENDER_FEMALE,
    "other": mpi_pb2.GENDER_OTHER,
    "unknown": mpi_pb2.GENDER_UNKNOWN,
}
GENDER_CODES = {v: k for k, v in GENDERS.items()}
DEFAULT_COUNT, MAX_COUNT = 20, 100
# Ids one `_id` search takes (comma-separated: any of them).
MAX_IDS = 20


# The IHE actors this facade implements (CapabilityStatement.instantiates), as the profiles publish
# them: PDQm Patient Demographics Supplier (ITI-78) with the Match Operation Option (ITI-119), and
# the PIXm Patient Identifier Cross-reference Manager (ITI-83 query, ITI-104 feed without the Remove
# Patient Option; patients are also fed by REST, HL7 v2 and bulk load).
PDQM_SUPPLIER = "https://profiles.ihe.net/ITI/PDQm/CapabilityStatement/IHE.PDQm.PatientDemographicsSupplier"
PDQM_SUPPLIER_MATCH = "https://profiles.ihe.net/ITI/PDQm/CapabilityStatement/IHE.PDQm.PatientDemographicsSupplierMatch"
PIXM_MANAGER = "https://profiles.ihe.net/ITI/PIXm/CapabilityStatement/IHE.PIXm.Manager"
INSTANTIATES = [PDQM_SUPPLIER, PDQM_SUPPLIER_MATCH, PIXM_MANAGER]
# The Patient profile a PIXm Manager accepts on ITI-104 (ITI TF-2: 3.104.4.1.2.1).
PIXM_PATIENT_PROFILE = "https://profiles.ihe.net/ITI/PIXm/StructureDefinition/IHE.PIXm.Patient"


# FHIR R4 defines these on several resources at once ("individual-*"), the others on Patient.
_SHARED_PARAMS = {"family", "given", "birthdate", "gender", "telecom"}


def _search_param(name: str, type: str, documentation: str) -> dict[str, str]:
    prefix = "individual" if name in _SHARED_PARAMS else "Patient"
    return {
        "name": name,
        "definition": f"http://hl7.org/fhir/SearchParameter/{prefix}-{name}",
        "type": type,
        "documentation": documentation,
    }


PATIENT_SEARCH_PARAMS: list[dict[str, str]] = [
    _search_param(
        "family",
        "string",
        "Family name in characters or pinyin (张 / Zhang). FHIR string search: a prefix, case- and "
        "accent-insensitive, on the characters or the toneless pinyin (司 and si find 司马; zhang finds 张); "
        "homophones (章) and swapped names also match, with a lower score. Modifiers :exact (the whole part "
        "as registered, case-sensitive) and :contains (anywhere, case- and accent-insensitive). Needs a "
        "birthdate, telecom or identifier beside it.",
    ),
    _search_param("given", "string", "Given name in characters or pinyin; prefix, :exact, :contains as family."),
    _search_param(
        "name",
        "string",
        "Any part of the name (family, given, or the whole name as written: 张伟, Zhang Wei); prefix, "
        ":exact, :contains as family.",
    ),
    _search_param("birthdate", "date", "YYYY-MM-DD, exact (prefix eq only)."),
    _search_param("gender", "token", "male | female | other | unknown."),
    _search_param(
        "identifier",
        "token",
        f"[system|]value; no system: the resident id ({NATIONAL_ID_SYSTEM}). A hospital's local id "
        f"({LOCAL_ID_SYSTEM_PREFIX}<domain>) is resolved with $ihe-pix instead.",
    ),
    _search_param("telecom", "token", "A phone number ([phone|]number; the last 8 digits compare)."),
    {
        "name": "_id",
        "definition": "http://hl7.org/fhir/SearchParameter/Resource-id",
        "type": "token",
        "documentation": f"Patient ids (comma-separated, at most {MAX_IDS}); not combined with demographics.",
    },
    {
        "name": "_count",
        "type": "number",
        "documentation": f"Page size, 1 to {MAX_COUNT} (default {DEFAULT_COUNT}); follow the Bundle's next link. "
        "_count=0 answers the total only.",
    },
    {"name": "_summary", "type": "token", "documentation": "count: the total only (no entries)."},
]

# The Patient entry of the CapabilityStatement (gateway/routes/fhir/capability.py assembles it).
PATIENT_CAPABILITY: dict[str, Any] = {
    "type": "Patient",
    "profile": "http://hl7.org/fhir/StructureDefinition/Patient",
    "documentation": "The master patient index (scope system/Patient.r). Patient.id is the id the exchange "
    "gives a hospital's record; `Patient/<id>` means it on every resource of this facade (DocumentReference, "
    f"Consent). A hospital's local id has one identifier system everywhere: {LOCAL_ID_SYSTEM_PREFIX}<organisation>. "
    "IHE PDQm search (ITI-78): every given "
    "parameter must agree, results best first with search.score (probability of being the person sought); "
    "strict handling (unknown or repeated parameters are 400 OperationOutcome); also POST Patient/_search "
    "with a form body. Pages: _count, and the next link's opaque, sealed `page` token (bound to the "
    "calling client, valid 30 minutes; it carries the search, so the link repeats no demographics). "
    "Bundle.total is given unless the search is too broad to count. Patient.id is the index's record id; "
    "read by id (PDQm) for whoever may search, masked by role and purpose like search results (a record "
    "merged away is 404). $match (ITI-119) and $ihe-pix (PIXm ITI-83). PIXm Patient Identity Feed (ITI-104, "
    f"scope system/Patient.c; a merge also system/Patient.u): PUT Patient?identifier={LOCAL_ID_SYSTEM_PREFIX}"
    "<your organisation>|<local id> with the Patient (that identifier in it) adds (201) or revises (200) the "
    "hospital's record; active=false with a link of type replaced-by to the surviving local id (link.other."
    "identifier) merges it into the survivor. Only the calling hospital's own identifier system is accepted "
    "(another domain's: 403). Elements kept: name, gender, birthDate, phone telecom, address, identifiers "
    f"(resident id: {NATIONAL_ID_SYSTEM}); others are not stored. Remove Patient (conditional delete) is not "
    "supported (405).",
    "interaction": [{"code": "read"}, {"code": "search-type"}, {"code": "update"}],
    "supportedProfile": [PIXM_PATIENT_PROFILE],
    "updateCreate": False,
    "conditionalUpdate": True,
    "conditionalDelete": "not-supported",
    "searchParam": PATIENT_SEARCH_PARAMS,
    "operation": [
        {
            "name": "match",
            "definition": "http://hl7.org/fhir/OperationDefinition/Patient-match",
            "documentation": "POST Parameters(resource, count, onlyCertainMatches): a searchset Bundle, "
            "search.score and the match-grade extension (certain / probable / possible).",
        },
        {
            "name": "ihe-pix",
            "definition": "https://profiles.ihe.net/ITI/PIXm/OperationDefinition/IHE.PIXm.pix",
            "documentation": f"sourceIdentifier={LOCAL_ID_SYSTEM_PREFIX}<domain>|<local id>, targetSystem "
            f"(repeatable; {LOCAL_ID_SYSTEM_PREFIX}<domain> or {ENTERPRISE_ID_SYSTEM}).",
        },
    ],
}


def bad(reason: str, message: str) -> ApiError:
    # Messages name the parameter only, never its value (it may be a patient's name or id).
    return ApiError(400, reason, message)


def local_id_system(domain: str) -> str:
    """The identifier system of a hospital's local patient ids."""
    return f"{LOCAL_ID_SYSTEM_PREFIX}{domain}"


def local_id_domain(system: str) -> str | None:
    """The domain a local-id identifier system names (either spelling), or None."""
    for prefix in (LOCAL_ID_SYSTEM_PREFIX, LEGACY_LOCAL_ID_SYSTEM_PREFIX):
        if system.startswith(prefix) and len(system) > len(prefix):
            return system.removeprefix(prefix)
    return None


_NOT_YOURS = "no Patient with that id among your domain's records"


def patient_id_of_reference(reference: str, base: str) -> str:
    """The Patient id of a reference `Patient/<id>` or `<FHIR base>/Patient/<id>` (the exchange's
    own base only); 404 for anything that cannot name a Patient of this exchange."""
    own = f"{base}/fhir/R4/"
    if reference.startswith(own):
        reference = reference.removeprefix(own)
    patient_id = reference.removeprefix("Patient/") if reference.startswith("Patient/") else ""
    if not RECORD_ID.fullmatch(patient_id):
        # FHIR: Patient/<id> is the id this exchange gave the Patient (what PDQm and read return);
        # a hospital's local id goes through the identifier (patient.identifier=<system>|<id>).
        raise ApiError(404, "patient-not-found", "no Patient with that id (a local id goes in patient.identifier)")
    return patient_id


async def own_local_id_of_patient(ctx: Context, request: Request, patient_id: str) -> str:
    """The caller's local id of the Patient with that id. A hospital reaches clinical data through
    its own record of the person (the registry and consent services take the caller's local id),
    so the Patient must be one of the caller's own domain; another's is 404, as unknown ids are."""
    try:
        found = await rpc(
            request.app.state.stubs.mpi.GetPatient(
                mpi_pb2.GetPatientRequest(record_id=patient_id), metadata=ctx.metadata
            )
        )
    except ApiError as exc:
        if exc.status in (403, 404):
            raise ApiError(404, "patient-not-found", _NOT_YOURS) from None
        raise
    if found.patient.ref.domain != ctx.caller.organization_id or not found.patient.ref.local_id:
        raise ApiError(404, "patient-not-found", _NOT_YOURS)
    return found.patient.ref.local_id


def own_local_id_of_identifier(ctx: Context, system: str, value: str, element: str) -> str:
    """The local id of an identifier `<system>|<local id>` of the caller's own domain (either
    spelling of the system; a bare value is taken as the caller's). Another domain's is 404:
    a hospital names its own patients."""
    if system and local_id_domain(system) != ctx.caller.organization_id:
        raise ApiError(404, "patient-not-found", f"{element}: use your own domain's patient ids")
    if not value or len(value) > 64:
        raise bad("search-value-invalid", f"{element}: a local patient id")
    return value


def patient_resource(patient: mpi_pb2.Patient) -> dict[str, Any]:
    """One index record as a FHIR R4 Patient."""
    # (A de-identified view has no local record number, no name and a year for a birth date.)
    identifiers: list[dict[str, Any]] = []
    if patient.ref.local_id:
        identifiers.append(
            {
                "use": "usual",
                "type": {"coding": [{"system": IDENTIFIER_TYPE_SYSTEM, "code": "MR"}]},
                "system": f"{LOCAL_ID_SYSTEM_PREFIX}{patient.ref.domain}",
                "value": patient.ref.local_id,
            }
        )
    identifiers.append({"use": "official", "system": ENTERPRISE_ID_SYSTEM, "value": patient.enterprise_id})
    for ident in patient.identifiers:
        entry: dict[str, Any] = {"system": ident.system, "value": ident.value}
        if ident.type:
            entry["type"] = {"coding": [{"system": IDENTIFIER_TYPE_SYSTEM, "code": ident.type}]}
        identifiers.append(entry)
    name: dict[str, Any] = {"text": patient.name.text} if patient.name.text else {}
    if patient.name.family:
        name["family"] = patient.name.family
    if patient.name.given:
        name["given"] = [patient.name.given]
    resource: dict[str, Any] = {
        "resourceType": "Patient",
        "id": patient.record_id,
        "identifier": identifiers,
        "active": True,
        **({"name": [name]} if name else {}),
        "gender": GENDER_CODES.get(patient.gender, "unknown"),
    }
    if patient.birth_date:
        resource["birthDate"] = patient.birth_date
    if patient.phones:
        resource["telecom"] = [{"system": "phone", "value": p} for p in patient.phones]
    address = patient.address
    if any((address.province, address.city, address.district, address.line, address.postal_code)):
        resource["address"] = [
            {
                k: v
                for k, v in {
                    "line": [address.line] if address.line else None,
                    "district": address.district,
                    "city": address.city,
                    "state": address.province,
                    "postalCode": address.postal_code,
                }.items()
                if v
            }
        ]
    return resource


def scored_entry(base: str, result: mpi_pb2.ScoredPatient, *, grade: bool) -> dict[str, Any]:
    search: dict[str, Any] = {"mode": "match", "score": round(result.probability, 4)}
    if grade:
        search["extension"] = [{"url": MATCH_GRADE_EXTENSION, "valueCode": result.grade}]
    return {
        "fullUrl": f"{base}/fhir/R4/Patient/{result.patient.record_id}",
        "resource": patient_resource(result.patient),
        "search": search,
    }


def split_token(value: str) -> tuple[str, str]:
    """(system, code) of a token `[system|]code`."""
    system, sep, code = value.partition("|")
    if not sep:
        return "", value
    return system, code


# Han characters (CJK unified ideographs and their extensions): a name written in them has no
# space between family and given name (张伟), one in Latin letters has (Zhang Wei).
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")


# What one record holds at most (as the REST registration): more is refused, not cut.
_MAX_PHONES, _MAX_IDENTIFIERS = 5, 20


def invalid_resource(element: str, expected: str) -> ApiError:
    # Names the element, never its value (a name, id or phone).
    return bad("resource-invalid", f"Patient.{element}: {expected}")


def text_of(value: object, element: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise invalid_resource(element, "a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (JSON "\ud800"): no text a message can carry
        raise invalid_resource(element, "valid Unicode text") from None
    return value


def objects_of(container: dict[str, Any], key: str, element: str) -> list[dict[str, Any]]:
    value = container.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise invalid_resource(element, "a list of objects")
    return value


def texts_of(container: dict[str, Any], key: str, element: str) -> list[str]:
    value = container.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid_resource(element, "a list of strings")
    return [text_of(item, element) for item in value]


def _name_text(family: str, given: str) -> str:
    separator = "" if _HAN.search(family + given) else " "
    return separator.join(part for part in (family, given) if part)


def patient_message(resource: object) -> mpi_pb2.Patient:
    """The demographics of a FHIR Patient as the index takes them ($match, the ITI-104 feed): the
    first usual / official name (text, or family and given), gender, birthDate, phone telecoms,
    the first address and identifiers (the resident id as NNCHN). A hospital's local id and the
    enterprise id are not identifiers of the record (they are its reference and the exchange's
    own). A malformed element is 400 naming the element; values are checked by the index."""
    if not isinstance(resource, dict) or resource.get("resourceType") != "Patient":
        raise bad("resource-invalid", "the resource must be a Patient")
    names = objects_of(resource, "name", "name")
    chosen = next((n for n in names if n.get("use") in (None, "usual", "official")), names[0] if names else {})
    family = text_of(chosen.get("family"), "name.family")
    given_parts = texts_of(chosen, "given", "name.given")
    given = ("" if _HAN.search("".join(given_parts)) else " ").join(given_parts)
    text = text_of(chosen.get("text"), "name.text") or _name_text(family, given)
    gender = text_of(resource.get("gender"), "gender")
    if gender and gender not in GENDERS:
        raise invalid_resource("gender", "male | female | other | unknown")
    identifiers = []
    for ident in objects_of(resource, "identifier", "identifier"):
        system, value = (
            text_of(ident.get("system"), "identifier.system"),
            text_of(ident.get("value"), "identifier.value"),
        )
        type_ = ident.get("type")
        if type_ is not None and not isinstance(type_, dict):
            raise invalid_resource("identifier.type", "a CodeableConcept")
        codes = {
            text_of(c.get("code"), "identifier.type") for c in objects_of(type_ or {}, "coding", "identifier.type")
        }
        if system == NATIONAL_ID_SYSTEM or "NNCHN" in codes:
            identifiers.append(common_pb2.Identifier(type="NNCHN", value=value))
        elif system.startswith(LOCAL_ID_SYSTEM_PREFIX) or system == ENTERPRISE_ID_SYSTEM:
            continue
        elif system or value:
            identifiers.append(common_pb2.Identifier(system=system, value=value))
    phones = [
        text_of(t.get("value"), "telecom.value")
        for t in objects_of(resource, "telecom", "telecom")
        if text_of(t.get("system"), "telecom.system") == "phone"
    ]
    if len(phones) > _MAX_PHONES or len(identifiers) > _MAX_IDENTIFIERS:
        raise invalid_resource("telecom" if len(phones) > _MAX_PHONES else "identifier", "too many entries")
    addresses = objects_of(resource, "address", "address")
    address = addresses[0] if addresses else {}
    return mpi_pb2.Patient(
        name=mpi_pb2.HumanName(text=text, family=family, given=given),
        gender=GENDERS.get(gender, mpi_pb2.GENDER_UNKNOWN),
        birth_date=text_of(resource.get("birthDate"), "birthDate"),
        identifiers=identifiers,
        phones=phones,
        address=mpi_pb2.Address(
            province=text_of(address.get("state"), "address.state"),
            city=text_of(address.get("city"), "address.city"),
            district=text_of(address.get("district"), "address.district"),
            line=" ".join(texts_of(address, "line", "address.line")),
            postal_code=text_of(address.get("postalCode"), "address.postalCode"),
        ),
    )
