"""The plugin library (plugins/*/kernel.cu): it compiles for every target arch and exports the C ABI
(CPU, runs in CI), and each kernel matches the reference model's function on identical inputs (GPU).

Oracles for the GPU tests: the reference functions of model/modeling_qwen3_next.py run in float32 on
the very same (already rounded) inputs. The kernels accumulate in float32 and round only their outputs
to float16/bfloat16, so the bound is the float32 tolerance plus one rounding of the output: eps * |ref|
(eps = 2^-10 for float16, 2^-7 for bfloat16: a full ulp, since a float32-level difference sitting on a
rounding boundary can flip the last bit). States the kernels keep in float32 get the float32 bound.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from qwen3next_trt.plugins import build

EXPORTED = ("q3n_causal_conv_with_state", "q3n_linear_attention", "q3n_linear_attention_impl",
            "q3n_linear_attention_workspace_size", "q3n_moe_workspace_size", "q3n_moe", "q3n_moe_fp8", "q3n_moe_fp8_impl")
FP32_TOL = 1e-4
EPS = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def plugin_library(tmp_path_factory):
    """A fresh build (empty cache) of the library, which the GPU tests of this module also use."""
    if build.find_cuda_tool("nvcc") is None:
        pytest.skip("nvcc not found in PATH or $CUDA_HOME/bin: the plugin kernels cannot be compiled on this machine")
    cache = tmp_path_factory.mktemp("plugin_cache")
    messages = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QWEN3NEXT_TRT_CACHE", str(cache))
        path = build.library_path(progress=messages.append)
        yield path, messages


# ------------------------------------------------------------------------------------------------
# CPU: build, symbols, argument checks


def test_library_builds_for_all_archs_and_exports_the_abi(plugin_library):
    path, messages = plugin_library
    assert path.name == build.LIBRARY_NAME and path.parent.name == build.source_hash()
    assert sum("compiling" in m and "kernel.cu (nvcc, 4 archs)" in m for m in messages) == len(build.kernel_sources())
    assert any(re.search(r"done in [0-9.]+ s", m) for m in messages)
    # the library, and the kernel objects it was linked from (the C++ plugin library links the same ones)
    assert sorted(p.name for p in path.parent.iterdir()) == [build.LIBRARY_NAME, "objects"], "temporary files left behind"
    assert sorted(p.name for p in (path.parent / "objects").iterdir()) == sorted(f"{s.parent.name}.o" for s in build.kernel_sources())
    assert build.library_path(build=False) == path  # cached now: no second compile
    assert build.library_hash() == hashlib.sha256(path.read_bytes()).hexdigest()

    # Loads without a GPU: the CUDA runtime is linked in statically, nothing but the driver is needed.
    lib = ctypes.CDLL(str(path))
    for name in EXPORTED:
        assert hasattr(lib, name), name
    if shutil.which("readelf"):
        needed = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True).stdout
        assert "libcudart" not in needed
    if shutil.which("nm"):
        dynamic = subprocess.run(["nm", "-D", "--defined-only", str(path)], capture_output=True, text=True, check=True).stdout
        symbols = {line.split()[-1] for line in dynamic.splitlines() if " T " in line}
        assert set(EXPORTED) <= symbols


def _cuobjdump():
    found = build.find_cuda_tool("cuobjdump")
    if found is None:  # the pip package nvidia-cuda-cuobjdump, if installed
        try:
            import nvidia

            for root in map(Path, nvidia.__path__):
                for candidate in root.glob("cu*/bin/cuobjdump"):
                    return candidate
        except ImportError:
            pass
    return found


def test_library_holds_cubins_for_every_arch(plugin_library):
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (PATH, $CUDA_HOME/bin, pip nvidia-cuda-cuobjdump): cannot list the cubins")
    path, _ = plugin_library
    listing = subprocess.run([str(cuobjdump), "--list-elf", str(path)], capture_output=True, text=True, check=True).stdout
    archs = set(re.findall(r"\.(sm_\d+a?)\.cubin", listing))
    assert archs == set(build.ARCHS), listing


def _lib(plugin_library):
    from qwen3next_trt.plugins import torch_ops

    return torch_ops.load_library()


FAKE = ctypes.c_void_p(4096)  # never dereferenced: argument checks run before anything touches the GPU


def test_bad_arguments_return_documented_codes(plugin_library):
    lib = _lib(plugin_library)
    conv = lambda **kw: lib.q3n_causal_conv_with_state(  # noqa: E731
        FAKE, FAKE, None, None, FAKE, FAKE, kw.get("batch", 1), kw.get("channels", 8), kw.get("seq", 4), kw.get("kernel", 4),
        kw.get("activation", 1), kw.get("dtype", 0), None)
    assert conv(dtype=3) == -3
    assert conv(activation=2) == -4
    assert conv(channels=0) == -2 and conv(kernel=0) == -2 and conv(seq=-1) == -2
    assert conv(batch=0) == 0  # nothing to do
    assert lib.q3n_causal_conv_with_state(None, FAKE, None, None, FAKE, FAKE, 1, 8, 4, 4, 1, 0, None) == -1

    la = lambda **kw: lib.q3n_linear_attention(  # noqa: E731
        FAKE, FAKE, FAKE, None, FAKE, FAKE, FAKE, FAKE, 1, 3, kw.get("hk", 2), kw.get("hv", 4), kw.get("dk", 128),
        kw.get("dv", 128), 0.1, kw.get("dtype", 0), None, 0, None)
    assert la(hv=5) == -2  # value heads not a multiple of key heads
    assert la(dk=257) == -5 and la(dv=512) == -5
    assert la(dtype=-1) == -3

    def moe(fn=lib.q3n_moe, tokens=3, hidden=64, inter=32, experts=16, k=4, normalize=1, dtype=0, ws=FAKE, ws_bytes=1 << 30):
        return fn(FAKE, FAKE, FAKE, None, FAKE, None, FAKE, tokens, hidden, inter, experts, k, normalize, dtype, ws, ws_bytes, None)

    assert moe(k=17) == -4 and moe(k=0) == -4
    assert moe(experts=20000, k=4) == -5
    assert moe(dtype=5) == -3
    need = lib.q3n_moe_workspace_size(3, 16, 4, 64, 32)
    assert moe(ws_bytes=need - 1) == -6
    assert moe(ws=ctypes.c_void_p(4096 + 8)) == -6  # not 16-byte aligned
    assert moe(ws=None) == -6
    assert moe(tokens=0) == 0
    assert lib.q3n_moe_fp8(FAKE, FAKE, FAKE, None, FAKE, FAKE, FAKE, 3, 64, 32, 16, 4, 1, 0, FAKE, 1 << 30, None) == -1


def test_explicit_kernel_choice_arguments(plugin_library):
    """The *_impl entry points: impl out of range -> -4; a fast kernel whose limits the shapes exceed -> -5
    (all decided before any launch, so this runs without a GPU)."""
    lib = _lib(plugin_library)
    la = lambda impl, seq=3, dk=128, dv=128: lib.q3n_linear_attention_impl(  # noqa: E731
        FAKE, FAKE, FAKE, None, FAKE, FAKE, FAKE, FAKE, 1, seq, 2, 4, dk, dv, 0.1, 0, FAKE, 1 << 30, impl, None)
    assert la(6) == -4 and la(-1) == -4
    assert la(2, seq=5) == -5  # the decode kernel takes 1..4 tokens
    assert la(2, dk=64) == -5 and la(2, dv=48) == -5  # Dk = 128, Dv % 32 == 0 only
    assert la(3, dk=64) == -5 and la(4, dk=64) == -5 and la(5, dk=64) == -5 and la(5, dv=48) == -5
    assert la(2, dk=129) == -5 and la(1, dk=257) == -5  # simple kernel limits still apply
    assert lib.q3n_linear_attention_impl(FAKE, FAKE, FAKE, None, FAKE, FAKE, FAKE, ctypes.c_void_p(4096 + 4), 1, 3, 2, 4,
                                         128, 128, 0.1, 0, None, 0, 2, None) == -5  # state not 16-byte aligned

    moe8 = lambda impl, hidden=2048, inter=512, experts=512, k=10: lib.q3n_moe_fp8_impl(  # noqa: E731
        FAKE, FAKE, FAKE, FAKE, FAKE, FAKE, FAKE, 3, hidden, inter, experts, k, 1, 2, FAKE, 1 << 30, impl, None)
    assert moe8(2, hidden=200) == -5 and moe8(2, inter=72) == -5
    assert moe8(2, experts=2048, k=10) == -5 and moe8(2, experts=64, k=17) == -5
    assert moe8(2, inter=2048, k=10) == -5 and moe8(2, inter=704, k=16) == -5  # k * I beyond fc2's staging buffer
    assert moe8(2, k=0) == -4  # argument checks first
    assert moe8(3, hidden=2064) == -5 and moe8(3, inter=528) == -5  # prefill: whole 128-column scale blocks only
    assert moe8(4) == -4


def test_moe_workspace_size_formula(plugin_library):
    lib = _lib(plugin_library)
    align = lambda n: -(-n // 256) * 256  # noqa: E731
    for tokens, experts, k, hidden, inter in [(1, 16, 4, 2048, 512), (7, 512, 10, 2048, 512), (4096, 512, 10, 2048, 512)]:
        pairs = tokens * k
        # ids, weights, act; then the prefill path's counts, tile starts, offsets, permutation both ways, y [N*k, H]
        expect = 2 * align(4 * pairs) + align(4 * pairs * inter)
        expect += align(4 * experts) + 2 * align(4 * (experts + 1)) + 2 * align(4 * pairs) + align(4 * pairs * hidden)
        assert lib.q3n_moe_workspace_size(tokens, experts, k, hidden, inter) == expect
    assert lib.q3n_moe_workspace_size(0, 16, 4, 64, 32) == 0
    assert lib.q3n_moe_workspace_size(3, 16, 17, 64, 32) == 0  # invalid: the launch rejects it


def test_missing_nvcc_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-cuda"))
    monkeypatch.setenv("QWEN3NEXT_TRT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(build.PluginBuildError, match=r"'nvcc' was not found in PATH nor in .*no-cuda/bin"):
        build.library_path()


def test_compile_error_shows_nvcc_output_and_leaves_nothing(monkeypatch, tmp_path):
    if build.find_cuda_tool("nvcc") is None:
        pytest.skip("nvcc not found in PATH or $CUDA_HOME/bin")
    bad = tmp_path / "plugins" / "broken" / "kernel.cu"
    bad.parent.mkdir(parents=True)
    bad.write_text("__global__ void k() { this_is_not_declared(); }\n")
    monkeypatch.setattr(build, "PLUGIN_DIR", bad.parent.parent)  # a plugin folder with only the broken kernel
    monkeypatch.setattr(build, "kernel_sources", lambda: [bad])
    monkeypatch.setenv("QWEN3NEXT_TRT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out" / build.LIBRARY_NAME
    with pytest.raises(build.PluginBuildError, match=r"(?s)nvcc broken/kernel.cu failed.*this_is_not_declared"):
        build.compile_library(out, progress=lambda m: None)
    assert list(out.parent.iterdir()) == []
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []  # no object, no temporary file


# ------------------------------------------------------------------------------------------------
# GPU: each kernel against the reference


def assert_close(actual: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, what: str):
    """`actual` (rounded to dtype) vs the float32 `exact`: FP32_TOL + one rounding (eps * |exact|)."""
    assert actual.shape == exact.shape, what
    err = (actual.float() - exact.float()).abs()
    excess = err - (FP32_TOL + EPS[dtype] * exact.float().abs())
    assert excess.max().item() <= 0, f"{what} ({dtype}): max abs error {err.max().item():.3e}, worst excess {excess.max().item():.3e}"


@pytest.fixture
def exact_matmul():
    # The references run some matmuls on the GPU: keep them in true float32.
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _ops(plugin_library):
    from qwen3next_trt.plugins import torch_ops

    return torch_ops


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 2, 7, 70, 200])
def test_causal_conv_matches_reference(plugin_library, dtype, T):
    from qwen3next_trt.model.modeling_qwen3_next import causal_conv1d_with_state

    ops = _ops(plugin_library)
    g = torch.Generator().manual_seed(T)
    B, C, K = 2, 200, 4
    x, w, bias, past = (t.to(dtype) for t in (torch.randn(B, C, T, generator=g), torch.randn(C, 1, K, generator=g) * 0.5,
                                              torch.randn(C, generator=g) * 0.1, torch.randn(B, C, K - 1, generator=g)))
    y, state = ops.causal_conv_with_state(x.cuda(), w.cuda(), bias.cuda(), past.cuda())
    y_ref, state_ref = causal_conv1d_with_state(x.float(), w.float(), past.float(), bias.float())
    assert_close(y.cpu(), y_ref, dtype, "conv output")
    assert torch.equal(state.cpu(), state_ref.to(dtype)), "the state is a copy of the window's last K-1 columns"

    # No past (zeros), no bias, no activation.
    y, state = ops.causal_conv_with_state(x.cuda(), w.cuda(), None, None, activation="none")
    window = torch.cat([torch.zeros(B, C, K - 1), x.float()], dim=-1)
    y_ref = torch.nn.functional.conv1d(window, w.float(), groups=C)
    assert_close(y.cpu(), y_ref, dtype, "conv output, no past/bias/activation")
    assert torch.equal(state.cpu(), window[..., -(K - 1):].to(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 2, 7])
def test_causal_conv_in_place_state(plugin_library, T):
    """present_state may be the past_state buffer (documented in the README): the C ABI directly."""
    from qwen3next_trt.model.modeling_qwen3_next import causal_conv1d_with_state

    ops = _ops(plugin_library)
    g = torch.Generator().manual_seed(10 + T)
    B, C, K = 2, 64, 4
    x, w, bias, past = torch.randn(B, C, T, generator=g), torch.randn(C, 1, K, generator=g), torch.randn(C, generator=g), torch.randn(B, C, K - 1, generator=g)
    y_ref, state_ref = causal_conv1d_with_state(x, w, past, bias)
    xc, wc, bc, state = x.cuda(), w.cuda(), bias.cuda(), past.cuda()
    y = torch.empty_like(xc)
    p = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    rc = ops.load_library().q3n_causal_conv_with_state(p(xc), p(wc), p(bc), p(state), p(y), p(state), B, C, T, K, 1, 0,
                                                       ctypes.c_void_p(torch.cuda.current_stream().cuda_stream))
    assert rc == 0
    assert_close(y.cpu(), y_ref, torch.float32, "conv output (in-place state)")
    assert torch.equal(state.cpu(), state_ref)


def _delta_rule_inputs(B, T, Hk, Hv, Dk, Dv, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, T, Hk, Dk, generator=g), dim=-1).reshape(B, T, Hk * Dk)
    k = torch.nn.functional.normalize(torch.randn(B, T, Hk, Dk, generator=g), dim=-1).reshape(B, T, Hk * Dk)
    v = torch.randn(B, T, Hv * Dv, generator=g)
    decay = -torch.rand(B, T, Hv, generator=g) ** 2 * 3  # log space: from long memory (near 0) to strong forgetting
    beta = torch.rand(B, T, Hv, generator=g)
    past = torch.randn(B, Hv, Dk, Dv, generator=g)
    return [t.to(dtype) for t in (q, k, v, decay, beta)] + [past]


def test_linear_attention_workspace_size(plugin_library):
    """The split prefill's factors: 64x64 M and P plus 64 G floats per (batch, value head, chunk of 64), the whole
    sequence up to 128 MiB (at least one chunk). A plugin sizes it for its largest shapes and every smaller call
    must fit in that: the size may only grow with batch and seq."""
    lib = _lib(plugin_library)
    size = lambda B, T, hv=32, dk=128, dv=128: lib.q3n_linear_attention_workspace_size(B, T, 16, hv, dk, dv)  # noqa: E731
    per = (2 * 64 * 64 + 64) * 4
    assert size(1, 100) == 2 * 32 * per and size(3, 64, hv=4) == 3 * 4 * per
    assert size(1, 32768) == 128 << 20  # 512 chunks would take 516 MiB: segments
    assert size(8192, 4096) == 8192 * 32 * per  # one chunk is more than the cap
    assert size(1, 4) == 0 and size(2, 100, dk=64) == 0 and size(2, 100, dv=48) == 0  # decode / other kernels
    grid = [(B, T) for B in (1, 2, 3, 5, 8, 31, 64, 255, 256) for T in (5, 64, 65, 1000, 4097, 32768, 262144)]
    for (b1, t1) in grid:
        for (b2, t2) in grid:
            if b1 <= b2 and t1 <= t2:
                assert size(b1, t1) <= size(b2, t2), ((b1, t1), (b2, t2))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", [(2, 4, 128, 128), (16, 32, 128, 128), (1, 3, 40, 72)], ids=lambda h: "hk%d-hv%d-dk%d-dv%d" % h)
@pytest.mark.parametrize("T", [1, 7, 70, 200])
def test_linear_attention_matches_reference(plugin_library, dtype, heads, T):
    from qwen3next_trt.model.modeling_qwen3_next import linear_attention

    ops = _ops(plugin_library)
    Hk, Hv, Dk, Dv = heads
    B = 2
    q, k, v, decay, beta, past = _delta_rule_inputs(B, T, Hk, Hv, Dk, Dv, seed=T * 7 + Hv, dtype=dtype)
    scale = Dk**-0.5
    out, state = ops.linear_attention(q.cuda(), k.cuda(), v.cuda(), past.cuda(), decay.cuda(), beta.cuda(), Hk, Hv, scale)
    out_ref, state_ref = linear_attention(q.float(), k.float(), v.float(), past, decay.float(), beta.float(), Hk, Hv, scale)
    assert out.dtype == dtype and state.dtype == torch.float32
    assert_close(out.cpu(), out_ref, dtype, "linear attention output")
    assert_close(state.cpu(), state_ref, torch.float32, "linear attention state")


@pytest.mark.gpu
def test_linear_attention_zero_past_and_in_place_state(plugin_library):
    from qwen3next_trt.model.modeling_qwen3_next import linear_attention

    ops = _ops(plugin_library)
    B, T, Hk, Hv, Dk, Dv = 2, 70, 2, 4, 128, 128
    q, k, v, decay, beta, past = _delta_rule_inputs(B, T, Hk, Hv, Dk, Dv, seed=3, dtype=torch.float32)
    out, state = ops.linear_attention(q.cuda(), k.cuda(), v.cuda(), None, decay.cuda(), beta.cuda(), Hk, Hv, Dk**-0.5)
    out_ref, state_ref = linear_attention(q, k, v, None, decay, beta, Hk, Hv, Dk**-0.5)
    assert_close(out.cpu(), out_ref, torch.float32, "output, zero past")
    assert_close(state.cpu(), state_ref, torch.float32, "state, zero past")

    out_ref, state_ref = linear_attention(q, k, v, past, decay, beta, Hk, Hv, Dk**-0.5)
    dev = [t.cuda() for t in (q, k, v, decay, beta)]
    state = past.cuda()
    out = torch.empty_like(dev[2])
    p = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    rc = ops.load_library().q3n_linear_attention(p(dev[0]), p(dev[1]), p(dev[2]), p(state), p(dev[3]), p(dev[4]), p(out), p(state),
                                                 B, T, Hk, Hv, Dk, Dv, Dk**-0.5, 0, None, 0,
                                                 ctypes.c_void_p(torch.cuda.current_stream().cuda_stream))
    assert rc == 0
    assert_close(out.cpu(), out_ref, torch.float32, "output, in-place state")
    assert_close(state.cpu(), state_ref, torch.float32, "state, in-place")


class _Rows:
    """Lazy per-expert weights for moe_dispatch: rows[e] = fn(e), so only the selected experts are upcast."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, e):
        return self.fn(e)


