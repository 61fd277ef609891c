"""Measuring the harness against hand-written baselines: throughput, checkpoint stall, restore, start-up.

Owns: the benchmark workloads and the timing method behind `scripts/benchmark.py` (results in
docs/benchmarks.md). Method:
- Every contender is a function `run(num_steps) -> seconds` that does *all* its work (build,
  trace, train, final sync) in this process. Per-step time is `(t(N2) - t(N1)) / (N2 - N1)`, so
  start-up (imports, building, tracing, the final eval and checkpoint) cancels out exactly.
- Contenders are interleaved: each repeat runs every (contender, N) pair in a fresh random order,
  so load from other processes spreads over all of them. Reported: medians over repeats, and the
  median of the per-repeat ratios (a ratio from one repeat compares runs minutes apart at most).
- Subprocess figures (restore, start-up) are timed from just before `Popen` to a wall-clock time
  the child writes (a TensorBoard event or a printed `time.time()`).
Nothing here asserts speed: the numbers are for people to read.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from harness import PROJECT_ROOT
from harness.config.composition import compose

Runner = Callable[[int], float]  # num_steps -> wall seconds of the whole run


@dataclass(frozen=True)
class Workload:
    """The model, data and batch every contender trains (issue 5: MLP 784-256-256-10, Adam, batch 256)."""

    hidden: tuple[int, ...] = (256, 256)
    input_dim: int = 784
    global_batch_size: int = 256
    learning_rate: float = 1e-3
    num_examples: int = 16384  # synthetic source defaults: 14336 train + 2048 eval
    eval_examples: int = 2048

    def overrides(self) -> list[str]:
        """The train.py overrides that select this workload."""
        return ["model=mlp", f"model.hidden=[{','.join(map(str, self.hidden))}]", "data=synthetic",
                f"data.input_dim={self.input_dim}", f"data.global_batch_size={self.global_batch_size}",
                f"data.num_examples={self.num_examples}", f"data.eval_examples={self.eval_examples}",
                "optimizer=adam", f"optimizer.learning_rate={self.learning_rate}"]



# ---------------------------------------------------------------------------------------------
# Contenders
# ---------------------------------------------------------------------------------------------
def harness_runner(train: Callable[[Any], Any], overrides: Sequence[str], *, work_dir: str) -> Runner:
    """train.py's own path: `train(cfg)` on a fresh run directory, log lines written to a file as Hydra would."""
    counter = iter(range(1_000_000))

    def run(num_steps: int) -> float:
        run_dir = os.path.join(work_dir, f"run{next(counter)}")
        cfg = compose([*overrides, f"run_dir={run_dir}", f"trainer.max_steps={num_steps}"])
        os.makedirs(run_dir, exist_ok=True)
        handler = logging.FileHandler(os.path.join(run_dir, "train.log"))
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        logger = logging.getLogger("harness")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # the log file only: keeps the benchmark's own output readable
        started = time.perf_counter()
        try:
            outcome = train(cfg)
        finally:
            logger.removeHandler(handler)
            logger.propagate = True
            handler.close()
        elapsed = time.perf_counter() - started
        if getattr(outcome, "step", num_steps) != num_steps:
            raise RuntimeError(f"train.py stopped at step {outcome.step}, expected {num_steps}")
        shutil.rmtree(run_dir, ignore_errors=True)
        return elapsed

    return run


def _synthetic_arrays(workload: Workload):
    from harness.config.schema import SyntheticDataConfig
    from harness.data.in_memory_sources import synthetic

    return synthetic(SyntheticDataConfig(input_dim=workload.input_dim, num_examples=workload.num_examples,
                                         eval_examples=workload.eval_examples))


def _build_model(workload: Workload, seed: int = 0):
    import keras

    from models.mlp import build_mlp

    keras.utils.set_random_seed(seed)
    return build_mlp(input_shape=(workload.input_dim,), num_outputs=10, hidden=workload.hidden)


