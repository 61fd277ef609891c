"""The `Task` contract and building a task from `task.*` config.

A task sees targets and model outputs as tensors and returns per-example losses and metric
*sums*. Sums (weighted by the example weights, 0 for eval padding) are what the harness
accumulates per replica and reduces across replicas and workers, so every metric is exact for any
replica and worker count; `metrics(sums)` turns the reduced sums into the reported values.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from harness.data.in_memory_sources import ExampleArrays
from harness.errors import ConfigError, error_summary


class Task:
    """Base class of every task. Override the losses and metrics; the rest has working defaults.

    Class attributes a subclass sets:
      `name`: shown in messages and recorded in the model signature.
      `sum_names`: the metric sums `metric_sums` returns (the harness adds `examples`, the summed
        example weights, and `loss`).
      `metric_names`: the metrics `metrics` returns, in display order; TensorBoard shows them as
        `train/<name>` and `eval/<name>`.
      `progress_metric`: the one shown on the progress line beside the loss (or None).
    """

    name: str = "task"
    sum_names: tuple[str, ...] = ()
    metric_names: tuple[str, ...] = ()
    progress_metric: str | None = None
    num_outputs: int = 1  # the width of the model's last output axis, passed to the model builder

    # -- data: called once with the loaded examples, before the model is built ---------------------
    def prepare(self, examples: ExampleArrays) -> ExampleArrays:
        """Check the targets (raise `DataError` naming the task) and learn what depends on the data
        (class count, target statistics); return the examples, converted where that is cheaper.

        Data bigger than memory is never loaded whole: then `examples` is a sample (the first
        records of each split), and batches reach the loss with their targets as the files hold
        them, so the losses and metrics take targets in that form. Return what was learned from
        `signature()`, so inference can rebuild the task without the data.
        """
        return examples

    def invalid_example(self, inputs: np.ndarray, targets: np.ndarray) -> tuple[int, str] | None:
        """For data read from files, batch by batch (`prepare` saw only a sample): the position in this batch
        of the first example `prepare` would have refused and what is wrong with it, as "has ...; expected
        ..."; None if every example is valid. Runs on the host for every batch: a few vectorized checks."""
        return None

    def expected_output_shape(self, examples: ExampleArrays) -> tuple[int, ...]:
        """The model's output shape per example for these examples (without the batch axis)."""
        return (self.num_outputs,)

    def signature(self) -> dict[str, Any]:
        """What `prepare` learned from the data, recorded in `model_signature.yaml` (YAML-safe values)."""
        return {"num_outputs": int(self.num_outputs)}

    def restore_signature(self, signature: Mapping[str, Any]) -> None:
        """The inverse of `signature()`: set what `prepare` would have learned (for inference)."""
        self.num_outputs = int(signature.get("num_outputs", self.num_outputs))

    # -- training and evaluation: pure TensorFlow, in replica context ------------------------------
    def example_losses(self, targets: tf.Tensor, outputs: tf.Tensor) -> tf.Tensor:
        """The loss of each example, shape (batch,), float32. The harness weights and sums them and
        divides by the *global* batch size."""
        raise NotImplementedError(f"{type(self).__name__} must define example_losses(targets, outputs)")

    def metric_sums(self, targets: tf.Tensor, outputs: tf.Tensor, weights: tf.Tensor) -> dict[str, tf.Tensor]:
        """Scalar float32 sums named by `sum_names`, each weighted by `weights` (batch,)."""
        return {}

    def metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        """Reported metrics from the reduced sums (`sums["examples"]` is the summed weights)."""
        return {}

    # -- inference and export ------------------------------------------------------------------------
    def serving_outputs(self, outputs: tf.Tensor) -> tf.Tensor:
        """What the exported SavedModel's `serve` endpoint returns for the model's outputs."""
        return outputs

    def prediction_lines(self, outputs: np.ndarray) -> list[str]:
        """CSV lines with a header for `scripts/predict.py`, one row per example."""
        flat = outputs.reshape(len(outputs), -1)
        header = ["row"] + [f"output_{index}" for index in range(flat.shape[1])]
        return [",".join(header)] + [",".join([str(row), *(f"{v:.6g}" for v in values)])
                                     for row, values in enumerate(flat)]


def build_task(task_config: Mapping[str, Any]) -> Task:
    """The task named by `task._target_` (a `Task` subclass), built with the other `task.*` keys."""
    target = task_config.get("_target_")
    if not target:
        raise ConfigError("Config key 'task._target_' is missing: expected a Task class such as "
                          "harness.tasks.classification.Classification (or pick one: task=classification).")
    module_name, _, attribute = str(target).rpartition(".")
    try:
        task_class = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(f"Config key 'task._target_' = {target!r} cannot be imported ({error}): expected "
                          "'module.Class', a Task subclass importable from the project directory.") from None
    if not (inspect.isclass(task_class) and issubclass(task_class, Task)):
        raise ConfigError(f"Config key 'task._target_' = {target!r} is not a subclass of harness.tasks.Task.")
    arguments = {key: value for key, value in task_config.items() if key != "_target_"}
    parameters = inspect.signature(task_class).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    unknown = sorted(key for key in arguments if key not in parameters and not accepts_any)
    if unknown:
        raise ConfigError(f"Config key 'task.{unknown[0]}' is not an argument of {target} "
                          f"(it takes {sorted(parameters)}).")
    return task_class(**arguments)


def check_model_fits(task: Task, model: Any, examples: ExampleArrays, *, model_name: str) -> None:
    """Refuse, before anything is written, a model whose outputs do not fit the task.

    Runs the model on two training examples (inference mode: no state changes) and compares the
    output shape with `task.expected_output_shape`.
    """
    expected = tuple(task.expected_output_shape(examples))
    inputs = examples.train_features[:2]
    shape_text = f"({', '.join(['batch', *map(str, examples.input_shape)])})"
    try:
        outputs = model(inputs, training=False)
    except Exception as error:  # a model that cannot even take these inputs: say which
        raise ConfigError(
            f"Task '{task.name}' cannot use model {model_name}: it fails on the data's inputs {shape_text} "
            f"{inputs.dtype} ({error_summary(error)}). Expected a model mapping those inputs to outputs "
            f"{_shape_text(expected)}; pick a model and data that fit (see README, 'Tasks').") from None
    actual = tuple(int(d) for d in outputs.shape[1:])
    if actual != expected:
        raise ConfigError(
            f"Task '{task.name}' expects model outputs of shape {_shape_text(expected)} for inputs {shape_text}, "
            f"but model {model_name} returns {_shape_text(actual)}. Pick a model and data that fit the task "
            "(a transformer needs token data such as data=text; regression needs one output per target value), "
            "or a model builder that takes num_outputs (see README, 'Tasks').")


def _shape_text(shape: tuple[int, ...]) -> str:
    return f"({', '.join(['batch', *map(str, shape)])})"
