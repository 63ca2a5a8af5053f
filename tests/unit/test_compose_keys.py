"""The compose stack as deploy/README.md runs it: `hie keys init --dir deploy/keys`, mounted read
only at /etc/hie/keys in every exchange process. Each key file a process uses is one that command
writes, read from that mount (not created per container on its tmpfs data dir)."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from services.ops.cli import app

ROOT = Path(__file__).resolve().parents[2]
MOUNT = "/etc/hie/keys"


def _exchange_processes() -> dict[str, dict[str, str]]:
    compose = yaml.safe_load((ROOT / "deploy/compose.yaml").read_text(encoding="utf-8"))
    return {
        name: {k: str(v) for k, v in service["environment"].items()}
        for name, service in compose["services"].items()
        if any(volume.startswith("./keys:") for volume in service.get("volumes", []))
    }


def test_every_compose_process_reads_its_keys_from_what_keys_init_writes(tmp_path: Path) -> None:
    """Found reading the compose file for a newcomer: HIE_DATA_KEYS_FILE was not set, so each
    container sealed patient data with a data key it created on its tmpfs (lost with the container:
    the mpi's and the registry's data unreadable after a restart); and the gateway's console key
    (console.pem beside gateway.pem) was not among the files `hie keys init` writes, while the
    gateway would create it in the read-only mount on the first console sign-in."""
    keys = tmp_path / "keys"
    result = CliRunner().invoke(app, ["keys", "init", "--dir", str(keys)], env={"HIE_CRYPTO_SUITE": "aes"})
    assert result.exit_code == 0, result.output
    written = {p.name for p in keys.iterdir() if p.is_file()}
    processes = _exchange_processes()
    assert {"mpi", "registry", "consent", "referral", "teleconsult", "audit", "gateway", "mllp"} <= set(processes)
    for name, env in processes.items():
        assert env.get("HIE_DATA_KEYS_FILE") == f"{MOUNT}/data-keys.json", name
        files = {k: v for k, v in env.items() if k.endswith("_FILE") and v.startswith("/")}
        for variable, path in files.items():
            assert path.startswith(f"{MOUNT}/"), (name, variable)
            assert path.removeprefix(f"{MOUNT}/") in written, (name, variable, sorted(written))
        if "HIE_GATEWAY_SIGNING_KEY_FILE" in env and name == "gateway":
            assert "console.pem" in written
    assert (keys / "console.pem").stat().st_mode & 0o077 == 0


def test_every_service_that_seals_personal_data_gets_the_data_keys_in_kubernetes() -> None:
    """Found reading k8s/ for a newcomer: the teleconsult Deployment (consultation questions are
    sealed) neither mounted data-keys.json nor set HIE_DATA_KEYS_FILE, so each pod would seal
    with a key of its own on its emptyDir (production refuses to start without one)."""
    from services.shared.components import SERVICES

    for component in SERVICES:
        if not component.spec().protects_personal_data:
            continue
        documents = list(yaml.safe_load_all((ROOT / "k8s/base" / f"{component.name}.yaml").read_text("utf-8")))
        [deployment] = [d for d in documents if d and d["kind"] == "Deployment"]
        pod = deployment["spec"]["template"]["spec"]
        [container] = pod["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env.get("HIE_DATA_KEYS_FILE") == f"{MOUNT}/data-keys.json", component.name
        [keys] = [v for v in pod["volumes"] if v["name"] == "keys"]
        assert "data-keys.json" in {item["key"] for item in keys["secret"]["items"]}, component.name
    # The README's secret command creates that key (the example Secret's shape has it too).
    assert "--from-file=data-keys.json=keys/data-keys.json" in (ROOT / "k8s/README.md").read_text("utf-8")
