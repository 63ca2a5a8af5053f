"""The OpenAPI document is the contract: schemathesis's default checks over every /api/v1 and
/fhir/R4 operation of a real exchange find no request the schema allows that the gateway
refuses, no undeclared status or body, and no server error.

Run alone, with the failures printed: `bash deploy/local/test.sh -m contract -s`. More examples
per operation (the default is small, to keep the suite fast): `HIE_CONTRACT_MAX_EXAMPLES=100`.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import events
from schemathesis.engine.statistic import Statistic
from schemathesis.openapi.checks import IgnoredAuth, RejectedPositiveData

from gateway.client import USER_ASSERTION_HEADER, Practitioner, client_assertion, user_assertion
from gateway.smart import ALLOWED_SCOPES, CLIENT_ASSERTION_TYPE
from services.shared.keys import PrivateKey
from tests.conftest import Exchange

pytestmark = pytest.mark.contract

MAX_EXAMPLES = int(os.environ.get("HIE_CONTRACT_MAX_EXAMPLES", "3"))


@dataclass
class Hospital:
    """The member whose system sends the generated requests: a doctor, for treatment."""

    base_url: str
    client_id: str
    key: PrivateKey
    practitioner: Practitioner

    def token(self) -> str:
        endpoint = f"{self.base_url}/oauth2/token"
        answer = httpx.post(
            endpoint,
            data={
                "grant_type": "client_credentials",
                "scope": " ".join(ALLOWED_SCOPES["hospital"]),
                "client_assertion_type": CLIENT_ASSERTION_TYPE,
                "client_assertion": client_assertion(key=self.key, client_id=self.client_id, token_endpoint=endpoint),
            },
            timeout=30,
        )
        answer.raise_for_status()
        return str(answer.json()["access_token"])

    def assertion(self) -> str:
        return user_assertion(
            key=self.key, client_id=self.client_id, practitioner=self.practitioner, purpose="treatment"
        )


def _schema(hospital: Hospital) -> Any:
    config = SchemathesisConfig.from_dict(
        {
            "base-url": hospital.base_url,
            "seed": 20261205,
            "generation": {"max-examples": MAX_EXAMPLES},
            # The stateful phase follows OpenAPI links the document does not declare.
            "phases": {"stateful": {"enabled": False}},
            # 422 is the gateway's answer for a request its resource's current state refuses (a
            # patient not registered, a task already decided): state no schema can state.
            "checks": {"positive_data_acceptance": {"expected-statuses": [*_ACCEPTANCE, "422"]}},
            "request-timeout": 30,
        }
    )
    schema = schemathesis.openapi.from_url(f"{hospital.base_url}/openapi.json", config=config)
    schema = schema.include(path_regex=r"^/(api/v1|fhir/R4)/")
    rules = {
        (method.upper(), path): set(operation.get("x-hie-request-rules", {}))
        for path, operations in schema.raw_schema["paths"].items()
        for method, operation in operations.items()
    }

    @schema.hook
    def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
        """A schema-valid request refused for a reason the operation declares among its rules
        JSON Schema cannot state (`x-hie-request-rules`) keeps the contract; any other refusal
        fails the run. A rate-limited answer (429) is no verdict."""
        if (response is not None and response.status_code == 429) or (
            isinstance(failure, IgnoredAuth) and "`429 " in failure.message
        ):
            # The gateway's rate limit (declared on every operation) answered before any check of
            # the request (or of its missing credentials): no verdict on the contract either way.
            return False
        if not isinstance(failure, RejectedPositiveData) or response.status_code != 400:
            return True
        return _reason(response) not in rules.get((case.method.upper(), case.operation.path), set())

    @schema.auth.auth(refresh_interval=120)
    class SmartBackendServices:
        """An access token from the token endpoint, and a user assertion signed for each request
        (the exchange takes an assertion once)."""

        def get(self, case: Any, context: Any) -> str:
            return hospital.token()

        def set(self, case: Any, data: str, context: Any) -> None:
            case.headers = case.headers or {}
            case.headers["Authorization"] = f"Bearer {data}"
            case.headers[USER_ASSERTION_HEADER] = hospital.assertion()

    return schema


_ACCEPTANCE = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]


def _reason(response: Any) -> str:
    """The machine-readable reason of an error body (REST `error.reason`, or the OperationOutcome's
    `urn:hie:error-reason` code)."""
    try:
        body = json.loads(response.content)
    except ValueError:
        return ""
    if not isinstance(body, dict):
        return ""
    if isinstance(body.get("error"), dict):
        return str(body["error"].get("reason", ""))
    for issue in body.get("issue", []):
        for coding in issue.get("details", {}).get("coding", []):
            if coding.get("system") == "urn:hie:error-reason":
                return str(coding.get("code", ""))
    return ""


@dataclass
class Findings:
    unique: dict[str, list[str]]
    failing_cases: int
    operations: int
    cases: int
    errors: list[str]

    def total(self) -> int:
        return sum(len(found) for found in self.unique.values())


def run_contract(hospital: Hospital) -> Findings:
    """The schemathesis engine's run over the schema, as `schemathesis run` does it; failures
    counted once each, as its report counts them."""
    statistic = Statistic()
    errors: list[str] = []
    answers: dict[str, str] = {}
    for event in schemathesis.engine.from_schema(_schema(hospital)).execute():
        if isinstance(event, events.ScenarioFinished):
            statistic.on_scenario_finished(event.recorder)
            for case_id, interaction in event.recorder.interactions.items():
                if interaction.response is not None:
                    request = interaction.request
                    answers[case_id] = (
                        f"{interaction.response.status_code} {(interaction.response.content or b'')[:240]!r}"
                        f" <- {request.method} {request.uri} {(request.body or b'')[:300]!r}"
                    )
        elif isinstance(event, events.NonFatalError):
            errors.append(f"{event.label}: {type(event.value).__name__}: {event.value}")
        elif isinstance(event, events.FatalError):
            errors.append(f"fatal: {type(event.exception).__name__}: {event.exception}")
    unique: dict[str, list[str]] = {}
    for failure, case_id in statistic.unique_failures_map.items():
        unique.setdefault(type(failure).__name__, []).append(
            f"{failure.operation}: {failure.title}: {answers.get(case_id, '')}"
        )
    return Findings(
        unique, statistic.cases_with_failures, len(statistic.tested_operations), statistic.total_cases, errors
    )


# The contract is the gateway's, not the database's: run once, on the embedded default.
@pytest.mark.parametrize("exchange", ["sqlite"], indirect=True)
async def test_every_operation_keeps_the_openapi_contract(exchange: Exchange) -> None:
    member = await exchange.member()
    hospital = Hospital(
        base_url=exchange.base_url,
        client_id=member.client_id,
        key=member.key,
        practitioner=Practitioner(id="D-CT-1", name="合约医生", role="doctor", department="内科"),
    )
    # The engine's HTTP is blocking: it runs in a thread while this loop serves the exchange.
    started = time.monotonic()
    findings = await asyncio.to_thread(run_contract, hospital)
    by_kind = Counter({kind: len(found) for kind, found in findings.unique.items()})
    print(
        f"\ncontract ({time.monotonic() - started:.0f} s): {findings.operations} operations, {findings.cases} cases, "
        f"{findings.failing_cases} failing cases, {findings.total()} unique failures {dict(by_kind)}"
    )
    for kind, found in sorted(findings.unique.items()):
        for line in sorted(found):
            print(f"  {kind}: {line}")
    assert findings.operations > 40
    assert not findings.errors, findings.errors
    assert findings.total() == 0, dict(by_kind)


async def test_a_405_names_every_method_of_the_path_and_public_routes_declare_no_security(
    exchange: Exchange,
) -> None:
    """Found by the contract run: GET and POST of one path are separate routes, and the 405 named
    only the first one's method; the public notification JWKS was declared as needing a token."""
    async with httpx.AsyncClient() as http:
        refused = await http.request("PATCH", f"{exchange.base_url}/api/v1/consent/directives")
        schema = (await http.get(f"{exchange.base_url}/openapi.json")).json()
    assert refused.status_code == 405
    assert refused.headers["allow"] == "GET, POST"
    assert "security" not in schema["paths"]["/api/v1/notifications/jwks.json"]["get"]
    assert schema["paths"]["/api/v1/patients"]["post"]["security"]
    rules = schema["paths"]["/api/v1/patients/search"]["get"]["x-hie-request-rules"]
    assert "search-too-broad" in rules


