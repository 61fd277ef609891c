"""The seekable input pipeline: train batch `k` is a pure function of (shuffle seed, `k`).

Owns: turning examples into per-replica batches for any `tf.distribute.Strategy`: examples in
memory (`ExampleArrays`, gathered inside the graph) or read from files by index (`FileExamples`,
`harness/data/file_sources.py`: read in background tf.data threads, never loaded whole). Guarantees:
- Global step `k` consumes the global example positions `[k * B, (k + 1) * B)` of an endless
  stream in which epoch `e` is the permutation `index_shuffle(seed=[shuffle_seed, e])` of the
  training set: every epoch is a fresh shuffle, every example is seen once per epoch.
- Starting at step `k` costs O(1): nothing is replayed. Distributed-dataset iterators cannot be
  checkpointed, so resuming simply rebuilds the pipeline at the restored step.
- Two ways to produce the same train batches (`data.prefetch`): 0 computes each batch inside the
  training step from a step counter (`StepIterator`: no tf.data, the least overhead on CPU; in-memory
  data only); N > 0 runs a tf.data pipeline that prepares N batches ahead (overlaps input with
  compute). File-backed data always takes the pipeline, at least `FILE_PREFETCH` batches ahead, and
  reads the examples of up to `FILE_BATCHES_PER_READ` batches by index in one host call (on GPUs,
  batches move to the devices per step).
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

from harness.config.schema import DataConfig
from harness.data.file_sources import FileExamples, Split
from harness.data.in_memory_sources import ExampleArrays
from harness.errors import ConfigError, DataError

FILE_PREFETCH = 4  # batches read ahead from files: covers the jitter of page-cache misses
# Train batches read from files per host call: up to this many, and this many bytes. The call's fixed costs
# (tf.numpy_function, one read per shard touched) are paid once for several batches: with 27 shards, +8 % steps/s
# for 8 batches of 0.8 MB per call against 1 (docs/benchmarks.md, section 6). A call fails as a whole, so a bad
# record stops training up to this many steps before its own.
FILE_BATCHES_PER_READ = 8
FILE_READ_BYTES = 8 << 20


class Batch(NamedTuple):
    """One per-replica batch: features, targets (whatever the task learns) and float32 example
    weights (0 = padding)."""

    features: tf.Tensor
    targets: tf.Tensor
    weights: tf.Tensor


class SeekableInput:
    """Train and eval input for a strategy; see the module docstring for the guarantees."""

    def __init__(
        self,
        examples: ExampleArrays | FileExamples,
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
        num_train = _count(examples, "train")
        if global_batch_size > num_train:
            raise ConfigError(
                f"Config key 'data.global_batch_size' = {global_batch_size} exceeds the {num_train} training "
                "examples: expected at most one epoch per step."
            )
        self.examples = examples
        self.global_batch_size = global_batch_size
        self.eval_batch_size = eval_batch_size
        self.shuffle_seed = shuffle_seed
        self.from_files = isinstance(examples, FileExamples)
        self.prefetch = max(prefetch, FILE_PREFETCH) if self.from_files else prefetch
        self.num_replicas = num_replicas
        self.num_train, self.num_eval = num_train, _count(examples, "eval")
        self.eval_steps = math.ceil(self.num_eval / eval_batch_size)
        self._read_failures: list[DataError] = []  # files that went bad mid-run (see `read_failure_behind`)

    # -- pure functions of the position -----------------------------------------------------------
    def train_indices(self, positions: tf.Tensor) -> tf.Tensor:
        """Training-set indices of stream positions (int64, any shape): epoch-wise fresh permutations."""
        num_train = self.num_train
        flat = tf.reshape(positions, [-1])
        epochs = flat // num_train
        seeds = tf.stack([tf.fill(tf.shape(epochs), tf.constant(self.shuffle_seed, tf.int64)), epochs,
                          tf.zeros_like(epochs)], axis=1)
        # The raw op: tf.random.experimental.index_shuffle mis-pads batched [n, 2] seeds (TF 2.21).
        indices = tf.raw_ops.RandomIndexShuffle(index=flat % num_train, seed=seeds,
                                                max_index=tf.constant(num_train - 1, tf.int64), rounds=4)
        return tf.reshape(indices, tf.shape(positions))

    def train_batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The whole global batch of a step, as numpy (for tests and inspection)."""
        positions = step * self.global_batch_size + tf.range(self.global_batch_size, dtype=tf.int64)
        indices = self.train_indices(positions).numpy()
        if self.from_files:
            return self.examples.train.read(indices)
        return self.examples.train_features[indices], self.examples.train_targets[indices]

    # -- reading from files ------------------------------------------------------------------------
    def read_failure_behind(self, error: tf.errors.OpError) -> DataError | None:
        """The `DataError` of a file read that `error` reports, if any (tf.numpy_function keeps its text in
        the OpError's). A read that failed ahead of the step but was never reached is not behind it: another
        error (a lost peer) is then reported as itself."""
        return next((failure for failure in self._read_failures if str(failure) in error.message), None)

    def _file_batch(self, split: Split, indices: tf.Tensor, weights: tf.Tensor) -> Batch:
        """The examples at `indices` of a file-backed split, read on the host by a tf.data thread."""
        examples = self.examples

        def read(host_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            try:
                features, targets = split.read(host_indices)
            except DataError as error:  # tf.numpy_function turns it into an anonymous OpError
                self._read_failures.append(error)
                raise
            return features.astype(examples.input_dtype, copy=False), targets.astype(examples.target_dtype,
                                                                                     copy=False)

        features, targets = tf.numpy_function(read, [indices], [tf.as_dtype(examples.input_dtype),
                                                                tf.as_dtype(examples.target_dtype)], stateful=False)
        count = indices.shape[0]
        features.set_shape([count, *examples.input_shape])
        targets.set_shape([count, *examples.target_shape])
        return Batch(features, targets, weights)

    # -- datasets ----------------------------------------------------------------------------------
    def train_dataset(self, context: tf.distribute.InputContext, *, start_step: int,
                      num_steps: int | None = None) -> tf.data.Dataset:
        """One input pipeline's per-replica train batches of `num_steps` global steps (None: endless) from global
        step `start_step`.

        Element `e` of the pipeline is the batch of local replica `e % local_replicas` at step
        `start_step + e // local_replicas`; file-backed elements are read `batches_per_read` at a time, never
        past the last step (a read fails as a whole: it must not fail the run on records it never trains on).
        """
        per_replica = context.get_per_replica_batch_size(self.global_batch_size)
        local_replicas = context.num_replicas_in_sync // context.num_input_pipelines
        num_elements = np.iinfo(np.int64).max if num_steps is None else num_steps * local_replicas

        def step_and_replica(elements: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            return (start_step + elements // local_replicas,
                    context.input_pipeline_id * local_replicas + elements % local_replicas)

        if self.from_files:
            per_read = self.batches_per_read(per_replica)

            def read_batches(first: tf.Tensor) -> Batch:
                count = tf.minimum(tf.constant(per_read, tf.int64), num_elements - first)
                step, replica = step_and_replica(first + tf.range(count, dtype=tf.int64))
                indices = self.replica_train_indices(step=step, replica=replica, per_replica=per_replica)
                batches = self._file_batch(self.examples.train, tf.reshape(indices, [-1]),
                                           tf.ones([count * per_replica], tf.float32))
                return Batch(*(tf.reshape(part, [-1, per_replica, *part.shape[1:]]) for part in batches))

            dataset = tf.data.Dataset.range(0, num_elements, per_read).map(
                read_batches, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).unbatch()
        else:
            features = tf.constant(self.examples.train_features)
            targets = tf.constant(self.examples.train_targets)

            def make_batch(element: tf.Tensor) -> Batch:
                step, replica = step_and_replica(element)
                return self.replica_train_batch(features, targets, step=step, replica=replica,
                                                per_replica=per_replica)

            dataset = tf.data.Dataset.range(num_elements).map(make_batch, num_parallel_calls=tf.data.AUTOTUNE,
                                                              deterministic=True)
        return dataset.prefetch(self.prefetch) if self.prefetch else dataset

    def batches_per_read(self, per_replica: int) -> int:
        """How many per-replica train batches one host call reads from files (see FILE_BATCHES_PER_READ)."""
        examples = self.examples
        example_bytes = (math.prod(examples.input_shape) * np.dtype(examples.input_dtype).itemsize
                         + math.prod(examples.target_shape) * np.dtype(examples.target_dtype).itemsize)
        return max(1, min(FILE_BATCHES_PER_READ, FILE_READ_BYTES // (per_replica * example_bytes)))

    def eval_dataset(self, context: tf.distribute.InputContext) -> tf.data.Dataset:
        """One input pipeline's share of the eval split, padded with weight-0 examples."""
        if not self.from_files:
            features = tf.constant(self.examples.eval_features)
            targets = tf.constant(self.examples.eval_targets)
        num_eval = self.num_eval
        per_replica = context.get_per_replica_batch_size(self.eval_batch_size)
        local_replicas = context.num_replicas_in_sync // context.num_input_pipelines

        def make_batch(element: tf.Tensor) -> Batch:
            step = element // local_replicas
            replica = context.input_pipeline_id * local_replicas + element % local_replicas
            positions = step * self.eval_batch_size + replica * per_replica + tf.range(per_replica, dtype=tf.int64)
            indices = tf.minimum(positions, num_eval - 1)
            weights = tf.cast(positions < num_eval, tf.float32)
            if self.from_files:
                return self._file_batch(self.examples.eval, indices, weights)
            return Batch(tf.gather(features, indices), tf.gather(targets, indices), weights)

        dataset = tf.data.Dataset.range(self.eval_steps * local_replicas)
        # In-memory gathers are cheap enough to run inline; file reads go in parallel, in order.
        dataset = (dataset.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
                   if self.from_files else dataset.map(make_batch))
        return dataset.prefetch(self.prefetch) if self.prefetch else dataset

    def replica_train_batch(self, features: tf.Tensor, targets: tf.Tensor, *, step: tf.Tensor, replica: tf.Tensor,
                            per_replica: int) -> Batch:
        """Replica `replica`'s share of global step `step`, gathered from the training arrays (pure TF)."""
        indices = self.replica_train_indices(step=step, replica=replica, per_replica=per_replica)
        return Batch(tf.gather(features, indices), tf.gather(targets, indices), tf.ones([per_replica], tf.float32))

    def replica_train_indices(self, *, step: tf.Tensor, replica: tf.Tensor, per_replica: int) -> tf.Tensor:
        """Training-set indices of replica `replica`'s share of global step `step` ([per_replica]; for vectors
        of steps and replicas, [n, per_replica])."""
        first = step * self.global_batch_size + tf.cast(replica, tf.int64) * per_replica
        return self.train_indices(first[..., tf.newaxis] + tf.range(per_replica, dtype=tf.int64))

    def distributed_train_iterator(self, strategy: tf.distribute.Strategy, *, start_step: int,
                                   num_steps: int | None = None):
        """An iterator of per-replica train batches of `num_steps` steps (None: endless) from global step `start_step`.

        With `prefetch` 0 a `StepIterator` (batches computed inside the step), otherwise an
        iterator over `train_dataset`; both yield the same batches.
        """
        if not self.prefetch:  # in-memory data only: file-backed data always prefetches
            return StepIterator(self, strategy, start_step=start_step)
        return iter(strategy.distribute_datasets_from_function(
            lambda context: self.train_dataset(context, start_step=start_step, num_steps=num_steps)))

    def distributed_eval_dataset(self, strategy: tf.distribute.Strategy):
        """Per-replica eval batches covering the eval split once."""
        return strategy.distribute_datasets_from_function(self.eval_dataset)


class StepIterator:
    """Train batches computed inside the training step from a step counter, without tf.data.

    `next(iterator)`, eagerly or inside a `tf.function`, returns the per-replica batches of global
    step `position` (as `strategy.run` takes them) and advances `position` by one. Inside a
    `tf.function` loop the gather runs in the step itself: no pipeline threads or per-element
    dispatch, which on a CPU-bound host costs less than tf.data's overlap saves (docs/benchmarks.md).
    """

    def __init__(self, pipeline: SeekableInput, strategy: tf.distribute.Strategy, *, start_step: int) -> None:
        self._pipeline = pipeline
        self._strategy = strategy
        self._per_replica = pipeline.global_batch_size // strategy.num_replicas_in_sync
        with tf.init_scope(), tf.device("/device:CPU:0"):  # host memory, like a tf.data pipeline
            self._features = tf.constant(pipeline.examples.train_features)
            self._targets = tf.constant(pipeline.examples.train_targets)
            self.position = tf.Variable(start_step, dtype=tf.int64, trainable=False, name="input_position")

    def __iter__(self) -> StepIterator:
        return self

    def __next__(self):
        step = self.position.assign_add(1) - 1

        def replica_batch(context: tf.distribute.experimental.ValueContext) -> Batch:
            # Gather on the host: placed on an accelerator, the op would copy all training arrays there.
            with tf.device("/device:CPU:0"):
                return self._pipeline.replica_train_batch(
                    self._features, self._targets, step=step, replica=context.replica_id_in_sync_group,
                    per_replica=self._per_replica)

        return self._strategy.experimental_distribute_values_from_function(replica_batch)


def _count(examples: ExampleArrays | FileExamples, split: str) -> int:
    if isinstance(examples, FileExamples):
        return examples.num_train if split == "train" else examples.num_eval
    return len(examples.train_targets if split == "train" else examples.eval_targets)


def build_input(examples: ExampleArrays | FileExamples, config: DataConfig, *, seed: int,
                num_replicas: int) -> SeekableInput:
    """The pipeline for `data.*` settings; the shuffle follows the run's `seed` unless set."""
    return SeekableInput(
        examples,
        global_batch_size=config.global_batch_size,
        eval_batch_size=config.eval_batch_size or config.global_batch_size,
        shuffle_seed=seed if config.shuffle_seed is None else config.shuffle_seed,
        prefetch=config.prefetch,
        num_replicas=num_replicas,
    )