def hand_written_runner(workload: Workload, *, steps_per_call: int, shuffle: bool = True) -> Runner:
    """A plain `tf.function` loop of `steps_per_call` steps over in-memory tensors, no tf.data.

    With `shuffle` it does the job the harness does: a fresh random permutation at each epoch
    start (`tf.random.shuffle`), and each step gathers its batch through the permutation. Without,
    step `k` trains on a contiguous slice of the data set in a fixed order: the leanest input there
    is, a lower bound. No metrics, no logging, no checkpoints either way.
    """
    import keras
    import tensorflow as tf

    examples = _synthetic_arrays(workload)
    batch = workload.global_batch_size
    num_train = len(examples.train_targets)
    batches_per_epoch = num_train // batch  # drops the remainder of each epoch

    def run(num_steps: int) -> float:
        if num_steps % steps_per_call:
            raise ValueError(f"num_steps {num_steps} is not a multiple of steps_per_call {steps_per_call}")
        started = time.perf_counter()
        features, labels = tf.constant(examples.train_features), tf.constant(examples.train_targets)
        model = _build_model(workload)
        optimizer = keras.optimizers.Adam(workload.learning_rate)
        optimizer.build(model.trainable_variables)
        step = tf.Variable(0, dtype=tf.int64)
        permutation = tf.Variable(tf.range(num_train))

        @tf.function
        def train_steps(count: tf.Tensor) -> None:
            for _ in tf.range(count):
                first = (step % batches_per_epoch) * batch
                if shuffle:
                    if first == 0:
                        permutation.assign(tf.random.shuffle(tf.range(num_train)))
                    rows = permutation[first:first + batch]
                    inputs, targets = tf.gather(features, rows), tf.gather(labels, rows)
                else:
                    inputs, targets = features[first:first + batch], labels[first:first + batch]
                with tf.GradientTape() as tape:
                    logits = model(inputs, training=True)
                    loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(targets, logits,
                                                                                       from_logits=True))
                gradients = tape.gradient(loss, model.trainable_variables)
                optimizer.apply_gradients(zip(gradients, model.trainable_variables))
                step.assign_add(1)

        count = tf.constant(steps_per_call, tf.int64)
        for _ in range(num_steps // steps_per_call):
            train_steps(count)
        if int(step.numpy()) != num_steps:  # also waits for the last step
            raise RuntimeError("hand-written loop ran the wrong number of steps")
        return time.perf_counter() - started

    return run


def keras_fit_runner(workload: Workload) -> Runner:
    """`model.compile` + `model.fit(x, y, batch_size)` with Keras defaults (verbose=0 keeps stdout clean)."""
    import keras

    examples = _synthetic_arrays(workload)
    steps_per_epoch = math.ceil(len(examples.train_targets) / workload.global_batch_size)

    def run(num_steps: int) -> float:
        if num_steps % steps_per_epoch:
            raise ValueError(f"num_steps {num_steps} is not a multiple of the {steps_per_epoch} steps per epoch")
        started = time.perf_counter()
        model = _build_model(workload)
        model.compile(optimizer=keras.optimizers.Adam(workload.learning_rate),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(examples.train_features, examples.train_targets, batch_size=workload.global_batch_size,
                  epochs=num_steps // steps_per_epoch, verbose=0)
        return time.perf_counter() - started

    return run


def keras_steps_per_epoch(workload: Workload) -> int:
    return math.ceil((workload.num_examples - workload.eval_examples) / workload.global_batch_size)


# ---------------------------------------------------------------------------------------------
# Interleaved timing
# ---------------------------------------------------------------------------------------------
@dataclass
class Contender:
    name: str
    run: Runner
    short_steps: int  # N1
    long_steps: int  # N2


@dataclass
class ThroughputResult:
    per_step: dict[str, list[float]]  # wall seconds per step, one value per repeat
    cpu_per_step: dict[str, list[float]]  # CPU seconds (all threads of this process) per step, per repeat
    load: list[float] = field(default_factory=list)  # 1-minute load average before each run

    def median_ms(self, name: str) -> float:
        return 1e3 * statistics.median(self.per_step[name])

    def ratio(self, name: str, baseline: str, *, cpu: bool = False) -> float:
        """Median over repeats of (name / baseline) per-step time (wall, or CPU with `cpu`)."""
        values = self.cpu_per_step if cpu else self.per_step
        return statistics.median(a / b for a, b in zip(values[name], values[baseline]))


def measure_throughput(contenders: Sequence[Contender], *, repeats: int, seed: int = 0,
                       on_run: Callable[[str, int, float], None] | None = None) -> ThroughputResult:
    """Per-step seconds of each contender, interleaved; one warm-up run of each is discarded first."""
    shuffler = random.Random(seed)
    for contender in contenders:
        contender.run(contender.short_steps)  # warm-up: first-use costs of TF and Keras
    result = ThroughputResult({c.name: [] for c in contenders}, {c.name: [] for c in contenders})
    for _ in range(repeats):
        runs = [(c, n) for c in contenders for n in (c.short_steps, c.long_steps)]
        shuffler.shuffle(runs)
        seconds: dict[tuple[str, int], float] = {}
        cpu_seconds: dict[tuple[str, int], float] = {}
        for contender, steps in runs:
            result.load.append(os.getloadavg()[0])
            cpu_started = time.process_time()
            seconds[contender.name, steps] = contender.run(steps)
            cpu_seconds[contender.name, steps] = time.process_time() - cpu_started
            if on_run:
                on_run(contender.name, steps, seconds[contender.name, steps])
        for c in contenders:
            span = c.long_steps - c.short_steps
            result.per_step[c.name].append((seconds[c.name, c.long_steps] - seconds[c.name, c.short_steps]) / span)
            result.cpu_per_step[c.name].append(
                (cpu_seconds[c.name, c.long_steps] - cpu_seconds[c.name, c.short_steps]) / span)
        _clear_keras_session()
    return result


def _clear_keras_session() -> None:
    import keras

    keras.backend.clear_session()


# ---------------------------------------------------------------------------------------------
# TensorBoard scalars written by train.py
# ---------------------------------------------------------------------------------------------
def read_scalars(run_dir: str, tag: str) -> list[tuple[int, float, float]]:
    """(step, wall_time, value) of every `tag` event under `run_dir/tensorboard`, in file order."""
    import tensorflow as tf

    found = []
    for path in sorted(glob.glob(os.path.join(run_dir, "tensorboard", "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == tag:
                    number = value.simple_value if value.WhichOneof("value") == "simple_value" else \
                        float(tf.make_ndarray(value.tensor))
                    found.append((event.step, event.wall_time, number))
    return found


# ---------------------------------------------------------------------------------------------
# Checkpoint stall: time training is blocked per save, sync vs async, on train.py's own path
# ---------------------------------------------------------------------------------------------
@dataclass
class StallResult:
    blocked: dict[str, list[float]]  # mode -> seconds blocked per save (first save of each run left out)
    first_save: dict[str, list[float]]  # mode -> the first save of each run (one-off set-up included)
    checkpoint_bytes: int
    example_run_dir: str  # a finished synchronous run, reused by the restore figures


def measure_checkpoint_stall(train: Callable[[Any], Any], overrides: Sequence[str], *, work_dir: str,
                             repeats: int, max_steps: int, every_steps: int, seed: int = 0) -> StallResult:
    """Runs train.py's path with checkpoint.async false and true, interleaved, and reads
    `perf/checkpoint_save_seconds` (the controller's blocked time per save) from TensorBoard."""
    shuffler = random.Random(seed)
    blocked: dict[str, list[float]] = {"sync": [], "async": []}
    first: dict[str, list[float]] = {"sync": [], "async": []}
    example_run_dir, checkpoint_bytes = "", 0
    for repeat in range(repeats):
        modes = ["sync", "async"]
        shuffler.shuffle(modes)
        for mode in modes:
            run_dir = os.path.join(work_dir, f"stall-{mode}-{repeat}")
            shutil.rmtree(run_dir, ignore_errors=True)
            cfg = compose([*overrides, f"run_dir={run_dir}", f"trainer.max_steps={max_steps}",
                                  f"checkpoint.every_steps={every_steps}", f"trainer.steps_per_loop={every_steps}",
                                  f"trainer.log_every={every_steps}", "trainer.eval_every=0",
                                  "trainer.progress=none", "checkpoint.max_to_keep=2",
                                  f"checkpoint.async={str(mode == 'async').lower()}"])
            train(cfg)
            saves = [value for _, _, value in read_scalars(run_dir, "perf/checkpoint_save_seconds")]
            first[mode].append(saves[0])
            blocked[mode].extend(saves[1:])
            if mode == "sync":
                if example_run_dir:
                    shutil.rmtree(run_dir, ignore_errors=True)
                else:
                    example_run_dir = run_dir
                    checkpoint_bytes = sum(os.path.getsize(p) for p in glob.glob(
                        os.path.join(run_dir, "checkpoints", f"ckpt-{max_steps}.*")))
            else:
                shutil.rmtree(run_dir, ignore_errors=True)
            _clear_keras_session()
    return StallResult(blocked, first, checkpoint_bytes, example_run_dir)


# ---------------------------------------------------------------------------------------------
# Restore: process start to first resumed step, and read throughput
# ---------------------------------------------------------------------------------------------
def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG" and not k.startswith("SLURM_")}
    env.update({"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"})
    return env


def run_child(command: Sequence[str], *, timeout: float | None = 600) -> tuple[float, str]:
    """(launch wall time, stdout) of a child run from the project root that must succeed."""
    launched = time.time()
    completed = subprocess.run(list(command), cwd=PROJECT_ROOT, capture_output=True, text=True,
                               env=subprocess_env(), timeout=timeout)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {completed.returncode}:\n{completed.stderr[-3000:]}")
    return launched, completed.stdout


def bare_import_and_build_seconds(workload: Workload) -> float:
    """A child that only imports TensorFlow + Keras and builds the workload's model."""
    code = ("import os, time; os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2'); import tensorflow, keras; "
            "from models.mlp import build_mlp; "
            f"build_mlp(input_shape=({workload.input_dim},), num_outputs=10, hidden={list(workload.hidden)}); "
            "print(time.time())")
    launched, stdout = run_child([sys.executable, "-c", code])
    return float(stdout.strip().splitlines()[-1]) - launched


# Log lines of a train.py child that mark phases of its start-up (Hydra's default log format).
# The log lines a train.py child is timed to (any harness logger: the modules may move). Checked
# against a real run's log by tests/test_train_end_to_end.py.
LOG_MARKS = {"strategy built (TensorFlow imported)": re.compile(r"\]\[harness\.[\w.]+\]\[INFO\] - strategy: "),
             "checkpoint restored": re.compile(r"\]\[harness\.[\w.]+\]\[INFO\] - (resuming from checkpoint|"
                                               r"no checkpoint in)")}
_LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})\]")


@dataclass
class ChildTimeline:
    """Seconds from launching `python train.py ...` to points of its run."""

    first_step: float  # the first step of this process logged (its TensorBoard event)
    exit: float
    marks: dict[str, float]  # see LOG_MARKS; from the log line's timestamp (millisecond resolution)


def train_child_timeline(overrides: Sequence[str], *, run_dir: str, first_step: int) -> ChildTimeline:
    """Run `python train.py OVERRIDES` up to step `first_step` (one step per loop, logged) and time it."""
    launched, stdout = run_child([sys.executable, "train.py", *overrides, f"run_dir={run_dir}",
                                   f"trainer.max_steps={first_step}", "trainer.log_every=1", "trainer.steps_per_loop=1",
                                   "trainer.progress=log", "export.enabled=false"])
    exited = time.time()
    logged = [wall for step, wall, _ in read_scalars(run_dir, "train/loss") if step == first_step]
    if not logged:
        raise RuntimeError(f"no train/loss event at step {first_step} in {run_dir}")
    marks = {}
    for line in stdout.splitlines():
        stamp = _LOG_TIME.match(line)
        for name, pattern in LOG_MARKS.items():
            if stamp and name not in marks and pattern.search(line):
                clock = time.mktime(time.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S")) + int(stamp.group(2)) / 1e3
                marks[name] = clock - launched
    return ChildTimeline(logged[-1] - launched, exited - launched, marks)


@dataclass
class RestoreResult:
    resumed: list[ChildTimeline]  # launch -> restored -> first resumed step logged
    bare_import_build: list[float]  # seconds, launch -> `import tensorflow` + model built
    restore_seconds: dict[str, list[float]]  # "warm"/"cold" -> in-process `restore_latest` seconds
    plain_read_seconds: dict[str, list[float]]  # "warm"/"cold" -> plain reads of the same files
    checkpoint_bytes: int


def measure_restore(overrides: Sequence[str], workload: Workload, *, source_run_dir: str, work_dir: str,
                    repeats: int, seed: int = 0) -> RestoreResult:
    """End to end (subprocesses, interleaved with the bare baseline) and in-process read throughput."""
    from harness.checkpoint import checkpointer as checkpointing

    checkpoints = checkpointing.list_checkpoints(os.path.join(source_run_dir, "checkpoints"))
    step, prefix = checkpoints[0]
    files = sorted(glob.glob(prefix + ".*"))
    total_bytes = sum(os.path.getsize(p) for p in files)
    shuffler = random.Random(seed)
    resume, bare = [], []
    for repeat in range(repeats):
        jobs = ["resume", "bare"]
        shuffler.shuffle(jobs)
        for job in jobs:
            if job == "bare":
                bare.append(bare_import_and_build_seconds(workload))
                continue
            run_dir = os.path.join(work_dir, f"resume-{repeat}")
            shutil.rmtree(run_dir, ignore_errors=True)
            _copy_run(source_run_dir, run_dir, prefix)
            resume.append(train_child_timeline([*overrides, "trainer.eval_every=0"], run_dir=run_dir,
                                               first_step=step + 1))
            shutil.rmtree(run_dir, ignore_errors=True)
    restore, plain = _read_throughput(overrides, source_run_dir, files, repeats=repeats, shuffler=shuffler)
    return RestoreResult(resume, bare, restore, plain, total_bytes)


def _copy_run(source_run_dir: str, run_dir: str, prefix: str) -> None:
    """A run directory holding only the newest checkpoint of `source_run_dir` (and its config record)."""
    os.makedirs(os.path.join(run_dir, "checkpoints"))
    for path in glob.glob(prefix + ".*"):
        shutil.copy2(path, os.path.join(run_dir, "checkpoints"))


def _read_throughput(overrides: Sequence[str], source_run_dir: str, files: list[str], *, repeats: int,
                     shuffler: random.Random) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    from harness import runtime
    from harness.checkpoint import checkpointer as checkpointing
    from harness.config import run_config
    from harness.training import assembly

    run = run_config.to_typed_config(compose([*overrides, f"run_dir={source_run_dir}"]))
    runtime.configure_runtime(seed=run.seed, deterministic=False, mixed_precision=run.trainer.mixed_precision)
    train_state = assembly.build_train_state(run, assembly.load_task_data(run))
    checkpointer = checkpointing.Checkpointer.from_config(train_state, run.checkpoint, async_save=False,
                                                          is_chief=True)
    for path in files:  # dirty pages cannot be dropped from the cache
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    restore: dict[str, list[float]] = {"warm": [], "cold": []}
    plain: dict[str, list[float]] = {"warm": [], "cold": []}
    checkpointer.restore_latest()  # warm-up: traces the restore functions once
    for _ in range(repeats):
        jobs = [(kind, cache) for kind in ("restore", "plain") for cache in ("warm", "cold")]
        shuffler.shuffle(jobs)
        for kind, cache in jobs:
            if cache == "cold":
                drop_from_page_cache(files)
            else:
                _plain_read(files)  # make sure every byte is cached
            started = time.perf_counter()
            if kind == "restore":
                checkpointer.restore_latest()
            else:
                _plain_read(files)
            (restore if kind == "restore" else plain)[cache].append(time.perf_counter() - started)
    return restore, plain


def drop_from_page_cache(paths: Sequence[str]) -> None:
    """Ask the kernel to forget these files' cached pages (only these files; needs clean pages)."""
    for path in paths:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def _plain_read(paths: Sequence[str]) -> int:
    buffer = bytearray(16 << 20)
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while count := handle.readinto(buffer):
                total += count
    return total


# ---------------------------------------------------------------------------------------------
# Start-up
# ---------------------------------------------------------------------------------------------
@dataclass
class StartupResult:
    seconds: dict[str, list[float]]  # what -> launch-to-done seconds per repeat
    extra_imports: list[tuple[str, float]]  # train.py's imports beyond `import tensorflow`: (module, seconds)


def measure_startup(*, work_dir: str, repeats: int, seed: int = 0) -> StartupResult:
    """`python train.py model=mlp` (default config) launch -> first step and -> exit, against bare
    interpreters that print their clock once `pass` / `import tensorflow` is done, interleaved.

    Children are timed to a point they report, not to their exit: TensorFlow's interpreter shutdown
    alone takes about a second, which would make `import tensorflow` look slower than training.
    """
    shuffler = random.Random(seed)
    labels = {"pass": "python -c pass", "tensorflow": "python -c 'import tensorflow'"}
    seconds: dict[str, list[float]] = {label: [] for label in labels.values()}
    for name in [*(f"train.py: launch -> {mark}" for mark in LOG_MARKS), "train.py: launch -> first step",
                 "train.py: launch -> exit"]:
        seconds[name] = []
    for repeat in range(repeats):
        jobs = ["pass", "tensorflow", "train"]
        shuffler.shuffle(jobs)
        for job in jobs:
            if job == "train":
                run_dir = os.path.join(work_dir, f"startup-{repeat}")
                shutil.rmtree(run_dir, ignore_errors=True)
                timeline = train_child_timeline(["model=mlp", "trainer.eval_every=0"], run_dir=run_dir,
                                                first_step=1)
                for mark, value in timeline.marks.items():
                    seconds[f"train.py: launch -> {mark}"].append(value)
                seconds["train.py: launch -> first step"].append(timeline.first_step)
                seconds["train.py: launch -> exit"].append(timeline.exit)
                shutil.rmtree(run_dir, ignore_errors=True)
            else:
                statement = "pass" if job == "pass" else "import tensorflow"
                launched, stdout = run_child([sys.executable, "-c", f"import time; {statement}; print(time.time())"])
                seconds[labels[job]].append(float(stdout.strip().splitlines()[-1]) - launched)
    return StartupResult(seconds, extra_imports(work_dir))


def extra_imports(work_dir: str, top: int = 8) -> list[tuple[str, float]]:
    """What a `train.py model=mlp` run imports beyond `import tensorflow`: (package, seconds), slowest first.

    Sums `python -X importtime` self-times of every module the bare import does not load, per
    top-level package, so a heavy optional dependency imported eagerly shows up by name.
    """
    def self_times(command: list[str]) -> dict[str, float]:
        completed = subprocess.run([sys.executable, "-X", "importtime", *command], cwd=PROJECT_ROOT,
                                   capture_output=True, text=True, env=subprocess_env(), timeout=600)
        times: dict[str, float] = {}
        for line in completed.stderr.splitlines():
            parts = line.split("|")
            if line.startswith("import time:") and len(parts) == 3 and parts[1].strip().isdigit():
                times[parts[2].strip()] = int(parts[0].removeprefix("import time:")) / 1e6
        return times

    baseline = self_times(["-c", "import tensorflow"])
    run_dir = os.path.join(work_dir, "importtime")
    train = self_times(["train.py", "model=mlp", f"run_dir={run_dir}", "trainer.max_steps=1",
                        "trainer.eval_every=0", "trainer.progress=none", "export.enabled=false"])
    shutil.rmtree(run_dir, ignore_errors=True)
    packages: dict[str, float] = {}
    for module, seconds in train.items():
        if module not in baseline:
            packages[module.split(".")[0]] = packages.get(module.split(".")[0], 0.0) + seconds
    return sorted(packages.items(), key=lambda item: -item[1])[:top]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------------------------------------
# Checkpoint I/O at scale: the harness's save and restore against raw I/O of the same bytes
# ---------------------------------------------------------------------------------------------
def hidden_width_for(state_gigabytes: float, input_dim: int = 784) -> int:
    """The width w of an MLP input_dim-w-w-10 whose weights + Adam slots (float32) take this many GB."""
    parameters = state_gigabytes * 1e9 / 12
    b = input_dim + 10 + 3  # w^2 + (input_dim + 10 + 2 biases + 1) w + 10 ~ parameters
    return int((-b + math.sqrt(b * b + 4 * parameters)) / 2)


def memory_kib(field_name: str) -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(field_name + ":"))


def reset_peak_rss() -> None:
    """Make VmHWM start again from the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def drop_page_cache(paths: Sequence[str]) -> str:
    """Cold cache: every clean page of the machine if root may (`drop_caches`), else these files' pages."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3")
        return "drop_caches"
    except OSError:
        drop_from_page_cache(paths)
        return "posix_fadvise(DONTNEED)"


def raw_write_seconds(path: str, num_bytes: int) -> float:
    """Write `num_bytes` to a new file with large writes, fsync it and its directory; the file is removed."""
    block = bytearray(os.urandom(1 << 20)) * 64  # 64 MB, incompressible
    view = memoryview(block)
    started = time.perf_counter()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        remaining = num_bytes
        while remaining > 0:
            remaining -= os.write(descriptor, view[: min(remaining, len(view))])
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    directory = os.open(os.path.dirname(path), os.O_RDONLY)
    os.fsync(directory)
    os.close(directory)
    seconds = time.perf_counter() - started
    os.remove(path)
    return seconds


def checkpoint_io_child(state_gigabytes: float, *, mode: str, repeats: int, work_dir: str,
                        seed: int = 0) -> dict[str, Any]:
    """Runs in a fresh process (one per size and mode, so peak RSS starts clean): builds an MLP + Adam
    state of about `state_gigabytes`, then per repeat, in a random order, the harness's operation and
    raw I/O of the same bytes on the same filesystem.

    mode "sync": `Checkpointer.save` (blocked = written and durable) vs write + fsync; restore warm
    and cold (`restore_latest`: first read to every variable assigned and checked) vs reading the
    checkpoint's files. mode "async": the time training is blocked, the time until the write is
    durable, vs write + fsync. Peak RSS added = VmHWM during the operation - RSS before the first save.
    """
    import tensorflow as tf

    from harness.checkpoint import checkpointer as checkpointing

    width, train_state = _mlp_adam_state(state_gigabytes, seed=seed)
    state_bytes = state_size_bytes(train_state)
    directory = _checkpoint_dir(work_dir, state_gigabytes, mode)
    shutil.rmtree(directory, ignore_errors=True)
    checkpointer = checkpointing.Checkpointer(train_state, directory=directory, max_to_keep=1, keep_every_hours=None,
                                              async_save=mode == "async", is_chief=True)
    train_steps = _training_steps(train_state)
    train_steps(3)  # trace, and allocate what training needs (gradients, Adam's temporaries)
    # The peak of training without saving: the highest of 8 rounds. Which of TensorFlow's parallel op
    # schedules a step takes moves it by ~0.4x the state (gradients and Adam's temporaries alive at
    # once or not); 3 rounds sometimes saw only the lower one, which a long run does not keep to.
    baseline_kib = 0
    for _ in range(8):
        reset_peak_rss()
        train_steps(3)
        baseline_kib = max(baseline_kib, memory_kib("VmHWM"))
    figures: dict[str, list[float]] = {}
    shuffler = random.Random(seed)

    def record(name: str, value: float) -> None:
        figures.setdefault(name, []).append(value)

    for repeat in range(1, repeats + 1):
        jobs = ["save", "raw write"]
        shuffler.shuffle(jobs)
        for job in jobs:
            if job == "raw write":
                record("raw write + fsync", raw_write_seconds(os.path.join(work_dir, "raw.bin"), state_bytes))
                continue
            train_state.step.assign(repeat)
            reset_peak_rss()
            started = time.perf_counter()
            blocked = checkpointer.save(repeat)
            checkpointer.wait()
            record("save: durable", time.perf_counter() - started)
            record("save: training blocked", blocked)
            train_steps(3)  # training goes on after the save (an async staging copy stays alive)
            record("save: peak RSS added / state", (memory_kib("VmHWM") - baseline_kib) * 1024 / state_bytes)
    files = sorted(glob.glob(os.path.join(directory, "ckpt-*.*")))
    checkpoint_bytes = sum(os.path.getsize(p) for p in files)
    if mode == "sync":
        reader = checkpointing.Checkpointer(train_state, directory=directory, max_to_keep=1, keep_every_hours=None,
                                            async_save=False, is_chief=True)
        figures["cold cache by"] = [drop_page_cache(files)]  # type: ignore[list-item]
        started = time.perf_counter()
        reader.restore_latest()
        record("restore (cold, first in the process)", time.perf_counter() - started)
        for _ in range(repeats):
            jobs = [(kind, cache) for kind in ("restore", "raw read") for cache in ("warm", "cold")]
            shuffler.shuffle(jobs)
            for kind, cache in jobs:
                if cache == "cold":
                    figures["cold cache by"] = [drop_page_cache(files)]  # type: ignore[list-item]
                else:
                    _plain_read(files)
                seconds, added_bytes = restore_or_read(kind, reader, files)
                record(f"{kind} ({cache})", seconds)
                if kind == "restore":
                    record("restore: peak RSS added / state", added_bytes / state_bytes)
    del tf
    if mode != "sync":  # the sync run's checkpoint stays for `fresh_process_restore_child`
        shutil.rmtree(directory, ignore_errors=True)
    return {"state_bytes": state_bytes, "checkpoint_bytes": checkpoint_bytes, "width": width,
            "baseline_rss_bytes": baseline_kib * 1024, "figures": figures}


def fresh_process_restore_child(state_gigabytes: float, *, work_dir: str, seed: int) -> dict[str, float]:
    """What a resumed run does, in a fresh process: build the state (its initial values), then restore the sync
    child's checkpoint from a cold cache; and a cold raw read of its files, in a random order."""
    from harness.checkpoint import checkpointer as checkpointing

    _, train_state = _mlp_adam_state(state_gigabytes, seed=seed)
    directory = _checkpoint_dir(work_dir, state_gigabytes, "sync")
    files = sorted(glob.glob(os.path.join(directory, "ckpt-*.*")))
    reader = checkpointing.Checkpointer(train_state, directory=directory, max_to_keep=1, keep_every_hours=None,
                                        async_save=False, is_chief=True)
    jobs = ["restore", "raw read"]
    random.Random(seed).shuffle(jobs)
    figures = {}
    for job in jobs:
        drop_page_cache(files)
        figures[job], added_bytes = restore_or_read(job, reader, files)
        if job == "restore":
            figures["restore: peak RSS added"] = added_bytes
    return figures


def _checkpoint_dir(work_dir: str, state_gigabytes: float, mode: str) -> str:
    """Where `checkpoint_io_child` saves; the sync one is read again by `fresh_process_restore_child`."""
    return os.path.join(work_dir, f"checkpoints-{state_gigabytes:g}-{mode}")


def _mlp_adam_state(state_gigabytes: float, *, seed: int) -> tuple[int, Any]:
    """(w, the TrainState of an MLP 784-w-w-10 + Adam of about `state_gigabytes`), built as train.py builds it."""
    from harness.config import run_config
    from harness.training import modeling, optimization, state

    width = hidden_width_for(state_gigabytes)
    run = run_config.to_typed_config(compose(["model=mlp", f"model.hidden=[{width},{width}]", "optimizer=adam"]))
    model = modeling.build_model(run.model, input_shape=(784,), num_outputs=10, seed=seed)
    return width, state.create_train_state(model, optimization.build_optimizer(run.optimizer, max_steps=10))


def state_size_bytes(train_state: Any) -> int:
    """Bytes of the model's and optimizer's values (one device's), from their shapes: nothing is copied."""
    import tensorflow as tf

    return sum(variable.shape.num_elements() * tf.as_dtype(variable.dtype).size
               for variable in [*train_state.model.weights, *train_state.optimizer.variables])


def restore_or_read(kind: str, reader: Any, files: Sequence[str]) -> tuple[float, int]:
    """Seconds of `reader.restore_latest()` ("restore") or a raw read of `files`, and the peak RSS it added."""
    reset_peak_rss()
    before_kib = memory_kib("VmRSS")
    started = time.perf_counter()
    if kind == "restore":
        reader.restore_latest()
    else:
        _plain_read(files)
    return time.perf_counter() - started, (memory_kib("VmHWM") - before_kib) * 1024


def _training_steps(train_state: Any) -> Callable[[int], None]:
    """Real Adam steps on random batches of 32: what a run needs in memory without saving."""
    import tensorflow as tf

    model, optimizer = train_state.model, train_state.optimizer
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(features: tf.Tensor, labels: tf.Tensor) -> None:
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, model(features, training=True))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))

    def run(num_steps: int) -> None:
        for _ in range(num_steps):
            step(tf.random.uniform([32, 784]), tf.random.uniform([32], maxval=10, dtype=tf.int32))

    return run


