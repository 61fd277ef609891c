"""Softmax classification: one integer class id per example, logits out (the default task)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from harness.data.in_memory_sources import ExampleArrays
from harness.errors import DataError
from harness.tasks.base import Task


class Classification(Task):
    """Sparse categorical cross-entropy on logits; reports `accuracy`.

    Targets: class ids (N,) in [0, num_classes), integers (or floats that are whole numbers).
    The model returns logits (batch, num_classes); `serve` returns them as they are.
    """

    name = "classification"
    sum_names = ("correct",)
    metric_names = ("accuracy",)
    progress_metric = "accuracy"

    def __init__(self, num_classes: int | None = None) -> None:
        self.num_outputs = num_classes or 0  # None: the data source's class count, else largest id + 1

    def prepare(self, examples: ExampleArrays) -> ExampleArrays:
        declared = self.num_outputs or examples.num_classes
        train, evaluation = (_class_ids(targets, split) for targets, split in
                             ((examples.train_targets, "train"), (examples.eval_targets, "eval")))
        self.num_outputs = declared or int(max(train.max(), evaluation.max())) + 1
        for targets, split in ((train, "train"), (evaluation, "eval")):
            if targets.max() >= self.num_outputs:
                raise DataError(f"Task 'classification': {split} labels go up to {targets.max()} but there are "
                                f"{self.num_outputs} classes; expected class ids in [0, {self.num_outputs - 1}] "
                                "(set task.num_classes or data.num_classes to the real count).")
        if self.num_outputs < 2:
            raise DataError(f"Task 'classification': the data has {self.num_outputs} class; expected at least 2.")
        return replace(examples, train_targets=train, eval_targets=evaluation, num_classes=self.num_outputs)

    def invalid_example(self, inputs: np.ndarray, targets: np.ndarray) -> tuple[int, str] | None:
        ids = targets.reshape(len(targets), -1)[:, 0]  # one id per example: `prepare` checked the shape
        valid = (ids >= 0) & (ids < self.num_outputs)
        if ids.dtype.kind == "f":
            valid &= ids == np.round(ids)
        if valid.all():
            return None
        position = int(np.flatnonzero(~valid)[0])
        return position, (f"has label {ids[position]:g}; expected a class id in [0, {self.num_outputs - 1}] "
                          f"(task 'classification' has {self.num_outputs} classes: set task.num_classes or "
                          "data.num_classes to the real count)")

    def signature(self) -> dict[str, Any]:
        return {"num_outputs": int(self.num_outputs), "num_classes": int(self.num_outputs)}

    def restore_signature(self, signature: Mapping[str, Any]) -> None:
        self.num_outputs = int(signature.get("num_classes", signature.get("num_outputs", 0)))

    def example_losses(self, targets: tf.Tensor, outputs: tf.Tensor) -> tf.Tensor:
        return keras.losses.sparse_categorical_crossentropy(_ids(targets), outputs, from_logits=True)

    def metric_sums(self, targets: tf.Tensor, outputs: tf.Tensor, weights: tf.Tensor) -> dict[str, tf.Tensor]:
        hits = tf.equal(tf.argmax(outputs, axis=-1, output_type=tf.int32), _ids(targets))
        correct = tf.cast(hits, tf.float32)
        return {"correct": tf.reduce_sum(correct * weights)}

    def metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        return {"accuracy": sums["correct"] / max(sums["examples"], 1.0)}

    def prediction_lines(self, outputs: np.ndarray) -> list[str]:
        """`row,predicted_class,probability` (the softmax of the logits)."""
        shifted = np.exp(outputs - outputs.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        classes = probabilities.argmax(axis=1)
        return ["row,predicted_class,probability"] + [f"{row},{c},{probabilities[row, c]:.6f}"
                                                      for row, c in enumerate(classes)]


def _ids(targets: tf.Tensor) -> tf.Tensor:
    """int32 class ids (batch,) from targets as a file holds them: int or whole floats, (batch,) or (batch, 1)."""
    return tf.reshape(tf.cast(targets, tf.int32), [-1])


def _class_ids(targets: np.ndarray, split: str) -> np.ndarray:
    """int32 class ids, or a `DataError` saying why the targets are not class ids."""
    where = f"Task 'classification': the {split} targets"
    if targets.ndim == 2 and targets.shape[1] == 1:
        targets = targets[:, 0]
    if targets.ndim != 1:
        raise DataError(f"{where} have shape {targets.shape}; expected one class id per example, (N,) "
                        "(store one-hot labels as their argmax; for several float targets use task=regression; for "
                        "token windows, data=tokens or data=text, use task=language_model).")
    if targets.dtype.kind == "f" and not np.all(targets == np.round(targets)):
        example = targets[targets != np.round(targets)][0]
        raise DataError(f"{where} are floats that are not all whole numbers (e.g. {example}); expected integer "
                        "class ids. Float targets are a regression: use task=regression.")
    if targets.dtype.kind not in "biuf":
        raise DataError(f"{where} have dtype {targets.dtype}; expected integer class ids.")
    if len(targets) and targets.min() < 0:
        raise DataError(f"{where} include {targets.min()}; expected class ids 0, 1, 2, ...")
    return targets.astype(np.int32)
