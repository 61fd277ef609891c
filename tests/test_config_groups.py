"""Every option of every config group in conf/ composes, validates and builds (in-process; strategies,
one per process, are tests/test_strategy.py's and tests/test_distributed.py's).

Options are discovered from the conf/ directory, so a new `conf/<group>/<name>.yaml` is tested
without touching this file. Each option is built for real: its data loaded (small files written
here for the file-backed sources), its task, model and optimizer built, and one training state
assembled, as `train.py` does before it trains.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from harness.config.composition import compose
from harness.config.run_config import RunConfig, to_typed_config
from harness.data.record_conversion import write_array_shards
from harness.training import assembly
from tests.conftest import PROJECT_ROOT

CONF = PROJECT_ROOT / "conf"
SMALL = ("data.global_batch_size=16", "trainer.max_steps=10", "model.hidden=[8]")


def _options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def data_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, ...]]:
    """Overrides that point each file-backed data option at a small real file of its format."""
    directory = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, 6)).astype(np.float32)
    labels = rng.integers(0, 3, size=200)
    np.savez(directory / "data.npz", features=features, labels=labels)
    with tf.io.TFRecordWriter(str(directory / "data.tfrecord")) as writer:
        for row, label in zip(features, labels, strict=True):
            feature = {"features": tf.train.Feature(float_list=tf.train.FloatList(value=row)),
                       "labels": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)]))}
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    write_array_shards(features, labels, str(directory / "shards"), num_shards=2, class_ids=True)
    rng.integers(0, 50, size=5000).astype(np.uint16).tofile(directory / "tokens.bin")
    return {
        "npz": (f"data.path={directory / 'data.npz'}",),
        "tfrecord": (f"data.path={directory / 'data.tfrecord'}",),
        "array_record": (f"data.path={directory / 'shards'}/data-*", "data.num_classes=3"),
        "tokens": (f"data.path={directory / 'tokens.bin'}", "data.seq_len=16", "data.vocab_size=50"),
    }


def _build(overrides: tuple[str, ...]) -> RunConfig:
    """Compose, validate, load the data and build the training state, as train.py does."""
    run = to_typed_config(compose(list(overrides)))
    task_data = assembly.load_task_data(run)
    train_state = assembly.build_train_state(run, task_data)
    assert train_state.model.count_params() > 0
    assert int(train_state.step.numpy()) == 0
    return run


# Models need inputs they can take: images for MobileNetV2, token ids for the transformer.
_MODEL_DATA = {"mobilenet_v2": ("data=digits",), "transformer": ("task=language_model", "data.seq_len=16",
                                                                 "model.num_layers=1")}
_MODEL_SIZE = {"mlp": ("model.hidden=[8]",), "mlp_small": ("model.hidden=[8]",), "residual_mlp": ()}


@pytest.mark.parametrize("name", _options("model"))
def test_every_model_option_builds(name: str) -> None:
    run = _build((f"model={name}", *_MODEL_DATA.get(name, ()), *_MODEL_SIZE.get(name, ()),
                  "data.global_batch_size=16"))
    assert run.model["_target_"].startswith("models.")


@pytest.mark.parametrize("name", _options("data"))
def test_every_data_option_loads_and_builds(name: str, data_files: dict[str, tuple[str, ...]]) -> None:
    task = ("task=language_model", "data.seq_len=16", "model.num_layers=1") if name in ("text", "tokens") else ()
    task += ("task=regression",) if name == "diabetes" else ()
    run = _build((f"data={name}", *data_files.get(name, ()), *task, *SMALL[:2],
                  *(() if task else ("model.hidden=[8]",))))
    assert run.data.name == name


@pytest.mark.parametrize("group", ["task", "optimizer", "preset"])
def test_every_task_optimizer_and_preset_builds(group: str) -> None:
    for name in _options(group):
        run = to_typed_config(compose([f"{group}={name}"]))  # the option as shipped, unshrunk
        model = run.model["_target_"].rsplit(".", 1)[-1]
        shrink = {"build_mlp": ("model.hidden=[8]",), "build_transformer": ("data.seq_len=16", "model.num_layers=1")}
        built = _build((f"{group}={name}", "data.global_batch_size=16", *shrink.get(model, ())))
        assert built.model["_target_"] == run.model["_target_"]


def test_the_options_found_are_the_shipped_ones() -> None:
    """Guards the discovery above: an empty or moved conf/ would make every test here vacuous."""
    assert {"mlp", "cnn", "transformer", "mobilenet_v2"} <= set(_options("model"))
    assert {"synthetic", "digits", "array_record", "tokens"} <= set(_options("data"))
    assert {"digits_cnn", "byte_language_model", "diabetes_regression"} <= set(_options("preset"))
    assert Path(CONF / "config.yaml").is_file()
