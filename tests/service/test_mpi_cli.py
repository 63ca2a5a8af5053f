"""`hie mpi` commands on a real (SQLite) mpi database: weights, load, export-links."""

from __future__ import annotations

import csv
from pathlib import Path

from typer.testing import CliRunner

from gateway.cli import app

runner = CliRunner()


def test_weights_in_force_are_printed() -> None:
    result = runner.invoke(app, ["mpi", "weights"])
    assert result.exit_code == 0, result.output
    assert "link threshold" in result.output
    assert "homophone" in result.output
    assert "day_month_swapped" in result.output


def test_load_export_and_estimate(tmp_path: Path) -> None:
    source = tmp_path / "his.csv"
    with source.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["病案号", "姓名", "性别", "出生日期", "电话"])
        writer.writerow(["Z-1", "张伟", "男", "1980-01-01", "13800138000"])
        writer.writerow(["Z-2", "李娜", "女", "1985-02-03", "13900139000"])
        writer.writerow(["Z-3", "王芳", "女", "not-a-date", ""])
    common = ["--data-dir", str(tmp_path)]
    mapping = ["--map", "病案号=local_id", "--map", "姓名=name", "--map", "性别=gender"]
    mapping += ["--map", "出生日期=birth_date", "--map", "电话=phone"]
    loaded = runner.invoke(
        app, ["mpi", "load", str(source), "--domain", "hosp-z", "--no-check-domain", *mapping, *common]
    )
    assert loaded.exit_code == 0, loaded.output
    assert "new 2" in loaded.output
    assert "rejected 1" in loaded.output
    assert (tmp_path / "his.rejects.csv").read_text(encoding="utf-8") == "row,reason\n3,birth-date-invalid\n"
    exported = runner.invoke(app, ["mpi", "export-links", "--output", str(tmp_path / "links.csv"), *common])
    assert exported.exit_code == 0, exported.output
    rows = list(csv.DictReader((tmp_path / "links.csv").open(encoding="utf-8")))
    assert {(r["domain"], r["local_id"]) for r in rows} == {("hosp-z", "Z-1"), ("hosp-z", "Z-2")}
    assert all(len(r["enterprise_id"]) == 36 for r in rows)
    estimated = runner.invoke(app, ["mpi", "weights", "--estimate", "50", "--write", str(tmp_path / "p.json"), *common])
    assert estimated.exit_code == 0, estimated.output
    assert (tmp_path / "p.json").exists()
    bad_map = runner.invoke(app, ["mpi", "load", str(source), "--domain", "hosp-z", "--no-check-domain", *common])
    assert bad_map.exit_code == 2
