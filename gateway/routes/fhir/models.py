"""Incoming FHIR resources validated with the fhir.resources R4B models, as a FHIR server does:
a resource that does not parse is refused with 400 and an OperationOutcome whose issues name the
elements (FHIRPath in `expression`), never their values. The routes' own mapping to the services'
messages runs after this, on a resource known to be well-formed.

The models check structure and datatypes (unknown elements, cardinality, primitive formats); they
do not check value sets or invariants, which the routes keep checking themselves (e.g. Consent
ppc-1). Cost: see gateway/README.md (FHIR facade rules).
"""

from __future__ import annotations

from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from gateway.errors import ApiError

# Issues reported per refusal: enough to fix a resource, bounded for a hostile one.
_MAX_ISSUES = 20


def _expression(root: str, location: tuple[Any, ...]) -> str:
    """FHIRPath of an element: `Patient.name[0].given`, or below a root (`Bundle.entry[0].resource`)."""
    path = root
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _issues(root: str, error: ValidationError) -> list[tuple[str, str]]:
    issues = []
    for detail in error.errors()[:_MAX_ISSUES]:
        # The message, not the input: pydantic's messages describe the expected form only.
        message = str(detail.get("msg", "invalid")).removeprefix("Value error, ")[:160]
        issues.append((_expression(root, tuple(detail.get("loc", ()))), message))
    return issues


def validate_resource(resource: object, expected: str | set[str], *, root: str = "") -> dict[str, Any]:
    """The resource, after checking it is one of the expected types and parses as its R4B model
    (resources it contains too: a Bundle's entries, a Parameters' resources); 400
    `resource-invalid` with an issue per element otherwise, FHIRPath from `root` (default: the
    resource type)."""
    kinds = {expected} if isinstance(expected, str) else expected
    if not isinstance(resource, dict) or resource.get("resourceType") not in kinds:
        names = " or ".join(sorted(kinds))
        raise ApiError(400, "resource-invalid", f"{root or 'the body'}: a {names} resource is required")
    kind = str(resource["resourceType"])
    try:
        get_fhir_model_class(kind).model_validate(resource)
    except ValidationError as exc:
        issues = _issues(root or kind, exc)
        raise ApiError(
            400,
            "resource-invalid",
            f"{kind} is not a valid FHIR R4 resource ({len(exc.errors())} element errors)",
            issues=issues,
        ) from None
    except (TypeError, ValueError, RecursionError):
        raise ApiError(400, "resource-invalid", f"{kind} is not a valid FHIR R4 resource") from None
    return resource
