"""Residual MLP with a custom layer: the worked example of adding a model (see README.md, 'Working with checkpoints').

Adding a model takes this file and `conf/model/residual_mlp.yaml` (whose `_target_` names
`build_residual_mlp`); nothing in harness/ changes. Use it with `python train.py model=residual_mlp`.
Checkpoints name the custom layer's weights by layer and weight name (`model/block_0/kernel`), as
for built-in layers, because `add_weight` is given explicit names. Registering the layer with
`register_keras_serializable` lets an exported `model.keras` reload with `keras.saving.load_model`
in any process that has imported this module.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras


@keras.saving.register_keras_serializable(package="harness_models")
class ResidualBlock(keras.layers.Layer):
    """`x + gate * activation(x @ kernel + bias)`: a residual dense block with a learned per-feature gate.

    Input and output shapes are equal, `(batch, width)`. The gate starts at `gate_init`, so a deep
    stack starts close to the identity and trains stably.
    """

    def __init__(self, *, activation: str = "relu", gate_init: float = 0.1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.activation = keras.activations.get(activation)
        self.gate_init = gate_init

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        width = int(input_shape[-1])
        self.kernel = self.add_weight(name="kernel", shape=(width, width), initializer="glorot_uniform")
        self.bias = self.add_weight(name="bias", shape=(width,), initializer="zeros")
        self.gate = self.add_weight(name="gate", shape=(width,),
                                    initializer=keras.initializers.Constant(self.gate_init))

    def call(self, inputs):
        return inputs + self.gate * self.activation(keras.ops.matmul(inputs, self.kernel) + self.bias)

    def get_config(self) -> dict:
        return {**super().get_config(), "activation": keras.activations.serialize(self.activation),
                "gate_init": self.gate_init}


def build_residual_mlp(
    *,
    input_shape: Sequence[int],
    num_outputs: int,
    width: int = 64,
    blocks: int = 2,
    activation: str = "relu",
    gate_init: float = 0.1,
) -> keras.Model:
    """Dense projection to `width`, then `blocks` residual blocks, then the classifier; returns logits."""
    inputs = keras.Input(shape=tuple(input_shape), name="features")
    x = keras.layers.Flatten()(inputs) if len(input_shape) > 1 else inputs
    x = keras.layers.Dense(width, activation=activation, name="embed")(x)
    for index in range(blocks):
        x = ResidualBlock(activation=activation, gate_init=gate_init, name=f"block_{index}")(x)
    logits = keras.layers.Dense(num_outputs, name="logits")(x)
    return keras.Model(inputs, logits, name="residual_mlp")
