"""FP8 (E4M3) weights: quantisation, the exported graphs (float8 initializers -> DequantizeLinear),
parity of ONNX Runtime with the fake-quantised PyTorch reference, and an official-format FP8
checkpoint carried into the graphs byte for byte."""

import json
import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qwen3next_trt.cli import main
from qwen3next_trt.export.exporter import Exporter
from qwen3next_trt.model import load_preset, random_model, save_model
from qwen3next_trt.model.fp8 import FP8_DTYPE, is_quantized, quantize
from qwen3next_trt.model.loader import model_tensors
from qwen3next_trt.validate.validator import Validator

from greedy import assert_greedy_choices


def test_block_quantisation_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(200, 300, generator=g) * torch.logspace(-3, 1, 300)  # columns of very different scale
    q = quantize(w, "block")
    for i in range(0, 200, 128):
        for j in range(0, 300, 128):
            block = w[i : i + 128, j : j + 128]
            scale = block.abs().max() / 448
            assert torch.equal(q.row_scale[i, j // 128], scale)
            assert torch.equal(q.fp8[i : i + 128, j : j + 128], (block / scale).to(FP8_DTYPE))
    err = (q.dequantize() - w).abs()
    # e4m3 keeps 3 mantissa bits: half an ulp is 2^-4 relative, plus the subnormal step near zero
    bound = 2**-4 * w.abs() + q.row_scale.repeat_interleave(128, 1)[:, :300] * 2**-9
    assert (err <= bound * (1 + 1e-6)).all()


def test_channel_quantisation_matches_its_definition():
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(1))
    q = quantize(w, "channel")
    scale = w.abs().amax(1, keepdim=True) / 448
    assert torch.equal(q.row_scale, scale) and q.block == 96
    assert torch.equal(q.fp8, (w / scale).to(FP8_DTYPE))


def initializers(path):
    model = onnx.load(str(path))  # with external data
    return model, {t.name: t for t in model.graph.initializer}


@pytest.fixture(scope="module")
def fp8_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8") / "onnx"
    Exporter("tiny", out, layers="0,3,final,mtp", precision="fp8", progress=lambda m: None).run()
    return out


def test_fp8_graphs_hold_float8_weights_and_dequantize_them(fp8_export):
    manifest = json.loads((fp8_export / "manifest.json").read_text())
    assert manifest["weights_precision"]["format"] == "float8e4m3fn"
    for name in ("layer_00.prefill", "layer_03.decode", "mtp.prefill"):
        model, inits = initializers(fp8_export / f"{name}.onnx")
        fp8 = [t for t in inits.values() if t.data_type == TensorProto.FLOAT8E4M3FN]
        dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
        assert len(fp8) == len(dq) >= 6
        fp8_bytes = sum(numpy_helper.to_array(t).size for t in fp8)
        float_big = [t for t in inits.values() if t.data_type == TensorProto.FLOAT and math.prod(t.dims) >= 4096]
        # what stays float: the router, shared-expert gate, in_proj_ba, conv, RoPE tables, zero biases
        assert fp8_bytes > 4 * sum(math.prod(t.dims) for t in float_big if "cache" not in t.name)
        for n in dq:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            assert attrs["axis"] == -1 and attrs["block_size"] == 128
            assert inits[n.input[0]].data_type == TensorProto.FLOAT8E4M3FN


def test_fp8_export_matches_fake_quantised_reference(fp8_export):
    report = Validator(fp8_export, progress=lambda m: None).run()
    assert report.passed
    for row in report.rows:  # issue target: per layer <= 1e-3 relative
        assert row.max_abs <= 1e-3 * max(row.ref_max, 1.0), row


def test_fp8_differs_from_the_float_model(fp8_export, tmp_path):
    """The reference the FP8 graphs are checked against is really the quantised one."""
    float_export = tmp_path / "f32"
    Exporter("tiny", float_export, layers="0", progress=lambda m: None).run()
    _, a = initializers(fp8_export / "layer_00.decode.onnx")
    fp8_names = [n for n, t in a.items() if t.data_type == TensorProto.FLOAT8E4M3FN]
    assert fp8_names  # and the float export has none
    _, b = initializers(float_export / "layer_00.decode.onnx")
    assert not [t for t in b.values() if t.data_type == TensorProto.FLOAT8E4M3FN]


def write_official_fp8_checkpoint(path, scale_factor=400.0):
    """An FP8 checkpoint in the official layout, quantised here with scale = amax / 400 (not the
    exporter's amax / 448), so a re-quantisation could not reproduce its bytes."""
    cfg = load_preset("tiny")
    model = random_model(cfg, seed=3, dtype=torch.bfloat16)
    tensors = {}
    for name, t in model_tensors(model).items():
        if t.dim() == 2 and is_quantized(name):
            w = t.float()
            rb, cb = math.ceil(w.shape[0] / 128), math.ceil(w.shape[1] / 128)
            scale = torch.zeros(rb, cb)
            fp8 = torch.empty(w.shape, dtype=FP8_DTYPE)
            for i in range(rb):
                for j in range(cb):
                    blk = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
                    scale[i, j] = blk.abs().max() / scale_factor
                    fp8[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] = (blk / scale[i, j]).to(FP8_DTYPE)
            tensors[name], tensors[name + "_scale_inv"] = fp8, scale
        else:
            tensors[name] = t
    save_model(model, path)
    from safetensors.torch import save_file

    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps(config))
    return tensors


