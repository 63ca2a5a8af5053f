"""Online, resumable re-encryption of protected columns after a data-key rotation.

Progress needs no bookkeeping: a value's key id is part of its text, so "what is left" is every
value not under the active key, and a run that stops half-way simply continues on the next run.
Each batch commits on its own and every update is a compare-and-set on the old ciphertext, so a
request that rewrote the row meanwhile (already under the new key) is never overwritten and
traffic goes on during the rotation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from services.shared.protection.envelope import rewrap
from services.shared.protection.fields import FieldCipher, TamperedCiphertextError
from services.shared.protection.keyring import DataKeyring, UnknownKeyError

__all__ = [
    "ColumnContext",
    "ProtectedColumns",
    "RotationProgress",
    "WrappedContentKeys",
    "reencrypt_table",
    "rewrap_table",
    "rotate_component",
    "table_of",
    "wrapped_key_id",
]

# Builds a value's associated data (its place) from the row: must match what the writer used.
ColumnContext = Callable[[Mapping[str, Any]], str]


@dataclass
class RotationProgress:
    """What one run did to one table."""

    table: str
    reencrypted: int = 0
    skipped_concurrent: int = 0
    # Primary keys of values that failed authentication: left untouched and reported, never guessed at.
    unreadable: list[Any] = field(default_factory=list)


async def reencrypt_table(
    engine: AsyncEngine,
    table: sa.Table,
    *,
    columns: Mapping[str, ColumnContext],
    cipher: FieldCipher,
    batch_size: int = 500,
    on_batch: Callable[[RotationProgress], None] | None = None,
) -> RotationProgress:
    """Re-encrypt every value of `columns` in `table` that is not under the active key."""
    progress = RotationProgress(table=table.name)
    # Processes that had not yet picked up the new key may have written under the old one during a
    # pass: go again until a pass finds nothing left but values that cannot be read.
    while await _one_pass(
        engine, table, columns=columns, cipher=cipher, batch_size=batch_size, progress=progress, on_batch=on_batch
    ):
        pass
    return progress


async def _one_pass(
    engine: AsyncEngine,
    table: sa.Table,
    *,
    columns: Mapping[str, ColumnContext],
    cipher: FieldCipher,
    batch_size: int,
    progress: RotationProgress,
    on_batch: Callable[[RotationProgress], None] | None,
) -> bool:
    (pk,) = table.primary_key.columns
    prefix = cipher.active_prefix()
    changed = False
    after: Any = None
    failed = set(progress.unreadable)
    while True:
        stale = sa.or_(
            *(sa.and_(table.c[c].is_not(None), ~table.c[c].startswith(prefix, autoescape=True)) for c in columns)
        )
        query = sa.select(table).where(stale).order_by(pk).limit(batch_size)
        if after is not None:
            query = query.where(pk > after)
        async with engine.begin() as conn:
            rows = (await conn.execute(query)).mappings().all()
            if not rows:
                break
            for row in rows:
                after = row[pk.name]
                for column, context_of in columns.items():
                    old = row[column]
                    if old is None or old.startswith(prefix):
                        continue
                    context = context_of(row)
                    try:
                        new = cipher.encrypt(cipher.decrypt(old, context=context), context=context)
                    except (TamperedCiphertextError, UnknownKeyError):
                        if after not in failed:
                            failed.add(after)
                            progress.unreadable.append(after)
                        continue
                    result = await conn.execute(
                        sa.update(table).where(pk == after, table.c[column] == old).values({column: new})
                    )
                    changed = True
                    if result.rowcount == 1:
                        progress.reencrypted += 1
                    else:
                        progress.skipped_concurrent += 1
        if on_batch:
            on_batch(progress)
    return changed


def wrapped_key_id(wrapped: bytes) -> str:
    """The key-encryption key a stored document key is wrapped under (see envelope.new_content_key)."""
    _suite, _, sealed = wrapped.partition(b"|")
    return sealed[1 : 1 + sealed[0]].decode(errors="replace") if sealed else ""


async def rewrap_table(
    engine: AsyncEngine,
    table: sa.Table,
    *,
    document_id_column: str,
    wrapped_column: str,
    kek: DataKeyring,
    batch_size: int = 500,
) -> RotationProgress:
    """Re-wrap every document key not under the active key-encryption key. Content is untouched:
    a rotation costs a few bytes per document, whatever the documents weigh."""
    (pk,) = table.primary_key.columns
    progress = RotationProgress(table=table.name)
    after: Any = None
    while True:
        query = sa.select(pk, table.c[document_id_column], table.c[wrapped_column]).order_by(pk).limit(batch_size)
        if after is not None:
            query = query.where(pk > after)
        async with engine.begin() as conn:
            rows = (await conn.execute(query)).all()
            if not rows:
                return progress
            for key, document_id, wrapped in rows:
                after = key
                if wrapped is None or wrapped_key_id(wrapped) == kek.active.id:
                    continue
                try:
                    new = rewrap(kek, document_id=str(document_id), wrapped=wrapped)
                except (TamperedCiphertextError, UnknownKeyError):
                    progress.unreadable.append(key)
                    continue
                result = await conn.execute(
                    sa.update(table).where(pk == key, table.c[wrapped_column] == wrapped).values({wrapped_column: new})
                )
                if result.rowcount == 1:
                    progress.reencrypted += 1
                else:
                    progress.skipped_concurrent += 1


@dataclass(frozen=True)
class ProtectedColumns:
    """Encrypted text columns of one table, and how each value's associated data is built."""

    table: str
    columns: Mapping[str, ColumnContext]


@dataclass(frozen=True)
class WrappedContentKeys:
    """A table of per-document keys wrapped by the key-encryption key."""

    table: str
    document_id_column: str
    wrapped_column: str


def table_of(metadata: sa.MetaData, item: ProtectedColumns | WrappedContentKeys) -> sa.Table:
    """The table a protected item names (metadata keys carry the schema, names do not)."""
    return next(t for t in metadata.tables.values() if t.name == item.table)


async def rotate_component(
    engine: AsyncEngine,
    metadata: sa.MetaData,
    *,
    protected: Sequence[ProtectedColumns | WrappedContentKeys],
    cipher: FieldCipher,
    batch_size: int = 500,
) -> list[RotationProgress]:
    """Bring every protected value of one component under the active key."""
    results = []
    for item in protected:
        table = table_of(metadata, item)
        if isinstance(item, ProtectedColumns):
            results.append(
                await reencrypt_table(engine, table, columns=item.columns, cipher=cipher, batch_size=batch_size)
            )
        else:
            results.append(
                await rewrap_table(
                    engine,
                    table,
                    document_id_column=item.document_id_column,
                    wrapped_column=item.wrapped_column,
                    kek=cipher.keyring,
                    batch_size=batch_size,
                )
            )
    return results
