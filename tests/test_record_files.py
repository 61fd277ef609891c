"""ArrayRecord shards: conversion from npz/TFRecord, random reads by index, and every bad-file case.

Real shards are written to tmp_path with the real converter and ArrayRecordWriter, then damaged
on disk (cut, bit-flipped, mixed layouts); each problem must be one `DataError` paragraph naming
the file (and the record where known), never a crash. The concurrency test also prints read
throughput (a measurement, not an assertion).
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from array_record.python.array_record_module import ArrayRecordWriter

from harness.data import page_cache, record_files
from harness.data.page_cache import IN_MEMORY_FILESYSTEMS, PageCacheProbe, filesystem_type
from harness.data.record_conversion import convert_to_array_record, write_array_shards, write_synthetic_shards
from harness.data.record_files import RecordShards
from harness.errors import DataError
from scripts.tooling.data_benchmark import evict
from tests.conftest import PROJECT_ROOT, subprocess_env


def _arrays(count: int, shape: tuple[int, ...] = (6,), *, float_targets: int = 0,
            seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((count, *shape)).astype(np.float32)
    if float_targets:
        return features, rng.standard_normal((count, float_targets)).astype(np.float32)
    return features, rng.integers(0, 1000, count)


def _example(features, target, *, features_key: str = "features", labels_key: str = "labels") -> bytes:
    example = tf.train.Example()
    example.features.feature[features_key].float_list.value.extend(np.ravel(features).tolist())
    example.features.feature[labels_key].int64_list.value.append(int(target))
    return example.SerializeToString()


def _write_shard(path: Path, records: list[bytes]) -> Path:
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for record in records:
        writer.write(record)
    writer.close()
    return path


def _shards(directory: Path, count: int = 300, **kwargs) -> tuple[str, np.ndarray, np.ndarray]:
    features, labels = _arrays(count, **kwargs)
    write_array_shards(features, labels, str(directory), records_per_shard=70)
    return str(directory / "*.array_record"), features, labels


@pytest.fixture(params=["batched", "one_at_a_time"])
def read_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test with every read going through one of `RecordShards`'s two ways to read a shard: array-record's
    batched read (with spare cores, for many records of a shard), or `seek` + `read` per record."""
    monkeypatch.setattr(record_files, "BATCHED_READ_MIN_SHARE", 10**12 if request.param == "batched" else 0)
    monkeypatch.setattr(record_files, "has_accelerators", lambda: request.param == "batched")
    monkeypatch.setattr(PageCacheProbe, "mostly_cached", lambda probe, index: True)
    return request.param


def _one_paragraph(error: pytest.ExceptionInfo[DataError]) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# Conversion and reading
# ---------------------------------------------------------------------------------------------
def test_npz_round_trip_reads_random_indices_across_shards(tmp_path: Path, read_path: str) -> None:
    features, labels = _arrays(1000, (4, 3))
    np.savez(tmp_path / "train.npz", features=features, labels=labels)
    summary = convert_to_array_record(str(tmp_path / "train.npz"), str(tmp_path / "out"), num_shards=3)
    assert summary.num_records == 1000
    assert [Path(path).name for path in summary.files] == [f"data-0000{i}-of-00003.array_record" for i in range(3)]
    with RecordShards(str(tmp_path / "out" / "*.array_record"), features_key="features", labels_key="labels",
                      feature_shape=[4, 3]) as shards:
        assert shards.shard_sizes.tolist() == [334, 333, 333] and shards.num_records == 1000
        assert (shards.feature_shape, shards.target_shape, shards.target_dtype) == ((4, 3), (), np.int32)
        indices = np.random.default_rng(1).integers(0, 1000, 256)
        read_features, read_labels = shards.read(indices)
        assert read_features.dtype == np.float32 and read_features.shape == (256, 4, 3)
        np.testing.assert_array_equal(read_features, features[indices])
        np.testing.assert_array_equal(read_labels, labels[indices])
        empty_features, empty_labels = shards.read(np.array([], dtype=np.int64))
        assert empty_features.shape == (0, 4, 3) and empty_labels.shape == (0,)
        with pytest.raises(IndexError):
            shards.read(np.array([1000]))


def test_tfrecord_records_are_copied_unchanged(tmp_path: Path) -> None:
    features, labels = _arrays(250)
    records = [_example(row, label) for row, label in zip(features, labels)]
    for part, rows in enumerate((slice(0, 100), slice(100, 250))):
        with tf.io.TFRecordWriter(str(tmp_path / f"part-{part}.tfrecord")) as writer:
            for record in records[rows]:
                writer.write(record)
    summary = convert_to_array_record(str(tmp_path / "part-*.tfrecord"), str(tmp_path / "out"),
                                      records_per_shard=100)
    assert (summary.num_records, len(summary.files)) == (250, 3)
    with RecordShards(str(tmp_path / "out" / "*"), features_key="features", labels_key="labels",
                      feature_shape=None) as shards:
        assert shards.read_serialized(np.arange(250)) == records
        read_features, read_labels = shards.read(np.array([249, 0, 100, 0]))
        np.testing.assert_array_equal(read_features, features[[249, 0, 100, 0]])
        np.testing.assert_array_equal(read_labels, labels[[249, 0, 100, 0]])
    convert_to_array_record(str(tmp_path / "part-*.tfrecord"), str(tmp_path / "four"), num_shards=4)
    with RecordShards(str(tmp_path / "four" / "*"), features_key="features", labels_key="labels") as shards:
        assert shards.shard_sizes.tolist() == [63, 63, 62, 62]  # counted first, then spread evenly
        assert shards.read_serialized(np.arange(250)) == records


