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
    estimated = runner.invoke(
        app, ["mpi", "weights", "--estimate", "--sample", "50", "--write", str(tmp_path / "p.json"), *common]
    )
    assert estimated.exit_code == 0, estimated.output
    assert (tmp_path / "p.json").exists()
    bad_map = runner.invoke(app, ["mpi", "load", str(source), "--domain", "hosp-z", "--no-check-domain", *common])
    assert bad_map.exit_code == 2


def _write(path: Path, rows: list[list[str]], encoding: str = "utf-8") -> None:
    with path.open("w", encoding=encoding, newline="") as handle:
        csv.writer(handle).writerows(rows)


_HEADER = ["local_id", "name", "gender", "birth_date", "phone"]
_LOAD = ["mpi", "load", "--domain", "hosp-z", "--no-check-domain"]


def test_reloading_a_corrected_export_updates_the_changed_record(tmp_path: Path) -> None:
    common = ["--data-dir", str(tmp_path)]
    first, corrected = tmp_path / "export-1.csv", tmp_path / "export-2.csv"
    rows = [["Z-1", "张伟", "男", "1980-01-01", "13800138000"], ["Z-2", "李娜", "女", "1985-02-03", "13900139000"]]
    _write(first, [_HEADER, *rows])
    _write(corrected, [_HEADER, rows[0], ["Z-2", "李娜", "女", "1985-02-03", "13900139001"]])
    assert runner.invoke(app, [*_LOAD, str(first), *common]).exit_code == 0
    reloaded = runner.invoke(app, [*_LOAD, str(corrected), *common])
    assert reloaded.exit_code == 0, reloaded.output
    assert "updated 2" in reloaded.output
    assert "new 0" in reloaded.output
    assert "Traceback" not in reloaded.output


def test_running_the_same_file_again_says_nothing_changed(tmp_path: Path) -> None:
    common = ["--data-dir", str(tmp_path)]
    source = tmp_path / "export.csv"
    _write(source, [_HEADER, ["Z-1", "张伟", "男", "1980-01-01", "13800138000"]])
    assert runner.invoke(app, [*_LOAD, str(source), *common]).exit_code == 0
    again = runner.invoke(app, [*_LOAD, str(source), *common])
    assert again.exit_code == 0, again.output
    assert "already loaded" in again.output
    assert "resumed" not in again.output


def test_gb18030_export_loads_with_encoding_and_is_named_without_it(tmp_path: Path) -> None:
    common = ["--data-dir", str(tmp_path)]
    source = tmp_path / "export-gbk.csv"
    _write(source, [_HEADER, ["Z-1", "欧阳娜娜", "女", "1990-05-06", ""]], encoding="gb18030")
    refused = runner.invoke(app, [*_LOAD, str(source), *common])
    assert refused.exit_code == 2
    assert "--encoding" in refused.output
    assert "Traceback" not in refused.output
    loaded = runner.invoke(app, [*_LOAD, str(source), "--encoding", "gb18030", *common])
    assert loaded.exit_code == 0, loaded.output
    assert "new 1" in loaded.output
    bad = runner.invoke(app, [*_LOAD, str(source), "--encoding", "latin-9", *common])
    assert bad.exit_code == 2
    assert "--encoding" in bad.output


def test_load_help_lists_the_target_fields() -> None:
    result = runner.invoke(app, ["mpi", "load", "--help"])
    assert result.exit_code == 0
    for name in ("local_id", "family", "given", "birth_date", "postcode", "identifier:"):
        assert name in result.output


def test_invalid_birth_dates_are_left_out_not_the_record(tmp_path: Path) -> None:
    common = ["--data-dir", str(tmp_path)]
    source = tmp_path / "export.csv"
    _write(source, [_HEADER, ["Z-1", "Zhang Wei", "", "19801301", ""], ["Z-2", "Li Na", "", "19850203", ""]])
    loaded = runner.invoke(app, [*_LOAD, str(source), *common])
    assert loaded.exit_code == 0, loaded.output
    assert "new 2" in loaded.output
    assert "rejected 0" in loaded.output
    assert "1 birth dates left out" in loaded.output


def test_estimate_is_a_flag_and_warns_on_a_tiny_sample(tmp_path: Path) -> None:
    common = ["--data-dir", str(tmp_path)]
    source = tmp_path / "export.csv"
    _write(source, [_HEADER, *[[f"Z-{i}", f"Name{i} Test", "", "1980-01-01", ""] for i in range(20)]])
    assert runner.invoke(app, [*_LOAD, str(source), *common]).exit_code == 0
    estimated = runner.invoke(app, ["mpi", "weights", "--estimate", *common])
    assert estimated.exit_code == 0, estimated.output
    assert "too few" in estimated.output
