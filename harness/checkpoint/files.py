"""Checkpoint files: their names, which checkpoints a directory holds, and whether one is intact.

Owns the naming (`ckpt-<global step>`, written by `tf.train.CheckpointManager`) and the reading of
directories: harness checkpoints by their index files, other TensorFlow checkpoints through the
`checkpoint` state file. A checkpoint is listed only once its index exists, and TensorFlow writes
the index last, so a listed checkpoint was completely written.
"""

from __future__ import annotations

import os
import re

import tensorflow as tf
from google.protobuf.message import DecodeError

from harness.errors import error_summary

CHECKPOINT_NAME = "ckpt"
STEP_PATTERN = re.compile(rf"{CHECKPOINT_NAME}-(\d+)\.index$")
# What reading a damaged checkpoint raises in TF 2.21: OpErrors (DataLoss, NotFound, OutOfRange), an
# IndexError for a short read of the object graph, a DecodeError for a garbled object graph.
READ_ERRORS = (tf.errors.OpError, IndexError, DecodeError)


def list_checkpoints(directory: str) -> list[tuple[int, str]]:
    """(step, path prefix) of every checkpoint whose index file exists in `directory`, newest first."""
    if not tf.io.gfile.isdir(directory):
        return []
    found = []
    for name in tf.io.gfile.listdir(directory):
        match = STEP_PATTERN.match(name)
        if match:
            found.append((int(match.group(1)), f"{directory.rstrip('/')}/{CHECKPOINT_NAME}-{match.group(1)}"))
    return sorted(found, reverse=True)


def checkpoints_in(directory: str) -> list[tuple[int | None, str]]:
    """Harness checkpoints (`ckpt-<step>`), else whatever TensorFlow's `checkpoint` state file names."""
    found: list[tuple[int | None, str]] = list(list_checkpoints(directory))
    if not found:
        state = tf.train.get_checkpoint_state(directory)  # TF1 Saver / CheckpointManager state file
        if state is not None:
            prefixes = list(state.all_model_checkpoint_paths) or [state.model_checkpoint_path]
            for prefix in reversed(prefixes):
                prefix = prefix if os.path.isabs(prefix) else os.path.join(directory, prefix)
                if is_prefix(prefix):
                    found.append((step_of(prefix), prefix))
    return found


def is_prefix(path: str) -> bool:
    """True if `path` is a checkpoint prefix (its `.index` file exists)."""
    return tf.io.gfile.exists(f"{path}.index")


def step_of(prefix: str) -> int | None:
    """The global step a `ckpt-<step>` prefix names (None for other names)."""
    tail = prefix.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def verify(prefix: str) -> str | None:
    """Read every tensor of a checkpoint; return None if all are readable, else what went wrong.

    TensorFlow checks each tensor's CRC32C while reading, so a flipped byte, a truncated data
    file and a missing shard are all caught.
    """
    try:
        reader = tf.compat.v1.train.NewCheckpointReader(prefix)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except (*READ_ERRORS, ValueError) as error:  # IndexError: a truncated data file
        return error_summary(error)
    return None


def checkpoint_bytes(path: str) -> int:
    """Bytes of a checkpoint's index and data files (0 if they cannot be listed)."""
    try:
        return sum(tf.io.gfile.stat(name).length for name in tf.io.gfile.glob(f"{path}.*"))
    except tf.errors.OpError:
        return 0


def checkpoint_name(path: str) -> str:
    """`ckpt-1200` of `/runs/x/checkpoints/ckpt-1200`: how messages name a checkpoint."""
    return path.rstrip("/").rsplit("/", 1)[-1]
