"""`hie bench registry` (registered under the `bench` group in services/ops/cli.py)."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated

import typer


async def cpu_probe(pids: dict[str, int], database_url: str) -> Callable[[int], Awaitable[dict[str, float]]]:
    """CPU accounting (utime + stime from /proc, as `hie bench load` does) of the named service
    processes, their PostgreSQL backends and this process, from now: a figure the machine's load
    (other work on a shared machine) does not inflate as it does wall-clock latency."""
    from services.ops.bench_load import CpuMeter, postgres_backends

    groups = {name: [pid] for name, pid in pids.items()}
    backends = await postgres_backends(database_url, pids.values())
    if backends:
        groups["postgres"] = backends
    groups["bench-client"] = [os.getpid()]
    meter = CpuMeter(groups)
    meter.start()

    async def finish(n: int) -> dict[str, float]:
        later = await postgres_backends(database_url, pids.values())
        spent = meter.stop({"postgres": later} if later else None)
        per = {name: round(1000 * seconds / n, 3) for name, seconds in spent.items()}
        per["services_and_database"] = round(sum(v for k, v in per.items() if k != "bench-client"), 3)
        return per

    return finish


def bench_registry(
    patients: Annotated[int, typer.Option(min=1, help="Patients the entries are spread over")] = 100_000,
    documents: Annotated[int, typer.Option(min=1, help="Document entries filled into the registry")] = 1_000_000,
    database_url: Annotated[
        str,
        typer.Option(
            envvar="HIE_DATABASE_URL",
            help="postgresql+asyncpg://… (a bench_registry_* schema prefix, dropped after); default: SQLite",
        ),
    ] = "",
    sample: Annotated[int, typer.Option(min=1, help="Patients queried (registered in mpi)")] = 500,
    queries: Annotated[int, typer.Option(min=1, help="Queries by patient timed")] = 2000,
    registrations: Annotated[int, typer.Option(min=1, help="20 KB documents registered")] = 2000,
    retrievals: Annotated[int, typer.Option(min=1, help="1 MB documents registered, each retrieved 5 times")] = 40,
    set_size: Annotated[int, typer.Option(min=1, max=500, help="Documents per submission set (the set run)")] = 50,
    output: Annotated[Path, typer.Option("--json", help="JSON results")] = Path("bench-results/registry.json"),
) -> None:
    """Query-by-patient latency (consent-filtered), register throughput (20 KB) and streamed retrieve
    throughput (1 MB) at the registry, after filling N patients / M entries."""
    from services.ops.bench import write_result
    from services.registry.bench import run

    result = run(
        patients=patients,
        documents=documents,
        database_url=database_url,
        sample=sample,
        queries=queries,
        registrations=registrations,
        retrievals=retrievals,
        set_size=set_size,
        log=lambda message: typer.echo(message, err=True),
        cpu_probe=cpu_probe,
    )
    write_result(result, output)
    query, register, retrieve = result["query_by_patient"], result["register_20kb"], result["retrieve_1mb"]
    typer.echo(f"registry bench: {result['documents']} entries / {result['patients']} patients on {result['backend']}")
    typer.echo(f"fill: {result['fill']['seconds']} s ({result['fill']['entries_per_second']} entries/s)")
    typer.echo(
        f"query by patient (consent-filtered, {query['entries_per_query']} entries/query): p50 {query['p50_ms']} ms, "
        f"p95 {query['p95_ms']} ms, p99 {query['p99_ms']} ms (target p99 <= {query['target_p99_ms']} ms)"
    )
    cpu = query["cpu_ms_per_query"]
    typer.echo(
        f"query CPU ms per query: {cpu['services_and_database']} (services and database: "
        + ", ".join(f"{k} {v}" for k, v in cpu.items() if k != "services_and_database")
        + f"); load average {query['load_average']}"
    )
    typer.echo(
        f"register 20 KB: {register['documents_per_second']} documents/s at concurrency {register['concurrency']} "
        f"(p50 {register['p50_ms']} ms, p99 {register['p99_ms']} ms; target >= {register['target_per_second']}/s)"
    )
    sets = result["register_20kb_in_submission_sets"]
    typer.echo(
        f"register 20 KB in submission sets of {sets['documents_per_set']}: {sets['documents_per_second']} documents/s "
        f"at concurrency {sets['concurrency']} (per set p50 {sets['set_p50_ms']} ms, p99 {sets['set_p99_ms']} ms)"
    )
    typer.echo(
        f"retrieve 1 MB (streamed): {retrieve['mb_per_second']} MB/s over {retrieve['retrievals']} retrievals "
        f"at concurrency {retrieve['concurrency']}"
    )
    typer.echo(f"written to {output}")
