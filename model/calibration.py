"""Activation ranges for static FP8 scales: run calibration text through the model one layer at a time.

Text: the Python standard library's own source files (they ship with every Python; no download),
as bytes. Token ids are the byte values (taken modulo the vocabulary when it is smaller than 256):
meaningful for byte-level models such as the trained `tiny` (bench/train_tiny.py); for a model with
a real tokenizer the ids are plausible-looking noise, and a user should calibrate with their own text.

The model is streamed: one decoder layer is materialised at a time (the 80B model never needs to fit),
its activations recorded by hooks, and its output fed to the next layer.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

from qwen3next_trt.errors import InputError

from .cache import AttentionCache
from .fp8 import FP8_MAX, activation_points
from .config import LINEAR_ATTENTION
from .loader import WeightSource, layer_prefix
from .modeling_qwen3_next import Qwen3NextRotaryEmbedding


def stdlib_sources() -> list[Path]:
    """The Python standard library's own *.py files (tests excluded), sorted: text that ships with Python."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "test" not in p.parts)


def calibration_tokens(count: int, seq: int, vocab: int) -> torch.Tensor:
    """[count, seq] token ids from the stdlib sources (deterministic: sorted files, evenly spaced windows)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_sources()[:400]
    data = torch.frombuffer(bytearray(b"".join(p.read_bytes() for p in files)), dtype=torch.uint8).long()
    if data.numel() < count * seq:
        raise InputError(f"--calib {count}: the calibration text ({root}) holds {data.numel():,} tokens, "
                         f"fewer than the {count * seq:,} asked ({count} x {seq})")
    step = data.numel() // count
    return torch.stack([data[i * step : i * step + seq] for i in range(count)]) % vocab


@torch.no_grad()
def calibrate(source: WeightSource, tokens: torch.Tensor, percentile: float | None = None, progress=print) -> dict[str, float]:
    """{activation name: scale} with scale = range / 448, range = max |x| (or its `percentile`).

    Names: a quantised linear's weight name for its input, `<prefix>mlp.experts` for a MoE input, and
    `<prefix>self_attn.key` / `.value` for what an attention layer stores in its KV cache."""
    cfg = source.config
    ranges: dict[str, float] = {}

    def observe_tensor(name, x):
        x = x.detach().float().abs().flatten()
        r = torch.quantile(x[:: max(1, x.numel() // 1_000_000)], percentile / 100).item() if percentile else x.max().item()
        ranges[name] = max(ranges.get(name, 0.0), r)

    def record(name):
        def hook(module, args):
            observe_tensor(name, args[0])
        return hook

    def observe_cache(cache, prefix):
        observe_tensor(f"{prefix}self_attn.key", cache.key)
        observe_tensor(f"{prefix}self_attn.value", cache.value)

    def observe(module, prefix):
        handles = []
        for name, sub in activation_points(module, prefix):
            handles.append(sub.register_forward_pre_hook(record(name)))
        return handles

    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    rotate = Qwen3NextRotaryEmbedding(cfg).rotation(positions, torch.float32)
    hidden = source.embedding().float()(tokens)
    n = cfg.num_hidden_layers
    for i in range(n):
        layer = source.layer(i).float()
        handles = observe(layer, layer_prefix(i, cfg))
        cache = None if layer.layer_type == LINEAR_ATTENTION else AttentionCache()
        hidden = layer(hidden, rotate, cache)
        for h in handles:
            h.remove()
        if cache is not None:
            observe_cache(cache, layer_prefix(i, cfg))
        progress(f"[calibrate] layer {i + 1}/{n}: {len(ranges)} activation ranges so far")
        del layer
    if cfg.num_mtp_layers:
        normed = source.final_norm().float()(hidden)
        mtp = source.mtp().float()
        handles = observe(mtp, "mtp.")
        cache = AttentionCache()
        mtp(source.embedding().float()(tokens[:, 1:]), normed[:, :-1], Qwen3NextRotaryEmbedding(cfg).rotation(positions[:, :-1], torch.float32), cache)
        for h in handles:
            h.remove()
        observe_cache(cache, "mtp.layers.0.")
        progress("[calibrate] MTP layer")
    return {name: (r / FP8_MAX if r > 0 else 1.0) for name, r in sorted(ranges.items())}
