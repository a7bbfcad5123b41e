"""`qwen3next-trt export`, checked against oracles that are not the exporter itself.

  * the ONNX files, read with onnx.load (structure, attributes, weights layout); the manifest is
    checked *against* the files, never used as the truth;
  * onnx's checker (with the com.microsoft schemas registered) and ONNX Runtime's own op schemas;
  * ONNX Runtime's kernels for the three com.microsoft ops and ONNX RotaryEmbedding, on single-node
    models built by hand, against the torch custom ops / the reference model's functions;
  * the CLI's contract for bad input (exit 2, one `error:` line, nothing created or removed) and
    for a failure midway (no output directory, no `.partial-` directory).

The full tiny export is made once per session (`tiny_export` in conftest.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import qwen3next_trt.export.custom_ops  # noqa: F401  (registers the com.microsoft schemas with onnx)
import qwen3next_trt.model.presets as presets_package
from qwen3next_trt.cli import main
from qwen3next_trt.export import exporter as exporter_module
from qwen3next_trt.export.custom_ops import stack_experts
from qwen3next_trt.export.kinds import RopeCache
from qwen3next_trt.model import Qwen3NextConfig
from qwen3next_trt.model.modeling_qwen3_next import (
    Qwen3NextRotaryEmbedding,
    Qwen3NextSparseMoeBlock,
    apply_partial_rotary,
)

MS = "com.microsoft"
MS_OPS = ("LinearAttention", "CausalConvWithState", "MoE")
WATCHED = [(MS, "LinearAttention"), (MS, "CausalConvWithState"), (MS, "MoE"), ("", "Attention"), ("", "RotaryEmbedding")]


def preset(name: str) -> dict:
    """The preset's Hugging Face config.json fields, read from the JSON file (not through the config code)."""
    return json.loads((Path(presets_package.__file__).parent / f"{name}.json").read_text())


TINY = preset("tiny")


def layer_plan(cfg: dict) -> list[tuple[str, bool]]:
    """(layer type, MoE?) per layer, from the HF fields (full attention every `full_attention_interval`-th layer)."""
    plan = []
    for i in range(cfg["num_hidden_layers"]):
        kind = "full_attention" if (i + 1) % cfg["full_attention_interval"] == 0 else "linear_attention"
        moe = cfg["num_experts"] > 0 and i not in cfg.get("mlp_only_layers", []) and (i + 1) % cfg.get("decoder_sparse_step", 1) == 0
        plan.append((kind, moe))
    return plan


def graph_names(cfg: dict) -> list[str]:
    layers = [f"layer_{i:02d}.{m}" for i in range(cfg["num_hidden_layers"]) for m in ("prefill", "decode")]
    mtp = ["mtp.prefill", "mtp.decode"] if cfg.get("num_nextn_predict_layers", 0) else []
    return ["embed", *layers, "final", "lm_head", *mtp, "model.prefill", "model.decode"]


TINY_GRAPHS = graph_names(TINY)
TINY_GROUPS: dict[str, list[str]] = {}
for _name in TINY_GRAPHS:
    TINY_GROUPS.setdefault(_name.partition(".")[0], []).append(_name)


# ------------------------------------------------------------------------------------------------
# Reading ONNX files


def load(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=False)


def all_nodes(model: onnx.ModelProto):
    """Every node: the main graph, subgraphs of control-flow nodes, and local functions."""

    def walk(graph):
        for n in graph.node:
            yield n
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    yield from walk(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for g in a.graphs:
                        yield from walk(g)

    yield from walk(model.graph)
    for f in model.functions:
        yield from f.node


def domain(n) -> str:
    return "" if n.domain in ("", "ai.onnx") else n.domain


def attrs(n) -> dict:
    out = {}
    for a in n.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def opsets(model) -> dict[str, int]:
    return {o.domain or "ai.onnx": o.version for o in model.opset_import}


def elem_name(elem_type: int) -> str:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name


def value_info(v) -> tuple[str, str, list]:
    tt = v.type.tensor_type
    dims = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in tt.shape.dim]
    return v.name, elem_name(tt.elem_type), dims


def external(t) -> dict | None:
    if t.data_location != TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in t.external_data}


