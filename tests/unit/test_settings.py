"""Production settings refuse what is only acceptable on a developer's machine."""

from __future__ import annotations

import pytest

from services.shared.config import Settings, UnsafeSettingsError

PRODUCTION = {
    "HIE_ENV": "production",
    "HIE_DATABASE_URL": "postgresql+asyncpg://hie@db/hie",
    "HIE_PUBLIC_URL": "https://hie.example.cn",
    "HIE_GRPC_TLS_CERT": "/tls/tls.crt",
    "HIE_GRPC_TLS_KEY": "/tls/tls.key",
    "HIE_GRPC_TLS_CA": "/tls/ca.crt",
    "HIE_HTTPS_CERT": "/https/tls.crt",
    "HIE_HTTPS_KEY": "/https/tls.key",
}


def test_a_complete_production_configuration_is_accepted() -> None:
    settings = Settings.from_env(PRODUCTION)
    assert settings.https_cert_file is not None
    assert (
        Settings.from_env(
            {k: v for k, v in PRODUCTION.items() if "HTTPS_" not in k} | {"HIE_HTTPS_TERMINATION": "ingress"}
        ).https_termination
        == "ingress"
    )


@pytest.mark.parametrize(
    ("change", "refused_for"),
    [
        ({"HIE_DATABASE_URL": ""}, "HIE_DATABASE_URL"),
        ({"HIE_DATABASE_URL": "sqlite+aiosqlite:///x.db"}, "HIE_DATABASE_URL"),
        ({"HIE_PUBLIC_URL": "http://hie.example.cn"}, "https"),
        ({"HIE_GRPC_TLS_CERT": "", "HIE_GRPC_TLS_KEY": "", "HIE_GRPC_TLS_CA": ""}, "HIE_GRPC_TLS"),
        ({"HIE_HTTPS_CERT": "", "HIE_HTTPS_KEY": ""}, "HTTPS"),
        ({"HIE_HTTPS_KEY": ""}, "go together"),
        ({"HIE_HTTPS_TERMINATION": "nowhere"}, "HIE_HTTPS_TERMINATION"),
        ({"HIE_CRYPTO_SUITE": "des"}, "HIE_CRYPTO_SUITE"),
        ({"HIE_ENV": "staging"}, "HIE_ENV"),
    ],
)
def test_unsafe_production_settings_are_refused(change: dict[str, str], refused_for: str) -> None:
    with pytest.raises(UnsafeSettingsError, match=refused_for):
        Settings.from_env(PRODUCTION | change)
