# One device call (device tool): FP8 calibration of all 48 layers + the MTP layer of the 80B preset on
# one GPU, random weights of the official layout drawn on the GPU in bf16, one layer at a time (nothing
# is written but the calibration file and its 32 MiB of hidden states). Also runs the GPU calibration
# tests. No carry needed:  bash bench/device/calibrate_80b.sh   (results: bench/results/calibrate-80b-*)
# SPLIT=1 also calibrates it in two resumed runs (0-23, then 24-47,mtp) and compares with the one run.
set -u
source bench/device/env.sh
echo "== GPU calibration tests"
timeout 150 python3 -P -m pytest -q -s -m gpu -p no:cacheprovider tests/test_calibration.py 2>&1 | tail -8 | tee $OUT/gpu_tests.log
echo "== calibrate qwen3-next-80b-a3b, all layers + MTP, on the GPU"
mkdir -p /tmp/cal
CMD="python3 -P -m qwen3next_trt.cli calibrate --model qwen3-next-80b-a3b --device cuda --draw device --out /tmp/cal/80b.json --times $OUT/times.json"
echo "$CMD" | tee -a $OUT/device.txt
TIME=""; [ -x /usr/bin/time ] && TIME="/usr/bin/time -v"  # peak host memory, where the image has it
timeout ${CAL_TIMEOUT:-360} $TIME $CMD > $OUT/calibrate.log 2>&1; echo "rc=$?" | tee -a $OUT/calibrate.log
grep -E "^\[calibrate\] (layer (00|01|02|03|23|47)|MTP)|^wrote|Maximum resident|Elapsed|error" $OUT/calibrate.log
cp /tmp/cal/80b.json $OUT/calibration.json
ls -la /tmp/cal
if [ -n "${SPLIT:-}" ]; then
  # the same calibration split in two runs (resume from the stored hidden states), compared with the one above
  echo "== split: layers 0-23, then 24-47 + mtp"
  for part in 0-23 24-47,mtp; do
    timeout 200 python3 -P -m qwen3next_trt.cli calibrate --model qwen3-next-80b-a3b --device cuda --draw device \
      --layers $part --out /tmp/cal/split.json > /tmp/cal/split-part.log 2>&1
    cat /tmp/cal/split-part.log >> $OUT/split.log
    grep -E "reused|resuming|running|^wrote|error" /tmp/cal/split-part.log
  done
  python3 -c "
import json; a = json.load(open('/tmp/cal/80b.json'))['scales']; b = json.load(open('/tmp/cal/split.json'))['scales']
rel = {n: abs(a[n] - b[n]) / a[n] for n in a}; w = max(rel, key=rel.get)
print('split vs one run:', len(a), 'vs', len(b), 'scales, same names:', set(a) == set(b), f'worst relative difference {rel[w]:.2e} ({w})')
" | tee $OUT/split-compare.txt
fi
