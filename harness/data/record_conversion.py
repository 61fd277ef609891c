"""Writing ArrayRecord shards of `tf.train.Example`s from TFRecord files, .npz archives or arrays.

Owns: the shard layout `<output dir>/data-00000-of-000NN.array_record` (group size 1, so any record
is read alone), splitting records into shards, and streaming the input with bounded memory:
TFRecord input is read a batch at a time and passed through as-is after its layout is checked
against the first record's (`harness/data/record_files.py: ExampleLayout`); .npz members are read a
chunk of rows at a time straight from the archive. Shards are written under temporary names and
renamed once all are complete, so an interrupted conversion leaves no shard that looks finished;
existing shards are never replaced unless `overwrite`, and then removed before the renames, so an interrupted
overwrite leaves an incomplete new set that training refuses, never a mix of old and new shards. Used by
scripts/convert_to_array_record.py and by benchmarks that need a data set on disk (`write_synthetic_shards`,
`write_array_shards`).
"""

from __future__ import annotations

import contextlib
import math
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
from array_record.python.array_record_module import ArrayRecordWriter

from harness.data.record_files import ExampleLayout, expected_records, open_tfrecords
from harness.errors import DataError, error_summary
from harness.host import fsync

# group_size:1 puts each record in its own chunk: a random read decodes one record, not a group.
# Uncompressed: training reads every record once an epoch, and on 2 cores zstd's decoding cost more
# steps/s than its few percent of size saved (docs/benchmarks.md, section 6: 0.73x -> 0.85x).
WRITER_OPTIONS = "group_size:1,uncompressed"
DEFAULT_RECORDS_PER_SHARD = 100_000  # ~300 MB of 784-float records: few files to open, cheap to rewrite one
SHARD_PATTERN = "data-?????-of-?????.array_record"
PARTIAL_PATTERN = ".partial-?????.array_record"  # shards being written (`partial_name`), renamed once all are
_CHUNK_ROWS = 1024  # rows read from the input at a time: bounds memory whatever the input's size


@dataclass(frozen=True)
class ConversionSummary:
    num_records: int
    files: list[str]

    def __str__(self) -> str:
        where = os.path.dirname(self.files[0]) if self.files else "."
        names = [os.path.basename(path) for path in self.files]
        shards = f"1 shard in {where}: {names[0]}" if len(names) == 1 else (
            f"{len(names)} shards in {where}: {names[0]} ... {names[-1]}")
        return f"wrote {self.num_records} records to {shards}"


def shard_name(shard: int, num_shards: int) -> str:
    return f"data-{shard:05d}-of-{num_shards:05d}.array_record"


def partial_name(shard: int) -> str:
    return f".partial-{shard:05d}.array_record"


def convert_to_array_record(source: str, output_dir: str, *, records_per_shard: int | None = None,
                            num_shards: int | None = None, features_key: str = "features",
                            labels_key: str = "labels", class_ids: bool = False, overwrite: bool = False,
                            progress: bool = False) -> ConversionSummary:
    """Convert a glob of TFRecord files or one .npz archive to ArrayRecord shards in `output_dir`.

    Give at most one of `records_per_shard` (default `DEFAULT_RECORDS_PER_SHARD`) and `num_shards`
    (TFRecord input is then counted in a first streaming pass). .npz labels keep their kind (integers
    become int64 class ids, floats float targets) unless `class_ids`: then float labels that are
    whole numbers are stored as int64 class ids too. Bad input, or existing shards without
    `overwrite`, raise `DataError`; `output_dir` keeps no partial shard.
    """
    _check_sharding(records_per_shard, num_shards)
    if source.endswith(".npz"):
        num_records, chunks = _npz_records(source, features_key=features_key, labels_key=labels_key,
                                           class_ids=class_ids)
    else:
        num_records, chunks = _tfrecord_records(source, features_key=features_key, labels_key=labels_key,
                                                count=num_shards is not None)
    return _write_shards(chunks, output_dir, num_records=num_records, records_per_shard=records_per_shard,
                         num_shards=num_shards, overwrite=overwrite, progress=progress)


