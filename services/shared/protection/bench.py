"""`hie bench protection`: the per-value cost of field encryption, blind indexes and content
sealing under both suites, so the cost added to mpi and registry operations can be budgeted."""

from __future__ import annotations

import json
import os
import timeit
from pathlib import Path
from typing import Any

from services.shared.protection.envelope import new_content_key
from services.shared.protection.fields import BlindIndex, FieldCipher
from services.shared.protection.keyring import SUITES, DataKeyring

_VALUE = "11010519491231002X"
_CONTEXT = "mpi.identifier.value|0f8e4a1c-bench"


def measure(values: int = 20_000, chunks: int = 50) -> dict[str, Any]:
    """Microseconds per value (encrypt, decrypt, blind index) and MiB/s of 1 MiB content chunks."""
    results: dict[str, Any] = {}
    chunk = os.urandom(1 << 20)
    for suite in SUITES:
        keyring = DataKeyring.generate(suite)
        cipher, index = FieldCipher(keyring), BlindIndex(keyring)
        token = cipher.encrypt(_VALUE, context=_CONTEXT)
        key = new_content_key(keyring, document_id="bench", suite=suite)

        def per_value(fn: Any) -> float:
            return round(min(timeit.repeat(fn, number=values, repeat=3)) / values * 1e6, 2)

        seal = min(timeit.repeat(lambda key=key: key.seal_chunk(0, chunk, final=True), number=chunks, repeat=3))
        results[suite] = {
            "cipher": keyring.active.suite.cipher,
            "encrypt_us": per_value(lambda c=cipher: c.encrypt(_VALUE, context=_CONTEXT)),
            "decrypt_us": per_value(lambda c=cipher, t=token: c.decrypt(t, context=_CONTEXT)),
            "blind_index_us": per_value(lambda i=index: i.digest("national_id", _VALUE)),
            "content_seal_mib_s": round(chunks / seal, 1),
        }
    return results


def bench_protection(json_path: Path | None = None) -> None:
    """Print (and optionally write as JSON) the cost of the data-protection primitives."""
    results = measure()
    for suite, row in results.items():
        print(
            f"{suite:>3} {row['cipher']:<12} encrypt {row['encrypt_us']:>6} µs  decrypt {row['decrypt_us']:>6} µs  "
            f"blind index {row['blind_index_us']:>5} µs  content {row['content_seal_mib_s']:>6} MiB/s"
        )
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2))
