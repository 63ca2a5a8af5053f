"""`hie`: run the exchange, register member organisations, run the demo, check the audit chain."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import click
import grpc
import httpx
import typer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from typer.core import TyperOption

from services.consent.bench import bench_consent
from services.ops import bench_load, cli_mpi, cli_users
from services.ops import status as ops_status
from services.ops.cli_mpi import MLLP_PORT
from services.ops.cli_registry import bench_registry
from services.ops.supervisor import GaveUp, PortUse, Supervisor, describe_exit, duplicate_ports, taken_ports
from services.shared.components import DATABASE_COMPONENTS, SERVICE_BASE_PORT, SERVICES, by_port
from services.shared.components import component as service_component
from services.shared.config import GATEWAY_PORT, SERVICE_PORTS, Settings, UnsafeSettingsError
from services.shared.errors import DomainError
from services.shared.keys import ensure_exchange_keys, rotate_gateway_key
from services.shared.timestamps import to_timestamp
from services.shared.transport import GrpcTls


def _flag_type(self: TyperOption, ctx: click.Context) -> str | None:
    """Flags take no value: typer 0.29 shows `<bool>` after them (`--help <bool>`); show nothing."""
    return None if self.is_flag else _typer_option_type(self, ctx)


_typer_option_type = TyperOption.display_type_rich
TyperOption.display_type_rich = _flag_type  # type: ignore[method-assign]

app = typer.Typer(
    rich_markup_mode="markdown",
    help="Regional health information exchange.",
    no_args_is_help=True,
    add_completion=False,
)
org_app = typer.Typer(
    rich_markup_mode="markdown", help="Member organisations and their OAuth2 clients.", no_args_is_help=True
)
keys_app = typer.Typer(rich_markup_mode="markdown", help="The exchange's own signing keys.", no_args_is_help=True)
audit_app = typer.Typer(rich_markup_mode="markdown", help="The exchange audit log.", no_args_is_help=True)
app.add_typer(org_app, name="org")
app.add_typer(keys_app, name="keys")
db_app = typer.Typer(rich_markup_mode="markdown", help="Database schemas and migrations.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
app.add_typer(db_app, name="db")
app.add_typer(cli_mpi.app, name="mpi")
app.add_typer(cli_users.app, name="user")
COMPONENTS = DATABASE_COMPONENTS

DataDir = Annotated[Path, typer.Option(envvar="HIE_DATA_DIR", help="Keys and SQLite databases live here.")]
DatabaseUrl = Annotated[
    str,
    typer.Option(envvar="HIE_DATABASE_URL", help="postgresql+asyncpg://… (default: SQLite files in the data dir)"),
]
_STATE_FILE = "up.json"
# Exit codes: 1 a check failed (chain broken, demo failed, nothing served), 2 bad usage or input,
# 3 the exchange cannot be reached or has no data here, 4 a port is taken, 5 a crash loop stopped `hie up`.
_EXIT_FAILED = 1
_EXIT_USAGE = 2
_EXIT_UNREACHABLE = 3
_EXIT_PORT_TAKEN = 4
_EXIT_GAVE_UP = 5


def _settings(data_dir: Path, database_url: str = "") -> Settings:
    env = dict(os.environ)
    env["HIE_DATA_DIR"] = str(data_dir)
    if database_url:
        env["HIE_DATABASE_URL"] = database_url
    return Settings.from_env(env)


@keys_app.command("init")
def keys_init(directory: Annotated[Path, typer.Option("--dir")] = Path(".hie/keys")) -> None:
    """Create the gateway's and the platform's signing keys, the web console's key, the trusted JWKS
    and the data-protection key file, and under HIE_CRYPTO_SUITE=sm the platform's SM2 key (each
    kept if present)."""
    from gateway.console.assertions import CONSOLE_KEY_FILE, AssertionSigner
    from services.shared.protection.keyring import load_or_create

    for name, path in ensure_exchange_keys(directory).items():
        typer.echo(f"{name}: {path}")
    # The web console's user-assertion key, beside gateway.pem where the gateway looks for it (a
    # deployment mounts this folder read only, so the gateway cannot create it there itself).
    AssertionSigner(directory / CONSOLE_KEY_FILE)
    typer.echo(f"console: {directory / CONSOLE_KEY_FILE}")
    settings = Settings.from_env(dict(os.environ))
    data_keys = directory / "data-keys.json"
    keyring = load_or_create(data_keys, environ=settings.protection_environ(), suite=settings.crypto_suite)
    typer.echo(f"data-keys: {data_keys} (active {keyring.active.id}, {keyring.active.suite.cipher})")
    if settings.crypto_suite == "sm":
        from services.shared.protection.sm2 import load_or_create_signing_key

        # One SM2 key for the platform: it co-signs audit checkpoints and notifications.
        sm2 = load_or_create_signing_key(directory / "platform-sm2.json")
        typer.echo(f"platform-sm2: {directory / 'platform-sm2.json'} (public {sm2.public.hex()[:16]}…)")


@keys_app.command("rotate")
def keys_rotate(
    data_dir: DataDir = Path(".hie"),
    directory: Annotated[
        Path | None,
        typer.Option("--dir", help="The exchange's key folder [default: DATA_DIR/keys]", show_default=False),
    ] = None,
    gateway_url: Annotated[
        str, typer.Option(help="Check the new key is served here [default: the running `hie up`]")
    ] = "",
) -> None:
    """Sign new access tokens with a fresh gateway key; the old public key stays trusted for
    ten minutes (twice the token lifetime). Run `hie keys init` later to prune retired keys."""
    folder = directory if directory is not None else data_dir / "keys"
    missing = [name for name in ("gateway.pem", "platform.pem", "trusted.jwks.json") if not (folder / name).is_file()]
    if missing:
        typer.echo(
            f"{folder} is not an exchange's key folder (no {', '.join(missing)}): nothing rotated."
            " Pass the data dir of the exchange (--data-dir, HIE_DATA_DIR) or its key folder (--dir)",
            err=True,
        )
        raise typer.Exit(_EXIT_UNREACHABLE)
    old, new = rotate_gateway_key(folder)
    typer.echo(f"gateway key rotated in {folder.resolve()}: {old} -> {new}")
    url = gateway_url or _running_state(folder.parent).get("gateway_url", "")
    if not url:
        typer.echo("no running exchange uses this folder: the gateway signs with the new key when it starts")
        return
    # The gateway re-reads its key file when it changes; its JWKS lists what it verifies with.
    deadline = time.monotonic() + 10
    served: list[str] = []
    while time.monotonic() < deadline:
        try:
            served = [k.get("kid", "") for k in httpx.get(f"{url}/.well-known/jwks.json", timeout=2).json()["keys"]]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            served = []
        if new in served:
            typer.echo(f"the gateway at {url} serves the new key {new} (and the old one for ten minutes)")
            return
        time.sleep(0.5)
    typer.echo(
        f"the gateway at {url} does not serve the new key {new} (it serves {', '.join(served) or 'nothing'}):"
        " is it running from another data dir?",
        err=True,
    )
    raise typer.Exit(_EXIT_FAILED)


@keys_app.command("rotate-data")
def keys_rotate_data(
    data_dir: DataDir = Path(".hie"),
    database_url: DatabaseUrl = "",
    suite: Annotated[str, typer.Option(help="aes | sm; default: the current key's suite")] = "",
    resume: Annotated[bool, typer.Option(help="Continue an interrupted rotation without a new key")] = False,
) -> None:
    """Rotate the data-protection key online: new active key, then re-encrypt every protected field
    and re-wrap every document key, batch by batch, while the exchange keeps serving."""
    from services.ops.data_keys import rotate_data_keys

    _require_exchange(data_dir, database_url, "mpi")
    report = asyncio.run(
        rotate_data_keys(_settings(data_dir, database_url), suite=suite or None, resume=resume, echo=typer.echo)
    )
    unreadable = sum(len(p.unreadable) for _name, p in report.tables)
    typer.echo(f"data key {report.old_key} -> {report.new_key}; unreadable values: {unreadable}")
    if unreadable:
        raise typer.Exit(1)


@keys_app.command("retire-data")
def keys_retire_data(data_dir: DataDir = Path(".hie"), database_url: DatabaseUrl = "") -> None:
    """Drop old data keys that no stored value uses any more."""
    from services.ops.data_keys import retire_data_keys

    _require_exchange(data_dir, database_url, "mpi")
    retired = asyncio.run(retire_data_keys(_settings(data_dir, database_url)))
    typer.echo(f"retired: {', '.join(retired) if retired else 'none (every old key is still in use)'}")


def _read_public_keys(path: Path) -> dict[str, Any]:
    """A JWKS file, a single JWK, or a PEM public key / certificate, as a JWKS."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from services.shared.keys import jwks as jwks_of

    how = "make a key pair and its JWKS with `hie org keygen --id ORG` and pass the .jwks.json file"
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}", _EXIT_USAGE)
    if text.startswith("-----BEGIN"):
        if "PRIVATE KEY" in text.split("\n", 1)[0]:
            _fail(f"{path} holds a private key: register the public key only ({how})", _EXIT_USAGE)
        try:
            if "CERTIFICATE" in text.split("\n", 1)[0]:
                public = x509.load_pem_x509_certificate(text.encode()).public_key()
            else:
                public = serialization.load_pem_public_key(text.encode())
            return jwks_of(public)  # type: ignore[arg-type]
        except (ValueError, TypeError, KeyError):
            _fail(f"{path} is not an EC (P-256 / P-384) or RSA public key in PEM; {how}", _EXIT_USAGE)
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        _fail(f"{path} is neither a JWKS (JSON with a keys array) nor a PEM public key; {how}", _EXIT_USAGE)
    if isinstance(document, dict) and "kty" in document:
        document = {"keys": [document]}
    return document  # type: ignore[no-any-return]


