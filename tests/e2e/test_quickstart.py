"""The README's quick start and the first hour of an operator: `hie up` runs every service as its
own process and supervises them; `hie demo` completes an exchange against it (twice, reusing its
organisations); the quick-start script runs twice in a row in one clone; taken ports are refused
with the option that moves them; SIGTERM / Ctrl-C stops everything; the README's token steps and
five routes run as written."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from gateway.client import HospitalClient, Practitioner
from services.ops.supervisor import PortUse, taken_ports
from services.shared.keys import load_private_key
from tests.support.factories import person
from tests.support.mllp import send

ROOT = Path(__file__).resolve().parents[2]
HIE = [sys.executable, "-m", "services.ops.cli"]
# kill -9 of a service to the exchange answering through the gateway again: restart backoff
# (0.5 s) + the service's start (~2 s alone, slower on a busy 2-core machine) + the gateway's
# channel reconnect. Generous, as the machine is shared.
RECOVERY_BOUND_SECONDS = 30.0


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _ports() -> tuple[int, int, int]:
    """(gateway port, service base port, MLLP port), all free now."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + 40 > 65535:
            continue
        # hie up's metrics ports default to the service base port + 40 on: free too.
        if all(_free(p) for p in (*range(base, base + 6), base + 30, base + 31, *range(base + 40, base + 47))):
            return base + 30, base, base + 31
    raise RuntimeError("no free port range")