def test_official_fp8_checkpoint_is_carried_exactly(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    tensors = write_official_fp8_checkpoint(ckpt)
    out = tmp_path / "onnx"
    assert main(["export", "--model", str(ckpt), "--out", str(out), "--precision", "fp8", "--layers", "0"]) == 0
    _, inits = initializers(out / "layer_00.prefill.onnx")
    want = tensors["model.layers.0.linear_attn.in_proj_qkvz.weight"].view(torch.uint8).numpy()
    found = [t for t in inits.values() if t.data_type == TensorProto.FLOAT8E4M3FN and tuple(t.dims) == want.shape]
    assert any(np.array_equal(np.frombuffer(t.raw_data, np.uint8).reshape(want.shape), want) for t in found)
    assert main(["validate", "--onnx", str(out)]) == 0
    assert "result: PASS" in capsys.readouterr().out


def test_fp8_engines_build_for_fp8_targets(fp8_export, tmp_path, capsys):
    pytest.importorskip("tensorrt_rtx")
    out = tmp_path / "eng"
    assert main(["build", "--onnx", str(fp8_export), "--out", str(out), "--graphs", "layer_00,layer_03"]) == 0
    meta = json.loads((out / "layer_00.engine.json").read_text())
    assert meta["compute_capabilities"] == ["SM89", "SM120"]
    assert main(["build", "--onnx", str(fp8_export), "--out", str(out), "--compute-capability", "SM80"]) == 2
    assert "FP8" in capsys.readouterr().err


def test_quality_report_measures_what_fp8_changes(fp8_export, tmp_path):
    from qwen3next_trt.validate.quality import QualityCheck

    report = QualityCheck(fp8_export, report_dir=tmp_path / "q", progress=lambda m: None).run()
    layer_rows = [r for r in report.rows if r.graph.startswith("layer_") and r.output == "hidden_out"]
    assert layer_rows and all(1e-4 < r.rel_frobenius < 0.1 and 0.99 < r.cosine < 1.0 for r in layer_rows)
    final = [r for r in report.rows if r.graph == "final"]
    assert all(r.rel_frobenius < 1e-5 for r in final)  # norm + lm_head stay unquantised
    assert (tmp_path / "q" / "quality.json").is_file() and (tmp_path / "q" / "quality.png").is_file()


def test_logit_metrics():
    from qwen3next_trt.validate.quality import logit_metrics

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((50, 40))
    same = logit_metrics(logits, logits)
    assert same["kl_mean"] == pytest.approx(0.0, abs=1e-12) and same["top1_agreement"] == 1.0 and same["top5_overlap"] == 1.0
    other = logit_metrics(logits, rng.standard_normal((50, 40)))
    assert other["kl_mean"] > 0.1 and other["top1_agreement"] < 0.3 and other["top5_overlap"] < 0.5


@pytest.fixture(scope="module")
def fp8_act_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8act") / "onnx"
    Exporter("tiny", out, layers="0,3,mtp", precision="fp8", activations="fp8", calib=2, progress=lambda m: None).run()
    return out


def test_fp8_activations_are_quantised_before_every_fp8_matmul_and_moe(fp8_act_export):
    manifest = json.loads((fp8_act_export / "manifest.json").read_text())
    scales = manifest["activation_precision"]["scales"]
    assert "model.layers.0.mlp.experts" in scales and "model.layers.0.linear_attn.in_proj_qkvz.weight" in scales
    assert all(s > 0 for s in scales.values())
    model, inits = initializers(fp8_act_export / "layer_00.decode.onnx")
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    # the activations that feed FP8 weights in a DeltaNet+MoE layer: in_proj_qkvz's input, out_proj's
    # input, the MoE input (shared by the routed experts and the shared expert's gate/up: quantised
    # once, the exporter merges identical Q/DQ of one tensor) and the shared expert's down_proj input
    assert len(q) == len({n.input[0] for n in q}) == 4
    consumers = {i: n.op_type for n in model.graph.node for i in n.input}
    dq_of_q = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in {x.output[0] for x in q}]
    assert len(dq_of_q) == 4 and all(consumers[n.output[0]] in ("MatMul", "Gemm", "MoE", "Reshape") for n in dq_of_q)
    for n in q:
        assert inits[n.input[2]].data_type == TensorProto.FLOAT8E4M3FN  # zero point sets the FP8 output type
        value = float(numpy_helper.to_array(inits[n.input[1]]))
        assert any(value == pytest.approx(s, rel=1e-6) for s in scales.values())


