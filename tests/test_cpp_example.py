"""examples/cpp (the C++ host example and the trtexec command printer) on the CPU: nothing of TensorRT can
run here, so decode_step.cpp is compiled against the TensorRT headers the plugin library is built with
(plugins/build.py: $TENSORRT_ROOT, the system's, else TensorRT 10.14's from kernel-lens) and the CUDA
toolkit's, with -Wall -Wextra and no warning allowed; then linked against a stand-in libnvinfer (the two
functions it calls by name) to run its argument checks, which come before any CUDA or TensorRT call.
trtexec_commands.py is checked on a hand-made manifest with the tiny preset's port layouts."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess

import pytest

from qwen3next_trt.export.manifest import (FileRecord, GraphRecord, Kind, Manifest, Port, Precision, Role,
                                           Source)
from qwen3next_trt.plugins import build

EXAMPLE_DIR = build.PLUGIN_DIR.parent / "examples" / "cpp"
SOURCE = EXAMPLE_DIR / "decode_step.cpp"
# The stand-in for libnvinfer: the only functions decode_step.cpp calls by name (the rest are virtual calls).
STUB = """#include <cstdint>
extern "C" void* createInferRuntime_INTERNAL(void*, int32_t) noexcept { return nullptr; }
extern "C" int32_t getInferLibVersion() noexcept { return 0; }
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """decode_step.cpp compiled to an object: (object path, g++'s stderr)."""
    if shutil.which("g++") is None:
        pytest.skip("no g++ to compile examples/cpp/decode_step.cpp")
    try:
        include = build.tensorrt_headers()[0]
    except build.PluginHeadersError as e:  # CI has the headers (kernel-lens): never skips there
        pytest.skip(str(e))
    # plugins/build.py's CUDA toolkit ($CUDA_HOME, else /usr/local/cuda; the nvcc on PATH may be a wrapper)
    cuda = build._cuda_home()
    if not (cuda / "include" / "cuda_runtime_api.h").is_file():
        pytest.skip(f"no CUDA runtime headers in {cuda / 'include'} (set CUDA_HOME)")
    d = tmp_path_factory.mktemp("decode_step")
    # -isystem: warnings inside TensorRT's own headers (deprecations, unused parameters) are not the example's
    result = subprocess.run(["g++", "-std=c++17", "-O2", "-Wall", "-Wextra", "-isystem", str(include), "-isystem",
                             str(cuda / "include"), "-c", str(SOURCE), "-o", str(d / "decode_step.o")],
                            capture_output=True, text=True)
    assert result.returncode == 0, f"decode_step.cpp does not compile against {include}:\n{result.stderr}"
    return d / "decode_step.o", result.stderr, cuda


def test_decode_step_compiles_without_warnings(compiled):
    _, stderr, _ = compiled
    assert stderr == "", f"g++ -Wall -Wextra warned about examples/cpp/decode_step.cpp:\n{stderr}"


@pytest.fixture(scope="module")
def decode_step(compiled, tmp_path_factory):
    obj, _, cuda = compiled
    d = tmp_path_factory.mktemp("decode_step_exe")
    (d / "stub.cpp").write_text(STUB)
    subprocess.run(["g++", "-shared", "-fPIC", str(d / "stub.cpp"), "-o", str(d / "libnvinfer.so")], check=True, capture_output=True)
    # the CUDA runtime linked statically, like the plugin harness: nothing here reaches a CUDA call
    result = subprocess.run(["g++", str(obj), "-o", str(d / "decode_step"), f"-L{d}", "-lnvinfer", f"-Wl,-rpath,{d}",
                             f"-L{cuda / 'lib64'}", "-lcudart_static", "-ldl", "-lpthread", "-lrt"], capture_output=True, text=True)
    assert result.returncode == 0, f"decode_step does not link (a TensorRT function it calls by name is missing?):\n{result.stderr}"
    return d / "decode_step"


def run(exe, *args):
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=30)