def _router_logits(N, E, k, g, device):
    """Logits whose top k+1 are distinct and 0.25 apart, exactly representable in every dtype: the selection
    has no near-ties that a last-bit difference between two softmax implementations could flip."""
    logits = (torch.randn(N, E, generator=g, device=device) * 0.5 - 1.0).clamp(max=0.0)
    for n in range(N):
        chosen = torch.randperm(E, generator=g, device=device)[: k + 1]
        logits[n, chosen] = 3.0 - 0.25 * torch.arange(k + 1, device=device, dtype=torch.float32)
    return logits


def _moe_reference(x, logits, k, normalize, gate, up, down):
    from qwen3next_trt.model.modeling_qwen3_next import moe_dispatch, route_tokens

    weights, experts = route_tokens(logits.float(), k, bool(normalize))
    return moe_dispatch(x.float(), weights, experts, gate, up, down)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E,k,normalize", [(16, 4, 1), (16, 4, 0), (512, 10, 1), (512, 10, 0)])
def test_moe_matches_reference(plugin_library, exact_matmul, dtype, E, k, normalize):
    ops = _ops(plugin_library)
    N, H, I = 5, 2048, 512
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(E + k + normalize)
    x = torch.randn(1, N, H, generator=g, device=dev).to(dtype)
    logits = _router_logits(N, E, k, g, dev).to(dtype)
    fc1 = (torch.randn(E, 2 * I, H, generator=g, device=dev) * H**-0.5).to(dtype)
    fc2 = (torch.randn(E, H, I, generator=g, device=dev) * I**-0.5).to(dtype)
    zeros1, zeros2 = torch.zeros(E, 2 * I, dtype=dtype, device=dev), torch.zeros(E, H, dtype=dtype, device=dev)

    out = ops.moe(x, logits, fc1, zeros1, fc2, zeros2, k, normalize)
    ref = _moe_reference(x.reshape(N, H), logits, k, normalize, _Rows(lambda e: fc1[e, 0::2].float()),
                         _Rows(lambda e: fc1[e, 1::2].float()), _Rows(lambda e: fc2[e].float()))
    assert out.shape == x.shape and out.dtype == dtype
    assert_close(out.reshape(N, H), ref, dtype, f"moe E={E} k={k}")
    # Optional biases absent (NULL) = zero biases.
    assert torch.equal(ops.moe(x, logits, fc1, None, fc2, None, k, normalize), out)


