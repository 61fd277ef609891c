"""Process-wide TensorFlow settings: thread pools, seeds, op determinism, mixed precision.

Owns: everything that must be set once, before models are built (thread pools: before TensorFlow starts).
With `deterministic=true` on CPU, the same config gives bit-identical results, including across
kill-and-resume (the rest of that guarantee comes from `harness/training/state.py` and
`harness/data/pipeline.py`).
"""

from __future__ import annotations

import logging

import keras
import tensorflow as tf

from harness.errors import ConfigError

log = logging.getLogger(__name__)


def configure_threads(*, intra_op: int, inter_op: int) -> None:
    """Size TensorFlow's thread pools (0 keeps TensorFlow's default, one thread per core). Call before anything
    starts TensorFlow's runtime (devices, strategies, ops): the pools are fixed from then on."""
    for key, count, setter in (("intra_op_threads", intra_op, tf.config.threading.set_intra_op_parallelism_threads),
                               ("inter_op_threads", inter_op, tf.config.threading.set_inter_op_parallelism_threads)):
        try:
            if count:
                setter(count)
        except RuntimeError:  # this process ran TensorFlow already (train.train called in-process, e.g. a notebook)
            raise ConfigError(f"Config key 'trainer.{key}' = {count} cannot take effect: TensorFlow has already "
                              "started in this process, and its thread pools are fixed when it starts. Expected "
                              "it set in a fresh process (python train.py ...), or 0 (TensorFlow's default).") from None


def configure_runtime(*, seed: int, deterministic: bool, mixed_precision: str | None) -> None:
    """Seed Python, NumPy, TF and Keras; optionally make ops deterministic; set the dtype policy."""
    logging.getLogger("absl").setLevel(logging.WARNING)  # TF's per-save INFO chatter
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(mixed_precision or "float32")
    threads = [tf.config.threading.get_intra_op_parallelism_threads(),
               tf.config.threading.get_inter_op_parallelism_threads()]
    log.info("runtime: seed=%d deterministic=%s precision=%s threads: intra-op %s, inter-op %s", seed, deterministic,
             mixed_precision or "float32", *(count or "default" for count in threads))