@pytest.mark.parametrize("width", [1, 3])
def test_float_targets_and_int_features(tmp_path: Path, width: int) -> None:
    features, targets = _arrays(120, float_targets=width)
    pixels = (features * 50).astype(np.int16)  # integer features are stored as int64 and read as float32
    write_array_shards(pixels, targets if width > 1 else targets[:, 0], str(tmp_path), num_shards=2)
    with RecordShards(str(tmp_path / "*.array_record"), features_key="features", labels_key="labels") as shards:
        assert shards.target_dtype == np.float32 and shards.target_shape == (() if width == 1 else (width,))
        indices = np.array([119, 3, 60, 59])
        read_features, read_targets = shards.read(indices)
        np.testing.assert_array_equal(read_features, pixels[indices].astype(np.float32))
        np.testing.assert_array_equal(read_targets, targets[indices].reshape((4, *shards.target_shape)))


@pytest.mark.parametrize("decode_records", [256, 3])
def test_records_decoded_at_fixed_offsets_equal_parsed_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            decode_records: int) -> None:
    """Records laid out like the first one are decoded by numpy (`FixedOffsets`); any other is parsed by TF.
    Mixed in one batch: ids of other varint widths (0, 127, 128, 2**31 - 1, -1); a record of the same length as
    the first but another target name is refused; float targets, map entries written in another order.
    With slices of 3 records decoded at a time, the records left for TF lie in several slices."""
    monkeypatch.setattr(record_files, "DECODE_RECORDS", decode_records)
    features, _ = _arrays(8)
    ids = [5, 0, 127, 128, 2**31 - 1, -1, 7]
    records = [_example(row, label) for row, label in zip(features, ids)]
    records.append(_example(features[7], 9, labels_key="labelz"))  # as long as record 0, another name
    _write_shard(tmp_path / "a.array_record", records)
    with RecordShards(str(tmp_path / "a.array_record"), features_key="features", labels_key="labels") as shards:
        assert shards._offsets is not None  # these records are decoded at fixed offsets
        read_features, read_ids = shards.read(np.array([6, 0, 1, 2, 3, 4, 5, 0]))
        np.testing.assert_array_equal(read_features, features[[6, 0, 1, 2, 3, 4, 5, 0]])
        np.testing.assert_array_equal(read_ids, np.array([7, 5, 0, 127, 128, 2**31 - 1, -1, 5]))
        with pytest.raises(DataError, match=r"Record 7 \(record 7 of shard .*a.array_record', data.path\) does not "
                                            r"match the layout of the first record"):
            shards.read(np.array([0, 7]))
    examples = [tf.train.Example() for _ in range(3)]
    for example, row in zip(examples, features):
        example.features.feature["labels"].float_list.value.extend(row[:2].tolist())
        example.features.feature["features"].float_list.value.extend(row.tolist())
    _write_shard(tmp_path / "b.array_record", [example.SerializeToString() for example in examples])
    with RecordShards(str(tmp_path / "b.array_record"), features_key="features", labels_key="labels") as shards:
        assert shards._offsets is not None
        read_features, read_targets = shards.read(np.array([2, 0, 1]))
        np.testing.assert_array_equal(read_features, features[[2, 0, 1]])
        np.testing.assert_array_equal(read_targets, features[[2, 0, 1], :2])


def test_synthetic_shards_for_benchmarks(tmp_path: Path) -> None:
    summary = write_synthetic_shards(str(tmp_path / "a"), num_records=2500, feature_size=5, num_classes=3,
                                     records_per_shard=1000)
    assert (summary.num_records, len(summary.files)) == (2500, 3)
    write_synthetic_shards(str(tmp_path / "b"), num_records=2500, feature_size=5, num_classes=3, num_shards=1)
    with RecordShards(str(tmp_path / "a" / "*"), features_key="features", labels_key="labels") as shards, \
            RecordShards(str(tmp_path / "b" / "*"), features_key="features", labels_key="labels") as same:
        features, labels = shards.read(np.arange(2500))
        assert features.shape == (2500, 5) and set(labels.tolist()) == {0, 1, 2}
        np.testing.assert_array_equal(same.read(np.arange(2500))[0], features)  # a function of the seed


