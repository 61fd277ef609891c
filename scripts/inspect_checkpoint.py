#!/usr/bin/env python
"""List the checkpoints of a run and show what one of them holds, or what would not restore.

    python scripts/inspect_checkpoint.py outputs/default                 # run dir: list + newest's variables
    python scripts/inspect_checkpoint.py outputs/default/checkpoints/ckpt-400
    python scripts/inspect_checkpoint.py outputs/default --step 200
    python scripts/inspect_checkpoint.py outputs/default --diff model.hidden=[256] optimizer=sgd

The list gives step, time, size and whether each checkpoint is intact (every tensor read back,
checksums verified). Variables are grouped model / optimizer / training state. `--diff OVERRIDES`
compares the checkpoint with the model and optimizer `python train.py OVERRIDES` would build and
says what would not restore. For a run directory it also prints the newest checkpoint's provenance
(harness version, TensorFlow version, overrides) and the run record (restarts, preemptions,
crashes, kills, rollbacks, steps redone, wall time lost). Exit code 0, or 2 with a message (no such
path, no checkpoint, bad config).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.errors import exit_code_of  # after the path set-up above


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="a run directory, a checkpoint directory or a checkpoint prefix")
    parser.add_argument("--step", type=int, default=None, help="show this step's checkpoint (default: newest intact)")
    parser.add_argument("--diff", nargs="*", metavar="OVERRIDE", default=None,
                        help="train.py overrides to compare the checkpoint with (none: the default config)")
    args = parser.parse_args(argv)
    from harness.lean_import import import_tensorflow

    import_tensorflow()  # a second sooner (harness/lean_import.py)
    from harness.checkpoint import contents as checkpoint_contents
    from harness.results import inspection

    located = inspection.locate(args.path)
    print("\n".join(inspection.format_listing(located, inspection.describe(located))), flush=True)
    prefix = inspection.select(located, args.step)
    if args.diff is None:
        lines = inspection.format_variables(prefix, checkpoint_contents.read_variables(prefix))
        lines += inspection.format_provenance(prefix)
        if located.run_dir:
            lines += inspection.format_run_record(located.run_dir)
    else:
        lines = inspection.format_difference(prefix, args.diff, inspection.diff_against_config(prefix, args.diff))
    print("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    raise SystemExit(exit_code_of(main, sys.argv[1:]))
