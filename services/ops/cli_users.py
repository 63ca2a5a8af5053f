"""`hie user …`: an organisation's administrator manages the people who sign in to the console."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from gateway.console.admin import add_console_user, gateway_transaction
from services.shared.config import Settings
from services.shared.errors import DomainError

app = typer.Typer(help="People who sign in to the web console, per organisation.", no_args_is_help=True)
DataDir = Annotated[Path, typer.Option("--data-dir", envvar="HIE_DATA_DIR", help="Exchange data directory")]
DatabaseUrl = Annotated[
    str, typer.Option("--database-url", envvar="HIE_DATABASE_URL", help="postgresql+asyncpg://… (default: SQLite)")
]
Org = Annotated[str, typer.Option("--org", help="The organisation id")]
Username = Annotated[str, typer.Option("--username", help="The person's sign-in name in the organisation")]
_T = TypeVar("_T")


def _settings(data_dir: Path, database_url: str) -> Settings:
    # Every user command works on an exchange's organisations: none creates an exchange where
    # there is none (a mistyped --data-dir, the wrong folder).
    if not database_url and not (data_dir / "gateway.db").exists():
        typer.echo(
            f"error: no exchange data in {data_dir.resolve()} (no gateway.db): run it from the exchange's folder"
            " or pass --data-dir / HIE_DATA_DIR (or --database-url)",
            err=True,
        )
        raise typer.Exit(3)
    env = dict(os.environ)
    env["HIE_DATA_DIR"] = str(data_dir)
    if database_url:
        env["HIE_DATABASE_URL"] = database_url
    return Settings.from_env(env)


def _run(coro: Awaitable[_T]) -> _T:
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except DomainError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _password_from(path: Path | None) -> str | None:
    if path is None:
        return None
    return path.read_text(encoding="utf-8").strip()


@app.command("add")
def user_add(
    org: Org,
    username: Username,
    name: Annotated[str, typer.Option("--name", help="Display name, e.g. 陈审计")],
    role: Annotated[
        str,
        typer.Option(
            "--role",
            help=(
                "one its organisation's type may assert (hospital: doctor, nurse, pharmacist, "
                "technician, auditor, admin; platform-admin: data-steward, auditor, admin; "
                "authority: auditor)"
            ),
        ),
    ],
    department: Annotated[str, typer.Option("--department")] = "",
    password_file: Annotated[
        Path | None, typer.Option("--password-file", exists=True, dir_okay=False, help="else one is generated")
    ] = None,
    data_dir: DataDir = Path(".hie"),
    database_url: DatabaseUrl = "",
) -> None:
    """Add a person to an organisation; prints a generated one-time password if none was given."""
    given = _password_from(password_file)
    password = _run(
        add_console_user(
            _settings(data_dir, database_url),
            org_id=org,
            username=username,
            display_name=name,
            role=role,
            department=department,
            password=given,
        )
    )
    typer.echo(f"added {username} to {org}")
    if given is None:
        typer.echo(f"one-time password: {password}")


@app.command("list")
def user_list(org: Org, data_dir: DataDir = Path(".hie"), database_url: DatabaseUrl = "") -> None:
    """The organisation's people: username, role, department, status, locked."""
    from gateway import store as gateway_store
    from gateway.console import store
    from services.shared.db import utcnow
    from services.shared.errors import NotFound

    async def run() -> list[store.ConsoleUser]:
        async with gateway_transaction(_settings(data_dir, database_url)) as session:
            if await gateway_store.organization(session, org) is None:
                raise NotFound("no such organisation")
            return await store.users_of(session, org)

    now = utcnow()
    for user in _run(run()):
        locked = "locked" if user.locked_until and user.locked_until > now else ""
        typer.echo(f"{user.username}\t{user.display_name}\t{user.role}\t{user.department}\t{user.status}\t{locked}")


def _set_status(org: str, username: str, status: str, data_dir: Path, database_url: str) -> None:
    from gateway.console import users

    async def run() -> None:
        async with gateway_transaction(_settings(data_dir, database_url)) as session:
            await users.set_status(session, org_id=org, username=username, status=status)

    _run(run())
    typer.echo(f"{username}: {status}")


@app.command("disable")
def user_disable(
    org: Org, username: Username, data_dir: DataDir = Path(".hie"), database_url: DatabaseUrl = ""
) -> None:
    """Disable a person: no sign-in, and their console sessions end."""
    _set_status(org, username, "disabled", data_dir, database_url)


@app.command("enable")
def user_enable(org: Org, username: Username, data_dir: DataDir = Path(".hie"), database_url: DatabaseUrl = "") -> None:
    """Enable a disabled person again."""
    _set_status(org, username, "active", data_dir, database_url)


@app.command("reset-password")
def user_reset_password(
    org: Org,
    username: Username,
    password_file: Annotated[
        Path | None, typer.Option("--password-file", exists=True, dir_okay=False, help="else one is generated")
    ] = None,
    data_dir: DataDir = Path(".hie"),
    database_url: DatabaseUrl = "",
) -> None:
    """Set a new password (and lift a lockout); prints a generated one-time password if none was given."""
    from gateway.console import users

    given = _password_from(password_file)
    password = given or users.generate_password()

    async def run() -> None:
        async with gateway_transaction(_settings(data_dir, database_url)) as session:
            await users.reset_password(session, org_id=org, username=username, password=password)

    _run(run())
    typer.echo(f"{username}: password reset, lockout cleared, sessions ended")
    if given is None:
        typer.echo(f"one-time password: {password}")


@app.command("oidc")
def user_oidc(
    org: Org,
    issuer: Annotated[str, typer.Option("--issuer", help="The provider's issuer URL (https)")] = "",
    client_id: Annotated[str, typer.Option("--client-id", help="The exchange's client id at the provider")] = "",
    client_secret_file: Annotated[
        Path | None, typer.Option("--client-secret-file", exists=True, dir_okay=False)
    ] = None,
    username_claim: Annotated[
        str, typer.Option("--username-claim", help="ID token claim that names the console user")
    ] = "preferred_username",
    remove: Annotated[bool, typer.Option("--remove", help="Stop upstream sign-in for the organisation")] = False,
    data_dir: DataDir = Path(".hie"),
    database_url: DatabaseUrl = "",
) -> None:
    """Let the organisation's people sign in through its own OpenID Connect provider."""
    from gateway import store as gateway_store
    from gateway.console import store
    from gateway.console.upstream import allowed_issuer
    from services.shared.errors import InvalidArgument, NotFound
    from services.shared.protection import DataProtection

    async def run() -> str:
        async with gateway_transaction(_settings(data_dir, database_url)) as session:
            if await gateway_store.organization(session, org) is None:
                raise NotFound("no such organisation")
            existing = await session.get(store.OidcProvider, org)
            if remove:
                if existing is not None:
                    await session.delete(existing)
                return "upstream sign-in removed"
            if not issuer or not client_id or not allowed_issuer(issuer):
                raise InvalidArgument("--issuer (https) and --client-id are required")
            secret = client_secret_file.read_text(encoding="utf-8").strip() if client_secret_file else ""
            provider = existing or store.OidcProvider(org_id=org)
            provider.issuer, provider.client_id = issuer, client_id
            # Encrypted with the exchange's data keys, never stored in clear.
            fields = DataProtection.from_settings(_settings(data_dir, database_url)).fields
            provider.client_secret = store.seal_client_secret(fields, org, secret)
            provider.username_claim = username_claim
            session.add(provider)
            return f"upstream sign-in through {issuer}"

    typer.echo(_run(run()))
