"""Compile the plugin kernels (plugins/*/kernel.cu) into one shared library, cached by source hash.

    library_path()   -> path of libqwen3next_plugins.so, compiled with nvcc on first use
    library_hash()   -> sha256 of the library's bytes (for manifests / engine provenance)
    source_hash()    -> sha256 of the sources and compiler flags: the cache key

The cache directory is $QWEN3NEXT_TRT_CACHE/plugins/<source hash>/ (default root ~/.cache/qwen3next-trt).
The library is written to a temporary name and renamed into place, so a crash or a concurrent build
never leaves a half-written library behind. `python -m qwen3next_trt.plugins.build` prints its path.

The library links the CUDA runtime statically (nvcc's default): it needs only the NVIDIA driver
(one that supports CUDA 13) at run time, and loads on a machine without a GPU.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

PLUGIN_DIR = Path(__file__).resolve().parent
LIBRARY_NAME = "libqwen3next_plugins.so"
ARCHS = ("sm_80", "sm_89", "sm_90a", "sm_120")
GENCODE = tuple(f"-gencode=arch=compute_{a[3:]},code={a}" for a in ARCHS)
# -lineinfo: source lines for profilers' stall sampling (ncu); no effect on the generated code.
NVCC_FLAGS = ("-O3", "-std=c++17", "-lineinfo", "-shared", "-Xcompiler", "-fPIC", "--threads", "0", *GENCODE)
SYMBOLS = ("q3n_causal_conv_with_state", "q3n_linear_attention", "q3n_linear_attention_impl", "q3n_moe_workspace_size",
           "q3n_moe", "q3n_moe_fp8", "q3n_moe_fp8_impl")


class PluginBuildError(RuntimeError):
    """nvcc is missing or failed; the message says which, with nvcc's own output."""


def kernel_sources() -> list[Path]:
    return sorted(PLUGIN_DIR.glob("*/kernel.cu"))


def _hashed_sources() -> list[Path]:
    # Headers too: a change in common.cuh must rebuild.
    return sorted({*kernel_sources(), *PLUGIN_DIR.glob("*.cuh"), *PLUGIN_DIR.glob("*/*.cuh")})


def source_hash() -> str:
    h = hashlib.sha256()
    for path in _hashed_sources():
        h.update(path.relative_to(PLUGIN_DIR).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    h.update(" ".join(NVCC_FLAGS).encode())
    return h.hexdigest()


def cache_dir() -> Path:
    root = os.environ.get("QWEN3NEXT_TRT_CACHE")
    root = Path(root).expanduser() if root else Path.home() / ".cache" / "qwen3next-trt"
    return root / "plugins" / source_hash()


def find_cuda_tool(name: str) -> Path | None:
    """`name` (nvcc, cuobjdump, ...) from PATH, else $CUDA_HOME/bin (CUDA_HOME defaults to /usr/local/cuda)."""
    found = shutil.which(name)
    if found:
        return Path(found)
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(cuda_home) / "bin" / name
    return candidate if candidate.is_file() and os.access(candidate, os.X_OK) else None


def _nvcc() -> Path:
    nvcc = find_cuda_tool("nvcc")
    if nvcc is None:
        cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
        raise PluginBuildError(
            f"cannot build the plugin library ({LIBRARY_NAME}): 'nvcc' was not found in PATH nor in "
            f"{cuda_home}/bin ($CUDA_HOME/bin); install the CUDA toolkit (13.0) or set CUDA_HOME to it"
        )
    return nvcc


def _default_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def compile_library(out: Path, progress: Callable[[str], None] | None = None) -> Path:
    """Compile every plugins/*/kernel.cu into `out` (via a temporary file in out's folder)."""
    progress = progress or _default_progress
    nvcc = _nvcc()
    sources = kernel_sources()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{LIBRARY_NAME}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    cmd = [str(nvcc), *NVCC_FLAGS, *(str(s) for s in sources), "-o", tmp]
    progress(f"compiling plugin library (nvcc, {len(sources)} files, {len(ARCHS)} archs: {', '.join(ARCHS)}) ...")
    start = time.perf_counter()
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise PluginBuildError(
                f"nvcc failed (exit {result.returncode}) building {LIBRARY_NAME}\n"
                f"command: {' '.join(cmd)}\n{result.stderr.strip() or result.stdout.strip()}"
            )
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    progress(f"compiling plugin library ... done in {time.perf_counter() - start:.1f} s: {out}")
    return out


def library_path(build: bool = True, progress: Callable[[str], None] | None = None) -> Path:
    """The compiled library for the current sources; compiled now if missing (or an error if build=False)."""
    path = cache_dir() / LIBRARY_NAME
    if path.is_file():
        return path
    if not build:
        raise PluginBuildError(f"plugin library not built yet: {path} is missing (call library_path(build=True))")
    return compile_library(path, progress)


def library_hash(build: bool = True) -> str:
    return hashlib.sha256(library_path(build).read_bytes()).hexdigest()


def main() -> int:
    try:
        print(library_path())
    except PluginBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
