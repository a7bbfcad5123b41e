# ONNX Runtime's CUDA provider on the device (issue 17): the exported graphs validated and generated on it.
#
# onnxruntime-gpu 1.31.1 (cp312, 255 MB) does not fit one call (64 MiB carried), so it travels as a zstd
# tar of the unpacked wheel in parts (.whl/ort.part.NN + .whl/ort.sha256, made by bench/device/ort_pack.sh
# here), over back-to-back calls while the machine stays warm; each call stores what it carries in /tmp.
#   bash bench/device/ort_cuda.sh              store the parts carried; once all are there, join, check
#                                              the sha256, unpack into /tmp/ortsite
#   bash bench/device/ort_cuda.sh run [DIR..]  then: validate each export DIR (out/dev17/<dtype>) with
#                                              --backend onnxrt-cuda (fp32 also with --tf32), and time
#                                              generation on the CUDA and the CPU provider
set -u
mkdir -p /tmp/ortparts
cp .whl/ort.part.* /tmp/ortparts/ 2>/dev/null
want=$(awk '{print $3}' .whl/ort.sha256)
have=$(ls /tmp/ortparts | wc -l)
echo "onnxruntime-gpu parts on the machine: $have of $want"
if [ ! -d /tmp/ortsite/onnxruntime ] && [ "$have" = "$want" ]; then
  cat /tmp/ortparts/ort.part.* > /tmp/ort.tar.zst
  echo "$(awk '{print $1}' .whl/ort.sha256)  /tmp/ort.tar.zst" | sha256sum -c - || exit 3
  # the device has no zstd tool: pyarrow (there) decompresses the stream
  unzst() { if command -v zstd >/dev/null; then zstd -q -d --long=27 < "$1"; else
    python3 -c "import sys, pyarrow as pa; s = pa.CompressedInputStream(pa.OSFile(sys.argv[1]), 'zstd')
while (b := s.read(1 << 24)): sys.stdout.buffer.write(b)" "$1"; fi; }
  mkdir -p /tmp/ortsite && unzst /tmp/ort.tar.zst | tar -C /tmp/ortsite -xf - && [ -d /tmp/ortsite/onnxruntime ] || exit 3
  rm /tmp/ort.tar.zst
  echo "unpacked onnxruntime-gpu into /tmp/ortsite"
fi
[ "${1:-}" = run ] || exit 0
shift
[ -d /tmp/ortsite/onnxruntime ] || { echo "onnxruntime-gpu not unpacked yet"; exit 3; }
source bench/device/env.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/polygraphy-*.whl || exit 4
export PYTHONPATH=/tmp/ortsite:/tmp/site:$PYTHONPATH
python3 -c "import torch, onnxruntime as o; print('onnxruntime', o.__version__, o.__file__, o.get_available_providers())" | tee -a $OUT/device.txt
for dir in "$@"; do
  name=$(basename $dir)
  echo "== validate $dir --backend onnxrt-cuda"
  python3 -P -m qwen3next_trt.cli validate --onnx $dir --backend onnxrt-cuda --report /tmp/val_$name 2>&1 | tee $OUT/validate_$name.log | tail -40
  mkdir -p $OUT/val_$name && cp /tmp/val_$name/report.json /tmp/val_$name/per_layer_error.png $OUT/val_$name/ 2>/dev/null
  if [ $name = fp32 ]; then
    echo "== validate $dir --backend onnxrt-cuda --tf32"
    python3 -P -m qwen3next_trt.cli validate --onnx $dir --backend onnxrt-cuda --tf32 --report /tmp/valtf32_$name 2>&1 | tee $OUT/validate_${name}_tf32.log | tail -8
    mkdir -p $OUT/val_${name}_tf32 && cp /tmp/valtf32_$name/report.json $OUT/val_${name}_tf32/ 2>/dev/null
  fi
  devices="cuda cpu"; [ $name = bf16 ] && devices=cuda  # the CPU provider has no bfloat16 MatMul
  for device in $devices; do
    echo "== generate $dir --device $device"
    python3 -P -m qwen3next_trt.cli generate --onnx $dir --device $device --prompt-ids 5,17,3,99,42,7,61,8 --prompt-ids 9,31,4,56,13,88,40,2 \
      --max-new-tokens 64 --json $OUT/generate_${name}_$device.json 2>&1 | tail -3
  done
done
# ONNX Runtime's graph fusions off (QWEN3NEXT_TRT_ORT_OPT_LEVEL=0): does an fp16 difference come from a fusion?
# (ORT_NO_FUSION_TOO: the export folders to validate that way too)
if [ -n "${ORT_NO_FUSION_TOO:-}" ]; then
  for dir in $ORT_NO_FUSION_TOO; do
    name=$(basename $dir)
    echo "== validate $dir --backend onnxrt-cuda, ORT optimisation level 0"
    QWEN3NEXT_TRT_ORT_OPT_LEVEL=0 python3 -P -m qwen3next_trt.cli validate --onnx $dir --backend onnxrt-cuda --report /tmp/valnf_$name 2>&1 \
      | tee $OUT/validate_${name}_opt0.log | grep -E "FAIL|greedy|result"
    mkdir -p $OUT/val_${name}_opt0 && cp /tmp/valnf_$name/report.json $OUT/val_${name}_opt0/ 2>/dev/null
  done
fi
