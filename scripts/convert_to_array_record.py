#!/usr/bin/env python
"""Convert TFRecord files or a .npz archive to ArrayRecord shards that training reads by index.

    python scripts/convert_to_array_record.py "data/train-*.tfrecord" data/train_ar
    python scripts/convert_to_array_record.py data/train.npz data/train_ar --num-shards 8

Writes OUTPUT_DIR/data-00000-of-000NN.array_record (group size 1: any record is read alone),
streaming the input with bounded memory. TFRecord records (tf.train.Examples) are copied as they
are after a layout check; .npz arrays `features` (N, ...) and `labels` (N,) or (N, k) become one
tf.train.Example per row. Then train with `data=array_record data.path="OUTPUT_DIR/*.array_record"`.
Exit code 0, or 2 with a one-line message (bad input, or shards already in OUTPUT_DIR).
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
    parser.add_argument("input", help="a glob of TFRecord files (quote it) or a .npz archive")
    parser.add_argument("output_dir", help="directory for the shards (created if missing)")
    sharding = parser.add_mutually_exclusive_group()
    sharding.add_argument("--records-per-shard", type=int, default=None,
                          help="records per shard (default 100000)")
    sharding.add_argument("--num-shards", type=int, default=None, help="number of shards, records spread evenly")
    parser.add_argument("--features-key", default="features", help="feature / array name of the inputs")
    parser.add_argument("--labels-key", default="labels", help="feature / array name of the targets")
    parser.add_argument("--class-ids", action="store_true",
                        help=".npz: store float labels that are whole numbers as int64 class ids (default: floats "
                             "stay float targets)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in OUTPUT_DIR")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    from harness.lean_import import import_tensorflow

    import_tensorflow()  # a second sooner (harness/lean_import.py)
    from harness.data.record_conversion import convert_to_array_record

    summary = convert_to_array_record(args.input, args.output_dir, records_per_shard=args.records_per_shard,
                                      num_shards=args.num_shards, features_key=args.features_key,
                                      labels_key=args.labels_key, class_ids=args.class_ids, overwrite=args.overwrite,
                                      progress=not args.no_progress)
    print(summary)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    raise SystemExit(exit_code_of(main, sys.argv[1:]))
