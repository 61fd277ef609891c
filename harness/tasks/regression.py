"""Regression: one or more float targets per example, predictions in the targets' own units."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import tensorflow as tf

from harness.data.in_memory_sources import ExampleArrays
from harness.errors import ConfigError, DataError
from harness.tasks.base import Task

LOSSES = ("mse", "mae", "huber")


class Regression(Task):
    """Mean squared / absolute / Huber loss; reports `rmse`, `mae` (target units) and `r2`.

    Targets (N,) or (N, k) numbers. With `standardize_targets` (default) the model learns targets
    scaled to mean 0 and standard deviation 1 on the training split (its first records, for data
    bigger than memory), as users expect of a regression; the scaling happens inside the loss, so
    the data stays as it is, and metrics, `serve` and `scripts/predict.py` are in the original
    units (the statistics are recorded in the model signature). R² is 1 - SSE/SST over the eval (or train)
    examples, computed from sums so it is exact for any number of replicas and workers.
    """

    name = "regression"
    sum_names = ("squared_error", "absolute_error", "values", "standardized_squared_error", "target_sum",
                 "target_squared_sum")
    metric_names = ("rmse", "mae", "r2")
    progress_metric = "rmse"

    def __init__(self, loss: str = "mse", huber_delta: float = 1.0, standardize_targets: bool = True) -> None:
        if loss not in LOSSES:
            raise ConfigError(f"Config key 'task.loss' = {loss!r} is invalid: expected one of {list(LOSSES)}.")
        if huber_delta <= 0:
            raise ConfigError(f"Config key 'task.huber_delta' = {huber_delta!r} is invalid: expected a positive "
                              "number (in standardised target units).")
        self.loss, self.huber_delta, self.standardize_targets = loss, huber_delta, standardize_targets
        self.target_shape: tuple[int, ...] = ()
        self.target_mean = np.zeros([1], np.float32)
        self.target_std = np.ones([1], np.float32)

    def prepare(self, examples: ExampleArrays) -> ExampleArrays:
        train = _float_targets(examples.train_targets, "train")
        evaluation = _float_targets(examples.eval_targets, "eval")
        if train.shape[1:] != evaluation.shape[1:]:
            raise DataError(f"Task 'regression': train targets have shape {train.shape[1:]} per example but eval "
                            f"targets {evaluation.shape[1:]}; expected the same.")
        self.target_shape = tuple(train.shape[1:])
        self.num_outputs = math.prod(self.target_shape)
        if self.standardize_targets:
            columns = train.reshape(len(train), -1)
            self.target_mean = columns.mean(axis=0).astype(np.float32)
            self.target_std = np.where(columns.std(axis=0) > 0, columns.std(axis=0), 1.0).astype(np.float32)
        else:
            self.target_mean = np.zeros([self.num_outputs], np.float32)
            self.target_std = np.ones([self.num_outputs], np.float32)
        return replace(examples, train_targets=train, eval_targets=evaluation, num_classes=None)

    def invalid_example(self, inputs: np.ndarray, targets: np.ndarray) -> tuple[int, str] | None:
        finite = np.isfinite(targets.reshape(len(targets), -1)).all(axis=1)
        if finite.all():
            return None
        position = int(np.flatnonzero(~finite)[0])
        return position, f"has target {targets[position]}; expected finite numbers (task 'regression')"

    def signature(self) -> dict[str, Any]:
        return {"num_outputs": int(self.num_outputs), "target_shape": list(self.target_shape),
                "target_mean": [float(v) for v in self.target_mean], "target_std": [float(v) for v in self.target_std]}

    def restore_signature(self, signature: Mapping[str, Any]) -> None:
        self.num_outputs = int(signature["num_outputs"])
        self.target_shape = tuple(int(d) for d in signature.get("target_shape", []))
        self.target_mean = np.asarray(signature["target_mean"], np.float32)
        self.target_std = np.asarray(signature["target_std"], np.float32)

    # -- training --------------------------------------------------------------------------------
    def _flat(self, targets: tf.Tensor, outputs: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Standardised targets and the outputs (which are in standardised units), both (batch, k)."""
        batch = tf.shape(outputs)[0]
        targets = (tf.reshape(tf.cast(targets, tf.float32), [batch, -1]) - self.target_mean) / self.target_std
        return targets, tf.reshape(outputs, [batch, -1])

    def example_losses(self, targets: tf.Tensor, outputs: tf.Tensor) -> tf.Tensor:
        targets, outputs = self._flat(targets, outputs)
        error = outputs - targets
        if self.loss == "mse":
            per_value = tf.square(error)
        elif self.loss == "mae":
            per_value = tf.abs(error)
        else:
            absolute = tf.abs(error)
            quadratic = tf.minimum(absolute, self.huber_delta)
            per_value = 0.5 * tf.square(quadratic) + self.huber_delta * (absolute - quadratic)
        return tf.reduce_mean(per_value, axis=1)

    def metric_sums(self, targets: tf.Tensor, outputs: tf.Tensor, weights: tf.Tensor) -> dict[str, tf.Tensor]:
        targets, outputs = self._flat(targets, outputs)
        standardized_error = outputs - targets
        error = standardized_error * self.target_std  # in target units
        weights = weights[:, None]
        return {"squared_error": tf.reduce_sum(weights * tf.square(error)),
                "absolute_error": tf.reduce_sum(weights * tf.abs(error)),
                "values": tf.reduce_sum(weights * tf.ones_like(targets)),
                # R² from standardised values: it is scale-free, and they keep float32 sums well-conditioned.
                "standardized_squared_error": tf.reduce_sum(weights * tf.square(standardized_error)),
                "target_sum": tf.reduce_sum(weights * targets),
                "target_squared_sum": tf.reduce_sum(weights * tf.square(targets))}

    def metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        values = max(sums["values"], 1.0)
        total = sums["target_squared_sum"] - sums["target_sum"] ** 2 / values
        return {"rmse": math.sqrt(sums["squared_error"] / values), "mae": sums["absolute_error"] / values,
                "r2": 1.0 - sums["standardized_squared_error"] / total if total > 0 else float("nan")}

    # -- inference ---------------------------------------------------------------------------------
    def serving_outputs(self, outputs: tf.Tensor) -> tf.Tensor:
        """Predictions in target units, shaped (batch, *target_shape)."""
        flat = tf.reshape(tf.cast(outputs, tf.float32), [tf.shape(outputs)[0], -1])
        predictions = flat * self.target_std + self.target_mean
        return tf.reshape(predictions, [-1, *self.target_shape])

    def prediction_lines(self, outputs: np.ndarray) -> list[str]:
        """`row,prediction` (or `prediction_0, ...` for several targets), in target units."""
        predictions = np.asarray(self.serving_outputs(tf.constant(outputs, tf.float32))).reshape(len(outputs), -1)
        width = predictions.shape[1]
        names = ["prediction"] if width == 1 else [f"prediction_{index}" for index in range(width)]
        return [",".join(["row", *names])] + [",".join([str(row), *(f"{v:.6g}" for v in values)])
                                              for row, values in enumerate(predictions)]


def _float_targets(targets: np.ndarray, split: str) -> np.ndarray:
    if targets.dtype.kind not in "biuf":
        raise DataError(f"Task 'regression': the {split} targets have dtype {targets.dtype}; expected numbers.")
    if targets.ndim < 1 or not len(targets):
        raise DataError(f"Task 'regression': the {split} targets have shape {targets.shape}; expected (N,) or "
                        "(N, k) numbers.")
    values = targets.astype(np.float32)
    if not np.isfinite(values).all():
        raise DataError(f"Task 'regression': the {split} targets contain NaN or infinite values.")
    return values
