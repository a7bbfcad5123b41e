#!/usr/bin/env bash
# Creates .venv with the project (editable) and its test extra. CPU torch by default:
# TORCH_SPEC overrides the torch requirement (e.g. TORCH_SPEC=torch for a CUDA build).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,trt-rtx]"
# Triton server for deploy/ (nvidia-pytriton wheel): its Python backend needs numpy<2, so it gets its own
# environment in .venv/triton, found by the backend stub through PATH (deploy/server.py).
[ -x .venv/triton/bin/python ] || "$PY" -m venv .venv/triton
.venv/triton/bin/python -m pip install -q --disable-pip-version-check "numpy<2" onnxruntime
.venv/triton/bin/python -m pip install -q --disable-pip-version-check --no-deps "nvidia-pytriton==0.7.0" -e .
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch, transformers, onnxruntime as o; print(f"torch {torch.__version__}, transformers {transformers.__version__}, onnxruntime {o.__version__}")'))"
