"""Engines from the tiny export, built on the CPU with TensorRT-RTX (ahead of time), with the
project's plugins: what CI can check without a GPU. Running engines needs a GPU (gpu marker)."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from qwen3next_trt.cli import main
from qwen3next_trt.model import load_preset

trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (extra 'trt-rtx') not installed")


@pytest.fixture(scope="module")
def engines(tiny_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines")
    assert main(["build", "--onnx", str(tiny_export), "--out", str(out)]) == 0
    return out


def metadata(engines, name):
    return json.loads((engines / f"{name}.engine.json").read_text())


def test_one_engine_per_weights_group_serving_its_graphs(tiny_export, engines):
    manifest = json.loads((tiny_export / "manifest.json").read_text())
    groups: dict = {}
    for g in manifest["graphs"]:
        groups.setdefault(g["weights"], []).append(g)
    assert sorted(p.name for p in engines.glob("*.engine")) == sorted(w.removesuffix(".weights") + ".engine" for w in groups)
    pairs = 0
    for weights, graphs in groups.items():
        meta = metadata(engines, weights.removesuffix(".weights"))
        assert (engines / meta["engine"]).stat().st_size == meta["engine_bytes"] > 0
        assert meta["tensorrt"]["flavour"] == "tensorrt_rtx" and meta["compute_capabilities"] == ["SM80", "SM89", "SM120"]
        assert meta["builder"]["strongly_typed"] and len(meta["onnx_sha256"]) == 64 and len(meta["weights_sha256"]) == 64
        assert meta["weights_sha256"] == manifest["weights"][weights]["sha256"]
        assert meta["graph_sha256"] == {g["name"]: g["sha256"] for g in graphs}
        if len(graphs) == 1:  # embed, final, lm_head: one graph, one profile
            assert meta["graphs"] == {graphs[0]["name"]: 0} and len(meta["profiles"]) == 1
            continue
        pairs += 1
        prefill, decode = sorted(graphs, key=lambda g: g["mode"] != "prefill")
        # built from the prefill graph: its tensors; profile 0 serves it, profile 1 the decode graph
        assert meta["graphs"] == {prefill["name"]: 0, decode["name"]: 1} and meta["built_from"] == prefill["name"]
        assert meta["onnx_sha256"] == prefill["sha256"] and [p["name"] for p in meta["inputs"]] == [p["name"] for p in prefill["inputs"]]
        assert len(meta["profiles"]) == 2
        for port in prefill["inputs"]:
            if "seq" not in port["shape"]:
                continue
            axis = port["shape"].index("seq")
            pre, dec = (meta["profiles"][i][port["name"]] for i in (0, 1))
            assert (pre["min"][axis], pre["opt"][axis], pre["max"][axis]) == (1, 128, 256)
            assert dec["min"][axis] == dec["opt"][axis] == dec["max"][axis] == 1  # decode: one token
    assert pairs == 8 + 2  # every layer, mtp and the stitched model
    assert not list(engines.glob("*.tmp")) and (engines / "timing.cache").stat().st_size > 0


# Engine bytes vs the weights file they hold. Tiny engines carry a cost besides the weights that does
# not grow with them: per-target code (SM80, SM89, SM120) and per-profile layer data. Measured on dev
# with TensorRT-RTX 1.7.1.116 (2026-12-01): a tiny layer group's two-profile engine is 4.99 / 6.00 MiB
# for 1.87 / 1.99 MiB of weights (DeltaNet / attention layers), i.e. 1.15 x weights + 2.84 / 3.71 MiB
# (one profile alone: 3.3 / 4.1 MiB). 5 MiB leaves ~1.3 MiB for other TensorRT versions. At 80B the
# weights dominate (NOTES.md, "One engine per layer").
TINY_ENGINE_OVERHEAD = 5 << 20


def test_a_layer_group_engine_holds_its_weights_once(tiny_export, engines, tmp_path):
    manifest = json.loads((tiny_export / "manifest.json").read_text())
    for weights, record in manifest["weights"].items():
        group = weights.removesuffix(".weights")
        if group.startswith("layer_"):
            meta = metadata(engines, group)
            assert meta["engine_bytes"] < 1.15 * record["bytes"] + TINY_ENGINE_OVERHEAD, (group, meta["engine_bytes"], record["bytes"])
    # At tiny sizes the overhead above is larger than a layer's weights, so that bound alone would not
    # notice a second copy of them. The stitched model has the most weights (15.5 MiB): its decode
    # profile adds 4.7 MiB of layer data (measured), a second copy of the weights would add 15.5 MiB.
    out = tmp_path / "one"
    assert main(["build", "--onnx", str(tiny_export), "--out", str(out), "--graphs", "model.prefill"]) == 0
    one, two = metadata(out, "model"), metadata(engines, "model")
    assert one["graphs"] == {"model.prefill": 0} and len(one["profiles"]) == 1
    assert two["engine_bytes"] - one["engine_bytes"] < 0.5 * manifest["weights"]["model.weights"]["bytes"]


def test_the_prefill_graph_computes_the_decode_graph(tiny_export):
    """Why one engine built from the prefill graph may serve decode: on the same one-token feed the
    prefill graph gives what the decode graph gives (ONNX Runtime, the CPU oracle)."""
    from qwen3next_trt.export.manifest import Manifest
    from qwen3next_trt.sessions import OrtSession
    from qwen3next_trt.validate.inputs import feeds_for

    manifest = Manifest.load(tiny_export)
    for group in ("layer_00", "layer_03", "mtp"):
        decode, prefill = manifest.graph(f"{group}.decode"), manifest.graph(f"{group}.prefill")
        _, feed = feeds_for(decode, manifest.vocab_size)[0]
        want = OrtSession(tiny_export / decode.file).run(None, feed)
        got = OrtSession(tiny_export / prefill.file).run(None, feed)
        for name, w, g in zip(decode.output_names, want, got):
            assert g.shape == w.shape and np.allclose(g, w, rtol=1e-5, atol=1e-5), (group, name, float(np.abs(g - w).max()))


def layer_types(meta):
    types = [lay["type"] for lay in meta["layers"]]
    return {t: types.count(t) for t in set(types)}, sorted(lay["plugin"] for lay in meta["layers"] if "plugin" in lay)


def test_layer_lists_hold_our_plugins_and_native_attention(engines):
    cfg = load_preset("tiny")
    for i, kind in enumerate(cfg.layer_types):
        counts, plugins = layer_types(metadata(engines, f"layer_{i:02d}"))
        if kind == "linear_attention":
            assert plugins == ["CausalConvWithState", "LinearAttention", "MoE"]
            assert "ATTENTION_OUTPUT" not in counts
        else:
            assert plugins == ["MoE"]
            assert counts["ATTENTION_INPUT"] == counts["ATTENTION_OUTPUT"] == 1 and counts["ROTARY_EMBEDDING"] == 2
    counts, plugins = layer_types(metadata(engines, "model"))
    assert plugins.count("LinearAttention") == 6 and plugins.count("CausalConvWithState") == 6 and plugins.count("MoE") == 8
    assert counts["ATTENTION_OUTPUT"] == 2 and counts["ROTARY_EMBEDDING"] == 4


def test_profiles_follow_the_manifest_dims(engines):
    meta = metadata(engines, "layer_03")
    prefill, decode = (meta["profiles"][meta["graphs"][f"layer_03.{m}"]] for m in ("prefill", "decode"))
    for profile in (prefill, decode):
        past = profile["past_key"]
        assert past["min"][2] == 0 and past["max"][2] == 4095 and past["min"][0] == 1 and past["max"][0] == 4
    assert decode["hidden"]["max"][1] == 1 and prefill["hidden"]["max"][1] == 256  # decode: one token
    # "past + seq": the sum of the parts' ranges
    assert decode["attention_mask"]["max"][1] == 4096 and prefill["attention_mask"]["max"][1] == 4095 + 256


def test_unchanged_graphs_are_not_rebuilt_and_changed_weights_are(tiny_export, engines, tmp_path, capsys):
    onnx_dir, out = tmp_path / "onnx", tmp_path / "eng"
    shutil.copytree(tiny_export, onnx_dir)
    shutil.copytree(engines, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.engine")}
    # engines of the layout before one engine per group: replaced, not left beside (a second weight copy)
    old = dict(metadata(out, "layer_00"), graph="layer_00.prefill", engine="layer_00.prefill.engine")
    del old["version"]
    (out / "layer_00.prefill.engine.json").write_text(json.dumps(old))
    (out / "layer_00.prefill.engine").write_bytes(b"old")
    # metadata points at the original export; the hashes are what decide
    assert main(["build", "--onnx", str(onnx_dir), "--out", str(out), "--graphs", "layer_00,layer_01,final"]) == 0
    printed = capsys.readouterr().out
    assert "built " not in printed and "replaced layer_00.prefill.engine" in printed
    assert not (out / "layer_00.prefill.engine").exists() and not (out / "layer_00.prefill.engine.json").exists()
    data = bytearray((onnx_dir / "layer_01.weights").read_bytes())
    data[1024:1028] = np.float32(0.5).tobytes()
    (onnx_dir / "layer_01.weights").write_bytes(bytes(data))
    # weights changed behind the manifest's back: refused, naming the file
    one_error_line(capsys, main(["build", "--onnx", str(onnx_dir), "--out", str(out), "--graphs", "layer_00,layer_01,final"]),
                   "layer_01.weights", "content hash")
    # as an export of the changed layer records it: only that layer's engines are built again
    from qwen3next_trt.export.manifest import Manifest
    from qwen3next_trt.hashing import file_sha256

    m = Manifest.load(onnx_dir)
    m.weights["layer_01.weights"].sha256 = file_sha256(onnx_dir / "layer_01.weights")
    m.write(onnx_dir)
    assert main(["build", "--onnx", str(onnx_dir), "--out", str(out), "--graphs", "layer_00,layer_01,final"]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.engine")}
    changed = {n for n in after if after[n] != before[n]}
    assert changed == {"layer_01.engine"}


def test_inspect_prints_metadata_profiles_and_layers(engines, capsys):
    assert main(["inspect", str(engines / "layer_00.engine")]) == 0
    out = capsys.readouterr().out
    assert "-> plugin LinearAttention" in out and "tensorrt_rtx 1.7" in out and "recurrent_state" in out
    assert "serves: layer_00.prefill with profile 0, layer_00.decode with profile 1" in out
    profile0, profile1 = out.split("profile 0: serves layer_00.prefill\n")[1].split("profile 1: serves layer_00.decode\n")
    assert "hidden" in profile0 and "max [4, 256, 128]" in profile0
    assert "min [1, 1, 128]  opt [2, 1, 128]  max [4, 1, 128]" in profile1.split("layers (")[0]
    assert main(["inspect", str(engines)]) == 0
    assert "layer_07.prefill (0), layer_07.decode (1)" in capsys.readouterr().out


def test_old_metadata_is_refused_with_rebuild(engines, tmp_path, capsys):
    from qwen3next_trt.engines.metadata import read_engine_meta
    from qwen3next_trt.errors import InputError

    shutil.copy(engines / "embed.engine", tmp_path / "embed.engine")
    old = {k: v for k, v in metadata(engines, "embed").items() if k not in ("version", "group", "graphs")}
    (tmp_path / "embed.engine.json").write_text(json.dumps(dict(old, graph="embed", mode="any")))
    with pytest.raises(InputError, match=r"embed\.engine\.json: engine metadata version 1, .*rebuild the engines"):
        read_engine_meta(tmp_path / "embed.engine")
    one_error_line(capsys, main(["inspect", str(tmp_path)]), "embed.engine.json", "version 1", "rebuild")


def test_graph_records_map_to_engine_and_profile(tiny_export, engines, tmp_path):
    """sessions.open_engine's mapping, up to the GPU: each graph to its group's engine and profile."""
    from qwen3next_trt.engines.metadata import check_engine_source, metadata_path, read_engine_meta
    from qwen3next_trt.errors import InputError
    from qwen3next_trt.export.manifest import Manifest
    from qwen3next_trt.sessions import engine_path, open_engine

    manifest = Manifest.load(tiny_export)
    for rec in manifest.graphs:
        path = engine_path(engines, rec)
        assert path.name == rec.weights.removesuffix(".weights") + ".engine"
        profile = check_engine_source(read_engine_meta(path), metadata_path(path), manifest, rec)
        assert profile == (1 if rec.mode == "decode" else 0)
    # an engine built for the decode graph alone does not serve the prefill graph: named, with the fix
    shutil.copy(engines / "layer_00.engine", tmp_path / "layer_00.engine")
    meta = metadata(engines, "layer_00")
    meta.update(graphs={"layer_00.decode": 0}, profiles=meta["profiles"][1:])
    (tmp_path / "layer_00.engine.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"serves layer_00\.decode, not graph 'layer_00\.prefill': build it with .*--graphs layer_00"):
        open_engine(tmp_path, manifest.graph("layer_00.prefill"), manifest)


def one_error_line(capsys, rc, *needles):
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_no_manifest(tmp_path, capsys):
    one_error_line(capsys, main(["build", "--onnx", str(tmp_path), "--out", str(tmp_path / "e")]), "manifest.json")


def test_unknown_graph_and_target(tiny_export, tmp_path, capsys):
    one_error_line(capsys, main(["build", "--onnx", str(tiny_export), "--out", str(tmp_path / "e"), "--graphs", "layer_99"]), "layer_99")
    one_error_line(capsys, main(["build", "--onnx", str(tiny_export), "--out", str(tmp_path / "e"), "--graphs", "embed",
                                 "--compute-capability", "SM90"]), "SM90")


def _edited_export(tiny_export, dest, edit):
    """The tiny export's files (linked) under a manifest changed by `edit(manifest dict)`."""
    dest.mkdir()
    for f in tiny_export.iterdir():
        if f.name != "manifest.json":
            (dest / f.name).symlink_to(f)
    manifest = json.loads((tiny_export / "manifest.json").read_text())
    edit({g["name"]: g for g in manifest["graphs"]})
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


