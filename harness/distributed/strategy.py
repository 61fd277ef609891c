"""Choosing and building the `tf.distribute.Strategy` a run trains under.

Owns: `strategy=default|mirrored|multi_worker|auto`, splitting the CPU into logical devices for
`strategy.cpu_replicas`, cluster discovery (TF_CONFIG or a Slurm job step), how fast a
multi-worker job notices a dead peer, and the check that all workers resumed from the same step.
`build_strategy` must run before any other TensorFlow op: logical devices, collective and
coordination settings are fixed once the runtime starts. Guarantees:
- `mirrored` and `multi_worker` train the same model as `default` for the same global batch (the
  loss in `harness/training/loop.py` is scaled by the global batch; Keras all-reduces the gradients).
- In `multi_worker`, worker 0 (or the `chief` task if the cluster has one) is the chief and
  leads the coordination service. Every worker sends it heartbeats; when a worker stops
  (killed, frozen, machine gone) for `strategy.peer_timeout_seconds`, every survivor's
  collectives fail and the survivors exit with code 4 (`lost_peers_stall`: in the training loop or in
  a start-up collective alike), so a scheduler restarts the whole gang.
- Workers that restored different checkpoints (checkpoint.dir not shared) all stop with a
  `CheckpointError` before training (`check_workers_restored_the_same_step`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator

import tensorflow as tf

from harness.config.schema import StrategyConfig
from harness.distributed import cluster
from harness.errors import CheckpointError, ConfigError, StalledError, error_summary
from harness.private_apis import configure_coordination_service

log = logging.getLogger(__name__)

# The coordination service waits this long at exit for every worker to reach shutdown; a peer
# that died first must not hold a survivor's exit for longer.
_SHUTDOWN_BARRIER_SECONDS = 30


def resolve_strategy_name(config: StrategyConfig) -> str:
    """`auto` -> multi_worker if a cluster is described, mirrored if >1 GPU or CPU replica, else default."""
    if config.name != "auto":
        return config.name
    if _cluster_in_environment():
        return "multi_worker"
    if (config.cpu_replicas or 1) > 1 or len(tf.config.list_physical_devices("GPU")) > 1:
        return "mirrored"
    return "default"


def build_strategy(config: StrategyConfig) -> tf.distribute.Strategy:
    """Build the strategy named by `config.name` (see `resolve_strategy_name`).

    Raises `ConfigError` if the settings cannot apply: `cpu_replicas` with `default` or `multi_worker`, a
    `multi_worker` run without a cluster description, or a runtime that was already initialised.
    """
    name = resolve_strategy_name(config)
    if name == "default":
        if config.cpu_replicas and config.cpu_replicas > 1:
            raise ConfigError(f"Config key 'strategy.cpu_replicas' = {config.cpu_replicas} applies to "
                              "strategy=mirrored (or auto) only: strategy=default trains on one device. Add "
                              "strategy=mirrored to split the CPU into replicas.")
        strategy = tf.distribute.get_strategy()
    elif name == "mirrored":
        if config.cpu_replicas and config.cpu_replicas > 1:
            _split_cpu(config.cpu_replicas)
        strategy = tf.distribute.MirroredStrategy(devices=_mirrored_devices(config))
    elif name == "multi_worker":
        if config.cpu_replicas and config.cpu_replicas > 1 and config.name == "multi_worker":
            raise ConfigError(f"Config key 'strategy.cpu_replicas' = {config.cpu_replicas} applies to "
                              "strategy=mirrored only: each multi_worker process trains one CPU replica (or one "
                              "per local GPU). Start more workers instead (scripts/launch_local.py --workers N).")
        strategy = _multi_worker(config)
    else:  # validated in harness/config/schema.py
        raise ConfigError(f"Config key 'strategy.name' = {name!r} is unknown.")
    log.info("strategy: %s with %d replica(s) in sync%s", name, strategy.num_replicas_in_sync,
             f", this process is {worker_id(strategy)}" if name == "multi_worker" else "")
    # Distribution logs every cross-device reduction at INFO ("Reduce to ... then broadcast").
    tf.get_logger().setLevel(logging.WARNING)
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


def check_workers_restored_the_same_step(strategy: tf.distribute.Strategy, step: int | None, *,
                                         checkpoint_dir: str) -> None:
    """Raise `CheckpointError` unless every worker restored the same step (`None` = fresh start).

    A collective in a multi-worker job: every worker calls it right after restoring. Workers that
    restored different checkpoints (checkpoint.dir on each node's own disk, say) would apply the
    same all-reduced gradients to different weights and never notice.
    """
    if num_workers(strategy) <= 1:
        return
    mine = -1.0 if step is None else float(step)
    with lost_peers_stall(strategy, when=lambda: "during start-up, while the workers compared the restored step"):
        restored = strategy.gather(strategy.run(lambda: tf.constant([mine], tf.float64)), axis=0).numpy()
    if restored.min() != restored.max():
        found = ", ".join("no checkpoint" if value < 0 else f"step {int(value)}" for value in sorted(set(restored)))
        raise CheckpointError(
            f"The workers did not restore the same checkpoint: they found {found}; {worker_id(strategy)} found "
            f"{'no checkpoint' if step is None else f'step {step}'} in checkpoint.dir = {checkpoint_dir!r}. Every "
            "worker must read the same directory: put checkpoint.dir (or run_dir) on a shared file system or "
            "gs://... that all nodes mount.")


# What a collective raises once another worker crashed, was killed or stopped sending heartbeats.
PEER_LOST_ERRORS = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError,
                    tf.errors.DeadlineExceededError)


@contextlib.contextmanager
def lost_peers_stall(strategy: tf.distribute.Strategy, *, when: Callable[[], str]) -> Iterator[None]:
    """In a multi-worker job, a collective that failed because a peer is gone becomes a `StalledError`
    (exit 4: the scheduler restarts the whole gang) saying `when` it happened, not a traceback."""
    try:
        yield
    except PEER_LOST_ERRORS as error:
        if num_workers(strategy) <= 1:
            raise  # not a lost peer: a bug or a local failure, keep the traceback
        raise StalledError(
            f"Lost contact with another worker {when()}: {error_summary(error)} That worker crashed, was killed or "
            "froze (check its log). Exiting so the scheduler restarts the whole job; every worker resumes from the "
            "newest checkpoint.") from None


def num_workers(strategy: tf.distribute.Strategy) -> int:
    """Worker processes in the job (1 unless multi_worker)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return 1
    jobs = resolver.cluster_spec().as_dict()
    return sum(len(jobs.get(job, [])) for job in ("chief", "worker")) or 1


def _cluster_in_environment() -> bool:
    if os.environ.get("TF_CONFIG"):
        return sum(len(tasks) for tasks in _tf_config()["cluster"].values()) > 1
    return cluster.in_slurm_step(os.environ) and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1


def _tf_config() -> dict:
    try:
        parsed = json.loads(os.environ["TF_CONFIG"])
    except json.JSONDecodeError as error:
        raise ConfigError(f"Environment variable TF_CONFIG is not valid JSON ({error}).") from None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("cluster"), dict) or "task" not in parsed:
        raise ConfigError("Environment variable TF_CONFIG must be a JSON object with 'cluster' and 'task', e.g. "
                          '{"cluster": {"worker": ["host0:2222", "host1:2222"]}, "task": {"type": "worker", '
                          '"index": 0}}.')
    return parsed


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


