"""A user model with a custom layer (models/residual_mlp.py + conf/model/residual_mlp.yaml): train,
resume, load and export it through the same commands as the built-in models."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from harness.errors import ConfigError
from harness.results import inference
from harness.training import modeling
from harness.training.state import model_weights_tree
from models.residual_mlp import ResidualBlock
from tests.conftest import assert_ok, checkpoint_values, run_train

SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
RESIDUAL = ("model=residual_mlp", "model.width=32", "data.num_examples=2304", "data.eval_examples=256",
            "data.global_batch_size=64", "trainer.steps_per_loop=10", "trainer.log_every=10", "trainer.eval_every=20",
            "checkpoint.every_steps=20", "optimizer.learning_rate=0.01")


def _build(**fields) -> keras.Model:
    return modeling.build_model({"_target_": "models.residual_mlp.build_residual_mlp", **fields},
                                input_shape=(64,), num_outputs=10, seed=0)


def test_custom_layer_weights_are_named_in_checkpoints_and_configurable() -> None:
    model = _build(width=16, blocks=3)
    tree = model_weights_tree(model)
    assert sorted(tree) == ["block_0", "block_1", "block_2", "embed", "logits"]
    assert sorted(tree["block_2"]) == ["bias", "gate", "kernel"]
    np.testing.assert_array_equal(model.get_layer("block_1").gate.numpy(), np.full(16, 0.1, np.float32))
    block = model.get_layer("block_0")
    clone = ResidualBlock.from_config(block.get_config())
    assert (clone.gate_init, clone.name) == (0.1, "block_0")
    with pytest.raises(ConfigError, match=r"model\.depth' is not an argument of models\.residual_mlp"):
        _build(depth=3)


@pytest.mark.slow
def test_custom_model_trains_resumes_loads_and_exports(run_dir: Path) -> None:
    first = run_train(run_dir, *RESIDUAL, "trainer.max_steps=20", tiny=False)
    assert_ok(first)
    assert "model: residual_mlp" in first.stdout
    gate_20 = checkpoint_values(run_dir / "checkpoints" / "ckpt-20")["model/block_0/gate" + SUFFIX]
    assert gate_20.shape == (32,) and not np.allclose(gate_20, 0.1)  # the custom weight trains

    resumed = run_train(run_dir, *RESIDUAL, "trainer.max_steps=40", tiny=False)
    assert_ok(resumed)
    assert "at step 20" in resumed.stdout and "step 10/40" not in resumed.stdout
    final = checkpoint_values(run_dir / "checkpoints" / "ckpt-40")
    assert final["step" + SUFFIX] == 40 and final["optimizer/iteration" + SUFFIX] == 40

    loaded = inference.load(str(run_dir))
    assert loaded.step == 40
    np.testing.assert_array_equal(loaded.model.get_layer("block_1").gate.numpy(), final["model/block_1/gate" + SUFFIX])
    inputs = np.random.default_rng(5).standard_normal((9, 64)).astype(np.float32)
    expected = inference.predict_outputs(loaded.model, inputs)
    reloaded = keras.saving.load_model(run_dir / "export" / "model.keras")
    assert isinstance(reloaded.get_layer("block_0"), ResidualBlock)
    np.testing.assert_allclose(reloaded(inputs).numpy(), expected, rtol=1e-6, atol=1e-6)
    served = tf.saved_model.load(str(run_dir / "export" / "saved_model"))
    np.testing.assert_allclose(served.serve(tf.constant(inputs)).numpy(), expected, rtol=1e-6, atol=1e-6)
