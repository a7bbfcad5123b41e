#!/usr/bin/env bash
# The numeric tests again with PyTorch and ONNX Runtime forced onto other kernel paths than this CPU's
# defaults, to see before CI (on another x86 CPU) does whether a tolerance belongs to one machine.
# Usage: bash tests/other_kernel_paths.sh [pytest args...]   (default: the numeric test files, ~25 min)
# Each line of the matrix is one run; a failure names the combination. validate/README.md lists what
# these knobs change and what was seen.
set -uo pipefail
cd "$(dirname "$0")/.."
TESTS=("$@")
[ ${#TESTS[@]} -gt 0 ] || TESTS=(tests/test_validate.py tests/test_fp8.py tests/test_runtime.py tests/test_mtp.py tests/test_parity_hf.py tests/test_gated_delta_rule.py)
status=0
while read -r combo; do
  [ -n "$combo" ] || continue
  echo "== $combo"
  if ! env $combo .venv/bin/python -m pytest -q -p no:cacheprovider "${TESTS[@]}" 2>&1 | tail -3; then status=1; fi
done <<'MATRIX'
ATEN_CPU_CAPABILITY=default QWEN3NEXT_TRT_TORCH_THREADS=1 QWEN3NEXT_TRT_NO_MKLDNN=1
QWEN3NEXT_TRT_ORT_OPT_LEVEL=0 QWEN3NEXT_TRT_ORT_THREADS=1
ATEN_CPU_CAPABILITY=default QWEN3NEXT_TRT_ORT_OPT_LEVEL=1 QWEN3NEXT_TRT_ORT_THREADS=2 QWEN3NEXT_TRT_TORCH_THREADS=1
MATRIX
exit $status
