"""harness/checkpoint/provenance.py: which config changes a resume may make, and the record saved with every
checkpoint. Configs are plain nested dicts (as `OmegaConf.to_container(resolve=True)` gives), plus
one test over the real composed config so the free/guarded split is checked against the schema."""

from __future__ import annotations

import copy
import logging
import re
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from harness.checkpoint import provenance
from harness.checkpoint.provenance import check_resume, config_changes, from_text, harness_version, to_text
from harness.errors import ConfigError, ExitCode
from tests.conftest import PROJECT_ROOT, compose

SAVED = {
    "seed": 0,
    "run_dir": "outputs/a",
    "model": {"hidden": [32], "dropout": 0.0},
    "data": {"global_batch_size": 64, "prefetch": 0},
    "optimizer": {"name": "adam", "learning_rate": 0.001, "schedule": {"name": "constant", "warmup_steps": 0}},
    "trainer": {"max_steps": 60, "mixed_precision": None},
    "checkpoint": {"dir": "outputs/a/checkpoints", "every_steps": 20},
}


def changed(**dotted: object) -> dict:
    """SAVED with dotted keys replaced (key__sub for key.sub, since keywords cannot contain dots)."""
    config = copy.deepcopy(SAVED)
    for key, value in dotted.items():
        *parents, leaf = key.split("__")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def saved_provenance(config: dict = SAVED, overrides: tuple[str, ...] = ("model.hidden=[32]",)) -> dict:
    return {"config": config, "overrides": list(overrides), "harness_version": harness_version()}


def test_config_changes_lists_every_differing_leaf_sorted_by_key() -> None:
    current = changed(trainer__max_steps=100, model__hidden=[64, 64], optimizer__schedule__warmup_steps=10)
    del current["model"]["dropout"]
    current["model"]["activation"] = "gelu"
    changes = config_changes(SAVED, current)
    assert [change.describe() for change in changes] == [
        "model.activation: <absent> -> \"gelu\"",
        "model.dropout: 0.0 -> <absent>",
        "model.hidden: [32] -> [64, 64]",
        "optimizer.schedule.warmup_steps: 0 -> 10",
        "trainer.max_steps: 60 -> 100",
    ]
    assert config_changes(SAVED, copy.deepcopy(SAVED)) == []


def test_free_keys_may_change_and_every_change_is_logged(caplog) -> None:
    current = changed(run_dir="outputs/b", trainer__max_steps=100, data__prefetch=4,
                      checkpoint__dir="gs://bucket/b", checkpoint__every_steps=50)
    with caplog.at_level(logging.INFO, logger="harness.checkpoint.provenance"):
        accepted = check_resume(saved_provenance(), current, checkpoint="ckpt-20", allow=[])
    assert [change.key for change in accepted] == [
        "checkpoint.dir", "checkpoint.every_steps", "data.prefetch", "run_dir", "trainer.max_steps"]
    assert "config changed since the checkpoint: trainer.max_steps: 60 -> 100" in caplog.text
    assert "config changed since the checkpoint: checkpoint.dir: \"outputs/a/checkpoints\" -> \"gs://bucket/b\"" \
        in caplog.text


def test_guarded_changes_are_refused_listing_each_key_with_both_values() -> None:
    current = changed(seed=1, model__hidden=[64], data__global_batch_size=128, optimizer__learning_rate=0.01,
                      trainer__mixed_precision="mixed_float16", trainer__max_steps=100)
    with pytest.raises(ConfigError) as refused:
        check_resume(saved_provenance(), current, checkpoint="/runs/a/ckpt-20", allow=[])
    message = str(refused.value)
    assert "checkpoint /runs/a/ckpt-20" in message
    listed = [line.strip() for line in message.splitlines() if line.startswith("  ")]
    assert listed == [
        "data.global_batch_size: 64 -> 128",
        "model.hidden: [32] -> [64]",
        "optimizer.learning_rate: 0.001 -> 0.01",
        "seed: 0 -> 1",
        "trainer.mixed_precision: null -> \"mixed_float16\"",
    ]  # trainer.max_steps is free: not listed
    assert "the checkpoint's command-line overrides were: model.hidden=[32]" in message
    assert ("resume.allow_config_change=[data.global_batch_size,model.hidden,optimizer.learning_rate,seed,"
            "trainer.mixed_precision]") in message
    assert refused.value.exit_code == ExitCode.USER_ERROR


