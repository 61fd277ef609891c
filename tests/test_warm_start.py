"""Warm start: `init_from` restores model weights only into a new run; its own checkpoints win later."""

from __future__ import annotations

import shutil
from pathlib import Path

import keras
import numpy as np
import pytest

from harness.errors import CheckpointError
from harness.results.warm_start import init_model_weights
from tests.conftest import assert_ok, checkpoint_values, run_train

SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"


@pytest.fixture(scope="module")
def source_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("warm") / "source"
    assert_ok(run_train(run_dir, "optimizer.learning_rate=0.01", "export.enabled=false"))
    assert not (run_dir / "export").exists()  # export.enabled=false is honoured
    return run_dir


@pytest.mark.slow
def test_warm_start_restores_model_weights_only_and_resume_beats_it(source_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "fine_tune"
    # A new 5-class head; a learning rate so small that the weights stay where the warm start put them.
    overrides = (f"init_from={source_run}", "init_from_skip=[model/logits/*]", "data.num_classes=5",
                 "optimizer.learning_rate=1e-9", "export.enabled=false")
    first = run_train(run_dir, *overrides, "trainer.max_steps=20")
    assert_ok(first)
    assert (f"warm start from checkpoint {source_run}/checkpoints/ckpt-60: restored 2 of 4 model variables "
            "(optimizer fresh, step 0)") in first.stdout
    assert "left initialised (2, init_from_skip): model/logits/kernel, model/logits/bias" in first.stdout

    source = checkpoint_values(source_run / "checkpoints" / "ckpt-60")
    tuned = checkpoint_values(run_dir / "checkpoints" / "ckpt-20")
    assert tuned["step" + SUFFIX] == 20
    assert tuned["optimizer/iteration" + SUFFIX] == 20  # a fresh optimizer, not the source's 60 steps
    for name in ("model/dense_0/kernel", "model/dense_0/bias"):
        np.testing.assert_allclose(tuned[name + SUFFIX], source[name + SUFFIX], atol=1e-6, err_msg=name)
    assert tuned["model/logits/kernel" + SUFFIX].shape == (32, 5)

    second = run_train(run_dir, *overrides, "trainer.max_steps=40")
    assert_ok(second)
    assert "ignored: the run resumed from its own checkpoint at step 20" in second.stdout
    assert "warm start from" not in second.stdout
    resumed = checkpoint_values(run_dir / "checkpoints" / "ckpt-40")
    assert resumed["optimizer/iteration" + SUFFIX] == 40


@pytest.mark.slow
def test_a_source_that_does_not_fit_stops_the_run_before_it_writes(source_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "wider"
    result = run_train(run_dir, f"init_from={source_run}", "model.hidden=[48]")
    assert_ok(result, code=2)
    assert result.stderr.count("error: init_from") == 1
    assert "model/dense_0/kernel [64, 48] vs 'model/dense_0/kernel' [64, 32]" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (run_dir / "checkpoints").exists()


def test_a_name_map_renames_layers_of_a_harness_checkpoint(source_run: Path) -> None:
    inputs = keras.Input((64,))
    hidden = keras.layers.Dense(32, activation="relu", name="encoder")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(10, name="classifier")(hidden), name="renamed")
    report = init_model_weights(model, str(source_run / "checkpoints" / "ckpt-40"),
                                name_map={"model/encoder": "model/dense_0", "model/classifier": "model/logits"})
    assert ("model/classifier/kernel", "model/logits/kernel") in report.restored
    source = checkpoint_values(source_run / "checkpoints" / "ckpt-40")
    np.testing.assert_array_equal(model.get_layer("classifier").kernel.numpy(), source["model/logits/kernel" + SUFFIX])
    np.testing.assert_array_equal(model.get_layer("encoder").bias.numpy(), source["model/dense_0/bias" + SUFFIX])
    assert not report.unused  # only model values count; optimizer slots are never candidates


def test_a_run_directory_source_skips_a_damaged_newest_checkpoint(source_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(source_run, copy)
    (copy / "checkpoints" / "ckpt-60.data-00000-of-00001").write_bytes(b"")
    from models.mlp import build_mlp

    model = build_mlp(input_shape=(64,), num_outputs=10, hidden=[32])
    report = init_model_weights(model, str(copy))
    assert report.source == str(copy / "checkpoints" / "ckpt-40")
    wrong = build_mlp(input_shape=(64,), num_outputs=10, hidden=[32, 32])
    with pytest.raises(CheckpointError, match=r"not in the source \(2\): model/dense_1/kernel"):
        init_model_weights(wrong, str(copy))
    with pytest.raises(CheckpointError, match=r"ckpt-60' is not intact"):  # named explicitly: no fallback
        init_model_weights(model, str(copy / "checkpoints" / "ckpt-60"))