def _fail(message: str, code: int) -> NoReturn:
    """One line on stderr and a distinct exit code, never a traceback."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _require_exchange(data_dir: Path, database_url: str, component: str) -> None:
    """Read-only and maintenance commands never create an exchange where there is none."""
    if database_url or (data_dir / f"{component}.db").exists():
        return
    _fail(
        f"no exchange data in {data_dir.resolve()} (no {component}.db): run it from the exchange's folder"
        " or pass --data-dir / HIE_DATA_DIR (or --database-url)",
        _EXIT_UNREACHABLE,
    )


@org_app.command("add")
def org_add(
    id: Annotated[str, typer.Option("--id", help="Organisation id, e.g. the institution code")],
    name: Annotated[str, typer.Option("--name")],
    type: Annotated[str, typer.Option("--type", help="hospital | authority | platform-admin")],
    jwks_file: Annotated[
        Path, typer.Option("--jwks", help="Its public key(s): a JWKS file or a PEM public key (`hie org keygen`)")
    ],
    data_dir: DataDir = Path(".hie"),
    database_url: DatabaseUrl = "",
    tier: Annotated[str, typer.Option("--tier", help="hospitals: community | secondary | tertiary")] = "",
) -> None:
    """Register a member institution and its public key(s); prints its OAuth2 client id."""
    from gateway.organizations import register_organization

    jwks = _read_public_keys(jwks_file)
    org = _org_call(
        register_organization(_settings(data_dir, database_url), org_id=id, name=name, type=type, jwks=jwks, tier=tier)
    )
    typer.echo(org.client_id)  # type: ignore[attr-defined]


@org_app.command("keygen")
def org_keygen(
    id: Annotated[str, typer.Option("--id", help="The organisation the key is for (names the files)")],
    out: Annotated[Path, typer.Option(help="Folder for ID.key.pem and ID.jwks.json")] = Path("."),
    rsa: Annotated[bool, typer.Option("--rsa", help="RSA 3072 (RS384) instead of EC P-384 (ES384)")] = False,
) -> None:
    """Make a hospital's key pair: the private key (PEM, mode 0600, never printed) stays at the
    hospital and signs its token assertions; the public JWKS goes to `hie org add --jwks`."""
    from cryptography.hazmat.primitives.asymmetric import rsa as rsa_keys

    from services.shared.keys import generate_ec_key, public_jwk, write_private_key

    if not id or any(c in id for c in "/\\") or id.startswith("."):
        _fail("--id must be a plain organisation id (no slashes)", _EXIT_USAGE)
    private_file, jwks_file = out / f"{id}.key.pem", out / f"{id}.jwks.json"
    for existing in (private_file, jwks_file):
        if existing.exists():
            _fail(f"{existing} exists: keep it, or move it away to make a new pair", _EXIT_USAGE)
    key = rsa_keys.generate_private_key(public_exponent=65537, key_size=3072) if rsa else generate_ec_key()
    write_private_key(private_file, key)
    jwk = public_jwk(key)
    jwks_file.write_text(json.dumps({"keys": [jwk]}, indent=2) + "\n", encoding="utf-8")
    typer.echo(f"private key: {private_file} (mode 0600; keep it at the hospital, never send it)")
    typer.echo(f"public JWKS: {jwks_file} (kid {jwk['kid']}, {jwk['alg']})")
    typer.echo(f"register it: hie org add --id {id} --name NAME --type hospital --jwks {jwks_file}")


@org_app.command("tier")
def org_tier(
    id: Annotated[str, typer.Option("--id")],
    tier: Annotated[str, typer.Option("--tier", help="community | secondary | tertiary, or '' to clear")],
    data_dir: DataDir = Path(".hie"),
    database_url: DatabaseUrl = "",
) -> None:
    """Set a hospital's tier in the medical alliance (referral directions follow from it)."""
    from gateway.organizations import set_tier

    _org_call(set_tier(_settings(data_dir, database_url), org_id=id, tier=tier))
    typer.echo(f"{id}: tier {tier or '(none)'}")