def write_array_shards(features: np.ndarray, labels: np.ndarray, output_dir: str, *,
                       records_per_shard: int | None = None, num_shards: int | None = None,
                       features_key: str = "features", labels_key: str = "labels", class_ids: bool = False,
                       overwrite: bool = False, progress: bool = False) -> ConversionSummary:
    """Write `features` (N, ...) and `labels` (N,) or (N, k) as shards of `tf.train.Example`s.

    Integer features/labels are stored as int64 values, floats as floats (features flattened per
    record); with `class_ids`, whole-number float labels are stored as int64 class ids. Arrays may
    be `np.memmap`s bigger than memory: rows are serialized a chunk at a time.
    """
    _check_sharding(records_per_shard, num_shards)
    _check_arrays(features.shape, features.dtype, labels.shape, labels.dtype, where="The arrays",
                  class_ids=class_ids)
    chunks = (_serialize_rows(features[start:start + _CHUNK_ROWS],
                              _labels(labels[start:start + _CHUNK_ROWS], class_ids=class_ids, first_row=start,
                                      where="The arrays"),
                              features_key=features_key, labels_key=labels_key)
              for start in range(0, len(features), _CHUNK_ROWS))
    return _write_shards(chunks, output_dir, num_records=len(features), records_per_shard=records_per_shard,
                         num_shards=num_shards, overwrite=overwrite, progress=progress)


def write_synthetic_shards(output_dir: str, *, num_records: int, feature_size: int, num_classes: int = 10,
                           seed: int = 0, records_per_shard: int | None = None, num_shards: int | None = None,
                           overwrite: bool = False, progress: bool = False) -> ConversionSummary:
    """Shards of `num_records` Gaussian float32 feature vectors of `feature_size` with uniform class ids.

    A data set of any size for benchmarks and tests: generated a chunk at a time from `seed`, so
    record i is the same for every call with the same `seed` and chunking, and memory stays bounded.
    """
    _check_sharding(records_per_shard, num_shards)
    if num_records < 1 or feature_size < 1 or num_classes < 1:
        raise DataError(f"num_records = {num_records}, feature_size = {feature_size}, num_classes = {num_classes}: "
                        "expected positive numbers.")
    rng = np.random.default_rng(seed)
    chunks = (_serialize_rows(rng.standard_normal((min(_CHUNK_ROWS, num_records - start), feature_size),
                                                  dtype=np.float32),
                              rng.integers(0, num_classes, min(_CHUNK_ROWS, num_records - start)),
                              features_key="features", labels_key="labels")
              for start in range(0, num_records, _CHUNK_ROWS))
    return _write_shards(chunks, output_dir, num_records=num_records, records_per_shard=records_per_shard,
                         num_shards=num_shards, overwrite=overwrite, progress=progress)


def _check_sharding(records_per_shard: int | None, num_shards: int | None) -> None:
    if records_per_shard is not None and num_shards is not None:
        raise DataError("Give either records_per_shard or num_shards, not both.")
    for name, value in (("records_per_shard", records_per_shard), ("num_shards", num_shards)):
        if value is not None and value < 1:
            raise DataError(f"{name} = {value} is invalid: expected a positive number.")


