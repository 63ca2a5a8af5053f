"""What every FHIR response of the exchange must be, checked as a hospital's FHIR toolkit would:
the resource parses with the fhir.resources R4B models (searchset entries one by one, since a
Bundle's entry.resource is not typed), and the JSON-FHIR rules the models do not check hold
(no empty arrays, objects or strings; every reference resolves within the exchange)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from fhir.resources.R4B import get_fhir_model_class


def validate_r4b(resource: dict[str, Any]) -> None:
    """The resource (and each resource a Bundle carries) parses as its R4B model."""
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    if resource["resourceType"] == "Bundle":
        for entry in resource.get("entry", []):
            if "resource" in entry:
                validate_r4b(entry["resource"])
            outcome = entry.get("response", {}).get("outcome")
            if outcome:
                validate_r4b(outcome)


def empty_values(value: Any, path: str = "") -> list[str]:
    """Paths of empty arrays, objects and strings (FHIR JSON: "empty values are not allowed")."""
    found: list[str] = []
    if isinstance(value, dict):
        if not value:
            found.append(path or "$")
        for key, item in value.items():
            found += empty_values(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        if not value:
            found.append(path)
        for n, item in enumerate(value):
            found += empty_values(item, f"{path}[{n}]")
    elif isinstance(value, str) and not value.strip():
        found.append(path)
    return found


def references(value: Any) -> Iterator[str]:
    """Every Reference.reference in a resource (Bundle-internal urn: and contained # ones aside)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "reference" and isinstance(item, str):
                if not item.startswith(("urn:", "#")):
                    yield item
            else:
                yield from references(item)
    elif isinstance(value, list):
        for item in value:
            yield from references(item)


async def check_fhir(
    resource: dict[str, Any], *, base: str, read: Callable[[str], Awaitable[int]] | None = None
) -> None:
    """R4B models, no empty values, and (given `read`, which answers the HTTP status of a GET of
    a path below the FHIR base) every reference resolvable within the exchange."""
    validate_r4b(resource)
    assert empty_values(resource) == [], f"empty values in a {resource['resourceType']}"
    if read is None:
        return
    for reference in set(references(resource)):
        path = reference.removeprefix(f"{base}/fhir/R4/")
        assert "://" not in path, f"a reference outside the exchange: {reference}"
        assert await read(path) == 200, f"{reference} does not resolve"
