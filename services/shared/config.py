"""One typed settings object per process, read from HIE_* environment variables."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.shared.components import GATEWAY_PORT, by_port
from services.shared.transport import GrpcTls

# Each service's default port, in port order (services/shared/components.py lists the services).
SERVICE_PORTS: dict[str, int] = {c.name: c.port for c in by_port()}
# The HL7 v2 ingress (gateway/mllp): MLLP's registered port.
MLLP_PORT = 2575
# The audience of every access token the gateway issues: the exchange as a whole.
TOKEN_AUDIENCE = "urn:hie:exchange"  # noqa: S105 - an audience URI, not a secret


class UnsafeSettingsError(RuntimeError):
    """A setting that is acceptable for development was left in place in production."""


@dataclass(frozen=True)
class Settings:
    """Settings of one exchange process (a service or the gateway)."""

    environment: str = "development"
    data_dir: Path = Path(".hie")
    database_url: str | None = None
    # Prefix for PostgreSQL schema names; lets test runs live side by side in one database.
    schema_prefix: str = ""
    listen: str | None = None
    # A plaintext port serving only grpc.health.v1 (for kubelet probes, which cannot speak TLS).
    health_listen: str | None = None
    targets: dict[str, str] = field(default_factory=dict)
    trusted_jwks_file: Path | None = None
    gateway_signing_key_file: Path | None = None
    service_signing_key_file: Path | None = None
    public_url: str = f"http://127.0.0.1:{GATEWAY_PORT}"
    otel_exporter: str = "none"
    log_level: str = "INFO"
    # How long a relay's claim on outbox messages lasts: a relay that died mid-send (kill -9)
    # leaves them due again after it. Longer than the slowest send (a webhook's timeout).
    outbox_lease_seconds: float = 30.0
    # The PostgreSQL connections each process opens at most and keeps (services/shared/db.py).
    db_pool_size: int = 20
    # Gateway hardening.
    rate_limit_per_second: float = 50.0
    rate_limit_burst: int = 100
    request_timeout_seconds: float = 30.0
    cors_origins: tuple[str, ...] = ()
    # How long the gateway trusts its cached view of an organisation's standing.
    revocation_check_seconds: float = 5.0
    grpc_tls: GrpcTls | None = None
    # Data-protection keys (field encryption, blind indexes, document key wrapping).
    data_keys_file: Path = Path(".hie/keys/data-keys.json")
    # "aes" (AES-256-GCM, HMAC-SHA-256) or "sm" (SM4-GCM, HMAC-SM3, SM2) for a new key file.
    crypto_suite: str = "aes"
    # HTTPS at the gateway itself (PEM chain and key), or "ingress" when a TLS-terminating ingress
    # or load balancer in front of it does the HTTPS.
    # The platform's SM2 key, used under the "sm" suite to co-sign audit checkpoints.
    sm2_signing_key_file: Path = Path(".hie/keys/platform-sm2.json")
    https_cert_file: Path | None = None
    https_key_file: Path | None = None
    https_termination: str = "gateway"
    # The HL7 v2 MLLP ingress (gateway/mllp): where it listens for legacy HIS feeds.
    mllp_host: str = "127.0.0.1"
    mllp_port: int = MLLP_PORT
    # Operations metrics: the Prometheus scrape endpoint (host:port; off when unset, `hie up`
    # sets one per process) and how often database-held values (backlogs, queues) are sampled.
    metrics_listen: str | None = None
    metrics_sample_seconds: float = 15.0
    # Share of exchanges whose trace is recorded, decided at the gateway (None: every one).
    trace_sample_ratio: float | None = None
    # The console's idle timeout in minutes as written (checked by gateway/console/state.py).
    console_idle_minutes: str = ""
    # The data keys as an inline JSON document (instead of the key file), and the masking policy file.
    data_keys_inline: str | None = None
    masking_policy_file: Path | None = None

    @classmethod
    def from_env(cls, environ: os._Environ[str] | dict[str, str] | None = None) -> Settings:
        """Read settings from the environment; refuse unsafe defaults outside development."""
        env = os.environ if environ is None else environ
        data_dir = Path(env.get("HIE_DATA_DIR", ".hie"))
        keys = data_dir / "keys"
        targets = {
            name: env.get(f"HIE_{name.upper()}_TARGET", f"127.0.0.1:{port}") for name, port in SERVICE_PORTS.items()
        }
        settings = cls(
            environment=env.get("HIE_ENV", "development"),
            data_dir=data_dir,
            database_url=env.get("HIE_DATABASE_URL") or None,
            schema_prefix=env.get("HIE_DB_SCHEMA_PREFIX", ""),
            listen=env.get("HIE_LISTEN") or None,
            health_listen=env.get("HIE_HEALTH_LISTEN") or None,
            targets=targets,
            trusted_jwks_file=Path(env.get("HIE_TRUSTED_JWKS_FILE", keys / "trusted.jwks.json")),
            gateway_signing_key_file=Path(env.get("HIE_GATEWAY_SIGNING_KEY_FILE", keys / "gateway.pem")),
            service_signing_key_file=Path(env.get("HIE_SERVICE_SIGNING_KEY_FILE", keys / "platform.pem")),
            public_url=env.get("HIE_PUBLIC_URL", f"http://127.0.0.1:{GATEWAY_PORT}").rstrip("/"),
            otel_exporter=env.get("HIE_OTEL_EXPORTER", "none"),
            log_level=env.get("HIE_LOG_LEVEL", "INFO"),
            outbox_lease_seconds=_number(env, "HIE_OUTBOX_LEASE_SECONDS", "30"),
            db_pool_size=int(_number(env, "HIE_DB_POOL_SIZE", "20", whole=True)),
            rate_limit_per_second=_number(env, "HIE_RATE_LIMIT_PER_SECOND", "50"),
            rate_limit_burst=int(_number(env, "HIE_RATE_LIMIT_BURST", "100", whole=True)),
            request_timeout_seconds=_number(env, "HIE_REQUEST_TIMEOUT_SECONDS", "30"),
            cors_origins=tuple(o for o in env.get("HIE_CORS_ORIGINS", "").split(",") if o),
            revocation_check_seconds=_number(env, "HIE_REVOCATION_CHECK_SECONDS", "5"),
            grpc_tls=GrpcTls.from_env(env),
            data_keys_file=Path(env.get("HIE_DATA_KEYS_FILE", keys / "data-keys.json")),
            crypto_suite=env.get("HIE_CRYPTO_SUITE", "aes"),
            sm2_signing_key_file=Path(env.get("HIE_SM2_SIGNING_KEY_FILE", keys / "platform-sm2.json")),
            https_cert_file=Path(env["HIE_HTTPS_CERT"]) if env.get("HIE_HTTPS_CERT") else None,
            https_key_file=Path(env["HIE_HTTPS_KEY"]) if env.get("HIE_HTTPS_KEY") else None,
            https_termination=env.get("HIE_HTTPS_TERMINATION", "gateway"),
            mllp_host=env.get("HIE_MLLP_HOST", "127.0.0.1"),
            mllp_port=int(_number(env, "HIE_MLLP_PORT", str(MLLP_PORT), whole=True)),
            metrics_listen=env.get("HIE_METRICS_LISTEN") or None,
            metrics_sample_seconds=_number(env, "HIE_METRICS_SAMPLE_SECONDS", "15"),
            trace_sample_ratio=_ratio(env.get("HIE_TRACE_SAMPLE_RATIO", "")),
            console_idle_minutes=env.get("HIE_CONSOLE_IDLE_MINUTES", "").strip(),
            data_keys_inline=env.get("HIE_DATA_KEYS") or None,
            masking_policy_file=Path(env["HIE_MASKING_POLICY_FILE"]) if env.get("HIE_MASKING_POLICY_FILE") else None,
        )
        settings.check()
        return settings

    def check(self) -> None:
        """Production must name a real database and an HTTPS public URL."""
        if self.environment not in {"development", "production"}:
            raise UnsafeSettingsError("HIE_ENV must be development or production")
        if self.database_url and not self.database_url.startswith(("postgresql+asyncpg://", "sqlite+aiosqlite://")):
            raise UnsafeSettingsError("HIE_DATABASE_URL must be postgresql+asyncpg://… (or sqlite+aiosqlite:///…)")
        if self.crypto_suite not in {"aes", "sm"}:
            raise UnsafeSettingsError("HIE_CRYPTO_SUITE must be aes or sm")
        if self.https_termination not in {"gateway", "ingress"}:
            raise UnsafeSettingsError("HIE_HTTPS_TERMINATION must be gateway or ingress")
        if not 0 <= self.mllp_port < 65536:
            raise UnsafeSettingsError("HIE_MLLP_PORT must be a TCP port (0-65535)")
        if self.metrics_sample_seconds <= 0:
            raise UnsafeSettingsError("HIE_METRICS_SAMPLE_SECONDS must be positive")
        if self.db_pool_size < 1:
            raise UnsafeSettingsError("HIE_DB_POOL_SIZE must be at least 1")
        if bool(self.https_cert_file) != bool(self.https_key_file):
            raise UnsafeSettingsError("HIE_HTTPS_CERT and HIE_HTTPS_KEY go together")
        if self.environment == "production":
            if not self.database_url or self.database_url.startswith("sqlite"):
                raise UnsafeSettingsError("production needs HIE_DATABASE_URL pointing at PostgreSQL")
            if not self.public_url.startswith("https://"):
                raise UnsafeSettingsError("production needs an https:// HIE_PUBLIC_URL")
            if self.grpc_tls is None:
                raise UnsafeSettingsError("production needs TLS between services (HIE_GRPC_TLS_*)")
            if self.https_termination == "gateway" and self.https_cert_file is None:
                raise UnsafeSettingsError(
                    "production needs HTTPS: HIE_HTTPS_CERT / HIE_HTTPS_KEY, or HIE_HTTPS_TERMINATION=ingress"
                )

    def protection_environ(self) -> dict[str, str]:
        """HIE_DATA_KEYS and HIE_MASKING_POLICY_FILE as given, for the data-protection loaders."""
        given = {"HIE_DATA_KEYS": self.data_keys_inline, "HIE_MASKING_POLICY_FILE": self.masking_policy_file}
        return {name: str(value) for name, value in given.items() if value}

    def database_url_for(self, component: str) -> str:
        """The database URL a component uses: its own SQLite file by default."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / f'{component}.db').resolve()}"

    def schema_for(self, component: str) -> str:
        return f"{self.schema_prefix}{component}"

    def listen_for(self, component: str) -> str:
        if self.listen:
            return self.listen
        port = GATEWAY_PORT if component == "gateway" else SERVICE_PORTS[component]
        return f"127.0.0.1:{port}"


