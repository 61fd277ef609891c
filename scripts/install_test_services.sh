#!/usr/bin/env bash
# Installs what the test suite's Slurm tests start themselves: Slurm (slurmctld, slurmd, the client
# commands) and munge, from Debian's packages. Does nothing when they are installed; needs root
# otherwise (CI runs as root). The tests start the daemons with their own config in a temporary
# directory: no system service is configured or started here.
set -euo pipefail

missing=0
for program in munged slurmctld slurmd sbatch srun scontrol scancel squeue; do
    command -v "$program" >/dev/null 2>&1 || missing=1
done
[ "$missing" -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "install_test_services: slurm-wlm and munge are missing; run this script as root" \
         "or: sudo apt-get install slurm-wlm munge" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends slurm-wlm munge
