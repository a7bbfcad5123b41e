"""How close is close enough: the error metrics and the tolerances of `validate`, and why each holds.

Every rule here must hold on any x86-64 CPU, not only on the machine a test was written on. ONNX
Runtime (MLAS) and PyTorch (ATen/oneDNN) choose their float32 kernels by CPU features (AVX2, AVX-512,
AMX) and thread count, so sums are added in different orders on different machines: float outputs
then differ by a few units of float32 rounding per layer, never more. A rule is therefore stated as a
property of the computation (what rounding can do to it), never as "what this machine printed".
validate/README.md explains each number.
"""

from __future__ import annotations

import numpy as np

# Float outputs. fp32: absolute, as the export issue fixed them (float32 rounding of a layer is ~1e-6
# here, so 1e-4 leaves two orders of magnitude for kernel-order differences). 16-bit: relative to the
# output's largest magnitude, since the error scales with the values: bf16 keeps 8 significant bits
# (unit roundoff 2^-9 = 2e-3) and fp16 11 (2^-12 = 2.4e-4); a layer compounds a few such roundings over
# sums of thousands of terms. `greedy_agreement`: the share of greedy tokens that must equal the
# reference's before the first near-tie (see greedy_check).
TOLERANCES = {
    "fp32": {"kind": "abs", "layer": 1e-4, "end_to_end": 1e-3, "greedy_agreement": 1.0},
    "fp16": {"kind": "rel_to_max", "layer": 5e-3, "end_to_end": 2e-2, "greedy_agreement": 0.9},
    "bf16": {"kind": "rel_to_max", "layer": 4e-2, "end_to_end": 1e-1, "greedy_agreement": 0.75},
    "fp8_activations": {"kind": "rel_to_max", "layer": 1e-3, "end_to_end": 1e-2, "greedy_agreement": 0.9},
}

E4M3_MANTISSA_BITS = 3


def fp8_tolerances(dtype: str) -> dict:
    """Tolerances of an export with FP8 activations or an FP8 KV cache: TOLERANCES["fp8_activations"]
    for float32, and for a 16-bit export the looser of that and the dtype's own (an FP8 rounding does
    not make the 16-bit arithmetic around it more exact)."""
    fp8 = TOLERANCES["fp8_activations"]
    if dtype == "fp32":
        return fp8
    own = TOLERANCES[dtype]
    return {"kind": "rel_to_max", "layer": max(fp8["layer"], own["layer"]), "end_to_end": max(fp8["end_to_end"], own["end_to_end"]),
            "greedy_agreement": min(fp8["greedy_agreement"], own["greedy_agreement"])}


def metrics(ref: np.ndarray, got: np.ndarray) -> tuple[float, float, float, float]:
    """max abs error, max relative error, cosine similarity, max |ref|."""
    r, g = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    diff = np.abs(r - g)
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float((diff / np.maximum(np.abs(r), 1e-6)).max()) if diff.size else 0.0
    denom = np.linalg.norm(r) * np.linalg.norm(g)
    cosine = float(r @ g / denom) if denom > 0 else float(np.array_equal(r, g))
    return max_abs, max_rel, cosine, float(np.abs(r).max()) if r.size else 0.0


def tolerance(tol: dict, which: str, ref_max: float) -> float:
    """The absolute threshold on max abs error for an output of kind `which` ("layer" / "end_to_end")."""
    return tol[which] if tol["kind"] == "abs" else tol[which] * max(ref_max, 1e-6)


def e4m3_step(value: float, scale: float) -> float:
    """The spacing of the E4M3 grid (times `scale`) at magnitude `value` (already times `scale`)."""
    units = max(abs(value) / scale, 2.0**-9)
    exponent = max(np.floor(np.log2(units)), -6.0)  # subnormals share the step of 2^-6
    return float(2.0 ** (exponent - E4M3_MANTISSA_BITS) * scale)


