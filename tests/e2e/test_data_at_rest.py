"""A database dump after the demo holds no national id, phone number, street address, patient
name, document content or consultation text in clear: the mpi seals personal data, the registry
envelope-encrypts content, teleconsult seals the form, messages and reports, and nothing else
(audit, outbox, gateway) keeps a copy."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from services.ops.demo import DEMO_NATIONAL_ID, run_demo
from services.shared.config import Settings
from tests.conftest import POSTGRES_URL, _backends, base_settings, drop_schemas, start_exchange

NEEDLES = {
    "national id": DEMO_NATIONAL_ID.encode(),
    "national id (digits)": DEMO_NATIONAL_ID[:17].encode(),
    "phone": b"13800138000",
    "street address": "金融街".encode(),
    "patient name": "张三".encode(),
    "document content": "社区获得性肺炎".encode(),
    "document content (title)": "出院医嘱".encode(),
    "document content (CDA markup)": b"<ClinicalDocument",
    # The demo's remote consultation: the form's free text, the report, the filed record.
    "consultation question": "右肺上叶结节，性质待定".encode(),
    "consultation summary": "咳嗽两周，低热".encode(),
    "report findings": "磨玻璃结节，边界清".encode(),
    "report impression": "考虑原位腺癌可能".encode(),
    "move reason": "纳入诊疗计划".encode(),
}


def _dump(settings: Settings, backend: str) -> bytes:
    if backend == "sqlite":
        # Every file the databases keep, write-ahead logs included.
        return b"".join(p.read_bytes() for p in sorted(Path(settings.data_dir).glob("*.db*")))
    url = POSTGRES_URL.replace("postgresql+asyncpg://", "postgresql://")
    return subprocess.run(
        [shutil.which("pg_dump") or "pg_dump", "--data-only", "--schema", f"{settings.schema_prefix}*", url],
        check=True,
        capture_output=True,
    ).stdout


@pytest.mark.parametrize("backend", _backends())
async def test_a_dump_after_the_demo_holds_no_personal_data_or_content_in_clear(
    backend: str, tmp_path: Path, keys_dir: Path
) -> None:
    settings = base_settings(tmp_path, keys_dir, backend)
    exchange, gateway = await start_exchange(settings, backend)
    try:
        await run_demo(exchange.settings, exchange.base_url, echo=False)
        await exchange.audit_settled()
        dump = _dump(settings, backend)
        assert len(dump) > 10_000  # the dump really holds the exchange's data
        found = {name for name, needle in NEEDLES.items() if needle in dump}
        assert found == set()
    finally:
        await gateway.stop()
        for service in exchange.services.values():
            await service.stop(grace=None)
        await drop_schemas(settings)
