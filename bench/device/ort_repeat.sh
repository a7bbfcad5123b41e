# Issue 17, 16-bit repeatability on ONNX Runtime's CUDA provider, on the device. onnxruntime-gpu travels as for
# ort_cuda.sh: first the four part calls (`bash bench/device/ort_cuda.sh`, carry .whl/ort.part.NN + .whl/ort.sha256),
# then one call:
#   bash bench/device/ort_repeat.sh     carry out/dev17/fp16, out/dev17/bf16 (tiny exports made here), .whl/ort.sha256,
#                                       .whl/polygraphy-0.53.6-py3-none-any.whl
# 1. bench/device/ort_repeat.py on both exports: every graph n=5 times in one session and in a second session,
#    use_deterministic_compute off / on; bisection of the nondeterministic layer graphs to their source nodes; those
#    nodes (and the first MoE, LinearAttention, CausalConvWithState, Attention, MatMul) alone, 20 runs; greedy
#    generation twice per setting.
# 2. validate --backend onnxrt-cuda on each export, with QWEN3NEXT_TRT_ORT_DETERMINISTIC=1 where that setting
#    alone was repeatable, then (time allowing) with the other setting.
set -u
source bench/device/ort_env.sh
python3 -c "import torch, onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" 2>&1 | tee -a $OUT/device.txt
DIRS=${REPEAT_DIRS:-out/dev17/fp16 out/dev17/bf16}
echo "== ort_repeat.py $DIRS"
timeout ${REPEAT_TIMEOUT:-170} python3 -P bench/device/ort_repeat.py --device cuda --n 5 --generate \
  --single-ops MoE,LinearAttention,CausalConvWithState,Attention,MatMul --json $OUT/repeat.json $DIRS 2>&1 \
  | grep -v "No registered plugin EP" > $OUT/repeat.log
grep -E "^\[(repeat|verdict)\]" $OUT/repeat.log | cut -c1-400
grep -E "^\[(bisect|single)\]" $OUT/repeat.log | cut -c1-700
grep -vE "^\[(repeat|verdict|bisect|single|generate)\]" $OUT/repeat.log | tail -5
for dir in $DIRS; do
  name=$(basename $dir)
  det=0
  grep -q "^\[verdict\] $dir deterministic: repeatable" $OUT/repeat.log && grep -q "^\[verdict\] $dir default: NOT" $OUT/repeat.log && det=1
  for d in $det $((1 - det)); do
    [ $d != $det ] && [ $SECONDS -gt ${SECOND_PASS_BY:-240} ] && { echo "== validate $name det=$d skipped (time)"; continue; }
    echo "== validate $dir --backend onnxrt-cuda, QWEN3NEXT_TRT_ORT_DETERMINISTIC=$d  (t=${SECONDS}s)"
    QWEN3NEXT_TRT_ORT_DETERMINISTIC=$d timeout ${VALIDATE_TIMEOUT:-60} python3 -P -m qwen3next_trt.cli validate --onnx $dir \
      --backend onnxrt-cuda --report /tmp/val_${name}_det$d > /tmp/validate_${name}_det$d.log 2>&1
    echo "rc=$?" >> /tmp/validate_${name}_det$d.log
    grep -E "FAIL|excused|greedy|result|PASS|rc=|Error" /tmp/validate_${name}_det$d.log | cut -c1-300 | tail -14
    cat /tmp/validate_${name}_det$d.log >> $OUT/validate_$name.log
    [ $d = $det ] && cp /tmp/val_${name}_det$d/report.json $OUT/report_${name}_det$d.json 2>/dev/null
  done
done
echo "done t=${SECONDS}s"
