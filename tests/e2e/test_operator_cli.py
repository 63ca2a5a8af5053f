"""Operator commands as an operator types them: hospital key pairs, registering keys given as a
JWKS or a PEM public key, one key per organisation, rotation only in an exchange's key folder,
read-only commands that never create an exchange, and one-line errors with distinct exit codes."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from typer.testing import CliRunner

from services.ops.cli import app
from services.shared.components import DATABASE_COMPONENTS
from services.shared.keys import generate_ec_key, load_private_key, public_jwk

runner = CliRunner()


def _hie(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args), env={"HIE_DATA_DIR": "", "HIE_DATABASE_URL": ""})
    assert "Traceback" not in result.stdout + result.stderr
    # CliRunner catches what would have been a traceback: an exit is the only way out.
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.stdout, result.stderr


def test_keygen_writes_a_0600_private_key_never_printed_and_a_jwks(tmp_path: Path) -> None:
    code, out, err = _hie("org", "keygen", "--id", "hosp-k", "--out", str(tmp_path))
    assert code == 0, err
    private = tmp_path / "hosp-k.key.pem"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert "PRIVATE KEY" not in out
    assert "BEGIN" not in out
    [jwk] = json.loads((tmp_path / "hosp-k.jwks.json").read_text())["keys"]
    assert "d" not in jwk
    assert jwk["kid"] == public_jwk(load_private_key(private))["kid"]
    assert f"--jwks {tmp_path / 'hosp-k.jwks.json'}" in out
    # Never overwrites a key pair.
    code, _out, err = _hie("org", "keygen", "--id", "hosp-k", "--out", str(tmp_path))
    assert code == 2
    assert "exists" in err


def test_org_add_takes_a_pem_public_key_and_refuses_one_key_for_two_orgs(tmp_path: Path) -> None:
    data = str(tmp_path / "x")
    key = generate_ec_key()
    pem = tmp_path / "pub.pem"
    pem.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    code, out, err = _hie("org", "add", "--id", "h1", "--name", "一院", "--type", "hospital", "--jwks", str(pem),
                          "--data-dir", data)  # fmt: skip
    assert code == 0, err
    assert out.strip()
    # The same key for a second organisation (as a JWKS this time, another kid): refused.
    jwks = tmp_path / "same.jwks.json"
    jwks.write_text(json.dumps({"keys": [{**public_jwk(key), "kid": "another-kid"}]}))
    code, _out, err = _hie("org", "add", "--id", "h2", "--name", "二院", "--type", "hospital", "--jwks", str(jwks),
                           "--data-dir", data)  # fmt: skip
    assert code == 2
    assert "registered to organisation h1" in err
    code, _out, err = _hie("org", "keys", "add", "--id", "h1", "--jwks", str(jwks), "--data-dir", data)
    assert code == 0, err
    code, out, _err = _hie("org", "list", "--data-dir", data)
    assert out.splitlines()[0].split()[:3] == ["ID", "TYPE", "STATUS"]
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["h1"]


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("not json at all", "neither a JWKS (JSON with a keys array) nor a PEM public key"),
        ('{"keys": []}', "a JWKS needs a non-empty keys array"),
        ("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "holds a private key"),
        ("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "is not an EC (P-256 / P-384) or RSA"),
    ],
)
def test_org_add_says_what_it_expects(tmp_path: Path, content: str, says: str) -> None:
    given = tmp_path / "key.pem"
    given.write_text(content)
    code, _out, err = _hie("org", "add", "--id", "h", "--name", "院", "--type", "hospital", "--jwks", str(given),
                           "--data-dir", str(tmp_path / "d"))  # fmt: skip
    assert code == 2
    assert says in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "command",
    [
        ["org", "list"],
        ["org", "revoke", "--id", "h"],
        ["mpi", "export-links"],
        ["audit", "verify"],
        ["audit", "checkpoint"],
        # Found walking the README in an empty folder: the data-key commands created keys and
        # databases there and ended in a SQL traceback; the user commands created gateway.db
        # (and `user list` answered nothing, exit 0).
        ["keys", "rotate-data"],
        ["keys", "retire-data"],
        ["user", "list", "--org", "h"],
        ["user", "add", "--org", "h", "--username", "u", "--name", "李医生", "--role", "doctor"],
    ],
)
def test_read_only_commands_never_create_an_exchange(tmp_path: Path, command: list[str]) -> None:
    empty = tmp_path / "wrong-folder"
    code, _out, err = _hie(*command, "--data-dir", str(empty))
    assert code == 3
    assert f"no exchange data in {empty}" in err
    assert not empty.exists()


def test_rotation_into_a_folder_that_is_not_an_exchange_key_folder_is_refused(tmp_path: Path) -> None:
    code, _out, err = _hie("keys", "rotate", "--dir", str(tmp_path))
    assert code == 3
    assert f"{tmp_path} is not an exchange's key folder" in err
    assert "nothing rotated" in err
    assert list(tmp_path.iterdir()) == []
    # In the data dir of an exchange (not running): rotated, and it says when the key is used.
    code, _out, err = _hie("keys", "init", "--dir", str(tmp_path / "ex" / "keys"))
    assert code == 0, err
    code, out, err = _hie("keys", "rotate", "--data-dir", str(tmp_path / "ex"))
    assert code == 0, err
    assert "gateway key rotated" in out
    assert "signs with the new key when it starts" in out


def test_audit_verify_expect_file_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "platform.pem").write_text("")
    code, _out, err = _hie("audit", "verify", "--data-dir", str(tmp_path), "--expect", str(tmp_path / "missing.jws"))
    assert code == 2
    assert err.startswith(f"error: cannot read --expect {tmp_path / 'missing.jws'}")
    bad = tmp_path / "bad.jws"
    bad.write_text("not a checkpoint")
    code, _out, err = _hie("audit", "verify", "--data-dir", str(tmp_path), "--expect", str(bad))
    assert code == 2
    assert "is not a checkpoint" in err


def test_usage_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    """Found walking the README: `hie db migrate --component nope` ended in a KeyError traceback,
    `hie bench exchange --exchanges 0` in a StatisticsError one, `hie bench mpi --latency-samples 0`
    in a TypeError one; `hie bench load --clients 0` set up a whole region to measure nothing."""
    code, _out, err = _hie("db", "migrate", "--component", "nope", "--data-dir", str(tmp_path / "x"))
    assert code == 2
    assert err.strip() == f"error: unknown component nope: one of {', '.join(DATABASE_COMPONENTS)}"
    assert not (tmp_path / "x").exists()
    # Counts of nothing to measure are refused before anything starts.
    for command in (
        ["bench", "exchange", "--exchanges", "0"],
        ["bench", "mpi", "--records", "100", "--latency-samples", "0"],
        ["bench", "load", "--scale", "0.001", "--clients", "0"],
        ["bench", "load", "--scale", "0.001", "--seconds", "0"],
    ):
        code, _out, _err = _hie(*command)
        assert code == 2, command
    # A metrics endpoint that is not a URL is refused before the exchange is asked anything.
    for value in ("nourl", "mpi=nourl", "mpi=ftp://127.0.0.1:9/metrics", "=http://127.0.0.1:9/metrics"):
        code, out, err = _hie("status", "--gateway-url", "http://127.0.0.1:9", "--metrics", value)
        assert code == 2, value
        assert out == ""
        assert err.startswith("error: --metrics "), err
        assert "Traceback" not in err


def test_user_commands_find_the_exchange_like_the_others(tmp_path: Path) -> None:
    """`hie user …` read HIE_DATA_DIR nowhere (every other command does), and listed an unknown
    organisation's users as none."""
    keys = tmp_path / "jwks.json"
    keys.write_text(json.dumps({"keys": [public_jwk(generate_ec_key())]}))
    data = tmp_path / "exchange"
    code, _out, err = _hie("org", "add", "--id", "h1", "--name", "一院", "--type", "hospital", "--jwks", str(keys),
                           "--data-dir", str(data))  # fmt: skip
    assert code == 0, err
    result = runner.invoke(
        app,
        ["user", "add", "--org", "h1", "--username", "li", "--name", "李医生", "--role", "doctor"],
        env={"HIE_DATA_DIR": str(data), "HIE_DATABASE_URL": ""},
    )
    assert result.exit_code == 0, result.output
    assert "added li to h1" in result.stdout
    code, out, _err = _hie("user", "list", "--org", "h1", "--data-dir", str(data))
    assert code == 0
    assert out.startswith("li\t李医生\tdoctor")
    code, _out, err = _hie("user", "list", "--org", "h9", "--data-dir", str(data))
    assert (code, err.strip()) == (2, "error: no such organisation")


