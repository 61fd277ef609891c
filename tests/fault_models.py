"""Models that fail on purpose, for fault-injection tests; `train.py` builds them by `_target_`.

    python train.py model=mlp model._target_=tests.fault_models.build_mlp_nan_on_marker data=npz ...

Each fails on examples whose first feature exceeds `MARKER`, the way a real run meets one bad
record: the failure is tied to a batch, so it happens at the same step however the run was
interrupted and resumed, and skipping that batch avoids it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import keras
import tensorflow as tf

from models.mlp import build_mlp

MARKER = 1000.0
STALL_SECONDS = 600.0  # far longer than any test waits: only the watchdog ends it


@keras.saving.register_keras_serializable(package="tests")
class FailOnMarker(keras.layers.Layer):
    """Passes logits through, except when the batch holds a marked example.

    mode "nan": the marked rows' logits become NaN (a numerically unstable op).
    mode "crash": the step raises InvalidArgumentError (a bug a record triggers).
    mode "stall": the step sleeps for `STALL_SECONDS` (a hang: a stuck filesystem, a deadlock).
    """

    def __init__(self, mode: str, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.mode = mode

    def call(self, inputs: list) -> object:
        features, logits = inputs
        marked = keras.ops.greater(features[:, :1], MARKER)
        if self.mode == "nan":
            return keras.ops.where(marked, keras.ops.full_like(logits, float("nan")), logits)
        if self.mode == "crash":
            check = tf.debugging.assert_less(features[:, 0], MARKER, message="a marked example reached the model")
            with tf.control_dependencies([check]):
                return tf.identity(logits)
        stalled = tf.cond(tf.reduce_any(marked), lambda: tf.ensure_shape(tf.py_function(_stall, [], tf.float32), []),
                          lambda: tf.constant(0.0))
        return logits + stalled

    def compute_output_shape(self, input_shapes: list) -> tuple:
        return input_shapes[1]

    def get_config(self) -> dict:
        return {**super().get_config(), "mode": self.mode}


def _stall() -> float:
    time.sleep(STALL_SECONDS)
    return 0.0


def _with_failure(mode: str, **mlp_arguments: object) -> keras.Model:
    mlp = build_mlp(**mlp_arguments)
    logits = FailOnMarker(mode, name=f"{mode}_on_marker")([mlp.input, mlp.output])
    return keras.Model(mlp.input, logits, name="mlp")


def build_mlp_nan_on_marker(*, input_shape: Sequence[int], num_outputs: int, hidden: Sequence[int] = (128, 128),
                            dropout: float = 0.0, activation: str = "relu", seed: int = 0) -> keras.Model:
    return _with_failure("nan", input_shape=input_shape, num_outputs=num_outputs, hidden=hidden, dropout=dropout,
                         activation=activation, seed=seed)


def build_mlp_crash_on_marker(*, input_shape: Sequence[int], num_outputs: int, hidden: Sequence[int] = (128, 128),
                              dropout: float = 0.0, activation: str = "relu", seed: int = 0) -> keras.Model:
    return _with_failure("crash", input_shape=input_shape, num_outputs=num_outputs, hidden=hidden, dropout=dropout,
                         activation=activation, seed=seed)


def build_mlp_stall_on_marker(*, input_shape: Sequence[int], num_outputs: int, hidden: Sequence[int] = (128, 128),
                              dropout: float = 0.0, activation: str = "relu", seed: int = 0) -> keras.Model:
    return _with_failure("stall", input_shape=input_shape, num_outputs=num_outputs, hidden=hidden, dropout=dropout,
                         activation=activation, seed=seed)
