"""The console's tables, in the gateway's schema (they are the gateway authorization server's
users): people per organisation, authorization codes, refresh tokens, console sessions, and
each organisation's optional upstream OpenID Connect provider.

Secrets are stored only as hashes: passwords (argon2id), authorization codes, refresh tokens and
session ids (SHA-256 of a 256-bit random value, enough against guessing). The one secret the
console must use again, an upstream provider's client secret, is encrypted with the exchange's
field encryption (data keys, AES-GCM or SM4-GCM), bound to its table, column and organisation."""

from __future__ import annotations

import datetime
import hashlib

from sqlalchemy import Boolean, ForeignKey, Integer, String, Text, UniqueConstraint, delete, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from gateway.store import Base
from services.shared.db import UtcDateTime, utcnow
from services.shared.protection.fields import FieldCipher


def digest(secret: str) -> str:
    """How codes, refresh tokens and session ids are looked up without being stored."""
    return hashlib.sha256(secret.encode()).hexdigest()


class ConsoleUser(Base):
    """A person of a member organisation who signs in to the console."""

    __tablename__ = "console_user"
    __table_args__ = (UniqueConstraint("org_id", "username", name="uq_console_user_org_username"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    org_id: Mapped[str] = mapped_column(String(64), ForeignKey("organization.id"), index=True)
    username: Mapped[str] = mapped_column(String(64))
    display_name: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(32))
    department: Mapped[str] = mapped_column(String(64), default="")
    # None: the person signs in only through the organisation's upstream OpenID provider.
    password_hash: Mapped[str | None] = mapped_column(String(256), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="active")
    failed_attempts: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime.datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # The `sub` the upstream provider gives this person (bound at the first upstream sign-in).
    oidc_subject: Mapped[str | None] = mapped_column(String(255), nullable=True)
    created_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)


class AuthorizationCode(Base):
    """RFC 6749 §4.1 code with its RFC 7636 challenge; single use, short-lived."""

    __tablename__ = "authorization_code"

    code_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    client_id: Mapped[str] = mapped_column(String(64))
    redirect_uri: Mapped[str] = mapped_column(Text)
    scope: Mapped[str] = mapped_column(Text, default="")
    user_id: Mapped[str] = mapped_column(String(36))
    code_challenge: Mapped[str] = mapped_column(String(128))
    code_challenge_method: Mapped[str] = mapped_column(String(8))
    expires_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime, index=True)


class RefreshToken(Base):
    """RFC 6749 §6 refresh token, rotated on every use."""

    __tablename__ = "refresh_token"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    client_id: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[str] = mapped_column(String(36), index=True)
    scope: Mapped[str] = mapped_column(Text, default="")
    expires_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime, index=True)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class ConsoleSession(Base):
    """A signed-in browser: the tokens stay here, the browser holds only an HttpOnly cookie."""

    __tablename__ = "console_session"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(36), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    access_token: Mapped[str] = mapped_column(Text, default="")
    access_expires_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)
    refresh_token: Mapped[str] = mapped_column(Text, default="")
    purpose_of_use: Mapped[str] = mapped_column(String(32))
    language: Mapped[str] = mapped_column(String(8), default="zh")
    # Absolute end (SESSION_LIFETIME from sign-in) ...
    expires_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime, index=True)
    # ... and the last request of the browser: idle longer than the console's idle timeout, the
    # session is over (a workstation left signed in on a ward).
    last_seen_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime, default=utcnow)


class PendingSignIn(Base):
    """A console sign-in in flight: the PKCE verifier and state between the redirect to
    /oauth2/authorize and the callback (and, for an upstream provider, its own state)."""

    __tablename__ = "console_pending_sign_in"

    state_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    code_verifier: Mapped[str] = mapped_column(String(128))
    nonce: Mapped[str] = mapped_column(String(64), default="")
    org_id: Mapped[str] = mapped_column(String(64), default="")
    resume: Mapped[str] = mapped_column(Text, default="")
    expires_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime, index=True)


class OidcProvider(Base):
    """An organisation's upstream OpenID Connect provider (optional)."""

    __tablename__ = "console_oidc_provider"

    org_id: Mapped[str] = mapped_column(String(64), ForeignKey("organization.id"), primary_key=True)
    issuer: Mapped[str] = mapped_column(Text)
    client_id: Mapped[str] = mapped_column(String(255))
    # Encrypted with the exchange's data keys (services/shared/protection), never in clear:
    # `seal_client_secret` / `client_secret_of`.
    client_secret: Mapped[str] = mapped_column(Text, default="")
    # Which ID-token claim names the console user (matched to `username` of that organisation).
    username_claim: Mapped[str] = mapped_column(String(64), default="preferred_username")


_CLIENT_SECRET_CONTEXT = "gateway.console_oidc_provider.client_secret"  # noqa: S105 - a context label, not a secret


def seal_client_secret(fields: FieldCipher, org_id: str, secret: str) -> str:
    """The stored form of an upstream provider's client secret (empty stays empty)."""
    return fields.encrypt(secret, context=f"{_CLIENT_SECRET_CONTEXT}|{org_id}") if secret else ""


def client_secret_of(fields: FieldCipher, provider: OidcProvider) -> str:
    """The provider's client secret in clear, for the token request only (a value stored before
    encryption was introduced reads as it is)."""
    return fields.open_text(provider.client_secret, context=f"{_CLIENT_SECRET_CONTEXT}|{provider.org_id}")


async def user_by_name(session: AsyncSession, org_id: str, username: str) -> ConsoleUser | None:
    return await session.scalar(
        select(ConsoleUser).where(ConsoleUser.org_id == org_id, ConsoleUser.username == username)
    )


async def users_of(session: AsyncSession, org_id: str) -> list[ConsoleUser]:
    return list(await session.scalars(select(ConsoleUser).where(ConsoleUser.org_id == org_id).order_by("username")))


async def purge_expired(session: AsyncSession) -> None:
    """Drop expired codes, refresh tokens, sessions and pending sign-ins."""
    now = utcnow()
    for table in (AuthorizationCode, RefreshToken, ConsoleSession, PendingSignIn):
        await session.execute(delete(table).where(table.expires_at < now))
