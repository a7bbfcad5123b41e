"""Build-time rewrites of an exported graph into the forms TensorRT (and its plugins) take.

The ONNX files stay what ONNX Runtime runs (the CPU oracle): FP8 experts are float8e4m3fn
initializers dequantised by a blocked `DequantizeLinear` in front of the `com.microsoft::MoE` node.
TensorRT would run that DequantizeLinear as a layer writing every expert of the layer in float on
every step (512 x 3 x 2048 x 512 weights at 80B). `onnx_for_parser` gives the parser the same graph
with the MoE node taking the FP8 bytes and their 128x128 block scales directly (the plugin's 8-input
FP8 form, plugins/moe/README.md), as TensorRT folds Q/DQ into its own GEMMs. And with static FP8
activation scales, every FP8 projection whose weight has several 128-column blocks is split along K
into FP8 x FP8 GEMMs TensorRT can build (`split_fp8_gemms`).

Plain `onnx` protobuf edits, not onnx-graphsurgeon: graphsurgeon has no numpy type for float8 and
casts such a constant to another type when its values are touched; here the FP8 initializers are
never read, they keep their external-data references into the export's weights file, and the
parser reads the bytes from there (`parser.parse(bytes, path)` resolves them beside `path`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from qwen3next_trt.errors import InputError

MOE_DOMAIN = "com.microsoft"
KERNEL_BLOCK = 128  # the FP8 MoE kernels' block: 128 x 128 (the official checkpoint's)
FC1, FC1_BIAS, FC2, FC2_BIAS = 2, 3, 4, 5  # MoE inputs (ONNX Runtime contrib schema)


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


class _Graph:
    def __init__(self, model: onnx.ModelProto, base_dir: Path, path: Path):
        self.g, self.base_dir, self.path = model.graph, base_dir, path
        self.init = {t.name: t for t in self.g.initializer}
        self.producer = {o: n for n in self.g.node for o in n.output}

    def consumers(self, name: str) -> list:
        return [n for n in self.g.node if name in n.input]

    def array(self, name: str) -> np.ndarray:
        try:
            return numpy_helper.to_array(self.init[name], base_dir=str(self.base_dir))
        except (OSError, ValueError, onnx.checker.ValidationError) as e:
            raise InputError(f"{self.path}: initializer {name!r}: cannot read its data ({e})") from None


def _set_nodes(G: _Graph, nodes: list) -> None:
    """Replace the graph's nodes by `nodes` (a list in topological order, old and new protos mixed)."""
    kept = [onnx.NodeProto.FromString(n.SerializeToString()) for n in nodes]
    del G.g.node[:]
    G.g.node.extend(kept)


def _fp8_source(G: _Graph, moe, slot: int):
    """([DequantizeLinear node, optional Cast], fp8 initializer, scale initializer, block) feeding MoE input
    `slot`, or None. 16-bit exports keep the scales float32 and Cast the dequantised experts."""
    chain, dq = [], G.producer.get(moe.input[slot])
    if dq is not None and dq.op_type == "Cast" and dq.domain in ("", "ai.onnx"):
        chain, dq = [dq], G.producer.get(dq.input[0])
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx"):
        return None
    w, s = (G.init.get(dq.input[i]) if len(dq.input) > i else None for i in (0, 1))
    if w is None or w.data_type != onnx.TensorProto.FLOAT8E4M3FN or s is None:
        return None
    return [dq, *chain], w, s, _attr(dq, "block_size", 0)