@dataclass(frozen=True)
class ComponentSetting:
    """A setting only some components read, beyond the common `Settings`: registered here so that
    every HIE_* variable is read in this module and named in the README's configuration table
    (tests/unit/test_settings_documented.py)."""

    name: str
    components: tuple[str, ...]
    # The value when the variable is unset (None: the component's own default applies).
    default: str | None = None
    # How the value is typed when a component asks for it with `ComponentSettings.value`.
    parse: Callable[[str], Any] = str


COMPONENT_SETTINGS: tuple[ComponentSetting, ...] = (
    # mpi (services/mpi/README.md)
    ComponentSetting("HIE_MPI_MATCH_PARAMETERS", ("mpi",)),
    ComponentSetting("HIE_MPI_REVIEW_CLAIM_SECONDS", ("mpi",)),
    # NATS JetStream: the mpi's link changes and the registry's notifications.
    ComponentSetting("HIE_NATS_URL", ("mpi", "registry")),
    # registry: notification delivery (services/registry/README.md)
    ComponentSetting("HIE_NOTIFY_RETRY_BASE_SECONDS", ("registry",), "5", float),
    ComponentSetting("HIE_NOTIFY_MAX_BACKOFF_SECONDS", ("registry",), "300", float),
    ComponentSetting("HIE_NOTIFY_DEAD_LETTER_AFTER_SECONDS", ("registry",), str(24 * 3600), float),
    ComponentSetting("HIE_NOTIFY_TIMEOUT_SECONDS", ("registry",), "10", float),
    ComponentSetting("HIE_NOTIFY_ENDPOINT_ALLOWLIST", ("registry",)),
    # registry: lifetime of cached mpi cross-references, 0 = off (services/registry/README.md)
    ComponentSetting("HIE_REGISTRY_XREF_CACHE_SECONDS", ("registry",), "30", float),
    # registry: the longest it keeps a consent decision, 0 = off; consent pushes invalidations
    # only when it is on (services/registry/README.md)
    ComponentSetting("HIE_REGISTRY_CONSENT_CACHE_SECONDS", ("registry", "consent"), "10", float),
    # mpi and consent: every registry replica's address, for the cache invalidations each replica
    # must receive: a name resolving to each (a k8s headless Service) or a comma-separated list;
    # unset = HIE_REGISTRY_TARGET (one replica) (services/registry/README.md)
    ComponentSetting(
        "HIE_REGISTRY_REPLICAS", ("mpi", "consent"), "", lambda text: addresses(text, "HIE_REGISTRY_REPLICAS")
    ),
    ComponentSetting("HIE_NOTIFY_ENDPOINT_ALLOWLIST_FILE", ("registry",)),
    ComponentSetting("HIE_NOTIFY_PRIVATE_NETWORKS", ("registry",)),
    ComponentSetting("HIE_NOTIFY_ALLOW_LOOPBACK", ("registry",)),
    # consent: the region's policy (services/consent/README.md)
    ComponentSetting("HIE_CONSENT_POLICY_FILE", ("consent",)),
    ComponentSetting("HIE_CONSENT_REGION_MODE", ("consent",)),
    ComponentSetting("HIE_CONSENT_BREAK_GLASS_SECONDS", ("consent",)),
    ComponentSetting("HIE_CONSENT_GRANT_GRACE_SECONDS", ("consent",)),
    ComponentSetting("HIE_CONSENT_NEVER_OVERRIDABLE", ("consent",)),
    # referral and teleconsult: deadline clocks (services/*/README.md)
    ComponentSetting("HIE_REFERRAL_DEADLINES", ("referral",), ""),
    ComponentSetting("HIE_REFERRAL_DEADLINE_SCAN_SECONDS", ("referral",), "15", float),
    ComponentSetting("HIE_TELECONSULT_DEADLINES", ("teleconsult",), ""),
    ComponentSetting("HIE_TELECONSULT_DEADLINE_SCAN_SECONDS", ("teleconsult",), "15", float),
    ComponentSetting("HIE_TELECONSULT_MIN_PRACTICE_YEARS", ("teleconsult",), "3", int),
    ComponentSetting("HIE_TELECONSULT_JOIN_URL", ("teleconsult",), ""),
)


