"""Example sources: where the examples come from, as in-memory arrays with a fixed eval split.

Owns: loading or generating (features, targets) for the train and eval splits and checking them.
Every source returns `ExampleArrays`; the task (`harness/tasks/`) checks that the targets are of
the kind it learns, and the seekable pipeline in `harness/data/pipeline.py` does the rest, so a new source
only has to produce arrays. Sources (`SOURCES`, one per `data=` choice): `synthetic` (generated
classes), `digits` and `diabetes` (scikit-learn's bundled data sets, no download), `text` (bytes
of a text file; by default English text shipped with Python), and user files `npz` and
`tfrecord`, whose layout is checked on load: a bad file raises one `DataError` naming the file, the
key and what was expected (exit code 2), never a traceback.
"""

from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import tensorflow as tf

from harness.config.schema import (
    DataConfig,
    DiabetesDataConfig,
    DigitsDataConfig,
    FileDataConfig,
    NpzDataConfig,
    SyntheticDataConfig,
    TextDataConfig,
    TFRecordDataConfig,
)
from harness.data.record_files import ExampleLayout, open_tfrecords
from harness.errors import DataError, error_summary


@dataclass(frozen=True)
class ExampleArrays:
    """Examples of one data set: features (N, *input_shape) float32 (int32 for token ids), and targets
    (N, ...): int32 class or token ids, or float32 values; what they must be is the task's business."""

    train_features: np.ndarray
    train_targets: np.ndarray
    eval_features: np.ndarray
    eval_targets: np.ndarray
    num_classes: int | None = None  # distinct target ids, where the source knows them (classes, vocabulary)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_features.shape[1:])

    @property
    def input_dtype(self) -> str:
        """The model's input dtype: 'float32' features or 'int32' token ids."""
        return self.train_features.dtype.name


def synthetic(config: SyntheticDataConfig) -> ExampleArrays:
    """Gaussian features labelled by a fixed random two-layer teacher network (learnable, no files).

    The data set depends only on `generator_seed` and the sizes, never on the run's seed, so the
    train/eval split is the same for every run.
    """
    for key, value, minimum in (("data.input_dim", config.input_dim, 1), ("data.num_classes", config.num_classes, 2),
                                ("data.eval_examples", config.eval_examples, 1)):
        if value < minimum:
            raise DataError(f"Config key '{key}' = {value} is invalid: expected at least {minimum}.")
    if config.num_examples <= config.eval_examples:
        raise DataError(
            f"Config key 'data.num_examples' = {config.num_examples} leaves no training examples after "
            f"data.eval_examples = {config.eval_examples}: expected num_examples > eval_examples."
        )
    if not 0.0 <= config.label_noise < 1.0:
        raise DataError(f"Config key 'data.label_noise' = {config.label_noise} is invalid: "
                        "expected a fraction in [0, 1).")
    rng = np.random.default_rng(config.generator_seed)
    features = rng.standard_normal((config.num_examples, config.input_dim), dtype=np.float32)
    hidden_width = 32
    w1 = rng.standard_normal((config.input_dim, hidden_width)) / np.sqrt(config.input_dim)
    w2 = rng.standard_normal((hidden_width, config.num_classes)) / np.sqrt(hidden_width)
    labels = np.argmax(np.tanh(features @ w1) @ w2, axis=1).astype(np.int32)
    noisy = rng.random(config.num_examples) < config.label_noise
    labels[noisy] = rng.integers(0, config.num_classes, size=int(noisy.sum()), dtype=np.int32)
    split = config.eval_examples
    return ExampleArrays(features[split:], labels[split:], features[:split], labels[:split], config.num_classes)


def digits(config: DigitsDataConfig) -> ExampleArrays:
    """scikit-learn's bundled 8x8 handwritten digits: 1797 examples, 10 classes, shipped inside the package.

    Features are the 64 pixel intensities scaled from 0..16 to [0, 1] (flat; `model=cnn` reshapes them
    to 8x8x1). `eval_examples` of them, chosen by `split_seed`, form the eval split.
    """
    from sklearn.datasets import load_digits  # only this source needs scikit-learn; it reads no network

    bunch = load_digits()
    features, labels = (bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int32)
    if not 1 <= config.eval_examples < len(labels):
        raise DataError(f"Config key 'data.eval_examples' = {config.eval_examples} is invalid: expected 1 to "
                        f"{len(labels) - 1} (the digits data set has {len(labels)} examples).")
    return _held_out(features, labels, eval_count=config.eval_examples, split_seed=config.split_seed,
                     num_classes=10)


