# One device call: Nsight Compute on the split prefill (1 x 4096 bf16, one launch of each of its two
# kernels, KERNELS to narrow): where its warps stall, per SASS instruction. For the working tree's split.cuh,
# then for $BEFORE when carried. Writes $OUT/ncu_<variant>_{details.txt,source.csv}. A prebuilt plugin cache can
# come along as in decode_ab.sh (QWEN3NEXT_TRT_CACHE).
#   carry [".devicepack/split_before.cuh"]:  bash bench/device/ncu_state.sh
set -u
source bench/device/env.sh
F=plugins/linear_attention/split.cuh
BEFORE=${BEFORE:-.devicepack/split_before.cuh}
cat > /tmp/ncu_one.py <<'PY'
import sys
import torch
sys.path.insert(0, "bench/device")
from split_profile import inputs, HK, HV, D
from qwen3next_trt.plugins import torch_ops
q, k, v, s0, decay, beta = inputs(1, 4096, torch.bfloat16)
torch_ops.linear_attention(q, k, v, s0, decay, beta, HK, HV, D**-0.5, impl="chunk_split")
torch.cuda.synchronize()
PY
profile() {
  python3 /tmp/ncu_one.py  # builds the library outside the profiler
  timeout ${NCU_TIMEOUT:-200} ncu -k "regex:${KERNELS:-state_|factor_}" -c 2 --set full --import-source yes -f -o $OUT/ncu_$1 python3 /tmp/ncu_one.py \
    > $OUT/ncu_$1.log 2>&1; tail -3 $OUT/ncu_$1.log
  ncu -i $OUT/ncu_$1.ncu-rep --page details > $OUT/ncu_$1_details.txt 2>&1
  ncu -i $OUT/ncu_$1.ncu-rep --page source --print-source sass --csv > $OUT/ncu_$1_source.csv 2>&1
  rm -f $OUT/ncu_$1.ncu-rep
  grep -E "Duration|Registers|Warp Cycles Per Issued|Issue Slots Busy|Executed Ipc A|Stall|Achieved Occupancy" $OUT/ncu_$1_details.txt | head -20
}
cp $F /tmp/ab_tree.cuh
profile tree
if [ -f "$BEFORE" ]; then cp "$BEFORE" $F; profile before; cp /tmp/ab_tree.cuh $F; fi
