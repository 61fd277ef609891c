"""Process-wide TensorFlow settings: thread pools, seeds, op determinism, mixed precision.

Owns: everything that must be set once, before models are built (thread pools: before TensorFlow starts).
With `deterministic=true` on CPU, the same config gives bit-identical results, including across
kill-and-resume (the rest of that guarantee comes from `harness/training/state.py` and
`harness/data/pipeline.py`).
"""

from __future__ import annotations

import logging
import os

import keras
import tensorflow as tf

from harness.errors import ConfigError
from harness.host import has_accelerators, usable_cores

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


def advise_a_core_for_the_input(*, file_backed: bool, cores: int | None = None,
                                accelerators: bool | None = None) -> str | None:
    """Log (and return) which setting leaves a core to file reads where they compete with the step for every core:
    file-backed data on a host of several `cores` without `accelerators` (default: this host's), with TensorFlow's
    default intra-op pool (set neither by `trainer.intra_op_threads` nor by its environment variable)."""
    if not file_backed or tf.config.threading.get_intra_op_parallelism_threads() or os.environ.get(
            "TF_NUM_INTRAOP_THREADS"):
        return None
    cores = usable_cores() if cores is None else cores
    if cores < 2 or (has_accelerators() if accelerators is None else accelerators):
        return None
    advice = (f"file-backed input on a CPU-only host: the training step's ops may use all {cores} cores of this "
              f"process, and the reads compete with them for CPU. `trainer.intra_op_threads={cores - 1}` leaves a "
              "core to the input (the benchmark's MLP on 2 cores: +20-31 % steps/s; docs/benchmarks.md, section 6).")
    log.info(advice)
    return advice


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