# ------------------------------------------------------------------------------------------------
# Checks shared by the tiny export and the (optional) 80B export


def expected_ops(name: str, cfg: dict) -> dict:
    plan = layer_plan(cfg)
    group = name.partition(".")[0]
    c = Counter()

    def add(kind, moe):
        if kind == "linear_attention":
            c[(MS, "LinearAttention")] += 1
            c[(MS, "CausalConvWithState")] += 1
        else:
            c[("", "Attention")] += 1
            c[("", "RotaryEmbedding")] += 2  # q and k
        if moe:
            c[(MS, "MoE")] += 1

    if group.startswith("layer_"):
        add(*plan[int(group.removeprefix("layer_"))])
    elif group == "mtp":
        add("full_attention", cfg["num_experts"] > 0)
    elif group == "model":
        for kind, moe in plan:
            add(kind, moe)
    return {k: c.get(k, 0) for k in WATCHED}


def check_structure(model: onnx.ModelProto, name: str, cfg: dict):
    assert model.ir_version == 10, f"{name}: ir_version {model.ir_version}"
    ops = opsets(model)
    assert ops.get("ai.onnx") == 23, f"{name}: opsets {ops}"
    nodes = list(all_nodes(model))
    domains = {domain(n) for n in nodes}
    assert domains <= {"", MS}, f"{name}: unexpected node domains {domains}"
    assert set(ops) <= {"ai.onnx", MS}, f"{name}: unexpected opset imports {ops}"
    if MS in domains or MS in ops:
        assert ops.get(MS) == 1, f"{name}: com.microsoft opset {ops.get(MS)}"
    ms_types = {n.op_type for n in nodes if domain(n) == MS}
    assert ms_types <= set(MS_OPS), f"{name}: com.microsoft ops other than {MS_OPS}: {ms_types - set(MS_OPS)}"

    counts = Counter((domain(n), n.op_type) for n in nodes)
    assert {k: counts.get(k, 0) for k in WATCHED} == expected_ops(name, cfg), name

    rotary_dim = int(cfg["head_dim"] * cfg["partial_rotary_factor"])
    for n in nodes:
        a = attrs(n)
        key = (domain(n), n.op_type)
        if key == (MS, "LinearAttention"):
            assert a["update_rule"] == "gated_delta"
            assert a["q_num_heads"] == cfg["linear_num_key_heads"]
            assert a["kv_num_heads"] == cfg["linear_num_value_heads"]
            assert math.isclose(a["scale"], cfg["linear_key_head_dim"] ** -0.5, rel_tol=1e-6), a["scale"]
            assert a.get("state_window", 0) == 0
            assert len(n.input) == 6 and all(n.input), f"{name}: LinearAttention inputs {list(n.input)}"
            assert len(n.output) == 2
        elif key == (MS, "CausalConvWithState"):
            assert a["activation"] == "silu"
            assert a.get("ndim", 1) == 1 and a.get("channels_last", 0) == 0 and a.get("dilation", 1) == 1
            assert a.get("state_window", 0) == 0
            # the zero bias is an explicit input (TensorRT's parser rejects an empty optional input before a present one)
            assert len(n.input) == 4 and all(n.input), f"{name}: CausalConvWithState inputs {list(n.input)}"
            assert len(n.output) == 2
        elif key == (MS, "MoE"):
            assert a["activation_type"] == "swiglu"
            assert a["swiglu_fusion"] == 1
            assert a["k"] == cfg["num_experts_per_tok"]
            # always renormalised in the node: ONNX Runtime's normalize_routing_weights=0 path loses the
            # routed experts when run in place (issue 12); without norm_topk_prob the graph rescales after it
            assert a.get("normalize_routing_weights", 0) == 1
            # ORT's swiglu is G * sigmoid(alpha G) * (L + beta), clamped if swiglu_limit is set: SiLU(G) * L needs these
            assert a.get("activation_alpha", 1.0) == 1.0 and a.get("activation_beta", 0.0) == 0.0
            assert "swiglu_limit" not in a and a.get("use_sparse_mixer", 0) == 0
            assert len(n.input) == 6 and all(n.input), f"{name}: MoE inputs {list(n.input)}"
            assert len(n.output) == 1
        elif key == ("", "Attention"):
            assert len(n.output) == 1, f"{name}: Attention has outputs {list(n.output)}"
            assert math.isclose(a.get("scale", cfg["head_dim"] ** -0.5), cfg["head_dim"] ** -0.5, rel_tol=1e-6)
            assert a.get("softcap", 0.0) == 0.0
        elif key == ("", "RotaryEmbedding"):
            assert a["rotary_embedding_dim"] == rotary_dim
            assert a.get("interleaved", 0) == 0  # the reference rotates pairs (i, i + R/2)

    # A layer's state goes straight into and out of its op (no conversion in between).
    graph_in = [v.name for v in model.graph.input]
    graph_out = [v.name for v in model.graph.output]
    if name.startswith("layer_"):
        for n in nodes:
            if n.op_type == "LinearAttention":
                assert n.input[3] == "recurrent_state" and n.output[1] == "recurrent_state_out"
            if n.op_type == "CausalConvWithState":
                assert n.input[3] == "conv_state" and n.output[1] == "conv_state_out"
        assert set(graph_in) >= {"hidden"} and graph_out[0] == "hidden_out"