async def test_the_workflow_routes_refuse_what_their_schema_refuses_and_name_their_methods(
    exchange: Exchange,
) -> None:
    """Found by the contract run once the referral and consultation routes joined it: a number of
    seconds passed for a date-time and `false` for a bed count were taken; a 405 under
    /consultations/{id}/ named the catch-all move route's POST; the Task read and update were
    two paths; the FHIR create declared no body; a misspelt field was silently dropped."""
    member = await exchange.member()
    stats = await member.call("GET", "/api/v1/referral-statistics", params={"until": "0.5"})
    beds = await member.call("PUT", "/api/v1/referral-beds/cardiology", json={"total": False})
    typo = await member.call("POST", "/api/v1/referral-slots", json={"slots": [], "slot": [{"department": "内科"}]})
    async with httpx.AsyncClient() as http:
        imaging = await http.request("OPTIONS", f"{exchange.base_url}/api/v1/consultations/c-1/imaging")
        task = await http.request("OPTIONS", f"{exchange.base_url}/fhir/R4/Task/t-1")
        schema = (await http.get(f"{exchange.base_url}/openapi.json")).json()
    for refused, field in ((stats, "until"), (beds, "total"), (typo, "slot")):
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["reason"] == "invalid-request"
        assert field in refused.json()["error"]["message"]
    assert (imaging.status_code, imaging.headers["allow"]) == (405, "GET")
    assert (task.status_code, task.headers["allow"]) == (405, "GET, PUT")
    assert set(schema["paths"]["/fhir/R4/Task/{task_id}"]) == {"get", "put"}
    create = schema["paths"]["/fhir/R4/ServiceRequest"]["post"]
    assert create["requestBody"]["content"]["application/fhir+json"]["schema"]["required"] == ["resourceType"]
    assert "self-referral" in schema["paths"]["/api/v1/referrals"]["post"]["x-hie-request-rules"]


async def test_a_document_size_beyond_int64_is_refused_not_a_server_error(exchange: Exchange) -> None:
    """Found by the contract run: a declared size over 2^63 - 1 overflowed the registry message
    (500 ValueError) instead of being refused."""
    member = await exchange.member()
    refused = await member.call(
        "POST",
        "/api/v1/documents",
        json={
            "patient_local_id": "P-1",
            "type": {"system": "http://loinc.org", "code": "18842-5"},
            "title": "出院小结",
            "source_document_id": "D-1",
            "size": 10**21,
        },
    )
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["reason"] == "invalid-request"
    assert "size" in refused.json()["error"]["message"]
