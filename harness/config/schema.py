"""The configuration schema: every key a user may set, its type, default and value checks.

Owns: one typed dataclass per config group (registered with Hydra by `composition.py`, built from
the composed config by `run_config.py`), each with a `validate` that checks what types cannot
express (positive step counts, known names) and raises `ConfigError` naming the key.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from harness.errors import RESERVED_EXIT_CODES, ConfigError, ExitCode


def parse_signals(names: list[str]) -> list[signal.Signals]:
    """Signal names ('SIGTERM', 'USR1', ...) to signals; `ConfigError` names an unknown one."""
    parsed = []
    for name in names:
        canonical = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
        if canonical in ("SIGKILL", "SIGSTOP") or not hasattr(signal.Signals, canonical):
            raise ConfigError(
                f"Config key 'preemption.signals' contains {name!r}: expected catchable signal names "
                "such as SIGTERM, SIGINT, SIGUSR1 (SIGKILL and SIGSTOP cannot be handled)."
            )
        parsed.append(signal.Signals[canonical])
    return parsed


def _require(condition: bool, key: str, value: Any, expected: str) -> None:
    if not condition:
        raise ConfigError(f"Config key '{key}' = {value!r} is invalid: expected {expected}.")


# ---------------------------------------------------------------------------------------------
# Models: any `_target_` callable taking (input_shape=..., num_outputs=..., **fields) -> keras.Model
# ---------------------------------------------------------------------------------------------
@dataclass
class MLPConfig:
    _target_: str = "models.mlp.build_mlp"
    hidden: list[int] = field(default_factory=lambda: [128, 128])  # widths of the hidden layers
    dropout: float = 0.0  # dropout rate after each hidden layer, in [0, 1)
    activation: str = "relu"  # any keras activation name


@dataclass
class CNNConfig:
    _target_: str = "models.cnn.build_cnn"
    image_shape: list[int] = field(default_factory=lambda: [8, 8, 1])  # flat inputs reshaped to this
    filters: list[int] = field(default_factory=lambda: [16, 32])  # one 3x3 conv block per entry
    dense: int = 64  # width of the dense layer before the classifier
    dropout: float = 0.0
    activation: str = "relu"


# ---------------------------------------------------------------------------------------------
# Tasks: any `_target_` Task subclass (harness/tasks/); the other keys are its constructor's arguments
# ---------------------------------------------------------------------------------------------
@dataclass
class ClassificationTaskConfig:
    _target_: str = "harness.tasks.classification.Classification"
    num_classes: int | None = None  # None = the data source's class count (or the largest label + 1)


@dataclass
class RegressionTaskConfig:
    _target_: str = "harness.tasks.regression.Regression"
    loss: str = "mse"  # mse | mae | huber, on standardised targets
    huber_delta: float = 1.0  # huber: where the loss turns from quadratic to linear (standardised units)
    standardize_targets: bool = True  # train on targets scaled to mean 0, std 1; report in target units


@dataclass
class LanguageModelTaskConfig:
    _target_: str = "harness.tasks.language_model.LanguageModel"
    vocab_size: int | None = None  # None = the data source's vocabulary (256 for data=text)
    bytes_per_token: float = 1.0  # bits_per_byte = bits per token / this (1 for byte-level text)


# ---------------------------------------------------------------------------------------------
# Data: in-memory example sources fed through the seekable pipeline of harness/data/pipeline.py
# ---------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    name: str = MISSING  # which source in harness/data/in_memory_sources.py
    global_batch_size: int = 128  # examples per step summed over all replicas and workers
    eval_batch_size: int | None = None  # global; None = global_batch_size
    # Train batches a tf.data pipeline prepares ahead of the step; 0 = gather each batch inside the
    # step instead (no tf.data: fastest on CPU hosts, see docs/benchmarks.md). Same batches either way.
    prefetch: int = 0
    shuffle_seed: int | None = None  # order of examples; None = the run's `seed`

    def validate(self) -> None:
        _require(self.global_batch_size > 0, "data.global_batch_size", self.global_batch_size, "a positive integer")
        _require(self.eval_batch_size is None or self.eval_batch_size > 0, "data.eval_batch_size",
                 self.eval_batch_size, "null or a positive integer")
        _require(self.prefetch >= 0, "data.prefetch", self.prefetch, "0 or a positive number of batches")


@dataclass
class SyntheticDataConfig(DataConfig):
    name: str = "synthetic"
    input_dim: int = 64  # features per example
    num_classes: int = 10
    num_examples: int = 16384  # train + eval
    eval_examples: int = 2048  # the first ones form the fixed eval split
    label_noise: float = 0.0  # fraction of labels replaced by random ones
    generator_seed: int = 0  # fixes the data set itself, independent of the run's seed


@dataclass
class FileDataConfig(DataConfig):
    """Examples read from user files; the eval split is `eval_path` or a fixed held-out fraction."""

    path: str = MISSING  # the training file (tfrecord: a file or a glob of shards)
    eval_path: str | None = None  # a separate eval file in the same format; None = hold out eval_fraction
    eval_fraction: float = 0.1  # with eval_path null: fraction of `path` held out for eval, in (0, 1)
    split_seed: int = 0  # which examples are held out; independent of the run's seed
    features_key: str = "features"  # name of the feature array / tf.train.Example feature
    labels_key: str = "labels"  # name of the integer class-id array / feature
    num_classes: int | None = None  # None = largest label + 1 over both splits


@dataclass
class NpzDataConfig(FileDataConfig):
    name: str = "npz"  # arrays features (N, ...) numeric and labels (N,) integer, as numpy.savez writes


@dataclass
class TFRecordDataConfig(FileDataConfig):
    name: str = "tfrecord"  # tf.train.Example records: a fixed-length float/int64 feature and an int64 label
    feature_shape: list[int] | None = None  # reshape each flat feature vector to this; None = keep it flat


@dataclass
class DiabetesDataConfig(DataConfig):
    name: str = "diabetes"  # scikit-learn's bundled diabetes data: 442 patients, 10 features, a float target
    eval_examples: int = 88  # held out for eval (20%), chosen by split_seed
    split_seed: int = 0  # which examples are held out; independent of the run's seed


@dataclass
class TextDataConfig(DataConfig):
    name: str = "text"  # byte-level windows of a text file, for task=language_model
    path: str | None = None  # a text file, read by position; None = the default corpus (Python's docs, in memory)
    seq_len: int = 128  # tokens (bytes) the model sees per example; targets are the next ones
    eval_fraction: float = 0.1  # the end of the text held out for eval


@dataclass
class ArrayRecordDataConfig(FileDataConfig):
    name: str = "array_record"  # ArrayRecord shards of tf.train.Example records, read by index (not loaded)
    feature_shape: list[int] | None = None  # reshape each flat feature vector to this; None = keep it flat


TOKEN_DTYPES = ("uint8", "uint16", "uint32")  # what tokenizers write: byte-level, vocab < 65536, larger


@dataclass
class TokensDataConfig(DataConfig):
    name: str = "tokens"  # a flat binary file of token ids (numpy tofile), read by position (not loaded)
    path: str = MISSING
    dtype: str = "uint16"  # one of TOKEN_DTYPES: how the ids were written
    seq_len: int = 256  # tokens the model sees per example; targets are the next ones
    eval_fraction: float = 0.01  # the end of the file held out for eval
    vocab_size: int | None = None  # None = the largest id in the first windows + 1; set it for real vocabularies

    def validate(self) -> None:
        super().validate()
        _require(self.dtype in TOKEN_DTYPES, "data.dtype", self.dtype,
                 f"one of {', '.join(TOKEN_DTYPES)}: the type the token file was written with")


@dataclass
class DigitsDataConfig(DataConfig):
    name: str = "digits"  # scikit-learn's bundled 8x8 digits: 1797 images, 64 features scaled to [0, 1]
    eval_examples: int = 360  # held out for eval (20%), chosen by split_seed
    split_seed: int = 0  # which examples are held out; independent of the run's seed


# ---------------------------------------------------------------------------------------------
# Optimizers and learning-rate schedules (positions follow optimizer.iterations, checkpointed)
# ---------------------------------------------------------------------------------------------
@dataclass
class ScheduleConfig:
    name: str = "constant"  # constant | cosine
    warmup_steps: int = 0  # linear warmup from 0 to learning_rate
    decay_steps: int | None = None  # cosine: steps after warmup; None = trainer.max_steps - warmup
    final_fraction: float = 0.0  # cosine: final learning rate as a fraction of the peak

    def validate(self) -> None:
        _require(self.name in ("constant", "cosine"), "optimizer.schedule.name", self.name, "constant or cosine")
        _require(self.warmup_steps >= 0, "optimizer.schedule.warmup_steps", self.warmup_steps, "0 or more steps")
        _require(self.decay_steps is None or self.decay_steps > 0, "optimizer.schedule.decay_steps",
                 self.decay_steps, "null or a positive number of steps")
        _require(0.0 <= self.final_fraction <= 1.0, "optimizer.schedule.final_fraction", self.final_fraction,
                 "a fraction in [0, 1]")


@dataclass
class OptimizerConfig:
    name: str = MISSING
    learning_rate: float = 1e-3  # peak learning rate
    global_clipnorm: float | None = None  # clip the global gradient norm; None = no clipping
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def validate(self) -> None:
        _require(self.learning_rate > 0, "optimizer.learning_rate", self.learning_rate, "a positive number")
        _require(self.global_clipnorm is None or self.global_clipnorm > 0, "optimizer.global_clipnorm",
                 self.global_clipnorm, "null or a positive number")
        self.schedule.validate()


@dataclass
class AdamConfig(OptimizerConfig):
    name: str = "adam"
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7


@dataclass
class AdamWConfig(AdamConfig):
    name: str = "adamw"
    weight_decay: float = 0.004


@dataclass
class SGDConfig(OptimizerConfig):
    name: str = "sgd"
    learning_rate: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False


# ---------------------------------------------------------------------------------------------
# Run-level groups
# ---------------------------------------------------------------------------------------------
@dataclass
class StrategyConfig:
    name: str = "default"  # default | mirrored | multi_worker | auto
    cpu_replicas: int | None = None  # mirrored on CPU: split the CPU into this many devices
    devices: list[str] | None = None  # mirrored: explicit device list; None = all local GPUs
    communication: str = "auto"  # multi_worker collectives: auto | ring | nccl
    peer_timeout_seconds: int = 30  # multi_worker: a dead peer fails the job after this long

    def validate(self) -> None:
        _require(self.name in ("default", "mirrored", "multi_worker", "auto"), "strategy.name", self.name,
                 "one of default, mirrored, multi_worker, auto")
        _require(self.cpu_replicas is None or self.cpu_replicas >= 1, "strategy.cpu_replicas", self.cpu_replicas,
                 "null or a positive integer")
        _require(self.communication in ("auto", "ring", "nccl"), "strategy.communication", self.communication,
                 "one of auto, ring, nccl")
        _require(self.peer_timeout_seconds > 0, "strategy.peer_timeout_seconds", self.peer_timeout_seconds,
                 "a positive number of seconds")


@dataclass
class TrainerConfig:
    max_steps: int = 1000  # the run ends (and writes a final checkpoint) at this global step
    steps_per_loop: int = 50  # steps inside one tf.function call; signals are seen between calls
    log_every: int = 50  # steps between train-metric summaries and progress lines
    eval_every: int = 250  # steps between evaluations on the eval split; 0 = only at the end
    progress: str = "auto"  # auto (bar on a TTY, log lines otherwise) | bar | log | none
    jit_compile: bool = False  # XLA-compile the training loop
    mixed_precision: str | None = None  # None | mixed_float16 | mixed_bfloat16
    # TensorFlow's thread pools; 0 = TensorFlow's default (one thread per core). On a CPU-only host with file-backed
    # data the step and the input share the cores: intra_op_threads = cores - 1 leaves one to the input.
    intra_op_threads: int = 0  # threads that one op (a matmul) splits its work over
    inter_op_threads: int = 0  # threads that run independent ops at once
    # Divergence rollback (harness/training/divergence.py): a step whose loss is NaN/Inf or above the bound
    # restores an earlier checkpoint and skips the batches before it, at most max_rollbacks times.
    loss_upper_bound: float | None = None  # a step loss above this counts as divergence; None = NaN/Inf only
    max_rollbacks: int = 3  # then the run stops with exit code 3 (not the preemption code)
    rollback_skip_batches: int = 10  # batches skipped, ending with the first diverged step's batch
    # Restart accounting (harness/operations/run_record.py): refuse to start after this many crashes in a row
    # at the same step, so a scheduler's retry loop on a deterministic bug ends. 0 = never refuse.
    max_crash_restarts: int = 3

    def validate(self) -> None:
        _require(self.max_steps > 0, "trainer.max_steps", self.max_steps, "a positive number of steps")
        _require(self.steps_per_loop > 0, "trainer.steps_per_loop", self.steps_per_loop, "a positive integer")
        _require(self.log_every > 0, "trainer.log_every", self.log_every, "a positive integer")
        _require(self.eval_every >= 0, "trainer.eval_every", self.eval_every,
                 "0 (only at the end) or a positive integer")
        _require(self.progress in ("auto", "bar", "log", "none"), "trainer.progress", self.progress,
                 "one of auto, bar, log, none")
        _require(self.mixed_precision in (None, "mixed_float16", "mixed_bfloat16"), "trainer.mixed_precision",
                 self.mixed_precision, "null, mixed_float16 or mixed_bfloat16")
        for key in ("intra_op_threads", "inter_op_threads"):
            _require(getattr(self, key) >= 0, f"trainer.{key}", getattr(self, key),
                     "0 (TensorFlow's default: one thread per core) or a positive number of threads")
        _require(self.loss_upper_bound is None or self.loss_upper_bound > 0, "trainer.loss_upper_bound",
                 self.loss_upper_bound, "null or a positive loss")
        _require(0 <= self.max_rollbacks <= 64, "trainer.max_rollbacks", self.max_rollbacks,
                 "0 (never roll back) to 64 (the checkpoint's skip schedule has 64 rows)")
        _require(self.rollback_skip_batches >= 1, "trainer.rollback_skip_batches", self.rollback_skip_batches,
                 "a positive number of batches")
        _require(self.max_crash_restarts >= 0, "trainer.max_crash_restarts", self.max_crash_restarts,
                 "0 (never refuse) or a positive number of crashes")


@dataclass
class CheckpointConfig:
    dir: str = "${run_dir}/checkpoints"  # any path tf.io.gfile supports (local, gs://, hdfs://)
    every_steps: int = 200  # steps between checkpoints; a final one is always written
    every_seconds: float | None = None  # also save once this much wall time passed since the last save
    # Stretch the interval so that saving blocks training at most this fraction of the time (e.g.
    # 0.03); the interval chosen is logged. null: save exactly as every_steps/every_seconds say.
    max_overhead: float | None = None
    max_to_keep: int = 3  # newest checkpoints kept; >= 2 leaves a fallback if one is corrupted
    keep_every_hours: float | None = None  # additionally keep one checkpoint per this period
    # A failed write (disk full, permission lost, a flaky network filesystem) is retried after
    # retry_backoff_seconds, doubling each time; after this many failed attempts in a row the run
    # stops with exit code 5, every earlier checkpoint intact.
    max_consecutive_failures: int = 5
    retry_backoff_seconds: float = 1.0
    # `async` (bool, default false) is added in `_schema_node`: it is a Python keyword.

    def validate(self) -> None:
        _require(bool(self.dir), "checkpoint.dir", self.dir, "a directory path")
        _require(self.every_steps > 0, "checkpoint.every_steps", self.every_steps, "a positive number of steps")
        _require(self.every_seconds is None or self.every_seconds > 0, "checkpoint.every_seconds",
                 self.every_seconds, "null or a positive number of seconds")
        _require(self.max_overhead is None or 0 < self.max_overhead < 1, "checkpoint.max_overhead",
                 self.max_overhead, "null or a fraction of the training time between 0 and 1 (e.g. 0.03)")
        _require(self.max_to_keep >= 1, "checkpoint.max_to_keep", self.max_to_keep,
                 "at least 1 (2 or more recommended)")
        _require(self.keep_every_hours is None or self.keep_every_hours > 0, "checkpoint.keep_every_hours",
                 self.keep_every_hours, "null or a positive number of hours")
        _require(self.max_consecutive_failures >= 1, "checkpoint.max_consecutive_failures",
                 self.max_consecutive_failures, "a positive number of failed save attempts")
        _require(self.retry_backoff_seconds >= 0, "checkpoint.retry_backoff_seconds", self.retry_backoff_seconds,
                 "0 or more seconds")


@dataclass
class PreemptionConfig:
    signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1"])
    exit_code: int = int(ExitCode.PREEMPTED)  # exit status after a preemption save; schedulers match it

    def validate(self) -> None:
        parse_signals(self.signals)
        _require(1 <= self.exit_code <= 255 and self.exit_code not in RESERVED_EXIT_CODES, "preemption.exit_code",
                 self.exit_code, f"an exit status in 1..255 other than {sorted(RESERVED_EXIT_CODES)} (the "
                 "harness's own exit codes, see the README)")


@dataclass
class LeaseConfig:
    """One writer per checkpoint.dir (harness/operations/lease.py): a lease file renewed while training."""

    enabled: bool = True
    # A new run takes over a lease not renewed for this long (so after a SIGKILL on another host, a
    # restart waits at most this); a run that sees the lease renewed refuses to start.
    expiry_seconds: float = 60.0
    renew_seconds: float = 10.0  # how often the holder renews it; keep well below expiry_seconds

    def validate(self) -> None:
        _require(self.renew_seconds > 0, "lease.renew_seconds", self.renew_seconds, "a positive number of seconds")
        _require(self.expiry_seconds >= 2 * self.renew_seconds, "lease.expiry_seconds", self.expiry_seconds,
                 f"at least twice lease.renew_seconds ({self.renew_seconds}), so one late renewal is not a takeover")


@dataclass
class WatchdogConfig:
    """Hang detection (harness/operations/watchdog.py): a train loop, eval or save that takes far longer than
    it has so far dumps every thread's stack and exits with code 4, so the scheduler restarts it."""

    enabled: bool = True
    factor: float = 10.0  # hung = slower than this many times the slowest so far (per step for training)
    min_seconds: float = 300.0  # never declared hung sooner than this
    first_call_seconds: float = 1800.0  # the first train loop, eval and save also trace and compile

    def validate(self) -> None:
        _require(self.factor > 1, "watchdog.factor", self.factor, "a number greater than 1")
        _require(self.min_seconds > 0, "watchdog.min_seconds", self.min_seconds, "a positive number of seconds")
        _require(self.first_call_seconds > 0, "watchdog.first_call_seconds", self.first_call_seconds,
                 "a positive number of seconds")


