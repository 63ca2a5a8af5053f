"""Console users per organisation: passwords (argon2id), lockout after repeated failures, and
the administration an organisation's administrator does (`hie user …` and the console's users
screen). Pure rules here; the caller owns the session and its transaction."""

from __future__ import annotations

import asyncio
import datetime
import secrets
import uuid
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import delete, update
from sqlalchemy.ext.asyncio import AsyncSession

from gateway import store as gateway_store
from gateway.console import store
from services.shared.db import utcnow
from services.shared.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.shared.user_assertion import ROLES_BY_ORGANIZATION_TYPE

# argon2-cffi's defaults are RFC 9106's second recommended option (argon2id, t=3, m=64 MiB, p=4).
_HASHER = PasswordHasher()
MAX_FAILED_ATTEMPTS = 5
LOCKOUT = datetime.timedelta(minutes=15)
MIN_PASSWORD_LENGTH = 10

# Which roles a person of each kind of organisation may hold is the exchange's one table
# (services/shared/user_assertion.py ROLES_BY_ORGANIZATION_TYPE): the console signs the same user
# assertion a hospital system does, so a role that table refuses would only fail on every call.
# An authority's people are auditors only: no console administrator of its own; the platform
# operator adds them with `hie user add --org <authority>`.

# Display order only (the table above decides which).
_ROLE_ORDER = ("doctor", "nurse", "pharmacist", "technician", "data-steward", "auditor", "admin")


def roles_for(org_type: str) -> tuple[str, ...]:
    """The roles a person of an organisation of this type may hold, in a stable order."""
    allowed = ROLES_BY_ORGANIZATION_TYPE.get(org_type, frozenset())
    return tuple(role for role in _ROLE_ORDER if role in allowed)


# The purpose of use a person starts with (changeable in the console where the role allows).
DEFAULT_PURPOSE = {"auditor": "audit", "data-steward": "operations", "admin": "operations"}
CLINICAL_PURPOSES = ("treatment", "emergency", "referral", "consultation")


def default_purpose(role: str) -> str:
    return DEFAULT_PURPOSE.get(role, "treatment")


def allowed_purposes(role: str) -> tuple[str, ...]:
    """Purposes a person may choose in the console."""
    return CLINICAL_PURPOSES if role not in DEFAULT_PURPOSE else (DEFAULT_PURPOSE[role],)


@dataclass(frozen=True)
class SignInResult:
    user: store.ConsoleUser | None
    reason: str  # "" on success; "invalid" (unknown user or wrong password), "locked", "disabled"


def generate_password() -> str:
    """A one-time password for a new or reset account (about 96 bits)."""
    return secrets.token_urlsafe(12)


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidArgument(f"a password needs at least {MIN_PASSWORD_LENGTH} characters", reason="password-weak")


async def hash_password(password: str) -> str:
    """argon2id in a worker thread: it takes tens of milliseconds of CPU by design."""
    return await asyncio.to_thread(_HASHER.hash, password)


def _verify(stored: str | None, password: str) -> bool:
    try:
        return _HASHER.verify(stored or _DUMMY_HASH, password) and stored is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


# Unknown users cost the same argon2 work as known ones, so timing does not tell them apart.
_DUMMY_HASH = _HASHER.hash(secrets.token_urlsafe(16))


async def authenticate(session: AsyncSession, *, org_id: str, username: str, password: str) -> SignInResult:
    """Check a password; count failures and lock the account at MAX_FAILED_ATTEMPTS."""
    user = await store.user_by_name(session, org_id, username)
    now = utcnow()
    if user is None:
        await asyncio.to_thread(_verify, None, password)
        return SignInResult(None, "invalid")
    if user.status != "active":
        return SignInResult(user, "disabled")
    if user.locked_until is not None and user.locked_until > now:
        return SignInResult(user, "locked")
    if not await asyncio.to_thread(_verify, user.password_hash, password):
        user.failed_attempts += 1
        if user.failed_attempts >= MAX_FAILED_ATTEMPTS:
            user.locked_until = now + LOCKOUT
            user.failed_attempts = 0
            return SignInResult(user, "locked")
        return SignInResult(user, "invalid")
    user.failed_attempts = 0
    user.locked_until = None
    if _HASHER.check_needs_rehash(user.password_hash or ""):
        user.password_hash = await hash_password(password)
    return SignInResult(user, "")


async def add_user(
    session: AsyncSession,
    *,
    org_id: str,
    username: str,
    display_name: str,
    role: str,
    department: str = "",
    password: str | None = None,
) -> store.ConsoleUser:
    """A new person of the organisation; `password` None: upstream sign-in only."""
    org = await gateway_store.organization(session, org_id)
    if org is None:
        raise NotFound("no such organisation", reason="organization-unknown")
    if role not in roles_for(org.type):
        raise InvalidArgument(
            f"role must be one of {', '.join(roles_for(org.type))} for an organisation of type {org.type}",
            reason="role-not-allowed",
        )
    if not username or len(username) > 64 or not username.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise InvalidArgument("username: letters, digits, '-', '_' or '.', at most 64", reason="username-invalid")
    if not display_name or len(display_name) > 64 or len(department) > 64:
        raise InvalidArgument("name and department: 1 to 64 characters", reason="name-invalid")
    if await store.user_by_name(session, org_id, username) is not None:
        raise AlreadyExists("that username exists in the organisation", reason="user-exists")
    if password is not None:
        _check_password(password)
    user = store.ConsoleUser(
        id=str(uuid.uuid4()),
        org_id=org_id,
        username=username,
        display_name=display_name,
        role=role,
        department=department,
        password_hash=await hash_password(password) if password is not None else None,
        status="active",
        failed_attempts=0,
        created_at=utcnow(),
    )
    session.add(user)
    await session.flush()
    return user


async def existing(session: AsyncSession, org_id: str, username: str) -> store.ConsoleUser:
    user = await store.user_by_name(session, org_id, username)
    if user is None:
        raise NotFound("no such user in the organisation", reason="user-unknown")
    return user


async def set_status(session: AsyncSession, *, org_id: str, username: str, status: str) -> store.ConsoleUser:
    """Disable (or re-enable) a person; a disabled person's sessions and refresh tokens end."""
    user = await existing(session, org_id, username)
    user.status = status
    if status != "active":
        await end_sessions(session, user.id)
    return user


async def reset_password(session: AsyncSession, *, org_id: str, username: str, password: str) -> store.ConsoleUser:
    """A new password, the lockout cleared, every session and refresh token of the person ended."""
    _check_password(password)
    user = await existing(session, org_id, username)
    user.password_hash = await hash_password(password)
    user.failed_attempts = 0
    user.locked_until = None
    await end_sessions(session, user.id)
    return user


async def end_sessions(session: AsyncSession, user_id: str) -> None:
    await session.execute(delete(store.ConsoleSession).where(store.ConsoleSession.user_id == user_id))
    await session.execute(update(store.RefreshToken).where(store.RefreshToken.user_id == user_id).values(revoked=True))


def refuse_unless_admin_of(actor: store.ConsoleUser, org_id: str) -> None:
    if actor.role != "admin" or actor.org_id != org_id:
        raise FailedPrecondition("only the organisation's administrator manages its users", reason="not-admin")
