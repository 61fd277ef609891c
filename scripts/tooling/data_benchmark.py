#!/usr/bin/env python
"""Data bigger than memory, measured: peak RSS, steps/s and cold-cache read speed of file-backed input.

    python scripts/data_benchmark.py                          # 8 GB + 100 MB data sets, 3 repeats
    python scripts/data_benchmark.py --gigabytes 4 --repeats 5 --workdir /work/bench-data
    python scripts/data_benchmark.py --gigabytes 0 --repeats 5   # the 100 MB set only (no large set)

Generates two synthetic data sets of the docs/benchmarks.md workload (784 float32 features, 10
classes) once into --workdir, each as ArrayRecord shards (what `data=array_record` reads) and as
TFRecord files of the same records (what a TensorFlow user has today); the small one also as a .npz
archive (`data=npz`: in memory). Then, peers interleaved in a fresh random order every repeat:
- `train.py` subprocesses under `/usr/bin/time -v` (peak RSS), steps/s from the run's TensorBoard
  `perf/steps_per_second` scalars (log windows after the first, which holds tracing): in memory
  (small set only), array_record from the page cache (small and large set); both again with
  `trainer.intra_op_threads` = the cores minus one (`--intra-op-threads`), a core left to the input;
- the same workload as a user writes it today, in a subprocess of this script under the same
  `/usr/bin/time -v`: `TFRecordDataset` + `shuffle(10000)` + `batch` + `prefetch`, a
  `tf.function` step (Keras model, Adam), timed the same way (per 100-step window);
- cold-cache reads: the harness's `RecordShards.read` over random indices in batches of 256 (the
  training batch) from 4 threads (what tf.data's map runs), against `cat shards > /dev/null`,
  pages evicted before each with `posix_fadvise(DONTNEED)` (no root or drop_caches needed).
Prints markdown tables of medians and ratios; docs/benchmarks.md section 6 records runs. Nothing here
asserts speed. The command line is scripts/data_benchmark.py (and scripts/benchmark.py --sections data).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import os
import platform
import random
import re
import shutil
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, PROJECT_ROOT)

from harness.host import usable_cores  # noqa: E402  (after the path: run as a script)

FEATURE_SIZE = 784  # the docs/benchmarks.md MLP workload: 784-256-256-10, Adam 1e-3, batch 256
NUM_CLASSES = 10
GLOBAL_BATCH_SIZE = 256
RECORD_BYTES = 3_055  # sizes the data sets (kept): a record took 3 055 B in zstd shards, 3 237 B uncompressed
SHUFFLE_BUFFER = 10_000  # the TFRecord baseline's shuffle buffer, as tutorials write it
EVAL_FRACTION = 0.01  # eval at the end reads this share: small, so runs are about training
WARMUP_WINDOWS = 1  # first log window (tracing, pipeline warm-up) left out of steps/s
TRAIN_SETTINGS = ["model=mlp", "model.hidden=[256,256]", f"data.global_batch_size={GLOBAL_BATCH_SIZE}",
                  "optimizer=adam", "optimizer.learning_rate=0.001", "trainer.steps_per_loop=100",
                  "trainer.log_every=100", "trainer.eval_every=0", "checkpoint.every_steps=1000",
                  "trainer.progress=log", "export.enabled=false"]
TIME = "/usr/bin/time"


# ---------------------------------------------------------------------------------------------
# Data sets: generated once, reused
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataSet:
    """One synthetic data set in three formats under `root`."""

    name: str
    root: str
    num_records: int

    @property
    def array_record_dir(self) -> str:
        return os.path.join(self.root, "array_record")

    @property
    def tfrecord_dir(self) -> str:
        return os.path.join(self.root, "tfrecord")

    @property
    def array_record_files(self) -> list[str]:
        return sorted(glob.glob(os.path.join(self.array_record_dir, "data-*.array_record")))

    @property
    def tfrecord_files(self) -> list[str]:
        return sorted(glob.glob(os.path.join(self.tfrecord_dir, "data-*.tfrecord")))

    @property
    def npz_path(self) -> str:
        return os.path.join(self.root, "data.npz")

    def megabytes(self, files: Sequence[str]) -> float:
        return sum(os.path.getsize(path) for path in files) / 1e6

    def describe(self) -> str:
        return (f"{self.num_records} records of {FEATURE_SIZE} float32 + 1 int64 label: ArrayRecord "
                f"{self.megabytes(self.array_record_files):.0f} MB in {len(self.array_record_files)} shards, TFRecord "
                f"{self.megabytes(self.tfrecord_files):.0f} MB in {len(self.tfrecord_files)} files")


def records_for(megabytes: float) -> int:
    return max(4 * GLOBAL_BATCH_SIZE, round(megabytes * 1e6 / RECORD_BYTES))


def ensure_data_set(name: str, root: str, num_records: int, *, with_npz: bool) -> DataSet:
    """The data set in `root`, generated unless a previous run completed it with the same size."""
    data_set = DataSet(name, root, num_records)
    marker = os.path.join(root, "COMPLETE.json")
    if os.path.exists(marker):
        with open(marker) as handle:
            if json.load(handle).get("num_records") == num_records and (os.path.exists(data_set.npz_path)
                                                                        or not with_npz):
                return data_set
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    from harness.data.record_conversion import write_synthetic_shards

    started = time.perf_counter()
    print(f"generating {name}: {num_records} records into {root}", file=sys.stderr, flush=True)
    write_synthetic_shards(data_set.array_record_dir, num_records=num_records, feature_size=FEATURE_SIZE,
                           num_classes=NUM_CLASSES, seed=0)
    _copy_to_tfrecord(data_set)
    if with_npz:
        import numpy as np

        from harness.data.record_files import RecordShards

        with RecordShards(os.path.join(data_set.array_record_dir, "data-*"), features_key="features",
                          labels_key="labels") as shards:
            features, labels = shards.read(np.arange(shards.num_records))
        np.savez(data_set.npz_path, features=features, labels=labels.astype(np.int64))
    with open(marker, "w") as handle:
        json.dump({"num_records": num_records, "seconds": time.perf_counter() - started}, handle)
    print(f"generated {name} in {time.perf_counter() - started:.0f}s: {data_set.describe()}", file=sys.stderr)
    return data_set


def _copy_to_tfrecord(data_set: DataSet) -> None:
    """The same records, same order, as one TFRecord file per ArrayRecord shard (records copied as-is)."""
    import tensorflow as tf
    from array_record.python.array_record_module import ArrayRecordReader

    os.makedirs(data_set.tfrecord_dir, exist_ok=True)
    for path in data_set.array_record_files:
        reader = ArrayRecordReader(path, "readahead_buffer_size:16777216")
        target = os.path.join(data_set.tfrecord_dir, os.path.basename(path).replace(".array_record", ".tfrecord"))
        with tf.io.TFRecordWriter(target) as writer:
            count = reader.num_records()
            for start in range(0, count, 8192):
                for record in reader.read(list(range(start, min(count, start + 8192)))):
                    writer.write(record)
        reader.close()


# ---------------------------------------------------------------------------------------------
# One measured process: train.py, or the TFRecord baseline, under /usr/bin/time -v
# ---------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    steps_per_second: float  # median over the log windows after the first
    peak_rss_mb: float  # "Maximum resident set size" of /usr/bin/time -v
    wall_seconds: float


@dataclass
class Peer:
    """A contender: a command line whose run directory gets TensorBoard scalars or a JSON line."""

    name: str
    data_set: DataSet
    command: list[str]
    results: list[RunResult] = field(default_factory=list)


def ensure_time_binary() -> None:
    if not os.path.exists(TIME):
        raise SystemExit(f"{TIME} is missing: install it with `apt-get update && apt-get install -y time`")


def train_command(data_overrides: Sequence[str], *, max_steps: int) -> list[str]:
    """`python train.py ...` with the docs/benchmarks.md MLP workload and train.py benchmark settings."""
    return [sys.executable, os.path.join(PROJECT_ROOT, "train.py"), *data_overrides, *TRAIN_SETTINGS,
            f"data.eval_fraction={EVAL_FRACTION}", f"data.num_classes={NUM_CLASSES}", f"trainer.max_steps={max_steps}"]


def run_measured(command: list[str], run_dir: str) -> RunResult:
    """Run `command` (run_dir appended as `run_dir=...` for train.py) under /usr/bin/time -v."""
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    is_train = command[1].endswith("train.py")
    full = [TIME, "-v", *command, f"run_dir={run_dir}" if is_train else f"--out={run_dir}/windows.json"]
    log_path = os.path.join(run_dir, "process.log")
    started = time.perf_counter()
    with open(log_path, "w") as log_file:
        code = subprocess.call(full, stdout=log_file, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT)
    wall = time.perf_counter() - started
    with open(log_path) as handle:
        text = handle.read()
    if code != 0:
        raise RuntimeError(f"{' '.join(full)} exited {code}; see {log_path}:\n{text[-2000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    if is_train:
        windows = tensorboard_scalars(os.path.join(run_dir, "tensorboard"), "perf/steps_per_second")
    else:
        with open(os.path.join(run_dir, "windows.json")) as handle:
            windows = json.load(handle)
    rates = [rate for _, rate in sorted(windows)][WARMUP_WINDOWS:]
    return RunResult(statistics.median(rates), rss_kb / 1024, wall)


def tensorboard_scalars(log_dir: str, tag: str) -> list[tuple[int, float]]:
    """(step, value) of `tag` in the event files of `log_dir` (simple_value scalars, as the harness writes)."""
    from tensorboard.compat.proto import event_pb2

    points = []
    for path in sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))):
        with open(path, "rb") as handle:
            data = handle.read()
        offset = 0
        while offset + 12 <= len(data):  # TFRecord framing: u64 length, u32 crc, payload, u32 crc
            (length,) = struct.unpack_from("<Q", data, offset)
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            points += [(event.step, value.simple_value) for value in event.summary.value if value.tag == tag]
    return points


def tfrecord_baseline(pattern: str, *, max_steps: int, out: str) -> None:
    """What a TensorFlow user writes today: TFRecordDataset + shuffle(10000) + batch + parse + prefetch.

    The same model, optimizer and batch as train.py's workload; 100 steps per tf.function call (as
    train.py runs them), so the loop itself costs what the harness's does. Writes the steps/s of
    every 100-step window to `out` as JSON [[step, steps/s], ...].
    """
    import keras
    import tensorflow as tf

    from models.mlp import build_mlp

    spec = {"features": tf.io.FixedLenFeature([FEATURE_SIZE], tf.float32),
            "labels": tf.io.FixedLenFeature([], tf.int64)}

    def parse(records: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        parsed = tf.io.parse_example(records, spec)
        return parsed["features"], tf.cast(parsed["labels"], tf.int32)

    files = sorted(glob.glob(pattern))
    dataset = (tf.data.TFRecordDataset(files, num_parallel_reads=tf.data.AUTOTUNE)
               .shuffle(SHUFFLE_BUFFER).repeat()
               .batch(GLOBAL_BATCH_SIZE, drop_remainder=True)
               .map(parse, num_parallel_calls=tf.data.AUTOTUNE)
               .prefetch(tf.data.AUTOTUNE))
    keras.utils.set_random_seed(0)
    model = build_mlp(input_shape=(FEATURE_SIZE,), num_outputs=NUM_CLASSES, hidden=(256, 256))
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
    iterator = iter(dataset)

    @tf.function
    def train_steps(count: tf.Tensor) -> tf.Tensor:
        loss = tf.constant(0.0)
        for _ in tf.range(count):
            inputs, targets = next(iterator)
            with tf.GradientTape() as tape:
                logits = model(inputs, training=True)
                loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(targets, logits, from_logits=True))
            gradients = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss

    windows, count = [], tf.constant(100, tf.int64)
    for step in range(100, max_steps + 1, 100):
        started = time.perf_counter()
        float(train_steps(count))  # reading the loss waits for the steps
        windows.append([step, 100 / (time.perf_counter() - started)])
    with open(out, "w") as handle:
        json.dump(windows, handle)


def baseline_command(data_set: DataSet, *, max_steps: int) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--tfrecord-baseline",
            os.path.join(data_set.tfrecord_dir, "data-*.tfrecord"), f"--steps={max_steps}"]


# ---------------------------------------------------------------------------------------------
# Page cache: warm by reading everything, cold by evicting (no root needed)
# ---------------------------------------------------------------------------------------------
def evict(files: Sequence[str]) -> None:
    """Drop `files` from the page cache: written pages are synced first, then POSIX_FADV_DONTNEED."""
    from scripts.tooling.benchmarking import drop_from_page_cache

    os.sync()
    drop_from_page_cache(files)


def cat_seconds(files: Sequence[str]) -> float:
    """Wall seconds of `cat files > /dev/null`."""
    started = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def cached_fraction(files: Sequence[str]) -> float:
    """Share of the files' bytes in the page cache (util-linux `fincore`)."""
    output = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", *files],
                            capture_output=True, text=True, check=True).stdout
    resident = total = 0
    for line in output.splitlines():
        cached, size = map(int, line.split())
        resident, total = resident + cached, total + size
    return resident / max(total, 1)


