"""The two scans of the gated delta rule against each other and against a float64 loop written here."""

import pytest
import torch

from qwen3next_trt.model.gated_delta_rule import chunk_gated_delta_rule, recurrent_gated_delta_rule


def naive_float64(q, k, v, g, beta, state):
    """The recurrence as the paper writes it, one token and one head at a time, in float64."""
    q, k, v, g, beta = (x.double() for x in (q, k, v, g, beta))
    B, T, H, Dk = q.shape
    S = state.double().clone()
    out = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                S[b, h] = S[b, h] * torch.exp(g[b, t, h])
                err = v[b, t, h] - S[b, h].T @ k[b, t, h]
                S[b, h] = S[b, h] + torch.outer(k[b, t, h], beta[b, t, h] * err)
                out[b, t, h] = S[b, h].T @ (q[b, t, h] * Dk**-0.5)
    return out, S


def inputs(B, T, H, Dk, Dv, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, T, H, Dk, generator=g), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, Dk, generator=g), dim=-1)
    v = torch.randn(B, T, H, Dv, generator=g)
    decay = -torch.rand(B, T, H, generator=g) * 4  # includes strong forgetting
    beta = torch.rand(B, T, H, generator=g)
    state = torch.randn(B, H, Dk, Dv, generator=g)
    return [x.to(dtype) for x in (q, k, v)] + [decay, beta, state]


@pytest.mark.parametrize("T", [1, 2, 17, 63, 64, 65, 100, 129])
def test_chunked_equals_recurrent(T):
    q, k, v, g, beta, s0 = inputs(2, T, 3, 16, 24, seed=T)
    o_r, s_r = recurrent_gated_delta_rule(q, k, v, g, beta, s0)
    o_c, s_c = chunk_gated_delta_rule(q, k, v, g, beta, s0)
    assert (o_r - o_c).abs().max() <= 1e-5
    assert (s_r - s_c).abs().max() <= 1e-5


@pytest.mark.parametrize("T,chunk", [(1, 64), (5, 4), (37, 16), (70, 64)])
def test_both_scans_match_float64_loop(T, chunk):
    q, k, v, g, beta, s0 = inputs(1, T, 2, 8, 12, seed=100 + T)
    o_ref, s_ref = naive_float64(q, k, v, g, beta, s0)
    for o, s in (recurrent_gated_delta_rule(q, k, v, g, beta, s0), chunk_gated_delta_rule(q, k, v, g, beta, s0, chunk_size=chunk)):
        assert (o.double() - o_ref).abs().max() <= 1e-5
        assert (s.double() - s_ref).abs().max() <= 1e-5


def test_zero_initial_state_and_split_sequence():
    """Scanning 90 tokens at once equals scanning 50 then 40 with the carried state."""
    q, k, v, g, beta, _ = inputs(2, 90, 2, 16, 16, seed=7)
    o_all, s_all = chunk_gated_delta_rule(q, k, v, g, beta)
    o1, s1 = chunk_gated_delta_rule(q[:, :50], k[:, :50], v[:, :50], g[:, :50], beta[:, :50])
    o2, s2 = chunk_gated_delta_rule(q[:, 50:], k[:, 50:], v[:, 50:], g[:, 50:], beta[:, 50:], s1)
    assert (torch.cat([o1, o2], 1) - o_all).abs().max() <= 1e-5
    assert (s2 - s_all).abs().max() <= 1e-5


def test_state_stays_float32_for_bf16_inputs():
    q, k, v, g, beta, s0 = inputs(1, 20, 2, 16, 16, seed=3, dtype=torch.bfloat16)
    for scan in (recurrent_gated_delta_rule, chunk_gated_delta_rule):
        o, s = scan(q, k, v, g, beta, s0)
        assert o.dtype == torch.float32 and s.dtype == torch.float32
    o_ref, s_ref = naive_float64(q, k, v, g, beta, s0)
    assert (s.double() - s_ref).abs().max() <= 1e-5  # inputs are bf16, arithmetic is not
