#!/usr/bin/env python
"""Export a run's model for serving: RUN_DIR/export/model.keras and RUN_DIR/export/saved_model.

    python scripts/export.py outputs/default                      # newest intact checkpoint
    python scripts/export.py outputs/default --checkpoint 400 --output /srv/models/digits/1

Training exports at the end by itself (`export.enabled`, default true); this re-exports from any
checkpoint. Reload with `keras.saving.load_model(".../model.keras")` or
`tf.saved_model.load(".../saved_model").serve(x)`. Exit code 0, or 2 with a message.
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
    parser.add_argument("run_dir", help="the run directory (holds config.yaml and checkpoints)")
    parser.add_argument("--checkpoint", default=None, help="a global step or a checkpoint prefix (default: newest)")
    parser.add_argument("--output", default=None, help="export directory (default: RUN_DIR/export)")
    args = parser.parse_args(argv)
    from harness.lean_import import import_tensorflow

    import_tensorflow()  # a second sooner (harness/lean_import.py)
    from harness.results import export, inference

    loaded = inference.load(args.run_dir, inference.checkpoint_argument(args.checkpoint))
    paths = export.export_model(loaded.model, args.output or os.path.join(args.run_dir, "export"), task=loaded.task,
                                input_shape=loaded.input_shape, input_dtype=loaded.input_dtype)
    print(f"exported {loaded.checkpoint} (step {loaded.step}):\n  {paths.keras_file}\n  {paths.saved_model_dir}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    raise SystemExit(exit_code_of(main, sys.argv[1:]))
