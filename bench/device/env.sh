# Sourced by the device scripts (bench/device/*.sh) at the start of a device call: records the machine in
# $OUT/device.txt and puts the project's stage folders on PYTHONPATH as the package qwen3next_trt (what an
# editable install maps; the device has no project install).
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/device_out}; mkdir -p "$OUT"
date -u +%Y-%m-%dT%H:%M:%SZ | tee $OUT/device.txt
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,memory.total --format=csv,noheader 2>&1 | tee -a $OUT/device.txt
mkdir -p /tmp/pkg && cp -r qwen3next_trt /tmp/pkg/ && for d in model export plugins engines validate runtime deploy; do ln -sfn $PWD/$d /tmp/pkg/qwen3next_trt/$d; done
export PYTHONPATH=/tmp/pkg${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1 | tee -a $OUT/device.txt
