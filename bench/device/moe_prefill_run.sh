# One device call for the MoE prefill work: GPU kernel tests (the prefill ones in their own process, so
# a fault there cannot spoil the others' CUDA context) + the MoE bench rows, logs under $OUT.
# A library built on the host can come along: QWEN3NEXT_TRT_CACHE=$PWD/out/trtcache, carry out/trtcache.
set -u
export PYTHONUNBUFFERED=1
date -u | tee $OUT/device.txt
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv 2>&1 | tee -a $OUT/device.txt
mkdir -p /tmp/pkg && cp -r qwen3next_trt /tmp/pkg/ && for d in model export plugins engines validate; do ln -sfn $PWD/$d /tmp/pkg/qwen3next_trt/$d; done
export PYTHONPATH=/tmp/pkg
python3 -P -c "from qwen3next_trt.plugins.build import library_path; print(library_path())" 2>&1 | tail -1
T="timeout ${TEST_TIMEOUT:-200} python3 -P -m pytest -q -m gpu -p no:cacheprovider --tb=short -rf"
echo "== GPU kernel tests (all but prefill)"
$T -k "not prefill" tests/test_fast_kernels.py tests/test_plugin_kernels.py > $OUT/gpu_tests.log 2>&1; tail -4 $OUT/gpu_tests.log
echo "== GPU prefill tests"
$T -k prefill tests/test_fast_kernels.py > $OUT/gpu_tests_prefill.log 2>&1; tail -30 $OUT/gpu_tests_prefill.log
if [ -z "${SKIP_BENCH:-}" ]; then
  echo "== bench"
  timeout ${BENCH_TIMEOUT:-240} python3 bench/kernels.py --only moe --out $OUT/kernels-moe.json 2>&1 | tee $OUT/kernels.log | grep -v "^|"
fi
echo "== crossover (fast vs prefill)"
timeout 60 python3 bench/device/moe_crossover.py 2>&1 | tee $OUT/crossover.log