def test_max_steps_is_guarded_while_the_cosine_schedule_is_stretched_over_it() -> None:
    cosine = changed(optimizer__schedule={"name": "cosine", "warmup_steps": 0, "decay_steps": None})
    longer = copy.deepcopy(cosine)
    longer["trainer"]["max_steps"] = 100
    with pytest.raises(ConfigError, match=re.escape("trainer.max_steps: 60 -> 100")) as refused:
        check_resume(saved_provenance(cosine), longer, checkpoint="ckpt", allow=[])
    assert "optimizer.schedule.decay_steps is unset" in str(refused.value)
    assert check_resume(saved_provenance(cosine), longer, checkpoint="ckpt", allow=["trainer.max_steps"])
    fixed_length = copy.deepcopy(cosine)
    fixed_length["optimizer"]["schedule"]["decay_steps"] = 60
    longer_fixed = copy.deepcopy(fixed_length)
    longer_fixed["trainer"]["max_steps"] = 100
    assert check_resume(saved_provenance(fixed_length), longer_fixed, checkpoint="ckpt", allow=[])


def test_a_key_the_schema_gained_since_the_checkpoint_is_guarded() -> None:
    current = changed()
    current["model"]["attention_heads"] = 4
    with pytest.raises(ConfigError, match=re.escape("model.attention_heads: <absent> -> 4")):
        check_resume(saved_provenance(), current, checkpoint="ckpt", allow=[])


@pytest.mark.parametrize("allow", [["optimizer.learning_rate", "optimizer.schedule.name", "model.hidden"],
                                   ["optimizer.*", "model.*"], ["optimizer", "model"]], ids=["keys", "globs", "groups"])
def test_allowed_changes_are_accepted_and_logged_as_allowed(caplog, allow: list[str]) -> None:
    current = changed(optimizer__learning_rate=0.01, optimizer__schedule__name="cosine", model__hidden=[64])
    with caplog.at_level(logging.INFO, logger="harness.checkpoint.provenance"):
        accepted = check_resume(saved_provenance(), current, checkpoint="ckpt", allow=allow)
    assert [change.key for change in accepted] == ["model.hidden", "optimizer.learning_rate", "optimizer.schedule.name"]
    assert "optimizer.learning_rate: 0.001 -> 0.01 (allowed by resume.allow_config_change)" in caplog.text


def test_allowing_one_key_still_refuses_the_others() -> None:
    current = changed(optimizer__learning_rate=0.01, seed=7)
    with pytest.raises(ConfigError) as refused:
        check_resume(saved_provenance(), current, checkpoint="ckpt", allow=["optimizer.*"])
    listed = [line.strip() for line in str(refused.value).splitlines() if line.startswith("  ")]
    assert listed == ["seed: 0 -> 7"]


def test_a_checkpoint_without_provenance_is_accepted_with_a_warning(caplog) -> None:
    assert check_resume(None, changed(seed=5), checkpoint="/elsewhere/ckpt-7", allow=[]) == []
    assert "checkpoint /elsewhere/ckpt-7 records no config" in caplog.text


def test_a_changed_harness_version_is_logged_not_refused(caplog) -> None:
    record = {**saved_provenance(), "harness_version": "git:0000000000000000000000000000000000000000"}
    with caplog.at_level(logging.INFO, logger="harness.checkpoint.provenance"):
        assert check_resume(record, changed(), checkpoint="ckpt", allow=[]) == []
    assert f"harness version changed since the checkpoint: git:{'0' * 40} -> {harness_version()}" in caplog.text


