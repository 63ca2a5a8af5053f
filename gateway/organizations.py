"""Registering member organisations and their keys (used by `hie org` and `hie demo`)."""

from __future__ import annotations

from typing import Any

from gateway import store
from gateway.app import MIGRATIONS
from services.shared import migrations
from services.shared.config import Settings
from services.shared.db import engine_for, session_factory
from services.shared.errors import InvalidArgument


def check_jwks(jwks: dict[str, Any]) -> dict[str, Any]:
    """Only public asymmetric keys with a kid are registered."""
    keys = jwks.get("keys")
    if not isinstance(keys, list) or not keys:
        raise InvalidArgument("a JWKS needs a non-empty keys array")
    for key in keys:
        if key.get("kty") not in {"EC", "RSA"} or not key.get("kid"):
            raise InvalidArgument("each key must be EC or RSA and carry a kid")
        if "d" in key:
            raise InvalidArgument("a private key was given: register public keys only")
    return jwks


async def register_organization(
    settings: Settings, *, org_id: str, name: str, type: str, jwks: dict[str, Any]
) -> store.Organization:
    if type not in store.ORGANIZATION_TYPES:
        raise InvalidArgument(f"organisation type must be one of {', '.join(store.ORGANIZATION_TYPES)}")
    engine = engine_for(settings, "gateway")
    try:
        await migrations.upgrade(
            engine, schema=settings.schema_for("gateway"), versions=MIGRATIONS, metadata=store.metadata
        )
        async with session_factory(engine)() as session, session.begin():
            return await store.add_organization(session, org_id=org_id, name=name, type=type, jwks=check_jwks(jwks))
    finally:
        await engine.dispose()


async def list_organizations(settings: Settings) -> list[store.Organization]:
    engine = engine_for(settings, "gateway")
    try:
        await migrations.upgrade(
            engine, schema=settings.schema_for("gateway"), versions=MIGRATIONS, metadata=store.metadata
        )
        async with session_factory(engine)() as session:
            return await store.list_organizations(session)
    finally:
        await engine.dispose()
