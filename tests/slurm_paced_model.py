"""A test model whose steps take at least `STEP_SECONDS` while a file exists, so a run lasts long enough.

    PACE_FILE=/tmp/x/pace python train.py model._target_=tests.slurm_paced_model.build_paced_mlp ...

Slurm's time-limit warning arrives at slurmctld's next time-limit pass, up to 30 s after the job
entered the warning window: the tests of scripts/slurm_train.sbatch need runs that are still
training then, without burning CPU, and that finish quickly once the signal has done its work
(the test deletes the file). The pace is a sleep outside the numerics: the model computes exactly
what `models.mlp.build_mlp` computes, paced or not.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import keras
import tensorflow as tf

from models.mlp import build_mlp

STEP_SECONDS = 0.1
PACE_FILE_VARIABLE = "PACE_FILE"


@keras.saving.register_keras_serializable(package="tests")
class Pace(keras.layers.Layer):
    """Passes its input through, after sleeping `STEP_SECONDS` if the pace file exists (every forward pass)."""

    def call(self, logits: tf.Tensor) -> tf.Tensor:
        return logits + tf.ensure_shape(tf.py_function(_sleep, [], tf.float32), [])

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape


def _sleep() -> float:
    pace_file = os.environ.get(PACE_FILE_VARIABLE)
    if pace_file and os.path.exists(pace_file):
        time.sleep(STEP_SECONDS)
    return 0.0


def build_paced_mlp(*, input_shape: Sequence[int], num_outputs: int, hidden: Sequence[int] = (128, 128),
                    dropout: float = 0.0, activation: str = "relu", seed: int = 0) -> keras.Model:
    mlp = build_mlp(input_shape=input_shape, num_outputs=num_outputs, hidden=hidden, dropout=dropout,
                    activation=activation, seed=seed)
    return keras.Model(mlp.input, Pace(name="pace")(mlp.output), name="mlp")