def _env(data_dir: Path, ports: tuple[int, int, int]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HIE_", "OTEL_", "QUICKSTART_"))}
    gateway, base, mllp = ports
    env.update(
        HIE_DATA_DIR=str(data_dir),
        HIE_GATEWAY_PORT=str(gateway),
        HIE_SERVICE_BASE_PORT=str(base),
        HIE_MLLP_PORT=str(mllp),
    )
    return env


def _all_ports(ports: tuple[int, int, int]) -> list[PortUse]:
    gateway, base, mllp = ports
    return [PortUse(p, "any", "") for p in (gateway, *range(base, base + 6), mllp)]


class _Output:
    """Collects a process's output on a thread; waits for a line."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._proc = proc
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text)
            if found:
                return found
            assert self._proc.poll() is None or self._thread.is_alive(), self.text
            time.sleep(0.1)
        raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.text}")

    def finish(self) -> str:
        self._thread.join(timeout=30)
        return self.text


def _hie(*args: str, env: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HIE, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _start_up(env: dict[str, str]) -> tuple[subprocess.Popen[str], _Output]:
    up = subprocess.Popen(
        [*HIE, "up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    return up, _Output(up)


def _stop(up: subprocess.Popen[str], output: _Output) -> str:
    if up.poll() is None:
        up.send_signal(signal.SIGTERM)
    up.wait(timeout=60)
    return output.finish()


def test_hie_up_then_demo_twice_then_stop(tmp_path: Path) -> None:
    ports = _ports()
    env = _env(tmp_path, ports)
    up, output = _start_up(env)
    try:
        # Readiness is the gateway answering, asked through `hie status`.
        ready = _hie("status", "--wait", "120", env=env, timeout=150)
        assert ready.returncode == 0, ready.stderr + output.text
        assert f"exchange ready: http://127.0.0.1:{ports[0]}" in ready.stdout
        for _ in range(2):
            demo = _hie("demo", env=env)
            assert demo.returncode == 0, demo.stdout + demo.stderr
            assert "link: national-id" in demo.stdout
            assert "demo exchange completed" in demo.stdout
            # The auditor's view: who, role, organisation, purpose, masked patient, consent, trace.
            assert "who:      王医生 (B-D0007), doctor, 城东社区卫生服务中心 (demo-chc-b)" in demo.stdout
            assert "purpose:  treatment" in demo.stdout
            assert "patient:  张* (enterprise id" in demo.stdout
            assert "consent:  permitted" in demo.stdout
            assert "张三" not in demo.stdout.split("authority reads")[1]
            # A remote consultation: the signed report verified by the requester with published keys.
            assert "signature verified with key" in demo.stdout
            # It ends with the web console's address and a person to sign in with.
            assert f"web console: http://127.0.0.1:{ports[0]}/console/" in demo.stdout.splitlines()[-1]
            assert "user auditor, password " in demo.stdout.splitlines()[-1]
        # The HL7 v2 ingress `hie up` started (after the mpi) takes a member hospital's ADT feed.
        output.wait_for(rf"mllp\s+127\.0\.0\.1:{ports[2]} ", timeout=30)
        feed = (
            "MSH|^~\\&|HIS|demo-hosp-a|HIE|HIE|20261201120000||ADT^A04^ADT_A04|UP-1|P|2.5|||||CHN|UNICODE UTF-8\r"
            "PID|1||V2-UP-1^^^demo-hosp-a^MR||周^八||19800101|M"
        )
        ack = asyncio.run(send(ports[2], feed.encode())).decode()
        assert "\rMSA|AA|UP-1" in ack, ack
        # The second run reused the demo's three organisations.
        listed = _hie("org", "list", env=env)
        assert listed.stdout.splitlines()[0].split()[:4] == ["ID", "TYPE", "STATUS", "CLIENT"]
        assert sorted(line.split()[0] for line in listed.stdout.splitlines()[1:]) == [
            "demo-authority",
            "demo-chc-b",
            "demo-hosp-a",
        ]
        # Each service has its own SQLite database.
        assert {p.name for p in tmp_path.glob("*.db")} == {
            "mpi.db",
            "registry.db",
            "consent.db",
            "referral.db",
            "teleconsult.db",
            "audit.db",
            "gateway.db",
        }
        # A checkpoint kept outside, then verified against: it says it matched.
        checkpoint = _hie("audit", "checkpoint", env=env)
        assert checkpoint.returncode == 0, checkpoint.stderr
        held = tmp_path / "held.jws"
        held.write_text(checkpoint.stdout)
        verified = _hie("audit", "verify", "--expect", str(held), env=env)
        assert verified.returncode == 0, verified.stderr
        assert "audit chain intact" in verified.stdout
        assert "your checkpoint matched" in verified.stdout
        # A checkpoint whose signature does not verify is a verification failure (1), on one line.
        header, payload, signature = checkpoint.stdout.strip().split(".")
        held.write_text(f"{header}.{payload}.{signature[::-1]}")
        forged = _hie("audit", "verify", "--expect", str(held), env=env)
        assert forged.returncode == 1, forged.stderr
        assert "signature does not verify" in forged.stderr
        assert len(forged.stderr.strip().splitlines()) == 1
        # Gateway key rotation: in the running exchange's folder by default, confirmed as served.
        rotated = _hie("keys", "rotate", env=env)
        assert rotated.returncode == 0, rotated.stdout + rotated.stderr
        assert "serves the new key" in rotated.stdout
    finally:
        text = _stop(up, output)
    assert up.returncode == 0, text
    assert "stopping" in text
    assert "the quick start" not in text
    assert "run `hie demo` in another terminal" in text
    assert not (tmp_path / "up.json").exists()
    assert taken_ports(_all_ports(ports)) == []
    # With the exchange stopped: one line and exit 3, no traceback.
    stopped = _hie("audit", "verify", env=env)
    assert stopped.returncode == 3, stopped.stderr
    assert stopped.stderr.startswith("error: cannot reach the audit service")
    assert "Traceback" not in stopped.stderr
    assert len(stopped.stderr.strip().splitlines()) == 1


def _quickstart(env: dict[str, str]) -> str:
    """Run the quick start as a user does, wait for its demo, then press Ctrl-C (SIGINT to the
    foreground process group, as a terminal does)."""
    proc = subprocess.Popen(
        ["bash", str(ROOT / "deploy/local/quickstart.sh")],  # noqa: S607 - bash from PATH, as the README runs it
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    output = _Output(proc)
    try:
        output.wait_for(r"Ctrl-C stops it\.|demo failed|did not|Traceback", timeout=240)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    return output.finish()


def test_quickstart_script_twice_in_the_same_clone(tmp_path: Path) -> None:
    ports = _ports()
    env = _env(tmp_path / "data", ports)
    env.update(QUICKSTART_SKIP_INSTALL="1", QUICKSTART_VENV=sys.prefix)
    for run in (1, 2):
        text = _quickstart(env)
        assert "demo exchange completed" in text, f"run {run}:\n{text}"
        assert "the quick start runs the demo now" in text
        assert "run `hie demo` in another terminal" not in text
        assert "stopping" in text, f"run {run}:\n{text}"
        assert not (tmp_path / "data" / "up.json").exists(), f"run {run} left its state file:\n{text}"
        assert taken_ports(_all_ports(ports)) == [], f"run {run} left a process listening:\n{text}"


@pytest.mark.parametrize("which", ["gateway", "audit", "mllp"])
def test_hie_up_refuses_a_taken_port_naming_the_option(tmp_path: Path, which: str) -> None:
    ports = _ports()
    gateway, base, mllp = ports
    port, option = {
        "gateway": (gateway, "--gateway-port"),
        "audit": (base + 5, "--service-base-port"),
        "mllp": (mllp, "--mllp-port"),
    }[which]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = _hie("up", env=_env(tmp_path, ports), timeout=60)
    assert result.returncode == 4, result.stdout + result.stderr
    assert f"port {port} ({which}) is already in use: move it with {option}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "keys").exists(), "nothing is started or created before the ports are checked"


async def _register_until_answered(client: HospitalClient, bound: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < bound:
        try:
            response = await client.call("POST", "/api/v1/patients", json={"local_id": "R-1", **person()})
            if response.status_code in (200, 201):
                return time.monotonic() - started
        except httpx.HTTPError:  # a refused connection while the service restarts
            pass
        await asyncio.sleep(0.2)
    raise AssertionError(f"the exchange did not answer within {bound} s")


def test_hie_up_restarts_a_killed_service(tmp_path: Path) -> None:
    env = _env(tmp_path, _ports())
    keygen = _hie("org", "keygen", "--id", "hosp-r", "--out", str(tmp_path), env=env)
    assert keygen.returncode == 0, keygen.stderr
    added = _hie(
        "org", "add", "--id", "hosp-r", "--name", "复原医院", "--type", "hospital",
        "--jwks", str(tmp_path / "hosp-r.jwks.json"), env=env,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    up, output = _start_up(env)
    try:
        assert _hie("status", "--wait", "120", env=env, timeout=150).returncode == 0, output.text
        pid = int(output.wait_for(r"mpi +serving on \S+ \(pid (\d+)\)", 10).group(1))
        client = HospitalClient(
            base_url=f"http://127.0.0.1:{env['HIE_GATEWAY_PORT']}",
            client_id=added.stdout.strip(),
            key=load_private_key(tmp_path / "hosp-r.key.pem"),
            scopes="system/Patient.crs",
        )
        client.practitioner = Practitioner(id="D1", name="李医生", role="doctor", department="内科")

        async def scenario() -> float:
            try:
                await _register_until_answered(client, 60)
                os.kill(pid, signal.SIGKILL)
                return await _register_until_answered(client, RECOVERY_BOUND_SECONDS)
            finally:
                await client.aclose()

        recovered = asyncio.run(scenario())
        output.wait_for(r"mpi exited \(killed by SIGKILL\); restarting in", 5)
        output.wait_for(r"mpi restarted \(pid \d+\)", 5)
        assert up.poll() is None, "hie up kept running"
        print(f"exchange answered again {recovered:.1f} s after kill -9 of mpi")
    finally:
        text = _stop(up, output)
    assert up.returncode == 0, text


def _shell_blocks(section: str, next_section: str) -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    text = readme[readme.index(section) : readme.index(next_section)]
    return "\n".join(re.findall(r"```sh\n(.*?)```", text, flags=re.S))


def test_the_readme_token_steps_and_five_routes_work_as_written(tmp_path: Path) -> None:
    """Found walking the README: it signed one user assertion and sent it with every request, so
    every route after the first answered 401 `user-assertion-replayed` (an assertion is used once);
    the content route needed a DOCUMENT_ID typed in by hand."""
    ports = _ports()
    env = _env(tmp_path / "data", ports)
    script = _shell_blocks("### Getting a token, step by step", "## How far one machine goes")
    script = script.replace("127.0.0.1:8400", f"127.0.0.1:{ports[0]}")
    work = tmp_path / "hospital"
    work.mkdir()
    up, output = _start_up(env)
    try:
        ready = _hie("status", "--wait", "120", env=env, timeout=150)
        assert ready.returncode == 0, ready.stderr + output.text
        # `hie` and `python` of the installed project first on the PATH, as after `source .venv/bin/activate`.
        shell_env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}
        run = subprocess.run(
            ["bash", "-c", "set -eo pipefail\n" + script],  # noqa: S607 - bash from PATH, as a user runs it
            cwd=work,
            env=shell_env,
            capture_output=True,
            text=True,
            timeout=240,
        )
    finally:
        _stop(up, output)
    assert run.returncode == 0, run.stdout + run.stderr
    answers = run.stdout
    assert '"error"' not in answers, answers
    registered, xrefs, document, found = (json.loads(line) for line in answers.splitlines() if line.startswith("{"))
    assert registered["local_id"] == "X-MRN-0001"
    assert registered["created"] is True
    assert {"domain": "hosp-x", "local_id": "X-MRN-0001"} in xrefs["identities"]
    assert document["created"] is True
    assert [e["document_id"] for e in found["entries"]] == [document["document_id"]]
    assert "repr-digest: sha-256=" in answers.lower()
    assert answers.rstrip().endswith(
        '<ClinicalDocument xmlns="urn:hl7-org:v3"><title>出院小结</title></ClinicalDocument>'
    )
