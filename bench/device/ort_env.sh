# Sourced by the device scripts that run ONNX Runtime's CUDA provider (ort_device.sh, ort_repeat.sh): unpacks
# onnxruntime-gpu once its four parts have been carried (ort_cuda.sh), sources env.sh, installs the carried
# polygraphy wheel and puts both on PYTHONPATH. Exits 3 when the parts are not all on the machine yet.
bash bench/device/ort_cuda.sh >/dev/null 2>&1  # unpacks onnxruntime-gpu if the parts are all there
[ -d /tmp/ortsite/onnxruntime ] || { echo "onnxruntime-gpu not unpacked: send the four part calls first"; exit 3; }
source bench/device/env.sh
ls .whl/polygraphy-*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/polygraphy-*.whl
export PYTHONPATH=/tmp/ortsite:/tmp/site:$PYTHONPATH
