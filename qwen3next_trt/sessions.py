"""Sessions over exported graphs, one layer below both `runtime/` and `validate/`.

A session runs one graph: `session.run(output_names | None, feed) -> [numpy arrays]`, inputs and
outputs as the manifest's ports name them, as ONNX Runtime's InferenceSession does. Backends:
- ONNX Runtime (`OrtSession`, `onnxrt_factory`) on the CPU provider, or on its CUDA provider
  (`device="cuda"`, backend name `onnxrt-cuda`), which reports the provider every node was placed on;
- TensorRT engines (`engine_factory` -> engines/session.py's EngineSession), each checked to be built
  from the very graph and weights of the export it is used with; one engine per weights group, its
  graphs (prefill and decode) sharing it, each through its own optimization profile.
A session factory maps a manifest GraphRecord to a session. numpy has neither bfloat16 nor float8:
float8e4m3fn tensors (an FP8 KV cache) travel as uint8 arrays of the same bits (NUMPY_DTYPES), and
bfloat16 ones as float32 (rounded to bfloat16 on the way in, exactly widened on the way out).
Nothing here imports torch on the CPU, so a serving process stays light.
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

ORT_FLOAT8, ORT_BF16 = "tensor(float8e4m3fn)", "tensor(bfloat16)"
FLOAT8_ONNX, BF16_ONNX = 17, 16  # onnx.TensorProto.FLOAT8E4M3FN / BFLOAT16 (onnx itself is not needed at run time)
BACKENDS = ("onnxrt", "onnxrt-cuda", "tensorrt")
# ONNX Runtime's port type names -> onnx.TensorProto element types / numpy dtypes, for OrtValues made
# directly on a device (runtime/device.py)
ONNX_ELEMENT = {"tensor(float)": 1, "tensor(uint8)": 2, "tensor(int64)": 7, "tensor(bool)": 9, "tensor(float16)": 10,
                "tensor(bfloat16)": 16, "tensor(float8e4m3fn)": 17}
ONNX_NUMPY = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8, "tensor(int64)": np.int64, "tensor(bool)": np.bool_,
              "tensor(float16)": np.float16}
CPU_EP, CUDA_EP = "CPUExecutionProvider", "CUDAExecutionProvider"

# Environment knobs that put ONNX Runtime on other kernel paths (see validate/README.md, "Tolerances"):
# the test suite run under them shows whether a tolerance holds beyond this CPU's choice of kernels.
ORT_OPT_LEVEL_ENV = "QWEN3NEXT_TRT_ORT_OPT_LEVEL"  # 0 / 1 / 2 / 99: ORT's graph optimisation levels (fusions)
ORT_THREADS_ENV = "QWEN3NEXT_TRT_ORT_THREADS"  # intra-op threads when the caller does not choose
# SessionOptions.use_deterministic_compute when the caller does not choose: "1" on, "0" off
ORT_DETERMINISTIC_ENV = "QWEN3NEXT_TRT_ORT_DETERMINISTIC"


def host_dtype(dtype: str):
    """The numpy dtype a port of this manifest dtype is fed and returned as."""
    return HOST_DTYPES.get(dtype, np.float32)


def deterministic_default(device: str) -> bool:
    """use_deterministic_compute for a session on `device` when the caller does not choose:
    the ORT_DETERMINISTIC_ENV knob if set, else off."""
    value = os.environ.get(ORT_DETERMINISTIC_ENV)
    if value is not None:
        if value not in ("0", "1"):
            raise InputError(f"{ORT_DETERMINISTIC_ENV}={value}: expected 0 or 1")
        return value == "1"
    return False


def session_options(threads: int | None = None, deterministic: bool | None = None, device: str = "cpu"):
    """The SessionOptions of every session the project opens (runtime and validate alike).
    deterministic: SessionOptions.use_deterministic_compute (None: `deterministic_default(device)`)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.use_deterministic_compute = deterministic_default(device) if deterministic is None else bool(deterministic)
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
    """An ONNX Runtime session on the CPU provider, or on the CUDA provider (device "cuda"; the CPU
    provider stays registered for what CUDA cannot take, and `placement()` says which nodes those were).
    float8e4m3fn inputs and outputs travel as uint8 arrays of the same bits, bfloat16 ones as float32.

    tf32: let the CUDA provider's float32 MatMul / Gemm use TF32 tensor cores (10 mantissa bits instead
    of 23); off by default, so a float32 graph is compared in float32.
    deterministic: SessionOptions.use_deterministic_compute (None: QWEN3NEXT_TRT_ORT_DETERMINISTIC, else off).
    Off by default: on the H200 it did not make ONNX Runtime 1.31.1's CUDA com.microsoft::MoE repeatable (its
    16-bit outputs differ run to run by 1-2 units in the last place; every other node was bitwise repeatable
    either way; NOTES.md, "ONNX Runtime CUDA, 16-bit repeatability").
    cuda_graph: the CUDA provider captures the graph's kernels once and replays them (`enable_cuda_graph`).
    Such a session runs only through `run_bound` with every input and output bound to device buffers
    whose addresses never change (the replay reads and writes the captured addresses); `run` refuses it.
    runtime/device.py drives it."""

    def __init__(self, path: str | Path, threads: int | None = None, device: str = "cpu", tf32: bool = False,
                 cuda_graph: bool = False, deterministic: bool | None = None):
        if device == "cuda":
            try:
                import torch  # noqa: F401  (loads the CUDA 13 libraries the CUDA provider links: PLATFORM.md)
            except ImportError:
                pass
        import onnxruntime as ort

        self._ort, self.device = ort, device
        self.path, self.threads, self.tf32, self.cuda_graph = Path(path), threads, tf32, cuda_graph
        if cuda_graph and device != "cuda":
            raise InputError(f"{path}: cuda_graph needs device 'cuda', got {device!r}")
        opts = session_options(threads, deterministic, device)
        self.deterministic = opts.use_deterministic_compute
        opts.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
        if device == "cuda":
            if CUDA_EP not in ort.get_available_providers():
                raise InputError(f"{path}: the CUDA provider is not in this onnxruntime {ort.__version__} "
                                 f"(providers: {', '.join(ort.get_available_providers())}): install onnxruntime-gpu")
            cuda_options = {"device_id": "0", "use_tf32": "1" if tf32 else "0"}
            if cuda_graph:
                cuda_options["enable_cuda_graph"] = "1"
            providers = [(CUDA_EP, cuda_options), CPU_EP]
        elif device == "cpu":
            providers = [CPU_EP]
        else:
            raise InputError(f"device {device!r}: expected cpu or cuda")
        model = str(path)
        self.rewrites = {}
        if device == "cuda":  # FP8 projections into the CUDA provider's own FP8 GEMM (engines/fold.py)
            from qwen3next_trt.engines.fold import onnx_for_ort_cuda

            rewritten, self.rewrites = onnx_for_ort_cuda(Path(path))
            if rewritten is not None:
                model = rewritten
                opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(Path(path).parent))
        try:
            self.session = ort.InferenceSession(model, opts, providers=providers)
        except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidProtobuf,
                ort.capi.onnxruntime_pybind11_state.InvalidGraph, ort.capi.onnxruntime_pybind11_state.NoSuchFile) as e:
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise InputError(f"{path}: ONNX Runtime cannot load it ({first})") from None
        self.input_types = {i.name: i.type for i in self.session.get_inputs()}
        self.output_types = {o.name: o.type for o in self.session.get_outputs()}
        self.bits_inputs = {i.name: i.type for i in self.session.get_inputs() if i.type in (ORT_FLOAT8, ORT_BF16)}
        self.output_names = [o.name for o in self.session.get_outputs()]
        special_out = any(o.type in (ORT_FLOAT8, ORT_BF16) for o in self.session.get_outputs())
        # plain numpy in and out where nothing needs converting; else OrtValues through an IO binding
        self.plain = not self.bits_inputs and not special_out and device == "cpu"

    def placement(self) -> dict[str, list[str]]:
        """{provider: ["OpType name", ...]}: where ONNX Runtime placed each node of the graph."""
        out: dict[str, list[str]] = {}
        for subgraph in self.session.get_provider_graph_assignment_info():
            out.setdefault(subgraph.ep_name, []).extend(f"{n.op_type} {n.name}" for n in subgraph.get_nodes())
        return out

    def _value(self, name: str, array):
        kind = self.bits_inputs.get(name)
        if kind:
            return self._host_value(kind, array)
        return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))

    @staticmethod
    def _host(value) -> np.ndarray:
        if value.data_type() == ORT_BF16:  # numpy has no bfloat16: copy the bits out, widen exactly
            import ctypes

            import ml_dtypes

            bits = np.empty(value.shape(), np.uint16)
            ctypes.memmove(bits.ctypes.data, value.data_ptr(), bits.nbytes)
            return bits.view(ml_dtypes.bfloat16).astype(np.float32)
        return value.numpy()

    def sibling(self, cuda_graph: bool) -> "OrtSession":
        """Another session over the same graph file and options, with or without CUDA-graph capture."""
        return OrtSession(self.path, self.threads, self.device, self.tf32, cuda_graph, self.deterministic)

    def graph_sibling(self) -> "OrtSession":
        """The CUDA-graph session over this graph, opened once and kept (its weights are loaded once)."""
        if getattr(self, "_graph_sibling", None) is None:
            self._graph_sibling = self.sibling(cuda_graph=True)
        return self._graph_sibling

    def new_graph_ids(self, n: int) -> list[int]:
        """n graph ids not used before in this session: a captured graph keeps the buffer addresses it
        was captured with, so new buffers need new ids (0, the default id, is never handed out)."""
        first = getattr(self, "_next_graph_id", 1)
        self._next_graph_id = first + n
        return list(range(first, first + n))

    # -- device-resident values (runtime/device.py): OrtValues that stay where the provider computes --
    @property
    def value_device(self) -> str:
        return "cuda" if self.device == "cuda" else "cpu"

    def empty_value(self, ort_type: str, shape):
        """An uninitialised OrtValue of the port type `ort_type` (e.g. 'tensor(bfloat16)') on this
        session's device: a buffer allocated once whose address stays fixed."""
        return self._ort.OrtValue.ortvalue_from_shape_and_type(list(map(int, shape)), ONNX_ELEMENT[ort_type], self.value_device, 0)

    def device_value(self, ort_type: str, array, into=None):
        """Host array (as `run` takes it: bf16 as float32, float8 as uint8 bits) -> an OrtValue of the
        port type on this session's device; `into`: an existing one of the same shape, overwritten in
        place (its address kept, as a captured CUDA graph needs)."""
        host = self._host_value(ort_type, array)
        if into is None:
            into = self.empty_value(ort_type, host.shape())
        into.update_inplace(host)
        return into

    def _host_value(self, ort_type: str, array):
        OrtValue = self._ort.OrtValue
        if ort_type == ORT_FLOAT8:
            return OrtValue.ortvalue_from_numpy_with_onnx_type(np.ascontiguousarray(array, dtype=np.uint8), FLOAT8_ONNX)
        if ort_type == ORT_BF16:
            import ml_dtypes

            bits = np.ascontiguousarray(np.asarray(array, np.float32).astype(ml_dtypes.bfloat16).view(np.uint16))
            return OrtValue.ortvalue_from_numpy_with_onnx_type(bits, BF16_ONNX)
        return OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array, dtype=ONNX_NUMPY[ort_type]))

    def to_host(self, value, staging=None) -> np.ndarray:
        """A device OrtValue -> numpy, as `run` returns it. `staging`: a CPU OrtValue of the same type and
        shape to copy through (bfloat16 and float8 have no numpy view of device memory)."""
        if value.device_name().lower() != "cpu":
            staging = staging if staging is not None else self._ort.OrtValue.ortvalue_from_shape_and_type(
                value.shape(), ONNX_ELEMENT[value.data_type()], "cpu", 0)
            staging.update_inplace(value)
            value = staging
        return self._host(value)

    def run_bound(self, binding, graph_id: int | None = None) -> None:
        """Run over an IOBinding whose inputs and outputs are already bound (device values stay where
        they are). graph_id: which of the session's captured CUDA graphs this binding is (one per set of
        buffer addresses); ignored without cuda_graph."""
        options = None
        if self.cuda_graph and graph_id is not None:
            options = self._ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", str(graph_id))
        self.session.run_with_iobinding(binding, options)

    def run(self, names, feed: dict) -> list[np.ndarray]:
        if self.cuda_graph:
            raise RuntimeError(f"{self.path}: a CUDA-graph session runs only over fixed device buffers (run_bound)")
        if self.plain:
            return self.session.run(names, feed)
        binding = self.session.io_binding()
        for k, v in feed.items():
            binding.bind_ortvalue_input(k, self._value(k, v))
        names = names or self.output_names
        for name in names:
            binding.bind_output(name, "cpu")  # outputs come back to the host, whichever provider ran the node
        self.session.run_with_iobinding(binding)
        return [self._host(v) for v in binding.get_outputs()]


