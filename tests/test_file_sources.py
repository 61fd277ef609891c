"""Data bigger than memory: ArrayRecord shards and token files read by index (harness/data/file_sources.py).

In-process: file-backed batches are the in-memory batches, for any number of input pipelines, and
the eval split is covered once. End to end with real processes: a SIGKILLed array_record run
resumes bit-exactly and ends where the same data held in memory ends; a token-file language model
likewise; a run saved by 2 workers resumes on 1 with the same global batches; a record that goes
bad mid-run exits 2 naming it, checkpoints untouched; shards that gained records are refused on
resume.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import train
from harness.config.schema import ArrayRecordDataConfig, NpzDataConfig, TextDataConfig, TokensDataConfig
from harness.data.file_sources import array_record, text_file, tokens
from harness.data.in_memory_sources import load_examples
from harness.data.pipeline import SeekableInput
from harness.data.record_conversion import write_array_shards
from harness.errors import DataError
from harness.host import has_accelerators, usable_cores
from scripts.tooling.chaos import compare_checkpoints
from tests.background import BackgroundRun, sigkill_after_checkpoint
from tests.conftest import (
    PROJECT_ROOT,
    assert_ok,
    checkpoint_values,
    compose,
    run_train,
    subprocess_env,
    train_command,
)

NUM_RECORDS, WIDTH, CLASSES = 2400, 16, 4


def _data_set(directory: Path) -> tuple[Path, Path]:
    """The same examples as an .npz archive and as 3 ArrayRecord shards."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(NUM_RECORDS, WIDTH)).astype(np.float32)
    labels = features[:, :CLASSES].argmax(axis=1).astype(np.int64)
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(directory / "data.npz", features=features, labels=labels)
    write_array_shards(features, labels, str(directory / "shards"), num_shards=3, class_ids=True)
    return directory / "data.npz", directory / "shards"


def _pipelines(examples, *, num_replicas: int) -> SeekableInput:
    return SeekableInput(examples, global_batch_size=8 * num_replicas, eval_batch_size=8 * num_replicas,
                         shuffle_seed=3, prefetch=0, num_replicas=num_replicas)


def _batches(pipeline: SeekableInput, *, workers: int, steps: int, start_step: int = 0) -> list[np.ndarray]:
    """Per step, the global batch's features as the `workers` input pipelines produce them together."""
    per_worker = []
    for worker in range(workers):
        context = tf.distribute.InputContext(num_input_pipelines=workers, input_pipeline_id=worker,
                                             num_replicas_in_sync=pipeline.num_replicas)
        local = pipeline.num_replicas // workers
        batches = list(pipeline.train_dataset(context, start_step=start_step).take(steps * local))
        per_worker.append([np.concatenate([b.features.numpy() for b in batches[s * local:(s + 1) * local]])
                           for s in range(steps)])
    return [np.concatenate([per_worker[w][s] for w in range(workers)]) for s in range(steps)]


def test_file_backed_batches_are_the_in_memory_batches_for_any_number_of_workers(tmp_path: Path) -> None:
    npz, shards = _data_set(tmp_path)
    in_memory = load_examples(NpzDataConfig(path=str(npz)))
    from_files = array_record(ArrayRecordDataConfig(path=str(shards / "*")))
    assert (from_files.num_train, from_files.num_eval) == (len(in_memory.train_targets), len(in_memory.eval_targets))
    reference = _batches(_pipelines(in_memory, num_replicas=2), workers=1, steps=9, start_step=290)  # epoch 2
    assert _pipelines(from_files, num_replicas=2).batches_per_read(8) == 8  # so 9 steps span several reads
    for workers in (1, 2):
        batches = _batches(_pipelines(from_files, num_replicas=2), workers=workers, steps=9, start_step=290)
        for expected, actual in zip(reference, batches, strict=True):
            np.testing.assert_array_equal(actual, expected)
    # Eval: every eval example once, padding weighted 0, whatever the pipeline count.
    pipeline = _pipelines(from_files, num_replicas=2)
    seen = []
    for worker in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker, num_replicas_in_sync=2)
        for batch in pipeline.eval_dataset(context):
            seen.extend(map(tuple, batch.features.numpy()[batch.weights.numpy() > 0]))
    assert sorted(seen) == sorted(map(tuple, in_memory.eval_features))


