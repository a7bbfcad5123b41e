# The C++ plugin library's plugins enqueued on the GPU (tests/test_cpp_plugins.py, -m gpu) on a device
# that has neither g++ nor TensorRT headers: the library and the harness are built here first,
#   bash bench/device/cpp_plugins_gpu.sh pack     (here: .devicepack/, git-ignored, ~30 MB)
# and the device call carries .devicepack and runs
#   bash bench/device/cpp_plugins_gpu.sh
# The library is found in the carried cache because its key (sources + header path + headers) is the same.
set -u
export QWEN3NEXT_TRT_CACHE=$PWD/.devicepack/cache TENSORRT_ROOT=$PWD/.devicepack/trt
if [ "${1:-}" = pack ]; then
  set -e
  rm -rf .devicepack && mkdir -p .devicepack/trt
  cp -r "$(python3 -c 'from qwen3next_trt.plugins import build; import os; os.environ.pop("TENSORRT_ROOT"); print(build.tensorrt_headers()[0])')" .devicepack/trt/include
  python3 -c "from qwen3next_trt.plugins import build; print(build.cpp_library_path())"
  g++ -std=c++17 -O0 -Wno-deprecated-declarations -I.devicepack/trt/include -I/usr/local/cuda/include \
    tests/plugin_harness/harness.cpp -o .devicepack/harness -L/usr/local/cuda/lib64 -lcudart_static -ldl -lpthread -lrt
  rm -rf .devicepack/cache/plugins  # the kernel objects: the linked library is what the tests load
  du -sh .devicepack
  exit 0
fi
source bench/device/env.sh
QWEN3NEXT_TRT_PLUGIN_HARNESS=$PWD/.devicepack/harness python3 -P -m pytest -q -m gpu -p no:cacheprovider --tb=short -rfE \
  tests/test_cpp_plugins.py 2>&1 | tee $OUT/cpp_plugins_gpu.log | tail -15
