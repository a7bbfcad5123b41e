"""engines/fold.py: the FP8 experts reach the MoE plugin as the checkpoint's bytes and scales.

Oracles: the official-layout FP8 checkpoint the test writes (its gate / up / down bytes and
weight_scale_inv tensors), ONNX Runtime's DequantizeLinear over the exported graph's own nodes, and
TensorRT-RTX's parse + build of the folded graph (the layer list it reports).
"""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qwen3next_trt.cli import main
from qwen3next_trt.engines.fold import fold_fp8_experts, onnx_for_parser
from qwen3next_trt.errors import InputError
from qwen3next_trt.export.exporter import Exporter
from qwen3next_trt.model.fp8 import dequantize_fc1

from test_fp8 import write_official_fp8_checkpoint


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """An official-layout FP8 checkpoint and its fp32 (layers 0, 3) and fp16 (layer 0) FP8 exports."""
    root = tmp_path_factory.mktemp("fold")
    tensors = write_official_fp8_checkpoint(root / "ckpt")
    exports = {}
    for dtype, layers in (("fp32", "0,3"), ("fp16", "0")):
        exports[dtype] = root / dtype
        Exporter(str(root / "ckpt"), exports[dtype], dtype=dtype, layers=layers, precision="fp8", progress=lambda m: None).run()
    return tensors, exports


def _folded(path: Path) -> tuple[onnx.ModelProto, dict]:
    data, record = onnx_for_parser(path)
    return onnx.load_from_string(data), record


def _bytes(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.uint8).numpy()


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_the_moe_node_takes_the_checkpoints_fp8_bytes_and_scales(official, dtype):
    tensors, exports = official
    path = exports[dtype] / "layer_00.decode.onnx"
    model, record = _folded(path)
    (moe,) = [n for n in model.graph.node if n.op_type == "MoE"]
    assert record["moe_fp8"] == [{"node": moe.name, "folded": True, "fc1": moe.input[2], "fc2": moe.input[4],
                                  "fc1_block_scale": [16, 2, 1], "fc2_block_scale": [16, 1, 1]}]
    assert len(moe.input) == 8
    init = {t.name: t for t in model.graph.initializer}
    value = lambda name: numpy_helper.to_array(init[name], base_dir=str(path.parent))  # noqa: E731
    E = 16
    p = "model.layers.0.mlp.experts.{}.{}.weight"
    gate = [tensors[p.format(e, "gate_proj")] for e in range(E)]
    up = [tensors[p.format(e, "up_proj")] for e in range(E)]
    down = [tensors[p.format(e, "down_proj")] for e in range(E)]
    scale = lambda e, kind: tensors[p.format(e, kind) + "_scale_inv"]  # noqa: E731
    # bytes: interleaved gate/up rows, the checkpoint's values untouched (no re-quantisation)
    fc1 = np.stack([np.stack([_bytes(g), _bytes(u)], 1).reshape(-1, g.shape[1]) for g, u in zip(gate, up)])
    assert init[moe.input[2]].data_type == TensorProto.FLOAT8E4M3FN
    assert np.array_equal(value(moe.input[2]).view(np.uint8), fc1)
    assert np.array_equal(value(moe.input[4]).view(np.uint8), np.stack([_bytes(d) for d in down]))
    # scales: float32, gate blocks above up blocks, bit for bit (also from a 16-bit export)
    s1, s2 = value(moe.input[6]), value(moe.input[7])
    assert s1.dtype == s2.dtype == np.float32
    assert np.array_equal(s1, np.stack([torch.cat([scale(e, "gate_proj"), scale(e, "up_proj")]).numpy() for e in range(E)]))
    assert np.array_equal(s2, np.stack([scale(e, "down_proj").numpy() for e in range(E)]))
    # nothing dequantises the experts any more: every DequantizeLinear left feeds a projection
    assert not [n for n in model.graph.node if n.op_type in ("DequantizeLinear", "Cast") and set(n.output) & set(moe.input)]


