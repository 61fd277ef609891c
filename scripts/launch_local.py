#!/usr/bin/env python
"""Run train.py as an N-worker MultiWorkerMirroredStrategy cluster on this machine.

    python scripts/launch_local.py --workers 2 -- experiment=mw trainer.max_steps=500

Each worker gets a free loopback port and its own `TF_CONFIG`; `strategy=multi_worker` is added
to the overrides unless they choose a strategy. Output lines are prefixed `[worker0]`, ...; the
launcher's own lines `[gang]`. SIGTERM, SIGINT and SIGUSR1 are forwarded to every worker; if one
worker fails, the others are killed after `--grace-seconds` (see harness/distributed/gang.py). Exit code: 0
when all finished, the preemption code (42) if the gang was stopped by a signal after saving,
else the first failing worker's code. Rerun the same command to resume.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.distributed import (
    cluster,
    gang,  # after the path set-up above
)
from harness.errors import ExitCode

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, required=True, help="number of worker processes (>= 1)")
    parser.add_argument("--host", default="127.0.0.1", help="address the workers listen on")
    parser.add_argument("--grace-seconds", type=float, default=30.0,
                        help="after a worker fails, seconds the others get to exit before being killed")
    parser.add_argument("--preemption-exit-code", type=int, default=None,
                        help="the workers' preemption.exit_code (default: taken from the overrides, else 42)")
    parser.add_argument("overrides", nargs="*", help="train.py overrides, after '--'")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    chosen = any(override.startswith("strategy=") for override in args.overrides)
    command = [sys.executable, str(PROJECT_ROOT / "train.py"), *([] if chosen else ["strategy=multi_worker"]),
               *args.overrides]
    workers = [
        gang.WorkerSpec(name=f"worker{index}", command=command,
                        env={**os.environ, "TF_CONFIG": cluster.to_json(config), "PYTHONUNBUFFERED": "1"})
        for index, config in enumerate(cluster.local_cluster(args.workers, host=args.host))
    ]
    preemption_exit_code = args.preemption_exit_code
    if preemption_exit_code is None:
        preemption_exit_code = gang.preemption_exit_code_of(args.overrides, default=int(ExitCode.PREEMPTED))
    return gang.Gang(workers, preemption_exit_code=preemption_exit_code, grace_seconds=args.grace_seconds,
                     cwd=str(PROJECT_ROOT)).run()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
