"""What the operations metrics cost: `python -m services.ops.bench_metrics`.

Two measurements, printed as a table and written as JSON:

- recording: the metrics work one API request adds in-process (the gateway's counter and
  histogram, and one RPC's in each of the services the request reaches), timed per call with the
  OpenTelemetry SDK installed and with the API's no-op default;
- exchange: a hot route through a whole exchange of its own (`hie up` on SQLite in a temporary
  data dir, free ports), driven by concurrent clients for a fixed time, once with every metrics
  endpoint on and once with them off: requests per second and the exchange's CPU per request,
  summed over its processes from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

_TICKS = os.sysconf("SC_CLK_TCK")


def _recording_cost(rounds: int) -> float:
    """CPU nanoseconds per request of the gateway's and four services' recordings (process CPU
    time, not wall time: other work on a shared machine would inflate a wall-clock figure)."""
    from services.shared import metrics as m

    route = {"route": "/api/v1/documents/{document_id}", "method": "GET"}
    counted = {**route, "status": "200"}
    rpc = {"component": "registry", "method": "/hie.registry.v1.DocumentRegistry/GetDocument"}
    rpc_counted = {**rpc, "code": "OK"}
    started = time.process_time_ns()
    for _ in range(rounds):
        m.HTTP_REQUESTS.add(1, counted)
        m.HTTP_DURATION.record(0.004, route)
        for _hop in range(4):  # registry, mpi, consent, audit
            m.RPC_DURATION.record(0.001, rpc)
            m.RPC_REQUESTS.add(1, rpc_counted)
    return (time.process_time_ns() - started) / rounds


def bench_recording(rounds: int) -> dict[str, float]:
    """Recording cost without (no-op API) and with the SDK, in one fresh interpreter each."""
    results = {}
    for label, setup in (("noop", ""), ("sdk", "m.configure_metrics('bench', 'none');")):
        code = (
            "from services.shared import metrics as m;"
            f"{setup}"
            "from services.ops.bench_metrics import _recording_cost as c;"
            f"c(1000); print(c({rounds}))"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)  # noqa: S603
        results[f"{label}_ns_per_request"] = round(float(out.stdout.strip()), 1)
    results["added_us_per_request"] = round((results["sdk_ns_per_request"] - results["noop_ns_per_request"]) / 1000, 2)
    return results


def _free_block(size: int) -> int:
    for _ in range(200):
        base = 20000 + secrets.randbelow(30000)
        try:
            for port in range(base, base + size):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port block")


def _tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds of `root`'s descendants (the exchange's processes)."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        stats[int(entry)] = fields
        children.setdefault(int(fields[1]), []).append(int(entry))
    total, stack = 0.0, list(children.get(root, []))
    while stack:
        pid = stack.pop()
        fields = stats.get(pid)
        if fields:
            total += (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime
        stack.extend(children.get(pid, []))
    return total


async def _drive(base_url: str, settings: Any, *, seconds: float, concurrency: int) -> dict[str, Any]:
    from services.ops.bench import _member
    from services.ops.demo import discharge_summary_cda
    from services.shared import gb11643

    client = await _member(settings, base_url, "指标压测医院")
    body17 = f"11010519700101{secrets.randbelow(1000):03d}"
    national_id = body17 + gb11643.check_digit(body17)
    person = {
        "name": "压测患者",
        "national_id": national_id,
        "birth_date": gb11643.birth_date(national_id).isoformat(),
        "gender": gb11643.gender(national_id),
    }
    registered = await client.call("POST", "/api/v1/patients", json={"local_id": "MB-1", **person})
    registered.raise_for_status()
    import base64
    import hashlib

    content = discharge_summary_cda("压测患者")
    doc = {
        "source_document_id": f"MB-{secrets.token_hex(3)}",
        "patient_local_id": "MB-1",
        "type": {"system": "http://loinc.org", "code": "18842-5", "display": "出院小结"},
        "title": "出院小结",
        "mime_type": "text/xml",
        "sha256": hashlib.sha256(content).hexdigest(),
        "size": len(content),
        "content_base64": base64.b64encode(content).decode(),
    }
    created = await client.call("POST", "/api/v1/documents", json=doc)
    created.raise_for_status()
    path = f"/api/v1/documents/{created.json()['document_id']}"
    for _ in range(20):  # warm-up
        (await client.call("GET", path)).raise_for_status()
    done = errors = 0
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done, errors
        while time.monotonic() < deadline:
            response = await client.call("GET", path)
            if response.status_code == 200:
                done += 1
            else:
                errors += 1

    up_pid = int(os.environ["_HIE_BENCH_UP_PID"])
    cpu_before, started = _tree_cpu_seconds(up_pid), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - started, _tree_cpu_seconds(up_pid) - cpu_before
    await client.aclose()
    return {
        "requests": done,
        "errors": errors,
        "requests_per_second": round(done / wall, 1),
        "exchange_cpu_ms_per_request": round(cpu * 1000 / max(done, 1), 3),
    }


def bench_exchange(*, metrics_on: bool, seconds: float, concurrency: int) -> dict[str, Any]:
    from services.shared.components import SERVICES
    from services.shared.config import Settings

    data_dir = Path(tempfile.mkdtemp(prefix="hie-bench-metrics-"))
    # The gateway and the services, then their metrics ports.
    base = _free_block(2 * (1 + len(SERVICES)))
    env = {
        **os.environ,
        "HIE_DATA_DIR": str(data_dir),
        "HIE_GATEWAY_PORT": str(base),
        "HIE_SERVICE_BASE_PORT": str(base + 1),
        "HIE_METRICS_BASE_PORT": str(base + 1 + len(SERVICES)) if metrics_on else "0",
        "HIE_MLLP_PORT": "0",
        # No rate limit in the way of the load (one client from one address).
        "HIE_RATE_LIMIT_PER_SECOND": "100000",
        "HIE_RATE_LIMIT_BURST": "100000",
    }
    env.pop("HIE_DATABASE_URL", None)
    up = subprocess.Popen(
        [sys.executable, "-m", "services.ops.cli", "up"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base_url = f"http://127.0.0.1:{base}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or up.poll() is not None:
                raise RuntimeError("the benchmark's exchange did not start")
            time.sleep(0.3)
        os.environ["_HIE_BENCH_UP_PID"] = str(up.pid)
        settings = Settings.from_env({"HIE_DATA_DIR": str(data_dir)})
        result = asyncio.run(_drive(base_url, settings, seconds=seconds, concurrency=concurrency))
        if metrics_on:
            page = httpx.get(f"http://127.0.0.1:{base + 7}/metrics", timeout=5).text
            result["metrics_page_bytes"] = len(page)
        return result
    finally:
        up.terminate()
        up.wait(timeout=60)
        shutil.rmtree(data_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="load duration per run")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=100_000, help="recording micro-benchmark rounds")
    parser.add_argument("--repeat", type=int, default=2, help="exchange runs per setting (alternating)")
    parser.add_argument("--output", type=Path, default=Path("bench-results/metrics-overhead.json"))
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"recording": bench_recording(args.rounds), "exchange": {"on": [], "off": []}}
    for _ in range(args.repeat):
        for label, on in (("off", False), ("on", True)):
            run = bench_exchange(metrics_on=on, seconds=args.seconds, concurrency=args.concurrency)
            result["exchange"][label].append(run)
    summary = {}
    for label in ("off", "on"):
        runs = result["exchange"][label]
        summary[label] = {
            "requests_per_second": round(sum(r["requests_per_second"] for r in runs) / len(runs), 1),
            "exchange_cpu_ms_per_request": round(sum(r["exchange_cpu_ms_per_request"] for r in runs) / len(runs), 3),
        }
    result["summary"] = summary
    result["parameters"] = {
        "route": "GET /api/v1/documents/{document_id}",
        "seconds": args.seconds,
        "concurrency": args.concurrency,
        "repeat": args.repeat,
        "cpus": os.cpu_count(),
        # Other work on the machine inflates every figure: the load average says how much.
        "load_average": os.getloadavg(),
    }
    rec = result["recording"]
    print(f"recording per request: no-op {rec['noop_ns_per_request']} ns, SDK {rec['sdk_ns_per_request']} ns")
    print(f"{'metrics':<8}{'req/s':>10}{'CPU ms/req':>12}")
    for label in ("off", "on"):
        row = summary[label]
        print(f"{label:<8}{row['requests_per_second']:>10}{row['exchange_cpu_ms_per_request']:>12}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
