"""The README's quick start: `hie up` runs every service as its own process; `hie demo`
completes an exchange against it; SIGTERM stops everything."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _consecutive_free_ports(n: int) -> int:
    for _ in range(50):
        base = _free_ports(1)[0]
        if base + n > 65535:
            continue
        try:
            socks = []
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def test_hie_up_then_demo_then_stop(tmp_path: Path) -> None:
    hie = [sys.executable, "-m", "gateway.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HIE_", "OTEL_"))}
    base = _consecutive_free_ports(6)
    (gateway_port,) = _free_ports(1)
    up = subprocess.Popen(
        [
            *hie,
            "up",
            "--data-dir",
            str(tmp_path),
            "--gateway-port",
            str(gateway_port),
            "--service-base-port",
            str(base),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        state = tmp_path / "up.json"
        deadline = time.monotonic() + 90
        while not state.exists():
            assert up.poll() is None, up.stdout.read() if up.stdout else ""
            assert time.monotonic() < deadline, "hie up did not come up"
            time.sleep(0.2)
        assert json.loads(state.read_text())["gateway_url"] == f"http://127.0.0.1:{gateway_port}"
        demo = subprocess.run(
            [*hie, "demo", "--data-dir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=90
        )
        assert demo.returncode == 0, demo.stdout + demo.stderr
        assert "link: national-id" in demo.stdout
        assert "demo exchange completed" in demo.stdout
        assert "document.retrieve" in demo.stdout
        # It ends with the web console's address and a person to sign in with.
        assert f"web console: http://127.0.0.1:{gateway_port}/console/" in demo.stdout.splitlines()[-1]
        assert "user auditor, password " in demo.stdout.splitlines()[-1]
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
    finally:
        up.send_signal(signal.SIGTERM)
        output, _ = up.communicate(timeout=30)
    assert up.returncode == 0, output
    assert "stopping" in output
    assert not (tmp_path / "up.json").exists()
