"""Importing weights from files other tools wrote: TF1 `Saver` checkpoints and Keras weight files.

Every source file is written here by TensorFlow / Keras themselves; the import is checked by
comparing the model's outputs with a forward pass computed from the source values in numpy.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from harness.errors import CheckpointError, ConfigError
from harness.results.warm_start import init_model_weights
from models.mlp import build_mlp

INPUT_DIM, HIDDEN, CLASSES = 12, 8, 3


def _mlp() -> keras.Model:
    return build_mlp(input_shape=(INPUT_DIM,), num_outputs=CLASSES, hidden=[HIDDEN])


def _forward(x: np.ndarray, w1, b1, w2, b2) -> np.ndarray:
    return np.maximum(x @ w1 + b1, 0.0) @ w2 + b2


def _inputs() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((5, INPUT_DIM)).astype(np.float32)


def _write_tf1_checkpoint(directory: Path) -> tuple[str, dict[str, np.ndarray]]:
    """A TF1 graph-mode model saved by tf.compat.v1.train.Saver, with optimizer slots and a global step."""
    rng = np.random.default_rng(0)
    values = {"hidden/kernel": rng.standard_normal((INPUT_DIM, HIDDEN)).astype(np.float32),
              "hidden/bias": rng.standard_normal(HIDDEN).astype(np.float32),
              "output/weights": rng.standard_normal((HIDDEN, CLASSES)).astype(np.float32),
              "output/biases": rng.standard_normal(CLASSES).astype(np.float32)}
    with tf.Graph().as_default():
        for name, value in values.items():
            tf.compat.v1.get_variable(name, initializer=value)
            tf.compat.v1.get_variable(f"{name}/Adam", initializer=np.zeros_like(value))  # an optimizer slot
        tf.compat.v1.train.get_or_create_global_step()
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            prefix = saver.save(session, str(directory / "model.ckpt"), global_step=1234)
    return prefix, values


TF1_NAME_MAP = {"model/dense_0": "hidden",  # a whole layer: kernel and bias keep their names
                "model/logits/kernel": "output/weights", "model/logits/bias": "output/biases"}


def test_tf1_saver_checkpoint_imports_with_a_name_map(tmp_path: Path) -> None:
    prefix, values = _write_tf1_checkpoint(tmp_path)
    assert not tf.compat.v1.train.NewCheckpointReader(prefix).has_tensor("_CHECKPOINTABLE_OBJECT_GRAPH")
    model = _mlp()

    report = init_model_weights(model, prefix, name_map=TF1_NAME_MAP)

    assert report.kind == "TF1 name-based checkpoint"
    assert dict(report.restored) == {"model/dense_0/kernel": "hidden/kernel", "model/dense_0/bias": "hidden/bias",
                                     "model/logits/kernel": "output/weights", "model/logits/bias": "output/biases"}
    assert "global_step" in report.unused and "hidden/kernel/Adam" in report.unused
    x = _inputs()
    expected = _forward(x, values["hidden/kernel"], values["hidden/bias"], values["output/weights"],
                        values["output/biases"])
    np.testing.assert_allclose(model(x).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_tf1_checkpoint_directory_resolves_to_its_latest_checkpoint(tmp_path: Path) -> None:
    prefix, values = _write_tf1_checkpoint(tmp_path)
    model = _mlp()
    report = init_model_weights(model, str(tmp_path), name_map=TF1_NAME_MAP)
    assert report.source == prefix
    np.testing.assert_array_equal(model.get_layer("dense_0").kernel.numpy(), values["hidden/kernel"])


def test_tf1_checkpoint_without_a_map_fails_before_assigning_anything(tmp_path: Path) -> None:
    prefix, _ = _write_tf1_checkpoint(tmp_path)
    model = _mlp()
    before = [w.numpy().copy() for w in model.weights]
    # dense_0 maps fine, the head does not: nothing may be assigned, not even dense_0.
    with pytest.raises(CheckpointError) as raised:
        init_model_weights(model, prefix, name_map={"model/dense_0": "hidden"})
    message = str(raised.value)
    assert "model/logits/kernel (looked up as 'logits/kernel')" in message
    assert "output/weights" in message  # the unused names in the source help writing the map
    assert "Nothing was assigned" in message
    for old, weight in zip(before, model.weights):
        np.testing.assert_array_equal(old, weight.numpy())


def test_skip_leaves_variables_initialised(tmp_path: Path) -> None:
    prefix, values = _write_tf1_checkpoint(tmp_path)
    model = _mlp()
    head_before = model.get_layer("logits").kernel.numpy().copy()
    report = init_model_weights(model, prefix, skip=["model/logits/*"], name_map={"model/dense_0": "hidden"})
    assert report.left_initialised == ["model/logits/kernel", "model/logits/bias"]
    np.testing.assert_array_equal(model.get_layer("logits").kernel.numpy(), head_before)
    np.testing.assert_array_equal(model.get_layer("dense_0").bias.numpy(), values["hidden/bias"])


def test_skip_patterns_and_map_entries_that_match_nothing_are_refused(tmp_path: Path) -> None:
    prefix, _ = _write_tf1_checkpoint(tmp_path)
    with pytest.raises(ConfigError, match=r"init_from_skip.*'model/head/\*'"):
        init_model_weights(_mlp(), prefix, skip=["model/head/*"], name_map=TF1_NAME_MAP)
    with pytest.raises(ConfigError, match=r"init_from_name_map.*'model/dense_9'"):
        init_model_weights(_mlp(), prefix, name_map={**TF1_NAME_MAP, "model/dense_9": "x"})


def test_keras_weights_h5_from_differently_named_layers(tmp_path: Path) -> None:
    other = keras.Sequential([keras.Input((INPUT_DIM,)), keras.layers.Dense(HIDDEN, activation="relu", name="hidden"),
                              keras.layers.Dense(CLASSES, name="head")])
    path = tmp_path / "other.weights.h5"
    other.save_weights(path)
    model = _mlp()

    with pytest.raises(CheckpointError, match=r"model/dense_0/kernel \(looked up as 'dense_0/0'\)"):
        init_model_weights(model, str(path))
    report = init_model_weights(model, str(path), name_map={"model/dense_0": "hidden", "model/logits": "head"})

    assert dict(report.restored)["model/logits/bias"] == "head/1"
    x = _inputs()
    np.testing.assert_allclose(model(x).numpy(), other(x).numpy(), rtol=1e-6, atol=1e-6)


def test_keras_weights_from_the_same_architecture_need_no_map(tmp_path: Path) -> None:
    trained = _mlp()
    for weight in trained.weights:
        weight.assign(np.random.default_rng(3).standard_normal(weight.shape).astype(np.float32))
    trained.save_weights(tmp_path / "mlp.weights.h5")
    trained.save(tmp_path / "mlp.keras")
    x = _inputs()
    for name in ("mlp.weights.h5", "mlp.keras"):
        model = _mlp()
        report = init_model_weights(model, str(tmp_path / name))
        assert len(report.restored) == 4 and not report.unused
        np.testing.assert_allclose(model(x).numpy(), trained(x).numpy(), rtol=1e-6, atol=1e-6)


def test_keras_weights_with_other_shapes_are_refused(tmp_path: Path) -> None:
    wider = build_mlp(input_shape=(INPUT_DIM,), num_outputs=CLASSES, hidden=[HIDDEN * 2])
    wider.save_weights(tmp_path / "wider.weights.h5")
    with pytest.raises(CheckpointError, match=r"different shapes .*model/dense_0/kernel \[12, 8\] vs 'dense_0/0' "
                                              r"\[12, 16\]"):
        init_model_weights(_mlp(), str(tmp_path / "wider.weights.h5"))


def test_unreadable_sources_name_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"init_from.*does not exist"):
        init_model_weights(_mlp(), str(tmp_path / "nothing-here"))
    (tmp_path / "broken.weights.h5").write_bytes(b"not an hdf5 file")
    with pytest.raises(CheckpointError, match=r"not a readable Keras weights file"):
        init_model_weights(_mlp(), str(tmp_path / "broken.weights.h5"))
