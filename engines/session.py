"""Running a built engine on the GPU with the same call shape as an ONNX Runtime session.

`EngineSession(path, graph=...).run(None, feeds)` takes and returns numpy arrays, so the validator and
the runtime drive engines (through qwen3next_trt/sessions.py) exactly as they drive ONNX Runtime. An
engine serves one or two graphs of its weights group, each through its own optimization profile
(engines/metadata.py): `Engine` is the plan deserialised once (its weights on the GPU once), and
every `EngineSession` over it has its own execution context set to its graph's profile. Before
anything runs, the engine's metadata is checked against this process: TensorRT flavour and version,
and every input shape against the selected profile; a mismatch is an error naming the engine and
tensor, never a silent rebuild.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qwen3next_trt.errors import InputError

from . import trt as trt_adapter
from .metadata import metadata_path, plugin_library_path, profile_of, read_engine_meta


def _torch_dtype(trt, dt):
    import torch

    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
             trt.DataType.INT64: torch.int64, trt.DataType.INT32: torch.int32, trt.DataType.BOOL: torch.bool,
             trt.DataType.FP8: torch.float8_e4m3fn}
    return table[dt]


class Engine:
    """A plan deserialised once: the runtime, the ICudaEngine and its metadata, shared by the sessions
    of the graphs it serves."""

    def __init__(self, engine_path: str | Path, meta: dict | None = None):
        import torch

        self.path = Path(engine_path)
        self.meta = meta if meta is not None else read_engine_meta(self.path)
        want = self.meta["tensorrt"]
        self.T = trt_adapter.load(want["flavour"])
        if self.T.version != want["version"]:
            raise InputError(f"{self.path}: built by {want['flavour']} {want['version']}, this process has {self.T.version}: rebuild it")
        if not torch.cuda.is_available():
            raise InputError(f"{self.path}: running an engine needs a CUDA GPU (none visible)")
        from qwen3next_trt.plugins import build as plugin_build

        trt = self.T.trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        library = plugin_library_path(self.meta, metadata_path(self.path))
        if library is not None:
            # a plain plan names its plugins only: their creators must be registered before deserialising
            trt_adapter.load_plugin_library(self.T, self.runtime.get_plugin_registry(), library, plugin_build.CPP_PLUGINS)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            cc = "sm_%d%d" % torch.cuda.get_device_capability()
            raise InputError(f"{self.path}: TensorRT could not deserialize it on {torch.cuda.get_device_name()} ({cc}); "
                             f"built for {', '.join(self.meta['compute_capabilities'])}")
        have, want = self.engine.num_optimization_profiles, len([p for p in self.meta["profiles"] if p])
        if want and have != want:
            raise InputError(f"{self.path}: the plan has {have} optimization profile(s), its metadata lists {want}: rebuild it")


class EngineSession:
    """One graph of an engine: its own execution context, set to the graph's optimization profile.
    `engine`: an `Engine` (shared with the session of the group's other graph) or a path; `graph`:
    which of the engine's graphs (may be left out when it serves one)."""

    def __init__(self, engine: Engine | str | Path, meta: dict | None = None, graph: str | None = None):
        import torch

        self.shared = engine if isinstance(engine, Engine) else Engine(engine, meta)
        self.path, self.meta, self.T, self.engine = self.shared.path, self.shared.meta, self.shared.T, self.shared.engine
        if graph is None:
            if len(self.meta["graphs"]) != 1:
                raise InputError(f"{self.path}: serves {', '.join(self.meta['graphs'])}: name the graph to run")
            graph = next(iter(self.meta["graphs"]))
        self.graph = graph
        self.profile_index = profile_of(self.meta, metadata_path(self.path), graph)
        self.profile = self.meta["profiles"][self.profile_index]
        self.stream = torch.cuda.Stream()
        trt = self.T.trt
        # activation memory for this context's own profile only (the default reserves the largest of
        # all profiles: a decode context would hold the prefill's)
        self.context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.ON_PROFILE_CHANGE)
        if self.engine.num_optimization_profiles > 1:
            if not self.context.set_optimization_profile_async(self.profile_index, self.stream.cuda_stream):
                raise InputError(f"{self.path}: cannot select optimization profile {self.profile_index} for graph {graph}")
            self.stream.synchronize()
        self.outputs = [o["name"] for o in self.meta["outputs"]]

    def _check_shape(self, name: str, shape: tuple):
        r = self.profile.get(name)
        if r is None:
            return
        for axis, (lo, hi, n) in enumerate(zip(r["min"], r["max"], shape)):
            if not lo <= n <= hi:
                fix = (f"this graph's profile takes exactly {lo} there" if lo == hi
                       else "rebuild with larger --max-batch/--max-seq/--max-context")
                raise InputError(f"{self.path.name}: input {name!r} axis {axis} = {n} is outside profile {self.profile_index} "
                                 f"({self.graph}) of the engine, [{lo}, {hi}] (shape {list(shape)}); {fix}")

    def run(self, output_names, feeds: dict) -> list[np.ndarray]:
        import torch

        trt = self.T.trt
        keep = []
        for name, array in feeds.items():
            array = np.ascontiguousarray(array)
            self._check_shape(name, array.shape)
            # numpy has no bfloat16: such inputs arrive as float32 and are cast to what the engine wants;
            # nor float8: FP8 KV states arrive as their uint8 bits and are reinterpreted, not converted
            want = _torch_dtype(trt, self.engine.get_tensor_dtype(name))
            t = torch.from_numpy(array).cuda()
            t = t.view(want) if want == torch.float8_e4m3fn else t.to(want)
            if t.numel() == 0:  # an empty past (fresh sequence): TensorRT still wants a valid address
                t = torch.empty(1, dtype=t.dtype, device="cuda")
            keep.append(t)
            self.context.set_input_shape(name, tuple(array.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            t = torch.empty(shape, dtype=_torch_dtype(trt, self.engine.get_tensor_dtype(name)), device="cuda")
            outs[name] = t
            self.context.set_tensor_address(name, t.data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"{self.path.name}: execute_async_v3 failed")
        self.stream.synchronize()
        names = output_names or self.outputs
        def host(t):
            return t.float() if t.dtype == torch.bfloat16 else t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t

        return [host(outs[n]).cpu().numpy() for n in names]
