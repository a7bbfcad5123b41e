# One device call (device tool): GPU kernel tests + bench/kernels.py, logs under $OUT.
# Run with carry [".devicepack/fla"] (the FLA wheel and einops, copied there from a pip cache; .whl holds
# the 244 MiB ONNX Runtime parts, more than one call carries):  bash bench/device/kernels_run.sh
# With FlashQLA as the second prefill peer: bench/device/peers_pack.sh says how (two calls).
# TESTS="-k 'chunk or dispatch'" narrows the tests; SKIP_TESTS=1 skips them; PARTS="prefill" one bench part.
# Each bench part runs in its own process, so a fault in one (or in a peer) cannot spoil the others.
set -u
export PYTHONUNBUFFERED=1
date -u | tee $OUT/device.txt
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv 2>&1 | tee -a $OUT/device.txt
# every carried wheel: .devicepack/fla (FLA alone) or .devicepack/peers_a + peers_b (bench/device/peers_pack.sh:
# FlashQLA and TileLang too, over two consecutive calls)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $(ls .devicepack/*/*.whl .whl/fla_core-*.whl 2>/dev/null) 2>&1 | tail -2
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}  # TileLang compiles FlashQLA's kernels with it
# the project's stage folders as the package qwen3next_trt (what an editable install maps)
mkdir -p /tmp/pkg && cp -r qwen3next_trt /tmp/pkg/ && for d in model export plugins engines validate; do ln -sfn $PWD/$d /tmp/pkg/qwen3next_trt/$d; done
export PYTHONPATH=/tmp/pkg:/tmp/site
python3 -P -c "from qwen3next_trt.plugins.build import library_path; print(library_path())" 2>&1 | tail -1
if [ -z "${SKIP_TESTS:-}" ]; then
  echo "== GPU kernel tests"
  eval timeout ${TEST_TIMEOUT:-240} python3 -P -m pytest -q -m gpu -p no:cacheprovider --tb=short -rf ${TESTS:-} tests/test_fast_kernels.py tests/test_plugin_kernels.py > $OUT/gpu_tests.log 2>&1
  tail -15 $OUT/gpu_tests.log
fi
echo "== bench"
for part in ${PARTS:-moe decode prefill}; do
  timeout ${BENCH_TIMEOUT:-200} python3 bench/kernels.py --only $part --out /tmp/kernels-$part.json 2>&1 | tee -a $OUT/kernels.log | grep -v "^|"
done
python3 bench/kernels.py --merge $(ls /tmp/kernels-*.json) --out $OUT/kernels.json | tee -a $OUT/kernels.log
