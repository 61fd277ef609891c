"""Data bigger than memory: examples read from files by index, never loaded whole.

Owns: the file-backed sources (`array_record`: ArrayRecord shards of `tf.train.Example`s;
`tokens`: a flat binary token file; `text` with a `data.path`: a file's bytes as tokens) as
`FileExamples`, two `Split`s that read any examples by index. The seekable pipeline
(`harness/data/pipeline.py`) asks for the examples of each batch by index, in background threads, so batch
`k` stays a pure function of `(seed, k)`, resuming seeks in O(1) and each worker reads only its
own examples. A file that goes bad mid-run raises `DataError` from `read` (naming the file and
record); the pipeline keeps it so the run exits 2 with that message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from harness.config.schema import ArrayRecordDataConfig, TextDataConfig, TokensDataConfig
from harness.data.in_memory_sources import BYTE_VOCABULARY, ExampleArrays
from harness.data.record_files import RecordShards
from harness.data.token_files import TokenFile
from harness.errors import DataError

SAMPLE_SIZE = 4096  # examples of each split a task checks and learns from (class count, target statistics)


class Split(Protocol):
    """Random access to the examples of one split."""

    num_examples: int

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Features and targets of the examples at `indices` (int64), in that order."""

    def describe(self, index: int) -> str:
        """Example `index` for messages: its file, and its record or position there."""


@dataclass(frozen=True)
class RecordRows:
    """Records `rows` (sorted global indices, or None for all) of ArrayRecord shards, as a split."""

    shards: RecordShards
    rows: np.ndarray | None
    num_examples: int

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.shards.read(indices if self.rows is None else self.rows[indices])

    def describe(self, index: int) -> str:
        return self.shards.describe_record(index if self.rows is None else int(self.rows[index]))


@dataclass(frozen=True)
class TokenWindows:
    """Windows of `seq_len + 1` tokens starting every `seq_len` tokens from `first_token`: example `i`
    is inputs `tokens[s : s + seq_len]` and targets `tokens[s + 1 : s + seq_len + 1]`, where
    `s = first_token + i * seq_len`."""

    tokens: TokenFile
    first_token: int
    seq_len: int
    num_examples: int

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        windows = self.tokens.windows(self.first_token + np.asarray(indices, np.int64) * self.seq_len,
                                      self.seq_len + 1)
        return windows[:, :-1], windows[:, 1:]

    def describe(self, index: int) -> str:
        start = self.first_token + index * self.seq_len
        return (f"The window of tokens {start}..{start + self.seq_len} of '{self.tokens.path}' "
                f"({self.tokens.key})")


@dataclass(frozen=True)
class CheckedSplit:
    """A split whose every batch is checked as it is read (by `Task.invalid_example`).

    At start-up the task checks only a sample of data bigger than memory; an example further on that
    it would refuse (a class id past the class count, a token past the vocabulary) must stop the run
    with a `DataError` naming it (exit 2), not fail inside the loss with a TensorFlow traceback.
    """

    split: Split
    check: Callable[[np.ndarray, np.ndarray], tuple[int, str] | None]

    @property
    def num_examples(self) -> int:
        return self.split.num_examples

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        inputs, targets = self.split.read(indices)
        invalid = self.check(inputs, targets) if len(targets) else None
        if invalid is not None:
            position, problem = invalid
            raise DataError(f"{self.describe(int(np.asarray(indices).reshape(-1)[position]))} {problem}.")
        return inputs, targets

    def describe(self, index: int) -> str:
        return self.split.describe(index)


@dataclass(frozen=True)
class FileExamples:
    """A data set read from files by index: a train and an eval split and what every example looks like."""

    train: Split
    eval: Split
    input_shape: tuple[int, ...]
    input_dtype: str  # 'float32' features or 'int32' token ids
    target_shape: tuple[int, ...]
    target_dtype: str
    num_classes: int | None  # distinct target ids where the source knows them (vocabulary)
    description: str  # for messages: which files, how many records

    @property
    def num_train(self) -> int:
        return self.train.num_examples

    @property
    def num_eval(self) -> int:
        return self.eval.num_examples

    def checked(self, check: Callable[[np.ndarray, np.ndarray], tuple[int, str] | None]) -> FileExamples:
        """These examples with every batch read checked by `check` (see `CheckedSplit`)."""
        return replace(self, train=CheckedSplit(self.train, check), eval=CheckedSplit(self.eval, check))

    def sample(self, size: int = SAMPLE_SIZE) -> ExampleArrays:
        """The first `size` examples of each split, in memory: what a task checks and learns from."""
        train = self.train.read(np.arange(min(size, self.num_train), dtype=np.int64))
        evaluation = self.eval.read(np.arange(min(size, self.num_eval), dtype=np.int64))
        return ExampleArrays(train[0], train[1], evaluation[0], evaluation[1], self.num_classes)