def test_a_bad_record_is_reported_only_for_the_error_it_caused(tmp_path: Path) -> None:
    """tf.numpy_function turns a read's DataError into an anonymous OpError: the pipeline names the DataError
    behind it, but a failed read (e.g. one read ahead) is not blamed for another error, such as a lost peer; and
    a run that ends before the bad record never reads it."""
    npz, shards = _data_set(tmp_path)
    examples = array_record(ArrayRecordDataConfig(path=str(shards / "*")))
    bad = int(examples.train.rows[examples.train.rows >= NUM_RECORDS // 3][0])  # a train record of the 2nd shard
    victim = sorted(shards.iterdir())[1]
    content = bytearray(victim.read_bytes())
    offset = content.find(np.load(npz)["features"][bad].tobytes())
    assert offset > 0
    content[offset + 8] ^= 0xFF
    victim.write_bytes(bytes(content))
    pipeline = _pipelines(examples, num_replicas=1)
    context = tf.distribute.InputContext()
    with pytest.raises(tf.errors.OpError) as failed:
        for _ in pipeline.train_dataset(context, start_step=0).take(2 * NUM_RECORDS // 8):  # two epochs
            pass
    data_error = pipeline.read_failure_behind(failed.value)
    assert isinstance(data_error, DataError) and re.search(
        rf"Record {bad} \(record \d+ of shard '{re.escape(str(victim))}', data.path\) cannot be read", str(data_error))
    assert pipeline.read_failure_behind(tf.errors.UnavailableError(None, None, "Socket closed")) is None
    # Reads go 8 batches at a time, but never past the run's last step: a run ending 3 steps before the bad
    # record's completes, one ending on it fails.
    position = int(np.flatnonzero(examples.train.rows == bad)[0])  # where the bad record lies in the train split
    permutation = pipeline.train_indices(tf.range(len(examples.train.rows), dtype=tf.int64)).numpy()  # epoch 0
    bad_step = int(np.flatnonzero(permutation == position)[0]) // pipeline.global_batch_size
    assert bad_step >= 3 and pipeline.batches_per_read(8) == 8
    assert len(list(pipeline.train_dataset(context, start_step=bad_step - 3, num_steps=3))) == 3
    with pytest.raises(tf.errors.OpError) as failed:
        list(pipeline.train_dataset(context, start_step=bad_step - 3, num_steps=4))
    assert f"Record {bad} " in str(pipeline.read_failure_behind(failed.value))


def test_eval_shards_of_their_own_and_of_another_layout(tmp_path: Path) -> None:
    """`data.eval_path`: the eval split is every record of those shards; shards whose batches would not stack
    with the training ones (another feature length, float targets for int64 class ids) are refused."""
    rng = np.random.default_rng(1)
    training = rng.normal(size=(40, WIDTH)).astype(np.float32)
    evaluation = rng.normal(size=(9, WIDTH)).astype(np.float32)
    write_array_shards(training, training[:, :CLASSES].argmax(axis=1), str(tmp_path / "train"), num_shards=2)
    write_array_shards(evaluation, evaluation[:, :CLASSES].argmax(axis=1), str(tmp_path / "eval"), num_shards=1)
    write_array_shards(evaluation[:, :-1], evaluation[:, :CLASSES].argmax(axis=1), str(tmp_path / "narrow"),
                       num_shards=1)
    write_array_shards(evaluation, evaluation[:, 0], str(tmp_path / "float_targets"), num_shards=1)

    def config(eval_dir: str) -> ArrayRecordDataConfig:
        return ArrayRecordDataConfig(path=str(tmp_path / "train" / "*"), eval_path=str(tmp_path / eval_dir / "*"))

    examples = array_record(config("eval"))
    assert (examples.num_train, examples.num_eval) == (40, 9)
    np.testing.assert_array_equal(examples.eval.read(np.arange(9))[0], evaluation)
    for eval_dir, layout in (("narrow", f"{WIDTH - 1} float32, 'labels': 1 int64"),
                             ("float_targets", f"{WIDTH} float32, 'labels': 1 float32")):
        with pytest.raises(DataError, match=rf"The records of data.eval_path '.*{eval_dir}/\*' \('features': "
                                            rf"{re.escape(layout)}\) differ from those of data.path"):
            array_record(config(eval_dir))


def test_token_windows_are_read_from_the_file_and_match_the_bytes(tmp_path: Path) -> None:
    text = (b"the quick brown fox jumps over the lazy dog. " * 40)
    (tmp_path / "corpus.txt").write_bytes(text)
    np.frombuffer(text, np.uint8).astype(np.uint16).tofile(tmp_path / "corpus.bin")
    in_memory = load_examples(TextDataConfig(path=str(tmp_path / "corpus.txt"), seq_len=16))
    for examples in (text_file(TextDataConfig(path=str(tmp_path / "corpus.txt"), seq_len=16)),
                     tokens(TokensDataConfig(path=str(tmp_path / "corpus.bin"), dtype="uint16", seq_len=16,
                                             eval_fraction=0.1))):
        assert (examples.num_train, examples.num_eval) == (len(in_memory.train_targets), len(in_memory.eval_targets))
        features, targets = examples.train.read(np.array([0, 7, 3]))
        np.testing.assert_array_equal(features, in_memory.train_features[[0, 7, 3]])
        np.testing.assert_array_equal(targets, in_memory.train_targets[[0, 7, 3]])
        np.testing.assert_array_equal(examples.eval.read(np.array([1]))[1], in_memory.eval_targets[[1]])


def _record_with_label_past_the_classes(directory: Path) -> tuple[str, ...]:
    """Classification on 5000 records (train) whose record 4900, past the task's 4096-record sample, is class 7
    of 4; the eval split is shards of its own."""
    rng = np.random.default_rng(3)
    features = rng.normal(size=(5000, WIDTH)).astype(np.float32)
    labels = features[:, :CLASSES].argmax(axis=1)
    labels[4900] = 7
    write_array_shards(features, labels, str(directory / "train"), num_shards=2)
    write_array_shards(features[:100], labels[:100], str(directory / "eval"), num_shards=1)
    return ("data=array_record", f"data.path={directory / 'train'}/*", f"data.eval_path={directory / 'eval'}/*",
            "data.num_classes=4", "model.hidden=[8]")


def _token_past_the_vocabulary(directory: Path) -> tuple[str, ...]:
    """A byte-vocabulary language model on 80 000 uint16 tokens whose token 75 000 (train, past the 4096 windows
    of the task's sample) is 300."""
    tokens = np.random.default_rng(4).integers(0, 256, 80_000).astype(np.uint16)
    tokens[75_000] = 300
    tokens.tofile(directory / "tokens.bin")
    return ("task=language_model", "data=tokens", f"data.path={directory / 'tokens.bin'}", "data.vocab_size=256",
            "data.seq_len=16", "model.num_layers=1", "model.d_model=16", "model.num_heads=2", "model.mlp_dim=16")


@pytest.mark.parametrize("case, message", [
    (_record_with_label_past_the_classes,
     r"Record 4900 \(record 2400 of shard '.*train/data-00001-of-00002.array_record', data.path\) has label 7; "
     r"expected a class id in \[0, 3\] \(task 'classification' has 4 classes"),
    (_token_past_the_vocabulary,
     r"The window of tokens 74992..75008 of '.*tokens.bin' \(data.path\) has token id 300; expected ids in "
     r"\[0, 255\] \(the vocabulary size of task 'language_model'"),
], ids=["class_id", "token_id"])
def test_an_example_the_task_would_refuse_past_its_sample_stops_the_run_naming_it(
        tmp_path: Path, case, message: str) -> None:
    """The task checks a sample of data bigger than memory at start-up and every batch as it is read: a bad
    example further on is a `DataError` (exit 2), not an error inside the loss (a traceback, exit 1)."""
    overrides = case(tmp_path)
    with pytest.raises(DataError, match=message):
        train.train(compose(f"run_dir={tmp_path / 'run'}", *overrides, "data.global_batch_size=64",
                            "trainer.max_steps=100", "trainer.steps_per_loop=10", "trainer.eval_every=0",
                            "checkpoint.every_steps=50", "export.enabled=false", "lease.enabled=false", tiny=False))


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------
RUN = ("deterministic=true", "model.hidden=[32]", "model.dropout=0.2", "data.global_batch_size=64",
       "trainer.max_steps=40", "trainer.steps_per_loop=5", "trainer.log_every=10", "trainer.eval_every=20",
       "checkpoint.every_steps=10", "export.enabled=false", "data.num_classes=4")


@pytest.fixture(scope="module")
def data_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _data_set(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def in_memory_run(tmp_path_factory: pytest.TempPathFactory, data_set: tuple[Path, Path]) -> Path:
    """The reference: the same examples held in memory (data=npz), 40 steps on one device."""
    run_dir = tmp_path_factory.mktemp("in_memory") / "run"
    assert_ok(run_train(run_dir, "data=npz", f"data.path={data_set[0]}", *RUN, tiny=False))
    return run_dir


def _shards_overrides(shards: Path) -> tuple[str, ...]:
    return ("data=array_record", f"data.path={shards}/*", *RUN)


@pytest.mark.slow
def test_array_record_run_resumes_bit_exactly_and_equals_the_in_memory_run(
        tmp_path: Path, data_set: tuple[Path, Path], in_memory_run: Path) -> None:
    run_dir, overrides = tmp_path / "run", _shards_overrides(data_set[1])
    sigkill_after_checkpoint(train_command(run_dir, *overrides, tiny=False), 10, env=subprocess_env())
    # Resumed with TensorFlow's thread pools resized (the advice for CPU-only hosts): how it trains, not what.
    resumed = run_train(run_dir, *overrides, "trainer.intra_op_threads=1", "trainer.inter_op_threads=1", tiny=False)
    assert_ok(resumed)
    log_text = resumed.stdout + resumed.stderr
    assert re.search(r"resuming from checkpoint \S+ at step [1-3]0", log_text)
    assert "threads: intra-op 1, inter-op 1" in log_text  # read back from TensorFlow's config
    assert compare_checkpoints(run_dir / "checkpoints" / "ckpt-40", in_memory_run / "checkpoints" / "ckpt-40") == []

    # Shards that gained records since the checkpoint: refused like any change of what is trained.
    extra = np.random.default_rng(1).normal(size=(300, WIDTH)).astype(np.float32)
    write_array_shards(extra, extra[:, :CLASSES].argmax(axis=1), str(tmp_path / "extra"), num_shards=1,
                       class_ids=True)
    (tmp_path / "extra" / "data-00000-of-00001.array_record").rename(data_set[1] / "data-extra.array_record")
    try:
        before = {path.name: path.read_bytes() for path in (run_dir / "checkpoints").iterdir()}
        refused = run_train(run_dir, *overrides, "trainer.max_steps=50", tiny=False)
        assert_ok(refused, code=2)
        assert "data.records.train: 2160 -> 2430" in refused.stderr and "Traceback" not in refused.stderr
        assert {path.name: path.read_bytes() for path in (run_dir / "checkpoints").iterdir()} == before
    finally:
        (data_set[1] / "data-extra.array_record").unlink()


@pytest.mark.slow
def test_a_run_saved_by_two_workers_resumes_on_one_with_the_same_batches(
        tmp_path: Path, data_set: tuple[Path, Path], in_memory_run: Path) -> None:
    """Elastic restart after losing a VM: 2 workers train to step 20, then 1 worker to step 40."""
    run_dir, overrides = tmp_path / "run", _shards_overrides(data_set[1])
    gang = [sys.executable, str(PROJECT_ROOT / "scripts" / "launch_local.py"), "--workers", "2", "--",
            f"run_dir={run_dir}", *overrides, "trainer.max_steps=20", "model.dropout=0.0"]
    with BackgroundRun(gang, env=subprocess_env(TMPDIR=str(tmp_path))) as workers:
        assert workers.finish(timeout=240) == 0, workers.tail()
        assert "multi_worker with 2 replica(s) in sync" in workers.output
    resumed = run_train(run_dir, *overrides, "model.dropout=0.0", tiny=False)
    assert_ok(resumed)
    assert "at step 20" in resumed.stdout + resumed.stderr
    # File-backed with TensorFlow's default pools: train.py advises a core for the reads where cores compete.
    advised = usable_cores() > 1 and not has_accelerators()
    assert ("leaves a core to the input" in resumed.stdout + resumed.stderr) == advised
    one_device = tmp_path / "one_device"
    assert_ok(run_train(one_device, *overrides, "model.dropout=0.0", tiny=False))
    ours, theirs = (checkpoint_values(run / "checkpoints" / "ckpt-40") for run in (run_dir, one_device))
    for name in theirs:  # the same batches; only the order of float additions in the all-reduce differs
        np.testing.assert_allclose(np.asarray(ours[name], np.float64), np.asarray(theirs[name], np.float64),
                                   atol=1e-4, err_msg=name)


@pytest.mark.slow
def test_a_record_that_goes_bad_mid_run_exits_2_naming_it_checkpoints_untouched(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    features = rng.normal(size=(9000, 64)).astype(np.float32)  # incompressible: a record's bytes are findable
    labels = features[:, :CLASSES].argmax(axis=1)
    write_array_shards(features, labels, str(tmp_path / "shards"), num_shards=2, class_ids=True)
    eval_rows = set(np.random.default_rng(0).permutation(9000)[:450].tolist())  # data.eval_fraction=0.05
    bad = next(index for index in range(8000, 9000) if index not in eval_rows)  # a train record past the sample
    victim = tmp_path / "shards" / "data-00001-of-00002.array_record"  # records 4500..8999
    content = bytearray(victim.read_bytes())
    offset = content.find(features[bad].tobytes())
    assert offset > 0
    content[offset + 100] ^= 0xFF
    victim.write_bytes(bytes(content))
    run_dir = tmp_path / "run"
    result = run_train(run_dir, "data=array_record", f"data.path={tmp_path / 'shards'}/*", "data.eval_fraction=0.05",
                       *RUN[:-1], "trainer.max_steps=400", tiny=False)
    assert_ok(result, code=2)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert re.search(rf"Record {bad} \(record {bad - 4500} of shard '{re.escape(str(victim))}', data.path\) cannot "
                     "be read",
                     errors[0]), errors[0]
    last_attempt = json.loads((run_dir / "run_record.json").read_text())["history"][-1]
    assert (last_attempt["outcome"], last_attempt["detail"]) == ("failed", errors[0].removeprefix("error: "))
    saved = sorted(int(path.stem.split("-")[1]) for path in (run_dir / "checkpoints").glob("ckpt-*.index"))
    assert saved and max(saved) < 400, saved  # what was saved before the bad record stays; nothing after
    for step in saved:  # every checkpoint left is intact
        checkpoint_values(run_dir / "checkpoints" / f"ckpt-{step}")
