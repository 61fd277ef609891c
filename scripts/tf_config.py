#!/usr/bin/env python
"""Print the TF_CONFIG of one worker, for launchers that start workers themselves.

    # pod of a Kubernetes Indexed Job (see scripts/k8s_job.yaml):
    export TF_CONFIG="$(python scripts/tf_config.py --workers 4 --index "$JOB_COMPLETION_INDEX" \\
                        --host-template 'trainer-{index}.trainer:2222')"
    # explicit addresses, e.g. hand-started VMs:
    export TF_CONFIG="$(python scripts/tf_config.py --index 1 --hosts 10.0.0.5:2222,10.0.0.6:2222)"

Worker 0 is the chief. Thin wrapper over `harness.distributed.cluster`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.distributed import cluster  # after the path set-up above


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=int, required=True, help="this worker's index (0 = chief)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--host-template", help="address with an {index} field, e.g. 'trainer-{index}.trainer:2222'")
    source.add_argument("--hosts", help="comma-separated host:port of every worker, in index order")
    parser.add_argument("--workers", type=int, help="number of workers (with --host-template)")
    args = parser.parse_args(argv)
    try:
        if args.host_template is not None:
            if args.workers is None:
                parser.error("--host-template needs --workers")
            config = cluster.indexed_job_tf_config(num_workers=args.workers, index=args.index,
                                                   host_template=args.host_template)
        else:
            config = cluster.tf_config([host for host in args.hosts.split(",") if host], args.index)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(cluster.to_json(config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