@dataclass(frozen=True)
class ComponentSettings:
    """The registered settings of one component, read from the environment when it starts."""

    component: str
    # The variables that are set, as given.
    given: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, component: str, environ: Mapping[str, str] | None = None) -> ComponentSettings:
        """Read `component`'s registered settings (only those) from the environment."""
        env = os.environ if environ is None else environ
        names = [s.name for s in COMPONENT_SETTINGS if component in s.components]
        return cls(component, {name: env[name] for name in names if name in env})

    def _registered(self, name: str) -> ComponentSetting:
        for setting in COMPONENT_SETTINGS:
            if setting.name == name and self.component in setting.components:
                return setting
        raise KeyError(f"{name} is not a registered setting of {self.component} (services/shared/config.py)")

    def get(self, name: str) -> str | None:
        """The value as given, else the registered default (None: the component's own default)."""
        return self.given.get(name, self._registered(name).default)

    def value(self, name: str) -> Any:
        """The value typed by the setting's registered parser (None when unset without a default)."""
        raw = self.get(name)
        return None if raw is None else self._registered(name).parse(raw)

    def environ(self) -> dict[str, str]:
        """The given variables, for parsers that read an environment-like mapping."""
        return dict(self.given)


def settings_or_exit(process: str) -> Settings:
    """A process's settings from the environment; one a process cannot run with is one line on
    stderr and exit 2 (`python -m services.<name>`, `python -m gateway`), not a traceback."""
    try:
        return Settings.from_env()
    except UnsafeSettingsError as exc:
        sys.stderr.write(f"{process}: {exc}\n")
        raise SystemExit(2) from None


