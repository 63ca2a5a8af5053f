"""`hie keys rotate-data` / `retire-data`: rotate the data-protection keys of a running exchange.

Rotation is online: the new key is written to the key file, running services pick it up within a
second (and at once when they meet a value under it), then every protected value is re-encrypted
and every document key re-wrapped, batch by batch. Interrupted, it is simply run again. Old keys
are dropped only by `retire-data`, and only once nothing is left under them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from services.shared.components import by_port
from services.shared.config import Settings
from services.shared.db import engine_for
from services.shared.process import ServiceSpec
from services.shared.protection.fields import FieldCipher, field_key_id
from services.shared.protection.keyring import DataKeyring, KeyringFile, load_or_create
from services.shared.protection.rotation import (
    ProtectedColumns,
    RotationProgress,
    rotate_component,
    table_of,
    wrapped_key_id,
)

# Longer than a KeyringFile's check interval, so every running process writes under the new key.
SETTLE_SECONDS = 2.0


def protecting_specs() -> list[ServiceSpec]:
    """Every service that stores personal data."""
    specs = [c.spec() for c in by_port()]
    return [spec for spec in specs if spec.protects_personal_data]


@dataclass
class RotationReport:
    old_key: str
    new_key: str
    tables: list[tuple[str, RotationProgress]]


async def rotate_data_keys(
    settings: Settings,
    *,
    specs: Sequence[ServiceSpec] | None = None,
    suite: str | None = None,
    resume: bool = False,
    settle_seconds: float = SETTLE_SECONDS,
    echo: Callable[[str], None] = print,
) -> RotationReport:
    """Make a new active key (unless resuming) and bring every protected value under it."""
    path = settings.data_keys_file
    keyring = load_or_create(path, environ=settings.protection_environ(), suite=settings.crypto_suite)
    old = keyring.active.id
    if not resume:
        keyring = keyring.rotated(suite)
        keyring.save(path)
        echo(f"new active data key {keyring.active.id} ({keyring.active.suite.cipher}); waiting for services")
        await asyncio.sleep(settle_seconds)
    cipher = FieldCipher(keyring, source=KeyringFile(path, keyring))
    tables: list[tuple[str, RotationProgress]] = []
    for spec in protecting_specs() if specs is None else specs:
        engine = engine_for(settings, spec.name)
        try:
            for progress in await rotate_component(engine, spec.metadata, protected=spec.protected, cipher=cipher):
                tables.append((spec.name, progress))
                echo(
                    f"{spec.name}.{progress.table}: {progress.reencrypted} re-encrypted, "
                    f"{progress.skipped_concurrent} rewritten by traffic meanwhile, "
                    f"{len(progress.unreadable)} unreadable"
                )
        finally:
            await engine.dispose()
    return RotationReport(old_key=old, new_key=keyring.active.id, tables=tables)


async def keys_in_use(settings: Settings, *, specs: Sequence[ServiceSpec] | None = None) -> set[str]:
    """Every key id some stored value is still encrypted or wrapped under."""
    used: set[str] = set()
    for spec in protecting_specs() if specs is None else specs:
        engine = engine_for(settings, spec.name)
        try:
            async with engine.connect() as conn:
                for item in spec.protected:
                    table = table_of(spec.metadata, item)
                    if isinstance(item, ProtectedColumns):
                        for column in item.columns:
                            values = await conn.stream_scalars(
                                sa.select(table.c[column]).where(table.c[column].is_not(None))
                            )
                            async for value in values:
                                used.add(field_key_id(value))
                    else:
                        # Entries with no content of their own (imaging references) have no key.
                        column = table.c[item.wrapped_column]
                        wrapped = await conn.stream_scalars(sa.select(column).where(column.is_not(None)))
                        async for value in wrapped:
                            used.add(wrapped_key_id(value))
        finally:
            await engine.dispose()
    return used


async def retire_data_keys(settings: Settings, *, specs: Sequence[ServiceSpec] | None = None) -> list[str]:
    """Drop the old keys no stored value uses any more; a key still in use is kept."""
    path = settings.data_keys_file
    keyring = DataKeyring.load(path)
    used = await keys_in_use(settings, specs=specs)
    retired = {k for k in keyring.key_ids if k != keyring.active.id and k not in used}
    if not retired:
        return []
    keyring.without(retired).save(path)
    return sorted(retired)
