"""Running a gang of worker processes that live and die together.

Owns: starting the workers of one job on this machine, prefixing their output, forwarding stop
signals, and the gang's exit code. Guarantees:
- Output lines of worker `name` appear on our stdout as `[name] line`, whole lines, unmixed.
- SIGTERM, SIGINT and SIGUSR1 sent to the gang are forwarded to every running worker (the
  harness saves at the same step on all of them and exits with the preemption code).
- A gang never hangs on a dead member: once a worker fails (exits neither 0 nor with the
  preemption code), the others get `grace_seconds` to exit on their own (TensorFlow's peer
  timeouts normally make them fail first), then are SIGKILLed.
- The exit code is 0 if all workers succeeded; the preemption code if every worker that did not
  succeed exited with it; otherwise the code of the first worker to fail (128 + signal number
  for one killed by a signal), which is the root cause rather than its consequences.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TextIO

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


@dataclass(frozen=True)
class WorkerSpec:
    """One member of a gang: a name for its log prefix, its command line and its environment."""

    name: str
    command: Sequence[str]
    env: Mapping[str, str]


def exit_status(returncode: int) -> int:
    """A `Popen.returncode` as a shell would report it (a signal `n` becomes `128 + n`)."""
    return 128 - returncode if returncode < 0 else returncode


def preemption_exit_code_of(overrides: Sequence[str], *, default: int) -> int:
    """The `preemption.exit_code` the workers run with: the last such override, else `default`."""
    values = [override.split("=", 1)[1] for override in overrides if override.startswith("preemption.exit_code=")]
    return int(values[-1]) if values and values[-1].strip().isdigit() else default


def gang_exit_code(codes: Sequence[int], *, preemption_exit_code: int) -> int:
    """The gang's exit code from its workers' exit statuses, in the order they exited."""
    failures = [code for code in codes if code != 0]
    if not failures:
        return 0
    if all(code == preemption_exit_code for code in failures):
        return preemption_exit_code
    return next(code for code in failures if code != preemption_exit_code)


class Gang:
    """Starts the workers and supervises them; `run()` returns the gang's exit code."""

    def __init__(self, workers: Sequence[WorkerSpec], *, preemption_exit_code: int, grace_seconds: float,
                 cwd: str | None = None, out: TextIO | None = None) -> None:
        if not workers:
            raise ValueError("a gang needs at least one worker")
        if grace_seconds < 0:
            raise ValueError(f"grace_seconds must be >= 0, got {grace_seconds}")
        self._workers = list(workers)
        self._preemption_exit_code = preemption_exit_code
        self._grace_seconds = grace_seconds
        self._cwd = cwd
        self._out = out or sys.stdout
        self._write_lock = threading.Lock()
        self._processes: list[subprocess.Popen[bytes]] = []

    def run(self) -> int:
        """Run all workers to the end. Installs signal handlers: call from the main thread."""
        previous = {sig: signal.signal(sig, self._forward) for sig in FORWARDED_SIGNALS}
        try:
            return self._supervise()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _supervise(self) -> int:
        pumps = []
        for worker in self._workers:
            process = subprocess.Popen(list(worker.command), env=dict(worker.env), cwd=self._cwd,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            self._processes.append(process)
            self.announce(f"started {worker.name} (pid {process.pid})")
            pump = threading.Thread(target=self._pump, args=(worker.name, process), daemon=True)
            pump.start()
            pumps.append(pump)
        exited: dict[int, int] = {}  # worker position -> exit status, in exit order
        kill_at: float | None = None
        while len(exited) < len(self._processes):
            for position, process in enumerate(self._processes):
                if position in exited or process.poll() is None:
                    continue
                status = exited[position] = exit_status(process.returncode)
                self.announce(f"{self._workers[position].name} exited with code {status}")
                if status not in (0, self._preemption_exit_code) and kill_at is None:
                    kill_at = time.monotonic() + self._grace_seconds
                    self.announce(f"{self._workers[position].name} failed: the other workers get "
                                  f"{self._grace_seconds:g}s to exit, then are killed")
            if kill_at is not None and time.monotonic() >= kill_at:
                for position, process in enumerate(self._processes):
                    if position not in exited and process.poll() is None:
                        self.announce(f"killing {self._workers[position].name} (pid {process.pid})")
                        process.kill()
                kill_at = float("inf")  # killed once; their exits are collected above
            time.sleep(0.1)
        for pump in pumps:
            pump.join(timeout=5)
        code = gang_exit_code(list(exited.values()), preemption_exit_code=self._preemption_exit_code)
        self.announce(f"gang exited with code {code}")
        return code

    def _forward(self, signum: int, frame: object) -> None:
        for process in self._processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):  # it exited in between
                    os.kill(process.pid, signum)

    def _pump(self, name: str, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for raw in iter(process.stdout.readline, b""):
            self._write(f"[{name}] {raw.decode(errors='replace').rstrip()}")
        process.stdout.close()

    def announce(self, message: str) -> None:
        """A line from the gang itself, prefixed `[gang]`."""
        self._write(f"[gang] {message}")

    def _write(self, line: str) -> None:
        with self._write_lock:
            self._out.write(line + "\n")
            self._out.flush()
