# One device call (device tool): Qwen3-Next-80B-A3B end to end on one GPU from the project's kernels.
#   bash bench/device/e2e_80b.sh            (from a clean checkout; nothing carried; ~2 minutes on an H200:
#                                           plugin build ~25 s, selftest ~60 s, benchmark ~50 s)
# First a selftest process (GEMM choice, each plugin op and fused kernel against torch at 80B sizes), then the
# benchmark, which leaves out whatever failed or crashed there. Writes under $OUT: e2e_80b.json, e2e_80b.md,
# selftest.json, the logs. BUDGET_S (default 300) bounds the benchmark's own time.
set -u
OUT=${OUT:-/tmp/e2e_out}
source bench/device/env.sh
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1 | tee -a $OUT/device.txt
python3 -c "from qwen3next_trt.plugins.build import library_path; print(library_path())" 2>&1 | tail -1
echo "== selftest"
timeout ${SELFTEST_TIMEOUT:-200} python3 bench/e2e_80b.py --selftest $OUT/selftest.json 2>&1 | tee $OUT/selftest.log
echo "== benchmark"
timeout ${BENCH_TIMEOUT:-330} python3 bench/e2e_80b.py --out $OUT --selftest-json $OUT/selftest.json --budget-s ${BUDGET_S:-300} \
  ${SECTIONS:+--sections $SECTIONS} 2>&1 | tee $OUT/e2e_80b.log | grep -v "^\[e2e\]   layers"
