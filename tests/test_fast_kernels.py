"""The fast plugin kernels (plugins/*/fast.cuh) against float64 references and against the simple kernels.

Each fast kernel is called explicitly (torch_ops impl=...), its outputs poisoned with NaN beforehand
where the C ABI is called directly, on fresh random inputs per case. Bounds: the float32 tolerance of
tests/test_plugin_kernels.py plus one rounding of the output dtype. The dispatch tests check that the
entry points the TensorRT plugins call (q3n_linear_attention, q3n_moe_fp8) pick the fast kernels when
the shapes fit and the simple ones otherwise.
"""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

FP32_TOL = 1e-4
EPS = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}

gpu = pytest.mark.gpu


def _ops():
    from qwen3next_trt.plugins import torch_ops

    return torch_ops


def assert_close(actual, exact, dtype, what):
    assert actual.shape == exact.shape, what
    assert not torch.isnan(actual).any(), f"{what}: NaN (an element never written?)"
    err = (actual.double() - exact.double()).abs()
    excess = err - (FP32_TOL + EPS[dtype] * exact.double().abs())
    assert excess.max().item() <= 0, f"{what} ({dtype}): max abs error {err.max().item():.3e}, worst excess {excess.max().item():.3e}"


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ------------------------------------------------------------------------------------------------
# gated delta rule


