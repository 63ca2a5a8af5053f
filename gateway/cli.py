"""`hie`: run the exchange, register member organisations, run the demo, check the audit chain."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import grpc
import httpx
import typer
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway import cli_mpi
from gateway.cli_registry import bench_registry
from services.consent.bench import bench_consent
from services.shared.config import GATEWAY_PORT, SERVICE_PORTS, Settings
from services.shared.errors import DomainError
from services.shared.keys import ensure_exchange_keys, rotate_gateway_key
from services.shared.transport import GrpcTls

app = typer.Typer(help="Regional health information exchange.", no_args_is_help=True, add_completion=False)
org_app = typer.Typer(help="Member organisations and their OAuth2 clients.", no_args_is_help=True)
keys_app = typer.Typer(help="The exchange's own signing keys.", no_args_is_help=True)
audit_app = typer.Typer(help="The exchange audit log.", no_args_is_help=True)
app.add_typer(org_app, name="org")
app.add_typer(keys_app, name="keys")
db_app = typer.Typer(help="Database schemas and migrations.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
app.add_typer(db_app, name="db")
app.add_typer(cli_mpi.app, name="mpi")
COMPONENTS = (*SERVICE_PORTS, "gateway")

DataDir = Annotated[Path, typer.Option(envvar="HIE_DATA_DIR", help="Keys and SQLite databases live here.")]
DatabaseUrl = Annotated[
    str,
    typer.Option(envvar="HIE_DATABASE_URL", help="postgresql+asyncpg://… (default: SQLite files in the data dir)"),
]
_STATE_FILE = "up.json"


def _settings(data_dir: Path, database_url: str = "") -> Settings:
    env = dict(os.environ)
    env["HIE_DATA_DIR"] = str(data_dir)
    if database_url:
        env["HIE_DATABASE_URL"] = database_url
    return Settings.from_env(env)


@keys_app.command("init")
def keys_init(directory: Annotated[Path, typer.Option("--dir")] = Path(".hie/keys")) -> None:
    """Create the gateway's and the platform's signing keys, the trusted JWKS and the data-protection
    key file, and under HIE_CRYPTO_SUITE=sm the platform's SM2 key (each kept if present)."""
    from services.shared.protection.keyring import load_or_create

    for name, path in ensure_exchange_keys(directory).items():
        typer.echo(f"{name}: {path}")
    settings = Settings.from_env(dict(os.environ))
    data_keys = directory / "data-keys.json"
    keyring = load_or_create(data_keys, suite=settings.crypto_suite)
    typer.echo(f"data-keys: {data_keys} (active {keyring.active.id}, {keyring.active.suite.cipher})")
    if settings.crypto_suite == "sm":
        from services.shared.protection.sm2 import load_or_create_signing_key

        # One SM2 key for the platform: it co-signs audit checkpoints and notifications.
        sm2 = load_or_create_signing_key(directory / "platform-sm2.json")
        typer.echo(f"platform-sm2: {directory / 'platform-sm2.json'} (public {sm2.public.hex()[:16]}…)")


@keys_app.command("rotate")
def keys_rotate(directory: Annotated[Path, typer.Option("--dir")] = Path(".hie/keys")) -> None:
    """Sign new access tokens with a fresh gateway key; the old public key stays trusted for
    ten minutes (twice the token lifetime). Run `hie keys init` later to prune retired keys."""
    old, new = rotate_gateway_key(directory)
    typer.echo(f"gateway key rotated: {old} -> {new}")


@keys_app.command("rotate-data")
def keys_rotate_data(
    data_dir: DataDir = Path(".hie"),
    database_url: DatabaseUrl = "",
    suite: Annotated[str, typer.Option(help="aes | sm; default: the current key's suite")] = "",
    resume: Annotated[bool, typer.Option(help="Continue an interrupted rotation without a new key")] = False,
) -> None:
    """Rotate the data-protection key online: new active key, then re-encrypt every protected field
    and re-wrap every document key, batch by batch, while the exchange keeps serving."""
    from gateway.data_keys import rotate_data_keys

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
    from gateway.data_keys import retire_data_keys

    retired = asyncio.run(retire_data_keys(_settings(data_dir, database_url)))
    typer.echo(f"retired: {', '.join(retired) if retired else 'none (every old key is still in use)'}")