def check_weights(export_dir: Path, models: dict[str, onnx.ModelProto], group: str, names: list[str]):
    """The graphs of one group reference one `<group>.weights` file; every range lies inside it; no duplicates."""
    weights = export_dir / f"{group}.weights"
    assert weights.is_file()
    size = weights.stat().st_size
    locations = {}
    ranges = set()
    for name in names:
        model = models[name]
        locs = set()
        for t in model.graph.initializer:
            info = external(t)
            if info is None:
                # everything but small constants lives in the weights file
                nbytes = len(t.raw_data) + 4 * len(t.float_data) + 8 * len(t.int64_data) + 4 * len(t.int32_data)
                assert nbytes <= 1024, f"{name}: initializer {t.name} ({nbytes} bytes) embedded in the graph file"
                continue
            locs.add(info["location"])
            offset, length = int(info.get("offset", 0)), int(info["length"])
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
            assert length == math.prod(t.dims) * itemsize, f"{name}: {t.name} length {length} for dims {list(t.dims)}"
            assert 0 <= offset and offset + length <= size, f"{name}: {t.name} [{offset}, {offset + length}) outside {size}"
            ranges.add((offset, length))
        assert len(locs) == 1, f"{name}: external data in {locs}"
        locations[name] = locs.pop()
    assert set(locations.values()) == {weights.name}, locations
    # No duplication: each distinct content is stored once; what lies between the ranges is alignment padding.
    data = weights.read_bytes()
    by_content: dict[str, set] = {}
    for offset, length in ranges:
        by_content.setdefault(hashlib.sha256(data[offset : offset + length]).hexdigest() + f":{length}", set()).add(offset)
    dup = {k: v for k, v in by_content.items() if len(v) > 1}
    assert not dup, f"{weights.name}: identical tensors stored more than once at offsets {list(dup.values())}"
    distinct = sum(length for _, length in ranges)
    assert size <= distinct + 63 * len(ranges), f"{weights.name}: {size} bytes for {distinct} bytes of distinct tensors"
    end = 0
    for offset, length in sorted(ranges):
        assert offset >= end, f"{weights.name}: overlapping tensors at {offset}"
        gap = data[end:offset]
        assert len(gap) < 64 and gap.count(0) == len(gap), f"{weights.name}: {len(gap)} unexplained bytes at {end}"
        end = offset + length
    assert size - end < 64


