#!/bin/bash
# The training command of harness-train.service (scripts/vm_startup.sh): identical on every boot,
# so each run resumes where the previous one saved. Settings come from /etc/harness/train.env:
#   HARNESS_OVERRIDES   train.py overrides, e.g. "experiment=spot1 trainer.max_steps=100000"
#   HARNESS_PYTHON      the interpreter (default python3)
# strategy=auto uses every GPU of the VM (mirrored) or the CPU. Exit codes are train.py's.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
export PYTHONUNBUFFERED=1
# shellcheck disable=SC2086  # HARNESS_OVERRIDES is a list of key=value words
exec "${HARNESS_PYTHON:-python3}" train.py strategy=auto ${HARNESS_OVERRIDES:-}
