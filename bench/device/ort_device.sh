# Issue 17, second part, on the device: the device-resident runtime on ONNX Runtime's CUDA provider, its
# kernels as peers, and a reduced-depth 80B run. onnxruntime-gpu travels as for ort_cuda.sh: first the
# four part calls (`bash bench/device/ort_cuda.sh`, carry .whl/ort.part.NN + .whl/ort.sha256), then:
#   bash bench/device/ort_device.sh runtime   carry out/dev17/fp32 (a tiny fp32 export made here) + .whl/ort.sha256
#                                              + .whl/polygraphy-0.53.6-py3-none-any.whl: GPU tests of runtime/device.py,
#                                              generate --device cuda (CUDA graphs on / off), validate's greedy check,
#                                              bench/kernels.py --peer ort (decode, prefill, moe)
#   bash bench/device/ort_device.sh 80b       export a 4-layer 80B (bf16, random weights) there and time decode
#                                              (bench/ort_reduced_depth.py)
#   PRECISION=fp8 PHASE=export|run bash bench/device/ort_device.sh 80b
#                                              the same with FP8 weights, the export in a call of its own (PHASE=export),
#                                              then the run on the warm machine (PHASE=run: reuses /tmp/rd80-fp8)
#   bash bench/device/ort_device.sh fp8       carry out/dev17fp8 (tiny FP8 exports: fp16, bf16, fp16_static): validate
#                                              --backend onnxrt-cuda (projections as MatMulBlockQuantizedFp8Weight,
#                                              experts dequantised at load) and generate --device cuda, each
#   bash bench/device/ort_device.sh paths     carry out/dev17/bf16 + out/dev17/fp16: device-resident decode vs the
#                                              host path on the same sessions (bench/device/ort_paths.py)
set -u
source bench/device/ort_env.sh
python3 -c "import torch, onnxruntime as o, onnx, onnxscript; print('onnxruntime', o.__version__, o.get_available_providers(), '| onnx', onnx.__version__, 'onnxscript', onnxscript.__version__)" 2>&1 | tee -a $OUT/device.txt
case "${1:-}" in
runtime)
  echo "== GPU tests: runtime/device.py"
  QWEN3NEXT_TRT_TEST_EXPORT=out/dev17/fp32 timeout 150 python3 -P -m pytest -q -m gpu -p no:cacheprovider -s -rs --tb=short \
    tests/test_runtime_device.py > $OUT/gpu_tests.log 2>&1; tail -12 $OUT/gpu_tests.log
  for cg in 1 0; do
    echo "== generate out/dev17/fp32 --device cuda, QWEN3NEXT_TRT_CUDA_GRAPHS=$cg"
    QWEN3NEXT_TRT_CUDA_GRAPHS=$cg timeout 60 python3 -P -m qwen3next_trt.cli generate --onnx out/dev17/fp32 --device cuda \
      --prompt-ids 5,17,3,99,42,7,61,8 --prompt-ids 9,31,4,56,13,88,40,2 --max-new-tokens 64 --json $OUT/generate_fp32_cg$cg.json 2>&1 | tail -3
  done
  for part in decode prefill moe; do
    echo "== bench/kernels.py --peer ort --only $part"
    timeout ${PEER_TIMEOUT:-100} python3 bench/kernels.py --peer ort --only $part --out /tmp/kort-$part.json 2>&1 | tee -a $OUT/kernels_ort.log | grep -v "^|"
  done
  python3 bench/kernels.py --merge $(ls /tmp/kort-*.json) --out $OUT/kernels_ort.json | tee -a $OUT/kernels_ort.log
  echo "== validate out/dev17/fp32 --backend onnxrt-cuda (greedy through the device-resident decoder)"
  timeout ${VALIDATE_TIMEOUT:-120} python3 -P -m qwen3next_trt.cli validate --onnx out/dev17/fp32 --backend onnxrt-cuda --report /tmp/val_fp32 \
    > $OUT/validate_fp32.log 2>&1; grep -E "greedy|result|PASS|FAIL" $OUT/validate_fp32.log | tail -6
  cp /tmp/val_fp32/report.json $OUT/validate_fp32_report.json 2>/dev/null
  ;;
80b)
  prec=${PRECISION:-none}; dir=/tmp/rd80; [ $prec = none ] || dir=/tmp/rd80-$prec
  phase=; case "${PHASE:-}" in export) phase=--export-only ;; run) phase=--skip-export ;; esac
  echo "== reduced-depth 80B (4 layers, bf16, precision $prec, random weights) ${PHASE:-export + run}"
  df -h /tmp | tail -1
  timeout ${RUN_TIMEOUT:-420} python3 bench/ort_reduced_depth.py --out $dir --layers 4 --dtype bf16 --precision $prec --batches 1,8 \
    --new 64 $phase 2>&1 | tee $OUT/reduced_depth_${prec}_${PHASE:-all}.log | grep -v "^\[export\]"
  cp $dir/result.json $OUT/reduced_depth_${prec}_${PHASE:-all}.json 2>/dev/null
  ;;
fp8)
  for dir in ${FP8_DIRS:-out/dev17fp8/fp16 out/dev17fp8/bf16 out/dev17fp8/fp16_static}; do
    name=fp8_$(basename $dir)
    echo "== validate $dir --backend onnxrt-cuda"
    timeout ${VALIDATE_TIMEOUT:-150} python3 -P -m qwen3next_trt.cli validate --onnx $dir --backend onnxrt-cuda --report /tmp/val_$name \
      > $OUT/validate_$name.log 2>&1; grep -E "FAIL|greedy|result|PASS|onnxrt-cuda FP8|CPU provider" $OUT/validate_$name.log | tail -8
    cp /tmp/val_$name/report.json $OUT/validate_${name}_report.json 2>/dev/null
    echo "== generate $dir --device cuda"
    timeout 90 python3 -P -m qwen3next_trt.cli generate --onnx $dir --device cuda --prompt-ids 5,17,3,99,42,7,61,8 \
      --prompt-ids 9,31,4,56,13,88,40,2 --max-new-tokens 32 --json $OUT/generate_$name.json 2>&1 | tail -2
  done
  ;;
paths)
  # the device-resident decoder against the host path on the same CUDA sessions (carry out/dev17/bf16 and fp16)
  echo "== runtime/device.py vs the host path, per export dtype"
  timeout ${RUN_TIMEOUT:-200} python3 -P bench/device/ort_paths.py ${PATHS_DIRS:-out/dev17/bf16 out/dev17/fp16} 2>&1 \
    | grep -v "No registered plugin EP" | tee $OUT/paths.log
  ;;
*) echo "usage: bash bench/device/ort_device.sh runtime|80b|fp8|paths"; exit 2 ;;
esac
