"""Sessions over exported graphs, one layer below both `runtime/` and `validate/`.

A session runs one graph: `session.run(output_names | None, feed) -> [numpy arrays]`, inputs and
outputs as the manifest's ports name them, as ONNX Runtime's InferenceSession does. Two backends:
- ONNX Runtime on the CPU (`OrtSession`, `onnxrt_factory`);
- TensorRT engines (`engine_factory` -> engines/session.py's EngineSession), each checked to be built
  from the very graph and weights of the export it is used with.
A session factory maps a manifest GraphRecord to a session. numpy has neither bfloat16 nor float8:
float8e4m3fn tensors (an FP8 KV cache) travel as uint8 arrays of the same bits (NUMPY_DTYPES).
Nothing here imports torch, so a serving process stays light.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from qwen3next_trt.errors import InputError

# numpy dtype of each manifest dtype, as arrays travel between sessions and the runtime's state
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "bool": np.bool_, "float8e4m3fn": np.uint8}
# numpy has no bfloat16: bf16 tensors travel as float32 (engines cast on the way in)
HOST_DTYPES = dict(NUMPY_DTYPES, bfloat16=np.float32)

ORT_FLOAT8 = "tensor(float8e4m3fn)"
FLOAT8_ONNX = 17  # onnx.TensorProto.FLOAT8E4M3FN (onnx itself is not needed at run time)
BACKENDS = ("onnxrt", "tensorrt")

# Environment knobs that put ONNX Runtime on other kernel paths (see validate/README.md, "Tolerances"):
# the test suite run under them shows whether a tolerance holds beyond this CPU's choice of kernels.
ORT_OPT_LEVEL_ENV = "QWEN3NEXT_TRT_ORT_OPT_LEVEL"  # 0 / 1 / 2 / 99: ORT's graph optimisation levels (fusions)
ORT_THREADS_ENV = "QWEN3NEXT_TRT_ORT_THREADS"  # intra-op threads when the caller does not choose


def host_dtype(dtype: str):
    """The numpy dtype a port of this manifest dtype is fed and returned as."""
    return HOST_DTYPES.get(dtype, np.float32)


def session_options(threads: int | None = None):
    """The SessionOptions of every CPU session the project opens (runtime and validate alike)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    threads = threads or int(os.environ.get(ORT_THREADS_ENV, "0"))
    if threads:
        opts.intra_op_num_threads = threads
    level = os.environ.get(ORT_OPT_LEVEL_ENV)
    if level:
        levels = {"0": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "1": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "2": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "99": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        if level not in levels:
            raise InputError(f"{ORT_OPT_LEVEL_ENV}={level}: expected one of {', '.join(levels)}")
        opts.graph_optimization_level = levels[level]
    return opts


class OrtSession:
    """An ONNX Runtime (CPU) session whose float8e4m3fn inputs and outputs travel as uint8 arrays of
    the same bits (numpy has no float8; an FP8 KV cache has such states)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        self._ort = ort
        try:
            self.session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
        except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidProtobuf,
                ort.capi.onnxruntime_pybind11_state.InvalidGraph, ort.capi.onnxruntime_pybind11_state.NoSuchFile) as e:
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise InputError(f"{path}: ONNX Runtime cannot load it ({first})") from None
        self.fp8_inputs = {i.name for i in self.session.get_inputs() if i.type == ORT_FLOAT8}
        self.has_fp8 = bool(self.fp8_inputs) or any(o.type == ORT_FLOAT8 for o in self.session.get_outputs())
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, names, feed: dict) -> list[np.ndarray]:
        if not self.has_fp8:
            return self.session.run(names, feed)
        OrtValue = self._ort.OrtValue
        values = {k: OrtValue.ortvalue_from_numpy_with_onnx_type(np.ascontiguousarray(v, dtype=np.uint8), FLOAT8_ONNX)
                  if k in self.fp8_inputs else OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in feed.items()}
        return [o.numpy() for o in self.session.run_with_ort_values(names or self.output_names, values)]


def onnxrt_factory(onnx_dir: str | Path, threads: int | None = None):
    """GraphRecord -> OrtSession over the export's graph file."""
    return lambda record: OrtSession(Path(onnx_dir) / record.file, threads)


def engine_path(engines_dir: str | Path, record) -> Path:
    return Path(engines_dir) / f"{record.name}.engine"


def open_engine(engines_dir: str | Path, record, manifest):
    """The engine built for `record`, after checking that it was built from this export's graph and
    weights (engines/metadata.py) and before anything touches a GPU."""
    from qwen3next_trt.engines.metadata import check_engine_source, metadata_path, read_engine_meta

    path = engine_path(engines_dir, record)
    if not path.is_file():
        raise InputError(f"{path}: not found: expected an engine for graph {record.name!r} (qwen3next-trt build)")
    meta = read_engine_meta(path)
    check_engine_source(meta, metadata_path(path), manifest, record)
    from qwen3next_trt.engines.session import EngineSession

    return EngineSession(path, meta)


def engine_factory(engines_dir: str | Path, manifest):
    """GraphRecord -> EngineSession over `engines_dir/<graph>.engine`, tied to `manifest`'s export."""
    return lambda record: open_engine(engines_dir, record, manifest)


# An export's dtype names (manifest field `dtype`, flag --dtype) and the torch dtype each stands for.
EXPORT_DTYPES = ("fp32", "fp16", "bf16")


def torch_dtype(name: str):
    """The torch dtype of an export dtype name (torch imported here only, not by a serving process)."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
