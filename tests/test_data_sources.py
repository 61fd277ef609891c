"""Real data: user files (npz, TFRecord) with schema checks, and the bundled data sets (digits,
diabetes, text).

Files are written here with numpy and TensorFlow; bad files must give one `DataError` naming the
file and what was expected. End-to-end runs train through train.py on each source.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from harness.config.schema import (
    DiabetesDataConfig,
    DigitsDataConfig,
    NpzDataConfig,
    TextDataConfig,
    TFRecordDataConfig,
)
from harness.data.in_memory_sources import load_examples
from harness.errors import DataError
from harness.tasks.classification import Classification
from harness.tasks.regression import Regression
from tests.conftest import assert_ok, event_scalars, run_train


def _arrays(count: int = 50, dim: int = 4, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.standard_normal((count, dim)).astype(np.float32), rng.integers(0, classes, count).astype(np.int64)


def _example(features, label, *, features_key: str = "features", labels_key: str = "labels") -> bytes:
    feature = {features_key: tf.train.Feature(float_list=tf.train.FloatList(value=list(features))),
               labels_key: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)]))}
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _write_records(path: Path, records: list[bytes]) -> Path:
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)
    return path


# ---------------------------------------------------------------------------------------------
# npz
# ---------------------------------------------------------------------------------------------
def test_npz_holds_out_a_fixed_eval_fraction(tmp_path: Path) -> None:
    features, labels = _arrays(50)
    np.savez(tmp_path / "train.npz", features=features, labels=labels)
    examples = load_examples(NpzDataConfig(path=str(tmp_path / "train.npz"), eval_fraction=0.2))
    assert (examples.train_features.shape, examples.eval_features.shape) == ((40, 4), (10, 4))
    assert examples.num_classes is None  # the classification task counts the classes
    assert Classification().prepare(examples).num_classes == int(labels.max()) + 1
    assert examples.train_features.dtype == np.float32 and examples.train_targets.dtype == np.int32
    together = np.concatenate([examples.train_features, examples.eval_features])
    assert sorted(map(tuple, together)) == sorted(map(tuple, features))  # a partition of the file
    again = load_examples(NpzDataConfig(path=str(tmp_path / "train.npz"), eval_fraction=0.2))
    np.testing.assert_array_equal(again.eval_features, examples.eval_features)
    other = load_examples(NpzDataConfig(path=str(tmp_path / "train.npz"), eval_fraction=0.2, split_seed=1))
    assert not np.array_equal(other.eval_features, examples.eval_features)


def test_npz_with_an_eval_file_custom_keys_and_lenient_labels(tmp_path: Path) -> None:
    features, labels = _arrays(30)
    np.savez(tmp_path / "train.npz", x=features.astype(np.int16), y=labels[:, None].astype(np.float32))
    np.savez_compressed(tmp_path / "eval.npz", x=features[:5], y=np.full((5, 1), 6.0))
    examples = load_examples(NpzDataConfig(path=str(tmp_path / "train.npz"), eval_path=str(tmp_path / "eval.npz"),
                                           features_key="x", labels_key="y"))
    assert len(examples.train_targets) == 30 and len(examples.eval_targets) == 5
    prepared = Classification().prepare(examples)  # whole-number float labels are class ids
    assert prepared.num_classes == 7  # the eval file's largest label counts too
    np.testing.assert_array_equal(prepared.train_targets, labels)


BAD_NPZ = {
    "missing": (None, "no such file"),
    "text": (b"features,labels\n1,2\n", "is not a .npz archive"),
    "single_array": ("npy", "holds a single array"),
    "wrong_key": ({"features": np.ones((4, 2)), "y": np.zeros(4)},
                  r"has no array 'labels'; it holds \['features', 'y'\]"),
    "lengths": ({"features": np.ones((4, 2)), "labels": np.zeros(3, int)}, "has 4 feature rows and 3 labels"),
    "flat_features": ({"features": np.ones(4), "labels": np.zeros(4, int)}, "features have shape \\(4,\\)"),
    "text_features": ({"features": np.array([["a"]] * 4), "labels": np.zeros(4, int)}, "features have dtype <U1"),
    "three_dim_labels": ({"features": np.ones((4, 2)), "labels": np.ones((4, 2, 2))}, r"labels have shape \(4, 2, 2\)"),
    "ids_past_int32": ({"features": np.ones((4, 2)), "labels": np.array([0, 2**40, 1, 2])},  # would wrap to 0
                       r"integer labels span \[0, 1099511627776\]; expected .* ids that fit in int32"),
}


@pytest.mark.parametrize("case", sorted(BAD_NPZ))
def test_bad_npz_files_give_one_clear_error(tmp_path: Path, case: str) -> None:
    content, message = BAD_NPZ[case]
    path = tmp_path / f"{case}.npz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "npy":
        with path.open("wb") as handle:
            np.save(handle, np.ones((4, 2)))
    elif content is not None:
        np.savez(path, **content)
    with pytest.raises(DataError, match=message) as raised:
        load_examples(NpzDataConfig(path=str(path), eval_fraction=0.5))
    assert str(path) in str(raised.value)


def test_truncated_npz_and_too_few_examples(tmp_path: Path) -> None:
    features, labels = _arrays(200, dim=50)
    np.savez(tmp_path / "big.npz", features=features, labels=labels)
    content = (tmp_path / "big.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(content[: len(content) // 2])
    with pytest.raises(DataError, match=r"cut.npz"):
        load_examples(NpzDataConfig(path=str(tmp_path / "cut.npz")))
    np.savez(tmp_path / "one.npz", features=features[:1], labels=labels[:1])
    with pytest.raises(DataError, match=r"holds 1 examples: too few to hold out"):
        load_examples(NpzDataConfig(path=str(tmp_path / "one.npz")))
    with pytest.raises(DataError, match=r"train labels go up to 2 but there are 2 classes"):
        Classification().prepare(load_examples(NpzDataConfig(path=str(tmp_path / "big.npz"), num_classes=2)))


CLASSIFICATION_REFUSES = {
    "fractional": (np.array([0, 0.5, 1, 1]), "floats that are not all whole numbers .* use task=regression"),
    "negative": (np.array([0, -1, 1, 1]), "targets include -1"),
    "one_hot": (np.eye(4), r"targets have shape \(2, 4\); expected one class id per example"),
}


@pytest.mark.parametrize("case", sorted(CLASSIFICATION_REFUSES))
def test_targets_that_are_not_class_ids_are_refused_by_the_classification_task(tmp_path: Path, case: str) -> None:
    labels, message = CLASSIFICATION_REFUSES[case]
    np.savez(tmp_path / "data.npz", features=np.ones((len(labels), 2)), labels=labels)
    examples = load_examples(NpzDataConfig(path=str(tmp_path / "data.npz"), eval_fraction=0.5))
    with pytest.raises(DataError, match=f"Task 'classification': .*{message}"):
        Classification().prepare(examples)


def test_regression_takes_float_targets_standardised_and_refuses_text_targets(tmp_path: Path) -> None:
    features, _ = _arrays(40)
    targets = np.stack([np.linspace(10, 50, 40), np.linspace(-1, 1, 40) ** 2], axis=1)
    np.savez(tmp_path / "data.npz", features=features, labels=targets)
    task = Regression()
    prepared = task.prepare(load_examples(NpzDataConfig(path=str(tmp_path / "data.npz"), eval_fraction=0.25)))
    assert prepared.train_targets.dtype == np.float32 and prepared.train_targets.shape == (30, 2)
    np.testing.assert_allclose(task.target_mean, prepared.train_targets.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(task.target_std, prepared.train_targets.std(axis=0), rtol=1e-6)
    assert task.num_outputs == 2 and task.signature()["target_shape"] == [2]
    standardized = (prepared.eval_targets - task.target_mean) / task.target_std  # what the model learns to output
    np.testing.assert_allclose(task.example_losses(tf.constant(prepared.eval_targets), tf.constant(standardized)), 0,
                               atol=1e-6)
    back = np.asarray(task.serving_outputs(tf.constant(standardized)))  # serving undoes the scaling
    np.testing.assert_allclose(back, prepared.eval_targets, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# TFRecord
# ---------------------------------------------------------------------------------------------
def test_tfrecord_shards_are_read_in_order_and_reshaped(tmp_path: Path) -> None:
    features, labels = _arrays(40, dim=6)
    _write_records(tmp_path / "part-0.tfrecord", [_example(f, y) for f, y in zip(features[:25], labels[:25])])
    _write_records(tmp_path / "part-1.tfrecord", [_example(f, y) for f, y in zip(features[25:], labels[25:])])
    _write_records(tmp_path / "eval.tfrecord", [_example(f, 4) for f in features[:3]])
    examples = load_examples(TFRecordDataConfig(path=str(tmp_path / "part-*.tfrecord"),
                                                eval_path=str(tmp_path / "eval.tfrecord"), feature_shape=[3, 2]))
    np.testing.assert_array_equal(examples.train_features, features.reshape(40, 3, 2))
    np.testing.assert_array_equal(examples.train_targets, labels)
    assert examples.input_shape == (3, 2) and Classification().prepare(examples).num_classes == 5


def test_tfrecord_int64_features(tmp_path: Path) -> None:
    feature = {"pixels": tf.train.Feature(int64_list=tf.train.Int64List(value=[1, 2, 3])),
               "digit": tf.train.Feature(int64_list=tf.train.Int64List(value=[1]))}
    record = tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()
    path = _write_records(tmp_path / "ints.tfrecord", [record] * 10)
    examples = load_examples(TFRecordDataConfig(path=str(path), features_key="pixels", labels_key="digit"))
    assert examples.train_features.dtype == np.float32
    np.testing.assert_array_equal(examples.eval_features, [[1.0, 2.0, 3.0]])


def _bytes_record() -> bytes:
    feature = {"features": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"png"])),
               "labels": tf.train.Feature(int64_list=tf.train.Int64List(value=[1]))}
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


BAD_TFRECORDS = {
    "bytes_feature": (lambda: [_bytes_record()], "feature 'features' holds bytes_list; expected float or int64"),
    "missing_label": (lambda: [_example([1.0], 0, labels_key="class")],
                      "has no feature 'labels'; it has \\['class', 'features'\\]"),
    "ragged": (lambda: [_example([1.0, 2.0], 0)] * 3 + [_example([1.0], 1)],
               "A record in .* differs from the first record \\('features': 2 float32, 'labels': 1 int64\\)"),
    "not_an_example": (lambda: [b"\xff\xfe garbage"], "is not a tf.train.Example"),
}


@pytest.mark.parametrize("case", sorted(BAD_TFRECORDS))
def test_bad_tfrecords_give_one_clear_error(tmp_path: Path, case: str) -> None:
    records, message = BAD_TFRECORDS[case]
    path = _write_records(tmp_path / f"{case}.tfrecord", records())
    with pytest.raises(DataError, match=message):
        load_examples(TFRecordDataConfig(path=str(path), eval_fraction=0.5))


def test_unreadable_tfrecord_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"matches no file"):
        load_examples(TFRecordDataConfig(path=str(tmp_path / "none-*.tfrecord")))
    np.savez(tmp_path / "arrays.npz", features=np.ones((3, 2)), labels=np.zeros(3))
    with pytest.raises(DataError, match=r"are not readable TFRecord files"):
        load_examples(TFRecordDataConfig(path=str(tmp_path / "arrays.npz")))
    features, labels = _arrays(100)
    path = _write_records(tmp_path / "flipped.tfrecord", [_example(f, y) for f, y in zip(features, labels)])
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0xFF  # a record's checksum no longer matches
    path.write_bytes(bytes(content))
    with pytest.raises(DataError, match=r"flipped.tfrecord.*cannot be read"):
        load_examples(TFRecordDataConfig(path=str(path)))
    intact = _write_records(tmp_path / "intact.tfrecord", [_example(f, y) for f, y in zip(features, labels)])
    with pytest.raises(DataError, match=r"data.feature_shape' = \[3, 3\] holds 9 values but the records"):
        load_examples(TFRecordDataConfig(path=str(intact), feature_shape=[3, 3]))


# ---------------------------------------------------------------------------------------------
# digits, and every data config composing
# ---------------------------------------------------------------------------------------------
def test_digits_is_the_bundled_data_set_with_a_fixed_split() -> None:
    examples = load_examples(DigitsDataConfig())
    assert examples.train_features.shape == (1437, 64) and examples.eval_features.shape == (360, 64)
    assert examples.num_classes == 10 and set(examples.eval_targets) == set(range(10))
    assert examples.train_features.min() == 0.0 and examples.train_features.max() == 1.0
    np.testing.assert_array_equal(load_examples(DigitsDataConfig()).eval_targets, examples.eval_targets)
    with pytest.raises(DataError, match=r"data.eval_examples' = 1797"):
        load_examples(DigitsDataConfig(eval_examples=1797))


def test_diabetes_is_the_bundled_regression_data_set_with_standardised_features() -> None:
    examples = load_examples(DiabetesDataConfig())
    assert examples.train_features.shape == (354, 10) and examples.eval_features.shape == (88, 10)
    assert examples.train_targets.dtype == np.float32 and 25 <= examples.train_targets.min() < 350
    np.testing.assert_allclose(examples.train_features.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(examples.train_features.std(axis=0), 1, atol=1e-4)
    np.testing.assert_array_equal(load_examples(DiabetesDataConfig()).eval_targets, examples.eval_targets)


def test_text_is_byte_windows_whose_targets_are_the_next_bytes(tmp_path: Path) -> None:
    corpus = load_examples(TextDataConfig(seq_len=64))  # the default corpus: Python's own documentation
    assert corpus.num_classes == 256 and corpus.input_dtype == "int32" and len(corpus.train_features) > 5000
    assert b"statement" in bytes(corpus.train_features[:200].astype(np.uint8).ravel())  # English, not noise
    path = tmp_path / "tiny.txt"
    path.write_bytes(bytes(range(40)))
    examples = load_examples(TextDataConfig(path=str(path), seq_len=4, eval_fraction=0.25))
    np.testing.assert_array_equal(examples.train_features[:2], [[0, 1, 2, 3], [4, 5, 6, 7]])
    np.testing.assert_array_equal(examples.train_targets[:2], [[1, 2, 3, 4], [5, 6, 7, 8]])
    assert examples.eval_features[0, 0] == 30  # the last quarter of the file
    with pytest.raises(DataError, match=r"data.path' = '.*missing.txt': no such file"):
        load_examples(TextDataConfig(path=str(tmp_path / "missing.txt")))
    with pytest.raises(DataError, match=r"tiny.txt' has 40 bytes: too few"):
        load_examples(TextDataConfig(path=str(path), seq_len=16))


# ---------------------------------------------------------------------------------------------
# Through train.py
# ---------------------------------------------------------------------------------------------
SHORT = ("model.hidden=[32]", "data.global_batch_size=64", "trainer.steps_per_loop=10", "trainer.log_every=10",
         "export.enabled=false")


@pytest.mark.slow
def test_digits_mlp_reaches_95_percent_held_out_accuracy(run_dir: Path) -> None:
    result = run_train(run_dir, "data=digits", "model=mlp", "data.global_batch_size=64", "trainer.max_steps=400",
                       "trainer.steps_per_loop=50", "trainer.log_every=100", "trainer.eval_every=200",
                       "checkpoint.every_steps=200", "export.enabled=false", tiny=False)
    assert_ok(result)
    accuracy = event_scalars(run_dir / "tensorboard")["eval/accuracy"]
    assert [step for step, _ in accuracy] == [200, 400]
    assert accuracy[-1][1] >= 0.95, accuracy


@pytest.mark.slow
def test_train_on_a_user_npz_file(tmp_path: Path) -> None:
    digits = load_examples(DigitsDataConfig())
    path = tmp_path / "digits.npz"
    np.savez(path, features=digits.train_features, labels=digits.train_targets)
    run_dir = tmp_path / "run"
    result = run_train(run_dir, "data=npz", f"data.path={path}", "trainer.max_steps=20", "trainer.eval_every=20",
                       "checkpoint.every_steps=20", *SHORT, tiny=False)
    assert_ok(result)
    assert (run_dir / "checkpoints" / "ckpt-20.index").exists()
    assert [step for step, _ in event_scalars(run_dir / "tensorboard")["eval/accuracy"]] == [20]
    assert (run_dir / "model_signature.yaml").read_text() == ("task: classification\ninput_shape:\n- 64\n"
                                                             "input_dtype: float32\nnum_outputs: 10\nnum_classes: 10\n")


@pytest.mark.slow
def test_a_bad_data_file_exits_2_with_one_paragraph(tmp_path: Path) -> None:
    path = tmp_path / "arrays.npz"  # an npz file given as TFRecords
    np.savez(path, features=np.ones((10, 4)), labels=np.zeros(10, int))
    result = run_train(tmp_path / "run", "data=tfrecord", f"data.path={path}", "trainer.max_steps=20", *SHORT,
                       tiny=False)
    assert_ok(result, code=2)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "are not readable TFRecord files" in errors[0] and str(path) in errors[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