# ---------------------------------------------------------------------------------------------
# Writing shards
# ---------------------------------------------------------------------------------------------
def _write_shards(chunks: Iterable[list[bytes]], output_dir: str, *, num_records: int | None,
                  records_per_shard: int | None, num_shards: int | None, overwrite: bool,
                  progress: bool) -> ConversionSummary:
    """Write the serialized records of `chunks` into shards; `num_records` may be None only without `num_shards`."""
    existing = sorted(tf.io.gfile.glob(os.path.join(output_dir, SHARD_PATTERN)))
    if existing and not overwrite:
        raise DataError(f"Output directory '{output_dir}' already holds {len(existing)} shards "
                        f"({os.path.basename(existing[0])} ...): expected a directory without shards; pass "
                        "--overwrite (overwrite=True) to replace them.")
    if num_shards is not None:
        assert num_records is not None, "num_shards needs the record count"
        # Spread records evenly: the first `num_records % num_shards` shards hold one more.
        sizes = [num_records // num_shards + (shard < num_records % num_shards) for shard in range(num_shards)]
    else:
        sizes = None
    per_shard = records_per_shard or DEFAULT_RECORDS_PER_SHARD
    try:
        tf.io.gfile.makedirs(output_dir)
    except tf.errors.OpError as error:
        raise DataError(f"Output directory '{output_dir}' cannot be created ({error_summary(error)}): expected "
                        "a writable directory.") from None
    # Left by a conversion that was killed (a complete new set, if an --overwrite died between its removals and
    # renames): this one rewrites them, and a stale one numbered past its last shard would stay forever.
    for stale in tf.io.gfile.glob(os.path.join(output_dir, PARTIAL_PATTERN)):
        tf.io.gfile.remove(stale)
    temporary: list[str] = []
    writer: ArrayRecordWriter | None = None
    written_in_shard = written = 0
    from tqdm import tqdm

    bar = tqdm(total=num_records, unit="record", disable=not progress, dynamic_ncols=True)
    try:
        for chunk in chunks:
            for record in chunk:
                capacity = sizes[len(temporary) - 1] if sizes is not None and temporary else per_shard
                if writer is None or written_in_shard >= capacity:
                    if writer is not None:
                        writer.close()
                    temporary.append(os.path.join(output_dir, partial_name(len(temporary))))
                    writer = ArrayRecordWriter(temporary[-1], WRITER_OPTIONS)
                    written_in_shard = 0
                writer.write(record)
                written_in_shard += 1
                written += 1
            bar.update(len(chunk))
        if writer is not None:
            writer.close()
            writer = None
    except BaseException as error:
        if writer is not None:
            with contextlib.suppress(RuntimeError):
                writer.close()
        for path in temporary:
            with contextlib.suppress(tf.errors.OpError):
                tf.io.gfile.remove(path)
        if isinstance(error, RuntimeError):  # array-record's report of a failed open or write (disk full, permissions)
            raise DataError(f"Shards cannot be written to '{output_dir}' ({error_summary(error)}): expected a "
                            "writable directory with room for the shards; nothing was kept.") from None
        raise
    finally:
        bar.close()
    if not written:
        raise DataError("The input holds no records: expected at least one.")
    # On disk before they take the shards' names, so that a power loss after the summary never leaves empty or
    # partial files under them.
    for path in temporary:
        fsync(path)
    # With --overwrite the old shards go (durably) before any new one takes a name: renaming one at a time cannot be
    # atomic, and an interruption must leave part of the *new* set, which training refuses as incomplete
    # (record_files.RecordShards), never old and new shards side by side, which it could not tell from one set.
    for path in existing:
        tf.io.gfile.remove(path)
    if existing:
        fsync(output_dir)
    files = [os.path.join(output_dir, shard_name(shard, len(temporary))) for shard in range(len(temporary))]
    for path, final in zip(temporary, files):
        tf.io.gfile.rename(path, final)
    fsync(output_dir)
    return ConversionSummary(written, files)


# ---------------------------------------------------------------------------------------------
# TFRecord input: passed through as-is, in batches, after a layout check
# ---------------------------------------------------------------------------------------------
def _tfrecord_records(pattern: str, *, features_key: str, labels_key: str,
                      count: bool) -> tuple[int | None, Iterator[list[bytes]]]:
    expected = f"TFRecord files of {expected_records(features_key, labels_key)}, or a .npz archive"
    files, _, first = open_tfrecords(pattern, source=f"Input '{pattern}'", expected=expected)
    layout = ExampleLayout.of_record(first, features_key=features_key, labels_key=labels_key,
                                     where=f"The first record of '{files[0]}'")

    def batches() -> Iterator[tuple[str, int, tf.Tensor]]:
        """(file, index in it of the batch's first record, batch) over every file in order."""
        for path in files:
            read = 0
            try:
                for batch in tf.data.TFRecordDataset(path).batch(_CHUNK_ROWS):
                    yield path, read, batch
                    read += int(batch.shape[0])
            except tf.errors.OpError as error:  # a truncated or corrupted file: find the record
                bad = read + sum(1 for _ in _readable_records(path, skip=read))
                raise DataError(f"Record {bad} of '{path}' cannot be read ({error_summary(error)}): the file is "
                                f"truncated or corrupted. Expected {expected}.") from None

    num_records = sum(int(batch.shape[0]) for _, _, batch in batches()) if count else None

    def chunks() -> Iterator[list[bytes]]:
        for path, first, batch in batches():
            try:
                tf.io.parse_example(batch, layout.parsing_spec)
            except tf.errors.InvalidArgumentError:
                for offset, record in enumerate(batch.numpy()):
                    try:
                        tf.io.parse_example([record], layout.parsing_spec)
                    except tf.errors.InvalidArgumentError as error:
                        raise DataError(f"Record {first + offset} of '{path}' does not match the layout of the "
                                        f"first record ({layout.describe()}): {error_summary(error)}. Expected "
                                        f"{expected}.") from None
                raise
            yield list(batch.numpy())

    return num_records, chunks()


def _readable_records(path: str, *, skip: int) -> Iterator[bytes]:
    """The records of a TFRecord file after the first `skip`, one at a time, up to the first unreadable one."""
    records = iter(tf.data.TFRecordDataset(path).skip(skip))
    while True:
        try:
            yield next(records).numpy()
        except (StopIteration, tf.errors.OpError):
            return


# ---------------------------------------------------------------------------------------------
# .npz input and arrays: serialized a chunk of rows at a time
# ---------------------------------------------------------------------------------------------
def _npz_records(path: str, *, features_key: str, labels_key: str,
                 class_ids: bool) -> tuple[int, Iterator[list[bytes]]]:
    expected = (f"a .npz archive written by numpy.savez with arrays '{features_key}' (N, ...) of numbers and "
                f"'{labels_key}' (N,) of integers or (N,) / (N, k) of floats")
    if not os.path.isfile(path):
        raise DataError(f"Input '{path}': no such file. Expected {expected}.")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise DataError(f"Input '{path}' is not a .npz archive ({error}). Expected {expected}.") from None
    members = {name.removesuffix(".npy"): name for name in archive.namelist()}
    for name in (features_key, labels_key):
        if name not in members:
            archive.close()
            raise DataError(f"Input '{path}' has no array '{name}'; it holds {sorted(members)}. Expected "
                            f"{expected}; pass --features-key / --labels-key with the names in the file.")
    feature_rows, features_shape, features_dtype = _npy_rows(archive, members[features_key], path=path,
                                                             expected=expected)
    label_rows, labels_shape, labels_dtype = _npy_rows(archive, members[labels_key], path=path, expected=expected)
    _check_arrays(features_shape, features_dtype, labels_shape, labels_dtype, where=f"Input '{path}'",
                  expected=expected, class_ids=class_ids)

    def chunks() -> Iterator[list[bytes]]:
        with archive:
            for start, (features, labels) in zip(range(0, features_shape[0], _CHUNK_ROWS),
                                                 zip(feature_rows(), label_rows())):
                yield _serialize_rows(features, _labels(labels, class_ids=class_ids, first_row=start,
                                                        where=f"Input '{path}'"),
                                      features_key=features_key, labels_key=labels_key)

    return features_shape[0], chunks()


def _npy_rows(archive: zipfile.ZipFile, member: str, *, path: str,
              expected: str) -> tuple[Callable[[], Iterator[np.ndarray]], tuple[int, ...], np.dtype]:
    """A generator of `_CHUNK_ROWS`-row chunks of one archive member, and its shape and dtype."""
    try:
        with archive.open(member) as handle:
            version = np.lib.format.read_magic(handle)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            shape, fortran_order, dtype = read_header(handle) if read_header else (None, None, None)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"Array '{member}' of '{path}' cannot be read ({error}). Expected {expected}.") from None
    if shape is None or (fortran_order and len(shape) > 1):  # rare layouts: read whole, as numpy would
        with np.load(path, allow_pickle=False) as whole:
            array = whole[member.removesuffix(".npy")]
        return (lambda: (array[start:start + _CHUNK_ROWS] for start in range(0, len(array), _CHUNK_ROWS)),
                array.shape, array.dtype)
    if dtype.hasobject or not shape:
        raise DataError(f"Array '{member}' of '{path}' has dtype {dtype} and shape {shape}; expected numbers with "
                        f"one row per example. Expected {expected}.")
    row_bytes = dtype.itemsize * math.prod(shape[1:])

    def rows() -> Iterator[np.ndarray]:
        with archive.open(member) as handle:
            np.lib.format.read_magic(handle)
            read_header(handle)
            for start in range(0, shape[0], _CHUNK_ROWS):
                count = min(_CHUNK_ROWS, shape[0] - start)
                data = handle.read(count * row_bytes)
                if len(data) != count * row_bytes:
                    raise DataError(f"Array '{member}' of '{path}' ends after {start + len(data) // row_bytes} of "
                                    f"its {shape[0]} rows: the archive is truncated. Expected {expected}.")
                yield np.frombuffer(data, dtype=dtype).reshape((count, *shape[1:]))

    return rows, tuple(shape), dtype


