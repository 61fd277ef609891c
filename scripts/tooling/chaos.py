"""A scheduler in a box: run a training command under a restart loop and kill it at random moments.

Owns: the chaos experiment behind `scripts/chaos.py` and the fault-tolerance tests. It restarts the
*same command* after every kill, as a preemptible-VM scheduler would, until the command exits 0,
and reports kills, restarts, steps redone (steps a killed process had reached beyond the
checkpoint its successor resumed from) and, optionally, whether the final checkpoint is
bit-identical to an uninterrupted reference run of the same command.

It reads the harness's own log lines ("step N/M", "resuming from checkpoint ... at step N",
"stopped at step N") from the child's output, so it needs `trainer.progress=log` (the default
when stdout is not a terminal, as here).
"""

from __future__ import annotations

import random
import re
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_STEP = re.compile(r"step (\d+)/(\d+)")
_RESUMED = re.compile(r"resuming from checkpoint .* at step (\d+)")
_FRESH = re.compile(r"no checkpoint in .*: starting from step 0")
_STOPPED = re.compile(r"stopped at step (\d+)")
_SAVED = re.compile(r"saved checkpoint ckpt-(\d+)")


@dataclass
class Attempt:
    """One process of the experiment."""

    exit_code: int
    signal_sent: str | None  # None: ran until it exited by itself
    resumed_from: int | None  # step restored at start-up (0 for a fresh start); None if never reached
    last_step_seen: int  # highest step it logged or saved
    stopped_at: int | None  # the step of its preemption checkpoint, if it saved one on a signal
    output: str

    @property
    def interrupted(self) -> bool:
        """A signal was sent and the process did not finish anyway (it may land after the last step)."""
        return self.signal_sent is not None and self.exit_code != 0


@dataclass
class ChaosReport:
    attempts: list[Attempt] = field(default_factory=list)
    reference_equal: bool | None = None  # None: no reference run requested
    differing_variables: list[str] = field(default_factory=list)

    @property
    def kills(self) -> int:
        return sum(1 for a in self.attempts if a.interrupted)

    @property
    def restarts(self) -> int:
        return max(0, len(self.attempts) - 1)

    @property
    def steps_redone(self) -> int:
        """Steps done twice: how far each interrupted process got beyond its successor's resume step."""
        redone = 0
        for killed, successor in zip(self.attempts, self.attempts[1:]):
            if successor.resumed_from is not None:
                redone += max(0, killed.last_step_seen - successor.resumed_from)
        return redone

    @property
    def completed(self) -> bool:
        return bool(self.attempts) and self.attempts[-1].exit_code == 0

    def summary(self) -> str:
        lines = [f"attempts: {len(self.attempts)}, kills: {self.kills}, restarts: {self.restarts}, "
                 f"steps redone: {self.steps_redone}, completed: {self.completed}"]
        for index, a in enumerate(self.attempts):
            lines.append(f"  #{index}: resumed from {a.resumed_from}, reached step {a.last_step_seen}, "
                         f"signal {a.signal_sent or '-'}, exit {a.exit_code}"
                         + (f", saved at step {a.stopped_at} on the signal" if a.stopped_at is not None else ""))
        if self.reference_equal is not None:
            lines.append("final checkpoint bit-identical to the uninterrupted reference: "
                         + ("yes" if self.reference_equal else f"NO ({', '.join(self.differing_variables[:5])})"))
        return "\n".join(lines)