def npz(config: NpzDataConfig) -> ExampleArrays:
    """Examples from `numpy.savez` archives holding `features` (N, ...) numbers and `labels` (N,) class ids."""
    return _from_files(config, _read_npz)


def tfrecord(config: TFRecordDataConfig) -> ExampleArrays:
    """Examples from TFRecord files of `tf.train.Example`s, each with a fixed-length float or int64 feature
    `features_key` and an int64 feature `labels_key` holding one class id."""
    return _from_files(config, _read_tfrecord)


def _from_files(config: FileDataConfig, read: Callable[..., tuple[np.ndarray, np.ndarray]]) -> ExampleArrays:
    features, labels = read(config.path, config, key="data.path")
    if config.eval_path is not None:
        eval_features, eval_labels = read(config.eval_path, config, key="data.eval_path")
        return ExampleArrays(features, labels, eval_features, eval_labels, config.num_classes)
    if not 0.0 < config.eval_fraction < 1.0:
        raise DataError(f"Config key 'data.eval_fraction' = {config.eval_fraction} is invalid: expected a "
                        "fraction in (0, 1), or set data.eval_path to a separate eval file.")
    eval_count = max(1, round(len(labels) * config.eval_fraction))
    if eval_count >= len(labels):
        raise DataError(f"Data file '{config.path}' holds {len(labels)} examples: too few to hold out "
                        f"data.eval_fraction = {config.eval_fraction} for eval and still train; expected more "
                        "examples, or a separate eval file in data.eval_path.")
    return _held_out(features, labels, eval_count=eval_count, split_seed=config.split_seed,
                     num_classes=config.num_classes)


def _held_out(features: np.ndarray, labels: np.ndarray, *, eval_count: int, split_seed: int,
              num_classes: int | None) -> ExampleArrays:
    """Split off `eval_count` examples chosen by `split_seed` (files are often sorted by class)."""
    order = np.random.default_rng(split_seed).permutation(len(labels))
    eval_rows, train_rows = np.sort(order[:eval_count]), np.sort(order[eval_count:])
    return ExampleArrays(features[train_rows], labels[train_rows], features[eval_rows], labels[eval_rows],
                         num_classes)


def _read_npz(path: str, config: FileDataConfig, *, key: str) -> tuple[np.ndarray, np.ndarray]:
    expected = (f"a .npz archive written by numpy.savez with arrays '{config.features_key}' (N, ...) of numbers "
                f"and '{config.labels_key}' (N,) or (N, k) of targets (class ids, or values for a regression)")
    if not tf.io.gfile.exists(path):
        raise DataError(f"Config key '{key}' = '{path}': no such file. Expected {expected}.")
    with tf.io.gfile.GFile(path, "rb") as handle:  # gfile: local paths, gs://, hdfs://
        content = handle.read()
    if not content.startswith((b"PK", b"\x93NUMPY")):  # otherwise numpy would try to unpickle it
        raise DataError(f"Data file '{path}' ({key}) is not a .npz archive (no zip signature at its start). "
                        f"Expected {expected}.")
    try:
        archive = np.load(io.BytesIO(content), allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"Data file '{path}' ({key}) cannot be read as .npz ({error}). Expected {expected}.") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"Data file '{path}' ({key}) holds a single array (a .npy file), not an archive. "
                        f"Expected {expected}.")
    with archive:
        missing = [name for name in (config.features_key, config.labels_key) if name not in archive.files]
        if missing:
            raise DataError(f"Data file '{path}' ({key}) has no array '{missing[0]}'; it holds {archive.files}. "
                            f"Expected {expected}; set data.features_key / data.labels_key to the names in the file.")
        try:
            features, labels = archive[config.features_key], archive[config.labels_key]
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:  # object arrays, truncated members
            raise DataError(f"Data file '{path}' ({key}) cannot be read ({error}). Expected {expected}.") from None
    return _checked_arrays(features, labels, path=path, key=key, expected=expected)