def check_manifest(export_dir: Path, manifest: dict, cfg: dict, names: list[str]):
    plan = layer_plan(cfg)
    records = {g["name"]: g for g in manifest["graphs"]}
    assert sorted(records) == sorted(names) and len(manifest["graphs"]) == len(names)
    for name in names:
        rec = records[name]
        path = export_dir / rec["file"]
        assert path.is_file(), f"{name}: {rec['file']} missing"
        model = load(path)
        for ports, actual in ((rec["inputs"], model.graph.input), (rec["outputs"], model.graph.output)):
            assert [(p["name"], p["dtype"], p["shape"]) for p in ports] == [value_info(v) for v in actual], name
        assert {external(t)["location"] for t in model.graph.initializer if external(t)} <= {rec["weights"]}
        assert rec["weights"] in manifest["weights"]
        assert manifest["weights"][rec["weights"]]["bytes"] == (export_dir / rec["weights"]).stat().st_size
        # content hashes, against hashlib directly: what every later stage verifies
        assert manifest["weights"][rec["weights"]]["sha256"] == hashlib.sha256((export_dir / rec["weights"]).read_bytes()).hexdigest()
        assert rec["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and rec["bytes"] == path.stat().st_size

        state_in = {p["state"]: p for p in rec["inputs"] if p["role"] == "state-in"}
        state_out = {p["state"]: p for p in rec["outputs"] if p["role"] == "state-out"}
        assert all("state" in p for p in rec["inputs"] + rec["outputs"] if p["role"] in ("state-in", "state-out"))
        assert state_in.keys() == state_out.keys(), f"{name}: states in {sorted(state_in)} vs out {sorted(state_out)}"
        for key, p in state_in.items():
            q = state_out[key]
            assert p["dtype"] == q["dtype"], f"{name}: state {key}: {p['dtype']} in, {q['dtype']} out"
            if key.endswith("recurrent_state"):
                assert p["dtype"] == "float32", f"{name}: {p['name']} is {p['dtype']}"
            if key.endswith(("key", "value")):  # [batch, kv_heads, past (+ new), head_dim]
                assert p["shape"][:2] + p["shape"][3:] == q["shape"][:2] + q["shape"][3:]
                assert p["shape"][2] == "past" and q["shape"][2] != "past"
            else:
                assert p["shape"] == q["shape"], f"{name}: state {key} shapes {p['shape']} vs {q['shape']}"
        for p in rec["inputs"] + rec["outputs"]:
            assert p["shape"][0] == "batch", f"{name}: {p['name']} shape {p['shape']}"
            if p["role"] in ("activation", "tokens", "position"):
                if rec["mode"] == "decode":
                    assert p["shape"][1] == 1, f"{name}: {p['name']} shape {p['shape']} (decode: one token)"
                else:
                    assert p["shape"][1] == "seq", f"{name}: {p['name']} shape {p['shape']} (dynamic sequence)"
        group = name.partition(".")[0]
        assert rec["weights"] == f"{group}.weights"
        if group.startswith("layer_"):
            i = int(group.removeprefix("layer_"))
            assert (rec["layer"], rec["layer_type"], rec["moe"]) == (i, *plan[i])
            assert rec["mode"] == name.partition(".")[2]


# ------------------------------------------------------------------------------------------------
# The shared tiny export


@pytest.fixture(scope="module")
def tiny_models(tiny_export):
    return {name: load(tiny_export / f"{name}.onnx") for name in TINY_GRAPHS}


@pytest.fixture(scope="module")
def tiny_manifest(tiny_export):
    return json.loads((tiny_export / "manifest.json").read_text())


def test_export_directory_holds_exactly_the_graphs_weights_and_manifest(tiny_export):
    expected = {f"{n}.onnx" for n in TINY_GRAPHS} | {f"{g}.weights" for g in TINY_GROUPS} | {"manifest.json"}
    present = {p.name for p in tiny_export.iterdir()} - {"validation"}
    assert present == expected, f"extra: {sorted(present - expected)}, missing: {sorted(expected - present)}"
    assert not [p for p in tiny_export.parent.iterdir() if ".partial-" in p.name]


@pytest.mark.parametrize("name", TINY_GRAPHS)
def test_graph_structure(tiny_models, name):
    check_structure(tiny_models[name], name, TINY)


@pytest.mark.parametrize("name", TINY_GRAPHS)
def test_onnx_checker_full_check(tiny_export, name):
    # Without the schemas the checker skips unknown domains; make sure it really checks the com.microsoft nodes.
    for op in MS_OPS:
        assert onnx.defs.has(op, MS)
    onnx.checker.check_model(str(tiny_export / f"{name}.onnx"), full_check=True)


def _ort_schemas():
    try:
        from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema
    except ImportError:
        pytest.skip("this onnxruntime build does not expose its operator schemas")
    return {(s.domain, s.name): s for s in get_all_operator_schema() if s.domain == MS and s.name in MS_OPS}


def test_custom_nodes_fit_onnxruntime_schemas(tiny_models):
    """Every com.microsoft node uses only attributes ONNX Runtime's own schema defines, with fitting arity."""
    schemas = _ort_schemas()
    assert len(schemas) == 3, sorted(schemas)
    seen = set()
    for name, model in tiny_models.items():
        for n in all_nodes(model):
            if domain(n) != MS:
                continue
            s = schemas[(MS, n.op_type)]
            seen.add(n.op_type)
            unknown = {a.name for a in n.attribute} - set(s.attributes)
            assert not unknown, f"{name}: {n.op_type} attributes unknown to onnxruntime: {unknown}"
            required = [p for p in s.inputs if p.option == p.option.__class__.Single]
            assert len(required) <= len(n.input) <= len(s.inputs), f"{name}: {n.op_type} has {len(n.input)} inputs"
            assert len(n.output) <= len(s.outputs)
    assert seen == set(MS_OPS)


@pytest.mark.parametrize("group", list(TINY_GROUPS))
def test_weights_one_shared_file_in_bounds_without_duplicates(tiny_export, tiny_models, group):
    check_weights(tiny_export, tiny_models, group, TINY_GROUPS[group])


def test_manifest_matches_the_onnx_files(tiny_export, tiny_manifest):
    check_manifest(tiny_export, tiny_manifest, TINY, TINY_GRAPHS)


def test_manifest_header_fields(tiny_manifest):
    m = tiny_manifest
    assert m["format"] == "qwen3next-trt/manifest" and m["version"] == 2
    assert {k: m["source"].get(k) for k in ("kind", "preset", "seed")} == {"kind": "random", "preset": "tiny", "seed": 0}
    assert m["opsets"] == {"ai.onnx": 23, MS: 1}
    assert m["custom_ops"] == {op: {"domain": MS, "version": 1} for op in MS_OPS}
    assert m["dtype"] == "fp32"
    for key in ("package", "version", "torch", "onnx", "onnxscript"):
        assert m["exporter"].get(key), key
    assert m["exporter"]["torch"] == torch.__version__ and m["exporter"]["onnx"] == onnx.__version__
    for key, value in TINY.items():  # the config the graphs were made from is the preset's
        assert m["config"].get(key) == value, f"config field {key}: {m['config'].get(key)!r} vs preset {value!r}"
    assert set(m["weights"]) == {f"{g}.weights" for g in TINY_GROUPS}


# ------------------------------------------------------------------------------------------------
# The custom ops: ONNX Runtime's kernels (single hand-built nodes) against the torch ops' eager code


def ort_node(op: str, inputs: dict[str, np.ndarray], n_out: int, **attributes) -> list[np.ndarray]:
    names = list(inputs)
    outs = [f"out{i}" for i in range(n_out)]
    node = helper.make_node(op, names, outs, domain=MS, **attributes)
    graph = helper.make_graph(
        [node], op,
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(a.shape)) for n, a in inputs.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(MS, 1)], ir_version=10)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)


