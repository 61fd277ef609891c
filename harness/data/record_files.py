"""Random access by index over ArrayRecord shards of `tf.train.Example`s, never loading the data set.

Owns: opening a glob of ArrayRecord shards, checking them at start-up, mapping a global record
index to (shard, local index), and reading a batch of records by index into numpy arrays (records laid
out like the first one are decoded at fixed byte offsets by numpy, any other by `tf.io.parse_example`). The
records have the layout of `data=tfrecord` (see `ExampleLayout`): a fixed-length float or int64
feature `features_key` and a target `labels_key` that is one int64 (a class id or a token) or one or
more floats (regression targets).

Guarantees: every user-fixable problem is one `DataError` paragraph naming the file, the record
index where known and what was expected: a pattern matching no file; a file that is not an
ArrayRecord file, or is truncated (checked when opened: the footer and index are read and so is
each shard's first record); a record that cannot be read or parsed, differs from the first record's
layout, or holds an int64 target that does not fit the int32 it is trained as, when it is first read
mid-run (naming the shard, the global and the local index).
array-record 0.8.6 reports all of these as Python exceptions (checked: truncated, zeroed, bit-flipped,
empty, TFRecord and directory inputs), never by aborting the process.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import os
import posixpath
import re
import resource
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
from array_record.python.array_record_module import ArrayRecordReader

from harness.data.page_cache import PageCacheProbe
from harness.errors import DataError, error_summary
from harness.host import has_accelerators

# Random access: no readahead around a record, no sequential read-ahead on a thread pool (batched reads use
# array-record's own pool whatever these say).
READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"
# Each random read fills this buffer from the file: one page, not 1 MiB around the record. Larger records
# are read past it directly. Measured on 3 KB records: 22 % less CPU per batch than Grain's 32 KiB
# (docs/benchmarks.md, section 6); the same for 48 KB records, slightly less for 300 B ones.
READER_BUFFER_BYTES = 4096
# Two ways to read a shard. array-record's batched `read(indices)` runs outside the GIL on its own thread pool,
# with many reads in flight; `seek` + `read` reads one record at a time, inline, holding the GIL. Per batch of 256
# random 3 KB records from the page cache the batched read costs 1.6-2.1 ms of CPU, one at a time 0.8 ms (less at
# every record size measured, 300 B to 200 KB: docs/benchmarks.md, section 6). So where the training step needs
# every core (a CPU-only host) records are read one at a time, the read that leaves the step the most CPU (+14-15 %
# steps/s on the benchmark's MLP); where accelerators run the step and the host's cores are spare, batched, which
# spreads over them (one at a time, one process reads at most one core's worth: ~300 000 3 KB records/s here).
# Also the batched read allocates and scans one slot per record of the shard on every call
# (`ParallelReadRecordsWithIndices`): O(shard size) per call however few records it asks for. A batch of 256 random
# records of an 8 GB set (27 shards of ~97 000 records) cost 15-22 ms of CPU that way, and 1.5-1.9 ms read one at a
# time (O(1) per record). So even with spare cores a call reads one record at a time unless it asks for at least 1
# in BATCHED_READ_MIN_SHARE of its shard's records: then the scan costs at most ~3 µs per record.
BATCHED_READ_MIN_SHARE = 1024
# But `seek` + `read` waits for the disk holding the GIL, one record at a time, where the batched read keeps
# many reads in flight (cold 8 GB set: 29-33 against 54-67 MB/s). So records are read one at a time only
# from shards whose pages are in the page cache (sampled, see PageCacheProbe), and a shard whose records
# take longer than this each (~6-8 µs when cached) counts as not cached until it is sampled again.
SLOW_RECORD_SECONDS = 200e-6
DECODE_RECORDS = 256  # see RecordShards._decode
# `data-00003-of-00027.array_record`: shard 3 of a set of 27 (see RecordShards._check_one_complete_set)
_SHARD_NUMBERING = re.compile(r"-(\d{5})-of-(\d{5})(?!\d)")


def expected_records(features_key: str, labels_key: str) -> str:
    """What a record must hold: the tail of every layout error."""
    return (f"tf.train.Example records, each with a feature '{features_key}' of a fixed number of float or int64 "
            f"values and a feature '{labels_key}' holding one int64 (a class id or token) or a fixed number of "
            "floats (regression targets)")


@dataclass(frozen=True)
class ExampleLayout:
    """The layout every record must share, read off the first one.

    `feature_length` values of `feature_dtype` (tf.float32 or tf.int64) under `features_key`;
    `target_length` values of `target_dtype` (one tf.int64, or floats) under `labels_key`.
    """

    features_key: str
    labels_key: str
    feature_length: int
    feature_dtype: tf.DType
    target_length: int
    target_dtype: tf.DType

    @classmethod
    def of_record(cls, record: bytes, *, features_key: str, labels_key: str, where: str) -> ExampleLayout:
        """The layout of one serialized record, or a `DataError` beginning with `where`."""
        from google.protobuf.message import DecodeError

        expected = expected_records(features_key, labels_key)
        try:
            example = tf.train.Example.FromString(record)
        except DecodeError:
            raise DataError(f"{where} is not a tf.train.Example. Expected {expected}.") from None
        available = sorted(example.features.feature)
        for name in (features_key, labels_key):
            if name not in example.features.feature:
                raise DataError(f"{where} has no feature '{name}'; it has {available}. Expected {expected}; set "
                                "data.features_key / data.labels_key to the names in the file.")
        feature = example.features.feature[features_key]
        kind = feature.WhichOneof("kind")
        if kind not in ("float_list", "int64_list") or not getattr(feature, kind).value:
            raise DataError(f"{where}: feature '{features_key}' holds {kind or 'nothing'}; expected float or int64 "
                            f"values (decode images to numbers when writing the records). Expected {expected}.")
        target = example.features.feature[labels_key]
        target_kind = target.WhichOneof("kind")
        target_length = len(getattr(target, target_kind).value) if target_kind else 0
        one_id = target_kind == "int64_list" and target_length == 1
        if not (one_id or (target_kind == "float_list" and target_length)):
            raise DataError(f"{where}: feature '{labels_key}' holds {target_length} "
                            f"{(target_kind or 'empty').replace('_list', '')} values; expected one int64 or one or "
                            f"more floats. Expected {expected}.")
        return cls(features_key, labels_key, len(getattr(feature, kind).value),
                   tf.float32 if kind == "float_list" else tf.int64, target_length,
                   tf.float32 if target_kind == "float_list" else tf.int64)

    @property
    def parsing_spec(self) -> dict[str, tf.io.FixedLenFeature]:
        """The `tf.io.parse_example` spec of a batch of records (a scalar target when it holds one value)."""
        target_shape = [] if self.target_length == 1 else [self.target_length]
        return {self.features_key: tf.io.FixedLenFeature([self.feature_length], self.feature_dtype),
                self.labels_key: tf.io.FixedLenFeature(target_shape, self.target_dtype)}

    def describe(self) -> str:
        return (f"'{self.features_key}': {self.feature_length} {self.feature_dtype.name}, "
                f"'{self.labels_key}': {self.target_length} {self.target_dtype.name}")


class FixedOffsets:
    """Decodes a batch of records without protobuf parsing when they are laid out like a template.

    Records written by one writer with a fixed-length float feature (every record this project's
    converter writes, and most written with `tf.train.Example.SerializeToString`) are byte-identical
    except for their values: the packed floats lie at the same offsets in every record, and a one-id
    target is a varint of the same width. `of_record` finds those offsets in a record (a walk of its
    protobuf wire format) and keeps every other byte as the template; `decode` then checks each
    record of a batch against the template in a few vectorized comparisons (length, every byte
    outside the values, a well-formed varint) and copies the values out with numpy, no Python per
    record. Any record that differs in anything but its values is left for `tf.io.parse_example`:
    what `decode` returns is always what parsing would return.
    """

    def __init__(self, template: bytes, features: tuple[int, int], target: tuple[int, int], *,
                 target_varint: bool) -> None:
        self.length = len(template)
        self.features, self.target, self.target_varint = features, target, target_varint
        outside = np.ones(self.length, dtype=bool)
        outside[slice(*features)] = outside[slice(*target)] = False
        self._fixed_positions = np.flatnonzero(outside)
        self._fixed_bytes = np.frombuffer(template, dtype=np.uint8)[self._fixed_positions]

    @classmethod
    def of_record(cls, record: bytes, layout: ExampleLayout) -> FixedOffsets | None:
        """The offsets of `record` (which has `layout`), or None unless its features are packed floats and its
        target is packed floats or one int64 (then records are decoded by `tf.io.parse_example` only)."""
        if layout.feature_dtype != tf.float32:
            return None
        spans = _packed_value_spans(record)
        if spans is None or layout.features_key not in spans or layout.labels_key not in spans:
            return None
        (feature_kind, *features), (target_kind, *target) = spans[layout.features_key], spans[layout.labels_key]
        if feature_kind != "float_list" or features[1] - features[0] != 4 * layout.feature_length:
            return None
        if target_kind == "float_list" and target[1] - target[0] == 4 * layout.target_length:
            return cls(record, tuple(features), tuple(target), target_varint=False)
        if target_kind == "int64_list" and layout.target_length == 1 and target[1] > target[0]:
            return cls(record, tuple(features), tuple(target), target_varint=True)
        return None

    def decode(self, records: list[bytes], features: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Writes the values of the records that match the template into rows of `features` (float32
        (n, feature_length)) and `targets` (float32 or int64 (n, target_length)); returns the positions of
        the others (which may still be valid records, e.g. with a target of another varint width)."""
        lengths = np.fromiter(map(len, records), dtype=np.int64, count=len(records))
        candidates = np.flatnonzero(lengths == self.length)
        if not len(candidates):
            return np.arange(len(records))
        chosen = records if len(candidates) == len(records) else [records[i] for i in candidates.tolist()]
        rows = np.frombuffer(b"".join(chosen), dtype=np.uint8).reshape(len(candidates), self.length)
        same = (rows[:, self._fixed_positions] == self._fixed_bytes).all(axis=1)
        target_bytes = rows[:, slice(*self.target)]
        if self.target_varint:  # continuation bit on every byte but the last; at most 64 bits
            same &= (target_bytes[:, :-1] >= 0x80).all(axis=1) & (target_bytes[:, -1] < 0x80)
            if target_bytes.shape[1] == 10:
                same &= target_bytes[:, -1] <= 1
        if not same.all():
            candidates, rows, target_bytes = candidates[same], rows[same], target_bytes[same]
        if self.target_varint:
            value = np.zeros(len(candidates), dtype=np.uint64)
            for byte in range(target_bytes.shape[1]):
                value |= (target_bytes[:, byte] & 0x7F).astype(np.uint64) << np.uint64(7 * byte)
            target_values = value.view(np.int64).reshape(-1, 1)
        else:
            target_values = target_bytes.view("<f4")
        feature_values = rows[:, slice(*self.features)].view("<f4")  # one copy: into `features` below
        if len(candidates) == len(records):
            features[...], targets[...] = feature_values, target_values
            return candidates[:0]
        features[candidates], targets[candidates] = feature_values, target_values
        return np.setdiff1d(np.arange(len(records)), candidates, assume_unique=True)