def _why_not(G: _Graph, moe, fc1, fc2) -> str | None:
    """Why this MoE's FP8 experts cannot take the plugin's FP8 form (None: they can)."""
    if fc1 is None or fc2 is None:
        return "fc1 and fc2 are not both float8 initializers behind DequantizeLinear"
    (_, w1, s1, b1), (_, w2, s2, b2) = fc1, fc2
    E, two_i, H = w1.dims
    I = two_i // 2
    if list(w2.dims) != [E, H, I]:
        raise InputError(f"{G.path}: node {moe.name!r}: fc2 float8 weights {list(w2.dims)}, expected [{E}, {H}, {I}] for fc1 {list(w1.dims)}")
    for name, (w, s, b) in (("fc1", (w1, s1, b1)), ("fc2", (w2, s2, b2))):
        want = [*w.dims[:2], -(-w.dims[2] // b)] if b else None
        if want is None or list(s.dims) != want:
            raise InputError(f"{G.path}: node {moe.name!r}: {name} scale {s.name!r} has shape {list(s.dims)} "
                             f"(block_size {b}), expected {want or '[E, rows, ceil(cols / block_size)]'}")
    if b1 != KERNEL_BLOCK or b2 != KERNEL_BLOCK:
        return f"column blocks of {b1} / {b2}: the FP8 MoE kernels take 128 x 128 blocks (per-channel scales have none)"
    for slot in (FC1_BIAS, FC2_BIAS):
        if len(moe.input) > slot and moe.input[slot]:
            if moe.input[slot] not in G.init:
                return f"bias {moe.input[slot]!r} is computed in the graph (the FP8 kernels have no bias)"
            if np.any(G.array(moe.input[slot]).astype(np.float32) != 0):
                return f"bias {moe.input[slot]!r} is not zero (the FP8 kernels have no bias)"
    return None


def _block_scales(G: _Graph, moe, fc1, fc2) -> tuple[np.ndarray, np.ndarray] | str:
    import torch

    from qwen3next_trt.model.fp8 import fc1_block_scales, row_blocks

    rows1 = torch.from_numpy(G.array(fc1[2].name).astype(np.float32))
    rows2 = torch.from_numpy(G.array(fc2[2].name).astype(np.float32))
    s1, s2 = fc1_block_scales(rows1, KERNEL_BLOCK), row_blocks(rows2, KERNEL_BLOCK)
    if s1 is None or s2 is None:
        return "per-row scales that differ inside a 128-row block (not the checkpoint's 128 x 128 form)"
    return s1.numpy(), s2.numpy()


def fold_fp8_experts(model: onnx.ModelProto, base_dir: Path, path: Path) -> list[dict]:
    """Rewrite in place every MoE node fed by DequantizeLinear'd FP8 experts into the plugin's FP8
    form; returns one record per MoE node (folded, or why not)."""
    G = _Graph(model, base_dir, path)
    records = []
    for moe in [n for n in G.g.node if n.op_type == "MoE" and n.domain == MOE_DOMAIN]:
        fc1, fc2 = (_fp8_source(G, moe, s) if len(moe.input) > s else None for s in (FC1, FC2))
        for slot in (FC1, FC2):
            raw = G.init.get(moe.input[slot]) if len(moe.input) > slot else None
            if raw is not None and raw.data_type == onnx.TensorProto.FLOAT8E4M3FN:
                raise InputError(f"{G.path}: node {moe.name!r}: input {slot} ({raw.name!r}) is float8 without scales: "
                                 "expected DequantizeLinear(float8 weights, float32 block scales) -> MoE, as `export --precision fp8` writes")
        if fc1 is None and fc2 is None:
            continue  # float experts: nothing to fold
        why = _why_not(G, moe, fc1, fc2)
        scales = _block_scales(G, moe, fc1, fc2) if why is None else why
        if isinstance(scales, str):
            records.append({"node": moe.name, "folded": False, "why": scales})
            continue
        names = []
        for label, s in zip(("fc1", "fc2"), scales):
            name = f"{moe.name}.{label}_block_scale"
            G.g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(s, dtype=np.float32), name))
            names.append(name)
        inputs = list(moe.input) + [""] * (6 - len(moe.input))
        inputs[FC1], inputs[FC2] = fc1[1].name, fc2[1].name
        del moe.input[:]
        moe.input.extend(inputs[:6] + names)
        for chain, _, scale, _ in (fc1, fc2):
            for node in reversed(chain):  # Cast first, then the DequantizeLinear it read
                if not G.consumers(node.output[0]):
                    G.g.node.remove(node)
            if not G.consumers(scale.name):  # the per-row scales are replaced by the block scales
                G.g.initializer.remove(scale)
        records.append({"node": moe.name, "folded": True, "fc1": fc1[1].name, "fc2": fc2[1].name,
                        "fc1_block_scale": list(scales[0].shape), "fc2_block_scale": list(scales[1].shape)})
    return records


def _only(G: _Graph, name: str, op: str):
    """The node of type `op` producing `name`, or None."""
    n = G.producer.get(name)
    return n if n is not None and n.op_type == op and n.domain in ("", "ai.onnx") else None


