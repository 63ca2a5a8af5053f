"""Content chunk I/O: content cut into CHUNK_BYTES chunks, each sealed under the document's own
data key (envelope encryption) on the way in, read back in order and opened on the way out."""

from __future__ import annotations

from collections.abc import AsyncIterator

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.registry import domain, store
from services.registry.messages import IMAGING
from services.registry.submission import Submission
from services.shared.errors import DomainError
from services.shared.protection import DataProtection
from services.shared.protection.fields import TamperedCiphertextError


class ChunkWriter:
    """Stores content as it arrives in pieces of any size: CHUNK_BYTES chunks, the last one
    sealed as last (so a cut-short content fails authentication), hashed on the way."""

    def __init__(self, session: AsyncSession, document_id: str, content_key: object | None) -> None:
        self._session, self._document_id, self._key = session, document_id, content_key
        self.hasher = domain.ContentHasher()
        self._seq = 0
        self._pending = bytearray()

    async def _store(self, data: bytes, *, final: bool) -> None:
        sealed = self._key.seal_chunk(self._seq, data, final=final) if self._key else data  # type: ignore[attr-defined]
        await store.insert_chunk(self._session, self._document_id, self._seq, sealed)
        self._seq += 1

    async def write(self, piece: bytes) -> None:
        """One piece of the content."""
        self.hasher.update(piece)
        self._pending += piece
        # Strictly more than a chunk: the last chunk stays pending, to be sealed as last.
        while len(self._pending) > domain.CHUNK_BYTES:
            await self._store(bytes(self._pending[: domain.CHUNK_BYTES]), final=False)
            del self._pending[: domain.CHUNK_BYTES]

    async def close(self) -> None:
        """The last chunk."""
        if self._pending:
            await self._store(bytes(self._pending), final=True)
            self._pending.clear()


def sealed_chunks(sub: Submission, position: int, protection: DataProtection | None) -> list[dict[str, object]]:
    """A set document's content as chunk rows, checked against its declaration and sealed
    under its own data key; errors name the document's position in the set, never its data."""
    record, content = sub.record, sub.header.content
    if record.content_kind == IMAGING:
        return []
    hasher = domain.ContentHasher()
    try:
        hasher.update(content)
        digest = domain.check_received(hasher, declared_sha256=sub.declared_sha256, declared_size=sub.declared_size)
    except DomainError as exc:
        where = f"document {position + 1} of the submission set"
        raise type(exc)(f"{where}: {exc.message}", reason=exc.reason) from None
    record.size = digest.size
    key = protection.new_content_key(record.id) if protection is not None else None
    if key is not None:
        record.content_key = key.wrapped
    pieces = [content[i : i + domain.CHUNK_BYTES] for i in range(0, len(content), domain.CHUNK_BYTES)]
    return [
        {
            "document_id": record.id,
            "seq": seq,
            "data": key.seal_chunk(seq, piece, final=seq == len(pieces) - 1) if key else piece,
        }
        for seq, piece in enumerate(pieces)
    ]


async def read_chunks(
    sessions: async_sessionmaker[AsyncSession], protection: DataProtection | None, record: store.DocumentEntryRecord
) -> AsyncIterator[tuple[int, bytes, bool]]:
    """The stored chunks in order as (seq, data, is_last), decrypted, each yielded only once
    the next was read, so the caller learns which is last before sending it. A chunk that
    fails authentication (altered, reordered, cut short) raises TamperedCiphertextError."""
    key = None
    if record.content_key is not None:
        if protection is None:
            raise TamperedCiphertextError("encrypted content and no data keys")
        key = protection.open_content_key(record.id, record.content_key)
    async with sessions() as session:
        # The first two chunks in one query (one-chunk content, the common case, then needs no
        # second query to learn it was the last); after that one query per chunk.
        first = await store.chunks(session, record.id, 0, 2)
        previous = first.get(0)
        seq = 0
        while previous is not None:
            following = first.get(1) if seq == 0 else await store.chunk(session, record.id, seq + 1)
            last = following is None
            yield seq, key.open_chunk(seq, previous, final=last) if key else previous, last
            previous, seq = following, seq + 1
