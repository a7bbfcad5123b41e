"""Greedy-token oracles that hold on any CPU.

Two implementations whose logits agree within a tolerance can only pick different greedy tokens where
the two best logits are closer than twice that tolerance. So a test that compares token lists exactly
first proves that its oracle's tokens are *well separated* (every step's top-2 margin at least
`min_margin`): then any implementation within tolerance must produce exactly these tokens, whatever
kernels the CPU picks. Where margins are small by nature (an FP8 KV cache, whose rounding flips turn
1e-7 differences into 1e-2 ones), `assert_greedy_choices` checks instead that every token is a greedy
choice of the reference along the path actually taken (validate/tolerances.py: greedy_check).
"""

from __future__ import annotations

import numpy as np
import torch

from qwen3next_trt.validate.tolerances import TOLERANCES, greedy_check

# 2 x the fp32 whole-model logits tolerance: 100 x the float32 error measured on the tiny model (~1e-5)
FP32_MARGIN = 2 * TOLERANCES["fp32"]["end_to_end"]


@torch.no_grad()
def path_logits(model, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """The reference's logits [len(tokens), V] that chose each of `tokens` after `prompt` (one forward)."""
    ids = torch.tensor([list(prompt) + list(tokens[:-1])])
    return model(ids, model.new_cache(1))[0, len(prompt) - 1 :].float().numpy()


@torch.no_grad()
def separated_greedy(model, prompts: list[list[int]], n: int, min_margin: float = FP32_MARGIN) -> list[list[int]]:
    """The reference's greedy tokens for each prompt, asserting every step's top-2 margin >= min_margin."""
    out = []
    for p in prompts:
        tokens = model.generate_greedy(torch.tensor([p]), n)[0].tolist()
        top2 = np.sort(path_logits(model, p, tokens), -1)[:, -2:]
        margins = top2[:, 1] - top2[:, 0]
        assert margins.min() >= min_margin, (
            f"oracle not well separated: prompt {p[:6]}... step {int(margins.argmin())} has top-2 margin "
            f"{margins.min():.2e} < {min_margin:.1e}; pick another prompt so the test holds on every CPU")
        out.append(tokens)
    return out


def assert_greedy_choices(model, prompts: list[list[int]], got: list[list[int]], expected: list[list[int]],
                          logits_tol: float) -> dict:
    """Every token in `got` is a greedy choice of `model` up to 2 x logits_tol along its own path, and
    equals `expected` before the first near-tie."""
    for p, g, e in zip(prompts, got, expected):
        check = greedy_check(np.array([g]), np.array([e[: len(g)]]), path_logits(model, p, g)[None], logits_tol)
        assert check["consistent"] and check["agreement_before_tie"] == 1.0, (p[:6], g, e, check)
    return check
