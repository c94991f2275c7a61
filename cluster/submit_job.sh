#!/usr/bin/env bash
# Submit one of rlsedit's pipelines as a Ray job to a running cluster and follow its logs.
# usage: cluster/submit_job.sh MODULE [ARGS ...]
#   cluster/submit_job.sh pipelines.grid --config pipelines/configs/cpu-demo.yaml
#   cluster/submit_job.sh pipelines.reeval --experiment rlsedit-grid --first-k 100
#   RAY_ADDRESS          the cluster's dashboard (default http://127.0.0.1:8265)
#   MLFLOW_TRACKING_URI  where runs go (default: sqlite store ./mlflow.db of this folder)
#   SUBMIT_FLAGS         extra `ray job submit` flags, e.g. "--no-wait"
# Relative paths in a config (data, output_dir) are read against this folder
# (RLSEDIT_WORKDIR), which the job's nodes must see: a laptop or a shared file system.
set -euo pipefail
cd "$(dirname "$0")/.."
module=${1:?usage: cluster/submit_job.sh MODULE [ARGS ...]}
shift
export RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
tracking=${MLFLOW_TRACKING_URI:-sqlite:///$PWD/mlflow.db}
cache=${RLSEDIT_CACHE:-$HOME/.cache/rlsedit}
python=${PYTHON:-.venv/bin/python}
env_json=$("$python" - "$PWD" "$tracking" "$cache" <<'PY'
import json, sys, yaml
env = yaml.safe_load(open("cluster/runtime_env.yaml"))
env.setdefault("env_vars", {}).update(RLSEDIT_WORKDIR=sys.argv[1], MLFLOW_TRACKING_URI=sys.argv[2],
                                      RLSEDIT_CACHE=sys.argv[3])
print(json.dumps(env))
PY
)
# shellcheck disable=SC2086
exec "$(dirname "$python")/ray" job submit ${SUBMIT_FLAGS:-} --working-dir . \
    --runtime-env-json "$env_json" -- python -m "$module" "$@"