def onnxrt_factory(onnx_dir: str | Path, threads: int | None = None, device: str = "cpu", tf32: bool = False):
    """GraphRecord -> OrtSession over the export's graph file (device: cpu or cuda)."""
    return lambda record: OrtSession(Path(onnx_dir) / record.file, threads, device, tf32)


def engine_path(engines_dir: str | Path, record) -> Path:
    """The engine that serves `record`: one per weights group, `<group>.engine` (engines/metadata.py)."""
    from qwen3next_trt.engines.metadata import engine_file_name, engine_group

    return Path(engines_dir) / engine_file_name(engine_group(record))


def open_engine(engines_dir: str | Path, record, manifest, loaded=None):
    """A session for `record` on the engine of its weights group, through the profile that serves it,
    after checking that the engine was built from this export's graphs and weights (engines/metadata.py)
    and before anything touches a GPU. `loaded`: {engine key: engines.session.Engine}, where the
    deserialised engines of earlier calls are kept, so the graphs of one group share one engine (one
    copy of the weights on the GPU); without it every call deserialises its own."""
    from qwen3next_trt.engines.metadata import check_engine_source, metadata_path, read_engine_meta

    path = engine_path(engines_dir, record)
    if not path.is_file():
        raise InputError(f"{path}: not found: expected the engine of weights group {path.stem!r}, which serves graph "
                         f"{record.name!r} (qwen3next-trt build)")
    meta = read_engine_meta(path)
    check_engine_source(meta, metadata_path(path), manifest, record)
    from qwen3next_trt.engines.session import Engine, EngineSession

    key = (str(path.resolve()), meta["cache_key"])
    engine = loaded.get(key) if loaded is not None else None
    if engine is None:
        engine = Engine(path, meta)
        if loaded is not None:
            loaded[key] = engine
    return EngineSession(engine, graph=record.name)


def engine_factory(engines_dir: str | Path, manifest):
    """GraphRecord -> EngineSession on `engines_dir/<group>.engine`, tied to `manifest`'s export. The
    sessions of one group share its deserialised engine while any of them is alive."""
    import weakref

    loaded = weakref.WeakValueDictionary()  # an engine lives as long as a session holds it
    return lambda record: open_engine(engines_dir, record, manifest, loaded)


# An export's dtype names (manifest field `dtype`, flag --dtype) and the torch dtype each stands for.
EXPORT_DTYPES = ("fp32", "fp16", "bf16")


def torch_dtype(name: str):
    """The torch dtype of an export dtype name (torch imported here only, not by a serving process)."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
