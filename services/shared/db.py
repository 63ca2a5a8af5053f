"""Async SQLAlchemy engines and sessions, one database schema per component."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from sqlalchemy import DateTime, TypeDecorator, event, text
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from services.shared.config import Settings

_tracer = trace.get_tracer("hie.db")


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


def utcnow() -> datetime:
    return datetime.now(UTC)


def is_postgres(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "postgresql"


# The PostgreSQL connections a process opens at most, all kept once opened (HIE_DB_POOL_SIZE).
DEFAULT_POOL_SIZE = 20


def create_engine(url: str, *, schema: str, pool_size: int = DEFAULT_POOL_SIZE) -> AsyncEngine:
    """An engine whose connections see only the component's schema (PostgreSQL) or file (SQLite).

    On PostgreSQL at most `pool_size` connections, each kept in the pool once opened: with 10
    kept and 10 more opened per burst, every burst past 10 concurrent requests closed those
    connections at check-in and the next one opened them again (about 200 new sessions per 30 s
    of `hie bench load` document queries at 16 clients, issue 21) — each a backend started and
    authenticated and every statement prepared again, and a connection refused when PostgreSQL's
    max_connections was reached meanwhile. The most a process opens is unchanged (20).

    Parameters are hidden from error messages: they may hold patient data.
    """
    kwargs: dict[str, Any] = {"hide_parameters": True}
    if url.startswith("postgresql"):
        kwargs["connect_args"] = {"server_settings": {"search_path": schema}}
        kwargs["pool_size"] = pool_size
        kwargs["max_overflow"] = 0
    elif url.startswith("sqlite"):
        path = url.split("///", 1)[-1].split("?", 1)[0]
        if path and path != ":memory:":
            _private_file(Path(path))
    engine = create_async_engine(url, **kwargs)
    if url.startswith("sqlite"):
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    else:
        ping_when_idle(engine)
    trace_statements(engine, schema=schema)
    return engine


def _private_file(path: Path) -> None:
    """Create the SQLite database file 0600 (like the keys) before SQLite does: it creates its
    -wal and -shm files with the database file's permissions. An existing file is narrowed too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        # Only when missing: closing any descriptor of a file drops every POSIX lock this process
        # holds on it, SQLite's included; a process that opens a second engine on a file it
        # already uses would then let another process (the HL7 v2 ingress reading the gateway's
        # registry) take itself for the last user and checkpoint the WAL away under it.
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    os.chmod(path, 0o600)
    for companion in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if companion.exists():
            os.chmod(companion, 0o600)


# A pooled connection unused for longer than this is pinged before it is handed out.
IDLE_PING_SECONDS = 5.0


def ping_when_idle(engine: AsyncEngine, *, idle_seconds: float = IDLE_PING_SECONDS) -> None:
    """Ping a pooled connection before reuse only if it sat idle, not on every checkout.

    SQLAlchemy's `pool_pre_ping` costs three round trips on asyncpg (BEGIN, a ping, ROLLBACK) at
    every checkout: on this machine that was a third of a short transaction's database time. A
    connection in steady use is known to be alive; one that sat idle may have been cut (a database
    restart, a proxy's idle timeout), and is pinged and replaced if dead: raising
    DisconnectionError from `checkout` makes the pool discard it and hand out a fresh one.
    """
    pool = engine.sync_engine.pool

    def checkin(_dbapi_connection: Any, record: Any) -> None:
        if record is not None:
            record.info["hie_idle_since"] = time.monotonic()

    def checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("hie_idle_since")
        if since is None or time.monotonic() - since < idle_seconds:
            return
        try:
            dbapi_connection.ping()
        except Exception as exc:
            raise DisconnectionError("pooled connection is dead") from exc

    event.listen(pool, "checkin", checkin)
    event.listen(pool, "checkout", checkout)


def trace_statements(engine: AsyncEngine, *, schema: str) -> None:
    """A client span per SQL statement (OpenTelemetry database conventions). The statement text
    carries placeholders only; parameter values (patient data) are never recorded."""
    system = "postgresql" if engine.dialect.name == "postgresql" else engine.dialect.name

    def before(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        operation = statement.lstrip().split(" ", 1)[0].upper()
        span = _tracer.start_span(
            f"{operation} {schema}",
            kind=SpanKind.CLIENT,
            attributes={
                "db.system": system,
                "db.name": schema,
                "db.operation": operation,
                "db.statement": statement[:2000],
            },
        )
        context._hie_span = span

    def after(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        span = getattr(context, "_hie_span", None)
        if span is not None:
            span.end()

    def failed(exception_context: Any) -> None:
        span = getattr(exception_context.execution_context, "_hie_span", None)
        if span is not None:
            # The error's text can quote values: record its type only.
            span.set_status(Status(StatusCode.ERROR, type(exception_context.original_exception).__name__))
            span.end()

    event.listen(engine.sync_engine, "before_cursor_execute", before)
    event.listen(engine.sync_engine, "after_cursor_execute", after)
    event.listen(engine.sync_engine, "handle_error", failed)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


async def ensure_schema(engine: AsyncEngine, schema: str) -> None:
    if is_postgres(engine):
        async with engine.begin() as conn:
            await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def engine_for(settings: Settings, component: str) -> AsyncEngine:
    return create_engine(
        settings.database_url_for(component), schema=settings.schema_for(component), pool_size=settings.db_pool_size
    )