def _number(env: Mapping[str, str], name: str, default: str, *, whole: bool = False) -> float:
    """A numeric setting; an unset or empty variable is the default, anything else not a number is
    refused naming the variable (not Python's "invalid literal for int()")."""
    text = env.get(name) or default
    try:
        return int(text) if whole else float(text)
    except ValueError:
        raise UnsafeSettingsError(f"{name} must be {'a whole number' if whole else 'a number'}") from None


def addresses(text: str, name: str) -> list[tuple[str, int]]:
    """("host", port) of each "host:port" / "[v6]:port" in a comma-separated list; anything else is
    refused naming the variable (at start, not at the first call that uses it)."""
    found = []
    for address in (a.strip() for a in text.split(",")):
        if not address:
            continue
        host, sep, port = address.rpartition(":")
        if not sep or not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
            raise UnsafeSettingsError(f"{name} must be host:port addresses separated by commas")
        found.append((host.strip("[]"), int(port)))
    return found


def _ratio(text: str) -> float | None:
    """HIE_TRACE_SAMPLE_RATIO: a number from 0 to 1, or unset (every trace)."""
    if not text.strip():
        return None
    try:
        value = float(text)
    except ValueError:
        raise UnsafeSettingsError("HIE_TRACE_SAMPLE_RATIO must be a number from 0 to 1") from None
    if not 0.0 <= value <= 1.0:
        raise UnsafeSettingsError("HIE_TRACE_SAMPLE_RATIO must be a number from 0 to 1")
    return value
