# One device call (device tool): A/B of one kernel source file on the lent GPU, same process setup and timing
# method for every variant (bench/kernels.py --only $PART), after that part's GPU tests:
#   tree       the working tree's $FILE
#   lb<N>      the same with decode_kernel's __launch_bounds__(128, N) for each N in $BOUNDS (decode only)
#   before     $BEFORE when carried (made here, e.g. git show main:$FILE > .devicepack/fast_before.cuh)
# Defaults: FILE=plugins/linear_attention/fast.cuh PART=decode BEFORE=.devicepack/fast_before.cuh
#   carry [".devicepack/fast_before.cuh"]:  BOUNDS="8" bash bench/device/decode_ab.sh
# Prefill (the split kernels):  FILE=plugins/linear_attention/split.cuh PART=prefill
#   BEFORE=.devicepack/split_before.cuh TESTS="chunk or dispatch" bash bench/device/decode_ab.sh
# ALT="a.cuh b.cuh": more variants of $FILE, benched after the tree (named by file). As in moe_prefill_run.sh, a
# plugin cache built here for every variant can come along (QWEN3NEXT_TRT_CACHE=$PWD/<carried dir>): the device
# then compiles nothing (~90 s saved per variant).
set -u
source bench/device/env.sh
F=${FILE:-plugins/linear_attention/fast.cuh}
PART=${PART:-decode}
BEFORE=${BEFORE:-.devicepack/fast_before.cuh}
echo "== GPU tests ($PART: ${TESTS:-decode or dispatch or speculative})"
timeout ${TEST_TIMEOUT:-200} python3 -P -m pytest -q -m gpu -p no:cacheprovider --tb=short -rf tests/test_fast_kernels.py \
  -k "${TESTS:-decode or dispatch or speculative}" > $OUT/gpu_tests_$PART.log 2>&1; tail -2 $OUT/gpu_tests_$PART.log
bench() {
  timeout ${BENCH_TIMEOUT:-150} python3 bench/kernels.py --only $PART --out $OUT/${PART}_$1.json > $OUT/${PART}_$1.log 2>&1
  python3 - $OUT/${PART}_$1.json $1 <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
print(sys.argv[2], " ".join(f"{r['kernel'].split()[-1]} {r['shape']}:{r['ms'] * 1e3:.1f}us({r['floor_ms'] / r['ms']:.0%})"
                            for r in rows if r["kernel"].endswith(("decode decode", "chunk_split"))))
PY
}
cp $F /tmp/ab_tree.cuh
bench tree
for n in ${BOUNDS:-}; do
  sed -E -i "s/__launch_bounds__\(kDecThreads, [0-9]+\) decode_kernel\(/__launch_bounds__(kDecThreads, $n) decode_kernel(/" $F
  bench lb$n
  cp /tmp/ab_tree.cuh $F
done
for a in ${ALT:-}; do cp "$a" $F; bench $(basename "$a" .cuh); cp /tmp/ab_tree.cuh $F; done
if [ -f "$BEFORE" ]; then cp "$BEFORE" $F; bench before; cp /tmp/ab_tree.cuh $F; fi
