"""End to end: greedy generation through the runtime (per-layer prefill graphs, then decode graphs
fed with the states they returned) against the reference model's own greedy generation, with the
reference's logits along the backend's token path (tolerances.py: near-ties and FP8 KV rounding)."""

from __future__ import annotations

import time

import numpy as np
import torch

from qwen3next_trt.model.fp8 import fake_quantize_, fake_quantize_activations_, fake_quantize_kv_, graph_scales
from qwen3next_trt.runtime import Generator
from qwen3next_trt.sessions import torch_dtype

from .reference import routing_ties
from .tolerances import greedy_check, metrics, tolerance


def greedy_tokens(generator: Generator, prompt: np.ndarray, n: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Greedy tokens [B, n] through the runtime, and per step the logits [B, V] each token came from."""
    tokens, logits = [[] for _ in prompt], [[] for _ in prompt]
    for ev in generator.stream(prompt.tolist(), n, keep_logits=True):
        tokens[ev.request].append(ev.token)
        logits[ev.request].append(ev.logits)
    return np.array(tokens), [np.stack([row[i] for row in logits]) for i in range(n)]


def reference_model(source, manifest, quantizer):
    """The float model an export must reproduce: its FP8 roundings (weights, activations, KV) applied."""
    model = source.whole_model(with_mtp=False)
    precision = manifest.precision
    dtype = torch_dtype(manifest.dtype)  # the graphs' FP8 scales are rounded to it (model/fp8.py graph_scales)
    if quantizer is not None:
        fake_quantize_(model, "", quantizer)
        if precision.activations.static_scales or precision.activations.dynamic:
            fake_quantize_activations_(model, "", graph_scales(precision.activations.scales, dtype))
    if precision.kv_cache.fp8:
        fake_quantize_kv_(model, graph_scales(precision.kv_cache.scales, dtype))
    return model.to(torch.float32)


def greedy_parity(generator: Generator, model, vocab_size: int, n: int, tol: dict, unit_roundoff: float | None = None) -> dict:
    """Greedy decode of two seeded prompts through `generator` against `model`; the result row.

    unit_roundoff (16-bit exports): the comparison stops at the first position where the reference,
    along the backend's path, has a top-k routing near-tie in any layer (from there the two may route
    that token to different experts, and everything after it differs); none left: excused."""
    rng = np.random.default_rng(1234)
    prompt = rng.integers(0, vocab_size, (2, 20), dtype=np.int64)
    t = time.time()
    tokens, step_logits = greedy_tokens(generator, prompt, n)
    with torch.no_grad():
        expected = model.generate_greedy(torch.from_numpy(prompt), n).numpy()
        # the reference's logits along the backend's own token path: per-step logits error
        ids = torch.from_numpy(np.concatenate([prompt, tokens[:, :-1]], 1))
        ref_logits = model(ids, model.new_cache(ids.shape[0]))[:, prompt.shape[1] - 1 :].numpy()  # (the cache applies an FP8 KV's rounding)
        kv_quantize, model.kv_quantize = model.kv_quantize, {}  # the same path with float K/V
        float_kv_logits = model(ids, model.new_cache(ids.shape[0]))[:, prompt.shape[1] - 1 :].numpy() if kv_quantize else None
        model.kv_quantize = kv_quantize
    got = np.stack(step_logits, 1)
    steps, routing_note = n, None
    if unit_roundoff:
        ties = routing_ties([model], lambda: model(ids, model.new_cache(ids.shape[0])), unit_roundoff)
        tied = np.zeros(ids.shape, bool)
        for layer_ties in ties:  # one [B * L] array per MoE layer
            tied |= layer_ties.numpy().reshape(ids.shape)
        first = [int(np.flatnonzero(row)[0]) if row.any() else ids.shape[1] for row in tied]
        # the logits of step s come from position P - 1 + s: valid before the first tied position
        steps = max(0, min(n, min(first) - (prompt.shape[1] - 1)))
        if steps < n:
            routing_note = (f"a routing near-tie at position {min(first)} (prompt {prompt.shape[1]} tokens): "
                            f"{steps} of {n} steps compared")
    got, ref_logits, tokens_cmp, expected_cmp = got[:, :steps], ref_logits[:, :steps], tokens[:, :steps], expected[:, :steps]
    if float_kv_logits is not None:
        float_kv_logits = float_kv_logits[:, :steps]
    if steps == 0:
        return {"prompt_tokens": prompt.shape[1], "generated": n, "batch": prompt.shape[0], "token_agreement": float("nan"),
                "near_ties": 0, "consistent": None, "logits_max_abs": float("nan"), "tolerance": float("nan"),
                "passed": False, "routing_near_tie": routing_note, "excused": routing_note, "seconds": round(time.time() - t, 1)}
    tokens, expected = tokens_cmp, expected_cmp
    max_abs, _, cos, ref_max = metrics(ref_logits, got)
    limit = tolerance(tol, "end_to_end", ref_max)
    if float_kv_logits is not None:  # an FP8 KV cache: its rounding's own effect, twice (tolerances.py)
        limit += 2 * metrics(ref_logits, float_kv_logits)[0]
    check = greedy_check(tokens, expected, ref_logits, limit)
    return {
        "prompt_tokens": prompt.shape[1], "generated": n, "batch": prompt.shape[0],
        **check, "logits_max_abs": max_abs, "logits_cosine": cos, "tolerance": limit,
        "passed": check["consistent"] and check["agreement_before_tie"] >= tol["greedy_agreement"] and max_abs <= limit,
        "compared_steps": steps, "routing_near_tie": routing_note, "excused": None,
        "seconds": round(time.time() - t, 1),
    }
