"""Saving and restoring the training state through `tf.train.CheckpointManager`.

Owns: where checkpoints live, when they are complete, which one a restart trusts, and what is
reported when one does not fit the model. Guarantees:
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

import glob
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras
import tensorflow as tf
from google.protobuf.message import DecodeError

from harness.checkpoint.provenance import from_text
from harness.config.schema import CheckpointConfig
from harness.errors import CheckpointError, StorageError
from harness.host import process_alive
from harness.training.state import TrainState

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "ckpt"
_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
_BOOKKEEPING_KEYS = ("_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter" + _SUFFIX)
PROVENANCE_KEY = "provenance" + _SUFFIX  # not training state: which config and versions wrote the checkpoint
# What a failed write raises: OSError from Python-level file operations, OpErrors from TensorFlow's.
_WRITE_ERRORS = (OSError, tf.errors.OpError)
_MAX_BACKOFF_SECONDS = 60.0
# What reading a damaged checkpoint raises in TF 2.21: OpErrors (DataLoss, NotFound, OutOfRange), an
# IndexError for a short read of the object graph, a DecodeError for a garbled object graph.
_READ_ERRORS = (tf.errors.OpError, IndexError, DecodeError)
_STEP_PATTERN = re.compile(rf"{CHECKPOINT_NAME}-(\d+)\.index$")
_WORKER_WRITES = "harness-worker-ckpt-"  # + "<pid>-<id>": a non-chief worker's private save directory


@dataclass
class RestoreResult:
    """What `restore_latest` did: the step restored (None = fresh start) and what was skipped."""

    step: int | None
    path: str | None
    skipped: list[str] = field(default_factory=list)  # unreadable checkpoints, newest first


def list_checkpoints(directory: str) -> list[tuple[int, str]]:
    """(step, path prefix) of every checkpoint whose index file exists in `directory`, newest first."""
    if not tf.io.gfile.isdir(directory):
        return []
    found = []
    for name in tf.io.gfile.listdir(directory):
        match = _STEP_PATTERN.match(name)
        if match:
            found.append((int(match.group(1)), f"{directory.rstrip('/')}/{CHECKPOINT_NAME}-{match.group(1)}"))
    return sorted(found, reverse=True)


def remove_dead_workers_writes(temporary_dir: str | None = None) -> list[str]:
    """Delete the private save directories of non-chief workers that no longer run on this machine.

    A worker deletes its own after every save, but one SIGKILLed mid-save leaves a copy of the whole
    state behind; the next worker started here cleans it up. Returns the directories removed.
    """
    removed = []
    for path in glob.glob(os.path.join(temporary_dir or tempfile.gettempdir(), f"{_WORKER_WRITES}*")):
        pid = os.path.basename(path)[len(_WORKER_WRITES):].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def check_writable(directory: str) -> None:
    """Refuse (`CheckpointError`) a checkpoint directory that cannot be written, before any training.

    With the lease on, writing the lease file is this check; without it, a probe file is written
    and removed.
    """
    probe = f"{directory.rstrip('/')}/.write-probe-{os.getpid()}"
    try:
        tf.io.gfile.makedirs(directory)
        with tf.io.gfile.GFile(probe, "w") as handle:
            handle.write("probe")
        tf.io.gfile.remove(probe)
    except _WRITE_ERRORS as error:
        raise CheckpointError(
            f"checkpoint.dir '{directory}' is not writable ({_short(error)}): no checkpoint could be saved there. "
            "Nothing was trained or changed. Check the path, its permissions and free space, or point "
            "checkpoint.dir elsewhere.") from None


def variable_shapes(path: str) -> dict[str, list[int]]:
    """Variable name -> shape of a checkpoint, without the bookkeeping entries."""
    reader = tf.compat.v1.train.NewCheckpointReader(path)  # a prefix; load_checkpoint also takes dirs
    return {_display_name(name): shape for name, shape in reader.get_variable_to_shape_map().items()
            if name not in _BOOKKEEPING_KEYS}


def read_provenance(path: str) -> dict[str, Any] | None:
    """The provenance record inside a checkpoint, or None if it has none (or it is unreadable)."""
    try:
        reader = tf.compat.v1.train.NewCheckpointReader(path)
        if not reader.has_tensor(PROVENANCE_KEY):
            return None
        return from_text(reader.get_tensor(PROVENANCE_KEY)) or None  # "{}": saved through the API, no record
    except (*_READ_ERRORS, ValueError):
        return None


def _display_name(key: str) -> str:
    return key[: -len(_SUFFIX)] if key.endswith(_SUFFIX) else key


def bytes_written_by_this_process() -> int | None:
    """Bytes this process has passed to write calls so far (`wchar` of /proc/self/io), None elsewhere."""
    try:
        with open("/proc/self/io") as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith("wchar:"))
    except (OSError, StopIteration, ValueError):
        return None


def collective_read_variables(tree: dict[str, object]) -> list[str]:
    """Names of the variables in a checkpoint tree whose saved value is read with a collective.

    Under tf.distribute a sync-on-read variable saves the aggregate over replicas, so every worker
    must join its save; mirrored and plain variables save the local copy, identical on every worker.
    """
    found: list[str] = []

    def visit(node: object, path: str) -> None:
        if isinstance(node, dict):
            for key, child in node.items():
                visit(child, f"{path}/{key}" if path else key)
        elif isinstance(node, tf.distribute.DistributedValues) and \
                getattr(node, "synchronization", None) == tf.VariableSynchronization.ON_READ:
            found.append(path)

    visit(tree, "")
    return found


def backing_variables(tree: dict[str, object]) -> dict[str, object]:
    """The checkpoint tree with each Keras variable replaced by the `tf.Variable` that holds its value.

    Both write the same keys and values. The swap is needed for async saves: Keras 3's
    `Variable._copy_trackable_to_cpu` creates a new `tf.Variable` on every call, which the traced
    copy function of TensorFlow's async checkpointer refuses ("tf.function only supports singleton
    tf.Variables"); TensorFlow's own variables reuse their CPU copy. Checked on Keras 3.15, TF 2.21.
    """
    def unwrap(node: object) -> object:
        if isinstance(node, dict):
            return {key: unwrap(child) for key, child in node.items()}
        held = getattr(node, "value", None) if isinstance(node, keras.Variable) else None
        return held if isinstance(held, tf.Variable) else node

    return {key: unwrap(child) for key, child in tree.items()}


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
        self._last_saved_step: int | None = None
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
        self._write_directory = directory if is_chief else os.path.join(
            tempfile.gettempdir(), f"{_WORKER_WRITES}{os.getpid()}-{id(self):x}")
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
                saved_shapes = variable_shapes(path)
            except (*_READ_ERRORS, ValueError) as error:
                skipped.append(path)
                log.warning("checkpoint %s is unreadable (%s); trying an older one", _name(path), _short(error))
                continue
            if verify is not None:
                verify(path, read_provenance(path))
            status = None
            try:
                status = self._reader_for(saved_shapes).read(path)
                status.assert_consumed()
            except _READ_ERRORS as error:  # data file truncated, missing or corrupted (checksums)
                skipped.append(path)
                log.warning("checkpoint %s is corrupted (%s); trying an older one", _name(path), _short(error))
                continue
            except (AssertionError, ValueError) as error:
                if status is not None:
                    status.expect_partial()  # we report the differences ourselves
                raise CheckpointError(self._mismatch_report(path, saved_shapes, str(error))) from None
            self._provenance.assign(self._provenance_text)  # from now on, checkpoints record this process
            restored_step = int(self._state.step.numpy())
            if restored_step != step:
                log.warning("checkpoint %s holds step %d; resuming from the step it holds", _name(path), restored_step)
            if skipped:
                log.warning("resumed from %s after skipping unreadable %s", _name(path),
                            ", ".join(_name(p) for p in skipped))
            log.info("resuming from checkpoint %s at step %d (read, checked and assigned %.1f MB in %.2f s)", path,
                     restored_step, _checkpoint_bytes(path) / 1e6, time.perf_counter() - reading_started)
            self._remove_abandoned_writes()
            return RestoreResult(step=restored_step, path=path, skipped=skipped)
        if candidates:
            raise CheckpointError(
                f"None of the {len(candidates)} checkpoints in '{self.directory}' can be read "
                f"({', '.join(_name(p) for _, p in candidates)}). Refusing to start over, which would overwrite "
                "them: move the directory aside to start a fresh run, or point checkpoint.dir at intact copies."
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
        except _WRITE_ERRORS as error:
            log.warning("could not delete the abandoned checkpoints after step %d (%s); a restart may replay the "
                        "rollback's divergence", step, _short(error))
        return [saved for saved, _ in newer]

    def _reader_for(self, saved_shapes: dict[str, list[int]]) -> tf.train.Checkpoint:
        """The checkpoint object to restore with: without `provenance` for checkpoints that lack it."""
        if "provenance" in saved_shapes:
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

    def _expected_shapes(self) -> dict[str, list[int]]:
        """The names and shapes a checkpoint of the current state has (written to memory, not disk)."""
        probe = f"ram://harness-probe-{id(self)}/{CHECKPOINT_NAME}"
        path = tf.train.Checkpoint(**self._state.checkpoint_items()).write(probe)
        try:
            return variable_shapes(path)
        finally:
            tf.io.gfile.rmtree(probe.rsplit("/", 1)[0])

    def _mismatch_report(self, path: str, saved: dict[str, list[int]], detail: str) -> str:
        expected = self._expected_shapes()
        lines = [f"Checkpoint {_name(path)} in '{self.directory}' does not match the model and optimizer built "
                 "from this config, so it cannot be restored:"]
        differing = sorted(k for k in saved.keys() & expected.keys() if saved[k] != expected[k])
        for key in differing[:20]:
            lines.append(f"  {key}: checkpoint {tuple(saved[key])} vs model {tuple(expected[key])}")
        for title, keys in (("only in the checkpoint", sorted(saved.keys() - expected.keys())),
                            ("only in the model", sorted(expected.keys() - saved.keys()))):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else ""))
        if len(lines) == 1:
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
        recorded_steps = [int(m.group(1)) for m in (_STEP_PATTERN.match(_name(p) + ".index") for p in recorded) if m]
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
                 "TensorFlow recorded them", ", ".join(_name(path) for _, path in unrecorded))
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
                self._last_saved_step = step  # the chief writes; nothing here needs this worker
                return time.perf_counter() - started
            self._step_existed = self._exists(step)
            try:
                self.manager.save(checkpoint_number=step, options=_write_options(async_save=self._save_in_background))
                if not self.is_chief:
                    self.wait()
                    shutil.rmtree(self._write_directory, ignore_errors=True)
            except _WRITE_ERRORS as error:
                self._write_failed(error, step=step)
                continue
            if self._async and self.is_chief:
                self._pending_step = step  # written in the background: a success only once confirmed
                self._pending_existed = self._step_existed
            else:
                self.consecutive_failures = 0
            self._last_saved_step = step
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
            _raise_async_write_error(self._checkpoint)
        except _WRITE_ERRORS as error:
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
                f"{_short(error)}. The run stops here; every earlier checkpoint is intact and the next run resumes "
                "from the newest one. Check free space and permissions of the checkpoint directory.") from None
        backoff = min(self.retry_backoff_seconds * 2 ** (self.consecutive_failures - 1), _MAX_BACKOFF_SECONDS)
        log.warning("saving checkpoint %s-%s failed (%s); attempt %d of %d, retrying in %.1f s", CHECKPOINT_NAME, step,
                    _short(error), self.consecutive_failures, self.max_consecutive_failures, backoff)
        time.sleep(backoff)

    def _exists(self, step: int) -> bool:
        try:
            return tf.io.gfile.exists(f"{self._write_directory.rstrip('/')}/{CHECKPOINT_NAME}-{step}.index")
        except _WRITE_ERRORS:
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
        except _WRITE_ERRORS as error:  # a read-only filesystem cannot have partial files of ours either
            log.warning("could not remove the files of the failed write of %s-%d: %s", CHECKPOINT_NAME, step,
                        _short(error))


def _write_options(*, async_save: bool) -> tf.train.CheckpointOptions:
    """Fresh options for one save: `make_durable` runs after TensorFlow's write (on the background
    thread for async saves) and before the manager records the checkpoint as latest and deletes old
    ones. `CheckpointManager.save` appends its own callback to the options' list (TF 2.21), hence a
    new list per save."""
    return tf.train.CheckpointOptions(experimental_enable_async_checkpoint=async_save,
                                      experimental_write_callbacks=[make_durable])


def make_durable(save_path: str) -> None:
    """fsync a written checkpoint's files and directory, so that it survives a power loss or a host crash.

    Without it a checkpoint recorded as latest could still be only in the page cache; `list_checkpoints`
    trusts an index file, so the index (renamed into place last by TensorFlow) must be durable no
    earlier than its data. Remote filesystems (gs://, hdfs://) give their own guarantees on close.
    """
    if "://" in save_path:
        return
    directory = os.path.dirname(save_path) or "."
    for path in [*sorted(glob.glob(glob.escape(save_path) + ".data-*")), save_path + ".index"]:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _raise_async_write_error(checkpoint: tf.train.Checkpoint) -> None:
    """Raise the error of the background write `sync()` just waited for, if it failed.

    TensorFlow keeps it to raise at the start of the *next* save (TF 2.21, async_checkpoint_helper:
    `_check_async_thread_error`), where it would be blamed on the wrong checkpoint. The one private
    access of this module, checked on TF 2.21.
    """
    helper = getattr(checkpoint, "_async_checkpointer_impl", None)
    if helper is not None and hasattr(helper, "_check_async_thread_error"):
        helper._check_async_thread_error()


def _checkpoint_bytes(path: str) -> int:
    try:
        return sum(tf.io.gfile.stat(name).length for name in tf.io.gfile.glob(f"{path}.*"))
    except tf.errors.OpError:
        return 0


def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _short(error: BaseException) -> str:
    """One line: the error type and message, without TensorFlow's op-location decorations."""
    text = getattr(error, "message", None) or str(error)
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:\w+\]", "", text.strip()).splitlines()[0]
    return f"{type(error).__name__}: {text[:400]}"
