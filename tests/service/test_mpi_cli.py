"""`hie mpi` commands on a real (SQLite) mpi database: weights, load, export-links."""

from __future__ import annotations

import csv
import random
from pathlib import Path

from typer.testing import CliRunner

from services.ops.cli import app

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
    # The error alone: no progress bar drawn before it (the mapping is checked before loading).
    assert bad_map.output == "error: no column is mapped to local_id\n"


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
    assert "error: " in refused.output  # one line, like every other command's refusal
    assert "Traceback" not in refused.output
    loaded = runner.invoke(app, [*_LOAD, str(source), "--encoding", "gb18030", *common])
    assert loaded.exit_code == 0, loaded.output
    assert "new 1" in loaded.output
    bad = runner.invoke(app, [*_LOAD, str(source), "--encoding", "latin-9", *common])
    assert bad.exit_code == 2
    assert "--encoding" in bad.output


def test_a_utf8_export_with_a_bom_and_a_gbk_one_load(tmp_path: Path) -> None:
    common = ["--data-dir", str(tmp_path)]
    with_bom, gbk = tmp_path / "export-bom.csv", tmp_path / "export-gbk.csv"
    # Excel's "CSV UTF-8" starts with a BOM: the first column is still local_id.
    _write(with_bom, [_HEADER, ["Z-1", "欧阳娜娜", "女", "1990-05-06", ""]], encoding="utf-8-sig")
    loaded = runner.invoke(app, [*_LOAD, str(with_bom), *common])
    assert loaded.exit_code == 0, loaded.output
    assert "new 1" in loaded.output
    _write(gbk, [_HEADER, ["Z-2", "张伟", "男", "1980-01-01", ""]], encoding="gbk")
    loaded = runner.invoke(app, [*_LOAD, str(gbk), "--encoding", "gbk", *common])
    assert loaded.exit_code == 0, loaded.output
    assert "new 1" in loaded.output


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


def _latin_exports(tmp_path: Path, people: int) -> tuple[Path, Path]:
    """Two hospitals' exports of the same people (Latin names, no id, phone or gender): the
    second with typos in names, dates and postcodes, swapped name parts and missing values."""
    rng = random.Random(5)
    letters = "abcdefghijklmnopqrstuvwxyz"

    def word(n: int) -> str:
        return "".join(rng.choice(letters) for _ in range(n))

    def typo(value: str) -> str:
        i = rng.randrange(len(value))
        return value[:i] + rng.choice(letters) + value[i + 1 :]

    header = ["local_id", "given", "family", "address", "district", "postcode", "birth_date"]
    first, second = [header], [header]
    for n in range(people):
        given, family = word(rng.randint(4, 8)), word(rng.randint(5, 9))
        born = f"{rng.randint(1920, 2020)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
        address, suburb, postcode = f"{rng.randint(1, 300)} {word(7)} street", word(8), f"{rng.randint(2000, 7999)}"
        first.append([f"A-{n}", given, family, address, suburb, postcode, born])
        roll = rng.random()
        if roll < 0.2:
            given = typo(given)
        elif roll < 0.3:
            family = typo(family)
        elif roll < 0.35:
            given, family = family, given
        elif roll < 0.4:
            given = ""
        roll = rng.random()
        if roll < 0.1:
            born = born[:-1] + str((int(born[-1]) + 1) % 10)
        elif roll < 0.15:
            born = ""
        if rng.random() < 0.1:
            postcode = typo(postcode[:-1]) + postcode[-1]
        second.append([f"B-{n}", given, family, address, suburb, postcode, born])
    paths = tmp_path / "hospital-a.csv", tmp_path / "hospital-b.csv"
    _write(paths[0], first)
    _write(paths[1], second)
    return paths


def test_weights_are_learned_from_a_large_enough_load_and_shown(tmp_path: Path) -> None:
    common = ["--data-dir", str(tmp_path)]
    first, second = _latin_exports(tmp_path, 2_100)
    loaded = runner.invoke(app, ["mpi", "load", str(first), "--domain", "hosp-a", "--no-check-domain", *common])
    assert loaded.exit_code == 0, loaded.output
    assert "weights learned" not in loaded.output  # one hospital alone: no pairs across domains to learn from
    priors = runner.invoke(app, ["mpi", "weights", *common])
    assert "shipped census priors" in priors.output
    linked = runner.invoke(app, ["mpi", "load", str(second), "--domain", "hosp-b", "--no-check-domain", *common])
    assert linked.exit_code == 0, linked.output
    assert "weights learned by EM before the load" in linked.output
    shown = runner.invoke(app, ["mpi", "weights", *common])
    assert shown.exit_code == 0, shown.output
    assert "EM estimate #" in shown.output
    assert "(index, " in shown.output  # the estimate after the load: from the whole index
    assert "from 4200 records" in shown.output
    assert "from the expected precision of the links (0.999)" in shown.output
    exported = runner.invoke(app, ["mpi", "export-links", "--output", str(tmp_path / "links.csv"), *common])
    assert exported.exit_code == 0
    people: dict[str, set[str]] = {}
    for row in csv.DictReader((tmp_path / "links.csv").open(encoding="utf-8")):
        people.setdefault(row["enterprise_id"], set()).add(row["local_id"])
    assert all(len({local_id.split("-")[1] for local_id in p}) == 1 for p in people.values())  # no false link
    joined = sum(1 for p in people.values() if len(p) == 2)
    assert joined >= 0.97 * 2_100  # nearly every person's two records are one enterprise id