def _gdn_inputs(B, T, Hk, Hv, Dk, Dv, seed, dtype, strong_decay=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    q = torch.nn.functional.normalize(torch.randn(B, T, Hk, Dk, generator=g, device=dev), dim=-1).reshape(B, T, Hk * Dk)
    k = torch.nn.functional.normalize(torch.randn(B, T, Hk, Dk, generator=g, device=dev), dim=-1).reshape(B, T, Hk * Dk)
    v = torch.randn(B, T, Hv * Dv, generator=g, device=dev)
    decay = -torch.rand(B, T, Hv, generator=g, device=dev) ** 2 * (3.0 if strong_decay else 0.3)
    beta = torch.rand(B, T, Hv, generator=g, device=dev)
    past = torch.randn(B, Hv, Dk, Dv, generator=g, device=dev)
    return [t.to(dtype) for t in (q, k, v, decay, beta)] + [past]


def _gdn_reference(q, k, v, past, decay, beta, Hk, Hv, scale):
    """Token-by-token recurrence in float64 (the definition in model/gated_delta_rule.py)."""
    B, T, _ = q.shape
    Dk, Dv = q.shape[-1] // Hk, v.shape[-1] // Hv
    rep = Hv // Hk
    qd = q.double().view(B, T, Hk, Dk).repeat_interleave(rep, 2) * scale
    kd = k.double().view(B, T, Hk, Dk).repeat_interleave(rep, 2)
    vd = v.double().view(B, T, Hv, Dv)
    S = past.double().clone() if past is not None else torch.zeros(B, Hv, Dk, Dv, dtype=torch.float64, device=q.device)
    out = torch.empty(B, T, Hv, Dv, dtype=torch.float64, device=q.device)
    for t in range(T):
        S = S * decay[:, t].double().exp()[..., None, None]
        pred = torch.einsum("bhk,bhkv->bhv", kd[:, t], S)
        d = (vd[:, t] - pred) * beta[:, t].double()[..., None]
        S = S + kd[:, t, :, :, None] * d[:, :, None, :]
        out[:, t] = torch.einsum("bhk,bhkv->bhv", qd[:, t], S)
    return out.reshape(B, T, Hv * Dv), S


def _call_la(q, k, v, past, decay, beta, Hk, Hv, scale, impl, in_place=False, ws_bytes=None):
    """The C ABI directly, with NaN-poisoned outputs and workspace: every element must be written, and nothing
    may be read from the workspace before it is written. ws_bytes: less than the asked-for workspace (segments)."""
    ops = _ops()
    B, T, _ = q.shape
    Dk, Dv = q.shape[-1] // Hk, v.shape[-1] // Hv
    out = torch.full_like(v, float("nan"))
    present = past.clone() if in_place else torch.full((B, Hv, Dk, Dv), float("nan"), device=v.device)
    if ws_bytes is None:
        ws_bytes = ops.linear_attention_workspace_size(B, T, Hk, Hv, Dk, Dv, impl)
    workspace = torch.full((max(ws_bytes, 4) // 4,), float("nan"), device=v.device)
    p = lambda t: ctypes.c_void_p(t.data_ptr()) if t is not None else None  # noqa: E731
    rc = ops.load_library().q3n_linear_attention_impl(
        p(q), p(k), p(v), p(present if in_place else past), p(decay), p(beta), p(out), p(present), B, T, Hk, Hv, Dk, Dv,
        scale, ops.DTYPE_CODES[v.dtype], p(workspace), ws_bytes, ops.LINEAR_ATTENTION_IMPLS[impl],
        ctypes.c_void_p(torch.cuda.current_stream().cuda_stream))
    assert rc == 0, ops.status_message(rc)
    return out, present


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("T", [1, 2, 3, 4])
@pytest.mark.parametrize("B,heads", [(1, (16, 32, 128, 128)), (33, (16, 32, 128, 128)), (3, (2, 6, 128, 64))],
                         ids=["b1-80b", "b33-80b", "b3-hv6-dv64"])
def test_decode_kernel_matches_float64(dtype, T, B, heads):
    Hk, Hv, Dk, Dv = heads
    q, k, v, decay, beta, past = _gdn_inputs(B, T, Hk, Hv, Dk, Dv, seed=T * 100 + B, dtype=dtype, strong_decay=True)
    scale = Dk**-0.5
    out, state = _call_la(q, k, v, past, decay, beta, Hk, Hv, scale, "decode")
    ref_out, ref_state = _gdn_reference(q, k, v, past, decay, beta, Hk, Hv, scale)
    assert_close(out, ref_out, dtype, "decode output")
    assert_close(state, ref_state, torch.float32, "decode state")
    # the simple kernel (oracle) on the same inputs agrees to float32 rounding
    s_out, s_state = _call_la(q, k, v, past, decay, beta, Hk, Hv, scale, "simple")
    assert rel_err(state, s_state) < 1e-5


@gpu
@pytest.mark.parametrize("T", [1, 4])
def test_decode_kernel_in_place_and_zero_state(T):
    Hk, Hv, Dk, Dv, B = 16, 32, 128, 128, 4
    q, k, v, decay, beta, past = _gdn_inputs(B, T, Hk, Hv, Dk, Dv, seed=7 + T, dtype=torch.float32)
    ref_out, ref_state = _gdn_reference(q, k, v, past, decay, beta, Hk, Hv, 0.1)
    out, state = _call_la(q, k, v, past, decay, beta, Hk, Hv, 0.1, "decode", in_place=True)
    assert_close(out, ref_out, torch.float32, "in-place output")
    assert_close(state, ref_state, torch.float32, "in-place state")
    ref_out, ref_state = _gdn_reference(q, k, v, None, decay, beta, Hk, Hv, 0.1)
    out, state = _call_la(q, k, v, None, decay, beta, Hk, Hv, 0.1, "decode")
    assert_close(out, ref_out, torch.float32, "zero-state output")
    assert_close(state, ref_state, torch.float32, "zero-state state")


@gpu
def test_decode_speculative_tokens_equal_sequential_steps():
    """k tokens in one call = k calls of one token (what speculative verification relies on)."""
    ops = _ops()
    Hk, Hv, Dk, Dv, B, T = 16, 32, 128, 128, 8, 4
    q, k, v, decay, beta, past = _gdn_inputs(B, T, Hk, Hv, Dk, Dv, seed=11, dtype=torch.float32)
    out, state = ops.linear_attention(q, k, v, past, decay, beta, Hk, Hv, 0.08, impl="decode")
    s = past
    for t in range(T):
        o, s = ops.linear_attention(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], s, decay[:, t:t + 1], beta[:, t:t + 1],
                                    Hk, Hv, 0.08, impl="decode")
        assert (o[:, 0] - out[:, t]).abs().max().item() < 1e-5
    assert (s - state).abs().max().item() < 1e-5


@gpu
@pytest.mark.parametrize("impl", ["chunk", "chunk_tc", "chunk_split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("T", [1, 5, 63, 64, 65, 200, 700])
@pytest.mark.parametrize("heads", [(16, 32, 128, 128), (2, 4, 128, 64), (2, 6, 128, 96)], ids=["80b", "hv4-dv64", "hv6-dv96"])
def test_chunk_kernel_matches_float64(impl, dtype, T, heads):
    Hk, Hv, Dk, Dv = heads
    B = 2
    q, k, v, decay, beta, past = _gdn_inputs(B, T, Hk, Hv, Dk, Dv, seed=T + Hv, dtype=dtype, strong_decay=T % 2 == 1)
    scale = Dk**-0.5
    out, state = _call_la(q, k, v, past, decay, beta, Hk, Hv, scale, impl)
    ref_out, ref_state = _gdn_reference(q, k, v, past, decay, beta, Hk, Hv, scale)
    assert_close(out, ref_out, dtype, f"chunk output T={T}")
    assert_close(state, ref_state, torch.float32, f"chunk state T={T}")


@gpu
@pytest.mark.parametrize("impl,dtype", [("chunk", torch.float32), ("chunk_tc", torch.float32),
                                        ("chunk_split", torch.float32), ("chunk_split", torch.bfloat16)], ids=str)
def test_chunk_kernel_long_sequence_against_simple_kernel(impl, dtype):
    """4096 tokens, weak decay (long memory): the chunked form and the token loop stay together (bf16: the
    split pass's two-part bf16 state products; the outputs differ by their bf16 rounding, the state not)."""
    Hk, Hv, Dk, Dv, B, T = 16, 32, 128, 128, 1, 4096
    q, k, v, decay, beta, past = _gdn_inputs(B, T, Hk, Hv, Dk, Dv, seed=5, dtype=dtype)
    decay = (decay.float() * 0.1).to(dtype)
    out, state = _call_la(q, k, v, past, decay, beta, Hk, Hv, Dk**-0.5, impl, in_place=True)
    s_out, s_state = _call_la(q, k, v, past, decay, beta, Hk, Hv, Dk**-0.5, "simple")
    out_tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert rel_err(out, s_out) < out_tol and rel_err(state, s_state) < 1e-4, (rel_err(out, s_out), rel_err(state, s_state))


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("seg_chunks", [1, 3])
@pytest.mark.parametrize("zero_past", [False, True])
def test_chunk_split_in_segments(dtype, seg_chunks, zero_past):
    """A workspace of 1 or 3 chunks' factors: 700 tokens (11 chunks) walked in segments, the state passing through
    present_state between them (also from a NULL past state)."""
    Hk, Hv, Dk, Dv, B, T = 2, 4, 128, 64, 3, 700
    q, k, v, decay, beta, past = _gdn_inputs(B, T, Hk, Hv, Dk, Dv, seed=11 + seg_chunks, dtype=dtype)
    past = None if zero_past else past
    ws_bytes = B * Hv * seg_chunks * (2 * 64 * 64 + 64) * 4
    out, state = _call_la(q, k, v, past, decay, beta, Hk, Hv, Dk**-0.5, "chunk_split", ws_bytes=ws_bytes)
    ref_out, ref_state = _gdn_reference(q, k, v, past, decay, beta, Hk, Hv, Dk**-0.5)
    assert_close(out, ref_out, dtype, f"split output, {seg_chunks}-chunk segments")
    assert_close(state, ref_state, torch.float32, f"split state, {seg_chunks}-chunk segments")
    out2, state2 = _call_la(q, k, v, past, decay, beta, Hk, Hv, Dk**-0.5, "chunk_split")  # one segment
    assert rel_err(out, out2) < 1e-5 and rel_err(state, state2) < 1e-5


@gpu
def test_chunk_split_workspace_errors():
    """The split prefill without a workspace that holds one chunk of factors, or misaligned: Q3N_ERR_WORKSPACE."""
    ops = _ops()
    q, k, v, decay, beta, past = _gdn_inputs(2, 70, 2, 4, 128, 128, seed=3, dtype=torch.float32)
    one_chunk = 2 * 4 * (2 * 64 * 64 + 64) * 4
    with pytest.raises(AssertionError, match="Q3N_ERR_WORKSPACE"):
        _call_la(q, k, v, past, decay, beta, 2, 4, 0.1, "chunk_split", ws_bytes=one_chunk - 16)
    with pytest.raises(AssertionError, match="Q3N_ERR_WORKSPACE"):
        _call_la(q, k, v, past, decay, beta, 2, 4, 0.1, "chunk_split", ws_bytes=0)
    p = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    ws = torch.empty(one_chunk + 64, dtype=torch.uint8, device="cuda")
    out, present = torch.empty_like(v), torch.empty(2, 4, 128, 128, device="cuda")
    rc = ops.load_library().q3n_linear_attention_impl(
        p(q), p(k), p(v), p(past), p(decay), p(beta), p(out), p(present), 2, 70, 2, 4, 128, 128, 0.1, 0,
        ctypes.c_void_p(ws.data_ptr() + 4), one_chunk, ops.LINEAR_ATTENTION_IMPLS["chunk_split"], None)
    assert rc == -6, ops.status_message(rc)


@gpu
def test_linear_attention_dispatch():
    """q3n_linear_attention (the plugins' entry point) picks decode for 1..4 tokens, chunk_split beyond (chunk_tc when
    the caller gives no workspace), simple otherwise."""
    ops = _ops()
    lib = ops.load_library()
    p = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)

    def plugin_entry(q, k, v, past, decay, beta, Hk, Hv, workspace=True):
        B, T, _ = q.shape
        Dk, Dv = q.shape[-1] // Hk, v.shape[-1] // Hv
        out, present = torch.empty_like(v), torch.empty(B, Hv, Dk, Dv, device="cuda")
        ws_bytes = lib.q3n_linear_attention_workspace_size(B, T, Hk, Hv, Dk, Dv) if workspace else 0
        ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device="cuda")
        assert lib.q3n_linear_attention(p(q), p(k), p(v), p(past), p(decay), p(beta), p(out), p(present), B, T, Hk, Hv, Dk,
                                        Dv, 0.1, 0, p(ws) if workspace else None, ws_bytes, stream) == 0
        return out, present

    for T, expect, workspace in [(3, "decode", True), (100, "chunk_split", True), (100, "chunk_tc", False)]:
        args = _gdn_inputs(2, T, 2, 4, 128, 128, seed=T, dtype=torch.float32)
        q, k, v, decay, beta, past = args
        got = plugin_entry(q, k, v, past, decay, beta, 2, 4, workspace)
        want = ops.linear_attention(q, k, v, past, decay, beta, 2, 4, 0.1, impl=expect)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (T, expect)
    q, k, v, decay, beta, past = _gdn_inputs(1, 3, 1, 3, 40, 72, seed=1, dtype=torch.float32)  # Dk 40: simple only
    got = plugin_entry(q, k, v, past, decay, beta, 1, 3)
    want = ops.linear_attention(q, k, v, past, decay, beta, 1, 3, 0.1, impl="simple")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for impl in ("chunk", "chunk_tc", "chunk_split", "decode"):
        with pytest.raises(RuntimeError, match="Q3N_ERR_UNSUPPORTED"):
            ops.linear_attention(q, k, v, past, decay, beta, 1, 3, 0.1, impl=impl)
    q, k, v, decay, beta, past = _gdn_inputs(1, 5, 2, 4, 128, 128, seed=2, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="Q3N_ERR_UNSUPPORTED"):
        ops.linear_attention(q, k, v, past, decay, beta, 2, 4, 0.1, impl="decode")


# ------------------------------------------------------------------------------------------------
# FP8 MoE


def _fp8_moe_case(N, E, k, H, I, seed, dtype):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(seed)
    blocks = lambda n: math.ceil(n / 128)  # noqa: E731
    x = torch.randn(N, H, generator=g, device=dev).to(dtype)
    logits = (torch.randn(N, E, generator=g, device=dev) * 2).to(dtype)
    fc1 = torch.randn(E, 2 * I, H, generator=g, device=dev).to(torch.float8_e4m3fn)
    fc2 = torch.randn(E, H, I, generator=g, device=dev).to(torch.float8_e4m3fn)
    scale1 = (torch.rand(E, 2 * blocks(I), blocks(H), generator=g, device=dev) + 0.5) * H**-0.5  # gate blocks, up blocks
    scale2 = (torch.rand(E, blocks(H), blocks(I), generator=g, device=dev) + 0.5) * I**-0.5
    return x, logits, fc1, scale1, fc2, scale2


def _fp8_moe_reference(x, logits, fc1, scale1, fc2, scale2, k, normalize):
    """float64 routing and experts on dequantised weights; the experts chosen from float32 softmax, as the kernels."""
    from qwen3next_trt.model.checkpoint import dequantize_fp8_blocks

    probs32 = torch.softmax(logits.float(), dim=-1)
    experts = torch.sort(probs32, dim=-1, descending=True, stable=True).indices[:, :k]
    probs = torch.softmax(logits.double(), dim=-1).gather(1, experts)
    if normalize:
        probs = probs / probs.sum(-1, keepdim=True)
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for e in experts.unique().tolist():
        rows, slots = (experts == e).nonzero(as_tuple=True)
        n = scale1.shape[1] // 2  # gate rows (0::2) take the first n scale rows, up rows (1::2) the rest
        w1 = torch.stack([dequantize_fp8_blocks(fc1[e][0::2], scale1[e][:n]), dequantize_fp8_blocks(fc1[e][1::2], scale1[e][n:])],
                         dim=1).reshape(fc1.shape[1], -1).double()
        w2 = dequantize_fp8_blocks(fc2[e], scale2[e]).double()
        h = x[rows].double() @ w1.T
        act = torch.nn.functional.silu(h[:, 0::2]) * h[:, 1::2]
        out.index_add_(0, rows, (act @ w2.T) * probs[rows, slots][:, None])
    return out


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N", [1, 3, 64, 300])
def test_moe_fp8_fast_matches_float64(dtype, N):
    ops = _ops()
    E, k, H, I = 512, 10, 2048, 512
    case = _fp8_moe_case(N, E, k, H, I, seed=N, dtype=dtype)
    out = ops.moe_fp8(*case, k, 1, impl="fast")
    ref = _fp8_moe_reference(*case, k, 1)
    assert_close(out, ref, dtype, f"moe fp8 fast N={N}")
    simple = ops.moe_fp8(*case, k, 1, impl="simple")
    assert rel_err(out, simple) < (1e-5 if dtype == torch.float32 else 1e-2)


@gpu
@pytest.mark.parametrize("E,k,H,I,normalize", [(16, 4, 256, 96, 0), (40, 16, 1024, 512, 1), (24, 8, 1024, 704, 1),
                                               (8, 1, 2048, 512, 1), (1000, 6, 512, 128, 1)])
def test_moe_fp8_fast_other_sizes(E, k, H, I, normalize):
    """H, I not multiples of 512 (partial lane chunks), I > 512 (several fc2 chunks), k = 16 and k = 1, E = 1000
    (a partial last warp in the router)."""
    ops = _ops()
    case = _fp8_moe_case(5, E, k, H, I, seed=E + k, dtype=torch.float32)
    out = ops.moe_fp8(*case, k, normalize, impl="fast")
    assert_close(out, _fp8_moe_reference(*case, k, normalize), torch.float32, f"moe fp8 fast E={E} k={k} H={H} I={I}")


@gpu
def test_moe_fp8_fast_routing_ties_take_the_lower_expert():
    ops = _ops()
    N, E, k, H, I = 64, 32, 4, 256, 64
    x, _, fc1, scale1, fc2, scale2 = _fp8_moe_case(N, E, k, H, I, seed=3, dtype=torch.float32)
    g = torch.Generator(device="cuda").manual_seed(4)
    logits = torch.randint(-2, 3, (N, E), generator=g, device="cuda").float()
    out = ops.moe_fp8(x, logits, fc1, scale1, fc2, scale2, k, 1, impl="fast")
    assert_close(out, _fp8_moe_reference(x, logits, fc1, scale1, fc2, scale2, k, 1), torch.float32, "tied logits")


@gpu
def test_moe_fp8_dispatch():
    ops = _ops()
    case = _fp8_moe_case(4, 16, 4, 2048, 512, seed=9, dtype=torch.bfloat16)
    # the plugin entry point (q3n_moe_fp8) = the fast path, bit for bit
    assert torch.equal(ops.moe_fp8(*case, 4, 1), ops.moe_fp8(*case, 4, 1, impl="fast"))
    odd = _fp8_moe_case(3, 8, 2, 200, 72, seed=10, dtype=torch.float32)  # H % 16 != 0: simple only
    assert torch.equal(ops.moe_fp8(*odd, 2, 1), ops.moe_fp8(*odd, 2, 1, impl="simple"))
    with pytest.raises(RuntimeError, match="Q3N_ERR_UNSUPPORTED"):
        ops.moe_fp8(*odd, 2, 1, impl="fast")


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N", [1024, 4096])
def test_moe_fp8_prefill_matches_float64(dtype, N):
    """The grouped-GEMM prefill path at 80B sizes (512 experts, top-10): ~20 and ~80 pairs per expert,
    so tiles of 64 pairs are full, partial, and split across experts."""
    ops = _ops()
    E, k, H, I = 512, 10, 2048, 512
    case = _fp8_moe_case(N, E, k, H, I, seed=N + 1, dtype=dtype)
    out = ops.moe_fp8(*case, k, 1, impl="prefill")
    assert_close(out, _fp8_moe_reference(*case, k, 1), dtype, f"moe fp8 prefill N={N}")
    simple = ops.moe_fp8(*case, k, 1, impl="simple")
    assert rel_err(out, simple) < (1e-5 if dtype == torch.float32 else 1e-2)
    # deterministic: no float atomics, the same bits on a second call
    assert torch.equal(out, ops.moe_fp8(*case, k, 1, impl="prefill"))


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_moe_fp8_prefill_rows_of_any_magnitude(dtype):
    """Token rows scaled from 1e-12 to 1e4: the GEMM scales each activation row into fp16's range by a power
    of two, so every row keeps its relative precision (the 1e-12 rows' SwiGLU outputs, ~1e-24, reach fc2
    scaled too). fp16 rows span 1e-2 .. 30 only: the output is fp16 too and goes as f^2 for small rows
    (SwiGLU), so 1e-3 rows would give subnormal outputs and 1e-6 rows zeros, whatever the kernel did."""
    ops = _ops()
    N, E, k, H, I = 1024, 64, 4, 512, 256
    x, logits, fc1, scale1, fc2, scale2 = _fp8_moe_case(N, E, k, H, I, seed=31, dtype=torch.float32)
    factors = [1e-2, 1e-1, 1.0, 30.0] if dtype == torch.float16 else [1e-12, 1e-6, 1.0, 1e4]
    x = (x * torch.tensor(factors, device=x.device).repeat(N // 4)[:, None]).to(dtype)
    case = (x, logits.to(dtype), fc1, scale1, fc2, scale2)
    out = ops.moe_fp8(*case, k, 1, impl="prefill")
    ref = _fp8_moe_reference(*case, k, 1)
    assert not torch.isnan(out).any() and not torch.isinf(out).any()
    for i, f in enumerate(factors):  # relative, per magnitude: each group's outputs scale with f (or f^2)
        err = rel_err(out[i::4], ref[i::4])
        assert err < (1e-5 if dtype == torch.float32 else 1e-2), f"rows x {f:g} ({dtype}): relative error {err:.2e}"


@gpu
@pytest.mark.parametrize("N,E,k,H,I,normalize", [(777, 64, 6, 256, 128, 1), (1, 8, 2, 128, 128, 0),
                                                 (130, 200, 3, 384, 256, 1), (65, 4, 4, 512, 384, 0)])
def test_moe_fp8_prefill_other_sizes(N, E, k, H, I, normalize):
    """Odd token counts (tails of every expert's last tile), one token, more experts than pairs (most
    receive none), k = E (every expert gets every token), H, I multiples of 128 other than 80B's."""
    ops = _ops()
    case = _fp8_moe_case(N, E, k, H, I, seed=N + E, dtype=torch.float32)
    out = ops.moe_fp8(*case, k, normalize, impl="prefill")
    assert_close(out, _fp8_moe_reference(*case, k, normalize), torch.float32, f"moe fp8 prefill N={N} E={E} k={k}")
    assert rel_err(out, ops.moe_fp8(*case, k, normalize, impl="simple")) < 1e-5


@gpu
def test_moe_fp8_prefill_experts_without_tokens():
    """Half of the experts can never win (logits 30 lower): they get zero pairs, the rest many; and the
    first and last experts are among the empty ones (the tile search's ends)."""
    ops = _ops()
    N, E, k, H, I = 500, 32, 4, 256, 128
    x, logits, fc1, scale1, fc2, scale2 = _fp8_moe_case(N, E, k, H, I, seed=11, dtype=torch.bfloat16)
    dead = torch.zeros(E, dtype=torch.bool, device="cuda")
    dead[0::2] = True
    dead[E - 1] = True
    logits = (logits.float() - 30 * dead.float()).to(torch.bfloat16)
    case = (x, logits, fc1, scale1, fc2, scale2)
    out = ops.moe_fp8(*case, k, 1, impl="prefill")
    assert_close(out, _fp8_moe_reference(*case, k, 1), torch.bfloat16, "moe fp8 prefill, empty experts")
    assert rel_err(out, ops.moe_fp8(*case, k, 1, impl="simple")) < 1e-2


@gpu
def test_moe_fp8_prefill_dispatch():
    ops = _ops()
    # 4096 pairs over 16 experts: the plugin entry point takes the prefill path, bit for bit
    case = _fp8_moe_case(1024, 16, 4, 256, 128, seed=12, dtype=torch.bfloat16)
    assert torch.equal(ops.moe_fp8(*case, 4, 1), ops.moe_fp8(*case, 4, 1, impl="prefill"))
    # H not a multiple of 128: the decode-style fast path at any N, and prefill refuses
    odd = _fp8_moe_case(1024, 16, 4, 272, 128, seed=13, dtype=torch.bfloat16)
    assert torch.equal(ops.moe_fp8(*odd, 4, 1), ops.moe_fp8(*odd, 4, 1, impl="fast"))
    with pytest.raises(RuntimeError, match="Q3N_ERR_UNSUPPORTED"):
        ops.moe_fp8(*odd, 4, 1, impl="prefill")
