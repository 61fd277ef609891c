"""harness/distributed/cluster.py: TF_CONFIG for local gangs, Kubernetes Indexed Jobs and Slurm job steps."""

from __future__ import annotations

import json
import socket

import pytest

from harness.distributed import cluster


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = cluster.free_ports(4)
    assert len(set(ports)) == 4
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))


def test_local_cluster_gives_every_worker_the_same_cluster_and_its_own_index() -> None:
    configs = cluster.local_cluster(3)
    assert [c["task"] for c in configs] == [{"type": "worker", "index": i} for i in range(3)]
    assert len({json.dumps(c["cluster"]) for c in configs}) == 1
    addresses = configs[0]["cluster"]["worker"]
    assert len(set(addresses)) == 3 and all(a.startswith("127.0.0.1:") for a in addresses)
    assert json.loads(cluster.to_json(configs[1])) == configs[1]


def test_tf_config_refuses_an_index_outside_the_cluster() -> None:
    with pytest.raises(ValueError, match="index 2 is outside the 2 workers"):
        cluster.tf_config(["a:1", "b:1"], 2)


def test_indexed_job_addresses_follow_the_pod_hostnames() -> None:
    config = cluster.indexed_job_tf_config(num_workers=3, index=2, host_template="train-{index}.train:2222")
    assert config == {"cluster": {"worker": ["train-0.train:2222", "train-1.train:2222", "train-2.train:2222"]},
                      "task": {"type": "worker", "index": 2}}
    with pytest.raises(ValueError, match="no '\\{index\\}' field"):
        cluster.indexed_job_tf_config(num_workers=2, index=0, host_template="train.train:2222")


@pytest.mark.parametrize(("hostlist", "hosts"), [
    ("node1", ["node1"]),
    ("gpu[01-03,7],login", ["gpu01", "gpu02", "gpu03", "gpu7", "login"]),
    ("a[9-11]-ib,b", ["a9-ib", "a10-ib", "a11-ib", "b"]),
    ("r[1-2]-n[01-02],x", ["r1-n01", "r1-n02", "r2-n01", "r2-n02", "x"]),  # several bracket groups in one name
])
def test_expand_hostlist(hostlist: str, hosts: list[str]) -> None:
    assert cluster.expand_hostlist(hostlist) == hosts


def test_expand_tasks_per_node() -> None:
    assert cluster.expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    with pytest.raises(ValueError, match="'x2'"):
        cluster.expand_tasks_per_node("x2")


def slurm_step(procid: int, **extra: str) -> dict[str, str]:
    return {"SLURM_JOB_ID": "123", "SLURM_PROCID": str(procid), "SLURM_STEP_NODELIST": "gpu[1-2]",
            "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_STEP_NUM_TASKS": "4", **extra}


def test_slurm_step_tasks_are_packed_per_node_on_the_jobs_ports() -> None:
    base = cluster.slurm_port_base(123)
    configs = [cluster.slurm_tf_config(slurm_step(rank)) for rank in range(4)]
    assert configs[0]["cluster"]["worker"] == [f"gpu1:{base}", f"gpu1:{base + 1}", f"gpu2:{base}", f"gpu2:{base + 1}"]
    assert all(c["cluster"] == configs[0]["cluster"] for c in configs)
    assert [c["task"]["index"] for c in configs] == [0, 1, 2, 3]
    assert cluster.slurm_port_base(124) - base >= 8, "neighbouring jobs on one node must not share ports"
    below_ephemeral = range(1024, 32768)  # Linux hands out 32768..60999 to outgoing connections
    assert all(cluster.slurm_port_base(job) in below_ephemeral and cluster.slurm_port_base(job) + 7 in below_ephemeral
               for job in range(0, 20000, 7))


def test_slurm_reserved_ports_are_used_when_the_step_has_them() -> None:
    configs = [cluster.slurm_tf_config(slurm_step(rank, SLURM_STEP_RESV_PORTS="12000-12001")) for rank in range(4)]
    assert configs[3]["cluster"]["worker"] == ["gpu1:12000", "gpu1:12001", "gpu2:12000", "gpu2:12001"]
    assert cluster.expand_port_list("12000-12002,12007") == [12000, 12001, 12002, 12007]
    with pytest.raises(ValueError, match="reserves 1 ports but a node runs 2 tasks"):
        cluster.slurm_tf_config(slurm_step(0, SLURM_STEP_RESV_PORTS="12000"))


def test_slurm_node_addresses_replace_node_names() -> None:
    """Where a node's name is not its address (Slurm's NodeAddr), HARNESS_NODE_ADDRESSES maps them."""
    config = cluster.slurm_tf_config(slurm_step(0, HARNESS_NODE_ADDRESSES="gpu1=10.0.0.1, gpu2=10.0.0.2,other=x"))
    base = cluster.slurm_port_base(123)
    assert config["cluster"]["worker"] == [f"10.0.0.1:{base}", f"10.0.0.1:{base + 1}", f"10.0.0.2:{base}",
                                           f"10.0.0.2:{base + 1}"]
    partial = cluster.slurm_tf_config(slurm_step(0, HARNESS_NODE_ADDRESSES="gpu2=10.0.0.2"))
    assert partial["cluster"]["worker"][0] == f"gpu1:{base}"  # nodes not listed keep their names
    with pytest.raises(ValueError, match="HARNESS_NODE_ADDRESSES entry 'gpu1' is not 'node=address'"):
        cluster.slurm_tf_config(slurm_step(0, HARNESS_NODE_ADDRESSES="gpu1"))


def test_slurm_outside_a_job_step_is_reported() -> None:
    assert not cluster.in_slurm_step({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"})  # the batch script itself
    assert cluster.in_slurm_step(slurm_step(0))
    with pytest.raises(ValueError, match="SLURM_STEP_TASKS_PER_NODE"):
        cluster.slurm_tf_config({k: v for k, v in slurm_step(0).items() if k != "SLURM_STEP_TASKS_PER_NODE"})
