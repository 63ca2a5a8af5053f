"""FHIR R4 Patient on the facade: IHE PDQm search (`GET Patient?...`), `Patient/$match`
(FHIR R4 semantics: a searchset Bundle with `search.score` and the match-grade extension) and
IHE PIXm `Patient/$ihe-pix`.

- `Patient.id` is the index's record id; the hospital's local id is an identifier with system
  `urn:hie:patient-id:<domain>`, the enterprise id one with system `urn:hie:enterprise-id`, the
  national id (masked unless the caller's role needs it) one with the resident id system.
- `search.score` is the posterior probability that the record is the person sought (0..1).
"""

from __future__ import annotations

import re
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlencode

from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import JSONResponse

from gateway.deps import Context
from gateway.errors import ApiError
from gateway.routes import rpc
from hie.common.v1 import common_pb2
from hie.mpi.v1 import mpi_pb2
from services.shared import gb11643

router = APIRouter(prefix="/fhir/R4", tags=["fhir"])
FHIR_JSON = "application/fhir+json"
LOCAL_ID_SYSTEM_PREFIX = "urn:hie:patient-id:"
ENTERPRISE_ID_SYSTEM = "urn:hie:enterprise-id"
NATIONAL_ID_SYSTEM = "urn:hie:identifier:cn-resident-id"
# Record ids are UUIDs; anything else is not a Patient of this exchange.
_RECORD_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
IDENTIFIER_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0203"
MATCH_GRADE_EXTENSION = "http://hl7.org/fhir/StructureDefinition/match-grade"
_GENDERS = {
    "male": mpi_pb2.GENDER_MALE,
    "female": mpi_pb2.GENDER_FEMALE,
    "other": mpi_pb2.GENDER_OTHER,
    "unknown": mpi_pb2.GENDER_UNKNOWN,
}
_GENDER_CODES = {v: k for k, v in _GENDERS.items()}
_PDQ_PARAMS = {"family", "given", "name", "birthdate", "gender", "identifier", "telecom", "_count", "page"}
DEFAULT_COUNT, MAX_COUNT = 20, 100


# The IHE actors this facade implements (CapabilityStatement.instantiates), as the profiles publish
# them: PDQm Patient Demographics Supplier (ITI-78) with the Match Operation Option (ITI-119), and
# the PIXm Patient Identifier Cross-reference Manager (ITI-83; patients are fed by REST, HL7 v2 and
# bulk load, not by ITI-104).
PDQM_SUPPLIER = "https://profiles.ihe.net/ITI/PDQm/CapabilityStatement/IHE.PDQm.PatientDemographicsSupplier"
PDQM_SUPPLIER_MATCH = "https://profiles.ihe.net/ITI/PDQm/CapabilityStatement/IHE.PDQm.PatientDemographicsSupplierMatch"
PIXM_MANAGER = "https://profiles.ihe.net/ITI/PIXm/CapabilityStatement/IHE.PIXm.Manager"
INSTANTIATES = [PDQM_SUPPLIER, PDQM_SUPPLIER_MATCH, PIXM_MANAGER]


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
        "Family name in characters or pinyin (张 / Zhang); homophones (章) and swapped names match with a lower score.",
    ),
    _search_param("given", "string", "Given name in characters or pinyin."),
    _search_param("name", "string", "Full name as written (张伟, Zhang Wei)."),
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
        "name": "_count",
        "type": "number",
        "documentation": f"Page size, 1 to {MAX_COUNT} (default {DEFAULT_COUNT}); follow the Bundle's next link.",
    },
]