def test_decode_step_arguments(decode_step, tmp_path):
    usage = run(decode_step)
    assert usage.returncode == 2 and usage.stderr.startswith("usage:") and "EMBED LAYER... FINAL" in usage.stderr
    assert run(decode_step, tmp_path / "embed.engine").returncode == 2  # one engine is not a model
    engine = tmp_path / "x.engine"
    engine.write_bytes(b"not a plan")
    cases = {
        ("--token", "-1", engine, engine): "error: --token: expected a whole number >= 0, got '-1'",
        ("--runs", "0", engine, engine): "error: --runs: expected a whole number >= 1, got '0'",
        ("--past", "x", engine, engine): "error: --past: expected a whole number >= 0, got 'x'",
        ("--bogus", engine, engine): "error: unknown option or missing value: --bogus",
        (engine, engine, "--plugins"): "error: unknown option or missing value: --plugins",
        (engine, tmp_path / "missing.engine"): f"error: {tmp_path / 'missing.engine'}: cannot open",
    }
    (tmp_path / "empty.engine").write_bytes(b"")
    cases[(tmp_path / "empty.engine", engine)] = f"error: {tmp_path / 'empty.engine'}: empty file, not an engine"
    for args, message in cases.items():
        r = run(decode_step, *args)
        assert (r.returncode, r.stderr.strip()) == (1, message), args


# -- trtexec_commands.py ---------------------------------------------------------------------------------------

