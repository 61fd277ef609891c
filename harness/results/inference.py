"""Restoring a trained model for inference: `load(run_dir)`, and predicting on a file of inputs.

Owns: rebuilding a run's model and task from what the run recorded (`config.yaml`: task and model
config and seed; `model_signature.yaml`: input shape and dtype and what the task learned from the
data, so no data is needed) and restoring one checkpoint's model weights into it. Guarantees:
- Model weights only: the optimizer's slots and the step are never read into anything.
- Every model variable is restored and every model value in the checkpoint is used (the
  `assert_existing_objects_matched` check plus its converse); otherwise a `CheckpointError` lists
  the differing variables. A damaged newest checkpoint falls back to an older intact one, as resuming
  does, unless a checkpoint was chosen explicitly.
- Loading never writes to the run directory.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from harness.checkpoint.contents import KEY_SUFFIX, compare, expected_variables, read_variables
from harness.errors import CheckpointError, DataError, HarnessError
from harness.operations import run_dir as run_files
from harness.results import inspection
from harness.tasks import Task, build_task
from harness.training import modeling
from harness.training.state import model_weights_tree

# Runs recorded before tasks existed trained a classification.
DEFAULT_TASK = {"_target_": "harness.tasks.classification.Classification"}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """A run's model with one checkpoint's weights."""

    model: keras.Model  # (batch, *input_shape) of input_dtype -> the task's raw outputs (e.g. logits)
    step: int | None  # the global step stored in the checkpoint (None if it holds none)
    checkpoint: str  # the prefix restored, e.g. <run_dir>/checkpoints/ckpt-1200
    input_shape: tuple[int, ...]
    input_dtype: str  # 'float32' features or 'int32' token ids
    task: Task  # with what it learned from the data (class count, target statistics) restored
    config: dict[str, Any]  # the run's resolved config (config.yaml)

    @property
    def num_outputs(self) -> int:
        return self.task.num_outputs


def load(run_dir: str, checkpoint: int | str | None = None) -> LoadedModel:
    """Rebuild the model of the run in `run_dir` and restore a checkpoint's model weights.

    `checkpoint`: None = the newest intact checkpoint; an int = the checkpoint of that global step;
    a str = a checkpoint prefix (`.../ckpt-1200`), which may belong to another directory as long as
    its variables fit the model. Raises `HarnessError` (exit code 2 in the scripts) for a missing run
    directory, config record or checkpoint, and `CheckpointError` if the weights do not fit.
    """
    record, signature = read_run_records(run_dir)
    input_shape = tuple(int(d) for d in signature["input_shape"])
    task = build_task(record.get("task", DEFAULT_TASK))
    task.restore_signature(signature)
    model = modeling.build_model(record["model"], input_shape=input_shape, num_outputs=task.num_outputs,
                                 seed=int(record.get("seed", 0)))
    prefix = _chosen_checkpoint(run_dir, checkpoint)
    difference = compare(read_variables(prefix), expected_variables({"model": model_weights_tree(model)}),
                         groups=["model"])
    if not difference.empty():
        raise CheckpointError("\n".join([
            f"Checkpoint '{prefix}' does not fit the model rebuilt from '{run_files.config_path(run_dir)}' "
            f"({record['model'].get('_target_')}), so its weights cannot be loaded:", *difference.lines(),
            "Was config.yaml edited, or does the checkpoint belong to another run? "
            "scripts/inspect_checkpoint.py --diff shows what a config would restore."]))
    status = tf.train.Checkpoint(model=model_weights_tree(model)).read(prefix)
    status.assert_existing_objects_matched()  # every model variable got a value (checked above too)
    status.expect_partial()  # the optimizer's slots and the step are deliberately not restored
    reader = tf.compat.v1.train.NewCheckpointReader(prefix)
    step_key = "step" + KEY_SUFFIX
    step = int(reader.get_tensor(step_key)) if reader.has_tensor(step_key) else None
    log.info("loaded %s (step %s) into %s", prefix, step, model.name)
    return LoadedModel(model, step, prefix, input_shape, str(signature.get("input_dtype", "float32")), task, record)


def read_run_records(run_dir: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's config record and model signature, or a `HarnessError` saying what is missing."""
    if not tf.io.gfile.isdir(run_dir):
        raise HarnessError(f"Run directory '{run_dir}' does not exist: expected the run_dir of a training run "
                           "(it holds config.yaml and checkpoints/).")
    record = run_files.read_config_record(run_dir)
    if record is None or "model" not in record:
        raise HarnessError(f"Run directory '{run_dir}' has no {os.path.basename(run_files.config_path(run_dir))} "
                           "with a model config: expected the run_dir of a training run (train.py records its "
                           "config there when it starts). Given a checkpoint directory? Pass the run directory.")
    signature = run_files.read_model_signature(run_dir)
    if signature is None:
        name = os.path.basename(run_files.model_signature_path(run_dir))
        raise HarnessError(f"Run directory '{run_dir}' has no {name}"
                           " (the input shape and what the task learned from the data). Runs record it when they "
                           "start: rerun the run's train.py command once; a finished run exits at once.")
    return record, signature