def test_fp8_activation_export_matches_the_fake_quantised_reference(fp8_act_export):
    report = Validator(fp8_act_export, progress=lambda m: None).run()
    assert report.passed
    assert max(r.max_abs / max(r.ref_max, 1e-6) for r in report.rows) <= 1e-3


def test_float16_static_activation_export_validates(tmp_path_factory):
    """A float16 export with static FP8 activations against the reference (ONNX Runtime CPU). The
    graph holds each scale in float16 and the reference must round with those very scales
    (model/fp8.py graph_scales); the roundings 16-bit arithmetic decides the other way are allowed for
    by twice the rounding's own effect, measured per output (tolerances.activation_rounding_effect).
    Before both, 154 of 278 rows of the whole tiny model failed by up to 16x (NOTES.md)."""
    from qwen3next_trt.model.fp8 import graph_scales

    out = tmp_path_factory.mktemp("fp8act16") / "onnx"
    Exporter("tiny", out, layers="0,3", dtype="fp16", precision="fp8", activations="fp8", calib=2,
             progress=lambda m: None).run()
    scales = json.loads((out / "manifest.json").read_text())["activation_precision"]["scales"]
    model, inits = initializers(out / "layer_00.decode.onnx")
    rounded = set(graph_scales(scales, torch.float16).values())
    for n in (n for n in model.graph.node if n.op_type == "QuantizeLinear"):
        held = numpy_helper.to_array(inits[n.input[1]])
        assert held.dtype == np.float16 and float(held) in rounded  # exactly what the reference applies
    report = Validator(out, progress=lambda m: None).run()
    assert report.passed, [(r.graph, r.output, r.max_abs, r.tolerance) for r in report.rows if not r.passed][:5]
    base = report.tolerances["layer"]
    # the allowance is measured, not a blanket: it is there for some outputs and not equal for all
    extra = [r.tolerance - base * max(r.ref_max, 1e-6) for r in report.rows if r.graph.startswith("layer_")]
    assert max(extra) > 0 and len({round(e, 9) for e in extra}) > 1


