# Here (not on the device): the prefill peers for bench/kernels.py as wheels for the device's Python 3.12,
# in two folders that each fit one device call's 64 MiB carry (git-ignored .devicepack/):
#   .devicepack/peers_a  FlashQLA 0.1.3 + TileLang 0.1.15 (49.6 MB) and their small dependencies
#   .devicepack/peers_b  z3-solver (TileLang's, 29 MB), FLA 0.6.0 (fla-core) + einops
# Carry them in two consecutive calls, within the machine's warm time (a path not named in a call's
# carry stays there): first carry [".devicepack/peers_a"] with the command `true`, then carry
# [".devicepack/peers_b"] with `bash bench/device/kernels_run.sh`, which installs every wheel under
# .devicepack/ and says which peers imported. A cold machine in between loses peers_a: the run then
# reports FlashQLA as not installed.
set -eu
get() {  # folder, then pip requirement specifiers
  local dir=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$dir" "$@"
}
rm -rf .devicepack/peers_a .devicepack/peers_b
for spec in flash-qla==0.1.3 tilelang==0.1.15 apache-tvm-ffi==0.1.12 torch-c-dlpack-ext==0.1.5 cloudpickle ml-dtypes tqdm; do
  get .devicepack/peers_a "$spec"
done
for spec in z3-solver==4.15.4.0 fla-core==0.6.0 einops==0.8.2; do get .devicepack/peers_b "$spec"; done
for d in .devicepack/peers_a .devicepack/peers_b; do
  echo "$d: $(du -sm $d | cut -f1) MiB: $(ls $d | tr '\n' ' ')"
done