def max_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def l2n(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("T", [1, 5, 70])
def test_linear_attention_onnxruntime_matches_torch_op(T):
    rng = np.random.default_rng(T)
    B, Hk, Hv, Dk, Dv = 2, 2, 4, 16, 8
    q = rng.standard_normal((B, T, Hk * Dk)).astype(np.float32)
    k = l2n(rng.standard_normal((B, T, Hk, Dk))).reshape(B, T, Hk * Dk)  # delta rule keys are L2-normalised
    v = rng.standard_normal((B, T, Hv * Dv)).astype(np.float32)
    state = (0.5 * rng.standard_normal((B, Hv, Dk, Dv))).astype(np.float32)
    decay = (-np.abs(rng.standard_normal((B, T, Hv))) * 0.5).astype(np.float32)  # log space, <= 0
    beta = (1 / (1 + np.exp(-rng.standard_normal((B, T, Hv))))).astype(np.float32)
    scale = Dk**-0.5
    out, new_state = ort_node("LinearAttention", dict(q=q, k=k, v=v, s=state, g=decay, b=beta), 2,
                              q_num_heads=Hk, kv_num_heads=Hv, update_rule="gated_delta", scale=scale)
    t_out, t_state = torch.ops.qwen3next.linear_attention(*map(torch.from_numpy, (q, k, v, state, decay, beta)), Hk, Hv, scale)
    assert out.shape == (B, T, Hv * Dv) and new_state.shape == (B, Hv, Dk, Dv)
    assert max_abs(out, t_out) <= 1e-5
    assert max_abs(new_state, t_state) <= 1e-5
    assert np.abs(out).max() > 0.1  # not trivially zero


@pytest.mark.parametrize("T", [1, 5, 70])
def test_causal_conv_onnxruntime_matches_torch_op(T):
    rng = np.random.default_rng(100 + T)
    B, C, K = 2, 12, 4
    x = rng.standard_normal((B, C, T)).astype(np.float32)
    w = (rng.standard_normal((C, 1, K)) / K**0.5).astype(np.float32)
    bias = np.zeros(C, np.float32)  # explicit zero bias, as the exporter emits it
    past = rng.standard_normal((B, C, K - 1)).astype(np.float32)  # nonzero carried state
    y, present = ort_node("CausalConvWithState", dict(x=x, w=w, b=bias, s=past), 2, activation="silu", ndim=1, channels_last=0)
    t_y, t_present = torch.ops.qwen3next.causal_conv_with_state(*map(torch.from_numpy, (x, w, bias, past)))
    assert y.shape == (B, C, T) and present.shape == (B, C, K - 1)
    assert max_abs(y, t_y) <= 1e-5
    assert max_abs(present, t_present) <= 1e-5
    # the state is the last K-1 inputs of [past | x]
    np.testing.assert_array_equal(present, np.concatenate([past, x], -1)[..., -(K - 1):])


def _moe_inputs(rng, shape, E, I, H):
    x = rng.standard_normal((*shape, H)).astype(np.float32)
    logits = rng.standard_normal((int(np.prod(shape)), E)).astype(np.float32)
    fc1 = (rng.standard_normal((E, 2 * I, H)) / H**0.5).astype(np.float32)  # rows gate_0, up_0, gate_1, up_1, ...
    fc2 = (rng.standard_normal((E, H, I)) / I**0.5).astype(np.float32)
    return x, logits, fc1, np.zeros((E, 2 * I), np.float32), fc2, np.zeros((E, H), np.float32)


@pytest.mark.parametrize("normalize", [1, 0])
@pytest.mark.parametrize("shape", [(2, 5), (1, 1), (3, 70)])
def test_moe_onnxruntime_matches_torch_op(normalize, shape):
    rng = np.random.default_rng(7 * normalize + shape[1])
    E, I, H, k = 8, 16, 24, 3
    x, logits, fc1, b1, fc2, b2 = _moe_inputs(rng, shape, E, I, H)
    (y,) = ort_node("MoE", dict(x=x, r=logits, f1=fc1, b1=b1, f2=fc2, b2=b2), 1, k=k, activation_type="swiglu",
                    swiglu_fusion=1, normalize_routing_weights=normalize, use_sparse_mixer=0,
                    activation_alpha=1.0, activation_beta=0.0)
    t_y = torch.ops.qwen3next.moe(*map(torch.from_numpy, (x, logits, fc1, b1, fc2, b2)), k, normalize)
    assert y.shape == x.shape
    assert max_abs(y, t_y) <= 1e-5
    assert np.abs(y).max() > 0.1


def test_moe_onnxruntime_on_stacked_reference_block():
    """ORT's MoE on `stack_experts` of a reference MoE block equals the block's own routed experts."""
    cfg = Qwen3NextConfig.from_dict({**TINY, "num_experts": 8, "num_experts_per_tok": 3})
    torch.manual_seed(0)
    block = Qwen3NextSparseMoeBlock(cfg).eval()
    fc1, fc2 = stack_experts(block)
    x = torch.randn(37, cfg.hidden_size)
    logits = block.gate(x)
    with torch.no_grad():
        expected = block.routed_experts(x, logits)
    E = fc1.shape[0]
    (y,) = ort_node("MoE", dict(x=x.numpy(), r=logits.detach().numpy(), f1=fc1.numpy(), b1=np.zeros((E, fc1.shape[1]), np.float32),
                                f2=fc2.numpy(), b2=np.zeros((E, fc2.shape[1]), np.float32)), 1,
                    k=cfg.num_experts_per_tok, activation_type="swiglu", swiglu_fusion=1,
                    normalize_routing_weights=int(cfg.norm_topk_prob), activation_alpha=1.0, activation_beta=0.0)
    assert max_abs(y, expected) <= 1e-5


# ------------------------------------------------------------------------------------------------
# Rotary embedding: the export path (torch.onnx.ops.rotary_embedding, ONNX RotaryEmbedding) vs the reference


def _rope_tables(R: int, max_pos: int, theta: float = 10000.0):
    inv_freq = 1.0 / (theta ** (torch.arange(0, R, 2, dtype=torch.float32) / R))
    angles = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq[None]
    return inv_freq, angles.cos(), angles.sin()


def test_rotary_embedding_export_op_matches_reference():
    g = torch.Generator().manual_seed(0)
    B, H, T, D, R = 2, 4, 9, 64, 16
    x = torch.randn(B, H, T, D, generator=g)
    pos = torch.randint(0, 4000, (B, T), generator=g)
    inv_freq, cos_cache, sin_cache = _rope_tables(R, 4096)
    got = torch.onnx.ops.rotary_embedding(x, cos_cache, sin_cache, pos, rotary_embedding_dim=R)
    freqs = pos[..., None].float() * inv_freq
    angles = torch.cat([freqs, freqs], -1)
    expected = apply_partial_rotary(x, angles.cos(), angles.sin())
    assert (got - expected).abs().max().item() <= 1e-6
    assert torch.equal(got[..., R:], x[..., R:])  # the pass-through dims

    # ONNX Runtime's RotaryEmbedding (opset 23) as a second oracle
    node = helper.make_node("RotaryEmbedding", ["x", "cos", "sin", "pos"], ["y"], rotary_embedding_dim=R)
    graph = helper.make_graph([node], "rope", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, H, T, D]),
        helper.make_tensor_value_info("cos", TensorProto.FLOAT, list(cos_cache.shape)),
        helper.make_tensor_value_info("sin", TensorProto.FLOAT, list(sin_cache.shape)),
        helper.make_tensor_value_info("pos", TensorProto.INT64, [B, T]),
    ], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, H, T, D])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": x.numpy(), "cos": cos_cache.numpy(), "sin": sin_cache.numpy(), "pos": pos.numpy()})
    assert max_abs(y, expected) <= 1e-5