def _float32_experts(N, H, I, E, seed):
    """(generator, x [N, H], fc1 [E, 2I, H], fc2 [E, H, I]) on the GPU, scaled for O(1) activations."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(N, H, generator=g, device=dev)
    fc1 = torch.randn(E, 2 * I, H, generator=g, device=dev) * H**-0.5
    fc2 = torch.randn(E, H, I, generator=g, device=dev) * I**-0.5
    return g, x, fc1, fc2


@pytest.mark.gpu
def test_moe_biases_and_odd_sizes_against_float64_loop(plugin_library):
    """Nonzero fc1/fc2 biases (the reference has none) and sizes that are not multiples of 32, vs a naive loop."""
    ops = _ops(plugin_library)
    N, H, I, E, k = 3, 200, 72, 16, 4
    g, x, fc1, fc2 = _float32_experts(N, H, I, E, seed=0)
    dev = x.device
    logits = _router_logits(N, E, k, g, dev)
    b1, b2 = torch.randn(E, 2 * I, generator=g, device=dev) * 0.3, torch.randn(E, H, generator=g, device=dev) * 0.3
    out = ops.moe(x, logits, fc1, b1, fc2, b2, k, 1)

    probs = torch.softmax(logits.double(), dim=-1)
    ref = torch.zeros(N, H, dtype=torch.float64, device=dev)
    for n in range(N):
        order = torch.sort(probs[n], descending=True, stable=True).indices[:k]
        w = probs[n, order] / probs[n, order].sum()
        for e, we in zip(order.tolist(), w):
            h1 = fc1[e].double() @ x[n].double() + b1[e].double()
            act = torch.nn.functional.silu(h1[0::2]) * h1[1::2]
            ref[n] += we * (fc2[e].double() @ act + b2[e].double())
    assert_close(out, ref, torch.float32, "moe with biases")


@pytest.mark.gpu
def test_moe_routing_ties_take_the_lower_expert(plugin_library):
    """Integer logits tie often; the kernel must pick, among equal probabilities, the lower expert index."""
    ops = _ops(plugin_library)
    N, H, I, E, k = 64, 64, 32, 16, 4
    g, x, fc1, fc2 = _float32_experts(N, H, I, E, seed=1)
    logits = torch.randint(-2, 3, (N, E), generator=g, device=x.device).float()
    out = ops.moe(x, logits, fc1, None, fc2, None, k, 1)

    from qwen3next_trt.model.modeling_qwen3_next import moe_dispatch

    probs = torch.softmax(logits, dim=-1)
    experts = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :k]
    weights = probs.gather(1, experts)
    weights = weights / weights.sum(-1, keepdim=True)
    ref = moe_dispatch(x, weights, experts, fc1[:, 0::2], fc1[:, 1::2], fc2)
    assert_close(out, ref, torch.float32, "moe with tied routing logits")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("E,k,H,I", [(16, 4, 2048, 512), (8, 2, 200, 72)])
def test_moe_fp8_matches_dequantised_weights(plugin_library, exact_matmul, dtype, E, k, H, I):
    from qwen3next_trt.model.checkpoint import dequantize_fp8_blocks

    ops = _ops(plugin_library)
    N = 4
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(H + I)
    blocks = lambda n: math.ceil(n / 128)  # noqa: E731
    x = torch.randn(N, H, generator=g, device=dev).to(dtype)
    logits = _router_logits(N, E, k, g, dev).to(dtype)
    fc1 = torch.randn(E, 2 * I, H, generator=g, device=dev).to(torch.float8_e4m3fn)
    fc2 = torch.randn(E, H, I, generator=g, device=dev).to(torch.float8_e4m3fn)
    scale1 = (torch.rand(E, 2 * blocks(I), blocks(H), generator=g, device=dev) + 0.5) * H**-0.5  # gate blocks, up blocks
    scale2 = (torch.rand(E, blocks(H), blocks(I), generator=g, device=dev) + 0.5) * I**-0.5

    out = ops.moe_fp8(x, logits, fc1, scale1, fc2, scale2, k, 1)
    # oracle: gate rows (0::2) with the first half of the scale rows, up rows (1::2) with the second
    w1 = lambda e: torch.stack([dequantize_fp8_blocks(fc1[e][0::2], scale1[e][:blocks(I)]),  # noqa: E731
                                dequantize_fp8_blocks(fc1[e][1::2], scale1[e][blocks(I):])], dim=1).reshape(2 * I, H)
    ref = _moe_reference(x, logits, k, 1, _Rows(lambda e: w1(e)[0::2]), _Rows(lambda e: w1(e)[1::2]),
                         _Rows(lambda e: dequantize_fp8_blocks(fc2[e], scale2[e])))
    assert out.dtype == dtype
    assert_close(out, ref, dtype, f"moe fp8 E={E} H={H} I={I}")
