"""What each op's binding (plugins/<op>/binding.py) declares to the TensorRT Python bindings
(plugins/bindings.py): its attributes, output shapes and dtypes, supported formats, workspace and enqueue,
and the small helpers those declarations share. Imports nothing of the project's plugins, so the op
bindings and the binding machinery do not import each other."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Field:
    name: str
    kind: str  # "int", "float", "str"
    default: object
    check: Callable | None = None  # value -> error text or None


@dataclass
class OpSpec:
    name: str
    num_outputs: int
    fields: list[Field]
    # (fields, input dims exprs, expr builder, trt) -> list of output DimsExprs
    output_shapes: Callable
    # (input dtypes, trt) -> output dtypes
    output_dtypes: Callable
    # (pos, descs, num_inputs, trt) -> bool
    supports: Callable
    # (fields, input PluginTensorDescs, output descs, input ptrs, output ptrs, workspace ptr, stream, lib, trt) -> int
    enqueue: Callable
    # (fields, input DynamicPluginTensorDescs, output descs) -> bytes
    workspace: Callable = field(default=lambda f, i, o: 0)
    # (fields) -> error text or None: attribute checks that need several fields
    validate: Callable = field(default=lambda f: None)


DTYPE_CODES = {"FLOAT": 0, "HALF": 1, "BF16": 2}


def dtype_code(trt, dtype) -> int:
    for name, code in DTYPE_CODES.items():
        if dtype == getattr(trt.DataType, name):
            return code
    raise RuntimeError(f"unsupported dtype {dtype}")


def float_types(trt):
    return (trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.BF16)


def dims(desc) -> list[int]:
    return [int(d) for d in desc.dims]


def ptr(x) -> ctypes.c_void_p:
    return ctypes.c_void_p(int(x)) if x else ctypes.c_void_p(0)
