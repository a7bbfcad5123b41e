# One device call: the fast-kernel tests, per-kernel times (torch.profiler) and, where ncu exists,
# stall sampling of the tensor-core prefill kernel:  bash bench/device/profile_run.sh
set -u
mkdir -p /tmp/pkg && cp -r qwen3next_trt /tmp/pkg/ && for d in model export plugins engines validate; do ln -sfn $PWD/$d /tmp/pkg/qwen3next_trt/$d; done
export PYTHONPATH=/tmp/pkg
python3 -P -c "from qwen3next_trt.plugins.build import library_path; print(library_path())" 2>&1 | tail -1
timeout 150 python3 -P -m pytest -q -m gpu -p no:cacheprovider --tb=short -rf tests/test_fast_kernels.py > $OUT/fast_tests.log 2>&1; tail -6 $OUT/fast_tests.log
python3 bench/device/profile_kernels.py 2>&1 | grep -v Warn | tee $OUT/profile.log
NCU=$(which ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ]; then
  timeout 150 $NCU --clock-control none -k regex:"chunk_tc" --launch-count 1 --section SpeedOfLight --section WarpStateStats --section SourceCounters --section InstructionStats python3 bench/device/profile_kernels.py --once > $OUT/ncu.log 2>&1
  sed -n '/chunk_tc_kernel/,$p' $OUT/ncu.log | grep -v "^ *-\+ *$" | head -120
fi
