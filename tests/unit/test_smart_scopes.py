"""Unit tests for SMART scope granting and the SMART configuration document (gateway.smart)."""

from __future__ import annotations

import pytest

from gateway.smart import ALLOWED_SCOPES, ASSERTION_ALGORITHMS, AuthorizationServer, grant_scopes
from services.shared.keys import generate_ec_key, write_private_key


@pytest.mark.parametrize(
    ("requested", "granted"),
    [
        ("system/Patient.rs", ["system/Patient.rs"]),
        ("system/Patient.r", ["system/Patient.r"]),
        ("system/Patient.crus", ["system/Patient.crus"]),
        ("system/Patient.cruds", []),  # hospitals may not delete patients: not narrowed, dropped
        ("system/Patient.d", []),
        ("system/Consent.cruds", ["system/Consent.cruds"]),
        ("system/Consent.d", ["system/Consent.d"]),
        ("system/Binary.r", ["system/Binary.r"]),
        ("system/Binary.rs", []),
        ("system/AuditEvent.rs", ["system/AuditEvent.rs"]),
        ("system/AuditEvent.c", []),
        ("system/DocumentReference.cr system/Task.u", ["system/DocumentReference.cr", "system/Task.u"]),
    ],
)
def test_hospital_is_granted_subsets_of_its_allowed_scopes(requested: str, granted: list[str]) -> None:
    assert grant_scopes(requested, "hospital") == granted


@pytest.mark.parametrize(
    "scope",
    [
        "user/Patient.r",
        "patient/Patient.r",
        "Patient.r",
        "system/Observation.r",
        "system/patient.r",
        "system/*.r",
        "system/.r",
        "system/Patient.rx",
        "system/Patient.read",
        "system/Patient.*",
        "system/Patient.",
        "system/Patient",
        "system",
        "openid",
        "",
    ],
)
def test_invalid_or_unknown_scopes_are_dropped(scope: str) -> None:
    assert grant_scopes(scope, "hospital") == []
    # Dropping one does not affect the others in the same request.
    assert grant_scopes(f"{scope} system/Patient.r", "hospital") == ["system/Patient.r"]


def test_duplicates_are_removed_and_order_kept() -> None:
    requested = "system/Task.r system/Patient.r  system/Task.r\tsystem/Patient.r system/Task.c"
    assert grant_scopes(requested, "hospital") == ["system/Task.r", "system/Patient.r", "system/Task.c"]


@pytest.mark.parametrize("resource", ["AuditEvent", "Patient", "DocumentReference", "Binary", "Consent"])
@pytest.mark.parametrize("perm", ["c", "u", "d", "cr", "rsu", "ds", "cruds"])
def test_authority_never_gets_write_scopes(resource: str, perm: str) -> None:
    assert grant_scopes(f"system/{resource}.{perm}", "authority") == []


def test_authority_gets_read_and_search() -> None:
    requested = "system/AuditEvent.rs system/Patient.r system/DocumentReference.s system/Binary.r"
    assert grant_scopes(requested, "authority") == [
        "system/AuditEvent.rs",
        "system/Patient.r",
        "system/DocumentReference.s",
    ]


def test_platform_admin_scopes() -> None:
    requested = "system/Patient.rs system/AuditEvent.r system/DocumentReference.r system/Patient.c"
    assert grant_scopes(requested, "platform-admin") == ["system/Patient.rs", "system/AuditEvent.r"]


@pytest.mark.parametrize("org_type", ["", "pharmacy", "Hospital", "platform", "hospital "])
def test_unknown_org_type_gets_nothing(org_type: str) -> None:
    everything = " ".join(s for scopes in ALLOWED_SCOPES.values() for s in scopes)
    assert grant_scopes(everything, org_type) == []


@pytest.mark.parametrize("org_type", sorted(ALLOWED_SCOPES))
def test_each_allowed_scope_is_grantable_to_its_org_type(org_type: str) -> None:
    allowed = list(ALLOWED_SCOPES[org_type])
    assert grant_scopes(" ".join(allowed), org_type) == allowed


# --- SMART configuration ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> AuthorizationServer:
    key_file = tmp_path_factory.mktemp("keys") / "gateway.pem"
    write_private_key(key_file, generate_ec_key())
    return AuthorizationServer(
        sessions=None,  # type: ignore[arg-type]  # not used by smart_configuration
        signing_key_file=key_file,
        issuer="https://hie.example",
    )


def test_smart_configuration_endpoints(server: AuthorizationServer) -> None:
    config = server.smart_configuration()
    assert config["issuer"] == "https://hie.example"
    assert config["token_endpoint"] == "https://hie.example/oauth2/token"
    assert config["jwks_uri"] == "https://hie.example/.well-known/jwks.json"
    assert server.token_endpoint == config["token_endpoint"]


def test_smart_configuration_backend_services_capabilities(server: AuthorizationServer) -> None:
    config = server.smart_configuration()
    assert config["grant_types_supported"] == ["client_credentials"]
    assert config["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
    algorithms = config["token_endpoint_auth_signing_alg_values_supported"]
    assert {"ES384", "RS384"} <= set(algorithms)
    assert algorithms == ASSERTION_ALGORITHMS
    assert not {"none", "HS256", "HS384", "HS512"} & set(algorithms)
    assert "client-confidential-asymmetric" in config["capabilities"]


def test_smart_configuration_lists_every_allowed_scope_once(server: AuthorizationServer) -> None:
    scopes = server.smart_configuration()["scopes_supported"]
    assert scopes == sorted(set(scopes))
    assert set(scopes) == {s for allowed in ALLOWED_SCOPES.values() for s in allowed}
    assert "system/Consent.cruds" in scopes
