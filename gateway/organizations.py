"""Registering member organisations and their keys (used by `hie org` and `hie demo`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from gateway import store
from gateway.app import MIGRATIONS
from services.shared import migrations
from services.shared.config import Settings
from services.shared.db import engine_for, session_factory
from services.shared.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.shared.keys import thumbprint


def check_jwks(jwks: dict[str, Any]) -> dict[str, Any]:
    """Only public asymmetric keys with a kid are registered."""
    keys = jwks.get("keys") if isinstance(jwks, dict) else None
    if not isinstance(keys, list) or not keys:
        raise InvalidArgument("a JWKS needs a non-empty keys array")
    for key in keys:
        if not isinstance(key, dict) or key.get("kty") not in {"EC", "RSA"} or not key.get("kid"):
            raise InvalidArgument("each key must be EC or RSA and carry a kid")
        required = ("crv", "x", "y") if key["kty"] == "EC" else ("n", "e")
        if not all(isinstance(key.get(member), str) for member in required):
            raise InvalidArgument("a key misses its public members (EC: crv, x, y; RSA: n, e)")
        if "d" in key:
            raise InvalidArgument("a private key was given: register public keys only")
    return jwks


async def _refuse_keys_of_others(session: AsyncSession, org_id: str, jwks: dict[str, Any]) -> None:
    """A key identifies one client: a public key already registered to another organisation is
    refused (compared by RFC 7638 thumbprint, whatever kid it was given)."""
    wanted = {thumbprint(key) for key in jwks["keys"]}
    for other in await store.list_organizations(session):
        if other.id != org_id and wanted & {thumbprint(key) for key in other.keys}:
            raise AlreadyExists(
                f"that public key is registered to organisation {other.id}: a key identifies one client,"
                " make a new key pair for this organisation (`hie org keygen`)"
            )


async def register_organization(
    settings: Settings, *, org_id: str, name: str, type: str, jwks: dict[str, Any], tier: str = ""
) -> store.Organization:
    if type not in store.ORGANIZATION_TYPES:
        raise InvalidArgument(f"organisation type must be one of {', '.join(store.ORGANIZATION_TYPES)}")
    _check_tier(type, tier)
    async with _gateway_session(settings) as session, session.begin():
        if await store.organization(session, org_id) is not None:
            raise AlreadyExists("an organisation with that id is registered")
        await _refuse_keys_of_others(session, org_id, check_jwks(jwks))
        return await store.add_organization(session, org_id=org_id, name=name, type=type, jwks=jwks, tier=tier)


async def find_organization(settings: Settings, org_id: str) -> store.Organization | None:
    """The organisation with that id, or None."""
    async with _gateway_session(settings) as session:
        return await store.organization(session, org_id)


def _check_tier(type: str, tier: str) -> None:
    if tier and (type != "hospital" or tier not in store.ORGANIZATION_TIERS):
        raise InvalidArgument(f"a hospital's tier is one of {', '.join(store.ORGANIZATION_TIERS)}")


async def set_tier(settings: Settings, *, org_id: str, tier: str) -> None:
    """Set (or with "" clear) a hospital's tier: referrals created afterwards take their direction from it."""
    async with _gateway_session(settings) as session, session.begin():
        org = await _existing(session, org_id)
        _check_tier(org.type, tier)
        org.tier = tier


async def list_organizations(settings: Settings) -> list[store.Organization]:
    async with _gateway_session(settings) as session:
        return await store.list_organizations(session)


async def add_keys(settings: Settings, *, org_id: str, jwks: dict[str, Any]) -> list[str]:
    async with _gateway_session(settings) as session, session.begin():
        org = await _existing(session, org_id)
        await _refuse_keys_of_others(session, org_id, check_jwks(jwks))
        return await store.add_keys(session, org, jwks)


async def remove_key(settings: Settings, *, org_id: str, kid: str) -> list[str]:
    async with _gateway_session(settings) as session, session.begin():
        try:
            return await store.remove_key(session, await _existing(session, org_id), kid)
        except LookupError:
            raise NotFound("the organisation has no key with that kid") from None
        except ValueError as exc:
            raise FailedPrecondition(str(exc)) from None


async def set_status(settings: Settings, *, org_id: str, status: str) -> None:
    """Revoke (or reinstate) an organisation: no new tokens at once; see gateway/standing.py."""
    async with _gateway_session(settings) as session, session.begin():
        (await _existing(session, org_id)).status = status


async def _existing(session: AsyncSession, org_id: str) -> store.Organization:
    org = await store.organization(session, org_id)
    if org is None:
        raise NotFound("no such organisation")
    return org


@asynccontextmanager
async def _gateway_session(settings: Settings) -> AsyncIterator[AsyncSession]:
    engine = engine_for(settings, "gateway")
    try:
        await migrations.upgrade(
            engine, schema=settings.schema_for("gateway"), versions=MIGRATIONS, metadata=store.metadata
        )
        async with session_factory(engine)() as session:
            yield session
    finally:
        await engine.dispose()