keys_of_org = typer.Typer(
    rich_markup_mode="markdown", help="An organisation's registered public keys (rotation).", no_args_is_help=True
)
org_app.add_typer(keys_of_org, name="keys")


def _org_call(coro: object) -> object:
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except DomainError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(_EXIT_USAGE) from None


@keys_of_org.command("add")
def org_keys_add(
    id: Annotated[str, typer.Option("--id")],
    jwks_file: Annotated[Path, typer.Option("--jwks", help="A JWKS file or a PEM public key")],
    data_dir: DataDir = Path(".hie"),
    database_url: DatabaseUrl = "",
) -> None:
    """Add public key(s) to an organisation; prints the kids now registered."""
    from gateway.organizations import add_keys

    _require_exchange(data_dir, database_url, "gateway")
    jwks = _read_public_keys(jwks_file)
    kids = _org_call(add_keys(_settings(data_dir, database_url), org_id=id, jwks=jwks))
    typer.echo("\n".join(kids))  # type: ignore[arg-type]


@keys_of_org.command("remove")
def org_keys_remove(
    id: Annotated[str, typer.Option("--id")],
    kid: Annotated[str, typer.Option("--kid")],
    data_dir: DataDir = Path(".hie"),
    database_url: DatabaseUrl = "",
) -> None:
    """Remove a key: no new token or assertion with it at once; issued tokens end within five minutes."""
    from gateway.organizations import remove_key

    _require_exchange(data_dir, database_url, "gateway")
    kids = _org_call(remove_key(_settings(data_dir, database_url), org_id=id, kid=kid))
    typer.echo("\n".join(kids))  # type: ignore[arg-type]


@org_app.command("revoke")
def org_revoke(
    id: Annotated[str, typer.Option("--id")],
    data_dir: DataDir = Path(".hie"),
    database_url: DatabaseUrl = "",
    reinstate: Annotated[bool, typer.Option(help="Make a revoked organisation active again")] = False,
) -> None:
    """Revoke an organisation: no new tokens at once; issued tokens refused by the gateway within seconds."""
    from gateway.organizations import set_status

    _require_exchange(data_dir, database_url, "gateway")
    _org_call(set_status(_settings(data_dir, database_url), org_id=id, status="active" if reinstate else "revoked"))
    typer.echo(f"{id}: {'active' if reinstate else 'revoked'}")


