"""IHE PDQm (ITI-78) on the facade: Patient search by demographics (`GET Patient?...` and
`POST Patient/_search`), best first with `search.score`, paged by a sealed token; `_id` search; and
the Patient read by id."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from gateway.deps import Context
from gateway.errors import ApiError
from gateway.routes import rpc
from gateway.routes.fhir.negotiation import FHIR_JSON
from gateway.routes.fhir.patient.resource import (
    DEFAULT_COUNT,
    GENDERS,
    LOCAL_ID_SYSTEM_PREFIX,
    MAX_COUNT,
    MAX_IDS,
    NATIONAL_ID_SYSTEM,
    RECORD_ID,
    bad,
    patient_resource,
    scored_entry,
    split_token,
)
from hie.common.v1 import common_pb2
from hie.mpi.v1 import mpi_pb2
from services.shared import gb11643

router = APIRouter(prefix="/fhir/R4", tags=["fhir"])

_PDQ_PARAMS = {
    "_id",
    "family",
    "given",
    "name",
    "birthdate",
    "gender",
    "identifier",
    "telecom",
    "_count",
    "_summary",
    "_total",
    "_totalMethod",
    "page",
}
# FHIR string search on the name parameters: no modifier is a prefix (case- and accent-insensitive),
# `:exact` the whole value, `:contains` a substring. Other modifiers are refused as unknown.
_NAME_MATCH = {
    "": mpi_pb2.NAME_MATCH_PREFIX,
    ":exact": mpi_pb2.NAME_MATCH_EXACT,
    ":contains": mpi_pb2.NAME_MATCH_CONTAINS,
}
_NAME_PARAMS = ("family", "given", "name")
_PDQ_PARAMS |= {f"{p}{m}" for p in _NAME_PARAMS for m in _NAME_MATCH if m}
# Asked by clients and answered anyway (Bundle.total is given whenever the search can be counted):
# FHIR `_total` and fhirpy's `_totalMethod`, which its count() sends.
_TOTAL_HINTS = {"_total", "_totalMethod"}


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
        raise bad("search-too-long", "the search body is too long")
    try:
        items = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError):
        raise bad("search-value-invalid", "the body must be form-encoded search parameters") from None
    return await _pdq(ctx, request, items)


_LIMITS = {
    "_id": 800,
    "_summary": 8,
    "_total": 10,
    "_totalMethod": 10,
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
        raise bad("search-parameter-unknown", "unknown search parameter")
    values: dict[str, str] = {}
    modes: dict[str, int] = {}
    for key, value in items:
        key, _, modifier = key.partition(":")
        if key in values:
            raise bad("search-parameter-repeated", "a search parameter is given twice")
        if len(value) > _LIMITS.get(key, 6):
            raise bad("search-value-invalid", f"{key}: value too long")
        values[key] = value
        if key in _NAME_PARAMS:
            modes[key] = _NAME_MATCH[f":{modifier}" if modifier else ""]
    count_text = values.get("_count", str(DEFAULT_COUNT))
    if not count_text.isascii() or not count_text.isdigit() or not 0 <= int(count_text) <= MAX_COUNT:
        raise bad("search-value-invalid", f"_count: 0 to {MAX_COUNT}")
    count = int(count_text)
    summary = values.get("_summary", "")
    if summary not in ("", "count", "false"):
        raise bad("search-value-invalid", "_summary: count (or false)")
    # FHIR search: "_summary=count" and "_count=0" both ask for the total only.
    total_only = summary == "count" or count == 0
    for hint in _TOTAL_HINTS:
        values.pop(hint, None)
    if "_id" in values:
        return await _pdq_by_id(ctx, request, items, values, total_only=total_only)
    birthdate, gender = values.get("birthdate", ""), values.get("gender", "")
    if birthdate.startswith(("eq", "ge", "gt", "le", "lt", "ne", "sa", "eb", "ap")):
        birthdate = birthdate[2:] if birthdate.startswith("eq") else "!"
    if birthdate and (len(birthdate) != 10 or birthdate == "!"):
        raise bad("search-value-invalid", "birthdate: YYYY-MM-DD (eq only)")
    if gender and gender not in GENDERS:
        raise bad("search-value-invalid", "gender: male | female | other | unknown")
    search = mpi_pb2.SearchPatientsRequest(
        family=values.get("family", ""),
        given=values.get("given", ""),
        name=values.get("name", ""),
        birth_date=birthdate,
        gender=GENDERS.get(gender, mpi_pb2.GENDER_UNSPECIFIED),
        phone=values.get("telecom", "").removeprefix("phone|"),
        limit=count or 1,
        page_token=values.get("page", ""),
        family_match=modes.get("family", mpi_pb2.NAME_MATCH_PREFIX),  # type: ignore[arg-type]
        given_match=modes.get("given", mpi_pb2.NAME_MATCH_PREFIX),  # type: ignore[arg-type]
        name_match=modes.get("name", mpi_pb2.NAME_MATCH_PREFIX),  # type: ignore[arg-type]
    )
    if values.get("identifier"):
        system, value = split_token(values["identifier"])
        if system.startswith(LOCAL_ID_SYSTEM_PREFIX):
            raise bad("search-value-invalid", "identifier: use Patient/$ihe-pix for a hospital's local id")
        search.identifier.CopyFrom(
            common_pb2.Identifier(system=system or NATIONAL_ID_SYSTEM, value=value, type="" if system else "NNCHN")
        )
    result = await rpc(request.app.state.stubs.mpi.SearchPatients(search, metadata=ctx.metadata))
    base = request.app.state.settings.public_url
    links = [
        {"relation": "self", "url": f"{base}/fhir/R4/Patient" + (f"?{urlencode(_masked(items))}" if items else "")}
    ]
    if total_only:
        counted: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
        if result.HasField("total"):
            counted["total"] = result.total
        counted["link"] = links
        return JSONResponse(counted, media_type=FHIR_JSON)
    if result.next_page_token:
        # The token carries the search itself: the link repeats no name, id or phone, and works the
        # same after a POST _search.
        following = urlencode([("_count", str(count)), ("page", result.next_page_token)])
        links.append({"relation": "next", "url": f"{base}/fhir/R4/Patient?{following}"})
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if result.HasField("total"):
        bundle["total"] = result.total
    bundle["link"] = links
    if result.results:  # JSON-FHIR has no empty arrays: an empty searchset has no entry
        bundle["entry"] = [scored_entry(base, r, grade=False) for r in result.results]
    return JSONResponse(bundle, media_type=FHIR_JSON)


async def _pdq_by_id(
    ctx: Context, request: Request, items: list[tuple[str, str]], values: dict[str, str], *, total_only: bool
) -> JSONResponse:
    """PDQm `_id` (ITI-78: a Supplier SHALL support it): the Patients with those ids, each read
    as a FHIR read is (masked by role and purpose); an unknown or merged-away id matches nothing."""
    if set(values) - {"_id", "_count", "_summary"}:
        raise bad("search-parameter-combination", "_id is not combined with other search parameters")
    ids = [i.strip() for i in values["_id"].split(",")]
    if not all(ids) or len(ids) > MAX_IDS:
        raise bad("search-value-invalid", f"_id: one to {MAX_IDS} comma-separated ids")
    found: list[mpi_pb2.Patient] = []
    for patient_id in dict.fromkeys(ids):
        if not RECORD_ID.fullmatch(patient_id):
            continue
        try:
            result = await rpc(
                request.app.state.stubs.mpi.GetPatient(
                    mpi_pb2.GetPatientRequest(record_id=patient_id), metadata=ctx.metadata
                )
            )
        except ApiError as exc:
            if exc.status != 404:
                raise
            continue
        found.append(result.patient)
    base = request.app.state.settings.public_url
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(found),
        "link": [{"relation": "self", "url": f"{base}/fhir/R4/Patient?{urlencode(items)}"}],
    }
    if found and not total_only:
        bundle["entry"] = [
            {
                "fullUrl": f"{base}/fhir/R4/Patient/{p.record_id}",
                "resource": patient_resource(p),
                "search": {"mode": "match"},
            }
            for p in found
        ]
    return JSONResponse(bundle, media_type=FHIR_JSON)


@router.get("/Patient/{patient_id}", response_class=JSONResponse)
async def read_patient(patient_id: str, ctx: Context, request: Request) -> JSONResponse:
    """FHIR read of one index record by the id PDQ gave it (IHE PDQm: Patient read), masked as
    the caller's role and purpose allow. Unknown, merged away or malformed ids are 404."""
    ctx.require_scope("Patient", "r")
    if not RECORD_ID.fullmatch(patient_id):
        raise ApiError(404, "patient-not-found", "no Patient with that id")
    result = await rpc(
        request.app.state.stubs.mpi.GetPatient(mpi_pb2.GetPatientRequest(record_id=patient_id), metadata=ctx.metadata)
    )
    return JSONResponse(patient_resource(result.patient), media_type=FHIR_JSON)
