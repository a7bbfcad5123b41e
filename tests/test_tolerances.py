"""validate/tolerances.py: the rules that must hold on any CPU, checked against what they claim.

Oracles: ml_dtypes' E4M3 rounding (an independent float8 implementation) for the FP8 step rules, and
hand-built logits whose argmax / ties are known by construction for the greedy rule.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from qwen3next_trt.validate.tolerances import e4m3_step, fp8_step_tolerance, greedy_check


def e4m3(x: np.ndarray, scale: float) -> np.ndarray:
    """x rounded to the E4M3 grid of `scale` (saturating, as QuantizeLinear does), as float64 values."""
    units = np.clip(x / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    return units.astype(np.float64) * scale


@pytest.mark.parametrize("scale", [1e-3, 0.0123, 1.0])
def test_upstream_rule_bounds_every_flip_that_float_error_can_cause(scale):
    rng = np.random.default_rng(0)
    a = rng.normal(0, 100 * scale, 200_000)
    for upstream in (1e-6 * 100 * scale, 1e-3 * 100 * scale, 0.3 * 100 * scale):
        b = a + rng.uniform(-upstream, upstream, a.shape)
        qa, qb = e4m3(a, scale), e4m3(b, scale)
        assert np.abs(qa - qb).max() <= fp8_step_tolerance(qa, qb, scale, upstream=upstream)


def test_upstream_rule_is_not_vacuous():
    # a value off by two steps at the largest magnitude is more than upstream error + one step
    scale = 0.01
    ref = e4m3(np.linspace(-4, 4, 1001), scale)
    got = ref.copy()
    got[-1] += 2 * e4m3_step(4.0, scale)
    assert np.abs(ref - got).max() > fp8_step_tolerance(ref, got, scale, upstream=1e-4)


def test_same_inputs_rule_allows_one_tie_and_refuses_many():
    scale = 0.02
    x = np.random.default_rng(1).normal(0, 1, 10_000)
    ref = e4m3(x, scale)
    one = ref.copy()
    one[7] += e4m3_step(ref[7], scale)
    assert np.abs(ref - one).max() <= fp8_step_tolerance(ref, one, scale)
    many = ref.copy()
    many[:100] += np.array([e4m3_step(v, scale) for v in ref[:100]])  # 1% of the elements
    assert fp8_step_tolerance(ref, many, scale) == 0.0


def test_e4m3_step_matches_the_grid_spacing():
    scale = 0.5
    for v in (0.001, 0.02, 1.0, 3.7, 100.0, 200.0):
        grid = e4m3(np.array([v]), scale)[0]
        up = e4m3(np.array([grid + 0.6 * e4m3_step(grid, scale)]), scale)[0]  # just past half a step above
        assert up - grid == pytest.approx(e4m3_step(grid, scale))


def test_greedy_rule():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 6, 32))
    tokens = logits.argmax(-1)
    same = greedy_check(tokens, tokens, logits, 1e-3)
    assert same["consistent"] and same["agreement_before_tie"] == 1.0 and same["token_agreement"] == 1.0
    # a token that is not the argmax and not within 2 x tol of it: inconsistent
    wrong = tokens.copy()
    wrong[1, 3] = np.argsort(logits[1, 3])[-2]
    gap = np.sort(logits[1, 3])[-1] - np.sort(logits[1, 3])[-2]
    assert not greedy_check(wrong, tokens, logits, gap / 4)["consistent"]
    # the same choice where the top two are a near-tie: consistent, and equal before the tie
    tied = logits.copy()
    tied[1, 3, wrong[1, 3]] = logits[1, 3].max() - 1e-4
    c = greedy_check(wrong, tokens, tied, 1e-3)
    assert c["consistent"] and c["agreement_before_tie"] == 1.0 and c["near_ties"] >= 1 and c["token_agreement"] < 1.0
    # a first-step tie leaves nothing to compare before it: vacuously equal
    first = tied.copy()
    first[:, 0] = 0.0
    assert greedy_check(tokens, tokens, first, 1e-3)["agreement_before_tie"] == 1.0


def test_routing_near_ties_cover_every_16bit_routing_flip():
    """Every token whose top-k expert set changes when the router input and weights are rounded to 16
    bits (float64 oracle, float32 accumulation as the kernels do) is marked a routing near-tie, and few
    others are."""
    import torch

    from qwen3next_trt.validate.tolerances import UNIT_ROUNDOFF, routing_near_ties

    g = torch.Generator().manual_seed(0)
    N, H, E, k = 20000, 128, 16, 4
    x = torch.randn(N, H, generator=g, dtype=torch.float64)
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        w = (0.1 * torch.randn(E, H, generator=g, dtype=torch.float64)).to(dtype).double()  # weights: already 16-bit
        exact = x @ w.T
        rounded = x.to(dtype).float() @ w.float().T  # the graph's router: 16-bit input, float32 sums
        flipped = (exact.topk(k, -1).indices.sort(-1).values != rounded.topk(k, -1).indices.sort(-1).values).any(-1)
        marked = routing_near_ties(x, exact, w, k, UNIT_ROUNDOFF[name])
        assert flipped.any(), name  # the test sees flips at all
        assert not (flipped & ~marked).any(), f"{name}: {int((flipped & ~marked).sum())} flips not marked"
        # the bound leaves room for the upstream error of x, which this oracle has none of: measured
        # 409 marked for 16 flips (fp16), 2725 for 102 (bf16); a bound much looser would excuse anything
        assert marked.sum() <= 40 * flipped.sum() and marked.double().mean() < 0.2, f"{name}: {int(marked.sum())} marked"


def test_fp8_tolerances_are_never_tighter_than_the_export_dtype():
    from qwen3next_trt.validate.tolerances import TOLERANCES, fp8_tolerances

    assert fp8_tolerances("fp32") == TOLERANCES["fp8_activations"]
    for dtype in ("fp16", "bf16"):
        t = fp8_tolerances(dtype)
        for key in ("layer", "end_to_end"):
            assert t[key] >= TOLERANCES[dtype][key] and t[key] >= TOLERANCES["fp8_activations"][key]


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_16bit_activation_flips_stay_within_twice_the_rounding_effect(dtype):
    """The rule of activation_rounding_effect, on a linear layer with an independent E4M3 (ml_dtypes):
    the graph rounds the 16-bit activation with the 16-bit scale, the reference the float32 activation
    with the same scale; their outputs differ by no more than twice what the rounding itself does."""
    rng = np.random.default_rng(1)
    for trial in range(20):
        x = rng.normal(0, 1, (64, 256)) * rng.uniform(0.5, 4)
        w = rng.normal(0, 0.06, (256, 128))
        scale = float(np.asarray(np.abs(x).max() / 448, dtype).astype(np.float64))  # as the graph holds it
        u = 2.0**-11 if dtype == np.float16 else 2.0**-8
        # the graph's activation: computed in 16 bits, a few units of rounding off the float32 one
        x16 = (x * (1 + rng.normal(0, 2 * u, x.shape))).astype(dtype).astype(np.float64)
        ref, graph = e4m3(x, scale) @ w, e4m3(x16, scale) @ w
        flipped = (e4m3(x, scale) != e4m3(x16, scale)).mean()
        assert flipped > 1e-3  # 16-bit activations flip roundings, far more often than float32 ties (~1e-6)
        effect = np.abs(ref - x @ w).max()
        assert np.abs(graph - ref).max() <= 2 * effect + np.abs(x16 @ w - x @ w).max()
