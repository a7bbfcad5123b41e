"""polygraphy runners for the validator: the PyTorch reference, and any session (sessions.py) whose
float8 key/value outputs come back as values."""

from __future__ import annotations

import time

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata
from polygraphy.datatype import DataType

from qwen3next_trt.export.manifest import Port
from qwen3next_trt.sessions import host_dtype

from .reference import ReferencePart, dequantize_kv


def input_metadata(ports: list[Port]) -> TensorMetadata:
    """polygraphy's view of a graph's inputs (it feeds each runner only the inputs listed here)."""
    meta = TensorMetadata()
    for p in ports:
        meta.add(p.name, dtype=DataType.from_dtype(np.dtype(host_dtype(p.dtype))),
                 shape=[d if isinstance(d, int) else None for d in p.shape])
    return meta


class _Runner(BaseRunner):
    """A runner over a callable feed -> {output: array}, with the graph's inputs as its metadata."""

    def __init__(self, call, inputs: list[Port], name: str, prefix: str):
        super().__init__(name=name, prefix=prefix)
        self.call, self.inputs = call, inputs

    def activate_impl(self):
        pass

    def get_input_metadata_impl(self):
        return input_metadata(self.inputs)

    def infer_impl(self, feed_dict):
        start = time.time()
        out = self.call(feed_dict)
        self.inference_time = time.time() - start  # polygraphy sums these
        return out

    def deactivate_impl(self):
        pass


def reference_runner(part: ReferencePart, name: str = "pytorch") -> BaseRunner:
    return _Runner(part, part.record.inputs, name, "pytorch-reference")


class DequantizedKV:
    """A session whose float8 key/value outputs (uint8 bits) come back as float32 values (bits x
    scale), the form the reference produces, so both are compared as numbers."""

    def __init__(self, session, output_names: list[str], scales: dict[str, float]):
        self.session, self.names, self.scales = session, output_names, scales

    def run(self, names, feed):
        outs = self.session.run(names, feed)
        return [dequantize_kv(o, self.scales[n]) if n in self.scales else o for n, o in zip(self.names, outs)]


def session_runner(session, record, kv_scales: dict[str, float], name: str) -> BaseRunner:
    """A runner over anything with `run(None, feeds)` (a TensorRT engine, an ONNX Runtime session)."""
    wrapped = DequantizedKV(session, record.output_names, kv_scales)
    return _Runner(lambda feed: dict(zip(record.output_names, wrapped.run(None, feed))), record.inputs, name, "session")
