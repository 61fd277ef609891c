"""Restoring a trained run for inference (`load`), exporting it, and the export / predict scripts.

One TINY run of train.py (which exports at its end) is shared by the module; damaged copies of
it are made per test.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml

import harness
from harness.errors import CheckpointError, DataError, HarnessError
from harness.results import inference
from tests.conftest import PROJECT_ROOT, assert_ok, checkpoint_values, run_train, subprocess_env

SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("inference") / "run"
    assert_ok(run_train(run_dir, "optimizer.learning_rate=0.01", "export.enabled=true"))
    return run_dir


@pytest.fixture(scope="module")
def inputs() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((37, 64)).astype(np.float32)


def _model_values(prefix: Path) -> dict[str, np.ndarray]:
    return {name[: -len(SUFFIX)]: value for name, value in checkpoint_values(prefix).items()
            if name.startswith("model/")}


def _assert_weights_equal(model: keras.Model, values: dict[str, np.ndarray]) -> None:
    weights = {f"model/{w.path}": w.numpy() for w in model.weights}
    assert weights.keys() == values.keys()
    for name, value in values.items():
        np.testing.assert_array_equal(weights[name], value, err_msg=name)


@pytest.mark.slow
def test_load_restores_the_newest_or_a_chosen_checkpoint(trained_run: Path) -> None:
    checkpoints = trained_run / "checkpoints"
    newest = inference.load(str(trained_run))
    assert (newest.step, newest.checkpoint) == (60, str(checkpoints / "ckpt-60"))
    assert (newest.input_shape, newest.num_outputs, newest.input_dtype) == ((64,), 10, "float32")
    assert newest.config["model"]["hidden"] == [32]
    _assert_weights_equal(newest.model, _model_values(checkpoints / "ckpt-60"))
    assert harness.load(str(trained_run)).checkpoint == newest.checkpoint  # the package-level shortcut

    by_step = inference.load(str(trained_run), 20)
    by_prefix = inference.load(str(trained_run), str(checkpoints / "ckpt-20"))
    assert by_step.step == by_prefix.step == 20
    _assert_weights_equal(by_step.model, _model_values(checkpoints / "ckpt-20"))
    _assert_weights_equal(by_prefix.model, _model_values(checkpoints / "ckpt-20"))
    with pytest.raises(CheckpointError, match=r"No checkpoint at step 30 .* holds steps \[60, 40, 20\]"):
        inference.load(str(trained_run), 30)


@pytest.mark.slow
def test_load_falls_back_from_a_damaged_newest_checkpoint(trained_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "copy"
    shutil.copytree(trained_run, run_dir)  # moved: the recorded checkpoint.dir is rebased onto the copy
    data = run_dir / "checkpoints" / "ckpt-60.data-00000-of-00001"
    content = bytearray(data.read_bytes())
    content[len(content) // 3] ^= 0x55
    data.write_bytes(bytes(content))

    loaded = inference.load(str(run_dir))
    assert loaded.checkpoint == str(run_dir / "checkpoints" / "ckpt-40")
    _assert_weights_equal(loaded.model, _model_values(trained_run / "checkpoints" / "ckpt-40"))
    with pytest.raises(CheckpointError, match=r"ckpt-60' is not intact"):
        inference.load(str(run_dir), 60)  # chosen explicitly: no silent fallback


@pytest.mark.slow
def test_load_explains_what_is_missing_or_does_not_fit(trained_run: Path, tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match=r"Run directory '.*nowhere' does not exist"):
        inference.load(str(tmp_path / "nowhere"))
    with pytest.raises(HarnessError, match=r"has no config.yaml"):
        inference.load(str(trained_run / "checkpoints"))

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for record in ("config.yaml", "model_signature.yaml"):
        shutil.copy(trained_run / record, fresh / record)
    with pytest.raises(CheckpointError, match=r"has no checkpoints in .*fresh/checkpoints"):
        inference.load(str(fresh))

    edited = tmp_path / "edited"
    shutil.copytree(trained_run, edited)
    record = yaml.safe_load((edited / "config.yaml").read_text())
    record["model"]["hidden"] = [32, 16]
    (edited / "config.yaml").write_text(yaml.safe_dump(record))
    with pytest.raises(CheckpointError) as raised:
        inference.load(str(edited))
    message = str(raised.value)
    assert "does not fit the model" in message
    assert "model/logits/kernel: checkpoint [32, 10] float32 vs model [16, 10] float32" in message
    assert "only in the model, 2: model/dense_1/bias [16], model/dense_1/kernel [32, 16]" in message


@pytest.mark.slow
def test_training_exports_models_that_reload_with_the_same_outputs(trained_run: Path, inputs: np.ndarray) -> None:
    expected = inference.predict_outputs(inference.load(str(trained_run)).model, inputs)
    reloaded = keras.saving.load_model(trained_run / "export" / "model.keras")
    np.testing.assert_allclose(reloaded(inputs).numpy(), expected, rtol=1e-6, atol=1e-6)
    served = tf.saved_model.load(str(trained_run / "export" / "saved_model"))
    np.testing.assert_allclose(served.serve(tf.constant(inputs)).numpy(), expected, rtol=1e-6, atol=1e-6)
    assert not list((trained_run / "export").glob("*tmp*"))


@pytest.mark.slow
def test_a_finished_run_exports_again_when_its_export_is_missing(trained_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "copy"
    shutil.copytree(trained_run, run_dir)
    shutil.rmtree(run_dir / "export")  # say the first attempt was killed while exporting
    again = run_train(run_dir, "optimizer.learning_rate=0.01", "export.enabled=true")
    assert_ok(again)
    assert "training already complete" in again.stdout
    assert (run_dir / "export" / "model.keras").is_file() and (run_dir / "export" / "saved_model").is_dir()


def _script(name: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts" / name), *arguments], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120, env=subprocess_env())


def test_an_unwritable_export_dir_is_refused_before_training_and_by_the_script(trained_run: Path,
                                                                             tmp_path: Path) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    run_dir = tmp_path / "run"
    refused = run_train(run_dir, "export.enabled=true", f"export.dir={a_file}/export")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert f"export.dir '{a_file}/export' cannot be created or written: '{a_file}' is not a directory" \
        in refused.stderr
    assert "Traceback" not in refused.stderr and not (run_dir / "checkpoints").exists()

    scripted = _script("export.py", str(trained_run), "--output", str(a_file))
    assert scripted.returncode == 2, scripted.stderr[-3000:]
    assert f"Exporting mlp to '{a_file}' failed" in scripted.stderr and "Traceback" not in scripted.stderr
    assert a_file.read_text() == "not a directory"


@pytest.mark.slow
def test_export_script_exports_a_chosen_checkpoint(trained_run: Path, inputs: np.ndarray, tmp_path: Path) -> None:
    result = _script("export.py", str(trained_run), "--checkpoint", "20", "--output", str(tmp_path / "served"))
    assert_ok(result)
    assert "ckpt-20 (step 20)" in result.stdout
    expected = inference.predict_outputs(inference.load(str(trained_run), 20).model, inputs)
    served = tf.saved_model.load(str(tmp_path / "served" / "saved_model"))
    np.testing.assert_allclose(served.serve(tf.constant(inputs)).numpy(), expected, rtol=1e-6, atol=1e-6)
    reloaded = keras.saving.load_model(tmp_path / "served" / "model.keras")
    np.testing.assert_allclose(reloaded(inputs).numpy(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_predict_script_on_csv_inputs(trained_run: Path, inputs: np.ndarray, tmp_path: Path) -> None:
    csv = tmp_path / "inputs.csv"
    header = ",".join(f"f{i}" for i in range(64))
    np.savetxt(csv, inputs, delimiter=",", header=header, comments="")
    result = _script("predict.py", str(trained_run), str(csv), "--logits", str(tmp_path / "logits.npy"))
    assert_ok(result)
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "row,predicted_class,probability"
    logits = inference.predict_outputs(inference.load(str(trained_run)).model, inputs)
    assert [int(line.split(",")[1]) for line in lines[1:]] == logits.argmax(axis=1).tolist()
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), logits, rtol=1e-5, atol=1e-5)

    bad = tmp_path / "bad.npy"
    np.save(bad, inputs[:, :63])
    refused = _script("predict.py", str(trained_run), str(bad))
    assert_ok(refused, code=2)
    assert "error: Input file" in refused.stderr and "(37, 63)" in refused.stderr and "(N, 64)" in refused.stderr


def test_read_inputs_accepts_npy_npz_csv_and_reshapes_flat_rows(tmp_path: Path) -> None:
    images = np.arange(2 * 64, dtype=np.float32).reshape(2, 8, 8, 1)
    np.save(tmp_path / "flat.npy", images.reshape(2, 64))
    np.savez(tmp_path / "named.npz", features=images, labels=np.zeros(2))
    np.savetxt(tmp_path / "rows.csv", images.reshape(2, 64), delimiter=",")
    for name in ("flat.npy", "named.npz", "rows.csv"):
        np.testing.assert_array_equal(inference.read_inputs(str(tmp_path / name), (8, 8, 1)), images, err_msg=name)
    np.testing.assert_array_equal(inference.read_inputs(str(tmp_path / "flat.npy"), (64,))[1], images[1].ravel())

    np.savez(tmp_path / "two.npz", a=images, b=images)
    (tmp_path / "text.csv").write_text("a,b\nc,d\n")
    (tmp_path / "typo.csv").write_text("1,x\n3,4\n5,6\n")  # no header: a bad first row is an error, not dropped
    (tmp_path / "ragged.csv").write_text("1,2\n3\n")
    for name, message in (("two.npz", "holds arrays \\['a', 'b'\\]"), ("text.csv", "cannot be read"),
                          ("typo.csv", "data line 1 is not comma-separated numbers: '1,x'"),
                          ("ragged.csv", "same number of values"), ("missing.npy", "does not exist")):
        with pytest.raises(DataError, match=message):
            inference.read_inputs(str(tmp_path / name), (64,))