def measure_checkpoint_io(sizes_gigabytes: Sequence[float], *, repeats: int, work_dir: str) -> list[dict[str, Any]]:
    """`checkpoint_io_child` for every size and mode, each in its own process, then `repeats` fresh processes
    restoring the sync child's checkpoint (added to its figures); results in order."""
    results = []
    for size in sizes_gigabytes:
        sync = {"gigabytes": size, "mode": "sync", **_child_result(
            f"checkpoint_io_child({size}, mode='sync', repeats={repeats}, work_dir={work_dir!r})",
            what=f"{size} GB, sync")}
        try:  # the sync child's checkpoint, read by fresh processes, then removed before the async child writes
            for seed in range(repeats):
                fresh = _child_result(f"fresh_process_restore_child({size}, work_dir={work_dir!r}, seed={seed})",
                                      what=f"{size} GB, fresh-process restore")
                sync["figures"].setdefault("restore (cold, fresh process)", []).append(fresh["restore"])
                sync["figures"].setdefault("raw read (cold, fresh process)", []).append(fresh["raw read"])
                sync["figures"].setdefault("restore, fresh process: peak RSS added / state", []).append(
                    fresh["restore: peak RSS added"] / sync["state_bytes"])
        finally:
            shutil.rmtree(_checkpoint_dir(work_dir, size, "sync"), ignore_errors=True)
        results.append(sync)
        results.append({"gigabytes": size, "mode": "async", **_child_result(
            f"checkpoint_io_child({size}, mode='async', repeats={repeats}, work_dir={work_dir!r})",
            what=f"{size} GB, async")})
    return results


def _child_result(call: str, *, what: str) -> Any:
    """`call` (a function of this module) in a fresh Python process; its JSON result."""
    code = f"import json; import {__name__} as b; print('RESULT' + json.dumps(b.{call}))"
    _, stdout = run_child([sys.executable, "-c", code], timeout=None)
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT")]
    if not lines:
        raise RuntimeError(f"checkpoint benchmark child ({what}) printed no result:\n{stdout[-3000:]}")
    return json.loads(lines[-1][len("RESULT"):])