def _free_base_port() -> int:
    """The first of seven consecutive free ports (gateway + six services)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + 7 < 65536 and all(_bindable(p) for p in range(base, base + 7)):
            return base
    raise RuntimeError("no free port range")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_a_setting_no_process_accepts_is_one_line_before_anything_starts(tmp_path: Path) -> None:
    """Found trying `hie up --database-url mysql://…` (or `postgresql://…`, no async driver): each
    service crashed five times with a traceback before `hie up` gave up (exit 5); an unusable
    --data-dir ended in a FileNotFoundError traceback; any command under a wrong HIE_ENV printed
    the settings error as a traceback."""
    base = _free_base_port()
    ports = ["--gateway-port", str(base + 6), "--service-base-port", str(base), "--mllp-port", "0",
             "--metrics-base-port", "0"]  # fmt: skip
    for url in ("mysql://hie@db/hie", "postgresql://hie@db/hie"):
        code, _out, err = _hie("up", "--data-dir", str(tmp_path / "d"), "--database-url", url, *ports)
        assert code == 2
        assert err.strip() == "error: HIE_DATABASE_URL must be postgresql+asyncpg://… (or sqlite+aiosqlite:///…)"
    (tmp_path / "a-file").write_text("")
    code, _out, err = _hie("up", "--data-dir", str(tmp_path / "a-file" / "d"), *ports)
    assert code == 2
    assert err.startswith(f"error: cannot use the data dir {tmp_path / 'a-file' / 'd'}: ")
    assert len(err.strip().splitlines()) == 1
    # Any command, as the installed `hie` runs it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIE_")}
    listed = subprocess.run(
        [sys.executable, "-m", "services.ops.cli", "db", "migrate", "--data-dir", str(tmp_path / "m")],
        env={**env, "HIE_ENV": "prod"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 2, listed.stderr
    assert listed.stderr == "error: HIE_ENV must be development or production\n"


def test_a_process_started_alone_says_which_setting_is_wrong_in_one_line(tmp_path: Path) -> None:
    """`python -m services.<name>` / `python -m gateway` with a setting they cannot run with printed
    a traceback; a number that is not one ended in Python's "invalid literal for int()"."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIE_")}
    env["HIE_DATA_DIR"] = str(tmp_path)
    cases = [
        (["services.audit"], {"HIE_CRYPTO_SUITE": "des"}, "audit: HIE_CRYPTO_SUITE must be aes or sm"),
        (["gateway"], {"HIE_RATE_LIMIT_BURST": "many"}, "gateway: HIE_RATE_LIMIT_BURST must be a whole number"),
        (["services.ops.cli", "db", "migrate"], {"HIE_MLLP_PORT": "x"}, "error: HIE_MLLP_PORT must be a whole number"),
    ]
    for args, setting, says in cases:
        command = [sys.executable, "-m", *args]
        run = subprocess.run(command, env={**env, **setting}, capture_output=True, text=True, timeout=60)
        assert (run.returncode, run.stderr) == (2, says + "\n"), args
    assert list(tmp_path.iterdir()) == []
