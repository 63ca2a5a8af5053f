"""The web console for regional auditors, data stewards, clinicians and organisation
administrators: server-rendered pages on the exchange's own OAuth2 and public API."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

_STATIC = Path(__file__).resolve().parent / "static"


def mount(app: FastAPI) -> None:
    """Add the console's routes, static files and handlers to the gateway application."""
    from gateway.console import pages, web, workflows
    from gateway.console.api import SignInRequired

    app.include_router(web.router)
    app.include_router(pages.router)
    app.include_router(workflows.router)
    app.mount("/console/static", StaticFiles(directory=_STATIC), name="console-static")

    async def sign_in(request: Request, exc: Exception) -> Response:
        response = RedirectResponse("/console/login", status_code=303)
        response.delete_cookie(web.SESSION_COOKIE, path="/console")
        return response

    async def csrf_refused(request: Request, exc: Exception) -> Response:
        return web.render(request, "message.html", status=403, lang="zh", title_key="common.error", detail="CSRF")

    app.add_exception_handler(SignInRequired, sign_in)
    app.add_exception_handler(web.CsrfRefused, csrf_refused)