def _packed_value_spans(record: bytes) -> dict[str, tuple[str, int, int]] | None:
    """For a serialized `tf.train.Example`: per feature name, its kind ('float_list', 'int64_list', ...) and the
    [start, end) byte offsets of its packed values; None if the record is not laid out that simply (a field
    repeated or unknown, unpacked values, a malformed record)."""
    try:
        example = _fields(record, 0, len(record))
        if [number for number, *_ in example] != [1]:  # Example: one `features` message
            return None
        spans: dict[str, tuple[str, int, int]] = {}
        for number, start, end in _fields(record, example[0][1], example[0][2]):  # Features: map entries
            entry = _fields(record, start, end) if number == 1 else None
            if not entry or [field for field, *_ in entry] != [1, 2]:
                return None
            key = record[entry[0][1]:entry[0][2]].decode()
            feature = _fields(record, entry[1][1], entry[1][2])  # Feature: one of bytes/float/int64 list
            if key in spans or len(feature) != 1 or feature[0][0] not in (2, 3):
                return None
            values = _fields(record, feature[0][1], feature[0][2])  # FloatList/Int64List: packed field 1
            if [number for number, *_ in values] != [1]:
                return None
            spans[key] = ("float_list" if feature[0][0] == 2 else "int64_list", values[0][1], values[0][2])
        return spans
    except (ValueError, UnicodeDecodeError):
        return None


