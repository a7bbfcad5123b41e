"""Compile the plugin kernels (plugins/*/kernel.cu) into one shared library, cached by source hash.

    library_path()   -> path of libqwen3next_plugins.so, compiled with nvcc on first use
    library_hash()   -> sha256 of the library's bytes (for manifests / engine provenance)
    source_hash()    -> sha256 of the sources and compiler flags: the cache key

The cache directory is $QWEN3NEXT_TRT_CACHE/plugins/<source hash>/ (default root ~/.cache/qwen3next-trt).
The library is written to a temporary name and renamed into place, so a crash or a concurrent build
never leaves a half-written library behind. `python -m qwen3next_trt.plugins.build` prints its path.

The library links the CUDA runtime statically (nvcc's default): it needs only the NVIDIA driver
(one that supports CUDA 13) at run time, and loads on a machine without a GPU.

The C++ TensorRT plugin library (plugins/cpp/README.md) is built here too, from the same kernels:
    cpp_library_path()  -> libqwen3next_trt_plugins.so ($QWEN3NEXT_TRT_CACHE/plugins-cpp/<hash>/)
    cpp_library_info()  -> its path, sha256, and the TensorRT headers it was compiled with
The kernels are compiled once per source hash into objects (<cache>/plugins/<hash>/objects/) and linked
with the plugin classes; `qwen3next-trt plugin-library` prints the result.
"""

from __future__ import annotations

import hashlib
import json
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
SYMBOLS = ("q3n_causal_conv_with_state", "q3n_linear_attention", "q3n_linear_attention_impl",
           "q3n_linear_attention_workspace_size", "q3n_moe_workspace_size",
           "q3n_moe", "q3n_moe_fp8", "q3n_moe_fp8_impl")


class PluginBuildError(RuntimeError):
    """nvcc is missing or failed; the message says which, with nvcc's own output."""


