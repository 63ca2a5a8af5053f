"""What the console keeps per gateway process, made on first use from the gateway's own state
(the database sessions, the token issuer, the outbox), so mounting it is one line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from fastapi.templating import Jinja2Templates

from gateway.console.assertions import AssertionSigner
from gateway.console.authorization import UserAuthorization
from gateway.console.i18n import translator
from services.shared.audit_trail import AuditTrail

_HERE = Path(__file__).resolve().parent


@dataclass
class ConsoleState:
    authorization: UserAuthorization
    signer: AssertionSigner
    templates: Jinja2Templates
    audit: AuditTrail
    secure_cookies: bool


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
        )
        app.state.console = state
    return state
