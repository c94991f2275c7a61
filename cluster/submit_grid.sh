#!/usr/bin/env bash
# Submit a grid as a Ray job: cluster/submit_grid.sh CONFIG.yaml [--set key=value ...]
# (cluster/submit_job.sh has the environment variables it reads).
set -euo pipefail
config=${1:?usage: cluster/submit_grid.sh CONFIG.yaml [--set key=value ...]}
shift
exec "$(dirname "$0")/submit_job.sh" pipelines.grid --config "$config" "$@"