def test_the_real_config_schema_splits_free_and_guarded_keys() -> None:
    saved = OmegaConf.to_container(compose(), resolve=True)
    free = OmegaConf.to_container(compose(
        "run_dir=/elsewhere", "trainer.max_steps=100", "trainer.log_every=5", "checkpoint.every_steps=7",
        "checkpoint.max_to_keep=9", "preemption.exit_code=43", "lease.expiry_seconds=30", "watchdog.min_seconds=5",
        "strategy.cpu_replicas=2", "data.prefetch=2", "trainer.max_crash_restarts=0"), resolve=True)
    assert len(check_resume({"config": saved}, free, checkpoint="ckpt", allow=[])) >= 11
    guarded = OmegaConf.to_container(compose(
        "seed=3", "model.hidden=[16]", "data.global_batch_size=32", "optimizer.learning_rate=0.5",
        "trainer.mixed_precision=mixed_bfloat16"), resolve=True)
    with pytest.raises(ConfigError) as refused:
        check_resume({"config": saved}, guarded, checkpoint="ckpt", allow=[])
    listed = {line.strip().split(":")[0] for line in str(refused.value).splitlines() if line.startswith("  ")}
    assert listed == {"seed", "model.hidden", "data.global_batch_size", "optimizer.learning_rate",
                      "trainer.mixed_precision"}
    # Switching the optimizer group adds and removes keys; allowing optimizer.* accepts all of them.
    sgd = OmegaConf.to_container(compose("optimizer=sgd"), resolve=True)
    accepted = check_resume({"config": saved}, sgd, checkpoint="ckpt", allow=["optimizer.*"])
    assert {"optimizer.name", "optimizer.momentum", "optimizer.beta_1"} <= {change.key for change in accepted}


def test_harness_version_is_the_commit_of_this_checkout() -> None:
    version = harness_version()
    found = re.fullmatch(r"git:([0-9a-f]{40})(-dirty)?", version)
    assert found, version
    subprocess.run(["git", "cat-file", "-e", f"{found.group(1)}^{{commit}}"], cwd=PROJECT_ROOT, check=True)


def test_harness_version_outside_git_and_in_a_dirty_tree(tmp_path: Path, monkeypatch) -> None:
    uncached = harness_version.__wrapped__  # the cached value belongs to this checkout
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no enclosing repo
    monkeypatch.setattr(provenance, "PROJECT_ROOT", str(tmp_path))
    assert uncached() == "unknown"

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=tmp_path,
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "harness.py").write_text("v1\n")
    git("add", "harness.py")
    git("commit", "-q", "-m", "v1")
    commit = git("rev-parse", "HEAD")
    (tmp_path / "untracked.txt").write_text("not part of the harness\n")
    assert uncached() == f"git:{commit}"  # untracked files do not make it dirty
    (tmp_path / "harness.py").write_text("v2\n")
    assert uncached() == f"git:{commit}-dirty"


def test_provenance_text_round_trips() -> None:
    record = {"config": {"z": 1, "a": {"path": Path("/runs/a")}}, "overrides": ["seed=1"], "python": "3.11"}
    text = to_text(record)
    assert text.index('"config"') < text.index('"overrides"') < text.index('"python"')  # sorted: stable bytes
    assert from_text(text) == {"config": {"z": 1, "a": {"path": "/runs/a"}}, "overrides": ["seed=1"],
                               "python": "3.11"}
    assert from_text(text.encode()) == from_text(text)  # as read back from a checkpoint tensor


def test_build_provenance_records_config_overrides_and_versions() -> None:
    import keras
    import tensorflow as tf

    record = provenance.build_provenance({"seed": 3}, overrides=("seed=3", "model=cnn"))
    assert record["config"] == {"seed": 3}
    assert record["overrides"] == ["seed=3", "model=cnn"]
    assert (record["harness_version"], record["tensorflow"], record["keras"]) == (
        harness_version(), tf.__version__, keras.__version__)
    assert re.fullmatch(r"3\.\d+\.\d+", record["python"])
    assert from_text(to_text(record)) == record


def test_checkpoints_from_before_tasks_and_data_records_resume_as_the_classification_they_were() -> None:
    from harness.checkpoint.provenance import config_changes

    saved = {"model": {"hidden": [32]}, "data": {"name": "synthetic"}}  # written before the task group existed
    current = {"model": {"hidden": [32]},
               "data": {"name": "synthetic", "records": {"train": 2048, "eval": 256}},
               "task": {"_target_": "harness.tasks.classification.Classification", "num_classes": None}}
    assert config_changes(saved, current) == []
    regression = {**current, "task": {"_target_": "harness.tasks.regression.Regression", "loss": "mse"}}
    assert [change.key for change in config_changes(saved, regression)] == ["task._target_", "task.loss",
                                                                           "task.num_classes"]
    recorded = {**current, "data": {"name": "synthetic", "records": {"train": 2000, "eval": 256}}}
    assert [change.describe() for change in config_changes(recorded, current)] == ["data.records.train: 2000 -> 2048"]
