"""The component list (services/shared/components.py) is the one place a service is named:
every service package is in it, and what reads it (settings, the gateway's stubs) agrees with it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from gateway.app import ServiceStubs
from services.shared.components import DATABASE_COMPONENTS, SERVICE_BASE_PORT, SERVICES, by_port
from services.shared.config import SERVICE_PORTS, Settings

SERVICES_DIR = Path(__file__).resolve().parents[2] / "services"


def test_every_service_package_is_in_the_component_list() -> None:
    packages = {path.parent.name for path in SERVICES_DIR.glob("*/service.py")}
    assert packages == {c.name for c in SERVICES}


def test_each_entry_loads_its_own_spec_and_a_grpc_stub() -> None:
    for component in SERVICES:
        assert component.spec().name == component.name
        assert component.stub().__name__.endswith("Stub")


def test_ports_are_consecutive_from_the_base_and_unique() -> None:
    offsets = sorted(c.port_offset for c in SERVICES)
    assert offsets == list(range(len(SERVICES)))
    assert [c.name for c in by_port()] == list(SERVICE_PORTS)
    assert {c.name: SERVICE_BASE_PORT + c.port_offset for c in SERVICES} == SERVICE_PORTS


def test_audit_starts_first_as_every_service_relays_to_it() -> None:
    assert SERVICES[0].name == "audit"


def test_settings_and_the_gateway_stubs_follow_the_list() -> None:
    settings = Settings.from_env({})
    assert settings.targets == {c.name: f"127.0.0.1:{c.port}" for c in SERVICES}
    assert {f.name for f in dataclasses.fields(ServiceStubs)} == {c.name for c in SERVICES}
    assert set(DATABASE_COMPONENTS) == {*(c.name for c in SERVICES), "gateway"}


def test_the_deployments_carry_every_component_at_its_port() -> None:
    # compose and kustomize are static files: an entry added to the list without them fails here.
    root = Path(__file__).resolve().parents[2]
    compose = (root / "deploy/compose.yaml").read_text(encoding="utf-8")
    kustomization = (root / "k8s/base/kustomization.yaml").read_text(encoding="utf-8")
    configmap = (root / "k8s/base/configmap.yaml").read_text(encoding="utf-8")
    policies = (root / "k8s/components/network-policy-deny-all/allow-services.yaml").read_text(encoding="utf-8")
    for c in SERVICES:
        target = f"HIE_{c.name.upper()}_TARGET: {c.name}:{c.port}"
        assert f"\n  {c.name}:\n" in compose, c.name
        assert target in compose, target
        assert target in configmap, target
        assert f"  - {c.name}.yaml\n" in kustomization, c.name
        assert (root / "k8s/base" / f"{c.name}.yaml").exists(), c.name
        assert f"name: {c.name}-ingress" in policies, c.name
