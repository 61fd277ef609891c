"""harness/distributed/strategy.py: choice and the errors a user can fix (in-process, before any TF runtime use).

The strategies themselves train for real in tests/test_distributed.py.
"""

from __future__ import annotations

import json
import re

import pytest

from harness.config import run_config
from harness.config.schema import StrategyConfig
from harness.distributed import strategy
from harness.errors import ConfigError
from tests.conftest import compose

TWO_WORKERS = json.dumps({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
                          "task": {"type": "worker", "index": 1}})


@pytest.fixture
def no_cluster(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("TF_CONFIG", raising=False)
    for name in ("SLURM_PROCID", "SLURM_STEP_NODELIST", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("name", ["default", "mirrored", "multi_worker", "auto"])
def test_every_strategy_group_composes_and_validates(name: str) -> None:
    run = run_config.to_typed_config(compose(f"strategy={name}"))
    assert run.strategy.name == name


def test_auto_picks_multi_worker_for_a_described_cluster(no_cluster: pytest.MonkeyPatch) -> None:
    assert strategy.resolve_strategy_name(StrategyConfig(name="auto")) == "default"  # no GPUs here
    assert strategy.resolve_strategy_name(StrategyConfig(name="auto", cpu_replicas=2)) == "mirrored"
    no_cluster.setenv("TF_CONFIG", TWO_WORKERS)
    assert strategy.resolve_strategy_name(StrategyConfig(name="auto")) == "multi_worker"
    no_cluster.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}))
    assert strategy.resolve_strategy_name(StrategyConfig(name="auto")) == "default"


def test_auto_picks_multi_worker_inside_a_slurm_step_only(no_cluster: pytest.MonkeyPatch) -> None:
    no_cluster.setenv("SLURM_NTASKS", "4")  # the batch script: no step yet
    assert strategy.resolve_strategy_name(StrategyConfig(name="auto")) == "default"
    for name, value in (("SLURM_PROCID", "0"), ("SLURM_STEP_NODELIST", "n[1-2]"), ("SLURM_STEP_NUM_TASKS", "4")):
        no_cluster.setenv(name, value)
    assert strategy.resolve_strategy_name(StrategyConfig(name="auto")) == "multi_worker"


def test_multi_worker_without_a_cluster_description_is_refused(no_cluster: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="needs a cluster description: set TF_CONFIG"):
        strategy.build_strategy(StrategyConfig(name="multi_worker"))


def test_malformed_tf_config_is_refused(no_cluster: pytest.MonkeyPatch) -> None:
    no_cluster.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ConfigError, match="TF_CONFIG is not valid JSON"):
        strategy.build_strategy(StrategyConfig(name="multi_worker"))
    no_cluster.setenv("TF_CONFIG", json.dumps({"cluster": ["a:1"]}))
    with pytest.raises(ConfigError, match="must be a JSON object with 'cluster' and 'task'"):
        strategy.build_strategy(StrategyConfig(name="multi_worker"))


def test_cpu_replicas_with_the_default_strategy_is_refused() -> None:
    with pytest.raises(ConfigError, match="applies to strategy=mirrored"):
        strategy.build_strategy(StrategyConfig(name="default", cpu_replicas=2))


def test_cpu_replicas_with_multi_worker_is_refused(no_cluster: pytest.MonkeyPatch) -> None:
    no_cluster.setenv("TF_CONFIG", TWO_WORKERS)
    with pytest.raises(ConfigError, match=re.escape("'strategy.cpu_replicas' = 2 applies to strategy=mirrored only")):
        strategy.build_strategy(StrategyConfig(name="multi_worker", cpu_replicas=2))