def _check_arrays(features_shape: tuple[int, ...], features_dtype: np.dtype, labels_shape: tuple[int, ...],
                  labels_dtype: np.dtype, *, where: str, expected: str | None = None,
                  class_ids: bool = False) -> None:
    expected = expected or ("features (N, ...) of numbers and labels (N,) of integers or (N,) / (N, k) of floats")
    problem = None
    if features_dtype.kind not in "biuf" or len(features_shape) < 2 or not math.prod(features_shape[1:]):
        problem = f"features have shape {features_shape} and dtype {features_dtype}"
    elif labels_dtype.kind not in "biuf" or len(labels_shape) not in (1, 2) or labels_shape[0] != features_shape[0]:
        problem = f"labels have shape {labels_shape} and dtype {labels_dtype} for {features_shape[0]} feature rows"
    elif (labels_dtype.kind in "biu" or class_ids) and math.prod(labels_shape[1:]) != 1:
        problem = f"class-id labels have shape {labels_shape}: one class id or token per example is supported"
    elif not features_shape[0]:
        problem = "they hold no examples"
    if problem:
        raise DataError(f"{where}: {problem}. Expected {expected}.")


def _labels(labels: np.ndarray, *, class_ids: bool, first_row: int, where: str) -> np.ndarray:
    """`labels` as they are, or as int64 class ids (`class_ids`), refusing fractions."""
    if not class_ids or labels.dtype.kind in "biu":
        return labels
    fractional = np.flatnonzero(labels.reshape(len(labels)) != np.round(labels.reshape(len(labels))))
    if len(fractional):
        row = first_row + int(fractional[0])
        raise DataError(f"{where}: label {labels.reshape(-1)[fractional[0]]} of row {row} is not a whole number; "
                        "class ids (--class-ids) must be. Leave out --class-ids to store float targets.")
    return labels.astype(np.int64)


