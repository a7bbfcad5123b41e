"""The C++ TensorRT plugin library (libqwen3next_trt_plugins.so) on the CPU: a harness program
(tests/plugin_harness/harness.cpp) dlopens it with no TensorRT in the process and calls every plugin
method but enqueue the way TensorRT does. Oracles: ONNX Runtime's com.microsoft contrib schemas and
the Python plugins (plugins/<op>/binding.py: fields, defaults, attribute checks, dtypes, formats), the
MoE workspace formula of the kernel's contract, and, for the load-time registration, stand-in
TensorRT runtime libraries (tests/plugin_harness/registry.cpp) that refuse a creator name twice."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import types

import pytest

from qwen3next_trt.cli import main
from qwen3next_trt.plugins import build
from qwen3next_trt.plugins.bindings import op_specs

HARNESS_DIR = build.PLUGIN_DIR.parent / "tests" / "plugin_harness"
# TensorRT's enum values (NvInferRuntimeBase.h / NvInferPluginBase.h): DataType and PluginFieldType
DT = {"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3, "BOOL": 4, "UINT8": 5, "FP8": 6, "BF16": 7, "INT64": 8}
FIELD_TYPE = {"int": 5, "float": 1, "str": 6}  # kINT32, kFLOAT32, kCHAR: what the ONNX parser passes
ORT_ATTR_KIND = {"INT": "int", "FLOAT": "float", "STRING": "str"}
LINEAR, CHW32 = 0, 5
SPECS = {s.name: s for s in op_specs()}
# For the Python plugins' own functions: a stand-in tensorrt module with TensorRT's DataType values.
FAKE_TRT = types.SimpleNamespace(DataType=types.SimpleNamespace(**DT), DimsExprs=list)

needs_compilers = pytest.mark.skipif(build.find_cuda_tool("nvcc") is None, reason="nvcc not found: the library cannot be built")


def _gxx(*args):
    subprocess.run(["g++", "-std=c++17", "-O0", "-Wno-deprecated-declarations", f"-I{build.tensorrt_headers()[0]}",
                    f"-I{build._cuda_home() / 'include'}", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def library():
    try:
        return build.cpp_library_path(progress=lambda m: None)
    except build.PluginHeadersError as e:
        # a GPU machine without TensorRT headers (the device): bench/device/cpp_plugins_gpu.sh carries a
        # prebuilt library; CI has the headers (kernel-lens), so the CPU tests never skip for this
        pytest.skip(f"no prebuilt library and {e}")


# A harness built elsewhere (a GPU machine without g++ or TensorRT headers: bench/device/cpp_plugins_gpu.sh)
HARNESS_ENV = "QWEN3NEXT_TRT_PLUGIN_HARNESS"


@pytest.fixture(scope="module")
def harness_exe(tmp_path_factory):
    if os.environ.get(HARNESS_ENV):
        return os.environ[HARNESS_ENV]
    prebuilt = f"set {HARNESS_ENV} to a prebuilt one (bench/device/cpp_plugins_gpu.sh)"
    if shutil.which("g++") is None:
        pytest.skip(f"no g++ to build the harness: {prebuilt}")
    d = tmp_path_factory.mktemp("harness_exe")
    try:
        # the CUDA runtime linked statically: only the `enqueue` command (GPU tests) calls it
        _gxx(str(HARNESS_DIR / "harness.cpp"), "-o", str(d / "harness"), f"-L{build._cuda_home() / 'lib64'}", "-lcudart_static",
             "-ldl", "-lpthread", "-lrt")
    except build.PluginHeadersError as e:  # CI has the headers (kernel-lens): only a bare GPU machine skips
        pytest.skip(f"{e}; or {prebuilt}")
    return d / "harness"


@pytest.fixture(scope="module")
def tools(tmp_path_factory, harness_exe):
    """The harness and stand-in runtimes: libnvinfer.so.10 (the registry layout of the 10.14 headers
    the library is built with here) and libtensorrt_rtx.so.1 (11.x layout: must be left alone)."""
    d = tmp_path_factory.mktemp("harness")
    _gxx("-fPIC", "-c", str(HARNESS_DIR / "registry.cpp"), "-o", str(d / "registry.o"))
    runtimes = {}
    for soname in ("libnvinfer.so.10", "libtensorrt_rtx.so.1"):
        (d / soname.split(".")[0]).mkdir()
        runtimes[soname] = d / soname.split(".")[0] / soname
        subprocess.run(["g++", "-shared", f"-Wl,-soname,{soname}", str(d / "registry.o"), "-o", str(runtimes[soname])],
                       check=True, capture_output=True)
    return harness_exe, runtimes


class Harness:
    def __init__(self, exe, library):
        self.proc = subprocess.Popen([str(exe), str(library)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def __call__(self, line: str) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0


@pytest.fixture(scope="module")
def harness(harness_exe, library):
    h = Harness(harness_exe, library)
    yield h
    h.close()


def ort_schema(name):
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    return next(s for s in C.get_all_operator_schema() if s.domain == "com.microsoft" and s.name == name)


def field_arg(f, value) -> str:
    return f"{f.name}=" + {"int": "i", "float": "f", "str": "s"}[f.kind] + f":{value}"


# A valid, non-default attribute set per op (the tiny model's shapes), and the input shapes that go with it.
VALID = {
    "LinearAttention": {"q_num_heads": 2, "kv_num_heads": 4, "update_rule": "gated_delta", "scale": 0.125, "chunk_size": 32},
    "CausalConvWithState": {"activation": "none", "ndim": 1},
    "MoE": {"k": 4, "activation_type": "swiglu", "swiglu_fusion": 1, "normalize_routing_weights": 0, "use_sparse_mixer": 0,
            "activation_alpha": 1.0, "activation_beta": 0.0},
}
# distinct sizes everywhere, so an output copied from the wrong input shows
SHAPES = {
    "LinearAttention": ["3x5x64", "3x5x64", "3x5x96", "3x4x32x24", "3x5x4", "3x5x4"],
    "CausalConvWithState": ["3x40x5", "40x1x4", "40", "3x40x3"],
    "MoE": ["3x5x64", "15x16", "16x96x64", "16x96", "16x64x48", "16x64"],
}


def create(harness, op, values, name="node0", phase="build"):
    spec = SPECS[op]
    args = " ".join(field_arg(f, values[f.name]) for f in spec.fields if f.name in values)
    return harness(f"create {op} {name} {phase} {args}")


@needs_compilers
def test_library_links_no_tensorrt_and_exports_the_entry_points(library):
    needed = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True, check=True).stdout
    libs = {line.split("[")[1].rstrip("]") for line in needed.splitlines() if "(NEEDED)" in line}
    assert not [n for n in libs if "nvinfer" in n or "tensorrt" in n or "cudart" in n], libs  # cudart is static
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True, check=True).stdout
    exported = {line.split()[-1] for line in symbols.splitlines()}
    assert {"getCreators", "setLoggerFinder", *build.SYMBOLS} <= exported
    info = build.cpp_library_info(build=False)
    assert info["path"] == str(library) and info["headers_from"] == build.KERNEL_LENS or os.environ.get("TENSORRT_ROOT")


@needs_compilers
def test_creators_match_the_python_plugins_and_onnx_runtime_schemas(harness):
    creators = {c["name"]: c for c in harness("creators")["creators"]}
    assert sorted(creators) == sorted(SPECS) == sorted(build.CPP_PLUGINS)
    for name, spec in SPECS.items():
        c, schema = creators[name], ort_schema(name)
        assert (c["interface"], c["interface_version"], c["version"], c["namespace"]) == ("PLUGIN CREATOR_V3ONE", [1, 0], "1", "")
        assert [f["name"] for f in c["fields"]] == [f.name for f in spec.fields]
        for f, cf in zip(spec.fields, c["fields"]):
            assert cf["type"] == FIELD_TYPE[f.kind], f.name
            # the parser forwards an ONNX attribute only when a field of that name is declared
            assert ORT_ATTR_KIND[str(schema.attributes[f.name].type).split(".")[-1]] == f.kind, f.name


@needs_compilers
@pytest.mark.parametrize("op", sorted(SPECS))
def test_create_serialise_clone_round_trip(harness, op):
    spec, schema = SPECS[op], ort_schema(op)
    r = create(harness, op, VALID[op])
    assert r["ok"], r
    assert r["interfaces"] == ["PLUGIN_V3ONE_CORE", "PLUGIN_V3ONE_BUILD", "PLUGIN_V3ONE_RUNTIME"] and r["attached"]
    assert (r["name"], r["version"], r["namespace"]) == (op, "1", "")
    assert r["nb_outputs"] == spec.num_outputs == len(schema.outputs)
    assert {f["name"]: f["value"] for f in r["fields"]} == pytest.approx(VALID[op])
    assert r["round_trip"] == r["fields"] and r["clone_fields"] == r["fields"] and r["clone_name"] == op
    # fields left out take the Python plugin's defaults
    r = harness(f"create {op} node1 runtime")
    if spec.validate({f.name: f.default for f in spec.fields}) is None:
        assert {f["name"]: f["value"] for f in r["fields"]} == pytest.approx({f.name: f.default for f in spec.fields})
    else:
        assert not r["ok"]


@needs_compilers
def test_integer_and_float_fields_also_come_as_64_bit(harness):
    r = harness("create MoE n build k=l:3 activation_alpha=d:1.5")
    assert r["ok"] and {f["name"]: f["value"] for f in r["fields"]}["k"] == 3
    assert {f["name"]: f["value"] for f in r["fields"]}["activation_alpha"] == 1.5


BAD = [  # (op, attribute overrides, the field the error must name)
    ("LinearAttention", {"q_num_heads": 2, "kv_num_heads": 3}, "kv_num_heads"),
    ("LinearAttention", {"q_num_heads": 0, "kv_num_heads": 4}, "q_num_heads"),
    ("LinearAttention", {"q_num_heads": 2, "kv_num_heads": 4, "update_rule": "delta"}, "update_rule"),
    ("CausalConvWithState", {"activation": "gelu"}, "activation"),
    ("CausalConvWithState", {"ndim": 2}, "ndim"),
    ("MoE", {"activation_type": "gelu"}, "activation_type"),
    ("MoE", {"swiglu_fusion": 0}, "swiglu_fusion"),
    ("MoE", {"use_sparse_mixer": 1}, "use_sparse_mixer"),
    ("MoE", {"k": 0}, "k"),
]


@needs_compilers
@pytest.mark.parametrize("op,override,field", BAD)
def test_bad_attribute_values_are_refused_through_the_logger(harness, op, override, field):
    spec = SPECS[op]
    values = {**{f.name: f.default for f in spec.fields}, **VALID[op], **override}
    # the Python plugin refuses them too
    problems = [f.name for f in spec.fields if f.check and f.check(values[f.name])]
    assert problems or spec.validate(values) is not None
    r = create(harness, op, values, name="bad_node")
    assert not r["ok"]
    assert "bad_node" in r["error"] and op in r["error"] and field in r["error"], r["error"]
    assert r["logged"] == [f"1:{r['error']}"]  # ILogger::Severity::kERROR


@needs_compilers
def test_field_of_the_wrong_type_is_refused(harness):
    r = harness("create MoE n build k=h:0")
    assert not r["ok"] and "k: expected an integer" in r["error"]
    r = harness("create MoE n build k=l:4294967296")
    assert not r["ok"] and "32-bit" in r["error"]


@needs_compilers
@pytest.mark.parametrize("op", sorted(SPECS))
def test_output_types_and_shapes_match_the_python_plugins(harness, op):
    spec = SPECS[op]
    assert create(harness, op, VALID[op])["ok"]
    n = len(SHAPES[op])
    for base in ("FLOAT", "HALF", "BF16"):
        ins = [DT["FLOAT"] if op == "LinearAttention" and i == 3 else DT[base] for i in range(n)]
        r = harness("types " + " ".join(map(str, ins)))
        assert r["rc"] == 0 and r["out"] == spec.output_dtypes(ins, FAKE_TRT), (base, r)
    dims = [[int(d) for d in s.split("x")] for s in SHAPES[op]]
    r = harness("shapes " + " ".join(SHAPES[op]))
    assert r["rc"] == 0 and r["out"] == spec.output_shapes(VALID[op], dims, None, FAKE_TRT)
    assert harness("shapes " + " ".join(SHAPES[op][:-1]))["rc"] != 0  # an input short


@needs_compilers
@pytest.mark.parametrize("op", sorted(SPECS))
def test_supported_formats_match_the_python_plugins(harness, op):
    spec = SPECS[op]
    assert create(harness, op, VALID[op])["ok"]
    n_in, n_out = len(SHAPES[op]), spec.num_outputs
    candidates = ("FLOAT", "HALF", "BF16", "FP8", "INT32", "INT8")
    for base in ("FLOAT", "HALF", "BF16"):
        io = [DT["FLOAT"] if op == "LinearAttention" and i in (3, n_in + 1) else DT[base] for i in range(n_in + n_out)]
        for pos in range(n_in + n_out):
            for t in candidates:
                trial = list(io)
                trial[pos] = DT[t]
                descs = [types.SimpleNamespace(type=x) for x in trial]
                want = bool(spec.supports(pos, descs, n_in, FAKE_TRT))
                got = harness(f"supports {pos} {LINEAR} " + " ".join(map(str, trial)))["supported"]
                assert got == want, (base, pos, t)
        assert not harness(f"supports 0 {CHW32} " + " ".join(map(str, io)))["supported"]


@needs_compilers
def test_moe_takes_fp8_experts_with_float32_block_scales(harness):
    """The FP8 form (8 inputs: fc1/fc2 float8 e4m3, then their float32 block scales): what q3n_moe_fp8
    takes (plugins/moe/README.md); float weights are refused there, FP8 ones in the float form."""
    assert create(harness, "MoE", VALID["MoE"])["ok"]
    for act in ("FLOAT", "HALF", "BF16"):
        io = [DT[act], DT[act], DT["FP8"], DT[act], DT["FP8"], DT[act], DT["FLOAT"], DT["FLOAT"], DT[act]]
        for pos in range(9):
            assert harness(f"supports {pos} {LINEAR} " + " ".join(map(str, io)))["supported"], (act, pos)
        for pos, wrong in ((2, act), (4, act), (6, "HALF"), (7, "FP8"), (0, "FP8")):
            if wrong == "FLOAT" and pos in (6, 7):
                continue
            trial = list(io)
            trial[pos] = DT[wrong]
            assert not harness(f"supports {pos} {LINEAR} " + " ".join(map(str, trial)))["supported"], (act, pos, wrong)
    fp8_shapes = SHAPES["MoE"] + ["16x1x1", "16x1x1"]
    assert harness("shapes " + " ".join(fp8_shapes))["out"] == [[3, 5, 64]]
    assert harness("shapes " + " ".join(fp8_shapes[:7]))["rc"] != 0  # 7 inputs: neither form


@needs_compilers
def test_workspace_sizes(harness):
    for op in ("LinearAttention", "CausalConvWithState"):
        assert create(harness, op, VALID[op])["ok"]
        assert harness("workspace " + " ".join(SHAPES[op]))["bytes"] == 0
    assert create(harness, "MoE", VALID["MoE"])["ok"]
    # the kernel's contract (tests/test_plugin_kernels.py, formula from plugins/moe/kernel.cu's layout) at the
    # profile's largest shapes: 3x5 tokens, 16 experts, k 4, hidden 64, inter 48
    tokens, experts, k, hidden, inter = 15, 16, 4, 64, 48
    align = lambda n: -(-n // 256) * 256  # noqa: E731
    pairs = tokens * k
    expect = 2 * align(4 * pairs) + align(4 * pairs * inter)
    expect += align(4 * experts) + 2 * align(4 * (experts + 1)) + 2 * align(4 * pairs) + align(4 * pairs * hidden)
    assert harness("workspace " + " ".join(SHAPES["MoE"]))["bytes"] == expect
    # LinearAttention at Dk = 128 (2 key / 4 value heads) and 100 tokens: the split prefill's factors, 2 chunks of
    # 64x64 M and P plus 64 G floats per (batch, value head); the kernel's contract in tests/test_plugin_kernels.py
    assert create(harness, "LinearAttention", VALID["LinearAttention"])["ok"]
    la_shapes = ["3x100x256", "3x100x256", "3x100x512", "3x4x128x128", "3x100x4", "3x100x4"]
    assert harness("workspace " + " ".join(la_shapes))["bytes"] == 3 * 4 * 2 * (2 * 64 * 64 + 64) * 4
    # the Python plugins (plugins/*/binding.py) ask for the same bytes as their C++ twins
    for op, shapes in (("LinearAttention", la_shapes), ("MoE", SHAPES["MoE"]), ("CausalConvWithState", SHAPES["CausalConvWithState"])):
        assert create(harness, op, VALID[op])["ok"]
        values = {f.name: VALID[op].get(f.name, f.default) for f in SPECS[op].fields}
        descs = [types.SimpleNamespace(max=[int(d) for d in s.split("x")]) for s in shapes]
        assert SPECS[op].workspace(values, descs, []) == harness("workspace " + " ".join(shapes))["bytes"], op


def selfreg(tools, library, runtime, *more):
    r = subprocess.run([str(tools[0]), "selfreg", str(runtime), str(library), *map(str, more)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@needs_compilers
def test_registers_itself_when_dlopened_and_hands_over_to_load_library(tools, library, tmp_path):
    """Triton's TensorRT backend only dlopens: the library finds the runtime's getPluginRegistry and
    registers; when TensorRT's loadLibrary then calls getCreators, the registry must not end up
    with the creators twice (TensorRT refuses the second registration of a name)."""
    copy = tmp_path / "copy" / build.CPP_LIBRARY_NAME
    copy.parent.mkdir()
    copy.write_bytes(library.read_bytes())
    r = selfreg(tools, library, tools[1]["libnvinfer.so.10"], copy)
    assert r["before"] == "" and sorted(r["on_load"].split(",")) == sorted(build.CPP_PLUGINS)
    assert r["status"].startswith("registered 3 of 3 creators with libnvinfer.so.10")
    assert r["after_get_creators"] == ""  # withdrawn, for loadLibrary to register
    assert sorted(r["after_load_library"].split(",")) == sorted(build.CPP_PLUGINS)
    assert r["accepted"] == 3 and r["refused"] == 0 and "handed over to loadLibrary" in r["status_after"]
    # a second copy finds the names taken and leaves them; no getCreator probing (TensorRT logs its misses)
    assert r["second_copy"] == "registered 0 of 3 creators with libnvinfer.so.10 (3 already there)"
    assert r["get_creator_calls"] == 0


@needs_compilers
def test_leaves_a_registry_of_another_layout_alone(tools, library):
    # TensorRT-RTX 1.x has TensorRT 11's registry layout; the 10.14 headers' virtual slots would miss
    r = selfreg(tools, library, tools[1]["libtensorrt_rtx.so.1"])
    assert r["on_load"] == "" and "not registered with libtensorrt_rtx.so.1" in r["status"] and "11.x" in r["status"]
    assert sorted(r["after_load_library"].split(",")) == sorted(build.CPP_PLUGINS) and r["refused"] == 0
    r = selfreg(tools, library, "none")
    assert r["status"] == "not registered: no TensorRT runtime library loaded in this process"


@needs_compilers
def test_cli_prints_the_library_and_its_headers(library, capsys):
    assert main(["plugin-library"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == str(library) and out[1].split()[1] == build.cpp_library_info(build=False)["sha256"]
    assert "TensorRT 10.14.1 headers from kernel-lens==2.0.1" in out[2] or os.environ.get("TENSORRT_ROOT")


def test_tensorrt_root_without_headers_is_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TENSORRT_ROOT", str(tmp_path))
    assert main(["plugin-library"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == f"error: TENSORRT_ROOT={tmp_path}: expected {tmp_path}/include/NvInferRuntime.h (a TensorRT install's headers)"


# ------------------------------------------------------------------------------------------------
# GPU: the library's plugins enqueued as an execution context does (harness `enqueue`: configurePlugin,
# onShapeChange, a garbage-filled workspace, enqueue on a stream, outputs NaN-filled first), against
# the reference model's functions in float32 on the CPU (model/modeling_qwen3_next.py).

# torch dtype -> TensorRT DataType; float8 tensors travel as their bytes
def _dt(dtype) -> int:
    import torch

    return DT[{torch.float32: "FLOAT", torch.float16: "HALF", torch.bfloat16: "BF16", torch.float8_e4m3fn: "FP8"}[dtype]]


def _enqueue(harness, tmp_path, op: str, fields: dict, inputs: list, outputs: list[tuple], out_dtype=None,
             out_dtypes: list | None = None) -> list:
    """Run one plugin on the GPU. inputs: tensors, or (file, torch dtype, shape) for big ones written once;
    outputs: shapes, all of `out_dtype` (float32) unless `out_dtypes` gives one per output."""
    import numpy as np
    import torch

    kinds = {"int": "i", "float": "f", "str": "s"}
    args = " ".join(f"{f.name}={kinds[f.kind]}:{fields[f.name]}" for f in SPECS[op].fields if f.name in fields)
    created = harness(f"create {op} node_{op} runtime {args}")
    assert created["ok"], created
    out_dtypes = out_dtypes or [out_dtype or torch.float32] * len(outputs)
    lines, paths = [], []
    for i, a in enumerate(inputs):
        if isinstance(a, tuple):
            path, dtype, shape = a
        else:
            path, dtype, shape = tmp_path / f"in{i}.bin", a.dtype, a.shape
            a.contiguous().view(torch.uint8).numpy().tofile(path)
        lines.append(f"in {_dt(dtype)} {'x'.join(map(str, shape))} {path}")
    for j, (shape, dtype) in enumerate(zip(outputs, out_dtypes)):
        paths.append(tmp_path / f"out{j}.bin")
        lines.append(f"out {_dt(dtype)} {'x'.join(map(str, shape))} {paths[-1]}")
    (tmp_path / "spec.txt").write_text("\n".join(lines) + "\n")
    ran = harness(f"enqueue {tmp_path / 'spec.txt'}")
    assert ran.get("rc") == 0 and ran.get("cuda") == "no error", ran
    return [torch.from_numpy(np.fromfile(p, np.uint8)).view(dt).reshape(shape).float() for p, shape, dt in zip(paths, outputs, out_dtypes)]


def _close(got, want, what: str, tol: float = 1e-4):
    err = (got - want).abs().max().item()
    assert got.isfinite().all() and err <= tol * max(1.0, want.abs().max().item()), f"{what}: max abs error {err:.3e}"


# 16-bit runs: inputs rounded to the dtype, the reference in float32 over those rounded values; the
# tolerance covers the output's rounding (relative to max |ref|)
TOL = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1e-2}
DTYPES = list(TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 70])
def test_enqueue_causal_conv_on_the_gpu(harness, tmp_path, T, dtype):
    import torch

    from qwen3next_trt.model.modeling_qwen3_next import causal_conv1d_with_state

    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(T)
    B, C, K = 2, 96, 4
    x, w, bias, past = (torch.randn(s, generator=g).to(dt) for s in ((B, C, T), (C, 1, K), (C,), (B, C, K - 1)))
    y, state = _enqueue(harness, tmp_path, "CausalConvWithState", {"activation": "silu", "ndim": 1}, [x, w, bias, past],
                        [(B, C, T), (B, C, K - 1)], out_dtype=dt)
    y_ref, state_ref = causal_conv1d_with_state(x.float(), w.float(), past.float(), bias.float())
    _close(y, y_ref, f"output {dtype}", TOL[dtype])
    _close(state, state_ref, f"present state {dtype}", TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 70])
def test_enqueue_linear_attention_on_the_gpu(harness, tmp_path, T, dtype):
    import torch

    from qwen3next_trt.model.modeling_qwen3_next import linear_attention

    g = torch.Generator().manual_seed(100 + T)
    B, Hk, Hv, Dk, Dv = 2, 2, 4, 128, 128
    q = torch.nn.functional.normalize(torch.randn(B, T, Hk, Dk, generator=g), dim=-1).reshape(B, T, Hk * Dk)
    k = torch.nn.functional.normalize(torch.randn(B, T, Hk, Dk, generator=g), dim=-1).reshape(B, T, Hk * Dk)
    v = torch.randn(B, T, Hv * Dv, generator=g)
    past = torch.randn(B, Hv, Dk, Dv, generator=g)
    decay = -torch.rand(B, T, Hv, generator=g) ** 2 * 3  # log space
    beta = torch.rand(B, T, Hv, generator=g)
    scale = Dk**-0.5
    dt = getattr(torch, dtype)  # the recurrent state stays float32 in every dtype
    q, k, v, decay, beta = (t.to(dt) for t in (q, k, v, decay, beta))
    out, state = _enqueue(harness, tmp_path, "LinearAttention",
                          {"q_num_heads": Hk, "kv_num_heads": Hv, "update_rule": "gated_delta", "scale": scale},
                          [q, k, v, past, decay, beta], [(B, T, Hv * Dv), (B, Hv, Dk, Dv)], out_dtypes=[dt, torch.float32])
    out_ref, state_ref = linear_attention(q.float(), k.float(), v.float(), past, decay.float(), beta.float(), Hk, Hv, scale)
    _close(out, out_ref, f"output {dtype}", TOL[dtype])
    _close(state, state_ref, f"present state {dtype}", TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [1, 0])
def test_enqueue_moe_on_the_gpu(harness, tmp_path, normalize, dtype):
    import torch

    from qwen3next_trt.model.modeling_qwen3_next import moe_dispatch, route_tokens

    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(7 + normalize)
    N, H, I, E, k = 9, 64, 32, 8, 2
    x = torch.randn(N, H, generator=g).to(dt)
    # distinct logits exactly representable in every dtype (j / 8): no routing ties from the rounding
    logits = torch.stack([torch.randperm(E, generator=g) for _ in range(N)]).div(8).to(dt)
    fc1, fc2 = (0.2 * torch.randn(E, 2 * I, H, generator=g)).to(dt), (0.2 * torch.randn(E, H, I, generator=g)).to(dt)
    fields = {"k": k, "activation_type": "swiglu", "swiglu_fusion": 1, "normalize_routing_weights": normalize,
              "use_sparse_mixer": 0, "activation_alpha": 1.0, "activation_beta": 0.0}
    (out,) = _enqueue(harness, tmp_path, "MoE", fields, [x, logits, fc1, torch.zeros(E, 2 * I, dtype=dt), fc2, torch.zeros(E, H, dtype=dt)],
                      [(N, H)], out_dtype=dt)
    weights, selected = route_tokens(logits.float(), k, bool(normalize))
    ref = moe_dispatch(x.float(), weights, selected, fc1.float()[:, 0::2], fc1.float()[:, 1::2], fc2.float())  # rows interleaved gate, up
    _close(out, ref, f"output {dtype}", TOL[dtype])


# The FP8 form at the 80B sizes (512 experts top-10, hidden 2048, expert width 512): the checkpoint's
# layout, gate / up / down FP8 bytes each with their own 128x128 weight_scale_inv; fc1 = gate/up rows
# interleaved, scale1 = gate scales above up scales. 1 / 8 / 64 tokens take the decode kernels, 1024
# the grouped prefill ones (plugins/moe/README.md). Reference: float32 on the CPU over the dequantised
# checkpoint tensors (model/checkpoint.py's block dequantisation, moe_dispatch), routing by a stable sort.
E80, H80, I80, K80 = 512, 2048, 512, 10


@pytest.fixture(scope="module")
def experts_80b(tmp_path_factory):
    import torch

    from qwen3next_trt.model.checkpoint import dequantize_fp8_blocks

    g = torch.Generator().manual_seed(80)
    d = tmp_path_factory.mktemp("experts80")

    def fp8(*shape):  # every finite e4m3 code, uniformly (0x7f / 0xff are NaN)
        b = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        return torch.where((b & 0x7F) == 0x7F, torch.zeros_like(b), b).view(torch.float8_e4m3fn)

    def scales(e, rows, cols, size):
        return (torch.rand(e, rows // 128, cols // 128, generator=g) + 0.5) * size

    gate, up, down = fp8(E80, I80, H80), fp8(E80, I80, H80), fp8(E80, H80, I80)
    s_gate, s_up, s_down = scales(E80, I80, H80, 2**-12), scales(E80, I80, H80, 2**-11), scales(E80, H80, I80, 2**-11)
    fc1 = torch.stack([gate, up], dim=2).reshape(E80, 2 * I80, H80)
    files = {"fc1": d / "fc1.bin", "fc2": d / "fc2.bin", "s1": d / "s1.bin", "s2": d / "s2.bin"}
    fc1.view(torch.uint8).numpy().tofile(files["fc1"])
    down.view(torch.uint8).numpy().tofile(files["fc2"])
    torch.cat([s_gate, s_up], dim=1).numpy().tofile(files["s1"])
    s_down.numpy().tofile(files["s2"])
    deq = lambda w, s: torch.stack([dequantize_fp8_blocks(w[e], s[e]) for e in range(E80)])  # noqa: E731
    weights = deq(gate, s_gate), deq(up, s_up), deq(down, s_down)
    inputs = [(files["fc1"], torch.float8_e4m3fn, (E80, 2 * I80, H80)), (files["fc2"], torch.float8_e4m3fn, (E80, H80, I80)),
              (files["s1"], torch.float32, (E80, 2 * I80 // 128, H80 // 128)), (files["s2"], torch.float32, (E80, H80 // 128, I80 // 128))]
    return inputs, weights


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [1, 8, 64, 1024])
def test_enqueue_moe_fp8_experts_at_80b_sizes(harness, experts_80b, tmp_path, N, dtype):
    import torch

    from qwen3next_trt.model.modeling_qwen3_next import moe_dispatch

    dt = getattr(torch, dtype)
    (fc1, fc2, s1, s2), (gate, up, down) = experts_80b
    g = torch.Generator().manual_seed(N)
    x = torch.randn(N, H80, generator=g).to(dt)
    # distinct logits exactly representable in every dtype (k / 64): no ties at the top-k boundary
    logits = torch.stack([torch.randperm(E80, generator=g) for _ in range(N)]).sub(E80 // 2).div(64).to(dt)
    fields = {"k": K80, "activation_type": "swiglu", "swiglu_fusion": 1, "normalize_routing_weights": 1,
              "use_sparse_mixer": 0, "activation_alpha": 1.0, "activation_beta": 0.0}
    bias1, bias2 = torch.zeros(E80, 2 * I80, dtype=dt), torch.zeros(E80, H80, dtype=dt)
    (out,) = _enqueue(harness, tmp_path, "MoE", fields, [x, logits, fc1, bias1, fc2, bias2, s1, s2], [(N, H80)], out_dtype=dt)
    probs = torch.softmax(logits.float(), dim=-1)
    selected = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :K80]
    weights = probs.gather(1, selected)
    ref = moe_dispatch(x.float(), weights / weights.sum(-1, keepdim=True), selected, gate, up, down)
    _close(out, ref, f"MoE FP8 N={N} {dtype}", TOL[dtype])