# This facade's entry in the CapabilityStatement (gateway/routes/fhir.py lists it).
PATIENT_CAPABILITY: dict[str, Any] = {
    "type": "Patient",
    "profile": "http://hl7.org/fhir/StructureDefinition/Patient",
    "documentation": "The master patient index (scope system/Patient.r). IHE PDQm search (ITI-78): every given "
    "parameter must agree, results best first with search.score (probability of being the person sought); "
    "strict handling (unknown or repeated parameters are 400 OperationOutcome); also POST Patient/_search "
    "with a form body. Pages: _count, and the next link's opaque, sealed `page` token (bound to the "
    "calling client, valid 30 minutes; it carries the search, so the link repeats no demographics). "
    "Bundle.total is given unless the search is too broad to count. Patient.id is the index's record id; "
    "read by id (PDQm) for whoever may search, masked by role and purpose like search results (a record "
    "merged away is 404). $match (ITI-119) and $ihe-pix (PIXm ITI-83).",
    "interaction": [{"code": "read"}, {"code": "search-type"}],
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


def _bad(reason: str, message: str) -> ApiError:
    # Messages name the parameter only, never its value (it may be a patient's name or id).
    return ApiError(400, reason, message)


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
        "gender": _GENDER_CODES.get(patient.gender, "unknown"),
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


def _entry(base: str, result: mpi_pb2.ScoredPatient, *, grade: bool) -> dict[str, Any]:
    search: dict[str, Any] = {"mode": "match", "score": round(result.probability, 4)}
    if grade:
        search["extension"] = [{"url": MATCH_GRADE_EXTENSION, "valueCode": result.grade}]
    return {
        "fullUrl": f"{base}/fhir/R4/Patient/{result.patient.record_id}",
        "resource": patient_resource(result.patient),
        "search": search,
    }


def _masked(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The search as echoed in the Bundle's self link: identifier and telecom values masked (a
    national id or phone number never goes back out in clear)."""
    masked = []
    for name, value in items:
        if name in ("identifier", "telecom"):
            system, sep, code = value.rpartition("|")
            value = f"{system}{sep}{gb11643.mask(code)}"
        masked.append((name, value))
    return masked


def _token(value: str) -> tuple[str, str]:
    system, sep, code = value.partition("|")
    if not sep:
        return "", value
    return system, code


@router.get(
    "/Patient",
    response_class=JSONResponse,
    responses={200: {"content": {FHIR_JSON: {}}, "description": "a searchset Bundle of Patient resources"}},
)
async def search_patients(
    ctx: Context,
    request: Request,
    # Declared for the OpenAPI document and length limits; the search itself is read from the raw
    # query string (strict refusal of unknown or repeated parameters).
    family: str = Query(default="", max_length=64),
    given: str = Query(default="", max_length=64),
    name: str = Query(default="", max_length=64),
    birthdate: str = Query(default="", max_length=12),
    gender: str = Query(default="", max_length=8),
    identifier: str = Query(default="", max_length=300),
    telecom: str = Query(default="", max_length=40),
    count: str = Query(default=str(DEFAULT_COUNT), alias="_count", max_length=6),
    page: str = Query(default="", max_length=2048),
) -> JSONResponse:
    """IHE PDQm: Patient search by demographics; results best first with `search.score`,
    `_count` per page, the next page through the Bundle's `next` link (an opaque, sealed `page`
    token carrying the search, so no demographics go into the link)."""
    return await _pdq(ctx, request, list(request.query_params.multi_items()))


@router.post(
    "/Patient/_search",
    response_class=JSONResponse,
    responses={200: {"content": {FHIR_JSON: {}}, "description": "a searchset Bundle of Patient resources"}},
)
async def search_patients_by_post(ctx: Context, request: Request) -> JSONResponse:
    """The same search with its parameters in an application/x-www-form-urlencoded body (FHIR
    `POST [base]/Patient/_search`), so a national id or phone need not appear in a URL."""
    body = await request.body()
    if len(body) > 4096:
        raise _bad("search-too-long", "the search body is too long")
    try:
        items = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError):
        raise _bad("search-value-invalid", "the body must be form-encoded search parameters") from None
    return await _pdq(ctx, request, items)


_LIMITS = {
    "family": 64,
    "given": 64,
    "name": 64,
    "birthdate": 12,
    "gender": 8,
    "identifier": 300,
    "telecom": 40,
    "page": 2048,
}


async def _pdq(ctx: Context, request: Request, items: list[tuple[str, str]]) -> JSONResponse:
    ctx.require_scope("Patient", "r")
    unknown = {k for k, _ in items} - _PDQ_PARAMS
    if unknown:
        raise _bad("search-parameter-unknown", "unknown search parameter")
    values: dict[str, str] = {}
    for key, value in items:
        if key in values:
            raise _bad("search-parameter-repeated", "a search parameter is given twice")
        if len(value) > _LIMITS.get(key, 6):
            raise _bad("search-value-invalid", f"{key}: value too long")
        values[key] = value
    count_text = values.get("_count", str(DEFAULT_COUNT))
    if not count_text.isascii() or not count_text.isdigit() or not 1 <= int(count_text) <= MAX_COUNT:
        raise _bad("search-value-invalid", f"_count: 1 to {MAX_COUNT}")
    count = int(count_text)
    birthdate, gender = values.get("birthdate", ""), values.get("gender", "")
    if birthdate.startswith(("eq", "ge", "gt", "le", "lt", "ne", "sa", "eb", "ap")):
        birthdate = birthdate[2:] if birthdate.startswith("eq") else "!"
    if birthdate and (len(birthdate) != 10 or birthdate == "!"):
        raise _bad("search-value-invalid", "birthdate: YYYY-MM-DD (eq only)")
    if gender and gender not in _GENDERS:
        raise _bad("search-value-invalid", "gender: male | female | other | unknown")
    search = mpi_pb2.SearchPatientsRequest(
        family=values.get("family", ""),
        given=values.get("given", ""),
        name=values.get("name", ""),
        birth_date=birthdate,
        gender=_GENDERS.get(gender, mpi_pb2.GENDER_UNSPECIFIED),
        phone=values.get("telecom", "").removeprefix("phone|"),
        limit=count,
        page_token=values.get("page", ""),
    )
    if values.get("identifier"):
        system, value = _token(values["identifier"])
        if system.startswith(LOCAL_ID_SYSTEM_PREFIX):
            raise _bad("search-value-invalid", "identifier: use Patient/$ihe-pix for a hospital's local id")
        search.identifier.CopyFrom(
            common_pb2.Identifier(system=system or NATIONAL_ID_SYSTEM, value=value, type="" if system else "NNCHN")
        )
    result = await rpc(request.app.state.stubs.mpi.SearchPatients(search, metadata=ctx.metadata))
    base = request.app.state.settings.public_url
    links = [
        {"relation": "self", "url": f"{base}/fhir/R4/Patient" + (f"?{urlencode(_masked(items))}" if items else "")}
    ]
    if result.next_page_token:
        # The token carries the search itself: the link repeats no name, id or phone, and works the
        # same after a POST _search.
        following = urlencode([("_count", str(count)), ("page", result.next_page_token)])
        links.append({"relation": "next", "url": f"{base}/fhir/R4/Patient?{following}"})
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if result.HasField("total"):
        bundle["total"] = result.total
    bundle["link"] = links
    bundle["entry"] = [_entry(base, r, grade=False) for r in result.results]
    return JSONResponse(bundle, media_type=FHIR_JSON)


def _patient_message(resource: dict[str, Any]) -> mpi_pb2.Patient:
    """The demographics of a FHIR Patient given to $match."""
    if not isinstance(resource, dict) or resource.get("resourceType") != "Patient":
        raise _bad("resource-invalid", "the resource parameter must be a Patient")
    try:
        names = resource.get("name") or [{}]
        first = names[0]
        given = " ".join(first.get("given") or [])
        text = first.get("text") or " ".join(p for p in (first.get("family", ""), given) if p)
        identifiers = []
        for ident in resource.get("identifier") or []:
            codes = {c.get("code") for c in (ident.get("type") or {}).get("coding") or []}
            if ident.get("system") == NATIONAL_ID_SYSTEM or "NNCHN" in codes:
                identifiers.append(common_pb2.Identifier(type="NNCHN", value=str(ident.get("value", ""))))
            elif ident.get("system") and ident.get("value"):
                identifiers.append(common_pb2.Identifier(system=ident["system"], value=str(ident["value"])))
        address = (resource.get("address") or [{}])[0]
        return mpi_pb2.Patient(
            name=mpi_pb2.HumanName(text=str(text), family=str(first.get("family", "")), given=given),
            gender=_GENDERS.get(str(resource.get("gender", "")), mpi_pb2.GENDER_UNKNOWN),
            birth_date=str(resource.get("birthDate", "")),
            identifiers=identifiers,
            phones=[str(t["value"]) for t in resource.get("telecom") or [] if t.get("system") == "phone"][:5],
            address=mpi_pb2.Address(
                province=str(address.get("state", "")),
                city=str(address.get("city", "")),
                district=str(address.get("district", "")),
                line=" ".join(address.get("line") or []),
                postal_code=str(address.get("postalCode", "")),
            ),
        )
    except (AttributeError, TypeError, KeyError, IndexError):
        raise _bad("resource-invalid", "the Patient resource is not well formed") from None


@router.post(
    "/Patient/$match",
    response_class=JSONResponse,
    responses={200: {"content": {FHIR_JSON: {}}, "description": "a searchset Bundle scored and graded"}},
)
async def match_patient(ctx: Context, request: Request, parameters: Annotated[dict[str, Any], Body()]) -> JSONResponse:
    """FHIR Patient/$match: candidates for the given Patient, best first, with `search.score`
    (probability) and the match-grade extension (certain / probable / possible)."""
    ctx.require_scope("Patient", "r")
    if parameters.get("resourceType") != "Parameters":
        raise _bad("parameters-invalid", "the body must be a Parameters resource")
    resource: dict[str, Any] | None = None
    count, only_certain = 10, False
    for parameter in parameters.get("parameter") or []:
        if not isinstance(parameter, dict):
            raise _bad("parameters-invalid", "the body must be a Parameters resource")
        name = parameter.get("name")
        if name == "resource":
            resource = parameter.get("resource")
        elif name == "count":
            count = parameter.get("valueInteger", 10)
        elif name == "onlyCertainMatches":
            only_certain = parameter.get("valueBoolean") is True
    if resource is None:
        raise _bad("parameters-invalid", "the resource parameter is required")
    if not isinstance(count, int) or not 1 <= count <= 100:
        raise _bad("parameters-invalid", "count must be 1 to 100")
    result = await rpc(
        request.app.state.stubs.mpi.MatchPatient(
            mpi_pb2.MatchPatientRequest(patient=_patient_message(resource), count=count, only_certain=only_certain),
            metadata=ctx.metadata,
        )
    )
    base = request.app.state.settings.public_url
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(result.results),
        "entry": [_entry(base, r, grade=True) for r in result.results],
    }
    return JSONResponse(bundle, media_type=FHIR_JSON)


@router.get("/Patient/$ihe-pix", response_class=JSONResponse)
async def ihe_pix(
    ctx: Context,
    request: Request,
    source_identifier: str = Query(alias="sourceIdentifier", max_length=300),
    target_system: list[str] = Query(default=[], alias="targetSystem"),
) -> JSONResponse:
    """IHE PIXm: the person's identifiers in other domains, from one local identifier
    (`sourceIdentifier=urn:hie:patient-id:<domain>|<local id>`). Not found is 404."""
    ctx.require_scope("Patient", "r")
    system, value = _token(source_identifier)
    if not system.startswith(LOCAL_ID_SYSTEM_PREFIX) or not value:
        raise _bad("source-identifier-invalid", f"sourceIdentifier: {LOCAL_ID_SYSTEM_PREFIX}<domain>|<local id>")
    targets = []
    for target in target_system:
        if target == ENTERPRISE_ID_SYSTEM:
            continue
        if not target.startswith(LOCAL_ID_SYSTEM_PREFIX):
            # IHE PIXm: "targetSystem ... not recognized" is a 403 with an OperationOutcome.
            raise ApiError(403, "target-system-unknown", "targetSystem is not a domain of this exchange")
        targets.append(target.removeprefix(LOCAL_ID_SYSTEM_PREFIX))
    result = await rpc(
        request.app.state.stubs.mpi.CrossReference(
            mpi_pb2.CrossReferenceRequest(
                ref=common_pb2.PatientRef(domain=system.removeprefix(LOCAL_ID_SYSTEM_PREFIX), local_id=value),
                target_domains=targets,
            ),
            metadata=ctx.metadata,
        )
    )
    parameter: list[dict[str, Any]] = [
        {
            "name": "targetIdentifier",
            "valueIdentifier": {"system": f"{LOCAL_ID_SYSTEM_PREFIX}{ref.domain}", "value": ref.local_id},
        }
        for ref in result.refs
        if not (ref.domain == system.removeprefix(LOCAL_ID_SYSTEM_PREFIX) and ref.local_id == value)
    ]
    if not target_system or ENTERPRISE_ID_SYSTEM in target_system:
        parameter.append(
            {
                "name": "targetIdentifier",
                "valueIdentifier": {"system": ENTERPRISE_ID_SYSTEM, "value": result.enterprise_id},
            }
        )
    return JSONResponse({"resourceType": "Parameters", "parameter": parameter}, media_type=FHIR_JSON)


@router.get("/Patient/{patient_id}", response_class=JSONResponse)
async def read_patient(patient_id: str, ctx: Context, request: Request) -> JSONResponse:
    """FHIR read of one index record by the id PDQ gave it (IHE PDQm: Patient read), masked as
    the caller's role and purpose allow. Unknown, merged away or malformed ids are 404."""
    ctx.require_scope("Patient", "r")
    if not _RECORD_ID.fullmatch(patient_id):
        raise ApiError(404, "patient-not-found", "no Patient with that id")
    result = await rpc(
        request.app.state.stubs.mpi.GetPatient(mpi_pb2.GetPatientRequest(record_id=patient_id), metadata=ctx.metadata)
    )
    return JSONResponse(patient_resource(result.patient), media_type=FHIR_JSON)