class _Progress:
    """Follows a child's output: every line, and the first/last step and max_steps it logged."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.first_step: int | None = None
        self.last_step = 0
        self.max_steps = 0
        self.started = threading.Event()
        self.advanced = threading.Condition()

    def follow(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.lines.append(line)
            match = _STEP.search(line)
            if match:
                with self.advanced:
                    self.last_step, self.max_steps = int(match.group(1)), int(match.group(2))
                    self.first_step = self.last_step if self.first_step is None else self.first_step
                    self.advanced.notify_all()
                self.started.set()
        with self.advanced:
            self.advanced.notify_all()


def run_attempt(command: Sequence[str], *, kill_signal: signal.Signals | None, kill_fraction: float = 0.5,
                jitter: float = 0.0, cwd: str | None = None, env: dict[str, str] | None = None,
                timeout: float = 600) -> Attempt:
    """Run the command once. With `kill_signal`, send it `jitter` seconds after the process has logged
    `kill_fraction` of the steps it had left when training started (so kills land mid-training at any
    training speed; the jitter moves them off the logging boundaries)."""
    process = subprocess.Popen(list(command), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, bufsize=1)
    progress = _Progress()
    reader = threading.Thread(target=progress.follow, args=(process,), daemon=True)
    reader.start()
    sent = None
    if kill_signal is not None:
        deadline = time.monotonic() + timeout
        while not progress.started.is_set() and process.poll() is None and time.monotonic() < deadline:
            progress.started.wait(0.05)  # e.g. an already complete run logs no step at all
        with progress.advanced:
            if progress.first_step is not None:
                target = progress.first_step + kill_fraction * (progress.max_steps - progress.first_step)
                while progress.last_step < target and process.poll() is None and time.monotonic() < deadline:
                    progress.advanced.wait(0.05)
        time.sleep(jitter)
        if process.poll() is None:
            process.send_signal(kill_signal)
            sent = kill_signal.name
    try:
        exit_code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        exit_code = process.wait()
    reader.join(timeout=10)
    return _parse_attempt("".join(progress.lines), exit_code=exit_code, signal_sent=sent)


def _parse_attempt(output: str, *, exit_code: int, signal_sent: str | None) -> Attempt:
    resumed = _RESUMED.search(output)
    resumed_from = int(resumed.group(1)) if resumed else (0 if _FRESH.search(output) else None)
    seen = [int(m.group(1)) for m in _STEP.finditer(output)] + [int(m) for m in _SAVED.findall(output)]
    stopped = _STOPPED.search(output)
    return Attempt(exit_code=exit_code, signal_sent=signal_sent, resumed_from=resumed_from,
                   last_step_seen=max([*seen, resumed_from or 0]),
                   stopped_at=int(stopped.group(1)) if stopped else None, output=output)


def run_chaos(command: Sequence[str], *, kills: int, signals: Sequence[signal.Signals], max_jitter: float, seed: int,
              cwd: str | None = None, env: dict[str, str] | None = None, max_attempts: int | None = None,
              log=print) -> ChaosReport:
    """Interrupt the command `kills` times at random points of its training, restarting it each time,
    then let it finish. Each kill lands after a random fraction (5-90%) of the steps the process had
    left, plus a random 0..`max_jitter` seconds."""
    rng = random.Random(seed)
    report = ChaosReport()
    limit = max_attempts or kills + 5
    while len(report.attempts) < limit:
        kill_signal = rng.choice(list(signals)) if report.kills < kills else None
        fraction, jitter = rng.uniform(0.05, 0.9), rng.uniform(0.0, max_jitter)
        attempt = run_attempt(command, kill_signal=kill_signal, kill_fraction=fraction, jitter=jitter, cwd=cwd,
                              env=env)
        report.attempts.append(attempt)
        log(f"attempt {len(report.attempts)}: resumed from {attempt.resumed_from}, reached {attempt.last_step_seen}, "
            f"signal {attempt.signal_sent or '-'}, exit {attempt.exit_code}")
        if not attempt.interrupted:  # it ended by itself: finished, or failed for a reason of its own
            break
    return report


def reference_command(command: Sequence[str]) -> list[str]:
    """The same command writing elsewhere: `run_dir` (and `checkpoint.dir`, if given) suffixed `-reference`.

    Raises `ValueError` without an explicit `run_dir=`: the reference must not share the run's files.
    """
    if not any(arg.startswith("run_dir=") for arg in command):
        raise ValueError("the command needs an explicit run_dir=... for a reference run")
    return [f"{arg}-reference" if arg.startswith(("run_dir=", "checkpoint.dir=")) else arg for arg in command]


def compare_checkpoints(first: str | Path, second: str | Path) -> list[str]:
    """Names of the training-state variables that are not bit-identical (or exist in only one)."""
    import tensorflow as tf

    from harness.checkpoint.contents import KEY_SUFFIX, OBJECT_GRAPH_KEY, PROVENANCE_KEY

    readers = [tf.train.load_checkpoint(str(path)) for path in (first, second)]
    bookkeeping = {OBJECT_GRAPH_KEY, "save_counter" + KEY_SUFFIX, PROVENANCE_KEY}  # not training state
    names = [set(r.get_variable_to_shape_map()) - bookkeeping for r in readers]
    differing = sorted(names[0] ^ names[1])
    for name in sorted(names[0] & names[1]):
        a, b = (r.get_tensor(name) for r in readers)
        if a.shape != b.shape or a.dtype != b.dtype or a.tobytes() != np.asarray(b).tobytes():
            differing.append(name)
    return differing
