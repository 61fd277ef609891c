#!/usr/bin/env python
"""Kill a training command at random moments, restart it each time, and check the end state.

    python scripts/chaos.py --kills 5 --reference -- \\
        python train.py run_dir=outputs/chaos deterministic=true model.dropout=0.2

Prints kills, restarts, steps redone and (with --reference) whether the final checkpoint is
bit-identical to an uninterrupted run of the same command with run_dir (and checkpoint.dir, if
given) suffixed `-reference`.
Exit status 0 if the run completed (and matched the reference), 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.tooling.chaos import compare_checkpoints, reference_command, run_attempt, run_chaos


def _override(command: list[str], key: str) -> str | None:
    values = [arg.split("=", 1)[1] for arg in command if arg.startswith(f"{key}=")]
    return values[-1] if values else None


def _newest_checkpoint(command: list[str]) -> str:
    from harness.checkpoint.files import list_checkpoints

    directory = _override(command, "checkpoint.dir") or f"{_override(command, 'run_dir')}/checkpoints"
    found = list_checkpoints(directory)
    if not found:
        raise SystemExit(f"error: no checkpoint found in {directory}")
    return found[0][1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=3, help="how many times to interrupt the command")
    parser.add_argument("--signals", default="SIGKILL,SIGTERM", help="comma-separated signals to pick from")
    parser.add_argument("--max-jitter", type=float, default=0.1,
                        help="each kill lands at a random point of the remaining steps plus up to this many seconds")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill schedule")
    parser.add_argument("--reference", action="store_true",
                        help="also run the command uninterrupted (run_dir suffixed -reference) and compare")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- followed by the training command")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the training command after --")
    if args.reference and _override(command, "run_dir") is None:
        parser.error("--reference needs an explicit run_dir=... in the command")
    signals = [signal.Signals[name.strip().upper()] for name in args.signals.split(",")]

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    report = run_chaos(command, kills=args.kills, signals=signals, max_jitter=args.max_jitter, seed=args.seed, env=env)
    if args.reference and report.completed:
        reference = reference_command(command)
        finished = run_attempt(reference, kill_signal=None, env=env)
        if finished.exit_code != 0:
            print(finished.output[-3000:])
            raise SystemExit("error: the reference run failed")
        report.differing_variables = compare_checkpoints(_newest_checkpoint(command), _newest_checkpoint(reference))
        report.reference_equal = not report.differing_variables
    print(report.summary())
    return 0 if report.completed and report.reference_equal is not False else 1


if __name__ == "__main__":
    raise SystemExit(main())