def _chosen_checkpoint(run_dir: str, checkpoint: int | str | None) -> str:
    """The prefix `checkpoint` names (a prefix, or a step of the run), verified intact; None: the newest
    intact checkpoint of the run."""
    if isinstance(checkpoint, str):
        located = inspection.locate(checkpoint)
        if located.chosen is None:
            raise CheckpointError(f"'{checkpoint}' is not a checkpoint prefix: expected a path such as "
                                  f"{run_dir}/checkpoints/ckpt-1000 whose .index file exists.")
        return inspection.intact_checkpoint(located)
    located = inspection.locate(run_dir)
    if not located.checkpoints:
        raise CheckpointError(f"Run '{run_dir}' has no checkpoints in '{located.directory}' yet: a run writes its "
                              "first one after checkpoint.every_steps steps.")
    return inspection.intact_checkpoint(located, None if checkpoint is None else int(checkpoint))


# ---------------------------------------------------------------------------------------------
# Inputs and predictions
# ---------------------------------------------------------------------------------------------
def read_inputs(path: str, input_shape: Sequence[int], *, dtype: str = "float32") -> np.ndarray:
    """Examples from a .npy array, a .npz archive (array `features`, or its only array) or a .csv file
    (one example per row, numbers only, an optional header line), as `dtype` `(N, *input_shape)`.

    Rows of `prod(input_shape)` values are reshaped; one example without a batch axis gets one.
    Raises `DataError` naming the file and the shape expected.
    """
    input_shape = tuple(int(d) for d in input_shape)
    expected = f"(N, {', '.join(map(str, input_shape))})" + (
        f" or flat rows of {math.prod(input_shape)} values" if len(input_shape) > 1 else "")
    if not tf.io.gfile.exists(path):
        raise DataError(f"Input file '{path}' does not exist: expected a .npy, .npz or .csv file of shape {expected}.")
    with tf.io.gfile.GFile(path, "rb") as handle:
        content = handle.read()
    suffix = os.path.splitext(path)[1].lower()
    try:
        if suffix == ".npy":
            array = np.load(io.BytesIO(content), allow_pickle=False)
        elif suffix == ".npz":
            with np.load(io.BytesIO(content), allow_pickle=False) as archive:
                names = list(archive.files)
                if "features" not in names and len(names) != 1:
                    raise DataError(f"Input file '{path}' holds arrays {names}: expected one named 'features' "
                                    "(or a single array).")
                array = archive["features" if "features" in names else names[0]]
        elif suffix == ".csv":
            array = _read_csv(content.decode("utf-8"), path)
        else:
            raise DataError(f"Input file '{path}' has the extension '{suffix}': expected .npy, .npz or .csv.")
    except (ValueError, OSError, EOFError, UnicodeDecodeError) as error:
        raise DataError(f"Input file '{path}' cannot be read ({error}): expected a numeric {suffix} file of "
                        f"shape {expected}.") from None
    if array.dtype.kind not in "biuf":
        raise DataError(f"Input file '{path}' holds {array.dtype} values: expected numbers of shape {expected}.")
    if array.shape == input_shape:
        array = array[None]
    elif array.shape[1:] != input_shape:
        if array.ndim < 2 or math.prod(array.shape[1:]) != math.prod(input_shape):
            raise DataError(f"Input file '{path}' holds an array of shape {tuple(array.shape)}: the model expects "
                            f"{expected}.")
        array = array.reshape((len(array), *input_shape))
    if not np.isfinite(array).all():
        raise DataError(f"Input file '{path}' contains NaN or infinite values.")
    if np.dtype(dtype).kind in "iu" and not np.all(array == np.round(array)):
        raise DataError(f"Input file '{path}' holds values that are not whole numbers: the model expects token "
                        f"ids ({dtype}) of shape {expected}.")
    return array.astype(dtype, copy=False)


def _read_csv(text: str, path: str) -> np.ndarray:
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise DataError(f"Input file '{path}' is empty: expected one example per line.")
    if not any(_is_number(field) for field in lines[0].split(",")):
        lines = lines[1:]  # a header: names, not numbers (a row with one typo is not one)
    if not lines:
        raise ValueError("no data lines after the header")
    try:
        return np.loadtxt(lines, delimiter=",", dtype=np.float32, ndmin=2)
    except ValueError:
        raise ValueError(_first_bad_line(lines)) from None


def _first_bad_line(lines: list[str]) -> str:
    """Why `np.loadtxt` refused the data lines, naming the line (only run once it has)."""
    widths = set()
    for number, line in enumerate(lines, start=1):
        fields = line.split(",")
        if not all(_is_number(field) for field in fields):
            return f"data line {number} is not comma-separated numbers: {line[:80]!r}"
        widths.add(len(fields))
    return "the lines do not all hold the same number of values" if len(widths) > 1 else "not a numeric CSV file"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def predict_outputs(model: keras.Model, features: np.ndarray, *, batch_size: int = 1024) -> np.ndarray:
    """The model's raw outputs (logits for classification) as float32 for `(N, *input_shape)` inputs,
    in inference mode, `batch_size` examples per call."""
    outputs = [keras.ops.convert_to_numpy(model(features[start:start + batch_size], training=False))
               for start in range(0, len(features), batch_size)]
    if not outputs:
        return np.zeros((0, *model.output_shape[1:]), np.float32)
    return np.concatenate(outputs).astype(np.float32)


def checkpoint_argument(text: str | None) -> int | str | None:
    """A command-line `--checkpoint`: a global step (digits) or a checkpoint prefix."""
    if text is None:
        return None
    return int(text) if text.isdigit() else text
