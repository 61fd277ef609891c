#!/bin/bash
# Boot script of a preemptible / spot VM (GCE `startup-script` metadata, AWS or Azure user data
# run on every boot): installs scripts/harness-train.service and starts it. Idempotent.
#
#   gcloud compute instances create trainer --provisioning-model=SPOT \
#       --instance-termination-action=STOP --metadata-from-file=startup-script=scripts/vm_startup.sh
#
# The project must already be on the VM's disk at HARNESS_DIR (an image or a persistent disk), and
# run_dir on that disk or on gs://..., so that checkpoints survive the preemption.
set -euo pipefail

HARNESS_DIR="${HARNESS_DIR:-/opt/harness}"   # the project checkout
HARNESS_USER="${HARNESS_USER:-root}"         # the account training runs as
UNIT_DIR="${UNIT_DIR:-/etc/systemd/system}"
ENV_FILE="${ENV_FILE:-/etc/harness/train.env}"
DEFAULT_OVERRIDES="${DEFAULT_OVERRIDES:-experiment=spot}"

if [ ! -f "$HARNESS_DIR/train.py" ]; then
    echo "vm_startup: no train.py in HARNESS_DIR=$HARNESS_DIR" >&2
    exit 1
fi
mkdir -p "$UNIT_DIR" "$(dirname "$ENV_FILE")"
if [ ! -f "$ENV_FILE" ]; then  # first boot only: later edits to the file are kept
    printf 'HARNESS_OVERRIDES="%s"\n' "$DEFAULT_OVERRIDES" > "$ENV_FILE"
fi
sed -e "s|@HARNESS_DIR@|$HARNESS_DIR|g" -e "s|@HARNESS_USER@|$HARNESS_USER|g" \
    -e "s|/etc/harness/train.env|$ENV_FILE|g" \
    "$HARNESS_DIR/scripts/harness-train.service" > "$UNIT_DIR/harness-train.service"
systemctl daemon-reload
systemctl enable harness-train.service
systemctl start --no-block harness-train.service
echo "vm_startup: harness-train.service started; follow it with: journalctl -fu harness-train"