def _read_tfrecord(path: str, config: TFRecordDataConfig, *, key: str) -> tuple[np.ndarray, np.ndarray]:
    expected = (f"TFRecord files of tf.train.Example records, each with a feature '{config.features_key}' of a "
                f"fixed number of float or int64 values and a feature '{config.labels_key}' holding one int64 "
                "class id or a fixed number of float targets")
    _, records, first = open_tfrecords(path, source=f"Config key '{key}' = '{path}'", expected=expected)
    layout = ExampleLayout.of_record(first, features_key=config.features_key, labels_key=config.labels_key,
                                     where=f"The first record of '{path}' ({key})")
    try:
        parsed = [tf.io.parse_example(batch, layout.parsing_spec) for batch in records.batch(8192)]
    except tf.errors.OpError as error:  # a corrupted record, or one whose layout differs from the first
        raise DataError(f"A record in '{path}' ({key}) cannot be read or differs from the first record "
                        f"({layout.describe()}): {error_summary(error)}. Expected {expected}.") from None
    features = np.concatenate([batch[config.features_key].numpy() for batch in parsed])
    labels = np.concatenate([batch[config.labels_key].numpy() for batch in parsed])
    if config.feature_shape is not None:
        if math.prod(config.feature_shape) != features.shape[1]:
            raise DataError(f"Config key 'data.feature_shape' = {list(config.feature_shape)} holds "
                            f"{math.prod(config.feature_shape)} values but the records in '{path}' have "
                            f"{features.shape[1]}: expected a shape whose product is {features.shape[1]}.")
        features = features.reshape((-1, *config.feature_shape))
    return _checked_arrays(features, labels, path=path, key=key, expected=expected)


def _checked_arrays(features: np.ndarray, labels: np.ndarray, *, path: str, key: str,
                    expected: str) -> tuple[np.ndarray, np.ndarray]:
    """float32 features (N, ...) and targets (N,) or (N, k): int32 if integers, else float32; or a
    `DataError` naming the file. Whether the targets suit the task is the task's check."""
    where = f"Data file '{path}' ({key})"
    if features.dtype.kind not in "biuf":
        raise DataError(f"{where}: features have dtype {features.dtype}; expected numbers. Expected {expected}.")
    if features.ndim < 2:
        raise DataError(f"{where}: features have shape {features.shape}; expected one row per example, "
                        f"(N, ...). Expected {expected}.")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim not in (1, 2):
        raise DataError(f"{where}: labels have shape {labels.shape}; expected (N,) or (N, k) targets. "
                        f"Expected {expected}.")
    if len(features) != len(labels) or not len(labels):
        raise DataError(f"{where} has {len(features)} feature rows and {len(labels)} labels; expected the same "
                        f"number, at least one. Expected {expected}.")
    if labels.dtype.kind not in "biuf":
        raise DataError(f"{where}: labels have dtype {labels.dtype}; expected numbers. Expected {expected}.")
    int32 = np.iinfo(np.int32)
    if labels.dtype.kind in "biu" and (labels.min() < int32.min or labels.max() > int32.max):
        raise DataError(f"{where}: integer labels span [{labels.min()}, {labels.max()}]; expected class or token ids "
                        f"that fit in int32 (as they are trained on). Expected {expected}.")
    targets = labels.astype(np.int32) if labels.dtype.kind in "biu" else labels.astype(np.float32, copy=False)
    return features.astype(np.float32, copy=False), targets


def diabetes(config: DiabetesDataConfig) -> ExampleArrays:
    """scikit-learn's bundled diabetes data set: 442 patients, 10 features, a float target (disease
    progression after one year, 25..346), shipped inside the package.

    Features are standardised with the training split's mean and standard deviation; the target is
    left in its units (`task=regression` standardises it for training and reports in its units).
    `eval_examples` of them, chosen by `split_seed`, form the eval split.
    """
    from sklearn.datasets import load_diabetes  # only this source needs scikit-learn; it reads no network

    bunch = load_diabetes(scaled=False)
    features, targets = bunch.data.astype(np.float64), bunch.target.astype(np.float32)
    if not 1 <= config.eval_examples < len(targets):
        raise DataError(f"Config key 'data.eval_examples' = {config.eval_examples} is invalid: expected 1 to "
                        f"{len(targets) - 1} (the diabetes data set has {len(targets)} examples).")
    arrays = _held_out(features, targets, eval_count=config.eval_examples, split_seed=config.split_seed,
                       num_classes=None)
    mean, std = arrays.train_features.mean(axis=0), arrays.train_features.std(axis=0)
    return replace(arrays, train_features=((arrays.train_features - mean) / std).astype(np.float32),
                   eval_features=((arrays.eval_features - mean) / std).astype(np.float32))


