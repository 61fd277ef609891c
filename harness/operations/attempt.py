"""One attempt of a run: who may write, what it resumes from, and how it ended.

Owns: the order of the safety checks at start-up and the bookkeeping at exit, so `train.py` stays
a pipeline. On entry (before anything is written): take the lease on `checkpoint.dir` (chief;
without a lease, check that it is writable), refuse a crash loop. `verify_resume` checks a
checkpoint's provenance against this config before it is restored. `begin` marks the attempt in
progress in the run record. On exit, the attempt's end is recorded from the outcome or the
exception (`HarnessError`s by type, anything else is a crash), and the lease is released. A start
refused before `begin` (a `HarnessError` while restoring) records nothing: a refused start leaves
the run record as it was. A run that lost its lease records nothing either: the run record
belongs to the new holder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from types import TracebackType
from typing import Any

from harness.checkpoint import provenance
from harness.checkpoint.writing import check_writable
from harness.config.run_config import RunConfig
from harness.errors import (
    CrashLoopError,
    DivergedError,
    HarnessError,
    LeaseConflictError,
    StalledError,
    StorageError,
    error_summary,
)
from harness.operations.lease import Lease
from harness.operations.run_record import RunAccounting

_OUTCOME_OF_ERROR = {DivergedError: "diverged", StorageError: "storage_failed", StalledError: "stalled"}


class Attempt:
    """Context manager around everything an attempt does after building the model."""

    def __init__(self, run: RunConfig, *, is_chief: bool, process_started: float) -> None:
        self.run = run
        self.is_chief = is_chief
        self.process_started = process_started
        self.lease: Lease | None = None
        if is_chief and run.lease.enabled:
            self.lease = Lease(run.checkpoint.dir, expiry_seconds=run.lease.expiry_seconds,
                               renew_seconds=run.lease.renew_seconds)
        self.provenance_text = provenance.to_text(provenance.build_provenance(run.resolved, overrides=run.overrides))
        self.accounting = RunAccounting(run.run_dir, writer=is_chief, max_crash_restarts=run.trainer.max_crash_restarts,
                                        fingerprint=_fingerprint(run.resolved), may_write=self._holds_lease)
        self.step = 0  # the step reached, kept current by the caller for the record
        self._begun = False  # whether `begin` marked this attempt in the run record

    def __enter__(self) -> Attempt:
        if self.lease is not None:
            self.lease.acquire()  # also refuses an unwritable checkpoint.dir
            self.accounting.reread()  # a previous holder may have recorded its end while we waited
        elif self.is_chief:
            check_writable(self.run.checkpoint.dir)
        try:
            self.accounting.refuse_crash_loop()
        except CrashLoopError:
            self._release()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if error is None or isinstance(error, LeaseConflictError):
                return  # a clean end is recorded by `finish`; a lost lease means the record is not ours
            if not self._begun:
                if isinstance(error, (HarnessError, KeyboardInterrupt)):
                    return  # a refused or interrupted start (bad checkpoint, refused config change) changes nothing
                self.begin(None)  # a crash while restoring is an attempt too (crash loops count it)
            outcome = next((name for kind, name in _OUTCOME_OF_ERROR.items() if isinstance(error, kind)), None)
            if outcome is None:
                outcome = "failed" if isinstance(error, HarnessError) else (
                    "interrupted" if isinstance(error, KeyboardInterrupt) else "crashed")  # Ctrl-C: not a crash
            # The reason stays with the record: an unattended run's stderr may be long gone.
            reason = str(error) if isinstance(error, HarnessError) else (
                f"{type(error).__name__}: {error_summary(error)}")
            self.accounting.finish(outcome, step=self.step, detail=reason[:2000])
        finally:
            self._release()

    def before_write(self) -> None:
        """Called before every checkpoint write: raises once the lease was lost."""
        if self.lease is not None:
            self.lease.verify()

    def _holds_lease(self) -> bool:
        try:
            self.before_write()
        except LeaseConflictError:
            return False
        return True

    def verify_resume(self, path: str, saved: dict[str, Any] | None) -> None:
        provenance.check_resume(saved, self.run.resolved, checkpoint=path, allow=self.run.resume.allow_config_change)

    def begin(self, start_step: int | None) -> None:
        """Mark this attempt in progress from `start_step` (None: not known, see `RunAccounting.begin`)."""
        self.step = self.accounting.begin(start_step=start_step, process_started=self.process_started)
        self._begun = True

    def finish(self, status: str, *, step: int) -> None:
        self.accounting.finish(status, step=step)

    def record_hang(self, phase: str) -> None:
        """For the watchdog, just before it ends the process: which phase (train, eval, save) hung."""
        self.accounting.finish("hung", step=self.step, detail=f"no progress in the {phase} phase")

    def _release(self) -> None:
        if self.lease is not None:
            with contextlib.suppress(Exception):
                self.lease.release()


def _fingerprint(resolved: dict[str, Any]) -> str:
    """What a crash streak is tied to: the whole config and the harness version (changing either resets it)."""
    text = json.dumps(resolved, sort_keys=True, default=str) + provenance.harness_version()
    return hashlib.sha256(text.encode()).hexdigest()[:16]
