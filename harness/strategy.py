"""Choosing and building the `tf.distribute.Strategy` a run trains under.

Owns: `strategy=default|mirrored|multi_worker|auto`, splitting the CPU into logical devices for
`strategy.cpu_replicas`, and cluster discovery (TF_CONFIG or Slurm). Must run before any other
TensorFlow op: logical devices and collective settings are fixed once the runtime starts.
"""

from __future__ import annotations

import json
import logging
import os

import tensorflow as tf

from harness.config import StrategyConfig
from harness.errors import ConfigError

log = logging.getLogger(__name__)


def resolve_strategy_name(config: StrategyConfig) -> str:
    """`auto` -> multi_worker if a cluster is described, mirrored if >1 GPU, else default."""
    if config.name != "auto":
        return config.name
    if _cluster_in_environment():
        return "multi_worker"
    if len(tf.config.list_physical_devices("GPU")) > 1 or (config.cpu_replicas or 1) > 1:
        return "mirrored"
    return "default"


def build_strategy(config: StrategyConfig) -> tf.distribute.Strategy:
    """Build the strategy named by `config.name` (see `resolve_strategy_name`)."""
    name = resolve_strategy_name(config)
    if config.cpu_replicas and config.cpu_replicas > 1:
        _split_cpu(config.cpu_replicas)
    if name == "default":
        strategy = tf.distribute.get_strategy()
    elif name == "mirrored":
        strategy = tf.distribute.MirroredStrategy(devices=_mirrored_devices(config))
    elif name == "multi_worker":
        strategy = _multi_worker(config)
    else:  # validated in harness/config.py
        raise ConfigError(f"Config key 'strategy.name' = {name!r} is unknown.")
    log.info("strategy: %s with %d replica(s) in sync", name, strategy.num_replicas_in_sync)
    return strategy


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the one worker that writes checkpoints' final location, summaries and exports."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type in (None, "chief") or (task_type == "worker" and task_id == 0
                                            and "chief" not in resolver.cluster_spec().as_dict())


def worker_id(strategy: tf.distribute.Strategy) -> str:
    """A short name of this worker for logs and temporary paths ('chief', 'worker1', ...)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type is None:
        return "chief"
    return f"{resolver.task_type}{resolver.task_id}"


def _cluster_in_environment() -> bool:
    if os.environ.get("TF_CONFIG"):
        try:
            cluster = json.loads(os.environ["TF_CONFIG"]).get("cluster", {})
        except json.JSONDecodeError as error:
            raise ConfigError(f"Environment variable TF_CONFIG is not valid JSON ({error}).") from None
        return sum(len(tasks) for tasks in cluster.values()) > 1
    return int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1"))) > 1


def _split_cpu(count: int) -> None:
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError as error:  # the runtime was initialised before this call
        raise ConfigError(f"strategy.cpu_replicas = {count} could not be applied: {error}") from None


def _mirrored_devices(config: StrategyConfig) -> list[str] | None:
    if config.devices:
        return list(config.devices)
    if config.cpu_replicas and config.cpu_replicas > 1:
        return [device.name for device in tf.config.list_logical_devices("CPU")]
    return None  # all local GPUs, or the CPU if there are none


def _multi_worker(config: StrategyConfig) -> tf.distribute.Strategy:
    if os.environ.get("TF_CONFIG"):
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    elif "SLURM_PROCID" in os.environ:
        resolver = tf.distribute.cluster_resolver.SlurmClusterResolver()
    else:
        raise ConfigError(
            "strategy=multi_worker needs a cluster description: set TF_CONFIG (see "
            "scripts/launch_local.py) or run inside a Slurm job step (srun)."
        )
    implementation = {
        "auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
        "ring": tf.distribute.experimental.CommunicationImplementation.RING,
        "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
    }[config.communication]
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=implementation, timeout_seconds=float(config.peer_timeout_seconds))
    return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver, communication_options=options)
