# Here (not on the device): onnxruntime-gpu 1.31.1 for the device's Python 3.12 as a zstd tar of the
# unpacked wheel in parts that each fit one device call (bench/device/ort_cuda.sh unpacks them there),
# plus the polygraphy wheel the validator needs there. Writes .whl/ (git-ignored).
set -eu
mkdir -p .whl /tmp/ortpack
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -d /tmp/ortpack onnxruntime-gpu==1.31.1
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl polygraphy==0.53.6
rm -rf /tmp/ortpack/site && mkdir /tmp/ortpack/site && (cd /tmp/ortpack/site && unzip -q ../onnxruntime_gpu-1.31.1-*.whl)
tar -C /tmp/ortpack/site -cf - . | zstd -q -12 --long=27 -T1 -f -o /tmp/ortpack/ort.tar.zst
rm -f .whl/ort.part.*
split -b 52M -d -a 2 /tmp/ortpack/ort.tar.zst .whl/ort.part.
echo "$(sha256sum /tmp/ortpack/ort.tar.zst | cut -d' ' -f1) parts $(ls .whl/ort.part.* | wc -l)" > .whl/ort.sha256
cat .whl/ort.sha256
