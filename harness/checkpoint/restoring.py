"""Restoring the training state from the newest intact checkpoint, at start-up and for rollbacks.

Owns the choice of checkpoint and what is said about it: newest first; one that cannot be read
(truncated, corrupted, half-written) is skipped with a warning naming it and the next older one is
tried; one that is readable but does not fit the state is refused with a report of the differing
variables (`contents.compare`), before anything is written. TensorFlow verifies each tensor's
checksum as it reads it, so the data is read once. Restoring never writes.

Memory: TensorFlow reads a checkpoint into new tensors, which the variables then take over. Left alone, a
restore would hold the old and the restored state at once (twice the state at its peak) and read into fresh
memory. So the large variables' buffers are freed first (`released`): the peak stays at one state, and the
read reuses memory the process already has instead of faulting in new pages (2 GB state, cold, in a fresh
process: 3.0-4.1 s -> 1.4-1.6 s; docs/benchmarks.md, section 5). Under a `tf.distribute` strategy every
device's copy is released.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf

from harness.checkpoint.contents import Variable, compare, expected_variables, read_provenance, read_variables
from harness.checkpoint.files import READ_ERRORS, checkpoint_bytes, checkpoint_name, list_checkpoints
from harness.checkpoint.writing import describe_failure
from harness.errors import CheckpointError
from harness.private_apis import assignments_without_shape_check, is_packed
from harness.training.state import TrainState

log = logging.getLogger(__name__)

# RestoreV2's report of a variable whose dtype differs from the checkpoint's: a mismatch, not damage.
_DTYPE_MISMATCH = re.compile(r"expected dtype \w+ does not equal original dtype \w+")
RELEASE_MIN_BYTES = 1 << 20  # variables smaller than this keep their buffers during a restore: nothing to gain


@dataclass
class RestoreResult:
    """What a restore did: the step restored and the checkpoint it came from (None = fresh start)."""

    step: int | None
    path: str | None


@dataclass
class Restorer:
    """Restores `checkpoint` (a `tf.train.Checkpoint` over `items`: the state and its provenance)."""

    checkpoint: tf.train.Checkpoint
    items: Mapping[str, object]
    state: TrainState
    directory: str

    def restore_newest(self, *, verify: Callable[[str, dict[str, Any] | None], None] | None = None,
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
                with released(self._large_variables()):
                    status = self._reader_for(saved).read(path)
                    status.assert_consumed()
            except READ_ERRORS as error:  # data file truncated, missing or corrupted (checksums)
                if isinstance(error, tf.errors.InvalidArgumentError) and _DTYPE_MISMATCH.search(error.message):
                    # readable, but saved with another dtype than the model's
                    raise CheckpointError(self._mismatch_report(path, saved, error.message)) from None
                skipped.append(path)
                log.warning("checkpoint %s is corrupted (%s); trying an older one", checkpoint_name(path),
                            describe_failure(error))
                continue
            except (AssertionError, ValueError) as error:
                if status is not None:
                    status.expect_partial()  # we report the differences ourselves
                raise CheckpointError(self._mismatch_report(path, saved, str(error))) from None
            restored_step = int(self.state.step.numpy())
            if restored_step != step:
                log.warning("checkpoint %s holds step %d; resuming from the step it holds", checkpoint_name(path),
                            restored_step)
            if skipped:
                log.warning("resumed from %s after skipping unreadable %s", checkpoint_name(path),
                            ", ".join(checkpoint_name(p) for p in skipped))
            log.info("resuming from checkpoint %s at step %d (read, checked and assigned %.1f MB in %.2f s)", path,
                     restored_step, checkpoint_bytes(path) / 1e6, time.perf_counter() - reading_started)
            return RestoreResult(step=restored_step, path=path)
        if candidates:
            raise CheckpointError(
                f"None of the {len(candidates)} checkpoints in '{self.directory}' can be read "
                f"({', '.join(checkpoint_name(p) for _, p in candidates)}). Refusing to start over, which would "
                "overwrite them: move the directory aside to start a fresh run, or point checkpoint.dir at intact "
                "copies."
            )
        log.info("no checkpoint in %s: starting from step 0", self.directory)
        return RestoreResult(step=None, path=None)

    def _reader_for(self, saved: Mapping[str, Variable]) -> tf.train.Checkpoint:
        """The checkpoint object to restore with: without `provenance` for checkpoints that lack it."""
        if "provenance" in saved:
            return self.checkpoint
        reader = tf.train.Checkpoint(**{key: value for key, value in self.items.items() if key != "provenance"})
        _ = reader.save_counter  # consumes the checkpoint's counter, as for `_checkpoint`
        return reader

    def _large_variables(self) -> list[tf.Variable]:
        """The per-device variables of the model and optimizer of at least RELEASE_MIN_BYTES."""
        return [component for variable in [*self.state.model.weights, *self.state.optimizer.variables]
                for component in _per_device(variable)
                if component.shape.num_elements() * component.dtype.size >= RELEASE_MIN_BYTES]

    def _mismatch_report(self, path: str, saved: Mapping[str, Variable], detail: str) -> str:
        difference = compare(saved, expected_variables(self.state.checkpoint_items()))
        lines = [f"Checkpoint {checkpoint_name(path)} in '{self.directory}' does not match the model and optimizer "
                 "built from this config, so it cannot be restored:", *difference.lines()]
        if difference.empty():
            lines.append(f"  TensorFlow said: {detail.splitlines()[0]}")
        lines.append("Nothing on disk was changed. Was this run started with the same model/optimizer config "
                     "(see config.yaml in the run directory)? Or does run_dir / checkpoint.dir point at another "
                     "experiment? Use a new `experiment=` (or run_dir) to train this config from scratch.")
        return "\n".join(lines)


@contextlib.contextmanager
def released(variables: Sequence[tf.Variable]) -> Iterator[None]:
    """Free the buffers of `variables` (each holds an empty tensor) for a restore that assigns every one of them.

    A restore that fails leaves zeros of each variable's shape where it assigned nothing, so that the caller's
    report (or the next candidate) sees the state's real shapes; one that succeeds must have assigned them all.
    """
    try:
        with assignments_without_shape_check(variables):
            for variable in variables:
                _replace_value(variable, [0])
            yield
    except BaseException as error:
        try:
            _refill(variables)
        except BaseException as refill_error:  # e.g. out of memory: report the restore's error, not this one
            error.add_note(f"(and zeros could not be put back into the released variables: {refill_error!r})")
        raise
    if not_assigned := _refill(variables):
        raise CheckpointError(f"The restore left {len(not_assigned)} variables without a value of their shape "
                              f"({', '.join(v.name for v in not_assigned[:5])}): expected it to assign every one.")


def _refill(variables: Sequence[tf.Variable]) -> list[tf.Variable]:
    """Zeros of its shape for every variable still released; returns those variables."""
    empty = [variable for variable in variables
             if tf.raw_ops.VariableShape(input=variable.handle).numpy().tolist() != variable.shape.as_list()]
    for variable in empty:
        _replace_value(variable, variable.shape)
    return empty


def _replace_value(variable: tf.Variable, shape: Sequence[int] | tf.TensorShape) -> None:
    """Zeros of `shape`, made on the variable's device, assigned without the shape check of `tf.Variable.assign`:
    the shape may differ from the variable's."""
    with tf.device(variable.device):
        tf.raw_ops.AssignVariableOp(resource=variable.handle, value=tf.zeros(shape, variable.dtype),
                                    validate_shape=False)


def _per_device(variable: object) -> list[tf.Variable]:
    """The TensorFlow variables behind a Keras variable: one, or one per device under a `tf.distribute` strategy
    (none for a packed one, or one not yet initialised or of unknown shape: those keep their buffers)."""
    value = variable.value if isinstance(variable, keras.Variable) else variable
    if isinstance(value, tf.distribute.DistributedValues):
        components = [] if is_packed(value) else list(value.values)
    else:
        components = [value]  # (a not-yet-initialised Keras variable's `value` is a tensor)
    return [component for component in components
            if isinstance(component, tf.Variable) and component.shape.is_fully_defined()]
