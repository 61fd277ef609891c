"""The inner loop: `steps_per_loop` training steps in one `tf.function` call, pure TensorFlow.

Owns: the loss (the task's per-example losses, summed and divided by the *global* batch size so
that the all-reduced gradient equals the single-device gradient for any replica count), the
gradient step under `strategy.run`, metric accumulators (the task's metric sums, reduced across
replicas and workers on read) that the outer loop reads and resets, and the loss of every step of
the latest call (`StepLosses`, for divergence detection at the exact step). What the loss and
metrics are is the task's (`harness/tasks/`); no Python side effects happen here: logging,
checkpoints and signals belong to `harness/control/controller.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from harness.data.pipeline import Batch, SeekableInput
from harness.tasks import Task
from harness.training.state import TrainState, reseed_random_layers


class Accumulators:
    """Named per-replica sums (`loss`, `examples` and the task's metric sums) that reduce on read."""

    def __init__(self, strategy: tf.distribute.Strategy, names: tuple[str, ...]) -> None:
        with strategy.scope():
            self.sums = {name: tf.Variable(0.0, trainable=False, name=f"{name}_sum", dtype=tf.float32,
                                           synchronization=tf.VariableSynchronization.ON_READ,
                                           aggregation=tf.VariableAggregation.SUM)
                         for name in ("loss", "examples", *names)}

    def add(self, values: dict[str, tf.Tensor]) -> None:
        for name, value in values.items():
            self.sums[name].assign_add(tf.cast(value, tf.float32))

    def read_and_reset(self) -> dict[str, float]:
        values = {name: float(variable.numpy()) for name, variable in self.sums.items()}
        for variable in self.sums.values():
            variable.assign(0.0)
        return values


class StepLosses:
    """The global loss of each step of the latest train-loop call, without a collective per step.

    Each replica writes its share of step `i`'s loss (already divided by the global batch) at
    index `i`; reading sums the shares across replicas (and workers), giving the loss of the
    whole global batch. One read per inner loop.
    """

    def __init__(self, strategy: tf.distribute.Strategy, *, capacity: int) -> None:
        with strategy.scope():
            self.values = tf.Variable(tf.zeros([capacity]), trainable=False, name="step_losses",
                                      synchronization=tf.VariableSynchronization.ON_READ,
                                      aggregation=tf.VariableAggregation.SUM)

    def record(self, index: tf.Tensor, loss: tf.Tensor) -> None:
        """Replica context: this replica's share of the loss of the loop's step `index`."""
        self.values.assign(tf.tensor_scatter_nd_update(self.values, [[index]], [tf.cast(loss, tf.float32)]))

    def read(self, num_steps: int) -> list[float]:
        """The losses of the first `num_steps` steps of the latest call (a collective across workers)."""
        return [float(value) for value in self.values.numpy()[:num_steps]]


def _forward(task: Task, model: keras.Model, batch: Batch, *,
             training: bool) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
    """Weighted per-example losses (batch,) and the task's metric sums for one batch."""
    outputs = tf.cast(model(batch.features, training=training), tf.float32)  # float32 under mixed precision too
    losses = task.example_losses(batch.targets, outputs) * batch.weights
    return losses, task.metric_sums(batch.targets, outputs, batch.weights)


def make_train_loop(
    strategy: tf.distribute.Strategy,
    task: Task,
    state: TrainState,
    accumulators: Accumulators,
    step_losses: StepLosses,
    *,
    global_batch_size: int,
    seed: int,
    jit_compile: bool = False,
) -> Callable[[Any, tf.Tensor], None]:
    """Return `train_loop(iterator, num_steps)` running `num_steps` steps (a scalar int tensor)."""

    def replica_step(batch: Batch, index: tf.Tensor) -> None:
        reseed_random_layers(state, seed=seed, step=state.step)
        with tf.GradientTape() as tape:
            example_losses, metric_sums = _forward(task, state.model, batch, training=True)
            loss = tf.reduce_sum(example_losses) / global_batch_size
            if state.model.losses:  # regularisers: counted once across replicas
                loss += tf.nn.scale_regularization_loss(tf.add_n(state.model.losses))
            scaled_loss = state.optimizer.scale_loss(loss)  # loss scaling under mixed precision
        gradients = tape.gradient(scaled_loss, state.model.trainable_variables)
        state.optimizer.apply_gradients(zip(gradients, state.model.trainable_variables))
        state.step.assign_add(1)
        accumulators.add({"loss": loss, "examples": tf.reduce_sum(batch.weights), **metric_sums})
        step_losses.record(index, loss)

    # XLA compiles the step itself; the loop around it (iterator, tf.range) stays a plain tf.function.
    step_fn = tf.function(replica_step, jit_compile=True) if jit_compile else replica_step

    def train_loop(iterator: Any, num_steps: tf.Tensor) -> None:
        for index in tf.range(num_steps):
            strategy.run(step_fn, args=(next(iterator), index))

    return tf.function(train_loop)


def make_eval_loop(
    strategy: tf.distribute.Strategy,
    task: Task,
    state: TrainState,
    accumulators: Accumulators,
) -> Callable[[Any], None]:
    """Return `eval_loop(distributed_dataset)` accumulating the eval loss and metric sums."""

    def replica_step(batch: Batch) -> None:
        example_losses, metric_sums = _forward(task, state.model, batch, training=False)
        accumulators.add({"loss": tf.reduce_sum(example_losses), "examples": tf.reduce_sum(batch.weights),
                          **metric_sums})

    @tf.function
    def eval_loop(dataset: Any) -> None:
        for batch in dataset:
            strategy.run(replica_step, args=(batch,))

    return eval_loop


class TrainLoop:
    """The compiled train loop plus the metric sums it accumulates (read by the controller)."""

    def __init__(self, run: Callable[[Any, tf.Tensor], None], metrics: Accumulators, step_losses: StepLosses) -> None:
        self.run = run
        self.metrics = metrics
        self.step_losses = step_losses

    def __call__(self, iterator: Any, num_steps: tf.Tensor) -> None:
        self.run(iterator, num_steps)


class EvalLoop:
    """The compiled eval loop plus its metric sums."""

    def __init__(self, run: Callable[[Any], None], metrics: Accumulators) -> None:
        self.run = run
        self.metrics = metrics

    def __call__(self, dataset: Any) -> None:
        self.run(dataset)


def build_loops(strategy: tf.distribute.Strategy, task: Task, state: TrainState, pipeline: SeekableInput, *,
                seed: int, jit_compile: bool, steps_per_loop: int) -> tuple[TrainLoop, EvalLoop]:
    """The train and eval loops for a task, state and input pipeline, each with its own accumulators."""
    train_metrics, eval_metrics = Accumulators(strategy, task.sum_names), Accumulators(strategy, task.sum_names)
    step_losses = StepLosses(strategy, capacity=steps_per_loop)
    train = make_train_loop(strategy, task, state, train_metrics, step_losses,
                            global_batch_size=pipeline.global_batch_size, seed=seed, jit_compile=jit_compile)
    evaluate = make_eval_loop(strategy, task, state, eval_metrics)
    return TrainLoop(train, train_metrics, step_losses), EvalLoop(evaluate, eval_metrics)
