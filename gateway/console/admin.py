"""The console's user administration on the gateway's database: what `hie user …`
(services/ops/cli_users.py) and the demo call. The users live in the gateway's tables, so the
functions that change them live in the gateway."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncSession

from services.shared.config import Settings


@asynccontextmanager
async def gateway_transaction(settings: Settings) -> AsyncIterator[AsyncSession]:
    """A transaction on the gateway's database, migrated first (the users live there)."""
    from gateway import store
    from gateway.app import MIGRATIONS
    from services.shared import migrations
    from services.shared.db import engine_for, session_factory

    engine = engine_for(settings, "gateway")
    try:
        await migrations.upgrade(
            engine, schema=settings.schema_for("gateway"), versions=MIGRATIONS, metadata=store.metadata
        )
        async with session_factory(engine)() as session, session.begin():
            yield session
    finally:
        await engine.dispose()


async def add_console_user(
    settings: Settings,
    *,
    org_id: str,
    username: str,
    display_name: str,
    role: str,
    department: str = "",
    password: str | None = None,
) -> str:
    """Create a person; returns the password (generated when none was given)."""
    from gateway.console import users

    password = password or users.generate_password()
    async with gateway_transaction(settings) as session:
        await users.add_user(
            session,
            org_id=org_id,
            username=username,
            display_name=display_name,
            role=role,
            department=department,
            password=password,
        )
    return password
