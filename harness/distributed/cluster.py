"""Describing a multi-worker cluster as `TF_CONFIG`, from wherever the workers were started.

Owns: the `TF_CONFIG` JSON a worker of `strategy=multi_worker` reads, built for a local gang on
free loopback ports (`scripts/launch_local.py`), for a Kubernetes Indexed Job (pod hostnames from
the completion index, `scripts/tf_config.py`), or from a Slurm job step's environment
(`harness/distributed/strategy.py`). Guarantees: every worker of one cluster computes the same `cluster`
section; worker 0 is the chief (it writes checkpoints and summaries, and leads the coordination
service); Slurm workers are addressed by each node's address where one is given (node names need
not resolve) on ports Slurm reserved or below the ephemeral range; no TensorFlow import, so
launchers stay light.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from typing import Any

# Slurm without reserved ports: the task with local id `l` on a node listens on
# `slurm_port_base(job id) + l`. Jobs are spread over 20000..32767, below Linux's ephemeral range
# (32768..60999, where outgoing connections get their local ports), 8 ports (tasks) per node each.
_SLURM_PORT_FIRST, _SLURM_PORT_END, _SLURM_TASKS_PER_SLOT = 20000, 32768, 8
_SLURM_PORT_SLOTS = (_SLURM_PORT_END - _SLURM_PORT_FIRST) // _SLURM_TASKS_PER_SLOT
# Set by scripts/slurm_train.sbatch from each node's NodeAddr, or by the user: "node=address,...".
NODE_ADDRESSES_VARIABLE = "HARNESS_NODE_ADDRESSES"


def free_ports(count: int, *, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct TCP ports that were free on `host` a moment ago.

    The sockets are held open together (so the ports differ) and closed before returning: another
    process could take a port before a worker binds it, in which case that worker fails to start
    and the launcher reports it; rerunning picks new ports.
    """
    if count < 1:
        raise ValueError(f"free_ports: count must be at least 1, got {count}")
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(sock.getsockname()[1])
        return ports


def tf_config(worker_addresses: Sequence[str], index: int) -> dict[str, Any]:
    """The `TF_CONFIG` of worker `index` in a cluster of `worker` tasks at `host:port` addresses."""
    if not worker_addresses:
        raise ValueError("tf_config: the cluster needs at least one worker address")
    if not 0 <= index < len(worker_addresses):
        raise ValueError(f"tf_config: index {index} is outside the {len(worker_addresses)} workers")
    return {"cluster": {"worker": list(worker_addresses)}, "task": {"type": "worker", "index": index}}


def local_cluster(num_workers: int, *, host: str = "127.0.0.1") -> list[dict[str, Any]]:
    """One `TF_CONFIG` per worker of a gang on this machine, each worker on its own free port."""
    addresses = [f"{host}:{port}" for port in free_ports(num_workers, host=host)]
    return [tf_config(addresses, index) for index in range(num_workers)]


def indexed_job_tf_config(*, num_workers: int, index: int, host_template: str) -> dict[str, Any]:
    """`TF_CONFIG` of pod `index` of a Kubernetes Indexed Job with a headless Service.

    `host_template` is an address with an `{index}` field, e.g. `trainer-{index}.trainer:2222`:
    an Indexed Job's pod `i` has hostname `<job name>-<i>`, resolvable as `<hostname>.<service>`
    when the pod template sets `subdomain: <service>`.
    """
    if "{index}" not in host_template:
        raise ValueError(f"host template {host_template!r} has no '{{index}}' field for the pod index")
    return tf_config([host_template.format(index=i) for i in range(num_workers)], index)


# -- Slurm --------------------------------------------------------------------------------------------
def in_slurm_step(environ: Mapping[str, str]) -> bool:
    """True inside an `srun` job step (not in the batch script itself, where no step exists)."""
    return "SLURM_PROCID" in environ and "SLURM_STEP_NODELIST" in environ


def slurm_port_base(job_id: int) -> int:
    """The first port of a Slurm job's tasks on each node: the same for every task of the job."""
    return _SLURM_PORT_FIRST + (job_id % _SLURM_PORT_SLOTS) * _SLURM_TASKS_PER_SLOT