@pytest.mark.parametrize("kinds", [("float64", "int64"), ("int16", "float32")])
def test_rows_are_encoded_as_protobuf_would(kinds: tuple[str, str]) -> None:
    """The converter writes Examples without protobuf objects: the bytes must decode to the same message."""
    from harness.data.record_conversion import _serialize_rows

    features = (np.random.default_rng(0).standard_normal((3, 2, 2)) * 100).astype(kinds[0])
    labels = np.array([[0, -5], [2**40, 1], [7, 3]]).astype(kinds[1])[:, : 1 if kinds[1] == "int64" else 2]
    for record, feature_row, label_row in zip(_serialize_rows(features, labels, features_key="x", labels_key="y"),
                                              features, labels):
        expected = tf.train.Example()
        for name, values in (("x", feature_row.ravel()), ("y", label_row)):
            if values.dtype.kind == "f":
                expected.features.feature[name].float_list.value.extend(values.astype(np.float32).tolist())
            else:
                expected.features.feature[name].int64_list.value.extend(values.tolist())
        assert tf.train.Example.FromString(record) == expected


def test_reads_from_threads_are_correct_and_measured(tmp_path: Path, read_path: str) -> None:
    """Four threads share the readers; each checks its own batches. Prints records/s (not asserted)."""
    features, labels = _arrays(4000, (784,))
    write_array_shards(features, labels, str(tmp_path), num_shards=4)
    shards = RecordShards(str(tmp_path / "*.array_record"), features_key="features", labels_key="labels")
    batches = [np.random.default_rng(seed).integers(0, 4000, 256) for seed in range(8)]
    failures: list[str] = []

    def read_and_check(thread: int, rounds: int) -> None:
        for round_ in range(rounds):
            indices = batches[(thread + round_) % len(batches)]
            read_features, read_labels = shards.read(indices)
            if not (np.array_equal(read_features, features[indices]) and np.array_equal(read_labels, labels[indices])):
                failures.append(f"thread {thread} round {round_}")

    def records_per_second(threads: int, rounds: int) -> float:
        start = time.perf_counter()
        workers = [threading.Thread(target=read_and_check, args=(thread, rounds)) for thread in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return threads * rounds * 256 / (time.perf_counter() - start)

    read_and_check(0, 1)  # warm the page cache
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads swap between a seek and its read unless the shard's lock holds them
    try:
        single, four = records_per_second(1, 12), records_per_second(4, 6)
    finally:
        sys.setswitchinterval(switch_interval)
    assert not failures
    parse_example = _parse_rate(lambda records: tf.io.parse_example(records, shards.parsing_spec), shards, batches)
    protobuf = _parse_rate(_parse_with_protobuf, shards, batches)
    print(f"\nRecordShards.read, 256 random records of 784 floats: {single:,.0f} records/s on 1 thread, "
          f"{four:,.0f} records/s from 4 threads; parsing 256 records: tf.io.parse_example {parse_example:,.0f} "
          f"records/s, protobuf {protobuf:,.0f} records/s")
    shards.close()


def _parse_rate(parse, shards: RecordShards, batches: list[np.ndarray]) -> float:
    serialized = [shards.read_serialized(indices) for indices in batches]
    parse(serialized[0])
    start = time.perf_counter()
    for records in serialized:
        parse(records)
    return len(serialized) * 256 / (time.perf_counter() - start)


def _parse_with_protobuf(records: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    examples = [tf.train.Example.FromString(record) for record in records]
    return (np.array([example.features.feature["features"].float_list.value for example in examples], np.float32),
            np.array([example.features.feature["labels"].int64_list.value[0] for example in examples], np.int32))


def test_the_page_cache_probe_follows_eviction_and_reads(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(np.random.default_rng(0).bytes(8 << 20))
    probe = PageCacheProbe([str(path)], refresh_every=1)
    assert probe.mostly_cached(0), "a file just written is in the page cache"
    evict([str(path)])
    if filesystem_type(str(tmp_path)) in IN_MEMORY_FILESYSTEMS:  # a tmpfs cannot evict: its files live in memory
        assert probe.mostly_cached(0)
        return
    assert not probe.mostly_cached(0), f"{path} is still cached after POSIX_FADV_DONTNEED"
    path.read_bytes()
    assert probe.mostly_cached(0)
    refreshed_every_4 = PageCacheProbe([str(path)], refresh_every=4)
    assert refreshed_every_4.mostly_cached(0)
    evict([str(path)])
    assert [refreshed_every_4.mostly_cached(0) for _ in range(3)] == [True, True, False]  # the 4th question samples
    path.read_bytes()
    refreshed_every_4.found_slow(0)
    assert [refreshed_every_4.mostly_cached(0) for _ in range(4)] == [False, False, False, True]


def test_the_probe_says_no_where_the_kernel_cannot_tell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(b"x" * 4096)

    def unsupported(*args: object) -> int:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "preadv", unsupported)  # a network or FUSE mount
    assert not PageCacheProbe([str(path)]).mostly_cached(0)
    monkeypatch.setattr(page_cache, "filesystem_type", lambda path: "tmpfs")  # tmpfs rejects RWF_NOWAIT too
    assert PageCacheProbe([str(path)]).mostly_cached(0)
    monkeypatch.delattr(os, "RWF_NOWAIT")  # not Linux
    assert not PageCacheProbe([str(path)]).mostly_cached(0)


class _Probe:
    """Stands in for PageCacheProbe: answers what the test says."""

    def __init__(self) -> None:
        self.cached = True

    def mostly_cached(self, index: int) -> bool:
        return self.cached

    def found_slow(self, index: int) -> None:
        self.cached = False


def _count_reads_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many records each call of `_read_one_at_a_time` reads, from now on."""
    one_at_a_time: list[int] = []
    read_one_at_a_time = RecordShards._read_one_at_a_time
    monkeypatch.setattr(RecordShards, "_read_one_at_a_time",
                        lambda shards, shard, local, **kwargs: one_at_a_time.append(len(local))
                        or read_one_at_a_time(shards, shard, local, **kwargs))
    return one_at_a_time


def test_with_spare_cores_few_records_of_a_big_shard_are_read_one_at_a_time_only_while_it_is_cached(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    features, labels = _arrays(3000)
    write_array_shards(features, labels, str(tmp_path), num_shards=1)
    monkeypatch.setattr(record_files, "BATCHED_READ_MIN_SHARE", 999)  # 3 records or fewer per call: one at a time
    one_at_a_time = _count_reads_one_at_a_time(monkeypatch)
    with RecordShards(str(tmp_path / "*.array_record"), features_key="features", labels_key="labels",
                      parallel_reads=True) as shards:
        shards._page_cache = probe = _Probe()
        indices = np.array([2999, 7, 1500])
        np.testing.assert_array_equal(shards.read(indices)[0], features[indices])
        np.testing.assert_array_equal(shards.read(np.arange(10))[1], labels[:10])
        assert one_at_a_time == [1, 1, 3], "the first record twice at open, then the 3 records; not the 10"
        probe.cached = False
        np.testing.assert_array_equal(shards.read(indices)[0], features[indices])  # batched: the disk is waited on
        assert one_at_a_time == [1, 1, 3]
        probe.cached = True
        monkeypatch.setattr(record_files, "SLOW_RECORD_SECONDS", 0.0)  # every read counts as slow
        shards.read(indices)
        assert one_at_a_time == [1, 1, 3, 3] and not probe.cached, "slow reads mark the shard as not cached"


def test_without_spare_cores_every_read_of_a_cached_shard_is_one_at_a_time(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU-only host the step needs every core: the read that costs the least CPU, whatever the call's size."""
    monkeypatch.setattr(record_files, "has_accelerators", lambda: False)
    features, labels = _arrays(300)
    write_array_shards(features, labels, str(tmp_path), num_shards=1)
    one_at_a_time = _count_reads_one_at_a_time(monkeypatch)
    with RecordShards(str(tmp_path / "*.array_record"), features_key="features", labels_key="labels") as shards:
        shards._page_cache = probe = _Probe()
        np.testing.assert_array_equal(shards.read(np.arange(300))[0], features)
        assert one_at_a_time == [1, 1, 300], "the first record twice at open, then all 300 in one call"
        probe.cached = False
        np.testing.assert_array_equal(shards.read(np.arange(300))[1], labels)  # batched: the disk is waited on
        assert one_at_a_time == [1, 1, 300]


def test_shards_of_record_groups_are_never_read_one_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A seek into a group of records decodes the whole group: the batched read decodes it once per call."""
    features, labels = _arrays(40)
    writer = ArrayRecordWriter(str(tmp_path / "grouped.array_record"), "group_size:16")
    for row, label in zip(features, labels):
        writer.write(_example(row, label))
    writer.close()
    monkeypatch.setattr(record_files, "BATCHED_READ_MIN_SHARE", 0)
    with RecordShards(str(tmp_path / "*.array_record"), features_key="features", labels_key="labels") as shards:
        assert shards._reads_one_at_a_time == [False]
        np.testing.assert_array_equal(shards.read(np.array([39, 0, 17]))[0], features[[39, 0, 17]])


# ---------------------------------------------------------------------------------------------
# Bad shards: one DataError naming the file (and record), at open or when first read
# ---------------------------------------------------------------------------------------------
def test_a_pattern_matching_nothing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"Config key 'data.eval_path' = '.*nothing-\*' matches no file") as raised:
        RecordShards(str(tmp_path / "nothing-*"), features_key="features", labels_key="labels",
                     key="data.eval_path")
    _one_paragraph(raised)


@pytest.mark.parametrize("case", ["missing", "two_sets", "a_copy"])
def test_a_glob_of_numbered_shards_must_not_miss_or_mix_members_of_a_set(tmp_path: Path, case: str) -> None:
    """A copy that missed a shard, a second set beside the first (an interrupted --overwrite), a stray copy of a
    shard: each would train on the wrong records without a word."""
    pattern, _, _ = _shards(tmp_path)  # data-0000{0..4}-of-00005.array_record
    shard = tmp_path / "data-00003-of-00005.array_record"
    set_name = re.escape(str(tmp_path / "data-NNNNN-of-NNNNN"))
    if case == "missing":
        shard.unlink()
        expected = rf"miss 1 of the 5 shards of the set '{set_name}.array_record' \(shard 3; the pattern would match"
    elif case == "two_sets":
        shard.rename(tmp_path / "data-00000-of-00001.array_record")
        expected = rf"hold 2 shard sets named '{set_name}.array_record' \(-of-00001, -of-00005\): expected one"
    else:
        (tmp_path / "data-00003-of-00005 (copy).array_record").write_bytes(shard.read_bytes())
        expected = rf"miss 4 of the 5 shards of the set '{set_name} \(copy\).array_record' \(shard 0, 1, 2, 4;"
    with pytest.raises(DataError, match=rf"The files matching '{re.escape(pattern)}' \(data.path\) {expected}"
                       ) as raised:
        RecordShards(pattern, features_key="features", labels_key="labels")
    _one_paragraph(raised)


def test_part_of_a_set_on_purpose_and_shards_named_otherwise_are_accepted(tmp_path: Path) -> None:
    _, features, _ = _shards(tmp_path / "a")  # 5 shards of 70, 70, 70, 70 and 20 records
    _shards(tmp_path / "b")
    for pattern, records in ((tmp_path / "a" / "data-0000[0-3]-of-00005.array_record", 280),  # a split by shard
                             (tmp_path / "a" / "data-00004-of-00005.array_record", 20),  # one shard
                             (tmp_path / "*" / "data-*.array_record", 2 * len(features))):  # two whole sets
        with RecordShards(str(pattern), features_key="features", labels_key="labels") as shards:
            assert shards.num_records == records, pattern
    for index, shard in enumerate(sorted((tmp_path / "a").glob("*.array_record"))):
        shard.rename(tmp_path / "a" / f"part-{index}.array_record")
    (tmp_path / "a" / "part-3.array_record").unlink()  # nothing says it belonged to a set
    with RecordShards(str(tmp_path / "a" / "part-*"), features_key="features", labels_key="labels") as shards:
        assert shards.num_records == len(features) - 70


@pytest.mark.parametrize("damage", ["truncated", "not_array_record", "empty", "tfrecord"])
def test_unreadable_shards_are_refused_at_open(tmp_path: Path, damage: str) -> None:
    pattern, _, _ = _shards(tmp_path)
    victim = tmp_path / "data-00002-of-00005.array_record"
    content = victim.read_bytes()
    if damage == "truncated":
        victim.write_bytes(content[: len(content) // 2])
    elif damage == "not_array_record":
        victim.write_bytes(b"features,labels\n" * 10_000)
    elif damage == "empty":
        victim.write_bytes(b"")
    else:
        with tf.io.TFRecordWriter(str(victim)) as writer:
            for _ in range(100):
                writer.write(_example(np.ones(6), 1))
    with pytest.raises(DataError, match=rf"Data file '{re.escape(str(victim))}' \(data.path\) is not a readable "
                                        "ArrayRecord file") as raised:
        RecordShards(pattern, features_key="features", labels_key="labels")
    _one_paragraph(raised)


def test_a_corrupted_record_is_named_when_first_read(tmp_path: Path, read_path: str) -> None:
    pattern, features, _ = _shards(tmp_path)
    victim = tmp_path / "data-00001-of-00005.array_record"  # global records 70..139
    content = bytearray(victim.read_bytes())
    payload = features[100].tobytes()  # incompressible floats are stored verbatim inside the record
    offset = content.find(payload)
    assert offset > 0
    content[offset + len(payload) // 2] ^= 0xFF
    victim.write_bytes(bytes(content))
    shards = RecordShards(pattern, features_key="features", labels_key="labels")  # first records are intact
    with pytest.raises(DataError, match=rf"Record 100 \(record 30 of shard '{re.escape(str(victim))}', data.path\) "
                                        "cannot be read: Corrupted") as raised:
        shards.read(np.array([5, 71, 100, 250]))
    _one_paragraph(raised)
    np.testing.assert_array_equal(shards.read(np.setdiff1d(np.arange(300), [100]))[0],
                                  np.delete(features, 100, axis=0))  # every other record still reads


def test_a_shard_truncated_after_open(tmp_path: Path, read_path: str) -> None:
    pattern, features, _ = _shards(tmp_path)
    shards = RecordShards(pattern, features_key="features", labels_key="labels")
    victim = tmp_path / "data-00003-of-00005.array_record"  # global records 210..279
    with victim.open("r+b") as handle:
        handle.truncate(1000)  # the records of this small shard lie in its first ~7 kB
    with pytest.raises(DataError, match=rf"Record 2\d\d \(record \d+ of shard '{re.escape(str(victim))}', data.path\) "
                                        r"(is empty: the file was truncated or replaced after it was opened \(it has "
                                        r"\d+ bytes now\)|cannot be read)") as raised:
        shards.read(np.arange(300))
    _one_paragraph(raised)
    np.testing.assert_array_equal(shards.read(np.arange(210))[0], features[:210])


BAD_RECORDS = {  # which record of 20 is replaced, by what (of its features and label), and the error expected
    "a_value_short": (13, lambda row, label: _example(row[:5], label),
                      r"Record 13 \(record 3 of shard '.*b.array_record', data.path\) does not match the layout of the "
                      r"first record \('features': 6 float32, 'labels': 1 int64\)"),
    "target_renamed": (17, lambda row, label: _example(row, label, labels_key="label"),
                       r"Record 17 \(record 7 of shard '.*b.array_record', data.path\) does not match .* 'labels'"),
    # ids are trained on as int32: 2**40 would wrap to 0 and pass every range check of the task
    "id_past_int32": (15, lambda row, label: _example(row, 2**40),
                      r"Record 15 \(record 5 of shard '.*b.array_record', data.path\) has target 1099511627776 in "
                      r"'labels'; expected a class or token id that fits in int32"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_a_bad_record_is_named_when_first_read(tmp_path: Path, read_path: str, case: str) -> None:
    bad, replacement, message = BAD_RECORDS[case]
    features, labels = _arrays(20)
    records = [_example(row, label) for row, label in zip(features, labels)]
    records[bad] = replacement(features[bad], labels[bad])
    _write_shard(tmp_path / "a.array_record", records[:10])
    _write_shard(tmp_path / "b.array_record", records[10:])
    shards = RecordShards(str(tmp_path / "*.array_record"), features_key="features", labels_key="labels")
    with pytest.raises(DataError, match=message) as raised:
        shards.read(np.array([0, bad, 11]))
    _one_paragraph(raised)
    np.testing.assert_array_equal(shards.read(np.arange(bad))[1], labels[:bad])  # the good ones still read


def test_layouts_checked_at_open(tmp_path: Path) -> None:
    features, labels = _arrays(10)
    _write_shard(tmp_path / "a.array_record", [_example(row, label) for row, label in zip(features, labels)])
    pattern = str(tmp_path / "*.array_record")
    with pytest.raises(DataError, match=r"has no feature 'pixels'; it has \['features', 'labels'\]") as raised:
        RecordShards(pattern, features_key="pixels", labels_key="labels")
    assert "a.array_record" in _one_paragraph(raised)
    with pytest.raises(DataError, match=r"'data.feature_shape' = \[4, 2\] holds 8 values but the records"):
        RecordShards(pattern, features_key="features", labels_key="labels", feature_shape=[4, 2])
    two_ids = tf.train.Example()
    two_ids.features.feature["features"].float_list.value.extend([1.0, 2.0])
    two_ids.features.feature["labels"].int64_list.value.extend([3, 4])
    _write_shard(tmp_path / "two_ids.records", [two_ids.SerializeToString()])
    with pytest.raises(DataError, match=r"feature 'labels' holds 2 int64 values; expected one int64 or one or more "
                                        "floats"):
        RecordShards(str(tmp_path / "two_ids.records"), features_key="features", labels_key="labels")
    _write_shard(tmp_path / "b.array_record", [_example(np.ones(9), 1)])  # another data set's shard
    with pytest.raises(DataError, match=r"Record 10 \(record 0 of shard '.*b.array_record'.*does not match"):
        RecordShards(pattern, features_key="features", labels_key="labels")
    (tmp_path / "b.array_record").unlink()
    _write_shard(tmp_path / "b.array_record", [b"not an example"])
    with pytest.raises(DataError, match=r"Record 10 .*b.array_record"):
        RecordShards(pattern, features_key="features", labels_key="labels")


# ---------------------------------------------------------------------------------------------
# The converter: refusals, bad input, and the command line
# ---------------------------------------------------------------------------------------------
def test_existing_shards_are_kept_unless_overwrite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replaced only once the new shards are on disk (fsynced under their temporary names, then the directory
    after the old shards' removal and again after the renames): a power loss after the conversion said it was
    done cannot leave empty shards."""
    _shards(tmp_path / "out")  # 5 shards
    fsynced: list[tuple[str, list[str]]] = []  # (path, the directory's names at that moment)
    real_fsync = os.fsync

    def recording_fsync(descriptor: int) -> None:
        fsynced.append((os.readlink(f"/proc/self/fd/{descriptor}"), sorted(os.listdir(tmp_path / "out"))))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    before = {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir()}
    features, labels = _arrays(10)
    with pytest.raises(DataError, match="already holds 5 shards"):
        write_array_shards(features, labels, str(tmp_path / "out"), num_shards=2)
    assert {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir()} == before
    assert fsynced == []
    write_array_shards(features, labels, str(tmp_path / "out"), num_shards=2, overwrite=True)
    new_shards = ["data-00000-of-00002.array_record", "data-00001-of-00002.array_record"]
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == new_shards
    partial = [f".partial-0000{shard}.array_record" for shard in range(2)]
    assert [(os.path.basename(path), names[:2]) for path, names in fsynced[:2]] == [(name, partial) for name in partial]
    directory = os.path.realpath(tmp_path / "out")  # the old shards removed, then the new ones renamed
    assert fsynced[2:] == [(directory, partial), (directory, new_shards)]


def test_an_interrupted_overwrite_leaves_a_set_that_training_refuses(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Same shard count before and after: had old and new shards been left side by side, nothing could tell them
    from one set, and training would read a mix of two data sets without a word."""
    pattern = str(tmp_path / "data-*.array_record")
    write_array_shards(*_arrays(10), str(tmp_path), num_shards=2)
    renamed: list[str] = []
    real_rename = tf.io.gfile.rename

    def rename_then_die(source: str, target: str, overwrite: bool = False) -> None:
        if renamed:
            raise KeyboardInterrupt  # the process dies between two renames
        real_rename(source, target, overwrite)
        renamed.append(target)

    monkeypatch.setattr(tf.io.gfile, "rename", rename_then_die)
    features, labels = _arrays(10)
    with pytest.raises(KeyboardInterrupt):
        write_array_shards(features + 1, labels, str(tmp_path), num_shards=2, overwrite=True)
    assert sorted(path.name for path in tmp_path.glob("data-*")) == ["data-00000-of-00002.array_record"]
    with pytest.raises(DataError, match=r"miss 1 of the 2 shards of the set .*\(shard 1; the pattern would match"):
        RecordShards(pattern, features_key="features", labels_key="labels")
    monkeypatch.setattr(tf.io.gfile, "rename", real_rename)  # the rerun: one shard now, stale temporaries cleared
    (tmp_path / ".partial-00007.array_record").write_bytes(b"left by an older conversion")
    write_array_shards(features + 1, labels, str(tmp_path), num_shards=1, overwrite=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data-00000-of-00001.array_record"]
    with RecordShards(pattern, features_key="features", labels_key="labels") as shards:
        assert shards.num_records == 10


def test_an_unwritable_output_directory(tmp_path: Path) -> None:
    from tests.test_shared_filesystem import tiny_filesystem

    features, labels = _arrays(2000, (784,))  # 6 MB of records
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(DataError, match=r"Output directory '.*file/out' cannot be created"):
        write_array_shards(features, labels, str(tmp_path / "file" / "out"))
    with tiny_filesystem(tmp_path / "small", size="1m") as small:
        with pytest.raises(DataError, match=rf"Shards cannot be written to '{small}' \(.*No space left") as raised:
            write_array_shards(features, labels, str(small), records_per_shard=500)
        _one_paragraph(raised)
        assert list(small.iterdir()) == []  # the partial shards were removed


def test_bad_tfrecord_input_leaves_no_shards(tmp_path: Path) -> None:
    features, labels = _arrays(3000)
    records = [_example(row, label) for row, label in zip(features, labels)]
    records[2500] = _example(features[2500][:3], labels[2500])
    with tf.io.TFRecordWriter(str(tmp_path / "mixed.tfrecord")) as writer:
        for record in records:
            writer.write(record)
    with pytest.raises(DataError, match=r"^Record 2500 of '.*mixed.tfrecord' does not match the layout"):
        convert_to_array_record(str(tmp_path / "mixed.tfrecord"), str(tmp_path / "out"), records_per_shard=1000)
    assert list((tmp_path / "out").iterdir()) == []  # the two finished shards were removed too
    content = (tmp_path / "mixed.tfrecord").read_bytes()
    (tmp_path / "cut").mkdir()
    with tf.io.TFRecordWriter(str(tmp_path / "cut" / "a.tfrecord")) as writer:  # a good file first
        for record in records[:1000]:
            writer.write(record)
    (tmp_path / "cut" / "b.tfrecord").write_bytes(content[: len(content) // 2])
    ends = np.cumsum([len(record) + 16 for record in records])  # TFRecord framing: length, CRC, data, CRC
    complete = int(np.searchsorted(ends, len(content) // 2, side="right"))  # the first record cut short
    with pytest.raises(DataError, match=rf"^Record {complete} of '.*cut/b.tfrecord' cannot be read \(.*\): the "
                                        "file is truncated or corrupted"):
        convert_to_array_record(str(tmp_path / "cut" / "*.tfrecord"), str(tmp_path / "out"))
    (tmp_path / "text.tfrecord").write_text("not records\n" * 10)
    with pytest.raises(DataError, match=r"are not readable TFRecord files"):
        convert_to_array_record(str(tmp_path / "text.tfrecord"), str(tmp_path / "out"))
    with pytest.raises(DataError, match=r"matches no file"):
        convert_to_array_record(str(tmp_path / "none-*.tfrecord"), str(tmp_path / "out"))


BAD_NPZ = {
    "text": (b"features,labels\n1,2\n", "is not a .npz archive"),
    "wrong_key": ({"features": np.ones((4, 2)), "y": np.zeros(4)},
                  r"has no array 'labels'; it holds \['features', 'y'\]"),
    "lengths": ({"features": np.ones((4, 2)), "labels": np.zeros(3, int)}, r"labels have shape \(3,\)"),
    "flat_features": ({"features": np.ones(4), "labels": np.zeros(4, int)}, r"features have shape \(4,\)"),
    "text_features": ({"features": np.array([["a"]] * 4), "labels": np.zeros(4, int)}, "dtype <U1"),
    "several_int_labels": ({"features": np.ones((4, 2)), "labels": np.zeros((4, 2), int)},
                           "one class id or token per example"),
}


@pytest.mark.parametrize("case", sorted(BAD_NPZ))
def test_bad_npz_input(tmp_path: Path, case: str) -> None:
    content, message = BAD_NPZ[case]
    path = tmp_path / "in.npz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        np.savez(path, **content)
    with pytest.raises(DataError, match=message) as raised:
        convert_to_array_record(str(path), str(tmp_path / "out"))
    assert str(path) in _one_paragraph(raised)


def test_truncated_and_compressed_npz(tmp_path: Path) -> None:
    features, labels = _arrays(3000)
    np.savez_compressed(tmp_path / "packed.npz", features=features, labels=labels)
    convert_to_array_record(str(tmp_path / "packed.npz"), str(tmp_path / "out"))
    with RecordShards(str(tmp_path / "out" / "*"), features_key="features", labels_key="labels") as shards:
        np.testing.assert_array_equal(shards.read(np.arange(3000))[0], features)
    np.savez(tmp_path / "whole.npz", features=features, labels=labels)
    content = (tmp_path / "whole.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(content[: len(content) // 2])
    with pytest.raises(DataError, match=r"cut\.npz"):
        convert_to_array_record(str(tmp_path / "cut.npz"), str(tmp_path / "out2"))


def test_command_line(tmp_path: Path) -> None:
    features, labels = _arrays(250, (2, 2))
    np.savez(tmp_path / "train.npz", features=features, labels=labels)
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts" / "convert_to_array_record.py"),
                             str(tmp_path / "train.npz"), str(tmp_path / "out"), "--records-per-shard", "100"],
                            capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert result.returncode == 0, result.stderr
    assert f"wrote 250 records to 3 shards in {tmp_path / 'out'}" in result.stdout
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        f"data-0000{shard}-of-00003.array_record" for shard in range(3)]
    assert "250/250" in result.stderr  # the progress bar


def test_command_line_refusal_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    from harness.errors import exit_code_of

    spec = importlib.util.spec_from_file_location("convert", PROJECT_ROOT / "scripts" / "convert_to_array_record.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert exit_code_of(script.main, [str(tmp_path / "missing.npz"), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: Input '") and "no such file" in error and error.count("\n") == 1


def test_npz_conversion_streams(tmp_path: Path) -> None:
    """A 48 MB archive converts with a fraction of that allocated at once (numpy reports to tracemalloc)."""
    import tracemalloc

    features, labels = _arrays(12_000, (1000,))
    np.savez(tmp_path / "big.npz", features=features, labels=labels)
    del features, labels
    tracemalloc.start()
    try:
        convert_to_array_record(str(tmp_path / "big.npz"), str(tmp_path / "out"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20e6, f"peak {peak / 1e6:.0f} MB"


def test_float_class_ids_on_request(tmp_path: Path) -> None:
    features, labels = _arrays(1500)
    np.savez(tmp_path / "in.npz", features=features, labels=(labels % 7).astype(np.float64)[:, None])
    convert_to_array_record(str(tmp_path / "in.npz"), str(tmp_path / "ids"), class_ids=True)
    with RecordShards(str(tmp_path / "ids" / "*"), features_key="features", labels_key="labels") as shards:
        assert (shards.target_dtype, shards.target_shape) == (np.int32, ())
        np.testing.assert_array_equal(shards.read(np.arange(1500))[1], labels % 7)
    fractional = (labels % 7).astype(np.float64)
    fractional[1300] = 2.5
    np.savez(tmp_path / "bad.npz", features=features, labels=fractional)
    with pytest.raises(DataError, match=r"label 2.5 of row 1300 is not a whole number"):
        convert_to_array_record(str(tmp_path / "bad.npz"), str(tmp_path / "bad"), class_ids=True)
    assert list((tmp_path / "bad").iterdir()) == []