def _serialize_rows(features: np.ndarray, labels: np.ndarray, *, features_key: str, labels_key: str) -> list[bytes]:
    """One serialized `tf.train.Example` per row: floats as float_list, integers as int64_list.

    Encoded here rather than through protobuf objects: a packed float list is the row's own bytes,
    which makes 784-float records ~10x faster to write (the converter's bottleneck otherwise).
    """
    features = features.reshape(len(features), -1)
    labels = labels.reshape(len(labels), -1)
    keys = (_length_delimited(1, features_key.encode()), _length_delimited(1, labels_key.encode()))
    return [_length_delimited(1, b"".join(_length_delimited(1, key + _length_delimited(2, _feature(values)))
                                          for key, values in zip(keys, (feature_row, label_row))))
            for feature_row, label_row in zip(features, labels)]


def _feature(values: np.ndarray) -> bytes:
    """A serialized `tf.train.Feature`: FloatList (field 2) or Int64List (field 3), values packed in field 1."""
    if values.dtype.kind == "f":
        return _length_delimited(2, _length_delimited(1, values.astype("<f4").tobytes()))
    return _length_delimited(3, tf.train.Int64List(value=values.astype(np.int64).tolist()).SerializeToString())


def _length_delimited(field_number: int, payload: bytes) -> bytes:
    """A protobuf field of wire type 2 (bytes, string, embedded message, packed values)."""
    return _varint(field_number << 3 | 2) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    encoded = bytearray()
    while value >= 0x80:
        encoded.append(value & 0x7F | 0x80)
        value >>= 7
    encoded.append(value)
    return bytes(encoded)
