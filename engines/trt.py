"""The one place that knows whether full TensorRT or TensorRT-RTX is in use.

Both share the API family (Builder, OnnxParser, IPluginV3, Runtime); they differ in how a strongly
typed network is requested, in build targets (TensorRT-RTX compiles ahead of time for listed compute
capabilities and JIT-compiles kernels on the GPU; full TensorRT builds for the GPU it runs on), and
in packaging: TensorRT-RTX's ONNX parser dlopens the unversioned `libtensorrt_rtx.so` when it
imports plugins, which the wheel does not ship (PLATFORM.md). The parser's RPATH is $ORIGIN, so a
symlink beside the versioned library fixes that without any environment variable; `load` makes it.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

from qwen3next_trt.errors import InputError

FLAVOURS = ("auto", "tensorrt", "tensorrt_rtx")


@dataclass
class Trt:
    trt: object  # the imported module
    flavour: str  # "tensorrt" or "tensorrt_rtx"
    version: str

    @property
    def ahead_of_time(self) -> bool:
        """TensorRT-RTX builds without a GPU, for the compute capabilities it is told."""
        return self.flavour == "tensorrt_rtx"

    def create_network(self, builder):
        if self.flavour == "tensorrt_rtx":
            return builder.create_network(0)  # strongly typed is the only mode
        flag = 1 << int(self.trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        return builder.create_network(flag)

    def compute_capabilities(self, names: list[str] | None):
        """ComputeCapability values for an ahead-of-time build ('SM80', ..., or 'CURRENT': the GPU this
        process sees); [] for full TensorRT, which always builds for the GPU it runs on."""
        if not self.ahead_of_time:
            return []
        names = names or ["SM80", "SM89", "SM120"]
        known = [n for n in dir(self.trt.ComputeCapability) if n.startswith("SM") or n == "CURRENT"]
        bad = [n for n in names if n not in known]
        if bad:
            raise InputError(f"--compute-capability {bad[0]}: {self.flavour} {self.version} targets {', '.join(known)}")
        return [getattr(self.trt.ComputeCapability, n) for n in names]


def load_plugin_library(T: Trt, registry, path: Path, names: tuple[str, ...]) -> list[str]:
    """Register a C++ plugin library's creators with `registry` (a Builder's or Runtime's
    get_plugin_registry(): each Builder has its own, which searches the process-wide one) through
    load_library: TensorRT calls the library's setLoggerFinder and getCreators. Returns `names`."""
    trt = T.trt
    # all_creators, not get_creator: a miss in get_creator is logged as an API usage error
    present = {c.name for c in registry.all_creators} | {c.name for c in trt.get_plugin_registry().all_creators}
    clash = [n for n in names if n in present]
    if clash:
        raise InputError(f"{path}: plugin creators {', '.join(clash)} are already registered with {T.flavour} in this process "
                         "(by the Python plugins or another library): TensorRT refuses a creator name twice")
    handle = registry.load_library(str(path))
    missing = [n for n in names if n not in {c.name for c in registry.all_creators}]
    if handle is None or missing:
        raise InputError(f"{path}: {T.flavour} {T.version} did not load this plugin library"
                         + (f" (creators {', '.join(missing)} missing)" if missing else "")
                         + " (its messages went to the logger of the Builder / Runtime that owns the registry)")
    return list(names)


def plugin_library_last_error(path: Path) -> str:
    """The plugin library's last refusal (a bad attribute at createPlugin). TensorRT-RTX 1.7's logger
    finder gives plugins no logger (measured), so the message would be lost otherwise; dlopen of the
    loaded library returns the same instance."""
    import ctypes

    lib = ctypes.CDLL(str(path), mode=os.RTLD_LOCAL | os.RTLD_NOW)
    fn = lib.q3n_plugin_last_error
    fn.restype, fn.argtypes = ctypes.c_size_t, [ctypes.c_char_p, ctypes.c_size_t]
    buf = ctypes.create_string_buffer(4096)
    fn(buf, len(buf))
    return buf.value.decode(errors="replace")


def _ensure_unversioned_rtx_library():
    libs = importlib.import_module("tensorrt_rtx_libs")
    base = Path(list(libs.__path__)[0])
    link, target = base / "libtensorrt_rtx.so", base / "libtensorrt_rtx.so.1"
    if link.exists() or not target.exists():
        return
    try:
        tmp = base / f".libtensorrt_rtx.so.{os.getpid()}"
        tmp.symlink_to(target.name)
        os.replace(tmp, link)
    except OSError as e:
        raise InputError(
            f"{link}: cannot create the symlink to {target.name} that TensorRT-RTX's ONNX parser needs to load "
            f"plugins ({e}); create it once by hand (ln -s {target.name} {link})"
        ) from None


def load(flavour: str = "auto") -> Trt:
    if flavour not in FLAVOURS:
        raise InputError(f"--trt {flavour!r}: expected one of {', '.join(FLAVOURS)}")
    errors = []
    for name in (("tensorrt", "tensorrt_rtx") if flavour == "auto" else (flavour,)):
        try:
            module = importlib.import_module(name)
            module.Builder  # noqa: B018  (the tensorrt meta package imports without its libraries)
        except Exception as e:  # noqa: BLE001 - any import failure means: not usable here
            errors.append(f"{name}: {type(e).__name__}: {e}")
            continue
        if name == "tensorrt_rtx":
            _ensure_unversioned_rtx_library()
        return Trt(module, name, module.__version__)
    raise InputError("no usable TensorRT: " + "; ".join(errors) + " (pip install 'qwen3next-trt[trt-rtx]' for TensorRT-RTX)")