@pytest.mark.parametrize("name", ["tiny", "qwen3-next-80b-a3b"])
def test_rope_cache_tables_match_reference_rotary(name):
    """The exported cos/sin tables (RopeCache) rotate exactly as the reference's Qwen3NextRotaryEmbedding."""
    cfg = Qwen3NextConfig.from_dict(preset(name))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 6, cfg.head_dim, generator=g)
    pos = torch.randint(0, 4096, (2, 6), generator=g)
    got = RopeCache(cfg, 4096, torch.float32).rotation(pos)(x)
    expected = Qwen3NextRotaryEmbedding(cfg).rotation(pos, torch.float32)(x)
    assert cfg.rotary_dim == int(preset(name)["head_dim"] * preset(name)["partial_rotary_factor"])
    assert (got - expected).abs().max().item() <= 1e-6


# ------------------------------------------------------------------------------------------------
# Bad input through the CLI, and failures midway


def tree(path: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def one_error_line(capsys, rc, *needles) -> str:
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert rc == 2, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


@pytest.mark.parametrize("spec, needle", [("99", "99"), ("foo", "foo"), ("0,3,42", "42"), ("embed,mtpp", "mtpp")])
def test_export_bad_layers(tmp_path, capsys, spec, needle):
    rc = main(["export", "--model", "tiny", "--out", str(tmp_path / "out"), "--layers", spec])
    one_error_line(capsys, rc, "--layers", needle)
    assert list(tmp_path.iterdir()) == []


def test_export_bad_dtype_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "--model", "tiny", "--out", str(tmp_path / "out"), "--dtype", "fp8"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "error:" in err.strip().splitlines()[-1] and "--dtype" in err and "fp8" in err
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_directory_that_is_not_an_export(tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    (mine / "sub" / "data.bin").write_bytes(b"\x00\x01\x02")
    before = tree(tmp_path)
    rc = main(["export", "--model", "tiny", "--out", str(mine), "--layers", "embed"])
    one_error_line(capsys, rc, str(mine))
    assert tree(tmp_path) == before  # nothing created (no .partial- directory), nothing removed


def test_export_refuses_an_existing_file_as_out(tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("keep me")
    rc = main(["export", "--model", "tiny", "--out", str(target), "--layers", "embed"])
    one_error_line(capsys, rc, str(target))
    assert target.read_text() == "keep me" and [p.name for p in tmp_path.iterdir()] == ["afile"]


def test_export_reversed_layer_range_is_an_error(tmp_path, capsys):
    rc = main(["export", "--model", "tiny", "--out", str(tmp_path / "out"), "--layers", "3-1"])
    one_error_line(capsys, rc, "3-1")
    assert list(tmp_path.iterdir()) == []


def _flaky_trace(monkeypatch, fail_on: int):
    real = exporter_module._trace
    calls = []

    def trace(module, mode, path):
        calls.append(path.name)
        if len(calls) == fail_on:
            raise RuntimeError(f"planted failure in trace call {fail_on} ({path.name})")
        return real(module, mode, path)

    monkeypatch.setattr(exporter_module, "_trace", trace)
    return calls


def test_export_failing_midway_leaves_no_output_and_no_partial_dir(tmp_path, monkeypatch, capsys):
    parent = tmp_path / "parent"
    parent.mkdir()
    out = parent / "out"
    calls = _flaky_trace(monkeypatch, fail_on=2)
    with pytest.raises(RuntimeError, match="planted failure"):
        main(["export", "--model", "tiny", "--out", str(out), "--layers", "embed,0"])
    assert calls == ["embed.onnx", "layer_00.prefill.onnx"]
    assert list(parent.iterdir()) == [], [p.name for p in parent.iterdir()]


def test_export_failing_midway_keeps_the_previous_export(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert main(["export", "--model", "tiny", "--out", str(out), "--layers", "embed"]) == 0
    before = tree(tmp_path)
    assert "out/manifest.json" in before
    _flaky_trace(monkeypatch, fail_on=2)
    with pytest.raises(RuntimeError, match="planted failure"):
        main(["export", "--model", "tiny", "--out", str(out), "--layers", "embed,0"])
    assert tree(tmp_path) == before


# ------------------------------------------------------------------------------------------------
# The 80B dimensions (opt-in: ~5 minutes and ~13 GB of RAM on 2 cores)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("QWEN3NEXT_TEST_80B") != "1",
                    reason="set QWEN3NEXT_TEST_80B=1 to export two qwen3-next-80b-a3b layers in bf16 (~5 min, ~13 GB RAM)")
def test_export_80b_layers_bf16(tmp_path, capsys):
    cfg = preset("qwen3-next-80b-a3b")
    out = tmp_path / "out80b"
    rc = main(["export", "--model", "qwen3-next-80b-a3b", "--out", str(out), "--layers", "0,3", "--dtype", "bf16"])
    assert rc == 0
    names = ["layer_00.prefill", "layer_00.decode", "layer_03.prefill", "layer_03.decode"]
    assert [layer_plan(cfg)[i][0] for i in (0, 3)] == ["linear_attention", "full_attention"]
    models = {n: load(out / f"{n}.onnx") for n in names}
    for n in names:
        check_structure(models[n], n, cfg)
        onnx.checker.check_model(str(out / f"{n}.onnx"), full_check=True)
    for group in ("layer_00", "layer_03"):
        check_weights(out, models, group, [f"{group}.prefill", f"{group}.decode"])
    manifest = json.loads((out / "manifest.json").read_text())
    check_manifest(out, manifest, cfg, names)
    assert manifest["dtype"] == "bf16"
    hidden = next(p for p in manifest["graphs"][0]["inputs"] if p["name"] == "hidden")
    assert hidden["dtype"] == "bfloat16" and hidden["shape"][2] == cfg["hidden_size"]
