"""Restart accounting: a small persistent record of every attempt of a run, in `run_dir`.

Owns: `run_dir/run_record.json` (written atomically by the chief, read by every worker and by
`scripts/inspect_checkpoint.py`). A job restarted by a scheduler for days keeps one record of
restarts, preemptions, crashes, kills, rollbacks, steps redone and wall time lost. Guarantees:
- An attempt is marked in progress when training starts; its end (done, preempted, crashed, ...)
  is recorded when the process ends in any way it can observe. An attempt still marked in
  progress at the next start vanished without a word: SIGKILL, the OOM killer, a lost machine.
  Those count as kills, not crashes: a scheduler's SIGKILL must not look like a bug.
- `trainer.max_crash_restarts` crashes in a row at the same step (exceptions, hangs, lost peers)
  make the next start refuse with `CrashLoopError` (exit code 7), so a scheduler's retry loop on a
  deterministic bug ends. A changed config or harness version resets the count: the user fixed
  something. Preemptions and kills never count.
- Steps redone are the steps an attempt trained beyond the checkpoint the next one resumed from
  (a lower bound: progress is recorded at log and checkpoint steps); wall time lost is their time
  plus every restart's start-up time until the checkpoint was restored.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import tensorflow as tf

from harness.errors import CrashLoopError

log = logging.getLogger(__name__)

RECORD_FILE = "run_record.json"
CRASH_OUTCOMES = ("crashed", "hung", "stalled")  # count towards trainer.max_crash_restarts
_HISTORY_LENGTH = 20


@dataclass
class RunRecord:
    attempts: int = 0  # processes that started training (the first one and every restart)
    restarts: int = 0  # attempts that resumed from a checkpoint
    preemptions: int = 0  # attempts stopped by a signal after saving
    crashes: int = 0  # attempts ended by an exception, the hang watchdog or a lost peer
    kills: int = 0  # attempts that vanished without recording an end (SIGKILL, OOM killer, lost machine)
    rollbacks: int = 0  # divergence rollbacks
    steps_redone: int = 0  # steps trained again after restarts (a lower bound)
    wall_time_lost_seconds: float = 0.0  # the time of those steps plus restart start-up time
    consecutive_crashes: int = 0  # crashes in a row at crash_step
    crash_step: int | None = None
    crash_fingerprint: str | None = None  # config + harness version the crashes happened with
    current: dict[str, Any] | None = None  # the attempt in progress
    history: list[dict[str, Any]] = field(default_factory=list)  # the latest attempts, oldest first

    def summary(self) -> str:
        return (f"attempt {self.attempts}: {self.restarts} restarts ({self.preemptions} preemptions, "
                f"{self.kills} kills, {self.crashes} crashes), {self.rollbacks} rollbacks, "
                f"{self.steps_redone} steps redone, "
                f"{self.wall_time_lost_seconds:.0f} s lost")

    def scalars(self) -> dict[str, float]:
        """The counters as TensorBoard scalars."""
        return {f"run/{name}": float(getattr(self, name)) for name in (
            "restarts", "preemptions", "crashes", "kills", "rollbacks", "steps_redone", "wall_time_lost_seconds")}


def record_path(run_dir: str) -> str:
    return os.path.join(run_dir, RECORD_FILE)


def read_record(run_dir: str) -> RunRecord | None:
    """The record of `run_dir`, or None if there is none (or it is unreadable: it is advisory)."""
    path = record_path(run_dir)
    try:
        if not tf.io.gfile.exists(path):
            return None
        with tf.io.gfile.GFile(path, "r") as handle:
            content = json.loads(handle.read())
        return _parse(content)
    except (OSError, tf.errors.OpError, ValueError, TypeError) as error:
        log.warning("ignoring the unreadable run record %s (%s)", path, error)
        return None


def _parse(content: object) -> RunRecord:
    """A `RunRecord` from parsed JSON; `ValueError` unless every known field has its type."""
    if not isinstance(content, dict):
        raise ValueError(f"expected a JSON object, found {type(content).__name__}")
    known = {f.name: f for f in dataclasses.fields(RunRecord)}
    record = RunRecord(**{key: value for key, value in content.items() if key in known})
    numbers = ("attempts", "restarts", "preemptions", "crashes", "kills", "rollbacks", "steps_redone",
               "consecutive_crashes")
    valid = (all(isinstance(getattr(record, name), int) and not isinstance(getattr(record, name), bool)
                 for name in numbers)
             and isinstance(record.wall_time_lost_seconds, (int, float))
             and (record.crash_step is None or isinstance(record.crash_step, int))
             and (record.crash_fingerprint is None or isinstance(record.crash_fingerprint, str))
             and (record.current is None or isinstance(record.current, dict))
             and isinstance(record.history, list) and all(isinstance(item, dict) for item in record.history))
    if not valid:
        raise ValueError("a field has the wrong type")
    return record


class RunAccounting:
    """The chief's handle on the record for one attempt; other workers only read it."""

    def __init__(self, run_dir: str, *, writer: bool, max_crash_restarts: int, fingerprint: str,
                 may_write: Callable[[], bool] = lambda: True) -> None:
        self.path = record_path(run_dir)
        self.writer = writer
        self.may_write = may_write  # false once this process lost the lease: the record is the new holder's
        self.max_crash_restarts = max_crash_restarts
        self.fingerprint = fingerprint
        self.run_dir = run_dir
        self.record = read_record(run_dir) or RunRecord()

    def reread(self) -> None:
        """Read the record again: another process may have written it since (while we waited for the lease)."""
        self.record = read_record(self.run_dir) or RunRecord()

    def refuse_crash_loop(self) -> None:
        """Raise `CrashLoopError` if the last attempts crashed too often at the same step."""
        r = self.record
        if not self.max_crash_restarts or r.consecutive_crashes < self.max_crash_restarts:
            return
        if r.crash_fingerprint != self.fingerprint:
            log.warning("the last %d attempts crashed at step %s, but the config or harness version changed since: "
                        "trying again", r.consecutive_crashes, r.crash_step)
            r.consecutive_crashes = 0
            return
        raise CrashLoopError(
            f"The last {r.consecutive_crashes} attempts of this run all crashed at step {r.crash_step} (see "
            f"{self.path} and their logs), so a restart would crash again: refusing to start "
            f"(trainer.max_crash_restarts={self.max_crash_restarts}). Fix the cause; a changed config or harness "
            "version resets the count, or run once with trainer.max_crash_restarts=0 to try again as is.")

    def begin(self, *, start_step: int | None, process_started: float) -> int:
        """Account for the previous attempt and mark this one in progress (chief only writes); return its
        start step.

        `start_step` None: not known (the attempt failed before it restored); taken as the step the previous
        attempt reached, so that no steps count as redone.
        """
        r = self.record
        previous = r.current
        if start_step is None:
            last_known = previous or (r.history[-1] if r.history else {})
            start_step = int(last_known.get("end_step", last_known.get("step", 0)) or 0)
        if previous is not None:  # it never recorded an end: killed
            r.kills += 1
            self._close(previous, outcome="killed", step=previous.get("step", start_step))
        last = r.history[-1] if r.history else None
        if last is not None and last.get("outcome") not in ("completed", "already_complete"):
            redone = max(int(last.get("end_step", start_step)) - start_step, 0)
            r.steps_redone += redone
            r.wall_time_lost_seconds += redone * float(last.get("seconds_per_step") or 0.0)
            r.wall_time_lost_seconds += max(time.time() - process_started, 0.0)
            r.restarts += 1
        r.attempts += 1
        r.current = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                     "start_step": start_step, "step": start_step, "seconds_per_step": None}
        self._write()
        log.info("run record: %s", r.summary())
        return start_step

    def progress(self, step: int, *, seconds_per_step: float | None = None) -> None:
        """Note the step reached (at log and checkpoint steps)."""
        if self.record.current is None:
            return
        self.record.current["step"] = step
        if seconds_per_step:
            self.record.current["seconds_per_step"] = seconds_per_step
        self._write()

    def rollback(self) -> None:
        self.record.rollbacks += 1
        self._write()

    def finish(self, outcome: str, *, step: int, detail: str | None = None) -> None:
        """Record how this attempt ended: completed, already_complete, preempted, crashed, hung, stalled, ...
        (`detail`: what a reader of the history needs beyond the outcome, e.g. which phase hung)."""
        r = self.record
        if r.current is None:
            return
        if outcome == "preempted":
            r.preemptions += 1
        if outcome in CRASH_OUTCOMES:
            r.crashes += 1
            same = r.crash_step == step and r.crash_fingerprint == self.fingerprint
            r.consecutive_crashes = r.consecutive_crashes + 1 if same else 1
            r.crash_step, r.crash_fingerprint = step, self.fingerprint
        else:
            r.consecutive_crashes, r.crash_step, r.crash_fingerprint = 0, None, None
        self._close(r.current, outcome=outcome, step=step, detail=detail)
        self._write()

    def _close(self, attempt: dict[str, Any], *, outcome: str, step: int, detail: str | None = None) -> None:
        ended = {"ended": time.time(), "end_step": step, "outcome": outcome, **({"detail": detail} if detail else {})}
        self.record.history = [*self.record.history, {**attempt, **ended}][-_HISTORY_LENGTH:]
        self.record.current = None

    def _write(self) -> None:
        if not self.writer or not self.may_write():
            return
        temporary = f"{self.path}.tmp-{os.getpid()}"
        try:
            tf.io.gfile.makedirs(os.path.dirname(self.path))
            with tf.io.gfile.GFile(temporary, "w") as handle:
                handle.write(json.dumps(dataclasses.asdict(self.record), indent=1))
            tf.io.gfile.rename(temporary, self.path, overwrite=True)
        except (OSError, tf.errors.OpError) as error:  # accounting must never stop training
            log.warning("could not update the run record %s (%s)", self.path, error)
