"""Exporting a trained model for serving: a `.keras` file and a TensorFlow SavedModel.

Owns: the export directory's layout (`model.keras`, `saved_model/`). Guarantees: each artifact is
written under a temporary name and renamed into place, so a reader never sees a half-written one
(an interrupted export leaves the previous artifact or none, plus a `*.tmp-*` leftover).
`model.keras` reloads with `keras.saving.load_model` (custom layers must be registered with
`keras.saving.register_keras_serializable`, as models/residual_mlp.py does) and returns the model's
raw outputs; `saved_model/` has a `serve` endpoint mapping `(batch, *input_shape)` inputs to the
task's outputs (`Task.serving_outputs`: logits for classification, values in target units for
regression) and needs no Python code of this project. Exporting reads the model's variables only;
the checkpoints are untouched.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import keras
import tensorflow as tf

from harness.config.schema import ExportConfig
from harness.control.controller import Status
from harness.errors import ConfigError, HarnessError
from harness.tasks import Task

log = logging.getLogger(__name__)

KERAS_FILE = "model.keras"
SAVED_MODEL_DIR = "saved_model"


@dataclass(frozen=True)
class ExportPaths:
    keras_file: str
    saved_model_dir: str


class ExportError(HarnessError):
    """The export directory cannot be written; training and its checkpoints are unaffected."""


def check_export_dir(directory: str, *, key: str = "export.dir") -> None:
    """Refuse, before any training, an export directory that could never be written.

    Local paths only (a bucket is checked when written): the directory, or the nearest of its
    parents that exists, must be a writable directory. Nothing is created.
    """
    if "://" in directory:
        return
    existing = os.path.abspath(directory)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        problem = "is not a directory" if not os.path.isdir(existing) else "is not writable"
        raise ConfigError(f"{key} '{directory}' cannot be created or written: '{existing}' {problem}. Point {key} "
                          "at a writable directory (or set export.enabled=false).")


def export_model(model: keras.Model, directory: str, *, task: Task, input_shape: tuple[int, ...],
                 input_dtype: str) -> ExportPaths:
    """Write `directory/model.keras` and `directory/saved_model/`, replacing earlier exports.

    Raises `ExportError` if the directory cannot be written.
    """
    try:
        return _write_artifacts(model, directory, task=task,
                                input_spec=tf.TensorSpec((None, *input_shape), tf.as_dtype(input_dtype)))
    except (OSError, tf.errors.OpError) as error:
        message = getattr(error, "message", None) or str(error)
        raise ExportError(f"Exporting {model.name} to '{directory}' failed: {message.splitlines()[0][:300]}. Nothing "
                          "else was changed: the checkpoints are intact, and a rerun with a writable export.dir (or "
                          "scripts/export.py --output DIR) exports again.") from None


def _write_artifacts(model: keras.Model, directory: str, *, task: Task, input_spec: tf.TensorSpec) -> ExportPaths:
    tf.io.gfile.makedirs(directory)
    paths = ExportPaths(os.path.join(directory, KERAS_FILE), os.path.join(directory, SAVED_MODEL_DIR))
    suffix = f"tmp-{os.getpid()}"

    temporary_file = os.path.join(directory, f"model.{suffix}.keras")  # Keras insists on the extension
    model.save(temporary_file)
    tf.io.gfile.rename(temporary_file, paths.keras_file, overwrite=True)

    temporary_dir = f"{paths.saved_model_dir}.{suffix}"
    if tf.io.gfile.exists(temporary_dir):
        tf.io.gfile.rmtree(temporary_dir)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", lambda inputs: task.serving_outputs(tf.cast(model(inputs, training=False),
                                                                              tf.float32)),
                         input_signature=[input_spec])
    archive.write_out(temporary_dir, verbose=False)
    if tf.io.gfile.exists(paths.saved_model_dir):
        tf.io.gfile.rmtree(paths.saved_model_dir)  # directories cannot be renamed over
    tf.io.gfile.rename(temporary_dir, paths.saved_model_dir)
    log.info("exported %s to %s and %s", model.name, paths.keras_file, paths.saved_model_dir)
    return paths


def exported(directory: str) -> bool:
    """True if both artifacts exist in `directory`."""
    return all(tf.io.gfile.exists(os.path.join(directory, name)) for name in (KERAS_FILE, SAVED_MODEL_DIR))


def export_finished_run(model: keras.Model, config: ExportConfig, *, task: Task, input_shape: tuple[int, ...],
                        input_dtype: str, status: Status, is_chief: bool) -> None:
    """train.py's hook: the chief exports once training has completed (`export.enabled`).

    A rerun of an already complete run exports only if the export is missing (say the first
    attempt was killed while exporting); a preempted run exports nothing.
    """
    if not (config.enabled and is_chief) or status is Status.PREEMPTED:
        return
    if status is Status.ALREADY_COMPLETE and exported(config.dir):
        return
    export_model(model, config.dir, task=task, input_shape=input_shape, input_dtype=input_dtype)
