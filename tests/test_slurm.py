"""scripts/slurm_train.sbatch on a real Slurm: what a time limit, scancel and a killed worker do.

A single-node Slurm 22.05 (Debian's slurm-wlm and munge; tests/slurm_cluster.py) is started once
for this module, configured for fast requeues. Jobs are submitted with `sbatch` the way a user
submits them; each runs a 2-task `strategy=multi_worker` gang on the one node, whose name does not
resolve (the workers reach it at its NodeAddr). Signals come from Slurm itself: the time-limit
warning from slurmctld, SIGTERM from `scancel`, and a SIGKILL to one task stands for the OOM killer.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from harness.checkpoint.files import list_checkpoints
from tests.background import BackgroundRun
from tests.conftest import PROJECT_ROOT, TINY, checkpoint_values, subprocess_env
from tests.slurm_cluster import NODE_NAME, SlurmCluster, ensure_installed
from tests.slurm_paced_model import PACE_FILE_VARIABLE

SLURM_SCRIPT = PROJECT_ROOT / "scripts" / "slurm_train.sbatch"
LAUNCH_LOCAL = PROJECT_ROOT / "scripts" / "launch_local.py"
STEPS = 150
# Interruptible after ckpt-50 (signals are seen every 5 steps), exact, and paced: >= 0.1 s a step
# while the job's pace file exists.
RUN = (*TINY, f"trainer.max_steps={STEPS}", "trainer.steps_per_loop=5", "trainer.log_every=25",
       "trainer.eval_every=0", "checkpoint.every_steps=25", "export.enabled=false",
       "strategy.peer_timeout_seconds=10", "deterministic=true", "model.dropout=0.2",
       "model._target_=tests.slurm_paced_model.build_paced_mlp")
# Paced, still training 55 s after ckpt-50: the time-limit warning arrives within 30 s (+ load).
TIME_LIMITED_STEPS = 600
FINAL_STATES = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY"}


def sbatch_directives(path: Path) -> dict[str, str]:
    directives = {}
    for line in path.read_text().splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH "):].strip().partition("=")
            directives[key] = value
    return directives


def test_slurm_script_syntax_and_directives() -> None:
    from harness.config.schema import PreemptionConfig

    assert subprocess.run(["bash", "-n", str(SLURM_SCRIPT)], capture_output=True).returncode == 0
    directives = sbatch_directives(SLURM_SCRIPT)
    assert "--requeue" in directives
    signal_name, _, lead_seconds = directives["--signal"].partition("@")
    assert signal_name == "USR1" and "SIGUSR1" in PreemptionConfig().signals  # to the tasks, not B: (the shell)
    hours, minutes, seconds = (int(part) for part in directives["--time"].split(":"))
    assert 60 <= int(lead_seconds) < (hours * 3600 + minutes * 60 + seconds) / 4
    assert directives["--ntasks-per-node"] == "1" and int(directives["--nodes"]) >= 2
    text = SLURM_SCRIPT.read_text()
    srun_lines = [line for line in text.splitlines() if line.lstrip().startswith("srun ")]
    assert len(srun_lines) == 1 and "--kill-on-bad-exit=0" in srun_lines[0]
    assert "train.py strategy=multi_worker" in text and re.search(r"PREEMPTED=42\b", text)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    ensure_installed()
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


class Job:
    """One `sbatch` of scripts/slurm_train.sbatch, its output file, and its pace file (deleted by `unpace`)."""

    def __init__(self, slurm: SlurmCluster, tmp_path: Path, *sbatch_options: str, overrides: tuple[str, ...]) -> None:
        self.slurm, self.output_file, self.pace_file = slurm, tmp_path / "job.out", tmp_path / "pace"
        self.pace_file.touch()
        env = subprocess_env(HARNESS_PYTHON=sys.executable, TMPDIR=str(tmp_path),
                             **{PACE_FILE_VARIABLE: str(self.pace_file)})
        submitted = slurm.run(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
                               f"--output={self.output_file}", *sbatch_options, str(SLURM_SCRIPT), *overrides],
                              env=env)
        self.id = int(submitted.stdout.strip().split(";")[0])

    def unpace(self) -> None:
        """From now on the job trains at full speed."""
        self.pace_file.unlink(missing_ok=True)

    @property
    def output(self) -> str:
        return self.output_file.read_text(errors="replace") if self.output_file.exists() else ""

    def wait_for_output(self, pattern: str, *, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while not (match := re.search(pattern, self.output, re.MULTILINE)):
            if time.monotonic() > deadline:
                raise AssertionError(f"job {self.id}: no line matching {pattern!r} within {timeout}s; "
                                     f"{self.slurm.job(self.id)}\n{self.output[-5000:]}")
            time.sleep(0.3)
        return match

    def wait_until_done(self, *, timeout: float) -> dict[str, str]:
        return self.slurm.wait_for_state(self.id, FINAL_STATES, timeout=timeout)

    def task_pid(self, rank: int) -> int:
        """The pid of train.py in task `rank` (this test runs as the node's root: /proc shows it)."""
        listed = self.slurm.run(["scontrol", "listpids", str(self.id)]).stdout
        for pid in re.findall(r"^(\d+)\s", listed, re.MULTILINE):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                command = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"train.py" in command and f"SLURM_PROCID={rank}".encode() in environ:
                return int(pid)
        raise AssertionError(f"no train.py of task {rank} among job {self.id}'s processes:\n{listed}")

    def cancel_if_running(self) -> None:
        if self.slurm.job(self.id).get("JobState") not in FINAL_STATES:
            self.slurm.run(["scancel", str(self.id)], check=False)


def task_steps(output: str, pattern: str) -> dict[int, list[int]]:
    """Per task (srun --label prefix), the step numbers of its lines matching `pattern` (one group)."""
    return {rank: [int(m.group(1)) for m in re.finditer(rf"^{rank}: .*{pattern}", output, re.MULTILINE)]
            for rank in (0, 1)}


def latest_step(run_dir: Path) -> int:
    return list_checkpoints(str(run_dir / "checkpoints"))[0][0]


def final_values(run_dir: Path, steps: int = STEPS) -> dict[str, object]:
    """The training state in ckpt-`steps`; not TensorFlow's save_counter (a stop adds a save)."""
    values = checkpoint_values(run_dir / "checkpoints" / f"ckpt-{steps}")
    return {name: value for name, value in values.items() if not name.startswith("save_counter/")}


@pytest.mark.slow
def test_time_limit_requeues_the_gang_which_ends_bit_identical_to_an_uninterrupted_run(
        slurm: SlurmCluster, tmp_path: Path) -> None:
    run_dir, reference_dir = tmp_path / "run", tmp_path / "reference"
    overrides = (*RUN, f"trainer.max_steps={TIME_LIMITED_STEPS}")
    job = Job(slurm, tmp_path, "--time=10", "--signal=USR1@170", overrides=(f"run_dir={run_dir}", *overrides))
    try:
        job.wait_for_output(r"^0: .*saved checkpoint ckpt-50\b", timeout=120)
        # Shorten the time limit to 3 minutes: the job is then within 170 s of it (it has run for
        # more than 10 s, and for less than 180 s however slow the machine), and slurmctld's next
        # time-limit pass (every 30 s) sends the warning signal, SIGUSR1, to every task.
        slurm.run(["scontrol", "update", f"JobId={job.id}", "TimeLimit=3"])
        # Meanwhile, the reference: the same gang, uninterrupted (and unpaced), by launch_local.py.
        with BackgroundRun([sys.executable, str(LAUNCH_LOCAL), "--workers", "2", "--", f"run_dir={reference_dir}",
                            *overrides], env=subprocess_env(TMPDIR=str(tmp_path))) as reference:
            job.wait_for_output(r"requeueing job", timeout=60)
            job.unpace()
            slurm.run(["scontrol", "update", f"JobId={job.id}", "TimeLimit=10"])  # the requeued run's
            assert reference.finish(timeout=120) == 0, reference.tail()
        fields = job.wait_until_done(timeout=120)
    finally:
        job.cancel_if_running()
    output = job.output
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", (fields, output[-5000:])
    stops = task_steps(output, r"stopped at step (\d+) after a stop signal")
    assert len(stops[0]) == 1 and stops[0] == stops[1], f"tasks stopped at {stops}\n{output[-5000:]}"
    assert re.search(r"^[01]: .*received SIGUSR1", output, re.MULTILINE), output[-5000:]
    assert task_steps(output, r"resuming from checkpoint \S+ at step (\d+)") == {0: stops[0], 1: stops[0]}
    assert 50 <= stops[0][0] < TIME_LIMITED_STEPS and latest_step(run_dir) == TIME_LIMITED_STEPS
    resumed, uninterrupted = final_values(run_dir, TIME_LIMITED_STEPS), final_values(reference_dir, TIME_LIMITED_STEPS)
    assert resumed.keys() == uninterrupted.keys()
    different = [name for name in resumed if not np.array_equal(resumed[name], uninterrupted[name])]
    assert not different, f"not bit-identical after the requeue: {different}"


@pytest.mark.slow
def test_scancel_stops_the_job_for_good_after_the_workers_save(slurm: SlurmCluster, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    job = Job(slurm, tmp_path, overrides=(f"run_dir={run_dir}", *RUN, "trainer.max_steps=100000"))
    try:
        job.wait_for_output(r"^0: .*saved checkpoint ckpt-50\b", timeout=120)
        slurm.run(["scancel", str(job.id)])
        fields = job.wait_until_done(timeout=60)
    finally:
        job.cancel_if_running()
    output = job.output
    assert fields["JobState"] == "CANCELLED" and fields["Restarts"] == "0", (fields, output[-5000:])
    stops = task_steps(output, r"stopped at step (\d+) after a stop signal")
    assert len(stops[0]) == 1 and stops[0] == stops[1], f"tasks stopped at {stops}\n{output[-5000:]}"
    assert latest_step(run_dir) == stops[0][0] >= 50, "the save after scancel is the latest checkpoint"
    assert "not requeueing" in output and "requeueing job" not in output, output[-5000:]
    time.sleep(1)
    assert slurm.job(job.id)["JobState"] == "CANCELLED"


@pytest.mark.slow
def test_a_worker_killed_by_a_signal_is_requeued_and_the_job_finishes(slurm: SlurmCluster, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    job = Job(slurm, tmp_path, overrides=(f"run_dir={run_dir}", *RUN))
    try:
        job.wait_for_output(r"^0: .*saved checkpoint ckpt-50\b", timeout=120)
        worker = job.task_pid(1)
        environ = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
        # The hosts and ports the workers use: the node's NodeAddr, and ports Slurm reserved for the step.
        assert f"HARNESS_NODE_ADDRESSES={NODE_NAME}=127.0.0.1".encode() in environ
        assert any(re.fullmatch(rb"SLURM_STEP_RESV_PORTS=\d+-\d+", item) for item in environ), environ
        os.kill(worker, signal.SIGKILL)  # what the OOM killer does
        job.unpace()
        fields = job.wait_until_done(timeout=150)
    finally:
        job.cancel_if_running()
    output = job.output
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", (fields, output[-5000:])
    assert re.search(r"workers exited 1[3-9]\d; requeueing job", output), output[-5000:]
    resumed = task_steps(output, r"resuming from checkpoint \S+ at step (\d+)")
    assert len(resumed[0]) == 1 and resumed[0] == resumed[1] and resumed[0][0] >= 50, resumed
    assert latest_step(run_dir) == STEPS
    assert int(final_values(run_dir)["step/.ATTRIBUTES/VARIABLE_VALUE"]) == STEPS


@pytest.mark.slow
def test_a_config_error_ends_the_job_without_a_requeue(slurm: SlurmCluster, tmp_path: Path) -> None:
    job = Job(slurm, tmp_path, overrides=(f"run_dir={tmp_path / 'run'}", *RUN, "trainer.max_stepz=5"))
    try:
        fields = job.wait_until_done(timeout=120)
    finally:
        job.cancel_if_running()
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] == "2:0" and fields["Restarts"] == "0", \
        (fields, job.output[-5000:])
    assert "max_stepz" in job.output and "requeueing" not in job.output
