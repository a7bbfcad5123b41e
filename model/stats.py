"""Parameter counts, memory and layer plan of a config, for `qwen3next-trt info`.

Counts come from the modules themselves (built on the meta device, so nothing is allocated): one
layer of each distinct kind is built and multiplied, which stays exact and takes a second for 80B.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import FULL_ATTENTION, Qwen3NextConfig
from .fp8 import KEPT_IN_BF16, is_quantized
from .modeling_qwen3_next import Qwen3NextDecoderLayer, Qwen3NextForCausalLM, Qwen3NextMTP


@dataclass
class Counts:
    total: int = 0
    active: int = 0  # parameters touched per token: routed experts count top_k times, not num_experts
    fp8_bytes: int = 0

    def add(self, other: "Counts", times: int = 1):
        self.total += other.total * times
        self.active += other.active * times
        self.fp8_bytes += other.fp8_bytes * times


def _fp8_bytes(name: str, p: torch.Tensor, block=128) -> int:
    if p.dim() == 2 and not any(s in name for s in KEPT_IN_BF16):
        scales = -(-p.shape[0] // block) * -(-p.shape[1] // block)
        return p.numel() + 4 * scales
    return 2 * p.numel()


def count_module(module, prefix: str, config: Qwen3NextConfig) -> Counts:
    c = Counts()
    routed = 0
    for name, p in module.named_parameters():
        full = prefix + name
        c.total += p.numel()
        if ".experts." in full:
            routed += p.numel()
        else:
            c.active += p.numel()
        c.fp8_bytes += _fp8_bytes(full, p)
    if routed:
        c.active += routed * config.num_experts_per_tok // config.num_experts
    return c


@dataclass
class ModelStats:
    main: Counts
    embeddings: int  # embed_tokens + lm_head (once if tied)
    mtp: Counts
    layer_plan: list[tuple[int, str, str]]

    @property
    def bf16_bytes(self) -> int:
        return 2 * self.main.total


def model_stats(config: Qwen3NextConfig) -> ModelStats:
    main = Counts()
    plan = []
    kinds: dict[tuple[str, bool], Counts] = {}
    with torch.device("meta"):
        for i, t in enumerate(config.layer_types):
            moe = config.is_moe_layer(i)
            plan.append((i, t, "moe" if moe else "dense"))
            if (t, moe) not in kinds:
                layer = Qwen3NextDecoderLayer(config, i)
                kinds[(t, moe)] = count_module(layer, f"model.layers.{i}.", config)
            main.add(kinds[(t, moe)])
        H, V = config.hidden_size, config.vocab_size
        emb = V * H * (1 if config.tie_word_embeddings else 2)
        main.add(Counts(total=emb + H, active=emb + H, fp8_bytes=2 * (emb + H)))
        mtp = Counts()
        if config.num_mtp_layers:
            mtp = count_module(Qwen3NextMTP(config), "mtp.", config)
    return ModelStats(main=main, embeddings=emb, mtp=mtp, layer_plan=plan)


def state_bytes_per_token_and_sequence(config: Qwen3NextConfig, kv_bytes: int = 2) -> tuple[int, int]:
    """(KV-cache bytes per token over all attention layers, fixed DeltaNet state bytes per sequence)."""
    n_full = sum(t == FULL_ATTENTION for t in config.layer_types)
    n_lin = len(config.layer_types) - n_full
    per_token = n_full * 2 * config.num_key_value_heads * config.head_dim * kv_bytes
    per_seq = n_lin * (
        config.linear_conv_dim * (config.linear_conv_kernel_dim - 1) * kv_bytes
        + 4 * config.linear_num_value_heads * config.linear_key_head_dim * config.linear_value_head_dim
    )
    return per_token, per_seq


def export_part_bytes(config: Qwen3NextConfig, part: str, dtype_bytes: int, fp8: bool, max_positions: int,
                      layer: int | None = None) -> int:
    """Bytes of one exported part's weights file (`part`: embed, layer, final, lm_head, mtp, model):
    every tensor once, FP8-stored linears at 1 byte + a row scale [out, ceil(in/128)] in the export
    dtype, everything else in the export dtype, RoPE cos/sin tables in attention parts. An estimate
    for the disk-space check (within a few percent of real exports: NOTES.md), not a promise."""
    def module_bytes(module, prefix):
        total = 0
        for name, p in module.named_parameters():
            if fp8 and p.dim() == 2 and is_quantized(prefix + name):
                total += p.numel() + dtype_bytes * p.shape[0] * -(-p.shape[1] // 128)
            else:
                total += dtype_bytes * p.numel()
        return total

    rope = 2 * max_positions * (config.rotary_dim // 2) * dtype_bytes
    H, V = config.hidden_size, config.vocab_size
    with torch.device("meta"):
        if part == "embed":
            return V * H * dtype_bytes
        if part in ("final", "lm_head"):
            return V * H * dtype_bytes + (H * dtype_bytes if part == "final" else 0)
        if part == "layer":
            full = config.layer_types[layer] == FULL_ATTENTION
            return module_bytes(Qwen3NextDecoderLayer(config, layer), f"model.layers.{layer}.") + (rope if full else 0)
        if part == "mtp":
            return module_bytes(Qwen3NextMTP(config), "mtp.") + rope
        if part == "model":
            return module_bytes(Qwen3NextForCausalLM(config), "") + rope
    raise ValueError(f"unknown export part {part!r}")
