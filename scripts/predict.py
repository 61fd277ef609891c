#!/usr/bin/env python
"""Predict with a run's checkpointed model for a file of inputs.

    python scripts/predict.py outputs/default inputs.npy               # newest intact checkpoint
    python scripts/predict.py outputs/default inputs.csv --checkpoint 400 --outputs logits.npy

INPUTS: .npy (N, *input_shape), .npz (array `features`, or its only array) or .csv (one example
per row, an optional header line); flat rows are reshaped to the model's input shape. Prints CSV on
stdout, as the run's task defines it: `row,predicted_class,probability` for classification,
`row,prediction` (in the targets' units) for regression, `row,next_token,probability` for a
language model. Exit code 0, or 2 with a message (bad file or run).
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
    parser.add_argument("inputs", help="a .npy, .npz or .csv file of examples")
    parser.add_argument("--checkpoint", default=None, help="a global step or a checkpoint prefix (default: newest)")
    parser.add_argument("--outputs", "--logits", dest="outputs", default=None,
                        help="also save the model's raw outputs (logits for classification) to this .npy file")
    parser.add_argument("--batch-size", type=int, default=1024, help="examples per model call")
    args = parser.parse_args(argv)
    import numpy as np

    from harness.lean_import import import_tensorflow

    import_tensorflow()  # a second sooner (harness/lean_import.py)
    from harness.results import inference

    loaded = inference.load(args.run_dir, inference.checkpoint_argument(args.checkpoint))
    features = inference.read_inputs(args.inputs, loaded.input_shape, dtype=loaded.input_dtype)
    outputs = inference.predict_outputs(loaded.model, features, batch_size=max(1, args.batch_size))
    if args.outputs:
        np.save(args.outputs, outputs)
    print("\n".join(loaded.task.prediction_lines(outputs)))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    raise SystemExit(exit_code_of(main, sys.argv[1:]))