def array_record(config: ArrayRecordDataConfig) -> FileExamples:
    """ArrayRecord shards (`data.path`, a glob) of `tf.train.Example`s; eval from `data.eval_path` or a fixed
    held-out fraction of the records, chosen by index with `data.split_seed` (an index array, 8 bytes a record)."""
    options = {"features_key": config.features_key, "labels_key": config.labels_key,
               "feature_shape": config.feature_shape}
    shards = RecordShards(config.path, key="data.path", **options)
    if config.eval_path is not None:
        eval_shards = RecordShards(config.eval_path, key="data.eval_path", **options)
        shapes = (shards.feature_shape, shards.target_shape, shards.target_dtype)  # what batches of both hold
        if (eval_shards.feature_shape, eval_shards.target_shape, eval_shards.target_dtype) != shapes:
            raise DataError(f"The records of data.eval_path '{config.eval_path}' ({eval_shards.layout.describe()}) "
                            f"differ from those of data.path '{config.path}' ({shards.layout.describe()}): expected "
                            "the same layout.")
        train, evaluation = RecordRows(shards, None, shards.num_records), RecordRows(eval_shards, None,
                                                                                      eval_shards.num_records)
    else:
        if not 0.0 < config.eval_fraction < 1.0:
            raise DataError(f"Config key 'data.eval_fraction' = {config.eval_fraction} is invalid: expected a "
                            "fraction in (0, 1), or set data.eval_path to separate eval shards.")
        eval_count = max(1, round(shards.num_records * config.eval_fraction))
        if eval_count >= shards.num_records:
            raise DataError(f"The shards '{config.path}' hold {shards.num_records} records: too few to hold out "
                            f"data.eval_fraction = {config.eval_fraction} for eval and still train.")
        order = np.random.default_rng(config.split_seed).permutation(shards.num_records)
        eval_rows, train_rows = np.sort(order[:eval_count]), np.sort(order[eval_count:])
        train, evaluation = RecordRows(shards, train_rows, len(train_rows)), RecordRows(shards, eval_rows, eval_count)
    return FileExamples(train, evaluation, input_shape=shards.feature_shape, input_dtype="float32",
                        target_shape=shards.target_shape, target_dtype=shards.target_dtype.name,
                        num_classes=config.num_classes,
                        description=f"{len(shards.files)} ArrayRecord shards '{config.path}', "
                                    f"{shards.num_records} records")


def tokens(config: TokensDataConfig) -> FileExamples:
    """A flat binary token file (`data.path`, `data.dtype`) read by position: windows of
    `data.seq_len + 1` tokens; the last `data.eval_fraction` of the file is the eval split."""
    return _token_windows(TokenFile(config.path, dtype=config.dtype), config.seq_len, config.eval_fraction,
                          num_classes=config.vocab_size)


def text_file(config: TextDataConfig) -> FileExamples:
    """`data=text` with a `data.path`: the file's bytes are the tokens (vocabulary 256), read by position."""
    text = TokenFile(config.path, dtype="uint8", expected="a text file (any bytes: each byte is one token)")
    return _token_windows(text, config.seq_len, config.eval_fraction,
                          num_classes=BYTE_VOCABULARY)


def _token_windows(token_file: TokenFile, seq_len: int, eval_fraction: float, *,
                   num_classes: int | None) -> FileExamples:
    if seq_len < 1:
        raise DataError(f"Config key 'data.seq_len' = {seq_len} is invalid: expected a positive number of tokens.")
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"Config key 'data.eval_fraction' = {eval_fraction} is invalid: expected a fraction in "
                        "(0, 1) of the tokens held out (at the end of the file) for eval.")
    split = int(token_file.num_tokens * (1.0 - eval_fraction))
    train_windows = (split - 1) // seq_len
    eval_windows = (token_file.num_tokens - split - 1) // seq_len
    if train_windows < 1 or eval_windows < 1:
        raise DataError(f"The file '{token_file.path}' has {token_file.num_tokens} tokens: too few for windows of "
                        f"data.seq_len + 1 = {seq_len + 1} tokens in both the train split and the eval split (the "
                        f"last data.eval_fraction = {eval_fraction}); expected a longer file or a shorter "
                        "data.seq_len.")
    return FileExamples(TokenWindows(token_file, 0, seq_len, train_windows),
                        TokenWindows(token_file, split, seq_len, eval_windows), input_shape=(seq_len,),
                        input_dtype="int32", target_shape=(seq_len,), target_dtype="int32", num_classes=num_classes,
                        description=f"'{token_file.path}', {token_file.num_tokens} tokens of {token_file.dtype.name}")


SOURCES = {"array_record": array_record, "tokens": tokens, "text": text_file}
