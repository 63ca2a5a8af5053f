"""The organisations' tiers as the exchange's directory states them (not as a caller claims).

Tiers (community / secondary / tertiary) are attributes of member organisations the exchange
keeps with their registration (`hie org add --tier`, `hie org tier`): the gateway's organisation
store. The referral service does not read that store (a service owns its tables). Instead the
gateway, which resolves the organisations of a referral request from its store anyway, hands
them over as a *directory statement*: a short-lived JWT it signs with its own token-signing key,
audience `urn:hie:org-directory`, carried in the gRPC metadata key `x-hie-org-directory`.

The referral service verifies it against the exchange's trusted keys like an access token (so a
hospital, whose keys are not among them, cannot forge one; a platform key may not sign it), and
checks that it was issued for the calling client. A request without a valid statement has no
tiers: the direction is then the one the caller stated (see the README).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from services.shared.auth import TokenVerifier
from services.shared.errors import Unauthenticated

DIRECTORY_AUDIENCE = "urn:hie:org-directory"
DIRECTORY_METADATA_KEY = "x-hie-org-directory"
STATEMENT_LIFETIME_SECONDS = 300
TIERS = ("community", "secondary", "tertiary")
_RANK = {tier: rank for rank, tier in enumerate(TIERS)}


def tiers_from_metadata(
    verifier: TokenVerifier, metadata: Sequence[tuple[str, str | bytes]], *, client_id: str
) -> dict[str, str]:
    """The tiers the statement in `metadata` vouches for ({} without a valid one for this client)."""
    statement = next((v for k, v in metadata if k == DIRECTORY_METADATA_KEY and isinstance(v, str)), "")
    if not statement:
        return {}
    try:
        claims = verifier.verify(statement)
    except Unauthenticated:
        return {}
    if claims.get("sub") != client_id:
        return {}
    tiers = claims.get("tiers")
    if not isinstance(tiers, Mapping):
        return {}
    return {str(org): str(tier) for org, tier in tiers.items() if tier in _RANK}


def direction(origin_tier: str, target_tier: str) -> str:
    """up / down / lateral from the two tiers ("" when either is unknown)."""
    if origin_tier not in _RANK or target_tier not in _RANK:
        return ""
    if _RANK[target_tier] > _RANK[origin_tier]:
        return "up"
    if _RANK[target_tier] < _RANK[origin_tier]:
        return "down"
    return "lateral"