def _fields(buffer: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field in buffer[start:end]; ValueError for any other
    wire type or a field running past `end`."""
    fields = []
    position = start
    while position < end:
        tag, position = _varint_at(buffer, position, end)
        length, position = _varint_at(buffer, position, end)
        if tag & 7 != 2 or position + length > end:
            raise ValueError("not a length-delimited field")
        fields.append((tag >> 3, position, position + length))
        position += length
    return fields


def _varint_at(buffer: bytes, position: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while position < end and shift < 64:
        byte = buffer[position]
        value |= (byte & 0x7F) << shift
        position, shift = position + 1, shift + 7
        if byte < 0x80:
            return value, position
    raise ValueError("malformed varint")


class RecordShards:
    """Read-only random access to the records of every ArrayRecord shard matching a glob pattern.

    Global record indices run through the shards in sorted file-name order (`files`): shard s holds
    `shard_sizes[s]` records starting at global index `shard_starts[s]`; `num_records` in all.
    Opening reads each shard's footer and index (8 bytes per record, twice for a shard also read
    record by record) and its first record; nothing else is held in memory. Every record shares the
    first one's `layout`; `read` returns features float32 (n, *feature_shape) and targets
    (n, *target_shape) of `target_dtype` (int32 for an int64 class id or token, float32 for float
    targets; target_shape is () for one value, (k,) for k).
    Records of a shard in the page cache are read one by one with `seek` + `read` (the least CPU; O(1)
    each, holding the GIL), unless `parallel_reads` (default: when the host has accelerators, so its
    cores are spare) and the call asks for many of the shard's records (see BATCHED_READ_MIN_SHARE).
    Those, and any from a shard that is not cached or is written in groups of records, take
    array-record's batched read, which scans the whole shard's index but runs outside the GIL with
    many reads in flight on array-record's thread pool.
    `read` and `read_serialized` may be called from many threads at once (e.g. tf.data map calls).
    In a tf.data graph, `read_serialized` in a `tf.numpy_function` followed by
    `tf.io.parse_example(..., parsing_spec)` parses outside the GIL. Call `close` once no read is in
    progress.
    """

    def __init__(self, pattern: str, *, features_key: str, labels_key: str,
                 feature_shape: Sequence[int] | None = None, key: str = "data.path",
                 parallel_reads: bool | None = None) -> None:
        self.pattern, self.key = pattern, key
        self.parallel_reads = has_accelerators() if parallel_reads is None else parallel_reads
        self._expected = expected_records(features_key, labels_key)
        self.files: list[str] = sorted(tf.io.gfile.glob(pattern))
        if not self.files:
            raise DataError(f"Config key '{key}' = '{pattern}' matches no file. Expected ArrayRecord shards of "
                            f"{self._expected} (scripts/convert_to_array_record.py writes them).")
        self._check_one_complete_set()
        self._readers: list[ArrayRecordReader] = []
        # Per shard, a second reader for `seek` + `read` (opened with the main one, see `_open_and_check`):
        # array-record readers are thread compatible, not thread-safe, so the batched reads (const) must not
        # share one with seeks; and one thread at a time seeks and reads it.
        self._seekable: list[ArrayRecordReader | None] = []
        self._seeking: list[threading.Lock] = []
        self._page_cache = PageCacheProbe(self.files)
        self._closed = threading.Event()
        try:
            self._open_and_check(features_key, labels_key, feature_shape)
        except BaseException:
            self.close()
            raise

    def _check_one_complete_set(self) -> None:
        """Shards named `...-<index>-of-<count>...` (this project's converter, TFDS, Beam) that the pattern selects
        must not miss or mix members of their set: a copy that missed a shard, a second set beside the first (an
        interrupted `--overwrite`, two conversions into one directory) or a stray copy of a shard would otherwise
        train on the wrong records without a word. A pattern that selects part of a set on purpose (a range, one
        shard) is fine: a shard counts as missing only if the pattern would match its name. Other names: no check."""
        sets: dict[tuple[str, str, str], list[tuple[int, int]]] = {}  # (directory, prefix, suffix) -> members
        for path in self.files:
            directory, name = posixpath.split(path)
            numbering = _SHARD_NUMBERING.search(name)
            if numbering is not None:
                key = (directory, name[:numbering.start()], name[numbering.end():])
                sets.setdefault(key, []).append((int(numbering.group(1)), int(numbering.group(2))))
        for (directory, prefix, suffix), members in sets.items():
            set_name = posixpath.join(directory, f"{prefix}-NNNNN-of-NNNNN{suffix}")
            counts = sorted({count for _, count in members})
            if len(counts) > 1:
                raise DataError(
                    f"The files matching '{self.pattern}' ({self.key}) hold {len(counts)} shard sets named "
                    f"'{set_name}' ({', '.join(f'-of-{count:05d}' for count in counts)}): expected one. Remove the "
                    "other set (e.g. left by an earlier conversion into the same directory), or narrow the pattern.")
            present = {index for index, _ in members}
            missing = [index for index in range(counts[0]) if index not in present and fnmatch.fnmatchcase(
                posixpath.join(directory, f"{prefix}-{index:05d}-of-{counts[0]:05d}{suffix}"), self.pattern)]
            if missing:
                raise DataError(
                    f"The files matching '{self.pattern}' ({self.key}) miss {len(missing)} of the {counts[0]} shards "
                    f"of the set '{set_name}' (shard {_few(missing)}; the pattern would match their names). Expected "
                    "every shard of a set the pattern selects: a copy of the shards may be unfinished, or a stray "
                    "file (e.g. a copy of one shard) matches the pattern.")

    def _open_and_check(self, features_key: str, labels_key: str, feature_shape: Sequence[int] | None) -> None:
        _allow_open_files(2 * len(self.files))
        for path in self.files:
            self._readers.append(self._open(path))
            self._seeking.append(threading.Lock())
        self.shard_sizes = np.array([reader.num_records() for reader in self._readers], dtype=np.int64)
        # Opened now, on the files the main readers opened (not whatever is at the path later). Only for shards
        # of one record per chunk: with bigger groups every seek would decode a whole group, holding the GIL.
        smallest_read_one_at_a_time = BATCHED_READ_MIN_SHARE if self.parallel_reads else 0
        self._seekable = [self._open(path) if size > smallest_read_one_at_a_time and _one_record_per_chunk(reader)
                          else None for path, size, reader in zip(self.files, self.shard_sizes, self._readers)]
        self._reads_one_at_a_time = [reader is not None for reader in self._seekable]
        # shard_starts[s] is the global index of shard s's first record; the last entry is the total.
        self.shard_starts = np.concatenate([[0], np.cumsum(self.shard_sizes)])
        self.num_records = int(self.shard_starts[-1])
        if not self.num_records:
            raise DataError(f"The ArrayRecord files '{self.pattern}' ({self.key}) hold no records. "
                            f"Expected {self._expected}.")
        first_shard = int(np.flatnonzero(self.shard_sizes)[0])
        first_record = self._read_shard(first_shard, [0], first_index=int(self.shard_starts[first_shard]))[0]
        self.layout = ExampleLayout.of_record(first_record, features_key=features_key, labels_key=labels_key,
                                              where=f"The first record of '{self.files[first_shard]}' ({self.key})")
        self._offsets = FixedOffsets.of_record(first_record, self.layout)
        self.feature_shape: tuple[int, ...] = self._checked_feature_shape(feature_shape)
        self.target_shape: tuple[int, ...] = () if self.layout.target_length == 1 else (self.layout.target_length,)
        self.target_dtype = np.dtype(np.int32 if self.layout.target_dtype == tf.int64 else np.float32)
        self.read(self.shard_starts[:-1][self.shard_sizes > 0])  # another data set's shard fails now, not mid-run

    def _open(self, path: str) -> ArrayRecordReader:
        reader = ArrayRecordReader(path, READER_OPTIONS, file_reader_buffer_size=READER_BUFFER_BYTES)
        if reader.ok():
            return reader
        try:  # a reader that failed to open reports why only when asked to read
            reader.read([0])
            reason = "it cannot be opened"
        except (RuntimeError, IndexError) as error:
            reason = error_summary(error)
        if "Too many open files" in reason:
            with contextlib.suppress(RuntimeError):
                reader.close()
            raise DataError(f"Data file '{path}' ({self.key}) cannot be opened: too many open files (the limit is "
                            f"{resource.getrlimit(resource.RLIMIT_NOFILE)[0]}; {len(self.files)} shards take two "
                            "each). Raise the limit (`ulimit -n`) or write fewer, larger shards.")
        with contextlib.suppress(RuntimeError):  # closing a failed reader raises its error again
            reader.close()
        raise DataError(f"Data file '{path}' ({self.key}) is not a readable ArrayRecord file: {reason}. It may be "
                        f"truncated, corrupted or in another format. Expected an ArrayRecord shard of "
                        f"{self._expected} (scripts/convert_to_array_record.py writes them).")

    def _checked_feature_shape(self, feature_shape: Sequence[int] | None) -> tuple[int, ...]:
        if feature_shape is None:
            return (self.layout.feature_length,)
        if math.prod(feature_shape) != self.layout.feature_length or min(feature_shape, default=0) < 1:
            raise DataError(f"Config key 'data.feature_shape' = {list(feature_shape)} holds "
                            f"{math.prod(feature_shape)} values but the records of '{self.pattern}' ({self.key}) "
                            f"have {self.layout.feature_length}: expected positive sizes whose product is "
                            f"{self.layout.feature_length}.")
        return tuple(int(size) for size in feature_shape)

    @property
    def parsing_spec(self) -> dict[str, tf.io.FixedLenFeature]:
        """For parsing `read_serialized` output inside a tf.data graph instead of calling `read`."""
        return self.layout.parsing_spec

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The records at global `indices` (any order, repeats allowed), in that order.

        Returns features float32 (n, *feature_shape) and targets (n, *target_shape) of `target_dtype`.
        A record that cannot be read or parsed raises `DataError` naming its shard and indices.
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        serialized = self.read_serialized(indices)
        count, layout = len(indices), self.layout
        features = np.empty((count, layout.feature_length), dtype=np.float32)
        targets = np.empty((count, layout.target_length), dtype=layout.target_dtype.as_numpy_dtype)
        # Records laid out like the first one are decoded by numpy; any other is parsed (and checked) by TF.
        to_parse = self._decode(serialized, features, targets) if self._offsets else np.arange(count)
        if len(to_parse):
            records = [serialized[position] for position in to_parse.tolist()]
            try:
                parsed = tf.io.parse_example(tf.constant(records, dtype=tf.string), layout.parsing_spec)
            except tf.errors.InvalidArgumentError as error:
                raise self._layout_error(indices[to_parse], records, error) from None
            features[to_parse] = parsed[layout.features_key].numpy()
            targets[to_parse] = parsed[layout.labels_key].numpy().reshape(len(to_parse), -1)
        fits = _fits_int32(targets) if self.target_dtype == np.int32 else None
        if fits is not None and not fits.all():
            position = int(np.flatnonzero(~fits)[0])
            raise DataError(f"{self.describe_record(int(indices[position]))} has target "
                            f"{targets[position, 0]} in '{layout.labels_key}'; expected a class or token id that fits "
                            f"in int32 (as it is trained on). Expected {self._expected}.")
        return (features.reshape((count, *self.feature_shape)),
                targets.reshape((count, *self.target_shape)).astype(self.target_dtype, copy=False))

    def _decode(self, serialized: list[bytes], features: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """`FixedOffsets.decode` of DECODE_RECORDS records at a time: the bytes of a slice stay in the CPU's cache,
        and its scratch buffers are reused rather than mapped afresh (which costs ~10x for 2048 records)."""
        not_decoded = [start + self._offsets.decode(serialized[start:start + DECODE_RECORDS],
                                                    features[start:start + DECODE_RECORDS],
                                                    targets[start:start + DECODE_RECORDS])
                       for start in range(0, len(serialized), DECODE_RECORDS)]
        return np.concatenate(not_decoded) if not_decoded else np.arange(0)

    def read_serialized(self, indices: np.ndarray) -> list[bytes]:
        """The serialized `tf.train.Example`s at global `indices`, in that order; one read call per shard touched."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if self._closed.is_set():
            raise ValueError(f"RecordShards('{self.pattern}') is closed")
        if len(indices) and (indices.min() < 0 or indices.max() >= self.num_records):
            raise IndexError(f"record indices span [{indices.min()}, {indices.max()}] but '{self.pattern}' holds "
                             f"{self.num_records} records")
        shards = np.searchsorted(self.shard_starts, indices, side="right") - 1
        records: list[bytes] = [b""] * len(indices)
        for shard in np.unique(shards):
            positions = np.flatnonzero(shards == shard)
            local = indices[positions] - self.shard_starts[shard]
            for position, record in zip(positions, self._read_shard(int(shard), local.tolist(),
                                                                    first_index=int(self.shard_starts[shard]))):
                records[position] = record
        return records

    def _read_shard(self, shard: int, local_indices: list[int], *, first_index: int) -> list[bytes]:
        few = len(local_indices) * BATCHED_READ_MIN_SHARE < self.shard_sizes[shard]
        if (self._reads_one_at_a_time[shard] and (few or not self.parallel_reads)
                and self._page_cache.mostly_cached(shard)):
            records = self._read_one_at_a_time(shard, local_indices, first_index=first_index)
        else:
            try:
                records = self._readers[shard].read(local_indices)
            except RuntimeError:
                records = None
        if records is not None and all(records):
            return records
        # array-record returns b"" for a record past the end of a file truncated after it was opened.
        for local in local_indices:  # find the first bad record to name it
            try:
                record = self._readers[shard].read([local])[0]
            except RuntimeError as error:
                raise self._unreadable(shard, local, first_index, error) from None
            if not record:
                raise DataError(f"{self._where(shard, local, first_index)} is empty: the file was truncated or "
                                f"replaced after it was opened (it has {_size_of(self.files[shard])} now). Expected "
                                f"{self._expected}.")
        raise DataError(f"Records {sorted(local_indices)[:8]}... of shard '{self.files[shard]}' ({self.key}) cannot "
                        f"be read together though each can alone; expected {self._expected}.")

    def _read_one_at_a_time(self, shard: int, local_indices: list[int], *, first_index: int) -> list[bytes]:
        """The records by `seek` + `read` (see BATCHED_READ_MIN_SHARE); a `DataError` names one that cannot be read."""
        with self._seeking[shard]:
            if self._closed.is_set():
                raise ValueError(f"RecordShards('{self.pattern}') is closed")
            reader = self._seekable[shard] or self._reopen(shard)
            self._seekable[shard] = reader
            records = []
            started = time.perf_counter()
            for local in local_indices:
                try:
                    reader.seek(local)
                    records.append(reader.read())
                except (RuntimeError, IndexError) as error:
                    self._seekable[shard] = None  # a failed read leaves a reader failed for good: open a new one
                    with contextlib.suppress(RuntimeError):  # closing a failed reader raises its error again
                        reader.close()
                    raise self._unreadable(shard, local, first_index, error) from None
            if time.perf_counter() - started > SLOW_RECORD_SECONDS * len(local_indices):
                self._page_cache.found_slow(shard)
            return records

    def _reopen(self, shard: int) -> ArrayRecordReader:
        """A new reader for `seek` + `read` after one failed, if the shard still holds what it held at start-up."""
        reader = self._open(self.files[shard])
        if reader.num_records() != self.shard_sizes[shard]:
            reader.close()
            raise DataError(f"Data file '{self.files[shard]}' ({self.key}) changed while training read it: it holds "
                            f"{reader.num_records()} records now, {self.shard_sizes[shard]} at start-up. Expected the "
                            "shards to stay as they were for the whole run; rewrite them only between runs.")
        return reader

    def describe_record(self, index: int) -> str:
        """Global record `index` for messages: "Record 1203 (record 3 of shard '...', data.path)"."""
        shard = int(np.searchsorted(self.shard_starts, index, side="right") - 1)
        return self._where(shard, index - int(self.shard_starts[shard]), int(self.shard_starts[shard]))

    def _where(self, shard: int, local: int, first_index: int) -> str:
        return f"Record {first_index + local} (record {local} of shard '{self.files[shard]}', {self.key})"

    def _unreadable(self, shard: int, local: int, first_index: int, error: Exception) -> DataError:
        return DataError(f"{self._where(shard, local, first_index)} cannot be read: {error_summary(error)}. The file "
                         f"is corrupted or truncated; expected {self._expected}. Rewrite the shard "
                         "(scripts/convert_to_array_record.py).")

    def _layout_error(self, indices: np.ndarray, serialized: list[bytes],
                      error: tf.errors.InvalidArgumentError) -> DataError:
        """Which record of a batch does not parse, named by shard and index."""
        for index, record in zip(indices, serialized):
            try:
                tf.io.parse_example([record], self.layout.parsing_spec)
            except tf.errors.InvalidArgumentError as single:
                return DataError(
                    f"{self.describe_record(int(index))} does not match the layout of the first record "
                    f"({self.layout.describe()}): {error_summary(single)}. Expected {self._expected}.")
        return DataError(f"Records of '{self.pattern}' ({self.key}) cannot be parsed as a batch: "
                         f"{error_summary(error)}. Expected {self._expected}.")

    def close(self) -> None:
        """Release every shard's file; reads afterwards raise ValueError."""
        self._closed.set()
        for reader in [*self._readers, *filter(None, self._seekable)]:
            reader.close()

    def __enter__(self) -> RecordShards:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()



def open_tfrecords(pattern: str, *, source: str, expected: str) -> tuple[list[str], tf.data.TFRecordDataset, bytes]:
    """The TFRecord files matching `pattern`, a dataset over them and their first record.

    `source` names the input in messages (e.g. "Config key 'data.path' = '/d/*'"). Raises one
    `DataError` when nothing matches, the files are not readable TFRecord files, or hold no record.
    """
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise DataError(f"{source} matches no file. Expected {expected}.")
    records = tf.data.TFRecordDataset(files)
    try:
        first = [record.numpy() for record in records.take(1)]
    except tf.errors.OpError as error:  # not a TFRecord file, or its first record is corrupted
        raise DataError(f"{source}: the files are not readable TFRecord files ({error_summary(error)}). "
                        f"Expected {expected}.") from None
    if not first:
        raise DataError(f"{source}: the files hold no records. Expected {expected}.")
    return files, records, first[0]


def _one_record_per_chunk(reader: ArrayRecordReader) -> bool:
    """Whether the shard was written with group_size:1 (this project's converter), so a seek decodes one record."""
    return "group_size:1" in reader.writer_options_string().split(",")


def _allow_open_files(count: int) -> None:
    """Raise this process's soft limit on open files toward its hard limit if `count` more might not fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = len(os.listdir("/proc/self/fd")) + count + 64 if os.path.isdir("/proc/self/fd") else soft + count
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard),
                                                    hard))


def _few(numbers: list[int]) -> str:
    return ", ".join(map(str, numbers[:5])) + (", ..." if len(numbers) > 5 else "")


def _size_of(path: str) -> str:
    try:
        return f"{tf.io.gfile.stat(path).length} bytes"
    except tf.errors.OpError:
        return "no such file"


def _fits_int32(targets: np.ndarray) -> np.ndarray:
    """Per row of (n, k) int64 targets, whether its ids survive the cast to the int32 they are trained on."""
    info = np.iinfo(np.int32)
    return ((targets >= info.min) & (targets <= info.max)).all(axis=1)
