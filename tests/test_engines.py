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


def test_every_graph_has_an_engine_and_metadata(tiny_export, engines):
    manifest = json.loads((tiny_export / "manifest.json").read_text())
    for g in manifest["graphs"]:
        meta = metadata(engines, g["name"])
        assert (engines / meta["engine"]).stat().st_size == meta["engine_bytes"] > 0
        assert meta["tensorrt"]["flavour"] == "tensorrt_rtx" and meta["compute_capabilities"] == ["SM80", "SM89", "SM120"]
        assert meta["builder"]["strongly_typed"] and len(meta["onnx_sha256"]) == 64 and len(meta["weights_sha256"]) == 64
        assert [p["name"] for p in meta["inputs"]] == [p["name"] for p in g["inputs"]]
    assert not list(engines.glob("*.tmp")) and (engines / "timing.cache").stat().st_size > 0


def layer_types(meta):
    types = [lay["type"] for lay in meta["layers"]]
    return {t: types.count(t) for t in set(types)}, sorted(lay["plugin"] for lay in meta["layers"] if "plugin" in lay)


def test_layer_lists_hold_our_plugins_and_native_attention(engines):
    cfg = load_preset("tiny")
    for i, kind in enumerate(cfg.layer_types):
        for mode in ("prefill", "decode"):
            counts, plugins = layer_types(metadata(engines, f"layer_{i:02d}.{mode}"))
            if kind == "linear_attention":
                assert plugins == ["CausalConvWithState", "LinearAttention", "MoE"]
                assert "ATTENTION_OUTPUT" not in counts
            else:
                assert plugins == ["MoE"]
                assert counts["ATTENTION_INPUT"] == counts["ATTENTION_OUTPUT"] == 1 and counts["ROTARY_EMBEDDING"] == 2
    counts, plugins = layer_types(metadata(engines, "model.prefill"))
    assert plugins.count("LinearAttention") == 6 and plugins.count("CausalConvWithState") == 6 and plugins.count("MoE") == 8
    assert counts["ATTENTION_OUTPUT"] == 2 and counts["ROTARY_EMBEDDING"] == 4


def test_profiles_follow_the_manifest_dims(engines):
    meta = metadata(engines, "layer_03.decode")
    past = meta["profiles"][0]["past_key"]
    assert past["min"][2] == 0 and past["max"][2] == 4095 and past["min"][0] == 1 and past["max"][0] == 4
    assert meta["profiles"][0]["hidden"]["max"][1] == 1  # decode: one token


def test_unchanged_graphs_are_not_rebuilt_and_changed_weights_are(tiny_export, engines, tmp_path, capsys):
    onnx_dir, out = tmp_path / "onnx", tmp_path / "eng"
    shutil.copytree(tiny_export, onnx_dir)
    shutil.copytree(engines, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.engine")}
    # metadata points at the original export; the hashes are what decide
    assert main(["build", "--onnx", str(onnx_dir), "--out", str(out), "--graphs", "layer_00,layer_01,final"]) == 0
    assert "built " not in capsys.readouterr().out
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
    assert changed == {"layer_01.prefill.engine", "layer_01.decode.engine"}


def test_inspect_prints_metadata_and_layers(engines, capsys):
    assert main(["inspect", str(engines / "layer_00.prefill.engine")]) == 0
    out = capsys.readouterr().out
    assert "-> plugin LinearAttention" in out and "tensorrt_rtx 1.7" in out and "recurrent_state" in out
    assert main(["inspect", str(engines)]) == 0
    assert "layer_07.decode" in capsys.readouterr().out


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
    session.path, session.profile = engines / "layer_03.decode.engine", metadata(engines, "layer_03.decode")["profiles"][0]
    session._check_shape("past_key", (2, 2, 100, 32))
    with pytest.raises(InputError, match="'past_key' axis 2 = 5000 is outside"):
        session._check_shape("past_key", (2, 2, 5000, 32))


def test_fp16_export_builds_with_fused_attention(tmp_path):
    from qwen3next_trt.export.exporter import Exporter

    onnx_dir, out = tmp_path / "onnx", tmp_path / "eng"
    Exporter("tiny", onnx_dir, dtype="fp16", layers="0,3,final", progress=lambda m: None).run()
    assert main(["build", "--onnx", str(onnx_dir), "--out", str(out)]) == 0
    meta = metadata(out, "layer_03.prefill")
    assert meta["builder"]["float32_attention_decomposed"] == 0  # 16-bit attention uses TensorRT's fused kernel
    counts, plugins = layer_types(meta)
    assert counts["ATTENTION_OUTPUT"] == 1 and plugins == ["MoE"]
    assert layer_types(metadata(out, "layer_00.decode"))[1] == ["CausalConvWithState", "LinearAttention", "MoE"]


def test_metadata_records_the_plugin_library_and_what_feeds_each_plugin(engines):
    import hashlib

    meta = metadata(engines, "layer_00.prefill")
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
    assert main(["build", "--onnx", str(tiny_export), "--out", str(out), "--graphs", "layer_00.decode", "--embed-plugins"]) == 0
    meta, plain = metadata(out, "layer_00.decode"), metadata(engines, "layer_00.decode")
    assert meta["plugin_library"]["embedded"] is True
    size = Path(meta["plugin_library"]["path"]).stat().st_size
    assert meta["engine_bytes"] - plain["engine_bytes"] >= 0.9 * size
