"""Saving and restoring the training state through `tf.train.CheckpointManager`: `Checkpointer`.

Saving here (retries with backoff, async writes and their confirmation, who writes); restoring is
`restoring.py`'s (newest intact first, fallback, mismatch reports), naming and listing `files.py`'s,
durable writes `writing.py`'s, variables and diffs `contents.py`'s. Together they guarantee:
- Checkpoints are named `ckpt-<global step>`. TensorFlow writes the data and index to temporary
  names and renames them; the manager records a checkpoint as latest, and only then deletes old
  ones, after the write has finished (also for async saves; a sync save leaves freeing their
  blocks to a background thread, `writing.deferred_deletions`). So a kill never leaves a
  half-written "latest", and the newest intact checkpoint is never deleted first.
- `restore_latest` tries checkpoints newest first. One that cannot be read (truncated, corrupted,
  half-written) is skipped with a warning naming it; the next intact one is restored. Every
  variable of the state must be restored from the checkpoint and every value in the checkpoint
  must be used: otherwise a `CheckpointError` lists the differences, before anything is written.
- Restoring never writes to the checkpoint directory; a run that fails at start-up leaves it as
  it was. A rollback deletes the checkpoints after the one it restored, from the disk and from the
  manager's state file, so `max_to_keep` counts only checkpoints that exist.
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

import contextlib
import logging
import shutil
import time
from collections.abc import Callable
from typing import Any

import tensorflow as tf

from harness.checkpoint.files import (
    CHECKPOINT_NAME,
    STEP_PATTERN,
    checkpoint_name,
    list_checkpoints,
)
from harness.checkpoint.restoring import Restorer, RestoreResult
from harness.checkpoint.writing import (
    WRITE_ERRORS,
    backing_variables,
    bytes_written_by_this_process,
    collective_read_variables,
    deferred_deletions,
    describe_failure,
    private_write_directory,
    remove_abandoned_writes,
    remove_dead_workers_writes,
    write_options,
)
from harness.config.schema import CheckpointConfig
from harness.errors import StorageError
from harness.host import fsync
from harness.private_apis import raise_pending_async_write_error
from harness.training.state import TrainState

log = logging.getLogger(__name__)

_MAX_BACKOFF_SECONDS = 60.0


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
        self._restorer = Restorer(self._checkpoint, self._items, state, directory)
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
        """`Restorer.restore_newest` (same arguments and errors); then later saves record this process's
        provenance, and the chief removes what writes a kill interrupted left."""
        result = self._restorer.restore_newest(verify=verify, max_step=max_step)
        if result.step is not None:
            self._provenance.assign(self._provenance_text)  # from now on, checkpoints record this process
        if self.is_chief:
            remove_abandoned_writes(self.directory)
        return result

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
            if newer:
                fsync(self.directory)  # durably gone: a power loss must not bring them back as the newest
            for _, path in newer:
                for data_file in tf.io.gfile.glob(f"{path}.data-*"):
                    tf.io.gfile.remove(data_file)
            if newer:
                self._forget({checkpoint_name(path) for _, path in newer})
        except WRITE_ERRORS as error:
            log.warning("could not delete the abandoned checkpoints after step %d (%s); a restart may replay the "
                        "rollback's divergence", step, describe_failure(error))
        return [saved for saved, _ in newer]

    def _forget(self, deleted: set[str]) -> None:
        """Drop the `deleted` checkpoints from the manager's state file, and the manager built from it.

        Left listed there, they count toward `max_to_keep`, and the saves after a rollback would rotate
        out the checkpoint it restored while fewer than `max_to_keep` exist. If no listed one remains (the
        restored checkpoint was kept by `keep_every_hours`), the newest on disk is recorded as preserved:
        latest for `tf.train.latest_checkpoint`, never rotated out.
        """
        self._manager = None  # rebuilt from the rewritten state file at the next save
        state = tf.train.get_checkpoint_state(self.directory)
        if state is None:
            return
        paths, timestamps = list(state.all_model_checkpoint_paths), list(state.all_model_checkpoint_timestamps)
        if len(timestamps) != len(paths):
            timestamps = [state.last_preserved_timestamp] * len(paths)  # as the manager reads such a file
        kept = [(path, stamp) for path, stamp in zip(paths, timestamps) if checkpoint_name(path) not in deleted]
        preserved = state.last_preserved_timestamp
        if not kept:
            remaining = list_checkpoints(self.directory)
            if not remaining:
                return
            stamp = tf.io.gfile.stat(f"{remaining[0][1]}.index").mtime_nsec / 1e9
            kept, preserved = [(remaining[0][1], stamp)], max(preserved, stamp)
        tf.compat.v1.train.update_checkpoint_state(
            self.directory, kept[-1][0], all_model_checkpoint_paths=[path for path, _ in kept],
            all_model_checkpoint_timestamps=[stamp for _, stamp in kept], last_preserved_timestamp=preserved)

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
                # An async save deletes old checkpoints on TensorFlow's writer thread; a sync one in this call.
                deletions = contextlib.nullcontext() if self._save_in_background else deferred_deletions(
                    self.manager.checkpoints)
                with deletions:
                    self.manager.save(checkpoint_number=step,
                                      options=write_options(async_save=self._save_in_background))
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

    @property
    def longest_backoff_seconds(self) -> float:
        """The most one save sleeps between its retries before it gives up: what the watchdog allows on top of its
        limits (on every worker: the others wait for the chief's save in their next collective)."""
        return sum(self._backoff_seconds(failures) for failures in range(1, self.max_consecutive_failures))

    def _backoff_seconds(self, failures: int) -> float:
        """The sleep after the `failures`-th failure in a row: doubling from `retry_backoff_seconds`, capped."""
        return min(self.retry_backoff_seconds * 2 ** (failures - 1), _MAX_BACKOFF_SECONDS)

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
        backoff = self._backoff_seconds(self.consecutive_failures)
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