@org_app.command("list")
def org_list(data_dir: DataDir = Path(".hie"), database_url: DatabaseUrl = "") -> None:
    """List member organisations with their client ids."""
    from gateway.organizations import list_organizations

    _require_exchange(data_dir, database_url, "gateway")
    orgs = asyncio.run(list_organizations(_settings(data_dir, database_url)))
    if not orgs:
        typer.echo(f"no organisations registered in {data_dir.resolve()} yet (`hie org add`)", err=True)
        return
    rows = [("ID", "TYPE", "STATUS", "CLIENT ID", "NAME")]
    rows += [(org.id, org.type, org.status, org.client_id, org.name) for org in orgs]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)) + "  " + row[4])


def _channel(target: str) -> grpc.Channel:
    tls = GrpcTls.from_env()
    return grpc.secure_channel(target, tls.channel_credentials()) if tls else grpc.insecure_channel(target)


def _wait_for_service(target: str, deadline: float, tick: Callable[[], None]) -> None:
    with _channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            tick()
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(target)
            time.sleep(0.2)


def _gateway_ready(url: str) -> bool:
    """Readiness is the gateway answering /readyz with 200, never a file on disk."""
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _wait_for_gateway(url: str, deadline: float, tick: Callable[[], None] = lambda: None) -> None:
    while not _gateway_ready(url):
        tick()
        if time.monotonic() > deadline:
            raise TimeoutError(url)
        time.sleep(0.2)


def _running_state(data_dir: Path) -> dict[str, Any]:
    """The `hie up` state file of the data dir if the process that wrote it is still alive."""
    state_file = data_dir / _STATE_FILE
    try:
        state = json.loads(state_file.read_text())
        pid = int(state["pid"])
        os.kill(pid, 0)
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    # A file left by a `hie up` killed with -9 may name a pid the system has since reused.
    try:
        if b"up" not in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
            return {}
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return {}  # the process ended meanwhile (without /proc the pid check is all there is)
    except OSError:
        return {}
    return state