def _cluster_resolver() -> tf.distribute.cluster_resolver.ClusterResolver:
    if os.environ.get("TF_CONFIG"):
        _tf_config()  # clear errors for malformed JSON
        return tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if cluster.in_slurm_step(os.environ):
        # Not TF's SlurmClusterResolver: it needs nvidia-smi on CPU nodes and rewrites
        # CUDA_VISIBLE_DEVICES; Slurm's own --gpus-per-task binding is the better tool for GPUs.
        try:
            described = cluster.slurm_tf_config(os.environ)
        except ValueError as error:
            raise ConfigError(f"strategy=multi_worker cannot read the Slurm job step: {error}") from None
        return tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec(described["cluster"]), task_type="worker", task_id=described["task"]["index"],
            rpc_layer="grpc")
    raise ConfigError(
        "strategy=multi_worker needs a cluster description: set TF_CONFIG (see scripts/launch_local.py and "
        "README.md, 'GPUs and clusters') or run train.py inside a Slurm job step (srun)."
    )


_joined_cluster = False


def joined_cluster() -> bool:
    """True once this process built a multi-worker strategy (it must then exit normally)."""
    return _joined_cluster


def _multi_worker(config: StrategyConfig) -> tf.distribute.Strategy:
    global _joined_cluster
    _joined_cluster = True
    resolver = _cluster_resolver()
    _configure_peer_failure_detection(resolver.cluster_spec(), heartbeat_timeout_seconds=config.peer_timeout_seconds)
    implementation = {
        "auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
        "ring": tf.distribute.experimental.CommunicationImplementation.RING,
        "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
    }[config.communication]
    # No per-collective timeout (CommunicationOptions.timeout_seconds): it would also fail a healthy
    # job whose chief is slow for a while, e.g. writing a large checkpoint to remote storage while
    # the others already wait in the next all-reduce. Heartbeats detect dead peers instead.
    options = tf.distribute.experimental.CommunicationOptions(implementation=implementation)
    return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver, communication_options=options)


def _configure_peer_failure_detection(cluster_spec: tf.train.ClusterSpec, *, heartbeat_timeout_seconds: int) -> None:
    """A worker missing heartbeats for `strategy.peer_timeout_seconds` fails every other's collectives."""
    jobs = cluster_spec.as_dict()
    configure_coordination_service(
        leader="/job:chief/replica:0/task:0" if "chief" in jobs else "/job:worker/replica:0/task:0",
        jobs={job: cluster_spec.num_tasks(job) for job in ("chief", "worker") if job in jobs},
        heartbeat_timeout_seconds=heartbeat_timeout_seconds, shutdown_barrier_seconds=_SHUTDOWN_BARRIER_SECONDS)
