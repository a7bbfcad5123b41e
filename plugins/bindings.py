"""TensorRT IPluginV3 bindings for the three custom ops, through the Python plugin API that tensorrt
and tensorrt_rtx share.

Each op (plugins/<op>/binding.py) is described by an `OpSpec` (plugins/opspec.py): its ONNX attributes (declared in the
creator's `field_names`, since the parser forwards only declared attributes), the output shapes and
dtypes, the dtype combinations it supports, its workspace, and `enqueue`, which calls the op's C
launch function in the kernel library (plugins/build.py) on TensorRT's stream. The parser finds the
creators by op name (namespace "", version "1") when it meets a com.microsoft node of that name.

Python plugins run in the Python process that builds or runs the engine: register them with
`register(trt)` before parsing or deserialising. `build` and the engine runtime no longer do: they
load the C++ plugin library (plugins/cpp/, libqwen3next_trt_plugins.so), which C++ hosts (Triton's
TensorRT backend, trtexec) can load too. These OpSpecs stay as the reference its CPU tests compare it
with (tests/test_cpp_plugins.py). Never register both in one process: TensorRT refuses a creator
name twice.
"""

from __future__ import annotations

import ctypes
from typing import Callable

import numpy as np

from qwen3next_trt.errors import InputError

from .causal_conv.binding import SPEC as CAUSAL_CONV
from .linear_attention.binding import SPEC as LINEAR_ATTENTION
from .moe.binding import SPEC as MOE
from .opspec import Field, OpSpec

PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = ""


def _field_to_trt(trt, f: Field, value):
    if f.kind == "int":
        return trt.PluginField(f.name, np.array([value], np.int32), trt.PluginFieldType.INT32)
    if f.kind == "float":
        return trt.PluginField(f.name, np.array([value], np.float32), trt.PluginFieldType.FLOAT32)
    return trt.PluginField(f.name, np.frombuffer(str(value).encode() + b"\0", np.int8), trt.PluginFieldType.CHAR)


def _field_from_trt(f: Field, data):
    arr = np.asarray(data)
    if f.kind == "int":
        return int(arr.reshape(-1)[0])
    if f.kind == "float":
        return float(arr.reshape(-1)[0])
    return bytes(arr.astype(np.uint8).tobytes()).split(b"\0", 1)[0].decode()


def make_creator(trt, spec: OpSpec, library: Callable[[], ctypes.CDLL]):
    """A plugin creator class for `spec` bound to the given tensorrt / tensorrt_rtx module."""

    class Plugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, values: dict):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name, self.plugin_namespace, self.plugin_version = spec.name, PLUGIN_NAMESPACE, PLUGIN_VERSION
            self.num_outputs = spec.num_outputs
            self.values = values

        def get_capability_interface(self, _type):
            return self

        def clone(self):
            return Plugin(dict(self.values))

        def get_fields_to_serialize(self):
            return trt.PluginFieldCollection([_field_to_trt(trt, f, self.values[f.name]) for f in spec.fields])

        def get_output_data_types(self, input_types):
            return spec.output_dtypes(list(input_types), trt)

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            return spec.output_shapes(self.values, list(inputs), expr_builder, trt)

        def supports_format_combination(self, pos, in_out, num_inputs):
            if in_out[pos].desc.format != trt.TensorFormat.LINEAR:
                return False
            return bool(spec.supports(pos, [d.desc for d in in_out], num_inputs, trt))

        def configure_plugin(self, inputs, outputs):
            pass

        def on_shape_change(self, inputs, outputs):
            pass

        def get_workspace_size(self, inputs, outputs):
            return int(spec.workspace(self.values, list(inputs), list(outputs)))

        def get_valid_tactics(self):
            return []

        def set_tactic(self, tactic):
            pass

        def attach_to_context(self, context):
            return self.clone()

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            rc = spec.enqueue(self.values, list(input_desc), list(output_desc), list(inputs), list(outputs),
                              workspace, stream, library(), trt)
            if rc != 0:
                raise RuntimeError(f"plugin {spec.name}: kernel returned error code {rc}")

    class Creator(trt.IPluginCreatorV3One):
        def __init__(self):
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_namespace, self.plugin_version = spec.name, PLUGIN_NAMESPACE, PLUGIN_VERSION
            self.field_names = trt.PluginFieldCollection([_field_to_trt(trt, f, f.default) for f in spec.fields])

        def create_plugin(self, name, fc, phase):
            values = {f.name: f.default for f in spec.fields}
            by_name = {f.name: f for f in spec.fields}
            for item in fc:
                if item.name in by_name:
                    values[item.name] = _field_from_trt(by_name[item.name], item.data)
            problems = [f"{f.name}: {msg}" for f in spec.fields if f.check and (msg := f.check(values[f.name]))]
            if (msg := spec.validate(values)) is not None:
                problems.append(msg)
            if problems:
                raise InputError(f"node {name!r}: plugin {spec.name}: " + "; ".join(problems))
            return Plugin(values)

    return Creator


_REGISTERED: dict[str, list] = {}


def _load_library():
    # Only enqueue (on a GPU) and workspace sizing need the compiled kernels.
    from .torch_ops import load_library

    return load_library()


def op_specs() -> list[OpSpec]:
    return [CAUSAL_CONV, LINEAR_ATTENTION, MOE]


def register(trt_module, library: Callable[[], ctypes.CDLL] | None = None) -> list[str]:
    """Register the creators with the module's plugin registry (once per process and module)."""
    key = trt_module.__name__
    if key in _REGISTERED:
        return [c.name for c in _REGISTERED[key]]
    library = library or _load_library
    registry = trt_module.get_plugin_registry()
    creators = [make_creator(trt_module, spec, library)() for spec in op_specs()]
    for c in creators:
        registry.register_creator(c, PLUGIN_NAMESPACE)
    _REGISTERED[key] = creators  # the registry does not keep Python objects alive
    return [c.name for c in creators]
