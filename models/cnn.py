"""Small convolutional network for image-like inputs given as flat feature vectors."""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras

from harness.errors import ConfigError


def build_cnn(
    *,
    input_shape: Sequence[int],
    num_outputs: int,
    image_shape: Sequence[int] = (8, 8, 1),
    filters: Sequence[int] = (16, 32),
    dense: int = 64,
    dropout: float = 0.0,
    activation: str = "relu",
    seed: int = 0,
) -> keras.Model:
    """Conv(3x3) + max-pool blocks, one per entry of `filters`, then a dense layer; returns logits."""
    if math.prod(input_shape) != math.prod(image_shape):
        raise ConfigError(
            f"Config key 'model.image_shape' = {list(image_shape)} holds {math.prod(image_shape)} values "
            f"but each example has {math.prod(input_shape)} features (shape {list(input_shape)}): "
            "expected a shape whose product equals the number of features."
        )
    inputs = keras.Input(shape=tuple(input_shape), name="features")
    x = keras.layers.Reshape(tuple(image_shape))(inputs)
    for index, width in enumerate(filters):
        x = keras.layers.Conv2D(width, 3, padding="same", activation=activation, name=f"conv_{index}")(x)
        if min(x.shape[1], x.shape[2]) >= 2:
            x = keras.layers.MaxPooling2D(2, name=f"pool_{index}")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(dense, activation=activation, name="dense")(x)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, seed=seed, name="dropout")(x)
    logits = keras.layers.Dense(num_outputs, name="logits")(x)
    return keras.Model(inputs, logits, name="cnn")
