"""`hie up`'s supervisor: restart with growing backoff, give up on a crash loop only, free-port probe."""

from __future__ import annotations

import socket
import sys
import time

import pytest

from services.ops.supervisor import (
    CRASH_LIMIT,
    CRASH_WINDOW_SECONDS,
    FIRST_BACKOFF_SECONDS,
    GaveUp,
    PortUse,
    Supervisor,
    taken_ports,
)

CRASHING = [sys.executable, "-c", "raise SystemExit(3)"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _until_exited(supervisor: Supervisor) -> None:
    for child in supervisor.children:
        assert child.process is not None
        child.process.wait(timeout=30)


def test_restarts_with_growing_backoff_then_gives_up_on_a_crash_loop() -> None:
    clock, log = Clock(), []
    supervisor = Supervisor(log=log.append, clock=clock)
    supervisor.start("audit", CRASHING, {})
    delays = []
    for _ in range(CRASH_LIMIT - 1):
        _until_exited(supervisor)
        supervisor.check()  # notes the crash, schedules the restart
        child = supervisor.children[0]
        assert child.restart_at is not None
        delays.append(child.restart_at - clock.now)
        clock.now = child.restart_at
        supervisor.check()  # restarts
    _until_exited(supervisor)
    with pytest.raises(GaveUp) as gave_up:
        supervisor.check()
    assert delays == [FIRST_BACKOFF_SECONDS * 2**i for i in range(CRASH_LIMIT - 1)]
    assert gave_up.value.name == "audit"
    assert gave_up.value.crashes == CRASH_LIMIT
    assert gave_up.value.returncode == 3
    assert "audit exited (exit code 3); restarting in 0.5 s" in log[0]
    assert any("audit restarted (pid" in line for line in log)


def test_crashes_spread_beyond_the_window_never_give_up() -> None:
    clock, log = Clock(), []
    supervisor = Supervisor(log=log.append, clock=clock)
    supervisor.start("mpi", CRASHING, {})
    for _ in range(CRASH_LIMIT * 2):
        _until_exited(supervisor)
        # Each crash after a long stable run: backoff back at its first step, no crash loop.
        clock.now += CRASH_WINDOW_SECONDS
        supervisor.check()
        assert supervisor.children[0].restart_at == clock.now + FIRST_BACKOFF_SECONDS
        clock.now += FIRST_BACKOFF_SECONDS
        supervisor.check()
    assert supervisor.children[0].backoff == FIRST_BACKOFF_SECONDS * 2
    supervisor.stop_all()


def test_stop_all_terminates_running_children() -> None:
    supervisor = Supervisor(log=lambda _m: None)
    child = supervisor.start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], {})
    started = time.monotonic()
    supervisor.stop_all()
    assert child.process is not None
    assert child.process.returncode is not None
    assert time.monotonic() - started < 15


def test_taken_ports_finds_a_listener_only() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert taken_ports([PortUse(port, "gateway", "--gateway-port")]) == [PortUse(port, "gateway", "--gateway-port")]
    assert taken_ports([PortUse(port, "gateway", "--gateway-port")]) == []
