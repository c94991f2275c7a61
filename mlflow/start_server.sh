#!/usr/bin/env bash
# Start an MLflow tracking server: SQLite backend and artifact root under DIR.
# usage: mlflow/start_server.sh [DIR=./mlflow-server] [PORT=5055] [HOST=127.0.0.1]
set -euo pipefail
dir=$(realpath -m "${1:-./mlflow-server}")
port=${2:-5055}
host=${3:-127.0.0.1}
mkdir -p "$dir/artifacts"
exec mlflow server --backend-store-uri "sqlite:///$dir/mlflow.db" \
    --artifacts-destination "$dir/artifacts" --host "$host" --port "$port"
