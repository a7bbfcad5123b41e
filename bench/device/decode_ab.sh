# One device call (device tool): A/B of the GDN decode kernel on the lent GPU, same process setup and timing
# method for every variant (bench/kernels.py --only decode), after the decode kernel's GPU tests:
#   tree       the working tree's plugins/linear_attention/fast.cuh
#   lb<N>      the same with decode_kernel's __launch_bounds__(128, N) for each N in $BOUNDS (e.g. BOUNDS="8")
#   before     .devicepack/fast_before.cuh when carried (made here: git show <commit>:plugins/linear_attention/fast.cuh)
#   carry [".devicepack/fast_before.cuh"]:  BOUNDS="8" bash bench/device/decode_ab.sh
set -u
source bench/device/env.sh
F=plugins/linear_attention/fast.cuh
echo "== GPU tests (decode kernel, dispatch)"
timeout ${TEST_TIMEOUT:-200} python3 -P -m pytest -q -m gpu -p no:cacheprovider --tb=short -rf tests/test_fast_kernels.py -k "decode or dispatch or speculative" \
  > $OUT/gpu_tests_decode.log 2>&1; tail -2 $OUT/gpu_tests_decode.log
bench() {
  timeout ${BENCH_TIMEOUT:-150} python3 bench/kernels.py --only decode --out $OUT/decode_$1.json > $OUT/decode_$1.log 2>&1
  python3 - $OUT/decode_$1.json $1 <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
print(sys.argv[2], " ".join(f"{r['shape']}:{r['ms'] * 1e3:.1f}us({r['floor_ms'] / r['ms']:.0%})" for r in rows if r["kernel"].endswith("decode decode")))
PY
}
cp $F /tmp/fast_tree.cuh
bench tree
for n in ${BOUNDS:-}; do
  sed -E -i "s/__launch_bounds__\(kDecThreads, [0-9]+\) decode_kernel\(/__launch_bounds__(kDecThreads, $n) decode_kernel(/" $F
  bench lb$n
  cp /tmp/fast_tree.cuh $F
done
if [ -f .devicepack/fast_before.cuh ]; then cp .devicepack/fast_before.cuh $F; bench before; cp /tmp/fast_tree.cuh $F; fi
