"""What the console keeps per gateway process, made on first use from the gateway's own state
(the database sessions, the token issuer, the outbox), so mounting it is one line."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from fastapi.templating import Jinja2Templates

from gateway.console.assertions import AssertionSigner
from gateway.console.authorization import UserAuthorization
from gateway.console.i18n import translator
from services.shared.audit_trail import AuditTrail
from services.shared.protection import DataProtection

_HERE = Path(__file__).resolve().parent
IDLE_TIMEOUT_ENV = "HIE_CONSOLE_IDLE_MINUTES"
DEFAULT_IDLE_TIMEOUT = datetime.timedelta(minutes=15)


def idle_timeout_from(environ: Mapping[str, str]) -> datetime.timedelta:
    """The console's idle timeout: HIE_CONSOLE_IDLE_MINUTES (1 to 480), 15 minutes by default."""
    value = environ.get(IDLE_TIMEOUT_ENV, "").strip()
    if not value:
        return DEFAULT_IDLE_TIMEOUT
    try:
        minutes = float(value)
    except ValueError:
        raise ValueError(f"{IDLE_TIMEOUT_ENV} must be a number of minutes") from None
    if not 1 <= minutes <= 480:
        raise ValueError(f"{IDLE_TIMEOUT_ENV} must be between 1 and 480 minutes")
    return datetime.timedelta(minutes=minutes)


@dataclass
class ConsoleState:
    authorization: UserAuthorization
    signer: AssertionSigner
    templates: Jinja2Templates
    audit: AuditTrail
    secure_cookies: bool
    # The exchange's data keys: the upstream providers' client secrets are encrypted with them.
    protection: DataProtection
    # A session with no request for this long is over (sign in again).
    idle_timeout: datetime.timedelta


def console_state(app: FastAPI) -> ConsoleState:
    state: ConsoleState | None = getattr(app.state, "console", None)
    if state is None:
        settings = app.state.settings
        signer = AssertionSigner.beside(settings.gateway_signing_key_file)
        audit = AuditTrail(app.state.outbox, service="gateway")
        templates = Jinja2Templates(directory=str(_HERE / "templates"))
        templates.env.globals["t"] = translator
        state = ConsoleState(
            authorization=UserAuthorization(
                sessions=app.state.sessions,
                smart=app.state.authorization,
                signer=signer,
                audit=audit,
                public_url=settings.public_url,
            ),
            signer=signer,
            templates=templates,
            audit=audit,
            secure_cookies=settings.public_url.startswith("https://"),
            protection=DataProtection.from_settings(settings),
            idle_timeout=idle_timeout_from({IDLE_TIMEOUT_ENV: settings.console_idle_minutes}),
        )
        app.state.console = state
    return state
