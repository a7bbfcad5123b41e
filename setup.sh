#!/usr/bin/env bash
# Creates .venv with the project (editable) and its test extra. CPU torch by default:
# TORCH_SPEC overrides the torch requirement (e.g. TORCH_SPEC=torch for a CUDA build).
# Every version comes from constraints.txt (and constraints-triton.txt for the Triton environment), so
# two clones of one commit get the same onnx / onnxscript / polygraphy / ONNX Runtime and export the same
# graphs; QWEN3NEXT_TRT_UNPINNED=1 installs the newest allowed versions instead (to refresh the pins).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
PIN=(-c constraints.txt); PIN_TRITON=(-c constraints-triton.txt)
[ -n "${QWEN3NEXT_TRT_UNPINNED:-}" ] && { PIN=(); PIN_TRITON=(); }
[ -z "${TORCH_SPEC:-}" ] || PIN=()  # another torch build brings its own dependency versions
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "${PIN[@]}" "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q --disable-pip-version-check "${PIN[@]}" -e ".[test,trt-rtx]"
# TensorRT's public C++ plugin headers (10.14, Apache-2.0) for the C++ plugin library (plugins/cpp/), used when
# neither $TENSORRT_ROOT nor the system has them; --no-deps: the wheel's own dependencies are not needed
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "kernel-lens==2.0.1"
# Triton server for deploy/ (nvidia-pytriton wheel): its Python backend needs numpy<2, so it gets its own
# environment in .venv/triton, found by the backend stub through PATH (deploy/server.py).
[ -x .venv/triton/bin/python ] || "$PY" -m venv .venv/triton
.venv/triton/bin/python -m pip install -q --disable-pip-version-check "${PIN_TRITON[@]}" "numpy<2" onnxruntime
.venv/triton/bin/python -m pip install -q --disable-pip-version-check --no-deps "${PIN_TRITON[@]}" "nvidia-pytriton==0.7.0" -e .
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch, transformers, onnxruntime as o, onnx, onnxscript, polygraphy; print(f"torch {torch.__version__}, transformers {transformers.__version__}, onnxruntime {o.__version__}, onnx {onnx.__version__}, onnxscript {onnxscript.__version__}, polygraphy {polygraphy.__version__}")'); pinned: $([ ${#PIN[@]} -gt 0 ] && echo constraints.txt || echo no))"
