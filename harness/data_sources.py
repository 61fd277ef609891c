"""Example sources: where the examples come from, as in-memory arrays with a fixed eval split.

Owns: loading or generating (features, labels) for the train and eval splits and checking them.
Every source returns `ExampleArrays`; the seekable pipeline in `harness/data.py` does the rest, so
a new source only has to produce arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from harness.config import DataConfig, SyntheticDataConfig
from harness.errors import DataError


@dataclass(frozen=True)
class ExampleArrays:
    """Examples of one data set: features float32 (N, *input_shape), labels int32 (N,)."""

    train_features: np.ndarray
    train_labels: np.ndarray
    eval_features: np.ndarray
    eval_labels: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_features.shape[1:])


def synthetic(config: SyntheticDataConfig) -> ExampleArrays:
    """Gaussian features labelled by a fixed random two-layer teacher network (learnable, no files).

    The data set depends only on `generator_seed` and the sizes, never on the run's seed, so the
    train/eval split is the same for every run.
    """
    for key, value, minimum in (("data.input_dim", config.input_dim, 1), ("data.num_classes", config.num_classes, 2),
                                ("data.eval_examples", config.eval_examples, 1)):
        if value < minimum:
            raise DataError(f"Config key '{key}' = {value} is invalid: expected at least {minimum}.")
    if config.num_examples <= config.eval_examples:
        raise DataError(
            f"Config key 'data.num_examples' = {config.num_examples} leaves no training examples after "
            f"data.eval_examples = {config.eval_examples}: expected num_examples > eval_examples."
        )
    if not 0.0 <= config.label_noise < 1.0:
        raise DataError(f"Config key 'data.label_noise' = {config.label_noise} is invalid: "
                        "expected a fraction in [0, 1).")
    rng = np.random.default_rng(config.generator_seed)
    features = rng.standard_normal((config.num_examples, config.input_dim), dtype=np.float32)
    hidden_width = 32
    w1 = rng.standard_normal((config.input_dim, hidden_width)) / np.sqrt(config.input_dim)
    w2 = rng.standard_normal((hidden_width, config.num_classes)) / np.sqrt(hidden_width)
    labels = np.argmax(np.tanh(features @ w1) @ w2, axis=1).astype(np.int32)
    noisy = rng.random(config.num_examples) < config.label_noise
    labels[noisy] = rng.integers(0, config.num_classes, size=int(noisy.sum()), dtype=np.int32)
    split = config.eval_examples
    return ExampleArrays(features[split:], labels[split:], features[:split], labels[:split], config.num_classes)


SOURCES: dict[str, Callable[..., ExampleArrays]] = {"synthetic": synthetic}


def load_examples(config: DataConfig) -> ExampleArrays:
    """The examples named by `data.name`, checked for shape and label range."""
    arrays = SOURCES[config.name](config)
    check_examples(arrays, source=config.name)
    return arrays


def check_examples(arrays: ExampleArrays, *, source: str) -> None:
    """Raise `DataError` if the arrays cannot be trained on."""
    for split, features, labels in (("train", arrays.train_features, arrays.train_labels),
                                    ("eval", arrays.eval_features, arrays.eval_labels)):
        if len(features) == 0:
            raise DataError(f"Data source '{source}' has no {split} examples.")
        if len(features) != len(labels):
            raise DataError(f"Data source '{source}': {split} split has {len(features)} feature rows but "
                            f"{len(labels)} labels; expected one label per example.")
        if labels.min() < 0 or labels.max() >= arrays.num_classes:
            raise DataError(f"Data source '{source}': {split} labels span [{labels.min()}, {labels.max()}] but "
                            f"num_classes is {arrays.num_classes}; expected labels in [0, {arrays.num_classes - 1}].")
        if not np.isfinite(features).all():
            raise DataError(f"Data source '{source}': {split} features contain NaN or infinite values.")
    if arrays.train_features.shape[1:] != arrays.eval_features.shape[1:]:
        raise DataError(f"Data source '{source}': train examples have shape {arrays.train_features.shape[1:]} but "
                        f"eval examples {arrays.eval_features.shape[1:]}; expected the same shape.")
