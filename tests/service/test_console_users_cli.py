"""`hie user …`: an organisation's administrator manages console users from the command line;
passwords are argon2id hashes and five wrong passwords lock the account until a reset."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from gateway.console import store, users
from services.ops.cli import app
from services.ops.cli_users import _settings, gateway_transaction
from services.shared.keys import generate_ec_key, jwks

runner = CliRunner()


async def _authenticate(data_dir: Path, password: str) -> str:
    async with gateway_transaction(_settings(data_dir, "")) as session:
        return (await users.authenticate(session, org_id="hosp-1", username="li", password=password)).reason


def test_add_list_lock_reset_disable(tmp_path: Path) -> None:
    keys = tmp_path / "jwks.json"
    keys.write_text(json.dumps(jwks(generate_ec_key())))
    common = ["--data-dir", str(tmp_path)]
    org = runner.invoke(
        app,
        [
            "org",
            "add",
            "--id",
            "hosp-1",
            "--name",
            "市第一人民医院",
            "--type",
            "hospital",
            "--jwks",
            str(keys),
            *common,
        ],
    )
    assert org.exit_code == 0, org.output

    added = runner.invoke(
        app,
        [
            "user",
            "add",
            "--org",
            "hosp-1",
            "--username",
            "li",
            "--name",
            "李医生",
            "--role",
            "doctor",
            "--department",
            "呼吸内科",
            *common,
        ],
    )
    assert added.exit_code == 0, added.output
    password = re.search(r"one-time password: (\S+)", added.output)
    assert password is not None
    again = runner.invoke(
        app, ["user", "add", "--org", "hosp-1", "--username", "li", "--name", "李", "--role", "doctor", *common]
    )
    assert again.exit_code == 2
    assert "exists" in again.output
    assert "Traceback" not in again.output
    wrong_role = runner.invoke(
        app, ["user", "add", "--org", "hosp-1", "--username", "x", "--name", "某", "--role", "pilot", *common]
    )
    assert wrong_role.exit_code == 2

    async def stored_hash() -> str:
        async with gateway_transaction(_settings(tmp_path, "")) as session:
            user = await store.user_by_name(session, "hosp-1", "li")
            assert user is not None
            return user.password_hash or ""

    assert asyncio.run(stored_hash()).startswith("$argon2id$")
    assert asyncio.run(_authenticate(tmp_path, password.group(1))) == ""
    reasons = [asyncio.run(_authenticate(tmp_path, "wrong-password")) for _ in range(users.MAX_FAILED_ATTEMPTS)]
    assert reasons == ["invalid"] * (users.MAX_FAILED_ATTEMPTS - 1) + ["locked"]
    assert asyncio.run(_authenticate(tmp_path, password.group(1))) == "locked"
    listed = runner.invoke(app, ["user", "list", "--org", "hosp-1", *common])
    assert "李医生" in listed.output
    assert "locked" in listed.output

    reset = runner.invoke(app, ["user", "reset-password", "--org", "hosp-1", "--username", "li", *common])
    assert reset.exit_code == 0, reset.output
    fresh = re.search(r"one-time password: (\S+)", reset.output)
    assert fresh is not None
    assert asyncio.run(_authenticate(tmp_path, fresh.group(1))) == ""

    disabled = runner.invoke(app, ["user", "disable", "--org", "hosp-1", "--username", "li", *common])
    assert disabled.exit_code == 0
    assert asyncio.run(_authenticate(tmp_path, fresh.group(1))) == "disabled"
    assert "disabled" in runner.invoke(app, ["user", "list", "--org", "hosp-1", *common]).output


def test_roles_follow_the_exchange_table_of_organisation_types(tmp_path: Path) -> None:
    """A person gets only a role their organisation's type may assert (the one table in
    services/shared/user_assertion.py): no data steward at a hospital, nothing but auditors at
    an authority (whose people the platform operator adds with `hie user add`), stewards at the
    platform operator."""
    common = ["--data-dir", str(tmp_path)]
    for org_id, org_type in (("hosp-1", "hospital"), ("wjw", "authority"), ("ops", "platform-admin")):
        keys = tmp_path / f"{org_id}.json"
        keys.write_text(json.dumps(jwks(generate_ec_key())))
        added = runner.invoke(
            app,
            ["org", "add", "--id", org_id, "--name", "某机构", "--type", org_type, "--jwks", str(keys), *common],
        )
        assert added.exit_code == 0, added.output

    def add(org_id: str, username: str, role: str) -> Any:
        return runner.invoke(
            app,
            ["user", "add", "--org", org_id, "--username", username, "--name", "某人", "--role", role, *common],
        )

    for org_id, role in (("hosp-1", "data-steward"), ("wjw", "admin"), ("wjw", "doctor"), ("ops", "doctor")):
        refused = add(org_id, f"x-{role}", role)
        assert refused.exit_code == 2, (org_id, role, refused.output)
        assert "role must be one of" in refused.output
        assert "for an organisation of type" in refused.output
        assert "Traceback" not in refused.output
    for org_id, role in (("hosp-1", "admin"), ("hosp-1", "auditor"), ("wjw", "auditor"), ("ops", "data-steward")):
        accepted = add(org_id, f"ok-{role}", role)
        assert accepted.exit_code == 0, (org_id, role, accepted.output)