def fp8_step_tolerance(ref: np.ndarray, got: np.ndarray, scale: float, max_fraction: float = 1e-3,
                       upstream: float = 0.0) -> float:
    """Threshold on max abs error for outputs that are E4M3 values x scale (an FP8 KV cache).

    Identical inputs (`upstream` = 0, a per-layer graph fed the same feeds): the only way the two
    sides differ is a value that lies within float32 rounding (~1e-7 relative) of a rounding boundary
    and is decided the other way. An E4M3 step is 1/16..1/8 of the value, so such ties are ~1e-6 of
    the elements on any CPU: allow one step at the element that differs most, provided at most
    `max_fraction` (1e-3) of the elements differ at all; 0 otherwise.

    Inputs that differ (`upstream` > 0: the stitched model, whose K/V at layer i are computed from
    float hidden states that already carry i layers of kernel-order error, bounded by the graph's float
    tolerance `upstream`): round-to-nearest moves each side by at most half a step, so
    |q(a) - q(b)| <= |a - b| + step(max(|a|, |b|)) <= upstream + the largest step of either output.
    How many elements flip then depends on the CPU (measured: 0.1% on one x86 CPU, more on another),
    so no fraction is bounded, only the size of each flip.
    """
    diff = np.abs(ref.astype(np.float64) - got)
    if not diff.any():
        return 0.0
    slack = 1 + 1e-5  # float32 rounding of value x scale
    if upstream > 0:
        largest = max(float(np.abs(ref).max()), float(np.abs(got).max()))
        return (upstream + e4m3_step(largest, scale)) * slack
    if (diff > 0).mean() > max_fraction:
        return 0.0
    i = diff.argmax()
    worst = max(abs(float(ref.ravel()[i])), abs(float(got.ravel()[i])))  # the coarser step of the two sides
    return e4m3_step(worst, scale) * slack


def kv_rounding_effect(part, feeds: list[dict], rounded: list) -> list[dict[str, float]]:
    """Per feed and output: max abs change that an FP8 KV cache's rounding makes to the reference's
    output: `rounded` (the reference's outputs, E4M3-rounded K/V) against the same reference run with
    float K/V.

    Why the stitched model needs it: there, the K/V of a later layer are rounded from hidden states
    that earlier layers' K/V roundings already moved, and a value that lands on the other side of an
    E4M3 boundary than in the reference moves by a whole step (6-12% of that element). Which values
    flip depends on float32 ordering, so on the CPU (issue 11: logits 0.31 off, of max 1.4, with
    PyTorch and ONNX Runtime on other kernels). Flips are roundings decided the other way, each at most
    one step where a rounding is at most half a step, so (to first order) their effect is at most twice
    the rounding's own effect on that output; the per-layer graphs, fed identical inputs, keep the
    strict one-step rule and catch a graph that rounds wrongly.
    """
    return _effect(part, feeds, rounded, part.context, "fake_quantize_kv")


def activation_rounding_effect(part, feeds: list[dict], rounded: list) -> list[dict[str, float]]:
    """Per feed and output: max abs change that FP8 activation rounding makes to the reference's output
    (`rounded`, the reference's outputs) against the same reference with its activations unrounded.

    Why a 16-bit export needs it: the graph computes the activations it rounds in 16 bits, the reference
    in float32, so they differ by ~2^-11 (fp16) / 2^-8 (bf16) of the value, and every activation within
    that of an E4M3 boundary (~1% in fp16, more in bf16, against ~1e-6 for a float32 export) rounds the
    other way: a whole step (6-12% of that element). As for an FP8 KV cache (kv_rounding_effect), a flip is
    a rounding decided the other way, at most one step where the rounding itself is at most half of one,
    so to first order the flips move an output by at most twice the rounding's own effect (measured on
    the tiny fp16 export with static FP8 activations: per-layer graphs at a median 0.43x, at most 1.3x the
    effect; the stitched model, where flips compound, up to 1.9x). What this rule cannot tell apart: a
    graph that skipped the rounding (off by ~1x the effect). The float32 exports, made by the same
    exporter code, keep the strict rule (1e-3 x max), below that effect (~7e-3 x max on the tiny fp16 export)."""
    return _effect(part, feeds, rounded, part.act_rounding, "on")


def _effect(part, feeds: list[dict], rounded: list, switch, key) -> list[dict[str, float]]:
    """Per feed and output: max abs between `rounded` (the reference's outputs) and the reference run
    again with the rounding switched off (`switch[key]` or `switch.key` False meanwhile)."""
    get = (lambda: switch[key]) if isinstance(switch, dict) else (lambda: getattr(switch, key))
    put = (lambda v: switch.__setitem__(key, v)) if isinstance(switch, dict) else (lambda v: setattr(switch, key, v))
    was = get()
    put(False)
    try:
        unrounded = [part(feed) for feed in feeds]
    finally:
        put(was)
    return [{name: metrics(r[name], f[name])[0] for name in r} for r, f in zip(rounded, unrounded)]


