"""The seekable input pipeline: train batch `k` is a pure function of (shuffle seed, `k`).

Owns: turning `ExampleArrays` into per-replica batches for any `tf.distribute.Strategy`.
Guarantees:
- Global step `k` consumes the global example positions `[k * B, (k + 1) * B)` of an endless
  stream in which epoch `e` is the permutation `index_shuffle(seed=[shuffle_seed, e])` of the
  training set: every epoch is a fresh shuffle, every example is seen once per epoch.
- Starting at step `k` costs O(1): nothing is replayed. Distributed-dataset iterators cannot be
  checkpointed, so resuming simply rebuilds the pipeline at the restored step.
- Replica `r` of `G` (across all workers) gets positions `[k*B + r*B/G, k*B + (r+1)*B/G)`, so each
  worker reads only its own shard and the global batch is the same for any number of replicas.
- Eval batches cover the eval split exactly once; padding examples carry weight 0 so every worker
  runs the same number of eval steps.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from harness.config import DataConfig
from harness.data_sources import ExampleArrays
from harness.errors import ConfigError


class Batch(NamedTuple):
    """One per-replica batch: features, int32 labels and float32 example weights (0 = padding)."""

    features: tf.Tensor
    labels: tf.Tensor
    weights: tf.Tensor


class SeekableInput:
    """Train and eval input for a strategy; see the module docstring for the guarantees."""

    def __init__(
        self,
        examples: ExampleArrays,
        *,
        global_batch_size: int,
        eval_batch_size: int,
        shuffle_seed: int,
        prefetch: int,
        num_replicas: int,
    ) -> None:
        for key, size in (("data.global_batch_size", global_batch_size), ("data.eval_batch_size", eval_batch_size)):
            if size % num_replicas:
                raise ConfigError(
                    f"Config key '{key}' = {size} is not divisible by the {num_replicas} replicas in sync: "
                    f"expected a multiple of {num_replicas} so every replica gets the same number of examples."
                )
        num_train = len(examples.train_labels)
        if global_batch_size > num_train:
            raise ConfigError(
                f"Config key 'data.global_batch_size' = {global_batch_size} exceeds the {num_train} training "
                "examples: expected at most one epoch per step."
            )
        self.examples = examples
        self.global_batch_size = global_batch_size
        self.eval_batch_size = eval_batch_size
        self.shuffle_seed = shuffle_seed
        self.prefetch = prefetch
        self.num_replicas = num_replicas
        self.eval_steps = math.ceil(len(examples.eval_labels) / eval_batch_size)

    # -- pure functions of the position -----------------------------------------------------------
    def train_indices(self, positions: tf.Tensor) -> tf.Tensor:
        """Training-set indices of stream positions (int64 vector): epoch-wise fresh permutations."""
        num_train = len(self.examples.train_labels)
        epochs = positions // num_train
        seeds = tf.stack([tf.fill(tf.shape(epochs), tf.constant(self.shuffle_seed, tf.int64)), epochs,
                          tf.zeros_like(epochs)], axis=1)
        # The raw op: tf.random.experimental.index_shuffle mis-pads batched [n, 2] seeds (TF 2.21).
        return tf.raw_ops.RandomIndexShuffle(index=positions % num_train, seed=seeds,
                                             max_index=tf.constant(num_train - 1, tf.int64), rounds=4)

    def train_batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The whole global batch of a step, as numpy (for tests and inspection)."""
        positions = step * self.global_batch_size + tf.range(self.global_batch_size, dtype=tf.int64)
        indices = self.train_indices(positions).numpy()
        return self.examples.train_features[indices], self.examples.train_labels[indices]

    # -- datasets ----------------------------------------------------------------------------------
    def train_dataset(self, context: tf.distribute.InputContext, *, start_step: int) -> tf.data.Dataset:
        """One input pipeline's endless per-replica train batches, from global step `start_step`."""
        features = tf.constant(self.examples.train_features)
        labels = tf.constant(self.examples.train_labels)
        per_replica = context.get_per_replica_batch_size(self.global_batch_size)
        local_replicas = context.num_replicas_in_sync // context.num_input_pipelines

        def make_batch(element: tf.Tensor) -> Batch:
            step = start_step + element // local_replicas
            replica = context.input_pipeline_id * local_replicas + element % local_replicas
            first = step * self.global_batch_size + replica * per_replica
            indices = self.train_indices(first + tf.range(per_replica, dtype=tf.int64))
            return Batch(tf.gather(features, indices), tf.gather(labels, indices), tf.ones([per_replica], tf.float32))

        dataset = tf.data.Dataset.range(np.iinfo(np.int64).max).map(
            make_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return dataset.prefetch(self.prefetch) if self.prefetch else dataset

    def eval_dataset(self, context: tf.distribute.InputContext) -> tf.data.Dataset:
        """One input pipeline's share of the eval split, padded with weight-0 examples."""
        features = tf.constant(self.examples.eval_features)
        labels = tf.constant(self.examples.eval_labels)
        num_eval = len(self.examples.eval_labels)
        per_replica = context.get_per_replica_batch_size(self.eval_batch_size)
        local_replicas = context.num_replicas_in_sync // context.num_input_pipelines

        def make_batch(element: tf.Tensor) -> Batch:
            step = element // local_replicas
            replica = context.input_pipeline_id * local_replicas + element % local_replicas
            positions = step * self.eval_batch_size + replica * per_replica + tf.range(per_replica, dtype=tf.int64)
            indices = tf.minimum(positions, num_eval - 1)
            return Batch(tf.gather(features, indices), tf.gather(labels, indices),
                         tf.cast(positions < num_eval, tf.float32))

        dataset = tf.data.Dataset.range(self.eval_steps * local_replicas).map(make_batch)
        return dataset.prefetch(self.prefetch) if self.prefetch else dataset

    def distributed_train_iterator(self, strategy: tf.distribute.Strategy, *, start_step: int):
        """An iterator of per-replica train batches starting at global step `start_step`."""
        return iter(strategy.distribute_datasets_from_function(
            lambda context: self.train_dataset(context, start_step=start_step)))

    def distributed_eval_dataset(self, strategy: tf.distribute.Strategy):
        """Per-replica eval batches covering the eval split once."""
        return strategy.distribute_datasets_from_function(self.eval_dataset)


def build_input(examples: ExampleArrays, config: DataConfig, *, seed: int, num_replicas: int) -> SeekableInput:
    """The pipeline for `data.*` settings; the shuffle follows the run's `seed` unless set."""
    return SeekableInput(
        examples,
        global_batch_size=config.global_batch_size,
        eval_batch_size=config.eval_batch_size or config.global_batch_size,
        shuffle_seed=seed if config.shuffle_seed is None else config.shuffle_seed,
        prefetch=config.prefetch,
        num_replicas=num_replicas,
    )