def harness_read_rate(data_set: DataSet, *, seconds: float, threads: int = 4) -> tuple[float, int, float]:
    """(MB/s of records, records read, share of pages still cached after evicting) of
    `RecordShards.read` (read + parse, as training reads) over distinct records in random order,
    batches of GLOBAL_BATCH_SIZE from `threads` threads (tf.data's map calls run this way), cold:
    evicted after opening, for about `seconds` or until all are read."""
    import numpy as np

    from harness.data.record_files import RecordShards

    files = data_set.array_record_files
    bytes_per_record = data_set.megabytes(files) * 1e6 / data_set.num_records
    with RecordShards(os.path.join(data_set.array_record_dir, "data-*"), features_key="features",
                      labels_key="labels") as shards:
        order = np.random.default_rng(time.time_ns()).permutation(shards.num_records)
        batches = iter(np.array_split(order, max(1, len(order) // GLOBAL_BATCH_SIZE)))
        deadline = 0.0

        def reader() -> int:
            done = 0
            while time.perf_counter() < deadline:
                indices = next(batches, None)  # next() on a shared iterator: atomic under the GIL
                if indices is None:
                    break
                shards.read(indices)
                done += len(indices)
            return done

        evict(files)  # after opening: the shard indexes are in memory, as in a training run
        left = cached_fraction(files)
        started = time.perf_counter()
        deadline = started + seconds
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            records = sum(pool.map(lambda _: reader(), range(threads)))
        elapsed = time.perf_counter() - started
    return records * bytes_per_record / elapsed / 1e6, records, left


# ---------------------------------------------------------------------------------------------
# The section: every peer, interleaved, medians and ratios
# ---------------------------------------------------------------------------------------------
def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def machine_lines(workdir: str) -> list[str]:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as handle:
        cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    with open("/proc/meminfo") as handle:
        meminfo = {line.split(":")[0]: int(line.split()[1]) for line in handle}
    memory_gb, swap_gb = meminfo["MemTotal"] / 1024 / 1024, meminfo["SwapTotal"] / 1024 / 1024
    disk = subprocess.run(["df", "-h", "--output=source,fstype,size,avail", workdir], capture_output=True,
                          text=True).stdout.splitlines()[-1].split()
    import tensorflow as tf

    return [f"- {os.cpu_count()} cores (`nproc`), `{cpu}`, {memory_gb:.1f} GB RAM, {swap_gb:.1f} GB swap",
            f"- data on `{disk[0]}` ({disk[1]}, {disk[2]}, {disk[3]} free), Python {platform.python_version()}, "
            f"TensorFlow {tf.__version__}",
            f"- load average at start {os.getloadavg()[0]:.2f} (1 min)"]


def run_data_section(args: argparse.Namespace) -> list[str]:
    """Generate (or reuse) the data sets, run every peer interleaved, return markdown lines."""
    gigabytes = getattr(args, "gigabytes", 8.0)
    small_megabytes = getattr(args, "small_megabytes", 100.0)
    repeats = getattr(args, "repeats", 3)
    steps = getattr(args, "data_steps", 1500)
    cold_seconds = getattr(args, "cold_seconds", 20.0)
    workdir = getattr(args, "workdir", None) or "/work/bench-data"
    intra_op_threads = getattr(args, "intra_op_threads", None)
    if intra_op_threads is None:  # default: a core left to the input
        intra_op_threads = usable_cores() - 1
    if intra_op_threads < 0:
        raise SystemExit(f"--intra-op-threads {intra_op_threads}: expected 0 (no such peers) or a positive count")
    ensure_time_binary()
    os.makedirs(workdir, exist_ok=True)  # machine_lines asks df about it
    lines = ["## Data bigger than memory (issue 12)", "", *machine_lines(workdir)]
    small = ensure_data_set("small", os.path.join(workdir, "small"), records_for(small_megabytes), with_npz=True)
    large = (ensure_data_set("large", os.path.join(workdir, "large"), records_for(gigabytes * 1000), with_npz=False)
             if gigabytes > 0 else None)  # --gigabytes 0: the small set only
    small_label, large_label = f"{small_megabytes:g} MB", f"{gigabytes:g} GB"
    lines += [f"- small set ({small_label}): {small.describe()}",
              f"- large set ({large_label}): {large.describe()}" if large else "- no large set (--gigabytes 0)", ""]

    def array_record(data_set: DataSet) -> list[str]:
        return train_command(["data=array_record", f"data.path={data_set.array_record_dir}/data-*"], max_steps=steps)

    baseline = "TFRecordDataset+shuffle+batch+prefetch"
    memory = Peer(f"train.py data=npz, in memory ({small_label})", small,
                  train_command(["data=npz", f"data.path={small.npz_path}"], max_steps=steps))
    # The same arrays through the tf.data pipeline that file-backed data takes (prefetch 4 = FILE_PREFETCH),
    # minus the reads: splits array_record's gap to in memory into the pipeline's share and the reads'.
    memory_pipeline = Peer(f"train.py data=npz data.prefetch=4, in memory through tf.data ({small_label})", small,
                           train_command(["data=npz", f"data.path={small.npz_path}", "data.prefetch=4"],
                                         max_steps=steps))
    array_small = Peer(f"train.py data=array_record ({small_label})", small, array_record(small))
    tfrecord_small = Peer(f"{baseline} ({small_label})", small, baseline_command(small, max_steps=steps))
    peers = [memory, memory_pipeline, array_small, tfrecord_small]
    # Both again with the step's ops on fewer threads than the host has cores, a core left to the input (as on an
    # accelerator host, where the step leaves every core to it): the input can then hide behind the step.
    limit = f"trainer.intra_op_threads={intra_op_threads}"

    def limited(peer: Peer) -> Peer:
        return Peer(f"{peer.name}, {limit}", peer.data_set, [*peer.command, limit])

    if intra_op_threads:
        memory_threads, array_threads = limited(memory), limited(array_small)
        peers += [memory_threads, array_threads]
    if large:
        array_large = Peer(f"train.py data=array_record ({large_label})", large, array_record(large))
        tfrecord_large = Peer(f"{baseline} ({large_label})", large, baseline_command(large, max_steps=steps))
        peers += [array_large, tfrecord_large]
        if intra_op_threads:
            array_large_threads = limited(array_large)
            peers.append(array_large_threads)
    cached: dict[str, list[float]] = {peer.name: [] for peer in peers}
    runs_dir = os.path.join(workdir, "runs")
    for repeat in range(repeats):
        order = random.sample(peers, len(peers))
        for peer in order:
            files = peer.data_set.tfrecord_files if "TFRecord" in peer.name else (
                [peer.data_set.npz_path] if "npz" in peer.name else peer.data_set.array_record_files)
            if cached_fraction(files) < 0.99:
                cat_seconds(files)  # warm: this comparison is from the page cache
            before = cached_fraction(files)
            result = run_measured(peer.command, os.path.join(runs_dir, f"{len(peer.results)}-{peers.index(peer)}"))
            after = cached_fraction(files)  # other processes' memory pressure can evict pages mid-run
            cached[peer.name].append(min(before, after))
            peer.results.append(result)
            print(f"repeat {repeat + 1}/{repeats} {peer.name}: {result.steps_per_second:.1f} steps/s, "
                  f"peak RSS {result.peak_rss_mb:.0f} MB, {result.wall_seconds:.1f}s, page cache {100 * before:.0f} % "
                  f"before, {100 * after:.0f} % after", file=sys.stderr, flush=True)
    load_after_training = os.getloadavg()[0]

    def ratios(numerator: Peer, denominator: Peer, attribute: str) -> list[float]:
        return [getattr(a, attribute) / getattr(b, attribute) for a, b in zip(numerator.results, denominator.results)]

    lines += [f"### Steps/s and peak RSS ({repeats} interleaved repeats, {steps} steps each; steps/s is the median of "
              f"the {steps // 100 - WARMUP_WINDOWS} 100-step windows after the first)", "",
              "| peer | steps/s: median | min | max | vs in memory (median of ratios) | peak RSS MB: median | max "
              "| data in page cache (min before/after a run, min over runs) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for peer in peers:
        rates = [result.steps_per_second for result in peer.results]
        rss = [result.peak_rss_mb for result in peer.results]
        lines.append(f"| {peer.name} | {_median(rates):.1f} | {min(rates):.1f} | {max(rates):.1f} | "
                     f"{_median(ratios(peer, memory, 'steps_per_second')):.3f} | {_median(rss):.0f} | {max(rss):.0f} | "
                     f"{100 * min(cached[peer.name]):.0f} % |")
    speed_small = _median(ratios(array_small, memory, "steps_per_second"))
    lines += ["", "| ratio (median of per-repeat ratios) | value |", "|---|---:|",
              f"| array_record {small_label} / in memory, steps/s | {speed_small:.3f} |",
              f"| array_record {small_label} / TFRecordDataset {small_label}, steps/s | "
              f"{_median(ratios(array_small, tfrecord_small, 'steps_per_second')):.3f} |",
              f"| in memory through tf.data / in memory ({small_label}), steps/s: the pipeline's share | "
              f"{_median(ratios(memory_pipeline, memory, 'steps_per_second')):.3f} |",
              f"| array_record / in memory through tf.data ({small_label}), steps/s: the reads' share | "
              f"{_median(ratios(array_small, memory_pipeline, 'steps_per_second')):.3f} |",
              f"| in-memory peak RSS / array_record peak RSS ({small_label}) | "
              f"{_median(ratios(memory, array_small, 'peak_rss_mb')):.3f} |"]
    if intra_op_threads:
        speed_small_threads = _median(ratios(array_threads, memory_threads, "steps_per_second"))
        lines.append(f"| array_record / in memory ({small_label}), both with {limit}, steps/s | "
                     f"{speed_small_threads:.3f} |")
    if large:
        speed_large = _median(ratios(array_large, memory, "steps_per_second"))
        rss_large = max(result.peak_rss_mb for result in array_large.results)
        rss_ratio = _median(ratios(array_large, array_small, "peak_rss_mb"))
        lines += [f"| array_record {large_label} / in memory, steps/s | {speed_large:.3f} |",
                  f"| array_record {large_label} / TFRecordDataset {large_label}, steps/s | "
                  f"{_median(ratios(array_large, tfrecord_large, 'steps_per_second')):.3f} |",
                  f"| array_record peak RSS, {large_label} / {small_label} | {rss_ratio:.3f} |",
                  f"| TFRecordDataset peak RSS, {large_label} / {small_label} | "
                  f"{_median(ratios(tfrecord_large, tfrecord_small, 'peak_rss_mb')):.3f} |"]
        if intra_op_threads:
            speed_large_threads = _median(ratios(array_large_threads, memory_threads, "steps_per_second"))
            lines.append(f"| array_record {large_label} / in memory, both with {limit}, steps/s | "
                         f"{speed_large_threads:.3f} |")
    lines += ["", f"Load average (1 min) after the training runs: {load_after_training:.2f}.", ""]
    data_sets = [(small, small_label)] + ([(large, large_label)] if large else [])

    cold: dict[str, list[float]] = {}
    cold_records: dict[str, list[int]] = {}
    still_cached: list[float] = []
    for _ in range(repeats):
        tasks = [(data_set, kind) for data_set, _ in data_sets for kind in ("harness", "cat")]
        for data_set, kind in random.sample(tasks, len(tasks)):
            key = f"{kind} {data_set.name}"
            if kind == "harness":
                rate, records, left = harness_read_rate(data_set, seconds=cold_seconds)
                cold_records.setdefault(key, []).append(records)
            else:
                evict(data_set.array_record_files)
                left = cached_fraction(data_set.array_record_files)
                rate = data_set.megabytes(data_set.array_record_files) / cat_seconds(data_set.array_record_files)
            cold.setdefault(key, []).append(rate)
            still_cached.append(left)
            print(f"cold {key}: {rate:.1f} MB/s ({100 * left:.1f} % of the pages still cached after evicting)",
                  file=sys.stderr, flush=True)
    lines += [f"### Cold-cache reads of the ArrayRecord shards ({repeats} interleaved repeats; pages evicted with "
              "posix_fadvise(DONTNEED) before each)", "",
              "| data set | harness `RecordShards.read`, random order, 4 threads x 256 records: MB/s | records read "
              "| `cat shards > /dev/null`: MB/s | harness / cat |", "|---|---:|---:|---:|---:|"]
    for data_set, label in data_sets:
        harness, raw = cold[f"harness {data_set.name}"], cold[f"cat {data_set.name}"]
        lines.append(f"| {label} | {_median(harness):.1f} | {int(_median(cold_records[f'harness {data_set.name}']))} | "
                     f"{_median(raw):.1f} | {_median([h / c for h, c in zip(harness, raw)]):.3f} |")
    lines += ["", f"After evicting, at most {100 * max(still_cached):.1f} % of a data set's pages were still in this "
              "machine's page cache (fincore). A virtual disk may still be cached by the host, so `cat` can read "
              "faster than the device."]
    lines += ["", "### Targets", ""]
    if large:
        lines += [f"- Peak RSS of the {large_label} run below 1.5 GB: {rss_large:.0f} MB (max over repeats): "
                  f"**{_verdict(rss_large < 1536)}**.",
                  f"- The same as the {small_label} run within 20 %: ratio {rss_ratio:.3f}: "
                  f"**{_verdict(abs(rss_ratio - 1) <= 0.2)}**."]
    speeds = {small_label: speed_small, **({large_label: speed_large} if large else {})}
    lines.append(f"- File-backed from the page cache >= 0.9x in-memory steps/s, TensorFlow's default threads: "
                 f"{_speeds(speeds)}: **{_verdict(min(speeds.values()) >= 0.9)}**.")
    if intra_op_threads:
        speeds = {small_label: speed_small_threads, **({large_label: speed_large_threads} if large else {})}
        lines.append(f"- The same, both with {limit} (a core left to the input): {_speeds(speeds)}: "
                     f"**{_verdict(min(speeds.values()) >= 0.9)}**.")
    return lines if large else [*lines, "- (no large set run)"]


def _verdict(met: bool) -> str:
    return "met" if met else "not met"


def _speeds(speeds: dict[str, float]) -> str:
    return ", ".join(f"{ratio:.3f} ({label})" for label, ratio in speeds.items())


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gigabytes", type=float, default=8.0, help="size of the large data set; 0: none")
    parser.add_argument("--small-megabytes", type=float, default=100.0, help="size of the small data set")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-steps", type=int, default=1500, help="training steps per run (multiple of 100)")
    parser.add_argument("--cold-seconds", type=float, default=20.0, help="time budget of one cold harness read")
    parser.add_argument("--workdir", default="/work/bench-data", help="data sets (reused) and run directories")
    parser.add_argument("--intra-op-threads", type=int, metavar="N",
                        help="also run in memory and array_record with trainer.intra_op_threads=N (default: the "
                             "cores minus one; 0: not)")
    parser.add_argument("--tfrecord-baseline", metavar="GLOB", help=argparse.SUPPRESS)  # a peer's own process
    parser.add_argument("--steps", type=int, default=1500, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(argv)
    if args.tfrecord_baseline:
        tfrecord_baseline(args.tfrecord_baseline, max_steps=args.steps, out=args.out)
        return 0
    print("\n".join(run_data_section(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