@pytest.mark.parametrize("case", ["decode port dtype", "decode port shape", "two graphs of one kind share weights"])
def test_graphs_one_engine_cannot_serve_are_refused(tiny_export, tmp_path, capsys, case):
    def edit(graphs):
        if case == "decode port dtype":
            graphs["layer_00.decode"]["inputs"][1]["dtype"] = "float16"
        elif case == "decode port shape":
            graphs["layer_00.decode"]["inputs"][0]["shape"][1] = 2
        else:
            graphs["final"]["weights"] = "lm_head.weights"
    onnx_dir = _edited_export(tiny_export, tmp_path / "onnx", edit)
    needles = {"decode port dtype": ("layer_00.prefill and layer_00.decode share layer_00.weights", "inputs differ"),
               "decode port shape": ("input 'hidden' of layer_00.decode has shape ['batch', 2, 128]", "at seq = 1"),
               "two graphs of one kind share weights": ("graphs final, lm_head share the weights file lm_head.weights",)}[case]
    one_error_line(capsys, main(["build", "--onnx", str(onnx_dir), "--out", str(tmp_path / "e")]), "manifest.json", *needles)
    assert not (tmp_path / "e").exists()


def fake_export(tmp_path, node, inputs, outputs):
    """A one-node export directory (tmp_path/onnx) with a manifest, for the parser's error paths."""
    tmp_path = tmp_path / "onnx"  # beside, not around, the engines folder the tests build into
    tmp_path.mkdir()
    graph = helper.make_graph([node], "g", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    onnx.save(model, tmp_path / "bad.onnx")
    (tmp_path / "bad.weights").write_bytes(b"")
    from qwen3next_trt.export.manifest import FileRecord, GraphRecord, Kind, Manifest, Port, Precision, Role, Source
    from qwen3next_trt.hashing import file_sha256

    port = lambda v: Port(v.name, "float32", [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],  # noqa: E731
                          Role.ACTIVATION)
    onnx_file = tmp_path / "bad.onnx"
    record = GraphRecord("bad", "bad.onnx", "bad.weights", Kind.LM_HEAD, "prefill", None, None, False,
                         [port(v) for v in inputs], [port(v) for v in outputs], bytes=onnx_file.stat().st_size,
                         sha256=file_sha256(onnx_file))
    Manifest(config={"num_hidden_layers": 1, "vocab_size": 8}, precision=Precision.float("fp32"), source=Source("random", "tiny"),
             max_positions=4096, graphs=[record],
             weights={"bad.weights": FileRecord("bad.weights", 0, file_sha256(tmp_path / "bad.weights"))}).write(tmp_path)
    return tmp_path


def vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def test_custom_op_without_plugin_is_an_error(tmp_path, capsys):
    d = fake_export(tmp_path, helper.make_node("NoSuchOp", ["x"], ["y"], domain="com.microsoft"), [vi("x", ["batch", 4])], [vi("y", ["batch", 4])])
    one_error_line(capsys, main(["build", "--onnx", str(d), "--out", str(tmp_path / "e")]), "bad.onnx", "NoSuchOp")
    assert not (tmp_path / "e" / "bad.engine").exists()


def test_plugin_attribute_out_of_range_is_an_error(tmp_path, capsys):
    node = helper.make_node("LinearAttention", ["q", "k", "v", "s", "g", "b"], ["o", "s2"], domain="com.microsoft",
                            q_num_heads=2, kv_num_heads=3, update_rule="gated_delta")
    ins = [vi("q", ["batch", "seq", 32]), vi("k", ["batch", "seq", 32]), vi("v", ["batch", "seq", 48]),
           vi("s", ["batch", 3, 16, 16]), vi("g", ["batch", "seq", 3]), vi("b", ["batch", "seq", 3])]
    outs = [vi("o", ["batch", "seq", 48]), vi("s2", ["batch", 3, 16, 16])]
    d = fake_export(tmp_path, node, ins, outs)
    one_error_line(capsys, main(["build", "--onnx", str(d), "--out", str(tmp_path / "e")]), "bad.onnx", "LinearAttention")
    assert not (tmp_path / "e" / "bad.engine").exists()


@pytest.mark.gpu
def test_engines_run_where_tensorrt_supports_the_gpu(tiny_export, engines):
    import torch

    from qwen3next_trt.engines.session import EngineSession
    from qwen3next_trt.errors import InputError
    from qwen3next_trt.validate.validator import Validator

    if torch.cuda.get_device_capability() == (9, 0):
        # Measured 2026-11-29 on an H200: TensorRT-RTX 1.7 refuses SM90 engines (engines/README.md).
        with pytest.raises(InputError, match="could not deserialize"):
            EngineSession(engines / "embed.engine")
        pytest.skip("TensorRT-RTX does not run on SM90 (Hopper); full TensorRT is needed there")
    report = Validator(tiny_export, backend="tensorrt", engines=engines, progress=lambda m: None).run()
    assert report.passed


def test_engine_from_another_tensorrt_version_is_refused(engines, tmp_path):
    from qwen3next_trt.engines.session import EngineSession
    from qwen3next_trt.errors import InputError

    shutil.copy(engines / "embed.engine", tmp_path / "embed.engine")
    meta = metadata(engines, "embed")
    meta["tensorrt"]["version"] = "0.0.1"
    (tmp_path / "embed.engine.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="built by tensorrt_rtx 0.0.1"):
        EngineSession(tmp_path / "embed.engine")


def test_input_outside_the_profile_is_refused(engines):
    from qwen3next_trt.engines.session import EngineSession
    from qwen3next_trt.errors import InputError

    session = EngineSession.__new__(EngineSession)  # the shape check needs no GPU
    meta = metadata(engines, "layer_03")
    session.path, session.graph, session.profile_index = engines / "layer_03.engine", "layer_03.decode", 1
    session.profile = meta["profiles"][1]
    session._check_shape("past_key", (2, 2, 100, 32))
    with pytest.raises(InputError, match="'past_key' axis 2 = 5000 is outside profile 1 .layer_03.decode."):
        session._check_shape("past_key", (2, 2, 5000, 32))
    # the decode profile takes one token; the prefill profile of the same engine takes 7
    with pytest.raises(InputError, match="'hidden' axis 1 = 7 is outside profile 1 .*takes exactly 1"):
        session._check_shape("hidden", (2, 7, 128))
    session.graph, session.profile_index, session.profile = "layer_03.prefill", 0, meta["profiles"][0]
    session._check_shape("hidden", (2, 7, 128))


def test_sessions_of_a_group_share_one_engine_with_a_context_per_profile(tiny_export, engines, monkeypatch):
    """engine_factory deserialises a group's engine once; each graph's session gets its own execution
    context, set to its profile. The GPU parts (deserialising, CUDA streams) are stood in for."""
    import types

    import torch

    from qwen3next_trt.engines import session as session_module
    from qwen3next_trt.engines import trt as trt_adapter
    from qwen3next_trt.export.manifest import Manifest
    from qwen3next_trt.sessions import engine_factory

    calls = []

    class Context:
        def set_optimization_profile_async(self, index, stream):
            calls.append(("profile", index))
            return True

    class CudaEngine:
        num_optimization_profiles = 2

        def create_execution_context(self, strategy):
            calls.append(("context", str(strategy)))
            return Context()

    def fake_engine_init(self, path, meta=None):
        calls.append(("deserialise", Path(path).name))
        self.path, self.meta, self.T, self.engine = Path(path), meta, trt_adapter.load("tensorrt_rtx"), CudaEngine()

    monkeypatch.setattr(session_module.Engine, "__init__", fake_engine_init)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: types.SimpleNamespace(cuda_stream=0, synchronize=lambda: None))
    manifest = Manifest.load(tiny_export)
    factory = engine_factory(engines, manifest)
    prefill, decode = factory(manifest.graph("layer_00.prefill")), factory(manifest.graph("layer_00.decode"))
    assert prefill.shared is decode.shared and (prefill.profile_index, decode.profile_index) == (0, 1)
    assert prefill.context is not decode.context and decode.profile["hidden"]["max"][1] == 1
    strategy = "ExecutionContextAllocationStrategy.ON_PROFILE_CHANGE"
    assert calls == [("deserialise", "layer_00.engine"), ("context", strategy), ("profile", 0), ("context", strategy), ("profile", 1)]
    del prefill, decode  # the engine goes with its last session
    factory(manifest.graph("layer_00.decode"))
    assert calls[-3][0] == "deserialise"


def test_fp16_export_builds_with_fused_attention(tmp_path):
    from qwen3next_trt.export.exporter import Exporter

    onnx_dir, out = tmp_path / "onnx", tmp_path / "eng"
    Exporter("tiny", onnx_dir, dtype="fp16", layers="0,3,final", progress=lambda m: None).run()
    assert main(["build", "--onnx", str(onnx_dir), "--out", str(out)]) == 0
    meta = metadata(out, "layer_03")
    assert meta["builder"]["float32_attention_decomposed"] == 0  # 16-bit attention uses TensorRT's fused kernel
    counts, plugins = layer_types(meta)
    assert counts["ATTENTION_OUTPUT"] == 1 and plugins == ["MoE"]
    assert layer_types(metadata(out, "layer_00"))[1] == ["CausalConvWithState", "LinearAttention", "MoE"]


def test_metadata_records_the_plugin_library_and_what_feeds_each_plugin(engines):
    import hashlib

    meta = metadata(engines, "layer_00")
    lib = meta["plugin_library"]
    with open(lib["path"], "rb") as f:
        assert lib["sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert lib["embedded"] is False and lib["path"].endswith("libqwen3next_trt_plugins.so")
    plugin_layers = {lay["plugin"]: lay for lay in meta["layers"] if "plugin" in lay}
    # input counts and dtypes of the fp32 export's com.microsoft nodes (ONNX Runtime contrib schemas);
    # the DeltaNet recurrent state is float32 in every export
    assert [t["dtype"] for t in plugin_layers["LinearAttention"]["inputs"]] == ["FLOAT"] * 6
    assert [t["dtype"] for t in plugin_layers["CausalConvWithState"]["inputs"]] == ["FLOAT"] * 4
    assert [t["dtype"] for t in plugin_layers["MoE"]["inputs"]] == ["FLOAT"] * 6
    assert all(t["name"] for lay in plugin_layers.values() for t in lay["inputs"])


def test_embedded_plugin_library_grows_the_plan_by_the_library(tiny_export, engines, tmp_path):
    out = tmp_path / "eng"
    assert main(["build", "--onnx", str(tiny_export), "--out", str(out), "--graphs", "layer_00", "--embed-plugins"]) == 0
    meta, plain = metadata(out, "layer_00"), metadata(engines, "layer_00")
    assert meta["plugin_library"]["embedded"] is True
    size = Path(meta["plugin_library"]["path"]).stat().st_size
    assert meta["engine_bytes"] - plain["engine_bytes"] >= 0.9 * size