def slurm_tf_config(environ: Mapping[str, str]) -> dict[str, Any]:
    """`TF_CONFIG` of this task of a Slurm job step: one worker per task, ranked by `SLURM_PROCID`.

    Tasks are packed onto nodes in node-list order, as Slurm's default block distribution does.
    Hosts: each node's address from `HARNESS_NODE_ADDRESSES` ("node=address,..."), else its name.
    Ports: the task with local id `l` on a node listens on the `l`-th of the step's reserved ports
    (`srun --resv-ports` where the cluster sets `MpiParams=ports=...`: Slurm guarantees them unused
    by other steps), else on `slurm_port_base(SLURM_JOB_ID) + l`. GPUs are left to Slurm
    (`--gpus-per-task`, `--gpu-bind`): this only describes the cluster.
    """
    try:
        job_id = int(environ["SLURM_JOB_ID"])
        rank = int(environ["SLURM_PROCID"])
        nodes = expand_hostlist(environ["SLURM_STEP_NODELIST"])
        tasks_per_node = expand_tasks_per_node(environ["SLURM_STEP_TASKS_PER_NODE"])
    except KeyError as missing:
        raise ValueError(f"Slurm variable {missing} is not set: run train.py inside a job step (srun)") from None
    if len(nodes) != len(tasks_per_node):
        raise ValueError(f"SLURM_STEP_NODELIST names {len(nodes)} nodes but SLURM_STEP_TASKS_PER_NODE "
                         f"describes {len(tasks_per_node)}")
    ports = _slurm_task_ports(environ, job_id=job_id, tasks_on_busiest_node=max(tasks_per_node, default=0))
    node_addresses = parse_node_addresses(environ.get(NODE_ADDRESSES_VARIABLE, ""))
    addresses = [f"{node_addresses.get(node, node)}:{ports[local_id]}" for node, count in zip(nodes, tasks_per_node)
                 for local_id in range(count)]
    return tf_config(addresses, rank)


def _slurm_task_ports(environ: Mapping[str, str], *, job_id: int, tasks_on_busiest_node: int) -> list[int]:
    reserved = environ.get("SLURM_STEP_RESV_PORTS", "").strip()
    if reserved:
        ports = expand_port_list(reserved)
        if len(ports) < tasks_on_busiest_node:
            raise ValueError(f"SLURM_STEP_RESV_PORTS = {reserved!r} reserves {len(ports)} ports but a node runs "
                             f"{tasks_on_busiest_node} tasks: use 'srun --resv-ports' without a count")
        return ports
    if tasks_on_busiest_node > _SLURM_TASKS_PER_SLOT:
        raise ValueError(f"SLURM_STEP_TASKS_PER_NODE = {environ['SLURM_STEP_TASKS_PER_NODE']!r}: at most "
                         f"{_SLURM_TASKS_PER_SLOT} tasks per node are supported without reserved ports "
                         "(srun --resv-ports with MpiParams=ports=... in slurm.conf)")
    base = slurm_port_base(job_id)
    return list(range(base, base + _SLURM_TASKS_PER_SLOT))


def parse_node_addresses(spec: str) -> dict[str, str]:
    """`HARNESS_NODE_ADDRESSES` ("node1=10.0.0.1,node2=10.0.0.2") to {node name: address}."""
    addresses = {}
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        node, separator, address = entry.partition("=")
        if not separator or not node.strip() or not address.strip():
            raise ValueError(f"{NODE_ADDRESSES_VARIABLE} entry {entry!r} is not 'node=address' "
                             "(e.g. 'gpu01=10.0.0.1,gpu02=10.0.0.2')")
        addresses[node.strip()] = address.strip()
    return addresses


def expand_port_list(spec: str) -> list[int]:
    """Slurm's reserved-port list to ports: '12000-12001,12005' -> [12000, 12001, 12005]."""
    ports = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not match:
            raise ValueError(f"SLURM_STEP_RESV_PORTS part {part!r} is not 'PORT' or 'FIRST-LAST'")
        ports.extend(range(int(match.group(1)), int(match.group(2) or match.group(1)) + 1))
    return ports


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compact node list to host names: 'gpu[01-03,7],login' -> gpu01 gpu02 gpu03 gpu7 login.

    A name may hold several bracket groups ('rack[1-2]-n[01-02]': every combination, in order).
    """
    names = re.findall(r"(?:[^,\[]|\[[^\]]*\])+", hostlist)  # top-level commas separate names
    return [host for name in names for host in _expand_name(name.strip()) if host]


def _expand_name(name: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", name)
    if match is None:
        return [name]
    head, tail = name[:match.start()], _expand_name(name[match.end():])
    expanded = []
    for part in match.group(1).split(","):
        first, _, last = part.partition("-")
        for number in range(int(first), int(last or first) + 1):
            expanded.extend(f"{head}{number:0{len(first)}d}{rest}" for rest in tail)
    return expanded


def expand_tasks_per_node(spec: str) -> list[int]:
    """Slurm's tasks-per-node list to one count per node: '2(x3),1' -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise ValueError(f"SLURM_STEP_TASKS_PER_NODE part {part!r} is not 'N' or 'N(xM)'")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def to_json(config: Mapping[str, Any]) -> str:
    """`TF_CONFIG` as the compact JSON string TensorFlow parses."""
    return json.dumps(config, separators=(",", ":"))
