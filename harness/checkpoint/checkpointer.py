"""Saving and restoring the training state through `tf.train.CheckpointManager`: `Checkpointer`.

Built from `files.py` (names, listing), `contents.py` (variables, mismatch reports) and
`writing.py` (durable writes, who writes). Owns: where checkpoints live, when they are complete,
which one a restart trusts, and what is reported when one does not fit the model. Guarantees:
- Checkpoints are named `ckpt-<global step>`. TensorFlow writes the data and index to temporary
  names and renames them; the manager records a checkpoint as latest, and only then deletes old
  ones, after the write has finished (also for async saves). So a kill never leaves a
  half-written "latest", and the newest intact checkpoint is never deleted first.
- `restore_latest` tries checkpoints newest first. One that cannot be read (truncated, corrupted,
  half-written) is skipped with a warning naming it; the next intact one is restored. Every
  variable of the state must be restored from the checkpoint and every value in the checkpoint
  must be used: otherwise a `CheckpointError` lists the differences, before anything is written.
- Restoring never writes to the checkpoint directory; a run that fails at start-up leaves it as
  it was.
- Only the chief writes to `checkpoint.dir`, and only while `before_write` (the lease check)
  passes. Other workers of a multi-worker job write nothing: every variable of the state is
  mirrored, so the chief's copy is the checkpoint. Only a state holding sync-on-read variables
  (whose saved value is gathered collectively) makes them take part in every save, writing to a
  private temporary directory deleted after each save.
- Every save is fsynced (data, index, directory) before it is recorded as latest, so a recorded
  checkpoint survives a host crash, not only a killed process.
- Every checkpoint also holds `provenance` (harness/checkpoint/provenance.py): the config and versions that
  wrote it. `restore_latest(verify=...)` shows it to the caller before restoring anything.
- A failed write (disk full, permission lost, a flaky network filesystem) leaves no file of that
  checkpoint behind and is retried after a backoff that doubles; after
  `checkpoint.max_consecutive_failures` failed attempts in a row, `StorageError`. Earlier
  checkpoints are never touched by a failed write.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from harness.checkpoint.contents import Variable, compare, expected_variables, read_provenance, read_variables
from harness.checkpoint.files import (
    CHECKPOINT_NAME,
    READ_ERRORS,
    STEP_PATTERN,
    checkpoint_bytes,
    checkpoint_name,
    list_checkpoints,
)
from harness.checkpoint.writing import (
    WRITE_ERRORS,
    backing_variables,
    bytes_written_by_this_process,
    collective_read_variables,
    describe_failure,
    private_write_directory,
    remove_dead_workers_writes,
    write_options,
)
from harness.config.schema import CheckpointConfig
from harness.errors import CheckpointError, StorageError
from harness.private_apis import raise_pending_async_write_error
from harness.training.state import TrainState

log = logging.getLogger(__name__)

_MAX_BACKOFF_SECONDS = 60.0


@dataclass
class RestoreResult:
    """What `restore_latest` did: the step restored and the checkpoint it came from (None = fresh start)."""

    step: int | None
    path: str | None




















class Checkpointer:
    """Saves `TrainState` every so often and restores the newest intact checkpoint at start-up."""

    def __init__(
        self,
        state: TrainState,
        *,
        directory: str,
        max_to_keep: int,
        keep_every_hours: float | None,
        async_save: bool,
        is_chief: bool,
        provenance: str = "{}",
        max_consecutive_failures: int = 5,
        retry_backoff_seconds: float = 1.0,
        before_write: Callable[[], None] | None = None,
    ) -> None:
        self.directory = directory
        self.is_chief = is_chief
        with tf.init_scope():  # a plain host variable, outside any strategy scope
            self._provenance = tf.Variable(provenance, dtype=tf.string, trainable=False, name="provenance")
        self._provenance_text = provenance
        self._items = {**backing_variables(state.checkpoint_items()), "provenance": self._provenance}
        self._checkpoint = tf.train.Checkpoint(**self._items)
        _ = self._checkpoint.save_counter  # created lazily; must exist for restores to consume it
        self._state = state
        self.max_consecutive_failures = max_consecutive_failures
        self.retry_backoff_seconds = retry_backoff_seconds
        self.before_write = before_write
        self.consecutive_failures = 0
        self.total_failures = 0  # failed write attempts in this process, for TensorBoard
        # Bytes this process wrote during the last save (None: written in the background, or unknown).
        self.last_save_bytes_written: int | None = None
        self._step_existed = False  # whether the checkpoint being written existed before
        self._pending_step: int | None = None  # an async save whose background write is unconfirmed
        self._pending_existed = False
        self._save_in_background = async_save  # False while `wait` rewrites a failed async save
        self._async = async_save
        # Non-chief workers write nothing when saving reads every value locally; only a state that
        # needs a collective to read (sync-on-read variables) makes them take part, through a private
        # path that each save creates and then deletes, so a worker that finishes leaves nothing.
        collective = collective_read_variables(self._items) if not is_chief else []
        self._write_private_copy = bool(collective)
        if not is_chief:
            remove_dead_workers_writes()
            if collective:
                log.info("non-chief worker: every save also writes a private copy of the state (deleted at once): "
                         "reading %s needs every worker", ", ".join(collective[:4]))
        self._write_directory = directory if is_chief else private_write_directory(self)
        self._manager: tf.train.CheckpointManager | None = None
        self._manager_settings = {"max_to_keep": max_to_keep, "keep_checkpoint_every_n_hours": keep_every_hours}

    @classmethod
    def from_config(cls, state: TrainState, config: CheckpointConfig, *, async_save: bool, is_chief: bool,
                    provenance: str = "{}", before_write: Callable[[], None] | None = None) -> Checkpointer:
        return cls(state, directory=config.dir, max_to_keep=config.max_to_keep,
                   keep_every_hours=config.keep_every_hours, async_save=async_save, is_chief=is_chief,
                   provenance=provenance, max_consecutive_failures=config.max_consecutive_failures,
                   retry_backoff_seconds=config.retry_backoff_seconds, before_write=before_write)

    # -- restore -----------------------------------------------------------------------------------
    def restore_latest(self, *, verify: Callable[[str, dict[str, Any] | None], None] | None = None,
                       max_step: int | None = None) -> RestoreResult:
        """Restore the newest intact checkpoint of `directory`, or leave the state fresh if none exist.

        `verify(path, provenance)` sees the chosen checkpoint's provenance before anything is
        restored and may raise to refuse it. `max_step` limits the candidates (for rollbacks).
        Raises `CheckpointError` if checkpoints exist but none can be read (starting over would
        overwrite them), or if one is readable but does not match the state.
        """
        try:
            candidates = [(step, path) for step, path in list_checkpoints(self.directory)
                          if max_step is None or step <= max_step]
        except tf.errors.OpError as error:
            raise CheckpointError(
                f"Checkpoint directory '{self.directory}' cannot be listed: {error.message}") from None
        skipped: list[str] = []
        for step, path in candidates:
            reading_started = time.perf_counter()
            try:
                saved = read_variables(path)
            except CheckpointError as error:
                skipped.append(path)
                log.warning("checkpoint %s is unreadable (%s); trying an older one", checkpoint_name(path), error)
                continue
            if verify is not None:
                verify(path, read_provenance(path))
            status = None
            try:
                status = self._reader_for(saved).read(path)
                status.assert_consumed()
            except READ_ERRORS as error:  # data file truncated, missing or corrupted (checksums)
                skipped.append(path)
                log.warning("checkpoint %s is corrupted (%s); trying an older one", checkpoint_name(path),
                            describe_failure(error))
                continue
            except (AssertionError, ValueError) as error:
                if status is not None:
                    status.expect_partial()  # we report the differences ourselves
                raise CheckpointError(self._mismatch_report(path, saved, str(error))) from None
            self._provenance.assign(self._provenance_text)  # from now on, checkpoints record this process
            restored_step = int(self._state.step.numpy())
            if restored_step != step:
                log.warning("checkpoint %s holds step %d; resuming from the step it holds", checkpoint_name(path),
                            restored_step)
            if skipped:
                log.warning("resumed from %s after skipping unreadable %s", checkpoint_name(path),
                            ", ".join(checkpoint_name(p) for p in skipped))
            log.info("resuming from checkpoint %s at step %d (read, checked and assigned %.1f MB in %.2f s)", path,
                     restored_step, checkpoint_bytes(path) / 1e6, time.perf_counter() - reading_started)
            self._remove_abandoned_writes()
            return RestoreResult(step=restored_step, path=path)
        if candidates:
            raise CheckpointError(
                f"None of the {len(candidates)} checkpoints in '{self.directory}' can be read "
                f"({', '.join(checkpoint_name(p) for _, p in candidates)}). Refusing to start over, which would "
                "overwrite them: move the directory aside to start a fresh run, or point checkpoint.dir at intact "
                "copies."
            )
        log.info("no checkpoint in %s: starting from step 0", self.directory)
        self._remove_abandoned_writes()
        return RestoreResult(step=None, path=None)

    def delete_newer_than(self, step: int) -> list[int]:
        """Delete every checkpoint after `step`: a rollback abandoned the trajectory they belong to.

        Left on disk, a restart could resume from one of them and replay a divergence that the
        rollback already dealt with (skipping its batches twice). Index files go first: a kill in
        between leaves data files without an index, which are never listed and are removed as
        abandoned writes at the next start. Chief only, under the lease; returns the steps deleted.
        """
        if not self.is_chief:
            return []
        if self.before_write is not None:
            self.before_write()
        newer = [(saved, path) for saved, path in list_checkpoints(self.directory) if saved > step]
        try:
            for _, path in newer:
                tf.io.gfile.remove(f"{path}.index")
            for _, path in newer:
                for data_file in tf.io.gfile.glob(f"{path}.data-*"):
                    tf.io.gfile.remove(data_file)
        except WRITE_ERRORS as error:
            log.warning("could not delete the abandoned checkpoints after step %d (%s); a restart may replay the "
                        "rollback's divergence", step, describe_failure(error))
        return [saved for saved, _ in newer]

    def _reader_for(self, saved: Mapping[str, Variable]) -> tf.train.Checkpoint:
        """The checkpoint object to restore with: without `provenance` for checkpoints that lack it."""
        if "provenance" in saved:
            return self._checkpoint
        reader = tf.train.Checkpoint(**{key: value for key, value in self._items.items() if key != "provenance"})
        _ = reader.save_counter  # consumes the checkpoint's counter, as for `_checkpoint`
        return reader

    def _remove_abandoned_writes(self) -> None:
        """Delete what writes a kill interrupted left: `ckpt-N_temp*` directories, and data files
        whose index was never written (TensorFlow renames the data into place before it writes the
        index, so a checkpoint without its index was never complete).

        Neither ever held a usable checkpoint. Only called after a successful restore, by the chief.
        """
        if not self.is_chief or not tf.io.gfile.isdir(self.directory):
            return
        prefix = f"{self.directory.rstrip('/')}/{CHECKPOINT_NAME}-"
        abandoned_data = [path for path in tf.io.gfile.glob(f"{prefix}*.data-*")
                          if not tf.io.gfile.exists(path.rsplit(".data-", 1)[0] + ".index")]
        for abandoned in tf.io.gfile.glob(f"{prefix}*_temp*") + abandoned_data:
            log.info("removing %s, left by a checkpoint write that was interrupted", abandoned)
            if tf.io.gfile.isdir(abandoned):
                tf.io.gfile.rmtree(abandoned)
            else:
                tf.io.gfile.remove(abandoned)

    def _mismatch_report(self, path: str, saved: Mapping[str, Variable], detail: str) -> str:
        difference = compare(saved, expected_variables(self._state.checkpoint_items()))
        lines = [f"Checkpoint {checkpoint_name(path)} in '{self.directory}' does not match the model and optimizer "
                 "built from this config, so it cannot be restored:", *difference.lines()]
        if difference.empty():
            lines.append(f"  TensorFlow said: {detail.splitlines()[0]}")
        lines.append("Nothing on disk was changed. Was this run started with the same model/optimizer config "
                     "(see config.yaml in the run directory)? Or does run_dir / checkpoint.dir point at another "
                     "experiment? Use a new `experiment=` (or run_dir) to train this config from scratch.")
        return "\n".join(lines)

    # -- save --------------------------------------------------------------------------------------
    @property
    def manager(self) -> tf.train.CheckpointManager:
        # Created lazily: constructing it reads (and may rewrite) the state file, which must not
        # happen before a successful restore.
        if self._manager is None:
            if self.is_chief:
                self._record_unrecorded_checkpoints()
            self._manager = tf.train.CheckpointManager(
                self._checkpoint, self._write_directory, checkpoint_name=CHECKPOINT_NAME, **self._manager_settings)
        return self._manager

    def _record_unrecorded_checkpoints(self) -> None:
        """Add to the manager's state file the complete checkpoints newer than the latest it records.

        A kill after a checkpoint was written and fsynced but before the manager recorded it leaves
        a complete checkpoint (a restart may have resumed from it) that the manager would never
        delete; recorded, `max_to_keep` applies to it as to the others. Older unrecorded ones are
        left alone: `keep_every_hours` keeps checkpoints that way on purpose.
        """
        state = tf.train.get_checkpoint_state(self.directory)
        recorded = list(state.all_model_checkpoint_paths) if state else []
        matches = (STEP_PATTERN.match(checkpoint_name(path) + ".index") for path in recorded)
        recorded_steps = [int(match.group(1)) for match in matches if match]
        newest_recorded = max(recorded_steps, default=-1)
        unrecorded = sorted((step, path) for step, path in list_checkpoints(self.directory) if step > newest_recorded)
        if not unrecorded:
            return
        timestamps = list(state.all_model_checkpoint_timestamps) if state else []
        if len(timestamps) != len(recorded):
            timestamps = [time.time()] * len(recorded)
        paths = recorded + [path for _, path in unrecorded]
        timestamps += [tf.io.gfile.stat(f"{path}.index").mtime_nsec / 1e9 for _, path in unrecorded]
        log.info("recording %s as checkpoints of this directory: written completely before a kill that came before "
                 "TensorFlow recorded them", ", ".join(checkpoint_name(path) for _, path in unrecorded))
        tf.compat.v1.train.update_checkpoint_state(
            self.directory, paths[-1], all_model_checkpoint_paths=paths, all_model_checkpoint_timestamps=timestamps,
            last_preserved_timestamp=state.last_preserved_timestamp if state else None)

    def save(self, step: int) -> float:
        """Save the state as `ckpt-<step>`; return the seconds training was blocked by the save.

        A failed attempt is retried after a doubling backoff. Raises `StorageError` after
        `max_consecutive_failures` failed attempts in a row, and whatever `before_write` raises.
        """
        started = time.perf_counter()
        self._confirm_pending_write()  # TensorFlow would wait for it anyway before the next write
        written_before = bytes_written_by_this_process()
        try:
            return self._save(step, started)
        finally:
            written_after = bytes_written_by_this_process()
            in_background = self._save_in_background and self.is_chief
            known = written_before is not None and written_after is not None
            self.last_save_bytes_written = written_after - written_before if known and not in_background else None

    def _save(self, step: int, started: float) -> float:
        while True:
            if self.before_write is not None:
                self.before_write()
            if not self.is_chief and not self._write_private_copy:
                return time.perf_counter() - started
            self._step_existed = self._exists(step)
            try:
                self.manager.save(checkpoint_number=step, options=write_options(async_save=self._save_in_background))
                if not self.is_chief:
                    self.wait()
                    shutil.rmtree(self._write_directory, ignore_errors=True)
            except WRITE_ERRORS as error:
                self._write_failed(error, step=step)
                continue
            if self._async and self.is_chief:
                self._pending_step = step  # written in the background: a success only once confirmed
                self._pending_existed = self._step_existed
            else:
                self.consecutive_failures = 0
            return time.perf_counter() - started

    def wait(self) -> None:
        """Block until an in-flight async save has been written and recorded.

        If that write failed, it is written again (synchronously, with the retries of `save`):
        call this only while the state is still at the step of the last save.
        """
        step = self._pending_step
        if not self._confirm_pending_write() and step is not None:
            self._save_synchronously(step)

    def discard_pending_write(self) -> None:
        """Wait for an in-flight async save; a failure counts but is not retried (the state moved on)."""
        self._confirm_pending_write()

    def _confirm_pending_write(self) -> bool:
        """Wait for the background write of the last async save; False if it failed (counted, cleaned up)."""
        if not self._async:
            return True
        step, self._pending_step = self._pending_step, None
        try:
            self._checkpoint.sync()
            raise_pending_async_write_error(self._checkpoint)
        except WRITE_ERRORS as error:
            self._step_existed = self._pending_existed
            self._write_failed(error, step=step)
            return False
        if step is not None:
            self.consecutive_failures = 0
        return True

    def _save_synchronously(self, step: int) -> None:
        self._save_in_background = False
        try:
            self.save(step)
        finally:
            self._save_in_background = self._async

    def _write_failed(self, error: BaseException, *, step: int | None) -> None:
        """Count a failed write, remove what it left, then back off or give up with `StorageError`."""
        self.consecutive_failures += 1
        self.total_failures += 1
        if step is not None:
            self._remove_failed_write(step)
        if self.consecutive_failures >= self.max_consecutive_failures:
            raise StorageError(
                f"Saving checkpoint {CHECKPOINT_NAME}-{step} to checkpoint.dir '{self.directory}' failed "
                f"{self.consecutive_failures} times in a row (checkpoint.max_consecutive_failures), last with: "
                f"{describe_failure(error)}. The run stops here; every earlier checkpoint is intact and the next run "
                "resumes from the newest one. Check free space and permissions of the checkpoint directory.") from None
        backoff = min(self.retry_backoff_seconds * 2 ** (self.consecutive_failures - 1), _MAX_BACKOFF_SECONDS)
        log.warning("saving checkpoint %s-%s failed (%s); attempt %d of %d, retrying in %.1f s", CHECKPOINT_NAME, step,
                    describe_failure(error), self.consecutive_failures, self.max_consecutive_failures, backoff)
        time.sleep(backoff)

    def _exists(self, step: int) -> bool:
        try:
            return tf.io.gfile.exists(f"{self._write_directory.rstrip('/')}/{CHECKPOINT_NAME}-{step}.index")
        except WRITE_ERRORS:
            return False

    def _remove_failed_write(self, step: int) -> None:
        """Delete the files a failed write of `ckpt-<step>` left, so no partial checkpoint is ever listed.

        A checkpoint of that step that existed before the write began (a rollback replays steps) is
        left alone: a failed write never deletes anything saved earlier.
        """
        prefix = f"{self._write_directory.rstrip('/')}/{CHECKPOINT_NAME}-{step}"
        try:
            globs = [f"{prefix}_temp*"] if self._step_existed else [f"{prefix}.*", f"{prefix}_temp*"]
            for leftover in [path for pattern in globs for path in tf.io.gfile.glob(pattern)]:
                if tf.io.gfile.isdir(leftover):
                    tf.io.gfile.rmtree(leftover)
                else:
                    tf.io.gfile.remove(leftover)
        except WRITE_ERRORS as error:  # a read-only filesystem cannot have partial files of ours either
            log.warning("could not remove the files of the failed write of %s-%d: %s", CHECKPOINT_NAME, step,
                        describe_failure(error))