def _commands_module():
    spec = importlib.util.spec_from_file_location("trtexec_commands", EXAMPLE_DIR / "trtexec_commands.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_manifest(dtype: str) -> Manifest:
    """embed, a DeltaNet layer, an attention layer and final, with the ports the tiny preset exports."""
    f, act, s_in = ("float32" if dtype == "fp32" else "float16"), Role.ACTIVATION, Role.STATE_IN

    def layer(i, kind, mode):
        seq = "seq" if mode == "prefill" else 1
        if kind == Kind.LINEAR_ATTENTION:
            ins = [Port("conv_state", f, ["batch", 256, 3], s_in, "conv_state"),
                   Port("recurrent_state", "float32", ["batch", 4, 32, 32], s_in, "recurrent_state")]
            ops = {"com.microsoft::LinearAttention": 1, "com.microsoft::CausalConvWithState": 1, "com.microsoft::MoE": 1}
        else:
            ins = [Port("position_ids", "int64", ["batch", seq], Role.POSITION),
                   Port("attention_mask", "bool", ["batch", f"past + {seq}"], Role.MASK),
                   Port("past_key", f, ["batch", 2, "past", 32], s_in, "key"),
                   Port("past_value", f, ["batch", 2, "past", 32], s_in, "value")]
            ops = {"Attention": 1, "com.microsoft::MoE": 1}
        return GraphRecord(f"layer_{i:02d}.{mode}", f"layer_{i:02d}.{mode}.onnx", f"layer_{i:02d}.weights", kind, mode, i, None, True,
                           [Port("hidden", f, ["batch", seq, 128], act), *ins], [Port("hidden_out", f, ["batch", seq, 128], act)],
                           ops=ops)

    graphs = [GraphRecord("embed", "embed.onnx", "embed.weights", Kind.EMBED, "any", None, None, False,
                          [Port("input_ids", "int64", ["batch", "seq"], Role.TOKENS)], [Port("hidden", f, ["batch", "seq", 128], act)],
                          ops={"Gather": 1}),
              *(layer(i, k, m) for i, k in enumerate((Kind.LINEAR_ATTENTION, Kind.FULL_ATTENTION)) for m in ("prefill", "decode")),
              GraphRecord("final", "final.onnx", "final.weights", Kind.FINAL, "any", None, None, False, [Port("hidden", f, ["batch", "seq", 128], act)],
                          [Port("logits", f, ["batch", "seq", 512], act)], ops={"MatMul": 1})]
    weights = {g.weights: FileRecord(g.weights, 0, "") for g in graphs}
    return Manifest({"num_hidden_layers": 2, "vocab_size": 512}, Precision.float(dtype), Source("random", "tiny"), 4096, graphs, weights)


def test_trtexec_commands(tmp_path, capsys):
    tc = _commands_module()
    from qwen3next_trt.engines.builder import Limits

    lib, out, onnx = "/opt/libqwen3next_trt_plugins.so", tmp_path / "trt", tmp_path / "onnx"
    argvs = {a[2].split("/")[-1]: a for a in tc.commands(_tiny_manifest("fp16"), onnx, out, lib, Limits(), per_graph=True)}
    assert list(argvs) == ["embed.engine", "layer_00.prefill.engine", "layer_00.decode.engine", "layer_01.prefill.engine",
                           "layer_01.decode.engine", "final.engine"]
    embed = argvs["embed.engine"]
    assert embed[:6] == ["trtexec", f"--onnx={onnx}/embed.onnx", f"--saveEngine={out}/embed.engine", "--stronglyTyped",
                         "--skipInference", f"--timingCacheFile={out}/timing.cache"]
    # qwen3next-trt build's ranges (engines/README.md): batch 1, 2, 4; seq 1, 128, 256 (decode 1); past 0, 1024, 4095
    assert embed[6:] == ["--minShapes=input_ids:1x1", "--optShapes=input_ids:2x128", "--maxShapes=input_ids:4x256"]
    assert f"--dynamicPlugins={lib}" in argvs["layer_00.decode.engine"] and not any("Plugins" in a for a in embed)
    assert argvs["layer_00.decode.engine"][-3:] == [
        "--minShapes=hidden:1x1x128,conv_state:1x256x3,recurrent_state:1x4x32x32",
        "--optShapes=hidden:2x1x128,conv_state:2x256x3,recurrent_state:2x4x32x32",
        "--maxShapes=hidden:4x1x128,conv_state:4x256x3,recurrent_state:4x4x32x32"]
    assert argvs["layer_01.prefill.engine"][-1] == ("--maxShapes=hidden:4x256x128,position_ids:4x256,attention_mask:4x4351,"
                                                     "past_key:4x2x4095x32,past_value:4x2x4095x32")
    assert not any(a.startswith("--decomposableAttentions") for a in argvs["layer_01.decode.engine"])  # 16-bit: fused

    # the layout of `qwen3next-trt build`: one engine per weights group, a layer's from its prefill graph with
    # profile 0 prefill and profile 1 decode; the three shape flags follow each --profile
    two = {a[2].split("/")[-1]: a for a in tc.commands(_tiny_manifest("fp32"), onnx, out, lib, Limits(), embed_plugins=True)}
    assert list(two) == ["embed.engine", "layer_00.engine", "layer_01.engine", "final.engine"]
    attn = two["layer_01.engine"]
    assert attn[1] == f"--onnx={onnx}/layer_01.prefill.onnx" and f"--setPluginsToSerialize={lib}" in attn
    assert "--decomposableAttentions=*" in attn  # float32 attention: TensorRT's fused kernels take 16-bit only
    p = attn.index("--profile=0")
    assert [a.split("=")[0] for a in attn[p:]] == ["--profile", "--minShapes", "--optShapes", "--maxShapes"] * 2
    assert attn[p + 5:] == [
        "--minShapes=hidden:1x1x128,position_ids:1x1,attention_mask:1x1,past_key:1x2x0x32,past_value:1x2x0x32",
        "--optShapes=hidden:2x1x128,position_ids:2x1,attention_mask:2x1025,past_key:2x2x1024x32,past_value:2x2x1024x32",
        "--maxShapes=hidden:4x1x128,position_ids:4x1,attention_mask:4x4096,past_key:4x2x4095x32,past_value:4x2x4095x32"]

    # timing one decode step: embed, each layer's decode engine (profile 1 of a two-profile one), final
    timed = tc.commands(_tiny_manifest("fp16"), onnx, out, lib, Limits(), time=True, batch=1, past=7)
    assert [a[1] for a in timed] == [f"--loadEngine={out}/{n}.engine" for n in ("embed", "layer_00", "layer_01", "final")]
    assert timed[2][2:] == [f"--dynamicPlugins={lib}", "--useProfile=1", "--shapes=hidden:1x1x128,position_ids:1x1,"
                            "attention_mask:1x8,past_key:1x2x7x32,past_value:1x2x7x32"]
    assert timed[0][2:] == ["--shapes=input_ids:1x1"]
    timed = tc.commands(_tiny_manifest("fp16"), onnx, out, lib, Limits(), per_graph=True, time=True)
    assert [a[1].split("/")[-1] for a in timed] == ["embed.engine", "layer_00.decode.engine", "layer_01.decode.engine",
                                                    "final.engine"]
    assert timed[2][-1].endswith("attention_mask:1x1025,past_key:1x2x1024x32,past_value:1x2x1024x32")  # past: the opt 1024

    # the command line reads an export's manifest.json; a folder without one: one line, exit 2
    assert tc.main(["--onnx", str(tmp_path), "--plugins", lib, "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'manifest.json'}: not found")
    _tiny_manifest("fp16").write(onnx)
    assert tc.main(["--onnx", str(onnx), "--plugins", lib, "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"mkdir -p {out}" and len(lines) == 5 and all(line.startswith("trtexec --onnx=") for line in lines[1:])