BYTE_VOCABULARY = 256


def text(config: TextDataConfig) -> ExampleArrays:
    """Byte-level language-model windows of a text file: inputs `seq_len` bytes, targets the next ones.

    Window `i` is bytes `[i * seq_len, (i + 1) * seq_len]` (seq_len + 1 bytes, inputs and targets
    shifted by one); the last `eval_fraction` of the file is the eval split. `data.path` null reads
    the default corpus: the English text of Python's own reference documentation (`pydoc_data`,
    part of every Python installation), so it needs no download.
    """
    if config.seq_len < 1:
        raise DataError(f"Config key 'data.seq_len' = {config.seq_len} is invalid: expected a positive number "
                        "of tokens.")
    if not 0.0 < config.eval_fraction < 1.0:
        raise DataError(f"Config key 'data.eval_fraction' = {config.eval_fraction} is invalid: expected a "
                        "fraction in (0, 1) of the text held out (at its end) for eval.")
    tokens = _text_bytes(config.path)
    split = int(len(tokens) * (1.0 - config.eval_fraction))
    train, evaluation = (_windows(part, config.seq_len) for part in (tokens[:split], tokens[split:]))
    if not len(train) or not len(evaluation):
        raise DataError(f"The text in '{config.path or DEFAULT_CORPUS}' has {len(tokens)} bytes: too few for "
                        f"windows of data.seq_len + 1 = {config.seq_len + 1} bytes in both the train split and "
                        f"the eval split (the last data.eval_fraction = {config.eval_fraction}); expected a "
                        "longer text or a shorter data.seq_len.")
    return ExampleArrays(train[:, :-1], train[:, 1:], evaluation[:, :-1], evaluation[:, 1:], BYTE_VOCABULARY)


DEFAULT_CORPUS = "Python's reference documentation (pydoc_data.topics)"


def _text_bytes(path: str | None) -> np.ndarray:
    if path is not None:  # training reads files by position (harness/data/file_sources.py); this loads a small one
        if not tf.io.gfile.exists(path) or tf.io.gfile.isdir(path):
            raise DataError(f"Config key 'data.path' = '{path}': no such file. Expected a text file (any bytes; each "
                            "byte is one token), or data.path=null for the default corpus.")
        with tf.io.gfile.GFile(path, "rb") as handle:
            return np.frombuffer(handle.read(), np.uint8)
    from pydoc_data.topics import topics  # English prose shipped with CPython's standard library

    return np.frombuffer("\n\n".join(topics[name] for name in sorted(topics)).encode("utf-8"), np.uint8)


def _windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Non-overlapping windows of `seq_len + 1` tokens (int32), consecutive ones sharing one token."""
    count = (len(tokens) - 1) // seq_len
    starts = np.arange(count)[:, None] * seq_len
    return tokens[starts + np.arange(seq_len + 1)].astype(np.int32)


SOURCES: dict[str, Callable[..., ExampleArrays]] = {"synthetic": synthetic, "digits": digits, "diabetes": diabetes,
                                                    "text": text, "npz": npz, "tfrecord": tfrecord}


def load_examples(config: DataConfig) -> ExampleArrays:
    """The examples named by `data.name`, checked for shapes and finite features."""
    arrays = SOURCES[config.name](config)
    check_examples(arrays, source=config.name)
    return arrays


def check_examples(arrays: ExampleArrays, *, source: str) -> None:
    """Raise `DataError` if the arrays cannot be trained on (whatever the task)."""
    for split, features, targets in (("train", arrays.train_features, arrays.train_targets),
                                     ("eval", arrays.eval_features, arrays.eval_targets)):
        if len(features) == 0:
            raise DataError(f"Data source '{source}' has no {split} examples.")
        if len(features) != len(targets):
            raise DataError(f"Data source '{source}': {split} split has {len(features)} feature rows but "
                            f"{len(targets)} targets; expected one target per example.")
        if features.dtype.kind == "f" and not np.isfinite(features).all():
            raise DataError(f"Data source '{source}': {split} features contain NaN or infinite values.")
    for what, train, evaluation in (("examples", arrays.train_features, arrays.eval_features),
                                    ("targets", arrays.train_targets, arrays.eval_targets)):
        if train.shape[1:] != evaluation.shape[1:]:
            raise DataError(f"Data source '{source}': train {what} have shape {train.shape[1:]} but eval {what} "
                            f"{evaluation.shape[1:]}; expected the same shape.")
