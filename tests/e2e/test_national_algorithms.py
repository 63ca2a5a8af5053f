"""The exchange under the national-algorithms option (HIE_CRYPTO_SUITE=sm), driven over HTTP."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from services.ops.demo import run_demo
from services.shared.protection.keyring import DataKeyring
from services.shared.protection.sm2 import Sm2VerifyingKey
from services.teleconsult import report as consultation_report
from tests.conftest import base_settings, drop_schemas, start_exchange


async def test_demo_round_trips_under_sm4_and_the_checkpoint_is_sm2_co_signed(tmp_path: Path, keys_dir: Path) -> None:
    settings = dataclasses.replace(base_settings(tmp_path, keys_dir, "sqlite"), crypto_suite="sm")
    exchange, gateway = await start_exchange(settings, "sqlite")
    try:
        # Register, find and retrieve a document (content sealed with SM4-GCM), hash-checked.
        report = await run_demo(exchange.settings, exchange.base_url, echo=False)
        assert report.steps[-1].response.status_code == 200
        assert DataKeyring.load(settings.data_keys_file).active.suite.cipher == "SM4-GCM"

        await exchange.audit_settled()
        auditor = await exchange.member(type="authority", scopes="system/AuditEvent.rs", name="市卫健委")
        checkpoint = await auditor.call("GET", "/api/v1/audit/checkpoint", purpose="audit")
        assert checkpoint.status_code == 200, checkpoint.text
        body = checkpoint.json()
        public = Sm2VerifyingKey(bytes.fromhex(body["sm2"]["public_key"]))
        assert public.verify(body["jws"].encode(), bytes.fromhex(body["sm2"]["signature"]))
        assert not public.verify(body["jws"].encode() + b".", bytes.fromhex(body["sm2"]["signature"]))
        # Hospitals fetch the key that co-signs their notifications: the same platform SM2 key.
        hospital = await exchange.member(name="市第二人民医院")
        key = await hospital.call("GET", "/api/v1/notifications/sm2-key")
        assert key.status_code == 200, key.text
        assert key.json() == {"algorithm": "SM2", "public_key": public.hex(), "signer_id": "1234567812345678"}
        # The demo's consultation report: the hospital's ES384 signature and the exchange's SM2
        # co-signature over the same canonical DiagnosticReport, both in the filed Provenance.
        read = next(step for step in report.steps if step.title == "B reads the signed report")
        final = read.response.json()["versions"][0]
        canonical = consultation_report.canonical(final["diagnostic_report"])
        assert public.verify(canonical, bytes.fromhex(final["sm2_signature"]))
        assert not public.verify(canonical + b" ", bytes.fromhex(final["sm2_signature"]))
        formats = [sig["sigFormat"] for sig in final["provenance"]["signature"]]
        assert formats == ["application/jose", "application/x-sm2-sm3-signature"]
        await hospital.aclose()
        await auditor.aclose()
    finally:
        await gateway.stop()
        for service in exchange.services.values():
            await service.stop(grace=None)
        await drop_schemas(settings)