def _fp8_weight(G: _Graph, gemm):
    """(chain of nodes to drop, fp8 initializer [N, K], per-row scale initializer [N, nb], block) when the
    GEMM's B input is DequantizeLinear(float8 weight, blocked along K) read as W^T, else None."""
    if gemm.op_type == "Gemm":
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gemm.attribute}
        if attrs.get("transA", 0) != 0 or attrs.get("transB", 0) != 1 or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            return None
        chain, dq = [], _only(G, gemm.input[1], "DequantizeLinear")
    else:
        t = _only(G, gemm.input[1], "Transpose")
        if t is None or list(_attr(t, "perm", [])) != [1, 0]:
            return None
        chain, dq = [t], _only(G, t.input[0], "DequantizeLinear")
    if dq is None or len(dq.input) < 2:
        return None
    w, s = G.init.get(dq.input[0]), G.init.get(dq.input[1])
    block = _attr(dq, "block_size", 0)
    if w is None or s is None or w.data_type != onnx.TensorProto.FLOAT8E4M3FN or len(w.dims) != 2 or not block:
        return None
    if _attr(dq, "axis", 1) not in (-1, 1) or list(s.dims) != [w.dims[0], -(-w.dims[1] // block)]:
        return None
    return [*chain, dq], w, s, block


def split_fp8_gemms(model: onnx.ModelProto, base_dir: Path, path: Path) -> list[dict]:
    """FP8 x FP8 GEMMs that TensorRT can build, with the checkpoint's 128x128 blocks kept exact.

    A GEMM whose activation is quantised (static Q/DQ) and whose FP8 weight has several scale blocks
    along K fails in TensorRT-RTX 1.7's Myelin (`CHECK(is_constant())`, NOTES.md; one block, or per-channel
    weight scales, build). So y = x @ W^T with W = w * s[n, k / B] becomes
    sum over k-blocks b of x[:, b] @ (w[:, b] * s[:, b])^T: one FP8 x FP8 GEMM per block of B columns, each
    weight dequantised per output channel (scale column b), the partial products summed in the
    activation dtype. The same weights and scales, in another grouping."""
    G = _Graph(model, base_dir, path)
    records, nodes = [], list(G.g.node)
    for gemm in [n for n in nodes if n.op_type in ("MatMul", "Gemm") and n.domain in ("", "ai.onnx")]:
        act = _only(G, gemm.input[0], "DequantizeLinear")
        if act is None or _only(G, act.input[0], "QuantizeLinear") is None:
            continue  # weight-only FP8 (or a float GEMM): TensorRT takes it as it is
        found = _fp8_weight(G, gemm)
        if found is None:
            continue
        chain, w, s, block = found
        N, K = w.dims
        nb = -(-K // block)
        if nb == 1:
            continue  # one block along K is a per-channel scale: builds as it is
        weight = G.array(w.name).view(np.uint8)
        scale = G.array(s.name)
        tag = gemm.name or gemm.output[0]
        widths = [min(block, K - b * block) for b in range(nb)]
        new = [onnx.helper.make_node("Split", [gemm.input[0], f"{tag}.k_splits"], [f"{tag}.x{b}" for b in range(nb)],
                                     axis=-1, name=f"{tag}.split_k")]
        G.g.initializer.append(numpy_helper.from_array(np.array(widths, np.int64), f"{tag}.k_splits"))
        for b in range(nb):
            wb = onnx.helper.make_tensor(f"{tag}.w{b}", onnx.TensorProto.FLOAT8E4M3FN, [N, widths[b]],
                                         np.ascontiguousarray(weight[:, b * block : b * block + widths[b]]).tobytes(), raw=True)
            G.g.initializer.extend([wb, numpy_helper.from_array(np.ascontiguousarray(scale[:, b]), f"{tag}.s{b}")])
            new += [onnx.helper.make_node("DequantizeLinear", [f"{tag}.w{b}", f"{tag}.s{b}"], [f"{tag}.wd{b}"], axis=0, name=f"{tag}.dq{b}"),
                    onnx.helper.make_node("Transpose", [f"{tag}.wd{b}"], [f"{tag}.wt{b}"], perm=[1, 0], name=f"{tag}.t{b}"),
                    onnx.helper.make_node("MatMul", [f"{tag}.x{b}", f"{tag}.wt{b}"], [f"{tag}.y{b}"], name=f"{tag}.mm{b}")]
        bias = gemm.input[2] if gemm.op_type == "Gemm" and len(gemm.input) > 2 and gemm.input[2] else None
        total = gemm.output[0] if bias is None else f"{tag}.sum"
        new.append(onnx.helper.make_node("Sum", [f"{tag}.y{b}" for b in range(nb)], [total], name=f"{tag}.sum_k"))
        if bias is not None:
            new.append(onnx.helper.make_node("Add", [total, bias], [gemm.output[0]], name=f"{tag}.bias"))
        i = next(i for i, n in enumerate(nodes) if n is gemm)
        nodes[i : i + 1] = new
        records.append({"node": tag, "weight": w.name, "shape": [N, K], "k_blocks": nb})
        read = lambda name: any(name in n.input for n in nodes)  # noqa: E731
        for node in chain:  # Transpose, then the DequantizeLinear it read, then their initializers
            if not read(node.output[0]):
                nodes = [n for n in nodes if n is not node]
        for t in (w, s):
            if not read(t.name):
                G.g.initializer.remove(t)
    if records:  # new nodes in place of each GEMM: the list stays in topological order
        _set_nodes(G, nodes)
    return records


def _load_graph(onnx_path: Path) -> onnx.ModelProto:
    """The graph without its external weights (the rewrites read only what they change)."""
    try:
        return onnx.load(str(onnx_path), load_external_data=False)
    except (OSError, DecodeError) as e:
        raise InputError(f"{onnx_path}: cannot read the ONNX graph ({e})") from None


def onnx_for_parser(onnx_path: Path) -> tuple[bytes, dict]:
    """The model bytes to hand TensorRT's parser (`parser.parse(bytes, str(onnx_path))`: external
    weights are found beside `onnx_path`), and a record of what was rewritten (for the metadata)."""
    onnx_path = Path(onnx_path)
    model = _load_graph(onnx_path)
    moe = fold_fp8_experts(model, onnx_path.parent, onnx_path)
    gemms = split_fp8_gemms(model, onnx_path.parent, onnx_path)
    return model.SerializeToString(), {"moe_fp8": moe, "fp8_gemms_split_k": gemms}


# -- ONNX Runtime's CUDA provider ------------------------------------------------------------------------
# Its CUDA kernels have no blocked FP8 DequantizeLinear (per tensor / per axis only; PLATFORM.md), so an
# FP8 export's projections would be placed on the CPU. It has com.microsoft::MatMulBlockQuantizedFp8Weight
# (CUDA only): Y = A @ (fp8(B[n, k]) * b_scale[n, k / block])^T (+ bias), A float16 / bfloat16, B the FP8
# bytes [N, K] as the export stores them, b_scale float32 [N, ceil(K / block)] (the export's per-row
# scales, widened exactly from 16 bits), and an optional float32 scalar a_scale that quantises A to FP8
# and back inside the node (the same numerics as a static per-tensor QuantizeLinear -> DequantizeLinear).
ORT_FP8_GEMM = "MatMulBlockQuantizedFp8Weight"
ORT_FP8_ACTIVATIONS = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def _static_activation_scale(G: _Graph, gemm):
    """(float input, float32 scalar a_scale) when the GEMM's activation is a static per-tensor FP8
    QuantizeLinear -> DequantizeLinear of one scale and zero point 0, else None."""
    dq = _only(G, gemm.input[0], "DequantizeLinear")
    q = _only(G, dq.input[0], "QuantizeLinear") if dq is not None else None
    if q is None or len(q.input) < 2 or len(dq.input) < 2:
        return None
    scales = [G.init.get(q.input[1]), G.init.get(dq.input[1])]
    if any(s is None or int(np.prod(s.dims)) != 1 for s in scales):
        return None
    qs, ds = (float(G.array(s.name).astype(np.float32).reshape(())) for s in scales)
    for node in (q, dq):
        zp = G.init.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if len(node.input) > 2 and node.input[2] and (zp is None or np.any(G.array(zp.name).view(np.uint8) != 0)):
            return None
    if qs != ds:
        return None
    return q.input[0], np.array(qs, np.float32)


def fp8_gemms_for_ort_cuda(model: onnx.ModelProto, base_dir: Path, path: Path) -> list[dict]:
    """Rewrite in place every 16-bit GEMM whose weight is DequantizeLinear(float8 [N, K], scales blocked
    along K) read as W^T into one MatMulBlockQuantizedFp8Weight node over the same FP8 bytes; a static
    per-tensor activation Q/DQ in front of it becomes the node's a_scale. Returns one record per FP8 GEMM
    (rewritten, or why not)."""
    G = _Graph(model, base_dir, path)
    records, nodes, widened = [], list(G.g.node), {}
    for gemm in [n for n in nodes if n.op_type in ("MatMul", "Gemm") and n.domain in ("", "ai.onnx")]:
        found = _fp8_weight(G, gemm)
        if found is None:
            continue
        chain, w, s, block = found
        tag = gemm.name or gemm.output[0]
        if s.data_type not in ORT_FP8_ACTIVATIONS:
            records.append({"node": tag, "rewritten": False,
                            "why": "float32 activations: MatMulBlockQuantizedFp8Weight takes float16 / bfloat16"})
            continue
        if s.data_type != onnx.TensorProto.FLOAT and s.name not in widened:
            widened[s.name] = f"{s.name}.float32"
            G.g.initializer.append(numpy_helper.from_array(G.array(s.name).astype(np.float32), widened[s.name]))
        static = _static_activation_scale(G, gemm)
        a, a_scale = (gemm.input[0], "") if static is None else (static[0], f"{tag}.a_scale")
        if static is not None:
            G.g.initializer.append(numpy_helper.from_array(static[1], a_scale))
        bias = gemm.input[2] if gemm.op_type == "Gemm" and len(gemm.input) > 2 and gemm.input[2] else None
        out = gemm.output[0] if bias is None else f"{tag}.fp8_gemm"
        new = [onnx.helper.make_node(ORT_FP8_GEMM, [a, w.name, widened.get(s.name, s.name), a_scale], [out],
                                     domain=MOE_DOMAIN, block_size=int(block), name=f"{tag}.fp8_gemm")]
        if bias is not None:  # Gemm's C broadcasts over [M, N] as Add does
            new.append(onnx.helper.make_node("Add", [out, bias], [gemm.output[0]], name=f"{tag}.bias"))
        i = next(i for i, n in enumerate(nodes) if n is gemm)
        nodes[i : i + 1] = new
        records.append({"node": tag, "rewritten": True, "weight": w.name, "shape": list(w.dims), "block_size": int(block),
                        "a_scale": None if static is None else float(static[1])})
    if not any(r["rewritten"] for r in records):
        return records
    read = lambda name: any(name in n.input for n in nodes)  # noqa: E731
    for _ in range(3):  # Transpose, then DequantizeLinear, then an activation Q/DQ pair nobody else reads
        nodes = [n for n in nodes if n.op_type not in ("Transpose", "DequantizeLinear", "QuantizeLinear")
                 or any(read(o) for o in n.output) or any(o in [v.name for v in G.g.output] for o in n.output)]
    for t in list(G.g.initializer):
        if not read(t.name) and (t.name in widened or t.data_type == onnx.TensorProto.FLOAT8E4M3FN):
            G.g.initializer.remove(t)
    _set_nodes(G, nodes)
    if not any(o.domain == MOE_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MOE_DOMAIN, 1))
    return records


ORT_CUDA_CACHE = ".ort-cuda"  # inside the export folder: what the CUDA provider reads instead of FP8 constants


def _dequantised(G: _Graph, w, s, block: int, to: int):
    """fp8 initializer `w` x per-row blocked scales `s` (the export's DequantizeLinear along the last
    axis, model/fp8.py FP8Weight), as the onnx element type `to`: float32 products, rounded once."""
    import torch

    from qwen3next_trt.model.fp8 import FP8Weight

    fp8 = torch.from_numpy(np.array(G.array(w.name).view(np.uint8), copy=True)).view(torch.float8_e4m3fn)
    scale = torch.from_numpy(np.ascontiguousarray(G.array(s.name).astype(np.float32)))
    dtype = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.FLOAT16: torch.float16,
             onnx.TensorProto.BFLOAT16: torch.bfloat16}[to]
    K = fp8.shape[-1]
    rows, row_scales = fp8.reshape(-1, K), scale.reshape(-1, scale.shape[-1])
    out = torch.empty(rows.shape, dtype=dtype)
    for a in range(0, rows.shape[0], 1 << 16):  # rows in slices: an 80B layer's experts are 1.6 G values
        out[a : a + (1 << 16)] = FP8Weight(rows[a : a + (1 << 16)], row_scales[a : a + (1 << 16)], block).dequantize().to(dtype)
    return out.view(fp8.shape).view(torch.int16 if dtype != torch.float32 else torch.int32).numpy()


def materialise_fp8_constants(model: onnx.ModelProto, base_dir: Path, path: Path) -> list[dict]:
    """Every DequantizeLinear of an FP8 constant still in the graph (the experts in front of the MoE node,
    float32 exports' projections), with the Cast behind it, replaced by its result: computed here once and
    kept as external data in `<export>/.ort-cuda/`, shared by the graphs of a layer. The CUDA provider has
    no blocked FP8 DequantizeLinear and no FP8 MoE, so those weights take 2 (16-bit) or 4 (float32) bytes
    each in GPU memory. (ONNX Runtime's own constant folding, with session.disable_quant_qdq=1, did not at 80B sizes on the
    H200: the DequantizeLinear reached the CUDA kernel and failed; a dequantised 80B expert tensor is over
    protobuf's 2 GiB, the likely reason. NOTES.md.)"""
    import hashlib

    G = _Graph(model, base_dir, path)
    records = []
    for dq in [n for n in G.g.node if n.op_type == "DequantizeLinear" and n.domain in ("", "ai.onnx")]:
        w, s = (G.init.get(dq.input[i]) if len(dq.input) > i else None for i in (0, 1))
        if w is None or s is None or w.data_type != onnx.TensorProto.FLOAT8E4M3FN:
            continue
        block, axis = _attr(dq, "block_size", 0), _attr(dq, "axis", 1)
        if not block or axis not in (-1, len(w.dims) - 1) or list(s.dims) != [*w.dims[:-1], -(-w.dims[-1] // block)]:
            raise InputError(f"{path}: node {dq.name!r}: FP8 constant {w.name!r} {list(w.dims)} with scales {list(s.dims)} "
                             f"(axis {axis}, block_size {block}): expected blocks along the last axis, as `export --precision fp8` writes")
        last, to = dq, s.data_type
        users = G.consumers(dq.output[0])
        if len(users) == 1 and users[0].op_type == "Cast" and users[0].domain in ("", "ai.onnx"):
            last, to = users[0], _attr(users[0], "to")
        where = {e.key: e.value for e in w.external_data}
        source = base_dir / where.get("location", path.name)
        st = source.stat() if source.is_file() else None
        # a new export (another weights file) gets other files: the key holds where the bytes come from
        stamp = hashlib.sha256(repr((w.name, sorted(where.items()), s.name, to, block, st and (st.st_size, st.st_mtime_ns))
                                    ).encode()).hexdigest()[:16]
        name = f"{w.name}.{onnx.TensorProto.DataType.Name(to).lower()}"
        rel = f"{ORT_CUDA_CACHE}/{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.{stamp}.bin"
        target = base_dir / rel
        itemsize = {onnx.TensorProto.FLOAT: 4}.get(to, 2)
        size = int(np.prod(w.dims)) * itemsize
        if not (target.is_file() and target.stat().st_size == size):
            data = _dequantised(G, w, s, block, to)
            try:
                target.parent.mkdir(exist_ok=True)
                tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
                data.tofile(tmp)
                os.replace(tmp, target)
            except OSError as e:
                raise InputError(f"{target}: cannot write the dequantised {w.name!r} for ONNX Runtime's CUDA provider ({e}); "
                                 f"the export folder {base_dir} must be writable") from None
        t = onnx.TensorProto(name=name, data_type=to, dims=list(w.dims), data_location=onnx.TensorProto.EXTERNAL)
        for k, v in (("location", rel), ("offset", "0"), ("length", str(size))):
            t.external_data.add(key=k, value=v)
        G.g.initializer.append(t)
        for n in G.g.node:
            for i, x in enumerate(n.input):
                if x == last.output[0]:
                    n.input[i] = name
        for node in (last, dq) if last is not dq else (dq,):
            G.g.node.remove(node)
        for t0 in (w, s):
            if not G.consumers(t0.name):
                G.g.initializer.remove(t0)
        records.append({"node": dq.name, "weight": w.name, "shape": list(w.dims), "as": onnx.TensorProto.DataType.Name(to),
                        "file": rel, "bytes": size})
    return records


def onnx_for_ort_cuda(onnx_path: Path) -> tuple[bytes | None, dict]:
    """The model bytes ONNX Runtime's CUDA provider should load (None: the file as it is, nothing to
    rewrite) and what was rewritten. External weights stay in the export's files: the session loads the
    bytes with `session.model_external_initializers_file_folder_path` set to the export's folder."""
    onnx_path = Path(onnx_path)
    model = _load_graph(onnx_path)
    if not any(t.data_type == onnx.TensorProto.FLOAT8E4M3FN for t in model.graph.initializer):
        return None, {}
    gemms = fp8_gemms_for_ort_cuda(model, onnx_path.parent, onnx_path)
    constants = materialise_fp8_constants(model, onnx_path.parent, onnx_path)
    return model.SerializeToString(), {"fp8_gemms": gemms, "dequantised": constants}
