"""The run directory's layout and the resolved-config record.

Owns: where a run's files go under `run_dir` and writing `config.yaml`, the resolved config that
tools (and `harness.load`) use to rebuild the run's model, and `model_signature.yaml`, the input
shape and class count the model was built for (so rebuilding it needs no data). Both are written
atomically, after a successful restore, so a run that fails at start-up leaves them as they were.
"""

from __future__ import annotations

import os
from typing import Any

import tensorflow as tf
import yaml


def tensorboard_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "tensorboard")


def config_path(run_dir: str) -> str:
    return os.path.join(run_dir, "config.yaml")


def model_signature_path(run_dir: str) -> str:
    return os.path.join(run_dir, "model_signature.yaml")


def write_model_signature(run_dir: str, *, input_shape: tuple[int, ...], num_classes: int) -> None:
    """Atomically record what the model maps: float32 inputs `(batch, *input_shape)` to `num_classes` logits."""
    _write_yaml_atomically(model_signature_path(run_dir),
                           {"input_shape": [int(d) for d in input_shape], "num_classes": int(num_classes)})


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
    """`{"input_shape": [...], "num_classes": n}` recorded by the run, or None if absent (older runs)."""
    return _read_yaml(model_signature_path(run_dir))


def _read_yaml(path: str) -> dict[str, Any] | None:
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path, "r") as handle:
        content = yaml.safe_load(handle.read())
    return content if isinstance(content, dict) else None