def test_folded_scales_dequantise_as_onnxruntime_does(official):
    """The kernels' reading of the folded form (model/fp8.dequantize_fc1 and plain 128x128 blocks) equals
    what ONNX Runtime's DequantizeLinear makes of the exported graph's own nodes."""
    import onnxruntime as ort

    _, exports = official
    path = exports["fp32"] / "layer_03.prefill.onnx"
    original = onnx.load(str(path))  # with its external data
    (moe,) = [n for n in original.graph.node if n.op_type == "MoE"]
    dq = [n for n in original.graph.node if n.output[0] in (moe.input[2], moe.input[4])]
    used = {i for n in dq for i in n.input}
    graph = helper.make_graph(dq, "dq", [], [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None) for n in dq],
                              [t for t in original.graph.initializer if t.name in used])
    oracle = ort.InferenceSession(helper.make_model(graph, opset_imports=original.opset_import, ir_version=original.ir_version).SerializeToString(),
                                  providers=["CPUExecutionProvider"]).run(None, {})
    folded, _ = _folded(path)
    init = {t.name: t for t in folded.graph.initializer}
    (fmoe,) = [n for n in folded.graph.node if n.op_type == "MoE"]
    value = lambda name: numpy_helper.to_array(init[name], base_dir=str(path.parent))  # noqa: E731
    fp8 = lambda name: torch.from_numpy(value(name).view(np.uint8).copy()).view(torch.float8_e4m3fn)  # noqa: E731
    fc1 = dequantize_fc1(fp8(fmoe.input[2]), torch.from_numpy(value(fmoe.input[6])))
    fc2_fp8, s2 = fp8(fmoe.input[4]), torch.from_numpy(value(fmoe.input[7]))
    fc2 = fc2_fp8.float() * s2.repeat_interleave(128, 1)[:, : fc2_fp8.shape[1]].repeat_interleave(128, 2)[..., : fc2_fp8.shape[2]]
    assert torch.equal(fc1, torch.from_numpy(oracle[0])) and torch.equal(fc2, torch.from_numpy(oracle[1]))


def test_what_cannot_be_folded_stays_dequantised_and_says_why(official, tmp_path):
    out = tmp_path / "channel"
    Exporter("tiny", out, layers="0", precision="fp8", fp8_scheme="channel", progress=lambda m: None).run()
    model, record = _folded(out / "layer_00.decode.onnx")
    (entry,) = record["moe_fp8"]
    assert not entry["folded"] and "per-channel" in entry["why"]
    (moe,) = [n for n in model.graph.node if n.op_type == "MoE"]
    assert len(moe.input) == 6  # the float form, behind its DequantizeLinear nodes

    path = official[1]["fp32"] / "layer_00.prefill.onnx"
    model = onnx.load(str(path), load_external_data=False)
    bias = next(t for t in model.graph.initializer if t.name.endswith("fc1_bias"))
    model.graph.initializer.remove(bias)
    model.graph.initializer.append(numpy_helper.from_array(np.ones([d for d in bias.dims], np.float32), bias.name))
    (entry,) = fold_fp8_experts(model, path.parent, path)
    assert not entry["folded"] and "not zero" in entry["why"]


def test_scales_of_the_wrong_shape_are_one_clear_error(official):
    _, exports = official
    path = exports["fp32"] / "layer_00.prefill.onnx"
    model = onnx.load(str(path), load_external_data=False)
    scale = next(t for t in model.graph.initializer if t.name.endswith("fc2_scale"))
    scale.dims[1] -= 1
    with pytest.raises(InputError, match=r"node 'node_moe': fc2 scale '.*fc2_scale' has shape \[16, 127, 1\].*expected \[16, 128, 1\]"):
        fold_fp8_experts(model, path.parent, path)


def test_fp8_experts_without_scales_are_one_clear_error(official):
    _, exports = official
    path = exports["fp32"] / "layer_00.prefill.onnx"
    model = onnx.load(str(path), load_external_data=False)
    (moe,) = [n for n in model.graph.node if n.op_type == "MoE"]
    dq = next(n for n in model.graph.node if n.output[0] == moe.input[2])
    moe.input[2] = dq.input[0]  # the float8 initializer itself, its scale dropped on the way
    with pytest.raises(InputError, match=r"node 'node_moe': input 2 \('experts_fc1'\) is float8 without scales"):
        fold_fp8_experts(model, path.parent, path)


