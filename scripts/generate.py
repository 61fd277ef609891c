#!/usr/bin/env python
"""Sample text from a language-model run's checkpoint (task=language_model, byte-level data).

    python scripts/generate.py outputs/default --prompt "The assert statement"
    python scripts/generate.py outputs/default --prompt "def " --length 400 --temperature 0.8 --seed 1

Prints the prompt followed by the sampled continuation. Each step feeds the model the last
`seq_len` bytes it was trained on. Exit code 0, or 2 with a message (not a language-model run,
no checkpoint).
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
    parser.add_argument("run_dir", help="the run directory of a task=language_model run")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--length", type=int, default=200, help="bytes to sample (default 200)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = always the likeliest byte")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same text)")
    parser.add_argument("--checkpoint", default=None, help="a global step or a checkpoint prefix (default: newest)")
    args = parser.parse_args(argv)
    from harness.lean_import import import_tensorflow

    import_tensorflow()  # a second sooner (harness/lean_import.py)
    from harness.results import inference
    from harness.results.generation import generate_text

    loaded = inference.load(args.run_dir, inference.checkpoint_argument(args.checkpoint))
    print(args.prompt + generate_text(loaded, args.prompt, length=max(0, args.length),
                                      temperature=args.temperature, seed=args.seed))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    raise SystemExit(exit_code_of(main, sys.argv[1:]))
