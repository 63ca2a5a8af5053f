"""The notification broker's settings (HIE_NOTIFY_*, HIE_NATS_URL)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.shared.config import ComponentSettings


@dataclass(frozen=True)
class NotificationSettings:
    """Delivery settings (HIE_NOTIFY_*, HIE_NATS_URL)."""

    retry_base_seconds: float = 5.0
    max_backoff_seconds: float = 300.0
    dead_letter_after_seconds: float = 24 * 3600.0
    timeout_seconds: float = 10.0
    nats_url: str = ""
    # JSON {organisation id or "*": [base URL, ...]} (see dsub.EndpointPolicy).
    endpoint_allow_list: str = ""
    # Comma-separated CIDRs production may deliver into (a regional private network).
    private_networks: str = ""
    # Loopback endpoints (a receiver on this machine): tests only, never by default.
    allow_loopback: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> NotificationSettings:
        """From the registry's registered settings (services/shared/config.py), or a mapping given."""
        env = ComponentSettings.from_env("registry").environ() if env is None else env
        return cls(
            retry_base_seconds=float(env.get("HIE_NOTIFY_RETRY_BASE_SECONDS", "5")),
            max_backoff_seconds=float(env.get("HIE_NOTIFY_MAX_BACKOFF_SECONDS", "300")),
            dead_letter_after_seconds=float(env.get("HIE_NOTIFY_DEAD_LETTER_AFTER_SECONDS", str(24 * 3600))),
            timeout_seconds=float(env.get("HIE_NOTIFY_TIMEOUT_SECONDS", "10")),
            nats_url=env.get("HIE_NATS_URL", ""),
            endpoint_allow_list=_allow_list(env),
            private_networks=env.get("HIE_NOTIFY_PRIVATE_NETWORKS", ""),
            allow_loopback=env.get("HIE_NOTIFY_ALLOW_LOOPBACK", "").lower() in {"1", "true", "yes"},
        )


def _allow_list(env: Mapping[str, str]) -> str:
    """HIE_NOTIFY_ENDPOINT_ALLOWLIST (JSON), or the JSON file HIE_NOTIFY_ENDPOINT_ALLOWLIST_FILE names."""
    path = env.get("HIE_NOTIFY_ENDPOINT_ALLOWLIST_FILE", "")
    if path:
        return Path(path).read_text(encoding="utf-8")
    return env.get("HIE_NOTIFY_ENDPOINT_ALLOWLIST", "")
