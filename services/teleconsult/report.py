"""The consultation report as FHIR R4 DiagnosticReport + Provenance, and its signature (pure).

Who signs: the consulting hospital, with one of its own registered keys. The signature is a
detached compact JWS (RFC 7515 appendix F; ES384 / RS384 as the hospitals' client keys, ES256 /
RS256 accepted) over the canonical form of the DiagnosticReport, with the public key in the JWS
header (`jwk`, RFC 7515 §4.1.3). The exchange checks that the key's RFC 7638 thumbprint is one of
the organisation's registered keys (the access token's `client_jkt`, signed by the gateway) and
that the signature verifies, and never holds a hospital's private key: the signature is the
consulting organisation's own, as 远程医疗服务管理规范 asks of the consultation opinion, and no one
at the exchange can make one in its name. Anyone verifies it with the organisation's published
keys (GET /api/v1/organizations/{id}/jwks.json).

FHIR R4 Signature (Provenance.signature): `type` 1.2.840.10065.1.12.1.1 (author's signature),
`when`, `who` (the signing practitioner), `onBehalfOf` (the organisation), `targetFormat`
application/fhir+json, `sigFormat` application/jose, `data` the base64 of the JWS.

Canonical form (after FHIR's JSON canonicalization, simplified): the resource without `meta` and
`text`, keys sorted, no insignificant whitespace, UTF-8 (no \\u escapes of non-ASCII).
"""

from __future__ import annotations

import base64
import datetime
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jwt
from fhir.resources.R4B.diagnosticreport import DiagnosticReport

from hie.teleconsult.v1 import teleconsult_pb2
from services.shared.errors import InvalidArgument, PermissionDenied
from services.shared.keys import PrivateKey, algorithm_for, public_jwk, thumbprint

ACCEPTED_ALGORITHMS = ("ES384", "ES256", "RS384", "RS256")
AUTHOR_SIGNATURE = {
    "system": "urn:iso-astm:E1762-95:2013",
    "code": "1.2.840.10065.1.12.1.1",
    "display": "Author's Signature",
}
VERIFICATION_SIGNATURE = {
    "system": "urn:iso-astm:E1762-95:2013",
    "code": "1.2.840.10065.1.12.1.5",
    "display": "Verification Signature",
}
FINDINGS_EXTENSION = "urn:hie:consultation:findings"
RECOMMENDATIONS_EXTENSION = "urn:hie:consultation:recommendations"
OPINION_EXTENSION = "urn:hie:consultation:opinion"
AGREED_EXTENSION = "urn:hie:consultation:agreed-conclusion"
HIE_ORGANIZATION = "urn:hie:organization"
# LOINC report codes by consultation kind; v2-0074 diagnostic service sections.
_CODES = {
    teleconsult_pb2.CONSULTATION_KIND_IMAGING: ("18748-4", "Diagnostic imaging study", "RAD"),
    teleconsult_pb2.CONSULTATION_KIND_ECG: ("11524-6", "EKG study", "EC"),
    teleconsult_pb2.CONSULTATION_KIND_PATHOLOGY: ("11526-1", "Pathology study", "PAT"),
    teleconsult_pb2.CONSULTATION_KIND_ULTRASOUND: ("18748-4", "Diagnostic imaging study", "RUS"),
    teleconsult_pb2.CONSULTATION_KIND_SPECIALIST: ("11488-4", "Consult note", "OTH"),
    teleconsult_pb2.CONSULTATION_KIND_MULTIDISCIPLINARY: ("11488-4", "Consult note", "OTH"),
}


def _invalid(message: str) -> InvalidArgument:
    return InvalidArgument(message, reason="consultation-report-invalid")


def content_dict(content: teleconsult_pb2.ReportContent) -> dict[str, Any]:
    return {
        "findings": content.findings[:20000],
        "impression": content.impression[:8000],
        "recommendations": content.recommendations[:8000],
        "opinions": [
            {
                "practitioner_id": o.practitioner_id[:64],
                "practitioner_name": o.practitioner_name[:64],
                "opinion": o.opinion[:8000],
            }
            for o in content.opinions[:20]
        ],
        "conclusion": content.conclusion[:8000],
    }


def has_content(content: Mapping[str, Any]) -> bool:
    return bool(content.get("findings") or content.get("impression") or content.get("conclusion"))