@dataclass
class ResumeConfig:
    """What a resumed run may change (harness/checkpoint/provenance.py)."""

    # Keys (or globs such as optimizer.*) allowed to differ from the checkpoint's config although
    # they change what is trained, e.g. [optimizer.learning_rate]. Changes are logged either way.
    allow_config_change: list[str] = field(default_factory=list)


@dataclass
class ExportConfig:
    enabled: bool = True  # when training completes, the chief writes model.keras and saved_model/ in dir
    dir: str = "${run_dir}/export"

    def validate(self) -> None:
        _require(not self.enabled or bool(self.dir), "export.dir", self.dir, "a directory path")


@dataclass
class Config:
    experiment: str = "default"  # names the run directory
    run_dir: str = "outputs/${experiment}${harness_job_suffix:}"  # stable across restarts
    seed: int = 0  # model init, dropout and data order all derive from it
    deterministic: bool = False  # bitwise-reproducible ops (slower on some devices)
    task: Any = MISSING
    model: Any = MISSING
    data: Any = MISSING
    optimizer: Any = MISSING
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    lease: LeaseConfig = field(default_factory=LeaseConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    # Warm start (harness/results/warm_start.py): model weights only, optimizer fresh, step 0. Ignored when
    # checkpoint.dir already holds checkpoints: resuming beats warm-starting.
    init_from: str | None = None  # a run_dir, a checkpoint prefix, a TF1 Saver checkpoint or a .weights.h5
    init_from_skip: list[str] = field(default_factory=list)  # globs of model variables left initialised
    init_from_name_map: dict[str, str] = field(default_factory=dict)  # model variable/layer -> name in source

    def validate(self) -> None:
        """Every group's own checks, then the run-level ones. Raises `ConfigError` naming the key."""
        _require(isinstance(self.model, dict) and "_target_" in self.model, "model._target_", None,
                 "a model builder such as models.mlp.build_mlp")
        _require(isinstance(self.task, dict) and "_target_" in self.task, "task._target_", None,
                 "a Task class such as harness.tasks.classification.Classification")
        for group in (self.data, self.optimizer, self.strategy, self.trainer, self.checkpoint, self.preemption,
                      self.lease, self.watchdog, self.export):
            group.validate()
        _require(self.init_from is None or bool(self.init_from.strip()), "init_from", self.init_from,
                 "null or a run_dir, checkpoint prefix or .weights.h5 path")


SCHEMAS_BY_GROUP: dict[str, dict[str, type]] = {
    "task": {"classification": ClassificationTaskConfig, "regression": RegressionTaskConfig,
             "language_model": LanguageModelTaskConfig},
    "model": {"mlp": MLPConfig, "cnn": CNNConfig},
    "data": {"synthetic": SyntheticDataConfig, "npz": NpzDataConfig, "tfrecord": TFRecordDataConfig,
             "digits": DigitsDataConfig, "diabetes": DiabetesDataConfig, "text": TextDataConfig,
             "array_record": ArrayRecordDataConfig, "tokens": TokensDataConfig},
    "optimizer": {"adam": AdamConfig, "adamw": AdamWConfig, "sgd": SGDConfig},
}