def test_fp8_engines_feed_fp8_experts_to_the_moe_plugin(official, tmp_path):
    """`build` parses the folded graph: TensorRT-RTX's layer list has the MoE plugin reading float8
    constants and float32 block scales, with no DEQUANTIZE layer in front of it."""
    pytest.importorskip("tensorrt_rtx")
    _, exports = official
    out = tmp_path / "eng"
    assert main(["build", "--onnx", str(exports["fp32"]), "--out", str(out), "--graphs", "layer_00,layer_03"]) == 0
    metas = [json.loads(p.read_text()) for p in sorted(out.glob("*.engine.json"))]
    assert metas
    for meta in metas:
        (moe,) = [lay for lay in meta["layers"] if lay.get("plugin") == "MoE"]
        dtypes = [t["dtype"] for t in moe["inputs"]]
        assert dtypes == ["FLOAT", "FLOAT", "FP8", "FLOAT", "FP8", "FLOAT", "FLOAT", "FLOAT"], moe
        dequantized = {lay["name"] for lay in meta["layers"] if lay["type"] == "DEQUANTIZE"}
        assert not any(t["name"].startswith(tuple(dequantized)) for t in moe["inputs"])
        assert [r["folded"] for r in meta["rewrites"]["moe_fp8"]] == [True]


# ------------------------------------------------------------------------------------------------
# FP8 x FP8 projections (static activation scales): split along K into per-block GEMMs


@pytest.fixture(scope="module")
def wide_static(tmp_path_factory):
    """tiny with hidden 256 (two 128-column blocks along K for most projections), FP8 weights and static
    FP8 activations: the form TensorRT-RTX failed to build before the split (NOTES.md)."""
    root = tmp_path_factory.mktemp("wide")
    config = json.loads((Path(__file__).parents[1] / "model" / "presets" / "tiny.json").read_text())
    (root / "config").mkdir()
    (root / "config" / "config.json").write_text(json.dumps({**config, "hidden_size": 256}))
    assert main(["random-checkpoint", "--model", str(root / "config"), "--out", str(root / "ckpt"), "--seed", "5"]) == 0
    Exporter(str(root / "ckpt"), root / "onnx", layers="0,3", precision="fp8", activations="fp8", calib=2, calib_seq=64,
             progress=lambda m: None).run()
    return root / "onnx"


def test_split_k_gemms_compute_what_the_exported_graph_computes(wide_static):
    """ONNX Runtime runs the exported layer and the same layer with its FP8 GEMMs split per K block."""
    import onnxruntime as ort

    from qwen3next_trt.engines.fold import split_fp8_gemms

    path = wide_static / "layer_00.decode.onnx"
    original = onnx.load(str(path))
    split = onnx.load(str(path))
    records = split_fp8_gemms(split, path.parent, path)
    assert records and all(r["k_blocks"] == -(-r["shape"][1] // 128) > 1 for r in records)
    assert {r["weight"] for r in records} >= {"layer.linear_attn.in_proj_qkvz.weight_fp8"}
    left = [n for n in split.graph.node if n.op_type == "DequantizeLinear" and any(a.name == "block_size" for a in n.attribute)]
    weights = {t.name: t for t in split.graph.initializer}
    assert not [n.name for n in left if n.input[0] in weights and len(weights[n.input[0]].dims) == 2 and weights[n.input[0]].dims[1] > 128]

    g = torch.Generator().manual_seed(0)
    feeds = {"hidden": torch.randn(2, 1, 256, generator=g).numpy()}
    for i in original.graph.input[1:]:
        dims = [2 if d.dim_param else d.dim_value for d in i.type.tensor_type.shape.dim]
        feeds[i.name] = (0.5 * torch.randn(*dims, generator=g)).numpy()
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)  # noqa: E731
    for want, got in zip(run(original), run(split)):
        assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_static_fp8_activation_engines_build_with_fp8_gemms(wide_static, tmp_path):
    pytest.importorskip("tensorrt_rtx")
    out = tmp_path / "eng"
    assert main(["build", "--onnx", str(wide_static), "--out", str(out), "--graphs", "layer_00,layer_03"]) == 0
    for meta in [json.loads(p.read_text()) for p in sorted(out.glob("*.engine.json"))]:
        split = meta["rewrites"]["fp8_gemms_split_k"]
        assert split and all(r["k_blocks"] == 2 for r in split)
        (moe,) = [lay for lay in meta["layers"] if lay.get("plugin") == "MoE"]
        assert [t["dtype"] for t in moe["inputs"]][2:5:2] == ["FP8", "FP8"]
