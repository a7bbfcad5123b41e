# One device call (device tool): every GPU test of the suite (pytest -m gpu) on the lent GPU, each file in
# its own process so that a kernel fault in one cannot spoil the CUDA context of the others. Logs under $OUT.
# No carry needed:  bash bench/device/gpu_tests.sh
set -u
source bench/device/env.sh
python3 -P -c "from qwen3next_trt.plugins.build import library_path; print(library_path())" 2>&1 | tail -1
for f in ${FILES:-$(grep -l "mark.gpu" tests/test_*.py)}; do
  echo "== $f"
  timeout ${TEST_TIMEOUT:-240} python3 -P -m pytest -q -m gpu -p no:cacheprovider --tb=short -rfE $f > $OUT/$(basename $f .py).log 2>&1
  tail -4 $OUT/$(basename $f .py).log
done
