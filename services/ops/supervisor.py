"""How `hie up` keeps its processes running: free-port checks before start, and a supervisor that
restarts a crashed process with backoff and gives up only on a crash loop (as systemd's
`Restart=on-failure` with `StartLimitBurst` / `StartLimitIntervalSec`, or supervisord, do)."""

from __future__ import annotations

import ctypes
import errno
import signal
import socket
import subprocess
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# A restart waits 0.5 s, then twice as long after each crash in a row, at most 8 s.
FIRST_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 8.0
# Up this long, a process counts as recovered: its next crash restarts after the first backoff again.
STABLE_SECONDS = 30.0
# Give up (stop everything) when one process crashed this many times within the window.
CRASH_LIMIT = 5
CRASH_WINDOW_SECONDS = 120.0


@dataclass(frozen=True)
class PortUse:
    """One port `hie up` will listen on, and the option that moves it."""

    port: int
    component: str
    option: str


def taken_ports(uses: Sequence[PortUse], host: str = "127.0.0.1") -> list[PortUse]:
    """The ports somebody already listens on. SO_REUSEADDR lets the probe bind over connections
    in TIME_WAIT (left by our own previous run) but not over a listening socket."""
    taken = []
    for use in uses:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, use.port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                taken.append(use)
    return taken


def duplicate_ports(uses: Sequence[PortUse]) -> list[tuple[PortUse, PortUse]]:
    """Two components given the same port (e.g. --mllp-port inside the gRPC range)."""
    seen: dict[int, PortUse] = {}
    clashes = []
    for use in uses:
        if use.port in seen:
            clashes.append((seen[use.port], use))
        else:
            seen[use.port] = use
    return clashes


def _die_with_parent() -> None:
    """In the child before exec: receive SIGTERM if `hie up` itself dies (even by kill -9), so no
    orphaned service keeps a port; and leave the terminal's process group, so Ctrl-C reaches
    `hie up` alone and it stops the children in order instead of them racing its restarts."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


@dataclass
class Child:
    """One supervised process: how to start it and its recent crash history."""

    name: str
    command: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    crashes: deque[float] = field(default_factory=deque)
    restart_at: float | None = None
    backoff: float = FIRST_BACKOFF_SECONDS

    def start(self, now: float) -> None:
        self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and module names
            self.command, env=self.env, preexec_fn=_die_with_parent, process_group=0
        )
        self.started_at = now
        self.restart_at = None


class GaveUp(Exception):
    """A process crashed CRASH_LIMIT times within CRASH_WINDOW_SECONDS."""

    def __init__(self, name: str, crashes: int, window: float, returncode: int | None) -> None:
        super().__init__(name)
        self.name, self.crashes, self.window, self.returncode = name, crashes, window, returncode


class Supervisor:
    """Starts children, restarts the ones that exit, stops them all (last started first)."""

    def __init__(self, *, log: Callable[[str], None], clock: Callable[[], float] = time.monotonic) -> None:
        self.children: list[Child] = []
        self._log = log
        self._clock = clock

    def start(self, name: str, command: list[str], env: dict[str, str]) -> Child:
        child = Child(name=name, command=command, env=env)
        child.start(self._clock())
        self.children.append(child)
        return child

    def check(self) -> None:
        """One supervision pass: note exits, schedule restarts with backoff, run due restarts.
        Raises GaveUp on a crash loop."""
        now = self._clock()
        for child in self.children:
            proc = child.process
            if child.restart_at is None and proc is not None and proc.poll() is not None:
                if now - child.started_at >= STABLE_SECONDS:
                    child.backoff = FIRST_BACKOFF_SECONDS
                child.crashes.append(now)
                while child.crashes and now - child.crashes[0] > CRASH_WINDOW_SECONDS:
                    child.crashes.popleft()
                if len(child.crashes) >= CRASH_LIMIT:
                    raise GaveUp(child.name, len(child.crashes), CRASH_WINDOW_SECONDS, proc.returncode)
                self._log(
                    f"{child.name} exited ({describe_exit(proc.returncode)}); restarting in {child.backoff:g} s"
                    f" (crash {len(child.crashes)} of {CRASH_LIMIT} allowed in {CRASH_WINDOW_SECONDS:.0f} s)"
                )
                child.restart_at = now + child.backoff
                child.backoff = min(child.backoff * 2, MAX_BACKOFF_SECONDS)
            elif child.restart_at is not None and now >= child.restart_at:
                child.start(now)
                assert child.process is not None
                self._log(f"{child.name} restarted (pid {child.process.pid})")

    def stop_all(self, timeout: float = 15.0) -> None:
        """SIGTERM every child, newest first (the gateway before the services it calls), then
        wait; SIGKILL what is still running after the timeout."""
        running = [c.process for c in reversed(self.children) if c.process is not None]
        for proc in running:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in running:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"
