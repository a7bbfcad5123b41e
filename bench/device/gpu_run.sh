# One device call (device tool) for the engines question on a lent GPU. Writes logs under $OUT.
# Prepare here, once:  ../shared/tools/devicepack && cp ../shared/probes/gpu_sm90_probe.py bench/device/aot_check.py .devicepack/
# Then run with carry [".devicepack"]:  bash bench/device/gpu_run.sh
# (on 2026-11-29 on an H200 this showed that TensorRT-RTX runs no engine on SM90: engines/README.md)
set -u
source .devicepack/activate.sh
export PYTHONUNBUFFERED=1
date -u | tee $OUT/device.txt
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv 2>&1 | tee -a $OUT/device.txt
python3 -c "import torch, tensorrt_rtx, onnx, onnxruntime, onnxscript; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_capability()); print('tensorrt_rtx', tensorrt_rtx.__version__, 'onnx', onnx.__version__, 'onnxruntime', onnxruntime.__version__, 'onnxscript', onnxscript.__version__)" 2>&1 | tee -a $OUT/device.txt
# the project's stage folders as the package qwen3next_trt (what an editable install maps)
mkdir -p /tmp/pkg && cp -r qwen3next_trt /tmp/pkg/ && for d in model export plugins engines validate; do ln -sfn $PWD/$d /tmp/pkg/qwen3next_trt/$d; done
export PYTHONPATH=/tmp/pkg:$PYTHONPATH
Q="python3 -m qwen3next_trt.cli"
echo "== probe"; timeout 60 python3 .devicepack/gpu_sm90_probe.py 2>&1 | tee $OUT/probe.log
echo "== export tiny"; timeout 150 $Q export --model tiny --out /tmp/q3n/onnx 2>&1 | tail -3 | tee $OUT/export.log
echo "== AOT build (SM80,SM89,SM120, as on CPU)"; timeout 100 $Q build --onnx /tmp/q3n/onnx --out /tmp/q3n/eng_aot --graphs embed,layer_00,layer_03,final 2>&1 | tee $OUT/build_aot.log | tail -9
timeout 60 python3 .devicepack/aot_check.py /tmp/q3n/onnx /tmp/q3n/eng_aot 2>&1 | tee $OUT/aot_check.log
echo "== build on the GPU (CURRENT)"; timeout 150 $Q build --onnx /tmp/q3n/onnx --out /tmp/q3n/eng_current --compute-capability CURRENT 2>&1 | tee $OUT/build_current.log | tail -26
echo "== validate TensorRT (CURRENT) vs ONNX Runtime vs PyTorch"; timeout 200 $Q validate --onnx /tmp/q3n/onnx --backend tensorrt --engines /tmp/q3n/eng_current --report /tmp/q3n/val_current 2>&1 | tee $OUT/validate_current.log | tail -50
cp /tmp/q3n/val_current/report.json $OUT/report_current.json 2>/dev/null; cp /tmp/q3n/val_current/per_layer_error.png $OUT/per_layer_error_current.png 2>/dev/null
echo "== kernel tests"; timeout 120 python3 -P -m pytest -q -m gpu -p no:cacheprovider tests/test_plugin_kernels.py 2>&1 | tail -5 | tee $OUT/gpu_kernel_tests.log
