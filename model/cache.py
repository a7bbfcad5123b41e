"""Per-sequence state of Qwen3-Next: what prefill leaves behind and every decode step reads and updates.

Layouts (the exporter's graphs use the same ones):
  attention layer:  key, value        [B, num_key_value_heads, T_past, head_dim]   (activation dtype)
  DeltaNet layer:   conv_state        [B, conv_dim, K-1]  the last K-1 inputs of the causal conv
                                      (channels in [q_all | k_all | v_all] order; activation dtype)
                    recurrent_state   [B, num_value_heads, key_head_dim, value_head_dim]  float32 always
  MTP layer:        its own key / value cache, like an attention layer.
"""

from __future__ import annotations

import torch

from .config import LINEAR_ATTENTION, Qwen3NextConfig


class AttentionCache:
    def __init__(self):
        self.key: torch.Tensor | None = None
        self.value: torch.Tensor | None = None
        # [B, P+T] bool over every key after this step's append, True = a real token. None means all
        # real. Rows of a batch with different lengths (left padding, rejected speculative drafts)
        # leave slots that no query may see.
        self.key_mask: torch.Tensor | None = None
        # FP8 KV cache: (k, v) -> (k, v) rounded through E4M3 with the layer's static scales, applied
        # to every token as it enters the cache, so attention sees what an FP8 cache stores
        self.quantize = None

    @classmethod
    def from_tensors(cls, key: torch.Tensor, value: torch.Tensor, key_mask: torch.Tensor | None = None) -> "AttentionCache":
        cache = cls()
        cache.key, cache.value, cache.key_mask = key, value, key_mask
        return cache

    def append(self, k: torch.Tensor, v: torch.Tensor):
        """Add this step's keys/values [B, Hkv, T, D]; return all keys/values so far."""
        if self.quantize is not None:
            k, v = self.quantize(k, v)
        if self.key is None:
            self.key, self.value = k, v
        else:
            self.key = torch.cat([self.key, k], dim=2)
            self.value = torch.cat([self.value, v], dim=2)
        return self.key, self.value

    @property
    def length(self) -> int:
        return 0 if self.key is None else self.key.shape[2]


class DeltaNetCache:
    def __init__(self, config: Qwen3NextConfig, batch_size: int, dtype, device):
        self.conv_state = torch.zeros(
            batch_size, config.linear_conv_dim, config.linear_conv_kernel_dim - 1, dtype=dtype, device=device
        )
        self.recurrent_state = torch.zeros(
            batch_size, config.linear_num_value_heads, config.linear_key_head_dim, config.linear_value_head_dim,
            dtype=torch.float32, device=device,
        )

    @classmethod
    def from_tensors(cls, conv_state: torch.Tensor, recurrent_state: torch.Tensor) -> "DeltaNetCache":
        cache = cls.__new__(cls)
        cache.conv_state, cache.recurrent_state = conv_state, recurrent_state
        return cache


class Qwen3NextCache:
    def __init__(self, config: Qwen3NextConfig, batch_size: int, dtype=torch.float32, device="cpu"):
        self.layers = [
            DeltaNetCache(config, batch_size, dtype, device) if t == LINEAR_ATTENTION else AttentionCache()
            for t in config.layer_types
        ]
        self.mtp_layers = [AttentionCache() for _ in range(config.num_mtp_layers)]
        self.seq_len = 0  # tokens the main model has consumed; the next token's position
