"""Causal language modelling: predict every next token of a window; sampling text from a model."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from harness.data.in_memory_sources import ExampleArrays
from harness.errors import DataError
from harness.tasks.base import Task


class LanguageModel(Task):
    """Next-token cross-entropy on logits (batch, seq_len, vocab); reports `perplexity` and `bits_per_byte`.

    Inputs are token ids (N, seq_len) and targets the same windows shifted by one. An example's
    loss is its mean per-token cross-entropy. `bits_per_byte` is the cross-entropy in bits divided
    by `bytes_per_token` (1 for byte-level text; set it for a tokenizer's average).
    """

    name = "language_model"
    sum_names = ("nll", "tokens")
    metric_names = ("perplexity", "bits_per_byte")
    progress_metric = "bits_per_byte"

    def __init__(self, vocab_size: int | None = None, bytes_per_token: float = 1.0) -> None:
        self.num_outputs = vocab_size or 0  # None: the data source's vocabulary (256 for bytes)
        self.bytes_per_token = bytes_per_token

    def prepare(self, examples: ExampleArrays) -> ExampleArrays:
        self.num_outputs = self.num_outputs or examples.num_classes or 0
        for split, inputs, targets in (("train", examples.train_features, examples.train_targets),
                                       ("eval", examples.eval_features, examples.eval_targets)):
            for what, tokens in (("inputs", inputs), ("targets", targets)):
                if tokens.dtype.kind not in "iu" or tokens.ndim != 2:
                    raise DataError(f"Task 'language_model': the {split} {what} are {tokens.dtype} of shape "
                                    f"{tokens.shape}; expected integer token ids (N, seq_len), e.g. data=text or "
                                    "data=tokens.")
                if tokens.min() < 0 or (self.num_outputs and tokens.max() >= self.num_outputs):
                    raise DataError(f"Task 'language_model': the {split} {what} hold token ids from {tokens.min()} "
                                    f"to {tokens.max()}; expected ids in [0, {self.num_outputs - 1}] (the vocabulary "
                                    "size; set task.vocab_size).")
        if not self.num_outputs:
            self.num_outputs = int(max(examples.train_targets.max(), examples.eval_targets.max())) + 1
        return replace(examples, train_features=examples.train_features.astype(np.int32),
                       train_targets=examples.train_targets.astype(np.int32),
                       eval_features=examples.eval_features.astype(np.int32),
                       eval_targets=examples.eval_targets.astype(np.int32), num_classes=self.num_outputs)

    def invalid_example(self, inputs: np.ndarray, targets: np.ndarray) -> tuple[int, str] | None:
        if min(inputs.min(), targets.min()) >= 0 and max(inputs.max(), targets.max()) < self.num_outputs:
            return None
        tokens = np.concatenate([inputs, targets], axis=1)
        invalid = (tokens < 0) | (tokens >= self.num_outputs)
        position = int(np.flatnonzero(invalid.any(axis=1))[0])
        return position, (f"has token id {tokens[position][invalid[position]][0]}; expected ids in "
                          f"[0, {self.num_outputs - 1}] (the vocabulary size of task 'language_model': set "
                          "task.vocab_size or data.vocab_size to the tokenizer's)")

    def expected_output_shape(self, examples: ExampleArrays) -> tuple[int, ...]:
        return (*examples.train_targets.shape[1:], self.num_outputs)

    def signature(self) -> dict[str, Any]:
        return {"num_outputs": int(self.num_outputs), "vocab_size": int(self.num_outputs)}

    def example_losses(self, targets: tf.Tensor, outputs: tf.Tensor) -> tf.Tensor:
        token_losses = keras.losses.sparse_categorical_crossentropy(targets, outputs, from_logits=True)
        return tf.reduce_mean(token_losses, axis=-1)

    def metric_sums(self, targets: tf.Tensor, outputs: tf.Tensor, weights: tf.Tensor) -> dict[str, tf.Tensor]:
        token_losses = keras.losses.sparse_categorical_crossentropy(targets, outputs, from_logits=True)
        tokens_per_example = tf.cast(tf.shape(targets)[-1], tf.float32)
        return {"nll": tf.reduce_sum(tf.reduce_sum(token_losses, axis=-1) * weights),
                "tokens": tf.reduce_sum(weights) * tokens_per_example}

    def metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        mean_nll = sums["nll"] / max(sums["tokens"], 1.0)
        return {"perplexity": math.exp(min(mean_nll, 700.0)),
                "bits_per_byte": mean_nll / math.log(2) / self.bytes_per_token}

    def prediction_lines(self, outputs: np.ndarray) -> list[str]:
        """`row,next_token,probability`: the most likely token after each input window."""
        last = outputs[:, -1, :]
        shifted = np.exp(last - last.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        tokens = probabilities.argmax(axis=1)
        return ["row,next_token,probability"] + [f"{row},{t},{probabilities[row, t]:.6f}"
                                                 for row, t in enumerate(tokens)]


def generate(model: keras.Model, prompt: list[int], *, length: int, context: int, temperature: float = 1.0,
             seed: int = 0) -> list[int]:
    """`length` tokens sampled after `prompt` (token ids), each conditioned on the last `context` tokens.

    `temperature` 0 takes the most likely token; higher values sample more freely. Deterministic
    for a given `seed`.
    """
    if not prompt:
        raise DataError("The prompt is empty: expected at least one token (one character) to continue.")
    rng = np.random.default_rng(seed)
    next_logits = tf.function(lambda window: model(window, training=False)[0, -1],  # one trace for every length
                              input_signature=[tf.TensorSpec([1, None], tf.int32)])
    tokens = list(prompt)
    for _ in range(length):
        logits = next_logits(tf.constant([tokens[-context:]], tf.int32)).numpy().astype(np.float64)
        if temperature <= 0:
            tokens.append(int(logits.argmax()))
            continue
        probabilities = np.exp((logits - logits.max()) / temperature)
        tokens.append(int(rng.choice(len(probabilities), p=probabilities / probabilities.sum())))
    return tokens[len(prompt):]