def test_activation_options_are_checked(tmp_path, capsys):
    rc = main(["export", "--model", "tiny", "--out", str(tmp_path / "a"), "--activations", "fp8", "--layers", "0"])
    assert rc == 2 and "--precision fp8" in capsys.readouterr().err
    rc = main(["export", "--model", "tiny", "--out", str(tmp_path / "b"), "--precision", "fp8", "--activations", "fp8",
               "--calib", "100000000", "--layers", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "--calib 100000000" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def fp8_dynamic_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8dyn") / "onnx"
    Exporter("tiny", out, layers="0,3", precision="fp8", activations="fp8-dynamic", progress=lambda m: None).run()
    return out


def test_dynamic_per_token_scales_are_computed_in_the_graph(fp8_dynamic_export):
    manifest = json.loads((fp8_dynamic_export / "manifest.json").read_text())
    assert manifest["activation_precision"]["scales"] == "per-token"
    model, inits = initializers(fp8_dynamic_export / "layer_03.prefill.onnx")
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert q, "no activation QuantizeLinear"
    for n in q:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        assert n.input[1] not in inits  # the scale is computed from the activation, not stored
        assert attrs["output_dtype"] == TensorProto.FLOAT8E4M3FN and attrs["block_size"] > 1 and attrs["axis"] == -1


def test_dynamic_per_token_quantisation_matches_its_definition():
    # oracle: a numpy loop over tokens, E4M3 rounding via ml_dtypes (independent of torch's float8)
    import ml_dtypes

    from qwen3next_trt.model.fp8 import fake_quantize_activation_per_token

    x = torch.randn(3, 5, 64) * torch.logspace(-3, 3, 5)[None, :, None]
    x[1, 2] = 0.0  # an all-zero token must not divide by zero
    got = fake_quantize_activation_per_token(x).numpy()
    xs = x.numpy().astype(np.float32)
    for b in range(3):
        for t in range(5):
            s = np.float32(max(np.abs(xs[b, t]).max() / np.float32(448.0), 2.0**-40))
            want = (xs[b, t] / s).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * s
            np.testing.assert_array_equal(got[b, t], want)


def test_dynamic_fp8_export_matches_the_fake_quantised_reference(fp8_dynamic_export, tmp_path, capsys):
    report = Validator(fp8_dynamic_export, progress=lambda m: None).run()
    assert report.passed
    assert max(r.max_abs / max(r.ref_max, 1e-6) for r in report.rows) <= 1e-3
    pytest.importorskip("tensorrt_rtx")
    # TensorRT-RTX 1.7 cannot compile run-time scales into FP8 GEMMs: refused up front, by name
    assert main(["build", "--onnx", str(fp8_dynamic_export), "--out", str(tmp_path / "eng"), "--trt", "tensorrt_rtx"]) == 2
    assert "dynamic per-token" in capsys.readouterr().err and not (tmp_path / "eng").exists()


@pytest.fixture(scope="module")
def fp8_kv_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8kv") / "onnx"
    Exporter("tiny", out, kv_cache="fp8", calib=2, progress=lambda m: None).run()
    return out


def test_fp8_kv_cache_states_are_float8_with_calibrated_scales(fp8_kv_export):
    manifest = json.loads((fp8_kv_export / "manifest.json").read_text())
    kv = manifest["kv_cache"]
    cfg = load_preset("tiny")
    attention = [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"]
    assert set(kv["scales"]) == {f"model.layers.{i}.self_attn.{k}" for i in attention for k in ("key", "value")} | {
        "mtp.layers.0.self_attn.key", "mtp.layers.0.self_attn.value"}
    assert all(0 < s < 1 for s in kv["scales"].values())
    assert manifest["activation_precision"]["format"] == "fp32"  # KV only: the rest stays float
    for g in manifest["graphs"]:
        kv_ports = [p for p in g["inputs"] + g["outputs"] if p.get("state", "").endswith(("key", "value"))]
        assert all(p["dtype"] == "float8e4m3fn" for p in kv_ports), g["name"]
        recurrent = [p for p in g["inputs"] if p.get("state", "").endswith("recurrent_state")]
        assert all(p["dtype"] == "float32" for p in recurrent)  # DeltaNet state stays float32 always


def test_fp8_kv_cache_export_matches_the_reference_and_generates_its_tokens(fp8_kv_export):
    from qwen3next_trt.model.fp8 import fake_quantize_kv_
    from qwen3next_trt.model.loader import WeightSource
    from qwen3next_trt.runtime import Generator

    report = Validator(fp8_kv_export, progress=lambda m: None).run()
    assert report.passed, [r for r in report.rows if not r.passed]
    (greedy,) = report.end_to_end.values()
    assert greedy["consistent"] and greedy["agreement_before_tie"] == 1.0, greedy
    # the runtime keeps float8 states as their bits; its greedy tokens are the reference's (same KV
    # rounding) up to near-ties. Margins are small by nature here: an E4M3 flip of one K/V element,
    # which upstream float32 differences between CPUs decide, moves logits by ~1e-2, so the check is
    # that every token is a reference greedy choice within the validator's logits tolerance.
    scales = json.loads((fp8_kv_export / "manifest.json").read_text())["kv_cache"]["scales"]
    model = WeightSource("tiny").whole_model(with_mtp=False).float()
    prompts = [np.random.default_rng(5).integers(0, 512, n).tolist() for n in (20, 11)]
    gen = Generator(fp8_kv_export)
    got = gen.generate(prompts, 16)
    fake_quantize_kv_(model, scales)
    expected = [model.generate_greedy(torch.tensor([p]), 16)[0].tolist() for p in prompts]
    assert_greedy_choices(model, prompts, got, expected, greedy["tolerance"])
    assert_greedy_choices(model, prompts, gen.generate(prompts, 16, mtp_k=2), expected, greedy["tolerance"])
    kv_store = gen.model.new_store(1, 4)
    assert any(s.buffer.dtype == np.uint8 for slots in kv_store.layers for s in slots)
