"""The run directory's layout and the resolved-config record.

Owns: where a run's files go under `run_dir` and writing `config.yaml`, the resolved config that
tools (and `harness.load`) use to rebuild the run's model. Written atomically, after a
successful restore, so a run that fails at start-up leaves the record as it was.
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


def write_config_record(run_dir: str, resolved: dict[str, Any]) -> None:
    """Atomically (write + rename) record the resolved config as `run_dir/config.yaml`."""
    tf.io.gfile.makedirs(run_dir)
    final = config_path(run_dir)
    temporary = f"{final}.tmp-{os.getpid()}"
    with tf.io.gfile.GFile(temporary, "w") as handle:
        handle.write(yaml.safe_dump(resolved, sort_keys=False))
    tf.io.gfile.rename(temporary, final, overwrite=True)
