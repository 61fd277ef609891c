"""Process-wide TensorFlow settings: seeds, op determinism, mixed precision.

Owns: everything that must be set once, before models are built. With `deterministic=true` on
CPU, the same config gives bit-identical results, including across kill-and-resume (the rest of
that guarantee comes from `harness/training/state.py` and `harness/data/pipeline.py`).
"""

from __future__ import annotations

import logging

import keras
import tensorflow as tf

log = logging.getLogger(__name__)


def configure_runtime(*, seed: int, deterministic: bool, mixed_precision: str | None) -> None:
    """Seed Python, NumPy, TF and Keras; optionally make ops deterministic; set the dtype policy."""
    logging.getLogger("absl").setLevel(logging.WARNING)  # TF's per-save INFO chatter
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(mixed_precision or "float32")
    log.info("runtime: seed=%d deterministic=%s precision=%s", seed, deterministic, mixed_precision or "float32")
