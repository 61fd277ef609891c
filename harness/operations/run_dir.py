"""The run directory's layout and the resolved-config record.

Owns: where a run's files go under `run_dir` and writing `config.yaml`, the resolved config that
tools (and `harness.load`) use to rebuild the run's model, and `model_signature.yaml`, the input
shape and dtype and what the task learned from the data (class count, target statistics, vocabulary),
so rebuilding the model and its task needs no data. Both are written
atomically, after a successful restore, so a run that fails at start-up leaves them as they were.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import tensorflow as tf
import yaml

if TYPE_CHECKING:
    from harness.tasks import Task


def tensorboard_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "tensorboard")


def config_path(run_dir: str) -> str:
    return os.path.join(run_dir, "config.yaml")


def model_signature_path(run_dir: str) -> str:
    return os.path.join(run_dir, "model_signature.yaml")


def write_model_signature(run_dir: str, *, input_shape: tuple[int, ...], input_dtype: str, task: Task) -> None:
    """Atomically record what the model maps: inputs `(batch, *input_shape)` of `input_dtype` to the
    task's outputs, with what the task learned from the data (`Task.signature()`)."""
    _write_yaml_atomically(model_signature_path(run_dir),
                           {"task": task.name, "input_shape": [int(d) for d in input_shape],
                            "input_dtype": input_dtype, **task.signature()})


def write_config_record(run_dir: str, resolved: dict[str, Any]) -> None:
    """Atomically (write + rename) record the resolved config as `run_dir/config.yaml`."""
    _write_yaml_atomically(config_path(run_dir), resolved)


def _write_yaml_atomically(final: str, content: dict[str, Any]) -> None:
    tf.io.gfile.makedirs(os.path.dirname(final))
    temporary = f"{final}.tmp-{os.getpid()}"
    with tf.io.gfile.GFile(temporary, "w") as handle:
        handle.write(yaml.safe_dump(content, sort_keys=False))
    tf.io.gfile.rename(temporary, final, overwrite=True)


def read_config_record(run_dir: str) -> dict[str, Any] | None:
    """The resolved config a run recorded, or None if `run_dir/config.yaml` does not exist."""
    return _read_yaml(config_path(run_dir))


def read_model_signature(run_dir: str) -> dict[str, Any] | None:
    """`{"task": ..., "input_shape": [...], "input_dtype": ..., ...}` recorded by the run, or None if absent."""
    return _read_yaml(model_signature_path(run_dir))


def _read_yaml(path: str) -> dict[str, Any] | None:
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path, "r") as handle:
        content = yaml.safe_load(handle.read())
    return content if isinstance(content, dict) else None
