"""The seekable pipeline: batch k is a pure function of (seed, k), reached in O(1), sharded exactly."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from harness.config.schema import SyntheticDataConfig
from harness.data.in_memory_sources import synthetic
from harness.data.pipeline import SeekableInput
from harness.errors import ConfigError


def make_input(*, seed: int = 7, global_batch_size: int = 32, num_replicas: int = 1) -> SeekableInput:
    examples = synthetic(SyntheticDataConfig(input_dim=4, num_examples=200, eval_examples=40))
    return SeekableInput(examples, global_batch_size=global_batch_size, eval_batch_size=global_batch_size,
                         shuffle_seed=seed, prefetch=2, num_replicas=num_replicas)


def test_each_epoch_is_a_fresh_permutation_of_the_training_set() -> None:
    pipeline = make_input()
    num_train = 160
    positions = tf.range(3 * num_train, dtype=tf.int64)
    indices = pipeline.train_indices(positions).numpy().reshape(3, num_train)
    for epoch in indices:
        assert sorted(epoch) == list(range(num_train))  # every example exactly once
    assert not np.array_equal(indices[0], indices[1]) and not np.array_equal(indices[1], indices[2])


def test_batch_k_depends_only_on_seed_and_k() -> None:
    first, second, other_seed = make_input(), make_input(), make_input(seed=8)
    for step in (0, 4, 5, 1000):  # 5 straddles an epoch boundary (160 / 32 = 5 steps per epoch)
        np.testing.assert_array_equal(first.train_batch(step)[0], second.train_batch(step)[0])
    assert not np.array_equal(first.train_batch(3)[1], other_seed.train_batch(3)[1])


def test_iterator_started_at_k_yields_what_a_run_from_zero_yields_at_k() -> None:
    pipeline = make_input()
    strategy = tf.distribute.get_strategy()
    from_zero = pipeline.distributed_train_iterator(strategy, start_step=0)
    batches = [next(from_zero) for _ in range(12)]
    resumed = pipeline.distributed_train_iterator(strategy, start_step=9)
    for step in (9, 10, 11):
        batch = next(resumed)
        np.testing.assert_array_equal(batch.features.numpy(), batches[step].features.numpy())
        np.testing.assert_array_equal(batch.targets.numpy(), pipeline.train_batch(step)[1])


def test_replica_shards_partition_the_global_batch() -> None:
    """With 2 input pipelines x 2 replicas each, the 4 shards of a step form the global batch exactly."""
    pipeline = make_input(global_batch_size=32, num_replicas=4)
    features_by_step: dict[int, list[np.ndarray]] = {}
    for pipeline_id in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline_id,
                                             num_replicas_in_sync=4)
        dataset = pipeline.train_dataset(context, start_step=3)
        for element, batch in enumerate(dataset.take(4)):
            features_by_step.setdefault(3 + element // 2, []).append(batch.features.numpy())
    for step, shards in features_by_step.items():
        assert all(len(shard) == 8 for shard in shards)
        expected = pipeline.train_batch(step)[0]
        np.testing.assert_array_equal(np.sort(np.concatenate(shards), axis=0), np.sort(expected, axis=0))


def test_eval_covers_the_eval_split_once_with_padding_weighted_zero() -> None:
    pipeline = make_input(global_batch_size=16)  # 40 eval examples -> 3 batches, 8 padded
    dataset = pipeline.distributed_eval_dataset(tf.distribute.get_strategy())
    weights = np.concatenate([batch.weights.numpy() for batch in dataset])
    assert pipeline.eval_steps == 3 and weights.sum() == 40 and len(weights) == 48


def test_batch_not_divisible_by_replicas_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"data\.global_batch_size"):
        make_input(global_batch_size=30, num_replicas=4)
