"""The exchange with mutual TLS between the gateway and every service."""

from __future__ import annotations

import dataclasses
import ssl
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.ops.demo import run_demo
from tests.conftest import base_settings, drop_schemas, start_exchange
from tests.support.factories import person
from tests.support.pki import make_pki


async def test_exchange_runs_over_mutual_tls(tmp_path: Path, keys_dir: Path) -> None:
    tls = make_pki(tmp_path)
    settings = dataclasses.replace(base_settings(tmp_path, keys_dir, "sqlite"), grpc_tls=tls)
    exchange, gateway = await start_exchange(settings, "sqlite")
    try:
        report = await run_demo(exchange.settings, exchange.base_url, echo=False)
        assert report.steps[-1].response.status_code == 200
        target = f"127.0.0.1:{exchange.services['registry'].port}"
        # Plaintext is refused by a TLS server...
        async with grpc.aio.insecure_channel(target) as plain:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=3)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        # ...and so is TLS without a client certificate (mutual TLS).
        anonymous = grpc.ssl_channel_credentials(root_certificates=tls.ca_file.read_bytes())
        async with grpc.aio.secure_channel(target, anonymous) as no_cert:
            with pytest.raises(grpc.aio.AioRpcError):
                await health_pb2_grpc.HealthStub(no_cert).Check(health_pb2.HealthCheckRequest(), timeout=3)
        async with grpc.aio.secure_channel(target, tls.channel_credentials()) as good:
            reply = await health_pb2_grpc.HealthStub(good).Check(health_pb2.HealthCheckRequest(), timeout=3)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await gateway.stop()
        for service in exchange.services.values():
            await service.stop(grace=None)
        await drop_schemas(settings)


async def test_plaintext_health_port_beside_a_tls_service(tmp_path: Path, keys_dir: Path) -> None:
    """kubelet probes speak plaintext gRPC: a TLS service can expose health (and only health) in clear."""
    import socket

    from hie.audit.v1 import audit_pb2, audit_pb2_grpc
    from services.audit.service import SPEC as AUDIT
    from services.shared.process import start_service

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        health_port = sock.getsockname()[1]
    settings = dataclasses.replace(
        base_settings(tmp_path, keys_dir, "sqlite"),
        grpc_tls=make_pki(tmp_path),
        health_listen=f"127.0.0.1:{health_port}",
    )
    running = await start_service(AUDIT, settings, listen="127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await audit_pb2_grpc.AuditLogStub(channel).Query(audit_pb2.QueryRequest(), timeout=3)
            assert missing.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await running.stop(grace=None)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
async def test_gateway_serves_https_with_tls_1_2_or_newer_and_grpc_over_mtls(tmp_path: Path, keys_dir: Path) -> None:
    """In transit end to end: HTTPS from the hospital to the gateway, mTLS from there on."""
    tls = make_pki(tmp_path)
    settings = dataclasses.replace(
        base_settings(tmp_path, keys_dir, "sqlite"),
        grpc_tls=tls,
        https_cert_file=tls.cert_file,
        https_key_file=tls.key_file,
    )
    exchange, gateway = await start_exchange(settings, "sqlite")
    assert exchange.base_url.startswith("https://")
    trusting = ssl.create_default_context(cafile=str(tls.ca_file))
    hospital = await exchange.member(name="市第一人民医院")
    hospital.http = httpx.AsyncClient(verify=trusting, timeout=30)
    try:
        registered = await hospital.call("POST", "/api/v1/patients", json={"local_id": "TLS-1", **person("王芳")})
        assert registered.status_code == 201, registered.text
        assert registered.headers["Strict-Transport-Security"].startswith("max-age=")
        # The token endpoint the discovery document names is an https URL as well.
        assert (await hospital.token_endpoint()).startswith("https://")

        port = exchange.base_url.rsplit(":", 1)[1]
        async with httpx.AsyncClient(timeout=5) as plain:  # plaintext HTTP on the TLS port is refused
            with pytest.raises(httpx.HTTPError):
                await plain.get(f"http://127.0.0.1:{port}/.well-known/smart-configuration")
        old = ssl.create_default_context(cafile=str(tls.ca_file))
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
        async with httpx.AsyncClient(verify=old, timeout=5) as legacy:  # TLS 1.0 / 1.1 refused
            with pytest.raises(httpx.ConnectError):
                await legacy.get(f"{exchange.base_url}/.well-known/smart-configuration")
    finally:
        await hospital.aclose()
        await gateway.stop()
        for service in exchange.services.values():
            await service.stop(grace=None)
