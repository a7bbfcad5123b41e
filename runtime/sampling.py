"""Choosing the next token from logits: greedy, or temperature + nucleus (top-p) with a seeded RNG."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qwen3next_trt.errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy (argmax)
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    seed: int = 0  # request r draws from numpy's default_rng([seed, r]): reproducible per request

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def check(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and np.isfinite(self.temperature) and self.temperature >= 0):
            raise InputError(f"temperature: expected a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise InputError(f"top_p: expected a number in (0, 1], got {self.top_p!r}")
        if not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool) or self.seed < 0:
            raise InputError(f"seed: expected an integer >= 0, got {self.seed!r}")

    def rng(self, request: int) -> np.random.Generator:
        return np.random.default_rng([int(self.seed), request])


def choose(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token id from a logits row [V]."""
    if params.greedy:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / params.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, params.top_p)) + 1]  # the first token that reaches top_p stays
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(p.shape[0], p=p))
