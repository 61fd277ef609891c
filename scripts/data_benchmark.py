#!/usr/bin/env python
"""Data bigger than memory, measured (docs/benchmarks.md section 6): file-backed input against the
same data in memory and against a `TFRecordDataset` pipeline. The measurement is
scripts/tooling/data_benchmark.py; `--help` lists the options.

    python scripts/data_benchmark.py                          # 8 GB + 100 MB data sets, 3 repeats
    python scripts/data_benchmark.py --gigabytes 0 --repeats 5   # the 100 MB set only (no large set)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.tooling.data_benchmark import main

if __name__ == "__main__":
    sys.exit(main())
