"""Multi-layer perceptron: the default model."""

from __future__ import annotations

from collections.abc import Sequence

import keras


def build_mlp(
    *,
    input_shape: Sequence[int],
    num_outputs: int,
    hidden: Sequence[int] = (128, 128),
    dropout: float = 0.0,
    activation: str = "relu",
    seed: int = 0,
) -> keras.Model:
    """Dense layers of widths `hidden`, each followed by dropout if `dropout > 0`; returns logits."""
    inputs = keras.Input(shape=tuple(input_shape), name="features")
    x = keras.layers.Flatten()(inputs) if len(input_shape) > 1 else inputs
    for index, width in enumerate(hidden):
        x = keras.layers.Dense(width, activation=activation, name=f"dense_{index}")(x)
        if dropout > 0:
            x = keras.layers.Dropout(dropout, seed=seed + index, name=f"dropout_{index}")(x)
    logits = keras.layers.Dense(num_outputs, name="logits")(x)
    return keras.Model(inputs, logits, name="mlp")
