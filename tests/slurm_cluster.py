"""A real single-node Slurm for the tests: munged, slurmctld and slurmd from Debian's packages.

Everything lives in one temporary directory (config, munge key and socket, state, logs, pid
files); the daemons run as the current user (root in CI) on free ports and are stopped by
`stop()`. The configuration is tuned for fast requeues: a requeued job becomes eligible
`cred_expire + 1` seconds after the requeue and is started by the next scheduling pass.

The node is called `harness-node0`, a name that does not resolve, and is reached at 127.0.0.1
(`NodeAddr`): the jobs must use the node's address, not its name, as a real cluster whose node
names are not host names requires.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from harness.distributed import cluster

NODE_NAME = "harness-node0"
CRED_EXPIRE_SECONDS = 8  # a requeued job waits this + 1 s (Slurm's default is 120)
SCHED_INTERVAL_SECONDS = 2  # the periodic scheduling pass that starts it then (default 60)
KILL_WAIT_SECONDS = 10  # between SIGTERM and SIGKILL when a job is cancelled: the save budget
REQUIRED_PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue", "srun")
# The daemons live in sbin directories, which are not on every PATH (a non-login or bare environment).
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def _search_path(path: str | None = None) -> str:
    """`path` (default: this process's PATH) with the sbin directories appended where missing."""
    parts = [part for part in (os.environ.get("PATH", "") if path is None else path).split(os.pathsep) if part]
    return os.pathsep.join(parts + [directory for directory in _SBIN if directory not in parts])

SLURM_CONF = """\
ClusterName=harnesstest
SlurmctldHost={controller}(127.0.0.1)
SlurmctldPort={controller_port}
SlurmdPort={node_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire={cred_expire}
SlurmUser={user}
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
MpiParams=ports=12000-12999
SchedulerType=sched/builtin
SchedulerParameters=sched_interval={sched_interval}
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait={kill_wait}
MinJobAge=300
InactiveLimit=0
MessageTimeout=10
NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 CPUs=4 State=UNKNOWN
PartitionName=harness Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmError(RuntimeError):
    """The test cluster could not be started."""


class SlurmCluster:
    """A running single-node Slurm whose config is `self.conf`; `env()` points its clients at it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self._daemons: list[subprocess.Popen[bytes]] = []

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """`base` (default: this process's environment) with `SLURM_CONF` pointing at this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = _search_path(env.get("PATH", ""))
        return env

    def start(self) -> SlurmCluster:
        missing = [program for program in REQUIRED_PROGRAMS if not shutil.which(program, path=_search_path())]
        if missing:
            raise SlurmError(f"Slurm programs not found: {', '.join(missing)}; install Debian's slurm-wlm and "
                             "munge (scripts/install_test_services.sh does)")
        for directory in ("munge", "state", "spool"):
            (self.root / directory).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        controller_port, node_port = cluster.free_ports(2)
        self.conf.write_text(SLURM_CONF.format(
            root=self.root, controller=socket.gethostname().split(".")[0], controller_port=controller_port,
            node_port=node_port, cred_expire=CRED_EXPIRE_SECONDS, sched_interval=SCHED_INTERVAL_SECONDS,
            kill_wait=KILL_WAIT_SECONDS, user=_user_name(), node=NODE_NAME, host=socket.gethostname()))
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld.out")
        self._spawn(["slurmd", "-D", "-N", NODE_NAME, "-f", str(self.conf)], "slurmd.out")
        self._wait_until_idle(timeout=60)
        return self

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        (self.root / "munge").chmod(0o700)
        self._spawn(["munged", "-F", "--force", f"--key-file={key}", f"--socket={self.root}/munge/munge.socket",
                     f"--pid-file={self.root}/munge/munged.pid", f"--log-file={self.root}/munge/munged.log",
                     f"--seed-file={self.root}/munge/munged.seed"], "munged.out")
        _wait_for(lambda: (self.root / "munge" / "munge.socket").exists(), timeout=20, what="munged's socket",
                  log=self.root / "munged.out")

    def _spawn(self, command: list[str], log_name: str) -> None:
        with open(self.root / log_name, "ab") as log:
            self._daemons.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                                  start_new_session=True))

    def _wait_until_idle(self, *, timeout: float) -> None:
        def idle() -> bool:
            for daemon in self._daemons:
                if daemon.poll() is not None:
                    raise SlurmError(f"{daemon.args[0]} exited with {daemon.returncode}; see {self.root}")
            result = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
            return result.returncode == 0 and result.stdout.strip() == "idle"

        _wait_for(idle, timeout=timeout, what=f"node {NODE_NAME} to be idle", log=self.root / "slurmctld.log")

    def run(self, command: list[str], *, check: bool = True, timeout: float = 30,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """A Slurm client command (`sbatch`, `scontrol`, ...) against this cluster."""
        result = subprocess.run(command, env=self.env(env), capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise SlurmError(f"{' '.join(command)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job`'s fields (JobState, Restarts, ExitCode, ...); {} once the job is forgotten."""
        result = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        return dict(re.findall(r"(\w+)=(\S*)", result.stdout)) if result.returncode == 0 else {}

    def wait_for_state(self, job_id: int, states: set[str], *, timeout: float) -> dict[str, str]:
        """The job's fields once its state is one of `states`; AssertionError after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            fields = self.job(job_id)
            if fields.get("JobState") in states:
                return fields
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} not in {sorted(states)} within {timeout}s: {fields}")
            time.sleep(0.5)

    def stop(self) -> None:
        """Cancel every job still there (their tasks must not outlive the daemons), then stop the daemons."""
        if self._daemons:
            queued = self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
            if queued:
                self.run(["scancel", *queued], check=False)
                _wait_for(lambda: not self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.strip(),
                          timeout=KILL_WAIT_SECONDS + 15, what="the cancelled jobs to end",
                          log=self.root / "slurmctld.log")
        for daemon in reversed(self._daemons):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(daemon.pid, signal.SIGTERM)
        for daemon in reversed(self._daemons):
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(daemon.pid, signal.SIGKILL)
                daemon.wait(timeout=15)
        self._daemons.clear()


def _user_name() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def _wait_for(condition, *, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
            raise SlurmError(f"timed out after {timeout}s waiting for {what}; {log}:\n{tail}")
        time.sleep(0.2)


def ensure_installed() -> None:
    """Install slurm-wlm and munge (as root, with apt-get) if a program is missing; quick if all are there."""
    if all(shutil.which(program, path=_search_path()) for program in REQUIRED_PROGRAMS):
        return
    script = Path(__file__).resolve().parent.parent / "scripts" / "install_test_services.sh"
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise SlurmError(f"{script} exited {result.returncode}:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