def render(
    *,
    consultation_id: str,
    version: int,
    status: str,
    kind: int,
    patient_domain: str,
    patient_local_id: str,
    consultant_organization_id: str,
    interpreters: Sequence[str],
    content: Mapping[str, Any],
    issued: datetime.datetime,
    imaging_study_uids: Sequence[str] = (),
) -> dict[str, Any]:
    """The DiagnosticReport of one report version (validated with fhir.resources R4B)."""
    code, display, section = _CODES.get(kind, ("11488-4", "Consult note", "OTH"))
    extensions: list[dict[str, Any]] = []
    if content.get("findings"):
        extensions.append({"url": FINDINGS_EXTENSION, "valueString": content["findings"]})
    if content.get("recommendations"):
        extensions.append({"url": RECOMMENDATIONS_EXTENSION, "valueString": content["recommendations"]})
    for o in content.get("opinions", ()):
        extensions.append(
            {
                "url": OPINION_EXTENSION,
                "extension": [
                    {"url": "practitioner", "valueString": o["practitioner_id"]},
                    {"url": "name", "valueString": o.get("practitioner_name", "")},
                    {"url": "opinion", "valueString": o["opinion"]},
                ],
            }
        )
    if content.get("conclusion"):
        extensions.append({"url": AGREED_EXTENSION, "valueString": content["conclusion"]})
    # DiagnosticReport.conclusion is the impression; an MDT's agreed conclusion is an extension.
    conclusion = content.get("impression", "")
    resource: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": f"{consultation_id}-v{version}",
        "identifier": [{"system": "urn:hie:consultation-report", "value": f"{consultation_id}/{version}"}],
        "basedOn": [{"reference": f"ServiceRequest/{consultation_id}"}],
        "status": status,
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": section}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": display}], "text": "远程会诊报告"},
        "subject": {"identifier": {"system": f"urn:hie:patient:{patient_domain}", "value": patient_local_id}},
        "issued": issued.astimezone(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "performer": [{"identifier": {"system": HIE_ORGANIZATION, "value": consultant_organization_id}}],
        "resultsInterpreter": [
            {"identifier": {"system": f"urn:hie:practitioner:{consultant_organization_id}", "value": p}}
            for p in interpreters
        ],
    }
    if extensions:
        resource["extension"] = extensions
    if conclusion:
        resource["conclusion"] = conclusion
    if imaging_study_uids:
        resource["imagingStudy"] = [
            {"identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}, "display": "ImagingStudy"}
            for uid in imaging_study_uids
        ]
    DiagnosticReport.model_validate(resource)
    return resource


def content_of(resource: Mapping[str, Any]) -> dict[str, Any]:
    """The structured content a rendered DiagnosticReport carries (inverse of `render`)."""
    content: dict[str, Any] = {
        "findings": "",
        "impression": str(resource.get("conclusion", ""))[:8000],
        "recommendations": "",
        "opinions": [],
        "conclusion": "",
    }
    for ext in resource.get("extension", []) or []:
        if not isinstance(ext, dict):
            continue
        url = ext.get("url")
        if url == FINDINGS_EXTENSION:
            content["findings"] = str(ext.get("valueString", ""))[:20000]
        elif url == RECOMMENDATIONS_EXTENSION:
            content["recommendations"] = str(ext.get("valueString", ""))[:8000]
        elif url == AGREED_EXTENSION:
            content["conclusion"] = str(ext.get("valueString", ""))[:8000]
        elif url == OPINION_EXTENSION:
            parts = {
                p.get("url"): str(p.get("valueString", "")) for p in ext.get("extension", []) if isinstance(p, dict)
            }
            content["opinions"].append(
                {
                    "practitioner_id": parts.get("practitioner", "")[:64],
                    "practitioner_name": parts.get("name", "")[:64],
                    "opinion": parts.get("opinion", "")[:8000],
                }
            )
    return content


def canonical(resource: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers (see the module docstring)."""
    body = {k: v for k, v in resource.items() if k not in {"meta", "text"}}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign(resource: Mapping[str, Any], key: PrivateKey, *, kid: str | None = None) -> str:
    """A detached JWS over the resource (what a consulting hospital's system does)."""
    jwk = public_jwk(key)
    public = {k: jwk[k] for k in ("kty", "crv", "x", "y", "n", "e") if k in jwk}
    return jwt.api_jws.PyJWS().encode(
        canonical(resource),
        key,
        algorithm=algorithm_for(key),
        headers={"kid": kid or jwk["kid"], "jwk": public, "typ": "JOSE", "cty": "application/fhir+json"},
        is_payload_detached=True,
    )


def verify(resource: Mapping[str, Any], jws: str, *, registered: frozenset[str] | None = None) -> dict[str, Any]:
    """Check a detached JWS over the resource; returns the public JWK that made it. With
    `registered`, the key must be one of them (by thumbprint): PermissionDenied otherwise."""
    try:
        header = jwt.get_unverified_header(jws)
    except jwt.PyJWTError:
        raise InvalidArgument("the signature is not a compact JWS", reason="consultation-signature-invalid") from None
    jwk = header.get("jwk")
    if header.get("alg") not in ACCEPTED_ALGORITHMS or not isinstance(jwk, dict) or "d" in jwk:
        raise InvalidArgument(
            "the signature needs an ES/RS algorithm and its public key (jwk header)",
            reason="consultation-signature-invalid",
        )
    try:
        # The algorithm named with the key: PyJWK alone guesses RS256 for any RSA key.
        key = jwt.PyJWK({**jwk, "alg": header["alg"]})
        print_ = thumbprint(jwk)
    except (KeyError, ValueError, TypeError, jwt.PyJWTError):
        raise InvalidArgument("the signature's key is not usable", reason="consultation-signature-invalid") from None
    if registered is not None and print_ not in registered:
        raise PermissionDenied(
            "the signature is not made with a key registered to the consulting organisation",
            reason="consultation-signature-key",
        )
    try:
        jwt.api_jws.PyJWS().decode_complete(
            jws, key=key, algorithms=[header["alg"]], detached_payload=canonical(resource)
        )
    except (jwt.PyJWTError, ValueError, TypeError):
        raise InvalidArgument(
            "the signature does not verify over the report", reason="consultation-signature-invalid"
        ) from None
    return {k: jwk[k] for k in ("kty", "crv", "x", "y", "n", "e") if k in jwk} | {"kid": print_}


def provenance(
    *,
    resource: Mapping[str, Any],
    jws: str,
    organization_id: str,
    practitioner_id: str,
    signed: datetime.datetime,
    sm2_signature: str = "",
) -> dict[str, Any]:
    """The Provenance of a signed report version (the signature travels in it; under the
    national-algorithms option the exchange's SM2 co-signature beside it)."""
    when = signed.astimezone(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    who = {"identifier": {"system": f"urn:hie:practitioner:{organization_id}", "value": practitioner_id}}
    org = {"identifier": {"system": HIE_ORGANIZATION, "value": organization_id}}
    result: dict[str, Any] = {
        "resourceType": "Provenance",
        "id": f"{resource['id']}-provenance",
        "target": [{"reference": f"DiagnosticReport/{resource['id']}"}],
        "recorded": when,
        "activity": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation", "code": "CREATE"}]
        },
        "agent": [
            {
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                            "code": "author",
                        }
                    ]
                },
                "who": who,
                "onBehalfOf": org,
            }
        ],
        "signature": [
            {
                "type": [AUTHOR_SIGNATURE],
                "when": when,
                "who": who,
                "onBehalfOf": org,
                "targetFormat": "application/fhir+json",
                "sigFormat": "application/jose",
                "data": base64.b64encode(jws.encode()).decode(),
            }
        ],
    }
    if sm2_signature:
        # GB/T 32918.2 SM2 with SM3 (GB/T 35276 default signer id) over the same canonical bytes,
        # by the exchange's platform key (GET /api/v1/notifications/sm2-key publishes it).
        result["signature"].append(
            {
                "type": [VERIFICATION_SIGNATURE],
                "when": when,
                "who": {"identifier": {"system": HIE_ORGANIZATION, "value": "platform"}},
                "targetFormat": "application/fhir+json",
                "sigFormat": "application/x-sm2-sm3-signature",
                "data": base64.b64encode(bytes.fromhex(sm2_signature)).decode(),
            }
        )
    return result


def record_bundle(resource: Mapping[str, Any], prov: Mapping[str, Any]) -> bytes:
    """The consultation record filed in the registry: a FHIR collection Bundle of the signed
    DiagnosticReport and its Provenance (the registry checks its SHA-256 and size)."""
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": f"urn:hie:DiagnosticReport/{resource['id']}", "resource": dict(resource)},
            {"fullUrl": f"urn:hie:Provenance/{prov['id']}", "resource": dict(prov)},
        ],
    }
    return json.dumps(bundle, ensure_ascii=False, separators=(",", ":")).encode()


def check_submitted(resource: Mapping[str, Any], *, expected: Mapping[str, Any]) -> None:
    """A DiagnosticReport submitted for signing must be the one the exchange renders for this
    version (the client signs exactly what is filed): InvalidArgument otherwise."""
    if canonical(resource) != canonical(expected):
        raise _invalid("the submitted DiagnosticReport differs from this report version's rendering")
