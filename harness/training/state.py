"""The training state: everything a checkpoint holds, as one object.

What is in a checkpoint? `TrainState.checkpoint_items()`: the global step counter, the model's
variables, the optimizer's variables (its iteration count, which drives the learning-rate
schedule, and loss-scale state under mixed precision included), and what divergence rollbacks
changed: the skip schedule (per rollback, from which step on how many batches are skipped), the
number of rollbacks, and `skipped_batches` (the schedule's total at the checkpoint's step, for
people reading it). Everything else a resumed run needs is a pure function of these and `seed`:
the input position (batch `step + skipped_before(step)` of `harness/data/pipeline.py`) and every
random-number stream (`reseed_random_layers`), so there is no RNG state to lose.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import tensorflow as tf

from harness.private_apis import layer_seed_generators, nested_layers

# Keeps per-layer streams apart; any odd constant would do.
_LAYER_STREAM_STRIDE = 1_000_003
MAX_SKIPS = 64  # rows of the skip schedule: trainer.max_rollbacks may not exceed it


@dataclass
class TrainState:
    """Mutable training state; create it with `create_train_state` inside `strategy.scope()`."""

    step: tf.Variable  # int64 global step: the number of optimizer updates applied so far
    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    seed_generators: tuple[keras.random.SeedGenerator, ...]  # RNG of dropout & co, reseeded per step
    skipped_batches: tf.Variable  # int64: batches skipped before `step` (derived from the schedule, for readers)
    rollbacks: tf.Variable  # int64: divergence rollbacks so far (trainer.max_rollbacks bounds it)
    skip_schedule: tf.Variable  # int64 [MAX_SKIPS, 2]: (from step, batches) per rollback in order; (0, 0) unused

    @property
    def batch_index(self) -> int:
        """The input position of the next step."""
        step = int(self.step.numpy())
        return step + self.skipped_before(step)

    def skips(self) -> list[tuple[int, int]]:
        """The skip schedule: (from step, batches) for every rollback so far, in the order they happened."""
        rows = self.skip_schedule.numpy()
        return [(int(start), int(batches)) for start, batches in rows[rows[:, 1] > 0]]

    def skipped_before(self, step: int) -> int:
        """Batches skipped by the time step `step` runs: step `s` reads batch `s + skipped_before(s)`."""
        return sum(batches for start, batches in self.skips() if start <= step)

    def set_skips(self, skips: list[tuple[int, int]]) -> None:
        """Replace the skip schedule and bring `skipped_batches` up to date for the current step."""
        if len(skips) > MAX_SKIPS:
            raise ValueError(f"more than {MAX_SKIPS} rollbacks in one run: the skip schedule is full")
        rows = [*skips, *[(0, 0)] * (MAX_SKIPS - len(skips))]
        self.skip_schedule.assign(tf.constant(rows, tf.int64))
        self.update_skipped_batches()

    def update_skipped_batches(self) -> None:
        """Set `skipped_batches` to the schedule's total at the current step (call where a skip begins)."""
        self.skipped_batches.assign(self.skipped_before(int(self.step.numpy())))

    def checkpoint_items(self) -> dict[str, object]:
        """The trackables a checkpoint saves: `step`, `model/<layer>/<weight>`, `optimizer/<slot>`.

        Variables are keyed by their Keras paths (model and optimizer names stripped), not by
        object-graph position, so checkpoint keys read like the model (`model/dense_0/kernel`)
        and mismatch reports name real layers.
        """
        return {"model": model_weights_tree(self.model), "optimizer": optimizer_variables_tree(self.optimizer),
                "step": self.step, "skipped_batches": self.skipped_batches, "rollbacks": self.rollbacks,
                "skip_schedule": self.skip_schedule}


def model_weights_tree(model: keras.Model) -> dict[str, object]:
    """Nested dict layer -> weight name -> variable, for every weight of the model."""
    return _tree(model.weights, drop_prefixes={model.name: ""})


def optimizer_variables_tree(optimizer: keras.optimizers.Optimizer) -> dict[str, object]:
    """Nested dict of the optimizer's own variables (iterations, slots, loss-scale state)."""
    prefixes = {optimizer.name: ""}
    inner = getattr(optimizer, "inner_optimizer", None)  # LossScaleOptimizer
    if inner is not None:
        prefixes[inner.name] = "inner/"
    return _tree(optimizer.variables, drop_prefixes=prefixes)


def _tree(variables: list, *, drop_prefixes: dict[str, str]) -> dict[str, object]:
    tree: dict[str, object] = {}
    for variable in variables:
        head, _, rest = variable.path.partition("/")
        path = drop_prefixes[head] + rest if rest and head in drop_prefixes else variable.path
        *parents, leaf = path.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})  # type: ignore[assignment]
        if leaf in node:
            raise ValueError(f"two variables share the checkpoint key {path!r}; give the layers unique names")
        node[leaf] = variable
    return tree


def create_train_state(model: keras.Model, optimizer: keras.optimizers.Optimizer) -> TrainState:
    """Build the optimizer's slots now so restoring never has to defer anything."""
    optimizer.build(model.trainable_variables)
    def counter(name: str) -> tf.Variable:
        return tf.Variable(0, dtype=tf.int64, trainable=False, name=name,
                           aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

    schedule = tf.Variable(tf.zeros([MAX_SKIPS, 2], tf.int64), trainable=False, name="skip_schedule",
                           aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    return TrainState(step=counter("global_step"), model=model, optimizer=optimizer,
                      seed_generators=tuple(_seed_generators(model)), skipped_batches=counter("skipped_batches"),
                      rollbacks=counter("rollbacks"), skip_schedule=schedule)


def reseed_random_layers(state: TrainState, *, seed: int, step: tf.Tensor) -> None:
    """Set every layer RNG to a state derived from (seed, step, replica): call at the top of a step.

    `tf.train.Checkpoint` does not save Keras 3 `SeedGenerator` state, so instead of saving it we
    make it a function of the step. Each replica gets its own stream, so dropout masks differ
    across replicas as they would across batches on one device.
    """
    context = tf.distribute.get_replica_context()
    replica = tf.cast(context.replica_id_in_sync_group, tf.int64) if context else tf.constant(0, tf.int64)
    num_replicas = context.num_replicas_in_sync if context else 1
    counter = tf.cast(step, tf.int64) * num_replicas + replica
    for index, generator in enumerate(state.seed_generators):
        key = tf.constant(seed * _LAYER_STREAM_STRIDE + index, tf.int64)
        generator.state.assign(tf.cast(tf.stack([key, counter]), generator.state.dtype))


def _seed_generators(model: keras.Model) -> list[keras.random.SeedGenerator]:
    generators: list[keras.random.SeedGenerator] = []
    for layer in nested_layers(model, include_self=True):
        for generator in layer_seed_generators(layer):
            if all(generator is not seen for seen in generators):
                generators.append(generator)
    return generators
