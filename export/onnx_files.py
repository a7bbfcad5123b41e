"""ONNX files on disk: graphs that share one external weights file, checks, and I/O summaries.

The prefill and decode graphs of a layer hold the same weights. Each is first saved by the exporter
with its own external data; `share_weights` then writes every distinct tensor once into a common
`<group>.weights` file (deduplicated by content, 64-byte aligned) and points all the graphs there.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path

import onnx
from onnx import TensorProto

IR_VERSION = 10  # onnxruntime-gpu 1.31 refuses newer IR versions (PLATFORM.md)
ALIGN = 64


def _external_info(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _read_external(t: TensorProto, base: Path) -> bytes:
    info = _external_info(t)
    with open(base / info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        return f.read(int(info["length"]))


def share_weights(graph_paths: list[Path], weights_name: str) -> dict:
    """Rewrite the graphs (each saved with its own `<graph>.data`) to one `weights_name` beside them."""
    base = graph_paths[0].parent
    weights_tmp = base / (weights_name + ".tmp")
    offsets: dict[str, tuple[int, int]] = {}  # content hash -> (offset, length)
    protos = []
    with open(weights_tmp, "wb") as out:
        for path in graph_paths:
            model = onnx.load(str(path), load_external_data=False)
            for t in model.graph.initializer:
                if t.data_location != TensorProto.EXTERNAL:
                    continue
                data = _read_external(t, base)
                key = hashlib.sha256(data).hexdigest() + str(t.data_type)
                if key not in offsets:
                    pad = (-out.tell()) % ALIGN
                    out.write(b"\0" * pad)
                    offsets[key] = (out.tell(), len(data))
                    out.write(data)
                offset, length = offsets[key]
                del t.external_data[:]
                for k, v in (("location", weights_name), ("offset", str(offset)), ("length", str(length))):
                    t.external_data.add(key=k, value=v)
            model.ir_version = IR_VERSION
            protos.append((path, model))
        size = out.tell()
    os.replace(weights_tmp, base / weights_name)
    for path, model in protos:
        tmp = path.with_suffix(".onnx.tmp")
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
        (base / (path.name + ".data")).unlink(missing_ok=True)
    return {"file": weights_name, "bytes": size, "tensors": len(offsets)}


def onnx_dtype_name(elem_type: int) -> str:
    """float32, float16, bfloat16, int64, float8e4m3fn, ... (numpy-style names)."""
    name = TensorProto.DataType.Name(elem_type).lower()
    return {"float": "float32", "double": "float64"}.get(name, name)


def check_graph(path: Path):
    """onnx.checker with full shape inference (by path: works past 2 GB)."""
    onnx.checker.check_model(str(path), full_check=True)


def describe_graph(path: Path) -> dict:
    """Node counts and the graph's actual inputs/outputs (name, dtype, shape) as ONNX sees them."""
    model = onnx.load(str(path), load_external_data=False)

    def port(v):
        tt = v.type.tensor_type
        dims = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in tt.shape.dim]
        return {"name": v.name, "dtype": onnx_dtype_name(tt.elem_type), "shape": dims}

    ops = Counter((n.domain or "ai.onnx", n.op_type) for n in model.graph.node)
    return {
        "nodes": len(model.graph.node),
        "ops": {f"{d}::{o}" if d != "ai.onnx" else o: c for (d, o), c in sorted(ops.items())},
        "inputs": [port(v) for v in model.graph.input],
        "outputs": [port(v) for v in model.graph.output],
        "opsets": {i.domain or "ai.onnx": i.version for i in model.opset_import},
        "initializers": len(model.graph.initializer),
    }
