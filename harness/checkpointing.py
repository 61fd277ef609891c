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
- Only the chief writes to `checkpoint.dir`. Other workers of a multi-worker job must take part
  in every save (the values are gathered collectively) and write to a private temporary
  directory that is deleted after each save.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import keras
import tensorflow as tf
from google.protobuf.message import DecodeError

from harness.config import CheckpointConfig
from harness.errors import CheckpointError
from harness.state import TrainState

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "ckpt"
_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
_BOOKKEEPING_KEYS = ("_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter" + _SUFFIX)
# What reading a damaged checkpoint raises in TF 2.21: OpErrors (DataLoss, NotFound, OutOfRange), an
# IndexError for a short read of the object graph, a DecodeError for a garbled object graph.
_READ_ERRORS = (tf.errors.OpError, IndexError, DecodeError)
_STEP_PATTERN = re.compile(rf"{CHECKPOINT_NAME}-(\d+)\.index$")


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


def variable_shapes(path: str) -> dict[str, list[int]]:
    """Variable name -> shape of a checkpoint, without the bookkeeping entries."""
    reader = tf.compat.v1.train.NewCheckpointReader(path)  # a prefix; load_checkpoint also takes dirs
    return {_display_name(name): shape for name, shape in reader.get_variable_to_shape_map().items()
            if name not in _BOOKKEEPING_KEYS}


def _display_name(key: str) -> str:
    return key[: -len(_SUFFIX)] if key.endswith(_SUFFIX) else key


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
    ) -> None:
        self.directory = directory
        self.is_chief = is_chief
        self._checkpoint = tf.train.Checkpoint(**backing_variables(state.checkpoint_items()))
        _ = self._checkpoint.save_counter  # created lazily; must exist for restores to consume it
        self._state = state
        self._options = tf.train.CheckpointOptions(experimental_enable_async_checkpoint=async_save)
        self._async = async_save
        # Non-chief workers: a private path that each save creates and then deletes, so a worker
        # that never saves (or finishes) leaves nothing behind.
        self._write_directory = directory if is_chief else os.path.join(
            tempfile.gettempdir(), f"harness-worker-ckpt-{os.getpid()}-{id(self):x}")
        self._manager: tf.train.CheckpointManager | None = None
        self._manager_settings = {"max_to_keep": max_to_keep, "keep_checkpoint_every_n_hours": keep_every_hours}

    @classmethod
    def from_config(cls, state: TrainState, config: CheckpointConfig, *, async_save: bool,
                    is_chief: bool) -> Checkpointer:
        return cls(state, directory=config.dir, max_to_keep=config.max_to_keep,
                   keep_every_hours=config.keep_every_hours, async_save=async_save, is_chief=is_chief)

    # -- restore -----------------------------------------------------------------------------------
    def restore_latest(self) -> RestoreResult:
        """Restore the newest intact checkpoint of `directory`, or leave the state fresh if none exist.

        Raises `CheckpointError` if checkpoints exist but none can be read (starting over would
        overwrite them), or if one is readable but does not match the state (wrong config).
        """
        try:
            candidates = list_checkpoints(self.directory)
        except tf.errors.OpError as error:
            raise CheckpointError(
                f"Checkpoint directory '{self.directory}' cannot be listed: {error.message}") from None
        skipped: list[str] = []
        for step, path in candidates:
            try:
                saved_shapes = variable_shapes(path)
            except (*_READ_ERRORS, ValueError) as error:
                skipped.append(path)
                log.warning("checkpoint %s is unreadable (%s); trying an older one", _name(path), _short(error))
                continue
            status = None
            try:
                status = self._checkpoint.read(path)
                status.assert_consumed()
            except _READ_ERRORS as error:  # data file truncated, missing or corrupted (checksums)
                skipped.append(path)
                log.warning("checkpoint %s is corrupted (%s); trying an older one", _name(path), _short(error))
                continue
            except (AssertionError, ValueError) as error:
                if status is not None:
                    status.expect_partial()  # we report the differences ourselves
                raise CheckpointError(self._mismatch_report(path, saved_shapes, str(error))) from None
            restored_step = int(self._state.step.numpy())
            if restored_step != step:
                log.warning("checkpoint %s holds step %d; resuming from the step it holds", _name(path), restored_step)
            if skipped:
                log.warning("resumed from %s after skipping unreadable %s", _name(path),
                            ", ".join(_name(p) for p in skipped))
            log.info("resuming from checkpoint %s at step %d", path, restored_step)
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
            self._manager = tf.train.CheckpointManager(
                self._checkpoint, self._write_directory, checkpoint_name=CHECKPOINT_NAME, **self._manager_settings)
        return self._manager

    def save(self, step: int) -> float:
        """Save the state as `ckpt-<step>`; return the seconds training was blocked by the save."""
        started = time.perf_counter()
        self.manager.save(checkpoint_number=step, options=self._options)
        if not self.is_chief:
            self.wait()
            shutil.rmtree(self._write_directory, ignore_errors=True)
        return time.perf_counter() - started

    def wait(self) -> None:
        """Block until an in-flight async save has been written and recorded."""
        if self._async:
            self._checkpoint.sync()


def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _short(error: BaseException) -> str:
    text = getattr(error, "message", None) or str(error)
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}"
