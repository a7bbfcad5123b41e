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


# -- ONNX Runtime's CUDA provider: FP8 projections as com.microsoft::MatMulBlockQuantizedFp8Weight --------
# The op runs on CUDA only. Here its documented semantics (Y = A @ (fp8(B) * b_scale[n, k / block])^T + bias,
# A quantised to FP8 and back with a_scale when given) are spelled in standard ops, and ONNX Runtime's CPU
# provider runs both that and the export as written: the oracle for how the rewrite wires the FP8 bytes,
# scales, activation scale and bias. The GPU run is validate --backend onnxrt-cuda (NOTES.md).

def _expand_ort_fp8_gemms(model: onnx.ModelProto) -> onnx.ModelProto:
    from qwen3next_trt.engines.fold import ORT_FP8_GEMM

    model = onnx.ModelProto.FromString(model.SerializeToString())
    init = {t.name: t for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type != ORT_FP8_GEMM:
            out.append(n)
            continue
        a, b, s = n.input[:3]
        a_scale = n.input[3] if len(n.input) > 3 else ""
        bias = n.input[4] if len(n.input) > 4 else ""
        assert not bias, "the rewrite adds Gemm's bias after the node"
        block = next(x.i for x in n.attribute if x.name == "block_size")
        assert init[s].data_type == TensorProto.FLOAT and init[b].data_type == TensorProto.FLOAT8E4M3FN
        t = n.name
        dtype = TensorProto.FLOAT16  # the tests' exports are float16
        if a_scale:
            zp = helper.make_tensor(f"{t}.zp", TensorProto.FLOAT8E4M3FN, [], [0.0])
            model.graph.initializer.append(zp)
            out += [helper.make_node("Cast", [a], [f"{t}.a32"], to=TensorProto.FLOAT),
                    helper.make_node("QuantizeLinear", [f"{t}.a32", a_scale, f"{t}.zp"], [f"{t}.aq"]),
                    helper.make_node("DequantizeLinear", [f"{t}.aq", a_scale, f"{t}.zp"], [f"{t}.ad"]),
                    helper.make_node("Cast", [f"{t}.ad"], [f"{t}.a"], to=dtype)]
            a = f"{t}.a"
        out += [helper.make_node("DequantizeLinear", [b, s], [f"{t}.w32"], axis=1, block_size=block),
                helper.make_node("Cast", [f"{t}.w32"], [f"{t}.w"], to=dtype),
                helper.make_node("Transpose", [f"{t}.w"], [f"{t}.wt"], perm=[1, 0]),
                helper.make_node("MatMul", [a, f"{t}.wt"], list(n.output))]
    del model.graph.node[:]
    model.graph.node.extend(out)
    return model


def _cpu_session(model, folder=None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if folder is not None:  # as OrtSession loads rewritten bytes: external data beside the export's graphs
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    return ort.InferenceSession(model if isinstance(model, bytes) else model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def _feeds(model: onnx.ModelProto, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    feeds = {}
    for i in model.graph.input:
        dims = [2 if d.dim_param else d.dim_value for d in i.type.tensor_type.shape.dim]
        np_type = onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
        if np.issubdtype(np_type, np.integer):
            feeds[i.name] = np.zeros(dims, np_type)
        elif np_type == np.bool_:
            feeds[i.name] = np.ones(dims, np.bool_)
        else:
            feeds[i.name] = (0.5 * torch.randn(*dims, generator=g)).numpy().astype(np_type)
    return feeds


def test_ort_cuda_rewrite_keeps_the_fp8_bytes_and_computes_the_export(official):
    """Every FP8 projection of a float16 export becomes MatMulBlockQuantizedFp8Weight over the very FP8
    initializer the export holds (external data untouched), its scales widened exactly; the experts stay
    DequantizeLinear'd, and ONNX Runtime folds them at load under the session's settings."""
    from qwen3next_trt.engines.fold import ORT_FP8_GEMM, onnx_for_ort_cuda

    export = official[1]["fp16"]
    for name in ("layer_00.decode.onnx", "layer_00.prefill.onnx"):
        path = export / name
        raw, records = onnx_for_ort_cuda(path)
        rewritten = onnx.ModelProto.FromString(raw)
        original = onnx.load(str(path), load_external_data=False)
        gemms = records["fp8_gemms"]
        assert gemms and all(r["rewritten"] for r in gemms), gemms
        f8 = {t.name: t for t in original.graph.initializer if t.data_type == TensorProto.FLOAT8E4M3FN}
        new_init = {t.name: t for t in rewritten.graph.initializer}
        nodes = [n for n in rewritten.graph.node if n.op_type == ORT_FP8_GEMM]
        assert len(nodes) == len(gemms)
        for n in nodes:  # the same FP8 initializer, still pointing into the export's weights file
            assert n.input[1] in f8 and new_init[n.input[1]].external_data == f8[n.input[1]].external_data
            dq = next(d for d in original.graph.node if d.op_type == "DequantizeLinear" and d.input[0] == n.input[1])
            widened = numpy_helper.to_array(new_init[n.input[2]])
            assert widened.dtype == np.float32
            assert np.array_equal(widened, numpy_helper.to_array(next(t for t in original.graph.initializer if t.name == dq.input[1]),
                                                                 base_dir=str(export)).astype(np.float32))
        assert len(records["dequantised"]) == 2  # the experts (fc1, fc2)
        assert not [n for n in rewritten.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in f8]

        # the documented semantics, on the CPU, against the export as written
        feeds = _feeds(original)
        want = _cpu_session(onnx.load(str(path))).run(None, feeds)
        got = _cpu_session(_expand_ort_fp8_gemms(rewritten).SerializeToString(), folder=export).run(None, feeds)
        for w, g_, o in zip(want, got, original.graph.output):
            scale = max(1.0, float(np.abs(w.astype(np.float32)).max()))
            assert np.abs(w.astype(np.float32) - g_.astype(np.float32)).max() <= 2e-3 * scale, o.name


def test_fp8_experts_are_dequantised_once_into_the_export_folder(official):
    """What the CUDA provider cannot take in FP8 (the experts) becomes an external-data initializer in
    <export>/.ort-cuda/, equal to ONNX Runtime's own DequantizeLinear [-> Cast] of the export's nodes,
    written once and reused by the next graph of the layer."""
    import onnxruntime as ort

    from qwen3next_trt.engines.fold import ORT_CUDA_CACHE, onnx_for_ort_cuda

    export = official[1]["fp16"]
    path = export / "layer_00.prefill.onnx"
    _, records = onnx_for_ort_cuda(path)
    made = records["dequantised"]
    assert len(made) == 2 and all(r["as"] == "FLOAT16" and r["file"].startswith(ORT_CUDA_CACHE + "/") for r in made)
    stamps = {r["file"]: (export / r["file"]).stat().st_mtime_ns for r in made}
    _, again = onnx_for_ort_cuda(export / "layer_00.decode.onnx")  # the same weights: the same files, not rewritten
    assert {r["file"] for r in again["dequantised"]} == set(stamps)
    assert all((export / f).stat().st_mtime_ns == t for f, t in stamps.items())

    original = onnx.load(str(path), load_external_data=False)
    for r in made:  # the export's own DequantizeLinear -> Cast, run by ONNX Runtime on the CPU
        dq = next(n for n in original.graph.node if n.name == r["node"])
        cast = next(n for n in original.graph.node if n.op_type == "Cast" and n.input[0] == dq.output[0])
        keep = {dq.input[0], dq.input[1]}
        inits = [t for t in original.graph.initializer if t.name in keep]
        graph = helper.make_graph([dq, cast], "dq", [], [helper.make_tensor_value_info(cast.output[0], TensorProto.FLOAT16, None)], inits)
        m = helper.make_model(graph, opset_imports=list(original.opset_import), ir_version=original.ir_version)
        opts = ort.SessionOptions()
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(export))
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        want = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, {})[0]
        got = np.fromfile(export / r["file"], np.float16).reshape(r["shape"])
        assert np.array_equal(want.view(np.uint16), got.view(np.uint16)), r["weight"]


def test_float32_fp8_exports_keep_their_gemms_and_say_why(official):
    from qwen3next_trt.engines.fold import onnx_for_ort_cuda

    raw, records = onnx_for_ort_cuda(official[1]["fp32"] / "layer_00.decode.onnx")
    assert raw is not None and records["fp8_gemms"]
    assert all(not r["rewritten"] and "float32" in r["why"] for r in records["fp8_gemms"])


def test_graphs_without_fp8_load_as_they_are(tmp_path):
    from qwen3next_trt.engines.fold import onnx_for_ort_cuda

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), str(tmp_path / "g.onnx"))
    assert onnx_for_ort_cuda(tmp_path / "g.onnx") == (None, {})