class PluginHeadersError(PluginBuildError):
    """No TensorRT headers to build the C++ plugin library against (a setting to fix, not a compiler failure)."""


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
    """Link the kernel objects (kernel_objects: plugins/*/kernel.cu, compiled once per source hash and shared
    with the C++ plugin library) into `out`, via a temporary file in out's folder."""
    progress = progress or _default_progress
    out.parent.mkdir(parents=True, exist_ok=True)
    objects = kernel_objects(progress)
    fd, tmp = tempfile.mkstemp(prefix=f".{LIBRARY_NAME}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        _run([str(_nvcc()), *NVCC_FLAGS, *(str(o) for o in objects), "-o", tmp], f"linking {LIBRARY_NAME} (nvcc)")
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    progress(f"plugin library ready (nvcc, {len(objects)} kernel files, {len(ARCHS)} archs: {', '.join(ARCHS)}): {out}")
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


# -- the C++ TensorRT plugin library ------------------------------------------------------------------
# libqwen3next_trt_plugins.so: the IPluginV3 classes (plugins/cpp/*.cpp, plugins/*/plugin.cpp, g++ with
# TensorRT's headers) linked with the same kernels (plugins/*/kernel.cu, nvcc, no TensorRT header: the
# two do not mix in one translation unit, PLATFORM.md). No TensorRT library is linked: TensorRT hands
# the library its registry and logger (loadLibrary, or the load-time registration in library.cpp).

CPP_LIBRARY_NAME = "libqwen3next_trt_plugins.so"
# The kernels as position-independent objects; the flags of NVCC_FLAGS minus linking.
NVCC_OBJECT_FLAGS = tuple(f for f in NVCC_FLAGS if f != "-shared") + ("-c",)
GXX_FLAGS = ("-O2", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wno-deprecated-declarations")
# --exclude-libs: the static CUDA runtime's symbols stay private, so they cannot interpose on another
# copy in the host process.
LINK_FLAGS = ("-shared", "-Wl,--no-undefined", "-Wl,--exclude-libs,ALL")
CPP_SYMBOLS = ("getCreators", "setLoggerFinder", "q3n_plugin_self_registration", "q3n_plugin_header_version",
               "q3n_plugin_last_error")
KERNEL_LENS = "kernel-lens==2.0.1"
CPP_PLUGINS = ("CausalConvWithState", "LinearAttention", "MoE")  # the creators getCreators returns


def cpp_sources() -> list[Path]:
    return sorted([*PLUGIN_DIR.glob("cpp/*.cpp"), *PLUGIN_DIR.glob("*/plugin.cpp")])


def _cuda_home() -> Path:
    return Path(os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda")


def _gxx() -> str:
    gxx = os.environ.get("CXX") or shutil.which("g++")
    if not gxx:
        raise PluginBuildError(f"cannot build {CPP_LIBRARY_NAME}: no C++ compiler ('g++' not in PATH, $CXX unset)")
    return gxx


def _header_version(include: Path) -> str:
    """'MAJOR.MINOR.PATCH' from NvInferVersion.h, whose macros may point at other macros."""
    defines = {}
    for line in (include / "NvInferVersion.h").read_text(errors="replace").splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "#define":
            defines[parts[1]] = parts[2]

    def resolve(name: str) -> str:
        seen = set()
        while name in defines and name not in seen:
            seen.add(name)
            name = defines[name]
        return name

    return ".".join(resolve(f"NV_TENSORRT_{p}") for p in ("MAJOR", "MINOR", "PATCH"))


def tensorrt_headers() -> tuple[Path, str]:
    """(include dir, where it came from): $TENSORRT_ROOT/include, else the system's, else the headers of
    TensorRT 10.14 in the kernel-lens wheel (the plugin interfaces' layout is the same in 10.8 .. 11.x)."""
    root = os.environ.get("TENSORRT_ROOT")
    if root:
        include = Path(root).expanduser() / "include"
        if not (include / "NvInferRuntime.h").is_file():
            raise PluginHeadersError(f"TENSORRT_ROOT={root}: expected {include}/NvInferRuntime.h (a TensorRT install's headers)")
        return include, "TENSORRT_ROOT"
    for include in (Path("/usr/include/x86_64-linux-gnu"), Path("/usr/include/aarch64-linux-gnu"), Path("/usr/include"),
                    Path("/usr/local/include")):
        if (include / "NvInferRuntime.h").is_file():
            return include, "system"
    import importlib.util

    spec = importlib.util.find_spec("kernel_lens")
    for base in (spec.submodule_search_locations or []) if spec else []:
        include = Path(base) / "include" / "tensorrt"
        if (include / "NvInferRuntime.h").is_file():
            return include, KERNEL_LENS
    raise PluginHeadersError(f"cannot build {CPP_LIBRARY_NAME}: no TensorRT headers (NvInferRuntime.h) in $TENSORRT_ROOT/include "
                           f"or the system; set TENSORRT_ROOT, or pip install --no-deps {KERNEL_LENS}")


def cpp_source_hash(include: Path | None = None) -> str:
    """Cache key of the C++ library: kernels, plugin sources, compiler flags, and the TensorRT headers."""
    include = include or tensorrt_headers()[0]
    h = hashlib.sha256(source_hash().encode())
    for path in [*cpp_sources(), *sorted(PLUGIN_DIR.glob("cpp/*.h"))]:
        h.update(path.relative_to(PLUGIN_DIR).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(str(include).encode() + b"\0")
    for header in sorted(include.glob("NvInfer*.h")):
        h.update(header.name.encode() + b"\0" + header.read_bytes() + b"\0")
    h.update(" ".join((*NVCC_OBJECT_FLAGS, *GXX_FLAGS, *LINK_FLAGS)).encode())
    return h.hexdigest()


def _run(cmd: list[str], what: str) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise PluginBuildError(f"{what} failed (exit {result.returncode})\ncommand: {' '.join(cmd)}\n"
                               f"{result.stderr.strip() or result.stdout.strip()}")


def kernel_objects(progress: Callable[[str], None] | None = None) -> list[Path]:
    """plugins/*/kernel.cu compiled once per source hash into cache_dir()/objects/<op>.o."""
    progress = progress or _default_progress
    objects = []
    for src in kernel_sources():
        obj = cache_dir() / "objects" / f"{src.parent.name}.o"
        if not obj.is_file():
            obj.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{obj.name}.", suffix=".tmp", dir=obj.parent)
            os.close(fd)
            progress(f"compiling {src.parent.name}/kernel.cu (nvcc, {len(ARCHS)} archs) ...")
            start = time.perf_counter()
            try:
                _run([str(_nvcc()), *NVCC_OBJECT_FLAGS, str(src), "-o", tmp], f"nvcc {src.parent.name}/kernel.cu")
                os.replace(tmp, obj)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            progress(f"compiling {src.parent.name}/kernel.cu ... done in {time.perf_counter() - start:.1f} s")
        objects.append(obj)
    return objects


def cpp_library_dir(include: Path | None = None) -> Path:
    return cache_dir().parent.parent / "plugins-cpp" / cpp_source_hash(include)


def compile_cpp_library(out: Path, include: Path, origin: str, progress: Callable[[str], None] | None = None) -> Path:
    progress = progress or _default_progress
    objects = kernel_objects(progress)
    cuda = _cuda_home()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build.", dir=out.parent))
    try:
        start = time.perf_counter()
        progress(f"compiling {CPP_LIBRARY_NAME} (g++, TensorRT {_header_version(include)} headers from {origin}) ...")
        plugin_objects = []
        for src in cpp_sources():
            obj = work / f"{src.parent.name}_{src.stem}.o"
            _run([_gxx(), *GXX_FLAGS, f"-I{include}", f"-I{cuda / 'include'}", "-c", str(src), "-o", str(obj)],
                 f"g++ {src.relative_to(PLUGIN_DIR)}")
            plugin_objects.append(str(obj))
        tmp = work / CPP_LIBRARY_NAME
        _run([_gxx(), *LINK_FLAGS, "-o", str(tmp), *plugin_objects, *(str(o) for o in objects), f"-L{cuda / 'lib64'}",
              "-lcudart_static", "-ldl", "-lpthread", "-lrt"], f"linking {CPP_LIBRARY_NAME}")
        info = {"library": CPP_LIBRARY_NAME, "headers": str(include), "headers_from": origin,
                "tensorrt_headers_version": _header_version(include), "sha256": hashlib.sha256(tmp.read_bytes()).hexdigest(),
                "source_sha256": cpp_source_hash(include)}
        (work / "build.json").write_text(json.dumps(info, indent=2))
        os.chmod(tmp, 0o755)
        os.replace(work / "build.json", out.with_name("build.json"))
        os.replace(tmp, out)
        progress(f"compiling {CPP_LIBRARY_NAME} ... done in {time.perf_counter() - start:.1f} s: {out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def cpp_library_path(build: bool = True, progress: Callable[[str], None] | None = None) -> Path:
    """The C++ plugin library for the current sources and TensorRT headers; compiled now if missing."""
    include, origin = tensorrt_headers()
    path = cpp_library_dir(include) / CPP_LIBRARY_NAME
    if path.is_file() and path.with_name("build.json").is_file():
        return path
    if not build:
        raise PluginBuildError(f"{CPP_LIBRARY_NAME} not built yet: {path} is missing (call cpp_library_path(build=True))")
    return compile_cpp_library(path, include, origin, progress)


def built_cpp_library() -> Path | None:
    """This host's build of the C++ plugin library for the current sources, or None when it is not
    built (or there are no TensorRT headers to build it against); never compiles."""
    try:
        return cpp_library_path(build=False)
    except (PluginBuildError, PluginHeadersError):
        return None


def cpp_library_info(build: bool = True, progress: Callable[[str], None] | None = None) -> dict:
    """path, sha256, and the TensorRT headers it was compiled with."""
    path = cpp_library_path(build, progress)
    return {"path": str(path), **json.loads(path.with_name("build.json").read_text())}


def main() -> int:
    try:
        print(library_path())
    except PluginBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
