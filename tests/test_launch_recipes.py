"""The launch recipes in scripts/: syntax, structure, and the environment and behaviour they produce.

Kubernetes and systemd are not installed here, so their commands (`systemctl`) are small stand-in
executables on PATH that record their arguments. Everything else is real: the scripts run under
bash, train.py trains for real, signals are real signals. The Slurm recipe runs on a real Slurm in
tests/test_slurm.py.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness.checkpoint.files import list_checkpoints
from harness.errors import NOT_RETRYABLE
from tests.background import BackgroundRun
from tests.conftest import PROJECT_ROOT, TINY, subprocess_env

SCRIPTS = PROJECT_ROOT / "scripts"
K8S_JOB = SCRIPTS / "k8s_job.yaml"
VM_UNIT = SCRIPTS / "harness-train.service"
VM_STARTUP = SCRIPTS / "vm_startup.sh"
VM_TRAIN = SCRIPTS / "vm_train.sh"
PREEMPTED = 42

# Interruptible after ckpt-50: signals are seen every 5 steps.
SHORT_RUN = (*TINY, "trainer.max_steps=150", "trainer.steps_per_loop=5", "trainer.log_every=25",
             "trainer.eval_every=0", "checkpoint.every_steps=25", "export.enabled=false",
             "strategy.peer_timeout_seconds=10")


def write_executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def recorder(bin_dir: Path, name: str, log: Path) -> None:
    """An executable `name` that appends its arguments, one call per line, to `log`."""
    write_executable(bin_dir / name, f'#!/bin/bash\necho "$*" >> "{log}"\n')


def bash_syntax_ok(path: Path) -> None:
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# -- Kubernetes -------------------------------------------------------------------------------------------
def k8s_documents() -> dict[str, dict]:
    documents = [doc for doc in yaml.safe_load_all(K8S_JOB.read_text()) if doc]
    by_kind = {doc["kind"]: doc for doc in documents}
    assert sorted(by_kind) == ["Job", "Service"] and len(documents) == 2
    return by_kind


def test_k8s_job_structure() -> None:
    service, job = k8s_documents()["Service"], k8s_documents()["Job"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "trainer")
    env = {item["name"]: item["value"] for item in container["env"]}
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    assert pod["subdomain"] == service["metadata"]["name"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(env["NUM_WORKERS"])
    assert pod["restartPolicy"] == "Never"  # required by podFailurePolicy
    assert spec["backoffLimit"] >= 1
    assert pod["terminationGracePeriodSeconds"] >= 30
    rules = spec["podFailurePolicy"]["rules"]
    by_code = {code: rule["action"] for rule in rules if "onExitCodes" in rule
               for code in rule["onExitCodes"]["values"]}
    assert by_code == {PREEMPTED: "Ignore", **{int(code): "FailJob" for code in NOT_RETRYABLE}}
    assert all(rule["onExitCodes"]["containerName"] == "trainer" for rule in rules if "onExitCodes" in rule)
    assert any(rule["action"] == "Ignore" and {"type": "DisruptionTarget"} in rule.get("onPodConditions", [])
               for rule in rules)
    port = int(env["WORKER_ADDRESS_TEMPLATE"].rsplit(":", 1)[1])
    assert port == service["spec"]["ports"][0]["port"] == container["ports"][0]["containerPort"]
    job_name, service_name = job["metadata"]["name"], service["metadata"]["name"]
    assert env["WORKER_ADDRESS_TEMPLATE"] == f"{job_name}-{{index}}.{service_name}:{port}"


def test_k8s_pods_compute_their_tf_config(tmp_path: Path) -> None:
    """Each pod's shell command, run with its completion index; a `python` shim captures train.py's call."""
    documents = k8s_documents()
    job, service = documents["Job"], documents["Service"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    script = "\n".join(container["args"])
    assert container["command"][:2] == ["/bin/bash", "-c"]
    shim_dir = tmp_path / "bin"
    shim_dir.mkdir()
    report = 'import json, os, sys; print(json.dumps({"TF_CONFIG": os.environ["TF_CONFIG"], "argv": sys.argv[1:]}))'
    write_executable(shim_dir / "python", f"""#!/bin/bash