@org_app.command("add")
def org_add(
    id: Annotated[str, typer.Option("--id", help="Organisation id, e.g. the institution code")],
    name: Annotated[str, typer.Option("--name")],
    type: Annotated[str, typer.Option("--type", help="hospital | authority | platform-admin")],
    jwks_file: Annotated[Path, typer.Option("--jwks", exists=True, dir_okay=False, help="Public JWKS file")],
    data_dir: DataDir = Path(".hie"),
    database_url: DatabaseUrl = "",
    tier: Annotated[str, typer.Option("--tier", help="hospitals: community | secondary | tertiary")] = "",
) -> None:
    """Register a member institution and its public key(s); prints its OAuth2 client id."""
    from gateway.organizations import register_organization

    try:
        jwks = json.loads(jwks_file.read_text(encoding="utf-8"))
        org = asyncio.run(
            register_organization(
                _settings(data_dir, database_url), org_id=id, name=name, type=type, jwks=jwks, tier=tier
            )
        )
    except (DomainError, json.JSONDecodeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(org.client_id)


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


keys_of_org = typer.Typer(help="An organisation's registered public keys (rotation).", no_args_is_help=True)
org_app.add_typer(keys_of_org, name="keys")


def _org_call(coro: object) -> object:
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except DomainError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@keys_of_org.command("add")
def org_keys_add(
    id: Annotated[str, typer.Option("--id")],
    jwks_file: Annotated[Path, typer.Option("--jwks", exists=True, dir_okay=False)],
    data_dir: DataDir = Path(".hie"),
    database_url: DatabaseUrl = "",
) -> None:
    """Add public key(s) to an organisation; prints the kids now registered."""
    from gateway.organizations import add_keys

    jwks = json.loads(jwks_file.read_text(encoding="utf-8"))
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

    _org_call(set_status(_settings(data_dir, database_url), org_id=id, status="active" if reinstate else "revoked"))
    typer.echo(f"{id}: {'active' if reinstate else 'revoked'}")


@org_app.command("list")
def org_list(data_dir: DataDir = Path(".hie"), database_url: DatabaseUrl = "") -> None:
    """List member organisations with their client ids."""
    from gateway.organizations import list_organizations

    for org in asyncio.run(list_organizations(_settings(data_dir, database_url))):
        typer.echo(f"{org.id}\t{org.type}\t{org.status}\t{org.client_id}\t{org.name}")


def _channel(target: str) -> grpc.Channel:
    tls = GrpcTls.from_env()
    return grpc.secure_channel(target, tls.channel_credentials()) if tls else grpc.insecure_channel(target)


def _wait_for_service(target: str, deadline: float) -> None:
    with _channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
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


def _wait_for_gateway(url: str, deadline: float) -> None:
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(url)
        time.sleep(0.2)


@app.command()
def up(
    data_dir: DataDir = Path(".hie"),
    database_url: DatabaseUrl = "",
    gateway_port: Annotated[int, typer.Option(help="Gateway HTTP port")] = GATEWAY_PORT,
    service_base_port: Annotated[int, typer.Option(help="First of six consecutive gRPC ports")] = 7101,
    exporter: Annotated[str, typer.Option(envvar="HIE_OTEL_EXPORTER", help="none | console | otlp")] = "none",
) -> None:
    """Start the six services and the gateway as separate processes on loopback; Ctrl-C stops them."""
    data_dir = data_dir.resolve()
    keys = ensure_exchange_keys(data_dir / "keys")
    targets = {name: f"127.0.0.1:{service_base_port + i}" for i, name in enumerate(SERVICE_PORTS)}
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
    processes: list[tuple[str, subprocess.Popen[bytes]]] = []

    def stop_all(*_: object) -> None:
        for _name, proc in processes:
            if proc.poll() is None:
                proc.terminate()
        for _name, proc in processes:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    # SIGTERM stops as Ctrl-C does; SIGINT is set explicitly as a background job starts with it ignored.
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    try:
        # Audit first: every other service relays its audit events there.
        for name in ("audit", "mpi", "consent", "registry", "referral", "teleconsult"):
            proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module names
                [sys.executable, "-m", f"services.{name}"], env={**env, "HIE_LISTEN": targets[name]}
            )
            processes.append((name, proc))
        deadline = time.monotonic() + 60
        for name, proc in processes:
            _wait_for_service(targets[name], deadline)
            typer.echo(f"{name:<12} serving on {targets[name]} (pid {proc.pid})")
        gateway = subprocess.Popen(
            [sys.executable, "-m", "gateway"], env={**env, "HIE_LISTEN": f"127.0.0.1:{gateway_port}"}
        )
        processes.append(("gateway", gateway))
        _wait_for_gateway(gateway_url, deadline)
        processes.append(("mllp", subprocess.Popen([sys.executable, "-m", "gateway.cli_mpi", "mllp"], env=env)))
        (data_dir / _STATE_FILE).write_text(
            json.dumps({"gateway_url": gateway_url, "database_url": database_url, "pid": os.getpid()})
        )
        typer.echo(f"gateway      {gateway_url} (pid {gateway.pid})")
        typer.echo(f"exchange up: {gateway_url}   (run `hie demo` in another terminal; Ctrl-C stops)")
        while all(proc.poll() is None for _n, proc in processes):
            time.sleep(0.5)
        failed = [name for name, proc in processes if proc.poll() is not None]
        typer.echo(f"stopped unexpectedly: {', '.join(failed)}", err=True)
        raise typer.Exit(1)
    except TimeoutError as exc:
        typer.echo(f"did not become healthy in time: {exc}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("stopping…")
    finally:
        stop_all()
        (data_dir / _STATE_FILE).unlink(missing_ok=True)


@app.command()
def demo(
    data_dir: DataDir = Path(".hie"),
    gateway_url: Annotated[str, typer.Option(help="Default: the running `hie up`")] = "",
    database_url: DatabaseUrl = "",
) -> None:
    """Run one real exchange between two new hospitals against a running `hie up`."""
    from gateway.demo import DemoFailed, run_demo

    state_file = data_dir / _STATE_FILE
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    url = gateway_url or state.get("gateway_url")
    if not url:
        typer.echo("no running exchange found: start one with `hie up` (or pass --gateway-url)", err=True)
        raise typer.Exit(2)
    try:
        asyncio.run(run_demo(_settings(data_dir, database_url or state.get("database_url", "")), url))
    except (DemoFailed, httpx.HTTPError) as exc:
        typer.echo(f"demo failed: {exc}", err=True)
        raise typer.Exit(1) from None


bench_app = typer.Typer(help="Benchmarks (commands, not tests).", no_args_is_help=True)
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


@bench_app.command("exchange")
def bench_exchange(
    exchanges: Annotated[int, typer.Option(help="How many full exchanges to run")] = 200,
    data_dir: DataDir = Path(".hie"),
    gateway_url: Annotated[str, typer.Option(help="Default: the running `hie up`")] = "",
    database_url: DatabaseUrl = "",
    output: Annotated[Path, typer.Option(help="JSON results")] = Path("bench-results/exchange.json"),
) -> None:
    """Latency of register / link / register document / find / retrieve through the gateway, sequentially."""
    from gateway.bench import run_exchange_bench, write_result

    state_file = data_dir / _STATE_FILE
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    url = gateway_url or state.get("gateway_url")
    if not url:
        typer.echo("no running exchange found: start one with `hie up` (or pass --gateway-url)", err=True)
        raise typer.Exit(2)
    settings = _settings(data_dir, database_url or state.get("database_url", ""))
    result = asyncio.run(run_exchange_bench(settings, url, exchanges=exchanges))
    write_result(result, output)
    typer.echo(f"{result['exchanges']} exchanges in {result['wall_seconds']} s ({result['exchanges_per_second']}/s)")
    typer.echo(f"{'operation':<20}{'n':>6}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for op, row in result["operations"].items():
        typer.echo(f"{op:<20}{row['n']:>6}{row['p50_ms']:>10}{row['p95_ms']:>10}{row['p99_ms']:>10}{row['max_ms']:>10}")
    typer.echo(f"written to {output}")


@bench_app.command("audit")
def bench_audit(
    records: Annotated[int, typer.Option(min=1, help="How many chained records to create and verify")] = 1_000_000,
    database_url: Annotated[
        str, typer.Option(help="postgresql+asyncpg://… (a bench_audit_* schema, dropped after); default: SQLite")
    ] = "",
    output: Annotated[Path, typer.Option(help="JSON results")] = Path("bench-results/audit.json"),
) -> None:
    """Fill a fresh audit database with N chained records, then time VerifyChain on it (intact, then tampered)."""
    from gateway.bench import write_result
    from services.audit.bench import run

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
    """Call the audit service under the platform identity (an operator on the exchange's hosts)."""
    from hie.audit.v1 import audit_pb2_grpc
    from services.shared.auth import PlatformCredentials

    credentials = PlatformCredentials.from_file(data_dir / "keys" / "platform.pem", service="cli", issuer="urn:hie:cli")
    with _channel(target) as channel:
        return getattr(audit_pb2_grpc.AuditLogStub(channel), method)(
            request, metadata=credentials.metadata(), timeout=600
        )


AuditTarget = Annotated[str, typer.Option(envvar="HIE_AUDIT_TARGET")]


@audit_app.command("verify")
def audit_verify(
    data_dir: DataDir = Path(".hie"),
    target: AuditTarget = "127.0.0.1:7106",
    expect: Annotated[
        Path | None, typer.Option(help="A checkpoint (JWS) kept from `hie audit checkpoint`; detects truncation")
    ] = None,
    since: Annotated[datetime.datetime | None, typer.Option(help="Verify only records from this time (UTC)")] = None,
    until: Annotated[datetime.datetime | None, typer.Option(help="...up to this time (UTC, exclusive)")] = None,
) -> None:
    """Verify the audit hash chain (or a time range of it) and its signed checkpoints; exit 1 at the first break."""
    from hie.audit.v1 import audit_pb2

    request = audit_pb2.VerifyChainRequest(expected_checkpoint=expect.read_text().strip() if expect else "")
    for name, value in (("since", since), ("until", until)):
        if value is not None:
            moment = value if value.tzinfo else value.replace(tzinfo=datetime.UTC)
            getattr(request, name).FromDatetime(moment.astimezone(datetime.UTC))
    started = time.monotonic()
    result = _audit_call(data_dir, target, "VerifyChain", request)
    elapsed = time.monotonic() - started
    if result.intact:  # type: ignore[attr-defined]
        typer.echo(f"audit chain intact: {result.records_checked} records verified in {elapsed:.1f} s")  # type: ignore[attr-defined]
        return
    typer.echo(
        f"audit chain BROKEN at sequence {result.first_break_sequence}: {result.detail}",  # type: ignore[attr-defined]
        err=True,
    )
    raise typer.Exit(1)


@audit_app.command("checkpoint")
def audit_checkpoint(data_dir: DataDir = Path(".hie"), target: AuditTarget = "127.0.0.1:7106") -> None:
    """Print the newest signed checkpoint (a JWS): keep it outside the exchange and pass it to
    `hie audit verify --expect FILE` later."""
    from hie.audit.v1 import audit_pb2

    result = _audit_call(data_dir, target, "LatestCheckpoint", audit_pb2.LatestCheckpointRequest())
    typer.echo(result.jws)  # type: ignore[attr-defined]
    if result.sm2_signature:  # type: ignore[attr-defined]
        # On stderr, so `hie audit checkpoint > held.jws` keeps only the JWS for --expect.
        typer.echo(f"SM2 co-signature: {result.sm2_signature} (public key {result.sm2_public_key})", err=True)  # type: ignore[attr-defined]


def _protects_personal_data(component: str) -> bool:
    import importlib

    if component == "gateway":
        return False
    return importlib.import_module(f"services.{component}.service").SPEC.protects_personal_data


def _component_tables(component: str) -> tuple[Path, object]:
    """A component's migration folder and table metadata."""
    import importlib

    if component == "gateway":
        from gateway.app import MIGRATIONS
        from gateway.store import metadata

        return MIGRATIONS, metadata
    spec = importlib.import_module(f"services.{component}.service").SPEC
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
    component: Annotated[str, typer.Argument(help="mpi, registry, consent, referral, teleconsult, audit or gateway")],
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


if __name__ == "__main__":
    app()
