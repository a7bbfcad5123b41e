"""Seeded inputs for every exported graph, built from the manifest's port descriptions.

Each prefill graph gets a fresh-sequence feed (zero states, no past) and a continuation feed
(random states, `past` earlier tokens); decode graphs get a continuation feed. Prefill feeds are
longer than one 64-token scan chunk.
"""

from __future__ import annotations

import numpy as np
import torch

from qwen3next_trt.export.manifest import DECODE, FLOAT8, GraphRecord, Role
from qwen3next_trt.sessions import host_dtype

STATE_SCALE = {"conv_state": 1.0, "recurrent_state": 0.5, "key": 1.0, "value": 1.0}


def dim_size(dim, sizes: dict) -> int:
    """A manifest dim (an int, a name, or a sum such as "past + seq" / "past + 1") at the given sizes."""
    if isinstance(dim, int):
        return dim
    return sum(int(part) if part.isdigit() else sizes[part] for part in (s.strip() for s in dim.split("+")))


def make_feed(record: GraphRecord, vocab_size: int, rng: np.random.Generator, batch: int, seq: int, past: int) -> dict:
    seq = 1 if record.mode == DECODE else seq
    sizes = {"batch": batch, "seq": seq, "past": past}
    feed = {}
    for p in record.inputs:
        shape = [dim_size(d, sizes) for d in p.shape]
        dtype = host_dtype(p.dtype)
        if p.role == Role.TOKENS:
            feed[p.name] = rng.integers(0, vocab_size, shape, dtype=np.int64)
        elif p.role == Role.POSITION:
            feed[p.name] = np.broadcast_to(np.arange(past, past + shape[1], dtype=np.int64), shape).copy()
        elif p.role == Role.MASK:
            # the last row is left-padded: its first past slots (up to 3) hold no token, so a
            # graph that ignored the mask would differ from the reference
            feed[p.name] = np.ones(shape, np.bool_)
            if past > 0:
                feed[p.name][-1, : min(3, past)] = False
        elif p.role == Role.STATE_IN:
            kind = p.state.rsplit(".", 1)[-1]
            if past == 0:
                feed[p.name] = np.zeros(shape, dtype)
            elif p.dtype == FLOAT8:  # FP8 KV cache: E4M3 bits of values up to ~+-200 (x the state's scale)
                values = torch.from_numpy((64 * rng.standard_normal(shape)).astype(np.float32))
                feed[p.name] = values.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
            else:
                feed[p.name] = (STATE_SCALE.get(kind, 1.0) * rng.standard_normal(shape)).astype(dtype)
        else:
            feed[p.name] = rng.standard_normal(shape).astype(dtype)
    return feed


def graph_seed(name: str) -> int:
    """A graph's own feed seed: stable across runs and processes (str hash() is salted)."""
    return sum(ord(c) * 31**i for i, c in enumerate(name)) % 2**31


def feeds_for(record: GraphRecord, vocab_size: int, seed: int | None = None, batch: int = 2, seq: int = 70, past: int = 9):
    """[(label, feed)] for one graph (seed: the graph's own by default)."""
    rng = np.random.default_rng(graph_seed(record.name) if seed is None else seed)
    if record.mode == DECODE:
        return [(f"decode past={past}", make_feed(record, vocab_size, rng, batch, 1, past))]
    feeds = [(f"fresh T={seq}", make_feed(record, vocab_size, rng, batch, seq, 0))]
    if record.has_state:
        feeds.append((f"continue T={seq // 2} past={past}", make_feed(record, vocab_size, rng, batch, seq // 2, past)))
    return feeds