@app.command()
def up(
    data_dir: DataDir = Path(".hie"),
    database_url: DatabaseUrl = "",
    gateway_port: Annotated[int, typer.Option(envvar="HIE_GATEWAY_PORT", help="Gateway HTTP port")] = GATEWAY_PORT,
    service_base_port: Annotated[
        int,
        typer.Option(
            envvar="HIE_SERVICE_BASE_PORT",
            help=f"First of {len(SERVICES)} consecutive gRPC ports ({', '.join(c.name for c in by_port())})",
        ),
    ] = SERVICE_BASE_PORT,
    mllp_port: Annotated[
        int | None,
        typer.Option(
            envvar="HIE_MLLP_PORT",
            help=f"HL7 v2 MLLP listener port; 0 turns it off [default: {MLLP_PORT}, or the service base port + 20"
            " when that is moved]",
            show_default=False,
        ),
    ] = None,
    exporter: Annotated[str, typer.Option(envvar="HIE_OTEL_EXPORTER", help="none | console | otlp")] = "none",
    metrics_base_port: Annotated[
        int | None,
        typer.Option(
            envvar="HIE_METRICS_BASE_PORT",
            help=f"Prometheus /metrics: gateway on this port, services on the next {len(SERVICES)}; 0 turns them off"
            " [default: 9400, or the service base port + 40 when that is moved]",
            show_default=False,
        ),
    ] = None,
    # The quick start runs the demo itself; a plain `hie up` tells the operator how to.
    hint: Annotated[str, typer.Option(hidden=True, help="What the banner tells the operator to do next")] = (
        "run `hie demo` in another terminal"
    ),
) -> None:
    """Start the services, the gateway and the MLLP listener as separate processes on loopback,
    restart any that crashes (with backoff), and stop them all on Ctrl-C."""
    data_dir = data_dir.resolve()
    try:
        # Every process reads these settings: a wrong one is said once here, not by each crashing child.
        _settings(data_dir, database_url)
    except (UnsafeSettingsError, ValueError) as exc:
        _fail(str(exc), _EXIT_USAGE)
    running = _running_state(data_dir)
    if running:
        typer.echo(
            f"an exchange already runs from {data_dir} (hie up pid {running['pid']}, {running.get('gateway_url')});"
            " stop it first or use another --data-dir",
            err=True,
        )
        raise typer.Exit(_EXIT_PORT_TAKEN)
    if mllp_port is None:
        mllp_port = cli_mpi.default_mllp_port(service_base_port)
    targets = {c.name: f"127.0.0.1:{service_base_port + c.port_offset}" for c in by_port()}
    uses = [PortUse(gateway_port, "gateway", "--gateway-port / HIE_GATEWAY_PORT")]
    uses += [
        PortUse(service_base_port + c.port_offset, c.name, "--service-base-port / HIE_SERVICE_BASE_PORT")
        for c in by_port()
    ]
    if mllp_port:
        uses.append(PortUse(mllp_port, "mllp", "--mllp-port / HIE_MLLP_PORT"))
    if metrics_base_port is None:
        metrics_base_port = ops_status.default_metrics_base_port(service_base_port)
    metrics_ports = ops_status.metrics_ports(metrics_base_port) if metrics_base_port else {}
    uses += [
        PortUse(p, f"{n} metrics", "--metrics-base-port / HIE_METRICS_BASE_PORT") for n, p in metrics_ports.items()
    ]
    if not all(0 < use.port < 65536 for use in uses):
        typer.echo(f"ports must be between 1 and 65535 ({len(SERVICES)} gRPC ports from --service-base-port)", err=True)
        raise typer.Exit(2)
    for first, second in duplicate_ports(uses):
        typer.echo(f"port {first.port} is given to both {first.component} and {second.component}", err=True)
        raise typer.Exit(2)
    taken = taken_ports(uses)
    for use in taken:
        typer.echo(f"port {use.port} ({use.component}) is already in use: move it with {use.option}", err=True)
    if taken:
        raise typer.Exit(_EXIT_PORT_TAKEN)

    try:
        keys = ensure_exchange_keys(data_dir / "keys")
    except OSError as exc:
        _fail(f"cannot use the data dir {data_dir}: {exc.strerror or exc} (--data-dir / HIE_DATA_DIR)", _EXIT_USAGE)
    gateway_url = f"http://127.0.0.1:{gateway_port}"
    env = {
        **os.environ,
        "HIE_DATA_DIR": str(data_dir),
        "HIE_TRUSTED_JWKS_FILE": str(keys["trusted"]),
        "HIE_GATEWAY_SIGNING_KEY_FILE": str(keys["gateway"]),
        "HIE_SERVICE_SIGNING_KEY_FILE": str(keys["platform"]),
        "HIE_PUBLIC_URL": gateway_url,
        "HIE_OTEL_EXPORTER": exporter,
        **{f"HIE_{name.upper()}_TARGET": target for name, target in targets.items()},
    }
    if database_url:
        env["HIE_DATABASE_URL"] = database_url
    supervisor = Supervisor(log=lambda message: typer.echo(f"{_now()} {message}", err=True))
    stopping = False

    def interrupt(*_: object) -> None:
        nonlocal stopping
        # Only the first signal interrupts: a second one (Ctrl-C, then the quick start's trap
        # sending SIGTERM) must not cut the shutdown short and leave processes or files behind.
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    # SIGTERM stops as Ctrl-C does; SIGINT is set explicitly as a background job starts with it ignored.
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    try:
        # In the component list's order: audit first, as every other service relays its audit events there.
        for name in (c.name for c in SERVICES):
            listen = {"HIE_LISTEN": targets[name], **ops_status.metrics_env(metrics_ports, name)}
            supervisor.start(name, [sys.executable, "-m", f"services.{name}"], {**env, **listen})
        deadline = time.monotonic() + 90
        for child in list(supervisor.children):
            _wait_for_service(targets[child.name], deadline, supervisor.check)
            typer.echo(f"{child.name:<12} serving on {targets[child.name]} (pid {child.process.pid})")  # type: ignore[union-attr]
        gateway = supervisor.start(
            "gateway",
            [sys.executable, "-m", "gateway"],
            {**env, "HIE_LISTEN": f"127.0.0.1:{gateway_port}", **ops_status.metrics_env(metrics_ports, "gateway")},
        )
        _wait_for_gateway(gateway_url, deadline, supervisor.check)
        typer.echo(f"gateway      {gateway_url} (pid {gateway.process.pid})")  # type: ignore[union-attr]
        if mllp_port:
            supervisor.start("mllp", cli_mpi.listener_command(mllp_port), env)
        # For `hie demo` / `hie keys rotate` to find the gateway URL; never a readiness signal.
        (data_dir / _STATE_FILE).write_text(
            json.dumps(
                {
                    "gateway_url": gateway_url,
                    "database_url": database_url,
                    "audit_target": targets["audit"],
                    "metrics": ops_status.metrics_endpoints(metrics_ports),
                    "pid": os.getpid(),
                }
            )
        )
        if metrics_ports:
            ports = ", ".join(f"{name} :{port}" for name, port in metrics_ports.items())
            typer.echo(f"metrics      http://127.0.0.1:<port>/metrics for {ports} (`hie status` reads them)")
        typer.echo(f"exchange up: {gateway_url}   ({hint}; Ctrl-C stops)")
        while True:
            supervisor.check()
            time.sleep(0.2)
    except GaveUp as exc:
        typer.echo(
            f"{exc.name} crashed {exc.crashes} times within {exc.window:.0f} s (last: {describe_exit(exc.returncode)});"
            " stopping the exchange: see its messages above",
            err=True,
        )
        raise typer.Exit(_EXIT_GAVE_UP) from None
    except TimeoutError as exc:
        typer.echo(f"did not become healthy in time: {exc}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        stopping = True
        typer.echo("stopping…")
    finally:
        stopping = True
        supervisor.stop_all()
        (data_dir / _STATE_FILE).unlink(missing_ok=True)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%H:%M:%S")


@app.command()
def status(
    data_dir: DataDir = Path(".hie"),
    gateway_url: Annotated[str, typer.Option(help="Default: the running `hie up` of the data dir")] = "",
    wait: Annotated[float, typer.Option(help="Seconds to wait for the gateway to answer ready")] = 0.0,
    metrics: Annotated[
        list[str] | None, typer.Option(help="name=url of a metrics endpoint (default: those `hie up` recorded)")
    ] = None,
) -> None:
    """Is the exchange ready (exit 0, 3 when not)? Then each component's health, version, outbox
    backlog and the alerts firing, from the components' metrics endpoints."""
    try:
        named_endpoints = ops_status.parse_endpoints(metrics) if metrics else None
    except ValueError as exc:
        _fail(str(exc), _EXIT_USAGE)
    url, ready = ops_status.wait_until_ready(
        lambda: gateway_url or _running_state(data_dir).get("gateway_url", ""), wait
    )
    if not ready:
        typer.echo(f"exchange not ready: {url or f'no running `hie up` for {data_dir.resolve()}'}", err=True)
        raise typer.Exit(_EXIT_UNREACHABLE)
    typer.echo(f"exchange ready: {url}")
    endpoints = named_endpoints if named_endpoints is not None else _running_state(data_dir).get("metrics", {})
    ops_status.report(url, endpoints, typer.echo)


@app.command()
def demo(
    data_dir: DataDir = Path(".hie"),
    gateway_url: Annotated[str, typer.Option(help="Default: the running `hie up`")] = "",
    database_url: DatabaseUrl = "",
) -> None:
    """Run one real exchange between two hospitals against a running `hie up` (the demo's three
    organisations are registered on the first run and reused after)."""
    from services.ops.demo import DemoFailed, run_demo

    state = _running_state(data_dir)
    url = gateway_url or state.get("gateway_url")
    if not url:
        typer.echo(
            f"no running exchange for {data_dir.resolve()}: start one with `hie up` (or pass --gateway-url)", err=True
        )
        raise typer.Exit(_EXIT_UNREACHABLE)
    if not _gateway_ready(url):
        typer.echo(f"the exchange at {url} does not answer ready (`hie status --wait 60`)", err=True)
        raise typer.Exit(_EXIT_UNREACHABLE)
    try:
        asyncio.run(run_demo(_settings(data_dir, database_url or state.get("database_url", "")), url))
    except (DemoFailed, httpx.HTTPError, DomainError) as exc:
        typer.echo(f"demo failed: {exc}", err=True)
        raise typer.Exit(_EXIT_FAILED) from None


bench_app = typer.Typer(rich_markup_mode="markdown", help="Benchmarks (commands, not tests).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
bench_app.command("consent")(bench_consent)


@bench_app.command("protection")
def bench_protection_command(
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the figures here")] = None,
) -> None:
    """Per-value cost of field encryption, blind indexes and content sealing (AES and SM suites)."""
    from services.shared.protection.bench import bench_protection

    bench_protection(json_path)


bench_app.command("registry")(bench_registry)
bench_app.command("mpi")(cli_mpi.bench_mpi)
# `hie bench load`: mixed traffic with the nothing-lost check (services/ops/bench_load.py).
bench_app.command("load")(bench_load.command)


@bench_app.command("exchange")
def bench_exchange(
    exchanges: Annotated[int, typer.Option(min=1, help="How many full exchanges to run")] = 200,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Data dir of the exchange to measure [default: a new one of its own, removed after]"),
    ] = None,
    gateway_url: Annotated[
        str, typer.Option(help="Measure this running exchange instead (its data dir: --data-dir)")
    ] = "",
    database_url: DatabaseUrl = "",
    output: Annotated[Path, typer.Option(help="JSON results")] = Path("bench-results/exchange.json"),
) -> None:
    """Latency of register / link / register document / find / retrieve through the gateway, sequentially.
    By default on an exchange of its own (a temporary data dir, own schemas with --database-url), so
    the synthetic hospitals and patients never land in a real index or audit log."""
    import shutil
    import subprocess
    import tempfile

    from services.ops.bench import run_exchange_bench, write_result

    own = not gateway_url and data_dir is None
    up: subprocess.Popen[bytes] | None = None
    if own:
        data_dir = Path(tempfile.mkdtemp(prefix="hie-bench-"))
        prefix = f"bench_{os.urandom(3).hex()}_"
        ports = _free_port_block()
        env = {
            **os.environ,
            "HIE_DATA_DIR": str(data_dir),
            "HIE_GATEWAY_PORT": str(ports),
            "HIE_SERVICE_BASE_PORT": str(ports + 1),
            "HIE_MLLP_PORT": "0",
            "HIE_DB_SCHEMA_PREFIX": prefix,
        }
        if database_url:
            env["HIE_DATABASE_URL"] = database_url
        where = (
            f"schemas {prefix}* in {database_url.split('@')[-1]} (kept after the run: drop them)"
            if database_url
            else f"SQLite in {data_dir} (removed after)"
        )
        typer.echo(f"benchmark exchange of its own: {where}; --gateway-url measures a running one")
        up = subprocess.Popen(
            [sys.executable, "-m", "services.ops.cli", "up"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        gateway_url = f"http://127.0.0.1:{ports}"
        try:
            _wait_for_gateway(gateway_url, time.monotonic() + 120)
        except TimeoutError:
            up.terminate()
            up.wait()
            _fail("the benchmark's own exchange did not start", _EXIT_FAILED)
        os.environ["HIE_DB_SCHEMA_PREFIX"] = prefix
    assert data_dir is not None
    state = _running_state(data_dir)
    url = gateway_url or state.get("gateway_url")
    if not url:
        typer.echo("no running exchange found: start one with `hie up` (or pass --gateway-url)", err=True)
        raise typer.Exit(_EXIT_UNREACHABLE)
    if not own:
        typer.echo(f"measuring the exchange at {url}: its bench-* hospitals and synthetic patients stay in {data_dir}")
    try:
        settings = _settings(data_dir, database_url or state.get("database_url", ""))
        result = asyncio.run(run_exchange_bench(settings, url, exchanges=exchanges))
    finally:
        if up is not None:
            up.terminate()
            up.wait(timeout=60)
            shutil.rmtree(data_dir, ignore_errors=True)
    write_result(result, output)
    typer.echo(f"{result['exchanges']} exchanges in {result['wall_seconds']} s ({result['exchanges_per_second']}/s)")
    typer.echo(f"{'operation':<20}{'n':>6}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for op, row in result["operations"].items():
        typer.echo(f"{op:<20}{row['n']:>6}{row['p50_ms']:>10}{row['p95_ms']:>10}{row['p99_ms']:>10}{row['max_ms']:>10}")
    typer.echo(f"written to {output}")


def _free_port_block() -> int:
    """A port P with P..P+len(SERVICES) free (the gateway, then the gRPC ports) for an exchange of one's own."""
    import random

    for _ in range(500):
        first = random.randint(20_000, 60_000)
        uses = [PortUse(port, "bench", "") for port in range(first, first + 1 + len(SERVICES))]
        if not taken_ports(uses):
            return first
    _fail(f"no block of {1 + len(SERVICES)} free ports found", _EXIT_PORT_TAKEN)


@bench_app.command("audit")
def bench_audit(
    records: Annotated[int, typer.Option(min=1, help="How many chained records to create and verify")] = 1_000_000,
    database_url: Annotated[
        str, typer.Option(help="postgresql+asyncpg://… (a bench_audit_* schema, dropped after); default: SQLite")
    ] = "",
    output: Annotated[Path, typer.Option(help="JSON results")] = Path("bench-results/audit.json"),
) -> None:
    """Fill a fresh audit database with N chained records, then time VerifyChain on it (intact, then tampered)."""
    from services.audit.bench import run
    from services.ops.bench import write_result

    result = run(records, database_url, log=lambda message: typer.echo(message, err=True))
    write_result(result, output)
    fill, intact, tampered = result["fill"], result["verify"], result["tampered"]
    typer.echo(f"audit chain bench: {result['records']} records on {result['backend']} ({result['database']})")
    typer.echo(f"{'run':<18}{'seconds':>10}{'records/s':>12}{'intact':>8}{'checked':>10}{'break at':>10}")
    typer.echo(f"{'fill':<18}{fill['seconds']:>10}{fill['records_per_second']:>12}{'':>8}{fill['records']:>10}{'':>10}")
    for name, row in (("verify", intact), (f"tampered #{tampered['altered_sequence']}", tampered)):
        typer.echo(
            f"{name:<18}{row['seconds']:>10}{row['records_per_second']:>12}{row['intact']!s:>8}"
            f"{row['records_checked']:>10}{row['first_break_sequence'] or '':>10}"
        )
    if tampered["detail"]:
        typer.echo(f"tampered run: {tampered['detail']}")
    verdict = "within" if result["within_target"] else "NOT within"
    typer.echo(f"verification {verdict} the {result['target_seconds']:.0f} s target; written to {output}")


def _audit_call(data_dir: Path, target: str, method: str, request: object) -> object:
    """Call the audit service under the platform identity (an operator on the exchange's hosts);
    a failure is one line and exit 3 (cannot reach / not allowed), or 2 (the request was refused)."""
    from hie.audit.v1 import audit_pb2_grpc
    from services.shared.auth import PlatformCredentials

    platform_key = data_dir / "keys" / "platform.pem"
    if not platform_key.is_file():
        _fail(
            f"no exchange data in {data_dir.resolve()} (no keys/platform.pem): run it from the exchange's folder"
            " or pass --data-dir / HIE_DATA_DIR",
            _EXIT_UNREACHABLE,
        )
    credentials = PlatformCredentials.from_file(platform_key, service="cli", issuer="urn:hie:cli")
    try:
        with _channel(target) as channel:
            return getattr(audit_pb2_grpc.AuditLogStub(channel), method)(
                request, metadata=credentials.metadata(), timeout=600
            )
    except grpc.RpcError as exc:
        code = exc.code()  # type: ignore[attr-defined]
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            _fail(f"cannot reach the audit service at {target}: is the exchange running (`hie up`)?", _EXIT_UNREACHABLE)
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            _fail(
                f"the audit service at {target} refused this data dir's platform key: it belongs to another exchange",
                _EXIT_UNREACHABLE,
            )
        _fail(f"the audit service refused the request: {exc.details()}", _EXIT_USAGE)  # type: ignore[attr-defined]


def _audit_target(data_dir: Path, target: str) -> str:
    return target or _running_state(data_dir).get("audit_target") or f"127.0.0.1:{SERVICE_PORTS['audit']}"


def _checkpoint_claims(jws: str) -> dict[str, Any]:
    """The payload of a checkpoint JWS, for display only (the audit service verified it)."""
    import base64

    try:
        payload = jws.split(".")[1]
        return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))
    except (IndexError, ValueError, TypeError):
        return {}


AuditTarget = Annotated[
    str,
    typer.Option(
        envvar="HIE_AUDIT_TARGET",
        help="host:port of the audit service [default: the running `hie up`'s, else 127.0.0.1:7106]",
        show_default=False,
    ),
]


@audit_app.command("verify")
def audit_verify(
    data_dir: DataDir = Path(".hie"),
    target: AuditTarget = "",
    expect: Annotated[
        Path | None, typer.Option(help="A checkpoint (JWS) kept from `hie audit checkpoint`; detects truncation")
    ] = None,
    since: Annotated[datetime.datetime | None, typer.Option(help="Verify only records from this time (UTC)")] = None,
    until: Annotated[datetime.datetime | None, typer.Option(help="...up to this time (UTC, exclusive)")] = None,
) -> None:
    """Verify the audit hash chain (or a time range of it) and its signed checkpoints. Exit 0 intact,
    1 broken (or your checkpoint does not match), 2 bad --expect file, 3 exchange not reachable."""
    from hie.audit.v1 import audit_pb2

    held = ""
    if expect is not None:
        try:
            held = expect.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            _fail(f"cannot read --expect {expect}: {getattr(exc, 'strerror', None) or exc}", _EXIT_USAGE)
        if not _checkpoint_claims(held):
            _fail(f"--expect {expect} is not a checkpoint (a JWS from `hie audit checkpoint`)", _EXIT_USAGE)
    request = audit_pb2.VerifyChainRequest(expected_checkpoint=held)
    for name, value in (("since", since), ("until", until)):
        if value is not None:
            moment = value if value.tzinfo else value.replace(tzinfo=datetime.UTC)
            getattr(request, name).CopyFrom(to_timestamp(moment.astimezone(datetime.UTC)))
    started = time.monotonic()
    try:
        result = _audit_call(data_dir, _audit_target(data_dir, target), "VerifyChain", request)
    except typer.Exit as exc:
        if held and exc.exit_code == _EXIT_USAGE:
            # The service refuses a checkpoint whose signature does not verify: the held
            # checkpoint does not belong to this chain, a verification failure.
            raise typer.Exit(_EXIT_FAILED) from None
        raise
    elapsed = time.monotonic() - started
    if result.intact:  # type: ignore[attr-defined]
        typer.echo(f"audit chain intact: {result.records_checked} records verified in {elapsed:.1f} s")  # type: ignore[attr-defined]
        if held:
            claims = _checkpoint_claims(held)
            typer.echo(
                f"your checkpoint matched: sequence {claims.get('sequence')}, hash {str(claims.get('hash'))[:16]}…"
            )
        return
    typer.echo(
        f"audit chain BROKEN at sequence {result.first_break_sequence}: {result.detail}",  # type: ignore[attr-defined]
        err=True,
    )
    raise typer.Exit(_EXIT_FAILED)


@audit_app.command("checkpoint")
def audit_checkpoint(data_dir: DataDir = Path(".hie"), target: AuditTarget = "") -> None:
    """Print the newest signed checkpoint (a JWS): keep it outside the exchange and pass it to
    `hie audit verify --expect FILE` later. Exit 3 when the exchange cannot be reached."""
    from hie.audit.v1 import audit_pb2

    result = _audit_call(
        data_dir, _audit_target(data_dir, target), "LatestCheckpoint", audit_pb2.LatestCheckpointRequest()
    )
    typer.echo(result.jws)  # type: ignore[attr-defined]
    if result.sm2_signature:  # type: ignore[attr-defined]
        # On stderr, so `hie audit checkpoint > held.jws` keeps only the JWS for --expect.
        typer.echo(f"SM2 co-signature: {result.sm2_signature} (public key {result.sm2_public_key})", err=True)  # type: ignore[attr-defined]


def _protects_personal_data(component: str) -> bool:
    if component == "gateway":
        return False
    return service_component(component).spec().protects_personal_data


def _component_tables(component: str) -> tuple[Path, object]:
    """A component's migration folder and table metadata."""
    if component == "gateway":
        from gateway.app import MIGRATIONS
        from gateway.store import metadata

        return MIGRATIONS, metadata
    spec = service_component(component).spec()
    return spec.versions, spec.metadata


@db_app.command("migrate")
def db_migrate(
    data_dir: DataDir = Path(".hie"),
    database_url: DatabaseUrl = "",
    component: Annotated[list[str] | None, typer.Option(help="Default: every component")] = None,
) -> None:
    """Apply pending migrations (services also do this on start)."""
    from services.shared import migrations
    from services.shared.db import engine_for
    from services.shared.protection import DataProtection

    unknown = [name for name in component or () if name not in COMPONENTS]
    if unknown:
        _fail(f"unknown component {unknown[0]}: one of {', '.join(COMPONENTS)}", 2)
    settings = _settings(data_dir, database_url)

    async def run() -> None:
        for name in component or COMPONENTS:
            versions, metadata = _component_tables(name)
            engine = engine_for(settings, name)
            try:
                await migrations.upgrade(
                    engine,
                    schema=settings.schema_for(name),
                    versions=versions,
                    metadata=metadata,  # type: ignore[arg-type]
                    # Revisions that seal existing personal data need the keys.
                    protection=DataProtection.from_settings(settings) if _protects_personal_data(name) else None,
                )
            finally:
                await engine.dispose()
            typer.echo(f"{name}: up to date")

    asyncio.run(run())


@db_app.command("revision")
def db_revision(
    component: Annotated[
        str, typer.Argument(help=f"{', '.join(DATABASE_COMPONENTS[:-1])} or {DATABASE_COMPONENTS[-1]}")
    ],
    message: Annotated[str, typer.Option("-m", "--message")],
) -> None:
    """Write a new migration for a component by comparing its tables with its migrated schema
    (developer command; runs against a scratch SQLite database)."""
    import tempfile

    from services.shared import migrations
    from services.shared.db import create_engine

    if component not in COMPONENTS:
        typer.echo(f"unknown component {component}", err=True)
        raise typer.Exit(2)
    versions, metadata = _component_tables(component)

    async def run(scratch: str) -> None:
        engine = create_engine(f"sqlite+aiosqlite:///{scratch}/revision.db", schema=component)
        try:
            await migrations.upgrade(engine, schema=component, versions=versions, metadata=metadata)  # type: ignore[arg-type]
            await migrations.revision(
                engine,
                schema=component,
                versions=versions,
                metadata=metadata,
                message=message,  # type: ignore[arg-type]
            )
        finally:
            await engine.dispose()

    with tempfile.TemporaryDirectory() as scratch:
        asyncio.run(run(scratch))


def main() -> None:
    """The `hie` command: a setting no process accepts (HIE_ENV, HIE_DATABASE_URL, …) is one line
    and exit 2, whichever command read it, never a traceback."""
    try:
        app()
    except UnsafeSettingsError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(_EXIT_USAGE)


if __name__ == "__main__":
    main()
