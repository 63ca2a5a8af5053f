"""Database faults an operator must act on (a full disk, a database that is down), told apart
from bugs: the caller gets 503 with a stable reason, the log gets one line per burst (never the
statement or its values: they can carry patient data), and the `hie.storage.faults` counter
counts every occurrence for the alert rule of the monitoring set-up."""

from __future__ import annotations

import logging
import threading
import time

from opentelemetry import metrics
from sqlalchemy.exc import DBAPIError

from services.shared.errors import Unavailable

_log = logging.getLogger("hie.storage")
_meter = metrics.get_meter("hie.storage")
# Every storage fault, by component and reason: alert on any increase of reason="storage-full".
FAULTS = _meter.create_counter(
    "hie.storage.faults", unit="{fault}", description="Database operations refused by a storage fault"
)
# Faults of one reason closer together than this are one burst: logged once, counted each.
BURST_SECONDS = 60.0

STORAGE_FULL = "storage-full"
DATABASE_UNAVAILABLE = "database-unavailable"
DATABASE_BUSY = "database-busy"

# SQLite result codes (sqlite3.Error.sqlite_errorname) and PostgreSQL SQLSTATE classes.
_SQLITE = {
    "SQLITE_FULL": STORAGE_FULL,
    "SQLITE_IOERR": DATABASE_UNAVAILABLE,
    "SQLITE_CANTOPEN": DATABASE_UNAVAILABLE,
    "SQLITE_READONLY": DATABASE_UNAVAILABLE,
    "SQLITE_BUSY": DATABASE_BUSY,
    "SQLITE_LOCKED": DATABASE_BUSY,
}
_SQLSTATE = {
    "53100": STORAGE_FULL,  # disk_full
    "53": DATABASE_BUSY,  # insufficient resources (memory, connections)
    "08": DATABASE_UNAVAILABLE,  # connection exception
    "57P01": DATABASE_UNAVAILABLE,  # admin_shutdown
    "57P02": DATABASE_UNAVAILABLE,  # crash_shutdown
    "57P03": DATABASE_UNAVAILABLE,  # cannot_connect_now
}
_MESSAGES = {
    STORAGE_FULL: "the exchange cannot store data now (storage full); retry later",
    DATABASE_UNAVAILABLE: "the exchange's database is unavailable; retry later",
    DATABASE_BUSY: "the exchange's database is overloaded; retry later",
}


def _sqlstate(error: BaseException) -> str:
    for candidate in (error, error.__cause__):
        state = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if isinstance(state, str):
            return state
    return ""


def fault_reason(exc: BaseException) -> str | None:
    """The storage-fault reason of a database error, or None for anything else (a bug)."""
    if isinstance(exc, (ConnectionRefusedError, ConnectionResetError)):
        return DATABASE_UNAVAILABLE
    if not isinstance(exc, DBAPIError):
        return None
    orig = exc.orig
    if orig is None:
        return None
    name = getattr(orig, "sqlite_errorname", None)
    if isinstance(name, str):
        for prefix, reason in _SQLITE.items():
            if name.startswith(prefix):
                return reason
        return None
    state = _sqlstate(orig)
    if state:
        return _SQLSTATE.get(state) or _SQLSTATE.get(state[:2])
    if "disk is full" in str(orig):
        return STORAGE_FULL
    if exc.connection_invalidated:
        return DATABASE_UNAVAILABLE
    return None


class _Bursts:
    """Logs the first fault of a burst and how many followed it; thread-safe (gRPC and the
    relay may fail together)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = {}

    def record(self, component: str, reason: str, where: str) -> None:
        FAULTS.add(1, {"component": component, "reason": reason})
        key = (component, reason)
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < BURST_SECONDS:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                self._last[key] = now
                return
            self._last[key] = now
            earlier = self._suppressed.pop(key, 0)
        _log.error(
            "storage-fault component=%s reason=%s where=%s (%d more in the previous burst)",
            component,
            reason,
            where,
            earlier,
        )


_BURSTS = _Bursts()


def storage_unavailable(exc: BaseException, *, component: str, where: str) -> Unavailable | None:
    """The client's error for a storage fault (recorded and logged once per burst), or None when
    `exc` is not one."""
    reason = fault_reason(exc)
    if reason is None:
        return None
    _BURSTS.record(component, reason, where)
    return Unavailable(_MESSAGES[reason], reason=reason)