def _static_fp8_gemm_graph(K=200, N=48, bias=True):
    """x (float16) -> static FP8 Q/DQ -> Gemm / MatMul against a blocked FP8 weight (two K blocks, the
    last one partial), as `export --precision fp8 --activations fp8 --dtype fp16` writes them."""
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(N, K, generator=g) * 40).to(torch.float8_e4m3fn)
    s = (torch.rand(N, -(-K // 128), generator=g) * 0.01 + 0.001).half()
    inits = [helper.make_tensor("w", TensorProto.FLOAT8E4M3FN, [N, K], w.view(torch.uint8).numpy().tobytes(), raw=True),
             numpy_helper.from_array(s.numpy(), "s"), numpy_helper.from_array(np.array(0.05, np.float16), "xs"),
             helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0.0]),
             numpy_helper.from_array((torch.randn(N, generator=g) * 0.1).half().numpy(), "b")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "zp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "zp"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "s"], ["wd"], axis=-1, block_size=128),
             helper.make_node("Gemm", ["xd", "wd"] + (["b"] if bias else []), ["y"], transB=1, name="gemm"),
             helper.make_node("Transpose", ["wd"], ["wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt"], ["z"], name="matmul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [3, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [3, N]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT16, [3, N])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_static_activation_qdq_becomes_a_scale_and_gemm_bias_survives(tmp_path):
    from qwen3next_trt.engines.fold import ORT_FP8_GEMM, onnx_for_ort_cuda

    model = _static_fp8_gemm_graph()
    onnx.save(model, str(tmp_path / "g.onnx"))
    raw, records = onnx_for_ort_cuda(tmp_path / "g.onnx")
    by_node = {r["node"]: r for r in records["fp8_gemms"]}
    assert by_node["gemm"]["a_scale"] == pytest.approx(0.05, rel=1e-3) and by_node["matmul"]["a_scale"] is None
    rewritten = onnx.ModelProto.FromString(raw)
    assert [n.op_type for n in rewritten.graph.node].count(ORT_FP8_GEMM) == 2
    assert not [n for n in rewritten.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear", "Transpose")]
    assert any(o.domain == "com.microsoft" for o in rewritten.opset_import)
    x = (torch.randn(3, 200, generator=torch.Generator().manual_seed(1)) * 2).half().numpy()
    want = _cpu_session(model).run(None, {"x": x})
    got = _cpu_session(_expand_ort_fp8_gemms(rewritten)).run(None, {"x": x})
    for w, g_ in zip(want, got):
        assert np.abs(w.astype(np.float32) - g_.astype(np.float32)).max() <= 2e-3 * np.abs(w.astype(np.float32)).max()