def greedy_check(tokens: np.ndarray, expected: np.ndarray, ref_logits: np.ndarray, logits_tol: float) -> dict:
    """Greedy tokens of a backend against the reference's, robust to near-ties.

    tokens / expected: [B, N] greedy tokens of the backend and of the reference; ref_logits: [B, N, V],
    the reference's logits along the *backend's* token path. Two implementations whose logits agree
    within `logits_tol` may pick different tokens only where the reference's two best logits are within
    2 x logits_tol of each other (a near-tie); after that the sequences follow different paths and equality
    means nothing. So the rule, which holds on any CPU: every backend token is a greedy choice of the
    reference up to 2 x logits_tol (`consistent`), and the tokens equal the reference's before the first
    near-tie (`agreement_before_tie`).
    """
    b, n = tokens.shape
    chosen = np.take_along_axis(ref_logits, tokens[..., None], -1)[..., 0]
    margin = ref_logits.max(-1) - chosen  # 0 where the backend took the reference's argmax
    consistent = bool((margin <= 2 * logits_tol).all())
    top2 = np.sort(ref_logits, -1)[..., -2:]
    near_tie = (top2[..., 1] - top2[..., 0]) <= 2 * logits_tol
    compared = agree = 0
    first_divergence = []
    for row in range(b):
        ties = np.flatnonzero(near_tie[row])
        stop = int(ties[0]) if ties.size else n  # positions before the first near-tie (there, either token is right)
        differ = np.flatnonzero(tokens[row, :stop] != expected[row, :stop])
        first_divergence.append(int(differ[0]) if differ.size else None)
        compared += stop
        agree += int((tokens[row, :stop] == expected[row, :stop]).sum())
    return {
        "token_agreement": float((tokens == expected).mean()),
        "agreement_before_tie": agree / compared if compared else 1.0,  # no position before a tie: nothing to disagree on
        "consistent": consistent,
        "worst_margin": float(margin.max()),
        "near_ties": int(near_tie.sum()),
        "first_divergence": first_divergence,
    }


# Top-k routing in a 16-bit export. The router's logits come out of a 16-bit graph: its input x is
# rounded to 16 bits (and carries the layer's upstream 16-bit error), so where the reference's k-th and
# (k+1)-th best logits are closer than that moves them, the graph may pick the other expert,
# legitimately: that token's MoE output then differs by a whole expert's contribution (seen: fp16 tiny,
# one token with a logit gap of 1.6e-5 off by 0.137 where the rest is 1e-3; NOTES.md, issue 17). The
# roundings of the H terms x_i w_i are independent, so they add in quadrature: the bound per token is
# ROUTING_MARGIN unit roundoffs of ||x * w_a||_2 + ||x * w_b||_2 for the two experts a, b (4 standard
# deviations; float32 accumulation, as ONNX Runtime's CPU and CUDA 16-bit GEMMs do). On the tiny fp16
# export this marks 0-4 of 140 tokens per layer. float32 exports: no allowance.
UNIT_ROUNDOFF = {"fp16": 2.0**-11, "bf16": 2.0**-8}
ROUTING_MARGIN = 4


def routing_near_ties(x, logits, weight, k: int, unit_roundoff: float):
    """Boolean per token (torch, [N]): the k-th and (k+1)-th router logits are within what 16-bit
    rounding can move them. x [N, H] router input, logits [N, E], weight [E, H]."""
    import torch

    if logits.shape[-1] <= k:  # every expert is chosen: nothing to tie
        return torch.zeros(logits.shape[0], dtype=torch.bool)
    top = logits.float().topk(k + 1, -1)
    gap = top.values[:, k - 1] - top.values[:, k]
    a, b = top.indices[:, k - 1], top.indices[:, k]
    x, w = x.float(), weight.float()
    scale = (x * w[a]).norm(dim=-1) + (x * w[b]).norm(dim=-1)
    return gap <= ROUTING_MARGIN * unit_roundoff * scale
