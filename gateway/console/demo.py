"""The end of `hie demo`: a console user to sign in with, and where."""

from __future__ import annotations

from gateway.console.admin import add_console_user, gateway_transaction
from services.shared.config import Settings
from services.shared.errors import AlreadyExists


async def print_console_sign_in(settings: Settings, base_url: str, *, authority_org_id: str) -> str:
    """Create an auditor of the demo's authority and print the console address and sign-in;
    returns the password (a fresh one per demo run, never a fixed default)."""
    from gateway.console import users

    try:
        password = await add_console_user(
            settings,
            org_id=authority_org_id,
            username="auditor",
            display_name="陈审计",
            role="auditor",
            department="医政医管处",
        )
    except AlreadyExists:
        # A rerun of the demo reuses its organisations: the auditor gets a fresh password instead.
        password = users.generate_password()
        async with gateway_transaction(settings) as session:
            await users.reset_password(session, org_id=authority_org_id, username="auditor", password=password)
    print(f"web console: {base_url}/console/  (organisation {authority_org_id}, user auditor, password {password})")
    return password
