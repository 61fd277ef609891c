"""MobileNetV2 from `keras.applications` (BatchNorm and all), untrained: a model nobody here wrote."""

from __future__ import annotations

from collections.abc import Sequence

import keras


def build_mobilenet_v2(*, input_shape: Sequence[int], num_outputs: int, image_shape: Sequence[int] = (8, 8, 1),
                       upsample: int = 4, alpha: float = 0.35) -> keras.Model:
    """Flat pixels -> `image_shape` images, upsampled (8x8 -> 32x32, MobileNetV2's minimum) -> logits."""
    inputs = keras.Input(shape=tuple(input_shape), name="features")
    images = keras.layers.UpSampling2D(upsample)(keras.layers.Reshape(tuple(image_shape))(inputs))
    network = keras.applications.MobileNetV2(input_shape=tuple(images.shape[1:]), alpha=alpha, weights=None,
                                             classes=num_outputs, classifier_activation=None)
    return keras.Model(inputs, network(images), name="mobilenet_v2")