if [ "$1" = train.py ]; then exec {sys.executable} -c '{report}' "$@"; fi
exec {sys.executable} "$@"
""")
    num_workers = job["spec"]["completions"]
    name, service_name = job["metadata"]["name"], service["metadata"]["name"]
    port = service["spec"]["ports"][0]["port"]
    expected_cluster = {"worker": [f"{name}-{index}.{service_name}:{port}" for index in range(num_workers)]}
    for index in range(num_workers):
        pod_env = {item["name"]: item["value"] for item in container["env"]}
        env = subprocess_env(**pod_env, JOB_COMPLETION_INDEX=str(index),
                             PATH=f"{shim_dir}:{os.environ['PATH']}")
        result = subprocess.run(container["command"] + [script], cwd=PROJECT_ROOT, env=env, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        call = json.loads(result.stdout)
        expected = {"cluster": expected_cluster, "task": {"type": "worker", "index": index}}
        assert json.loads(call["TF_CONFIG"]) == expected
        assert "strategy=multi_worker" in call["argv"][1:]


def test_k8s_pod_with_a_bad_index_fails_with_the_config_error_code(tmp_path: Path) -> None:
    container = k8s_documents()["Job"]["spec"]["template"]["spec"]["containers"][0]
    pod_env = {item["name"]: item["value"] for item in container["env"]}
    env = subprocess_env(**pod_env, JOB_COMPLETION_INDEX="7",
                         PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    result = subprocess.run(container["command"] + ["\n".join(container["args"])], cwd=PROJECT_ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2  # -> podFailurePolicy FailJob, not endless retries
    assert "index 7 is outside the 2 workers" in result.stderr


# -- Preemptible cloud VM --------------------------------------------------------------------------------
def unit_sections(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"))
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(text)
    return parser


def test_vm_unit_restarts_after_preemption_but_not_after_success_or_config_errors() -> None:
    bash_syntax_ok(VM_STARTUP)
    bash_syntax_ok(VM_TRAIN)
    unit = unit_sections(VM_UNIT.read_text())
    service = unit["Service"]
    assert service["ExecStart"] == "@HARNESS_DIR@/scripts/vm_train.sh"
    assert service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) >= 30
    assert service["Restart"] == "on-failure"  # 0 is success: no restart once training finished
    prevented = service["RestartPreventExitStatus"].split()
    assert set(prevented) == {str(int(code)) for code in NOT_RETRYABLE} and str(PREEMPTED) not in prevented
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert "network-online.target" in unit["Unit"]["After"]


def test_vm_startup_installs_enables_and_starts_the_unit_idempotently(tmp_path: Path) -> None:
    bin_dir, systemctl_log = tmp_path / "bin", tmp_path / "systemctl.log"
    bin_dir.mkdir()
    recorder(bin_dir, "systemctl", systemctl_log)
    unit_dir, env_file = tmp_path / "units", tmp_path / "etc" / "train.env"
    env = subprocess_env(PATH=f"{bin_dir}:{os.environ['PATH']}", HARNESS_DIR=str(PROJECT_ROOT), UNIT_DIR=str(unit_dir),
                         ENV_FILE=str(env_file), HARNESS_USER="daemon", DEFAULT_OVERRIDES="experiment=spot1")
    for _ in range(2):  # every boot runs it again
        result = subprocess.run(["bash", str(VM_STARTUP)], env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        env_file.write_text(env_file.read_text() + "# edited by the user\n")
    assert systemctl_log.read_text().splitlines() == [
        "daemon-reload", "enable harness-train.service", "start --no-block harness-train.service"] * 2
    assert env_file.read_text() == 'HARNESS_OVERRIDES="experiment=spot1"\n' + "# edited by the user\n" * 2
    installed = (unit_dir / "harness-train.service").read_text()
    assert "@" not in installed.replace("network-online.target", "")
    service = unit_sections(installed)["Service"]
    assert service["ExecStart"] == f"{PROJECT_ROOT}/scripts/vm_train.sh"
    assert service["WorkingDirectory"] == str(PROJECT_ROOT) and service["User"] == "daemon"
    assert service["EnvironmentFile"] == f"-{env_file}"
    analyze = shutil.which("systemd-analyze")
    if analyze:  # systemd's own parser, where installed
        verified = subprocess.run([analyze, "verify", str(unit_dir / "harness-train.service")], capture_output=True,
                                  text=True, timeout=60)
        assert verified.returncode == 0 and "harness-train.service" not in verified.stderr, verified.stderr


@pytest.mark.slow
def test_vm_train_command_saves_on_sigterm_and_the_same_command_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = subprocess_env(HARNESS_PYTHON=sys.executable, HARNESS_OVERRIDES=" ".join((f"run_dir={run_dir}", *SHORT_RUN)))
    with BackgroundRun([str(VM_TRAIN)], env=env, cwd=tmp_path) as boot:
        boot.wait_for(r"saved checkpoint ckpt-50\b", timeout=120)
        os.kill(boot.process.pid, signal.SIGTERM)  # systemd's stop at shutdown (vm_train.sh execs python)
        assert boot.finish(timeout=60) == PREEMPTED, boot.tail()
        stopped = int(boot.wait_for(r"stopped at step (\d+)", timeout=1).group(1))
    rerun = subprocess.run([str(VM_TRAIN)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert f"at step {stopped}" in rerun.stdout + rerun.stderr
    assert list_checkpoints(str(run_dir / "checkpoints"))[0][0] == 150
