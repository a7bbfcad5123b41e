"""Qwen3-Next-80B-A3B on one GPU, end to end from the project's kernels: how fast a decode step and a
prefill run, and where the time goes.

    python bench/e2e_80b.py [--out DIR] [--budget-s 470] [--sections numerics,decode,breakdown,prefill,mtp,peer]
    python bench/e2e_80b.py --cpu-check        # dev machine: the step's torch path and the Triton kernels
                                               # (TRITON_INTERPRET=1) against the reference on a small config
    (on the device tool: bash bench/device/e2e_80b.sh, which writes $OUT/e2e_80b.json and the log)

No TensorRT that runs on SM90 is reachable, so the step is built from the same kernels the engines run,
called from PyTorch and captured as one CUDA graph per (batch, context bucket, tokens per step):
  - weights: the official 80B configuration (`qwen3-next-80b-a3b` preset, 48 layers, 512 experts top-10, one
    MTP layer) with seeded random values materialised directly on the GPU in the official FP8 layout
    (float8 e4m3 + 128 x 128 `weight_scale_inv`; norms, router, shared-expert gate, in_proj_ba, conv, A_log,
    dt_bias, embeddings, lm_head and mtp.fc in BF16). Loader-style repacking, exact unless noted: DeltaNet
    in_proj_qkvz/in_proj_ba rows regrouped from per-key-head to [q|k|v|z] / [b|a] (whole 128-row blocks move,
    so their scales move with them), attention q/k/v and shared-expert gate/up concatenated, routed-expert
    gate/up rows interleaved for the MoE plugin, their two scale tensors stacked (the kernel's scale1
    layout: exact);
  - kernels: causal conv, gated-delta-rule decode (1-4 tokens) and chunked scan (prefill), FP8 MoE decode
    and prefill paths (plugins/, through plugins/torch_ops' C library); FP8 block-scaled projections
    (plugins/fp8_gemm.py: a GEMV for 1-8 tokens that also runs the bf16 router / in_proj_ba in the same launch,
    a tensor-core GEMM, or torch's block-scaled `scaled_mm`: whichever the selftest timed fastest per size);
    attention over a KV cache: split-KV decode kernel (Triton, below), PyTorch SDPA (flash) for prefill; fused
    norm / gate / RoPE glue kernels (Triton, below); every kernel is checked against its torch version first
    (`--selftest`, its own process) and the torch version runs where a check failed;
  - numerics: the same model at 4 layers (+ MTP) against the project's reference model (model/) holding
    the same weights dequantised, in float32: logits cosine and top-1 agreement for prefill, decode steps
    (the CUDA graphs), a 3-token verify step and the MTP head;
  - peer in the same run: the same step from what a PyTorch user has (torch block-scaled `scaled_mm` or
    per-call dequantisation, SDPA, the reference's recurrent scan and conv, a gather-dequantise-bmm MoE for
    decode and `torch._grouped_mm` for prefill), captured the same way.
Timing: CUDA events around CUDA-graph replays (decode), medians; the HBM floor is the bytes a step must
move (weights read once incl. the experts the routing touched, states read and written, KV read) over a
device-to-device copy bandwidth measured in the same run. Every section has a time budget; every row is
written to the JSON as soon as it exists, errors included.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import dataclasses
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from qwen3next_trt.model.config import FULL_ATTENTION, LINEAR_ATTENTION, Qwen3NextConfig
from qwen3next_trt.model.gated_delta_rule import chunk_gated_delta_rule, recurrent_gated_delta_rule
from qwen3next_trt.model.loader import random_tensor
from qwen3next_trt.model.modeling_qwen3_next import (
    Qwen3NextForCausalLM,
    Qwen3NextRotaryEmbedding,
    causal_conv1d_with_state,
    rope_inverse_frequencies,
    route_tokens,
)
from qwen3next_trt.model.fp8 import dequantize_fc1
from qwen3next_trt.model.presets import load_preset
from qwen3next_trt.plugins import fp8_gemm as fp8mod

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BF16, F32, FP8 = torch.bfloat16, torch.float32, torch.float8_e4m3fn


def u8(t):
    """FP8 tensors gathered, concatenated and stacked as their bytes (not every indexing kernel takes float8)."""
    return t.view(torch.uint8)
INTERPRET = fp8mod.INTERPRET
ANCHORS = {
    "single_stream_tokens_per_s": (210.8, "Qwen3-Coder-Next (same architecture) FP8, 1 x H200, single stream, 1K context"),
    "vllm_c8_tpot_ms": (9.85, "vLLM, H200, concurrency 8, TPOT"),
}
TARGETS = {"batch1_tokens_per_s": 650, "batch32_tokens_per_s": 2500, "prefill_32k_tokens_per_s": 60000}

# ------------------------------------------------------------------------------------------------
# Labels for the per-part breakdown. Parts listed in SKIP are replaced by stand-in outputs (same shapes,
# allocated once), so T(step) - T(step without a part) is that part's cost inside the graph, its launch
# gaps included.

SKIP: set[str] = set()
_STANDINS: dict = {}


def standin(key, shape, dtype, device):
    k = (key, tuple(shape), dtype)
    if k not in _STANDINS:
        _STANDINS[k] = (torch.randn(shape, device=device) * 0.02).to(dtype)
    return _STANDINS[k]


# ------------------------------------------------------------------------------------------------
# Seeded random weights in the official FP8 layout, made on the device


def name_seed(name: str, seed: int) -> int:
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % 2**63  # as model/loader.py seeds per tensor


def linear_std(name: str, fan_in: int) -> float:
    # model/loader.py random_tensor's rule for linear weights: unit gain, residual-branch outputs at 1/4
    std = fan_in**-0.5
    return std / 4 if name.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight")) else std


def quantize_blocks(w: torch.Tensor):
    """[..., N, K] float (N, K multiples of 128) -> (float8 [..., N, K], scale_inv [..., N/128, K/128]): amax/448
    per 128 x 128 block, as model/fp8.py quantises (and the checkpoint's scales mean: W = fp8 * scale)."""
    *lead, N, K = w.shape
    v = w.view(*lead, N // 128, 128, K // 128, 128)
    amax = v.abs().amax(dim=(-3, -1))
    scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    q = (v / scale[..., :, None, :, None]).to(FP8).view(*lead, N, K)
    return q, scale.float()


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    *lead, N, K = q.shape
    v = q.view(*lead, N // 128, 128, K // 128, 128).float() * scale[..., :, None, :, None]
    return v.view(*lead, N, K)


class WeightMaker:
    """Each tensor from a generator seeded by (seed, its checkpoint name). Small tensors (norms, conv, A_log,
    dt_bias) are exactly model/loader.py's random_tensor; large ones are drawn on the device with the same
    distribution rule. Routed experts are stacked per layer ([E, out, in]: the checkpoint's
    `mlp.experts.{e}.<proj>.weight` for e = 0..E-1, same bytes per expert)."""

    def __init__(self, cfg: Qwen3NextConfig, seed: int, device):
        self.cfg, self.seed, self.device = cfg, seed, torch.device(device)

    def _gen(self, name):
        g = torch.Generator(device=self.device)
        g.manual_seed(name_seed(name, self.seed))
        return g

    def small(self, name, shape, dtype=BF16):
        return random_tensor(name, shape, self.seed).to(self.device, dtype)

    def dense(self, name, shape, dtype=BF16, std=None):
        std = linear_std(name, shape[-1]) if std is None else std
        return (torch.randn(shape, generator=self._gen(name), device=self.device) * std).to(dtype)

    def fp8(self, name, shape, chunk=64):
        g = self._gen(name)
        std = linear_std(name, shape[-1])
        if len(shape) == 2:
            return quantize_blocks(torch.randn(shape, generator=g, device=self.device) * std)
        q = torch.empty(shape, dtype=FP8, device=self.device)
        s = torch.empty(shape[0], shape[1] // 128, shape[2] // 128, dtype=F32, device=self.device)
        for e0 in range(0, shape[0], chunk):
            e1 = min(shape[0], e0 + chunk)
            q[e0:e1], s[e0:e1] = quantize_blocks(torch.randn((e1 - e0, *shape[1:]), generator=g, device=self.device) * std)
        return q, s

    def put_fp8(self, W, name, shape):
        W[name], W[name + "_scale_inv"] = self.fp8(name, shape)

    def layer(self, prefix: str, kind: str) -> dict:
        """The checkpoint tensors of one decoder layer (main `model.layers.i.` or MTP `mtp.layers.0.`)."""
        c, W = self.cfg, {}
        H = c.hidden_size
        for n in ("input_layernorm", "post_attention_layernorm"):
            W[f"{prefix}{n}.weight"] = self.small(f"{prefix}{n}.weight", (H,))
        if kind == LINEAR_ATTENTION:
            a = prefix + "linear_attn."
            self.put_fp8(W, a + "in_proj_qkvz.weight", (2 * c.linear_key_dim + 2 * c.linear_value_dim, H))
            W[a + "in_proj_ba.weight"] = self.dense(a + "in_proj_ba.weight", (2 * c.linear_num_value_heads, H))
            W[a + "conv1d.weight"] = self.small(a + "conv1d.weight", (c.linear_conv_dim, 1, c.linear_conv_kernel_dim))
            for n in ("dt_bias", "A_log"):
                W[a + n] = self.small(a + n, (c.linear_num_value_heads,))
            W[a + "norm.weight"] = self.small(a + "norm.weight", (c.linear_value_head_dim,))
            self.put_fp8(W, a + "out_proj.weight", (H, c.linear_value_dim))
        else:
            a = prefix + "self_attn."
            D = c.head_dim
            self.put_fp8(W, a + "q_proj.weight", (c.num_attention_heads * D * 2, H))
            self.put_fp8(W, a + "k_proj.weight", (c.num_key_value_heads * D, H))
            self.put_fp8(W, a + "v_proj.weight", (c.num_key_value_heads * D, H))
            self.put_fp8(W, a + "o_proj.weight", (H, c.num_attention_heads * D))
            for n in ("q_norm", "k_norm"):
                W[f"{a}{n}.weight"] = self.small(f"{a}{n}.weight", (D,))
        m = prefix + "mlp."
        E, I, Is = c.num_experts, c.moe_intermediate_size, c.shared_expert_intermediate_size
        W[m + "gate.weight"] = self.dense(m + "gate.weight", (E, H))
        self.put_fp8(W, m + "experts.gate_proj.weight", (E, I, H))
        self.put_fp8(W, m + "experts.up_proj.weight", (E, I, H))
        self.put_fp8(W, m + "experts.down_proj.weight", (E, H, I))
        for n, shape in (("gate_proj", (Is, H)), ("up_proj", (Is, H)), ("down_proj", (H, Is))):
            self.put_fp8(W, f"{m}shared_expert.{n}.weight", shape)
        W[m + "shared_expert_gate.weight"] = self.dense(m + "shared_expert_gate.weight", (1, H))
        return W

    def globals(self, with_mtp: bool) -> dict:
        c, W = self.cfg, {}
        H, V = c.hidden_size, c.vocab_size
        W["model.embed_tokens.weight"] = self.dense("model.embed_tokens.weight", (V, H), std=0.35)
        W["model.norm.weight"] = self.small("model.norm.weight", (H,))
        W["lm_head.weight"] = self.dense("lm_head.weight", (V, H))
        if with_mtp:
            for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
                W[f"mtp.{n}.weight"] = self.small(f"mtp.{n}.weight", (H,))
            W["mtp.fc.weight"] = self.dense("mtp.fc.weight", (H, 2 * H))
        return W


# ------------------------------------------------------------------------------------------------
# The runtime layout (what a loader makes of the checkpoint tensors)


@dataclass
class Dims:
    H: int
    V: int
    E: int
    topk: int
    I: int
    Is: int
    Hk: int
    Hv: int
    Dk: int
    Dv: int
    C: int
    Kc: int
    Hq: int
    Hkv: int
    D: int
    R: int
    eps: float
    norm_topk: bool

    @classmethod
    def of(cls, c: Qwen3NextConfig) -> "Dims":
        return cls(c.hidden_size, c.vocab_size, c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size,
                   c.shared_expert_intermediate_size, c.linear_num_key_heads, c.linear_num_value_heads,
                   c.linear_key_head_dim, c.linear_value_head_dim, c.linear_conv_dim, c.linear_conv_kernel_dim,
                   c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rotary_dim, c.rms_norm_eps,
                   c.norm_topk_prob)


def qkvz_row_order(d: Dims) -> torch.Tensor:
    """Rows of in_proj_qkvz, regrouped from per key head [q|k|v|z] to [q_all|k_all|v_all|z_all]."""
    r = d.Hv // d.Hk
    seg = [d.Dk, d.Dk, r * d.Dv, r * d.Dv]
    per = sum(seg)
    starts = [0, d.Dk, 2 * d.Dk, 2 * d.Dk + r * d.Dv]
    return torch.cat([torch.arange(h * per + starts[s], h * per + starts[s] + seg[s]) for s in range(4) for h in range(d.Hk)])


def ba_row_order(d: Dims) -> torch.Tensor:
    r = d.Hv // d.Hk
    return torch.cat([torch.arange(h * 2 * r + s * r, h * 2 * r + s * r + r) for s in range(2) for h in range(d.Hk)])


def permute_rows_fp8(q, s, order):
    """Rows of an FP8 weight reordered; `order` moves whole 128-row blocks, so their scales move along (exact)."""
    blocks = order.view(-1, 128)
    if not torch.equal(blocks - blocks[:, :1], torch.arange(128).expand_as(blocks)) or (blocks[:, 0] % 128).any():
        raise ValueError("row order does not move whole 128-row blocks")
    order = order.to(q.device)
    return u8(q)[order].view(FP8).contiguous(), s[(blocks[:, 0] // 128).to(s.device)].contiguous()


def interleave_gate_up(qg, sg, qu, su):
    """Routed experts' gate/up [E, I, H] -> the MoE plugin's fc1 [E, 2I, H] (rows gate_0, up_0, gate_1, ...) and
    scale1 [E, 2 I/128, H/128] (gate blocks above up blocks): the checkpoint's bytes and scales, unchanged."""
    E, I, H = qg.shape
    fc1 = torch.stack([u8(qg), u8(qu)], dim=2).view(E, 2 * I, H).view(FP8)
    return fc1, torch.cat([sg, su], dim=1).contiguous()


def pack_layer(W: dict, prefix: str, kind: str, d: Dims) -> SimpleNamespace:
    """One layer in the runtime layout; the checkpoint tensors are popped from W as they are consumed."""
    L = SimpleNamespace(kind=kind)
    take = W.pop
    L.in_norm, L.post_norm = take(prefix + "input_layernorm.weight"), take(prefix + "post_attention_layernorm.weight")
    if kind == LINEAR_ATTENTION:
        a = prefix + "linear_attn."
        L.w_qkvz, L.s_qkvz = permute_rows_fp8(take(a + "in_proj_qkvz.weight"), take(a + "in_proj_qkvz.weight_scale_inv"),
                                              qkvz_row_order(d))
        L.w_ba = take(a + "in_proj_ba.weight")[ba_row_order(d).to(L.w_qkvz.device)].contiguous()
        L.conv_w = take(a + "conv1d.weight").contiguous()
        L.dt_bias, L.A_log = take(a + "dt_bias"), take(a + "A_log")
        L.gnorm = take(a + "norm.weight")
        L.w_out, L.s_out = take(a + "out_proj.weight"), take(a + "out_proj.weight_scale_inv")
    else:
        a = prefix + "self_attn."
        parts = [(take(a + f"{n}_proj.weight"), take(a + f"{n}_proj.weight_scale_inv")) for n in "qkv"]
        L.w_qkv, L.s_qkv = torch.cat([u8(p[0]) for p in parts]).view(FP8), torch.cat([p[1] for p in parts])
        L.qn, L.kn = take(a + "q_norm.weight"), take(a + "k_norm.weight")
        L.w_o, L.s_o = take(a + "o_proj.weight"), take(a + "o_proj.weight_scale_inv")
    m = prefix + "mlp."
    L.w_router = take(m + "gate.weight")
    qg, sg = take(m + "experts.gate_proj.weight"), take(m + "experts.gate_proj.weight_scale_inv")
    qu, su = take(m + "experts.up_proj.weight"), take(m + "experts.up_proj.weight_scale_inv")
    L.fc1, L.s1 = interleave_gate_up(qg, sg, qu, su)
    del qg, qu
    L.fc2, L.s2 = take(m + "experts.down_proj.weight"), take(m + "experts.down_proj.weight_scale_inv")
    sh = m + "shared_expert."
    L.w_sh1 = torch.cat([u8(take(sh + "gate_proj.weight")), u8(take(sh + "up_proj.weight"))]).view(FP8)
    L.s_sh1 = torch.cat([take(sh + "gate_proj.weight_scale_inv"), take(sh + "up_proj.weight_scale_inv")])
    L.w_sh2, L.s_sh2 = take(sh + "down_proj.weight"), take(sh + "down_proj.weight_scale_inv")
    L.w_sg = take(m + "shared_expert_gate.weight").view(-1).contiguous()
    return L


def layer_bytes(L) -> dict:
    """Bytes of one layer's weights: dense part (read every step) and one routed expert."""
    dense = sum(t.numel() * t.element_size() for k, t in vars(L).items()
                if isinstance(t, torch.Tensor) and k not in ("fc1", "s1", "fc2", "s2"))
    expert = sum(L.__dict__[k][0].numel() * L.__dict__[k].element_size() for k in ("fc1", "s1", "fc2", "s2"))
    return {"dense": dense, "expert": expert}


# ------------------------------------------------------------------------------------------------
# States: every buffer allocated once per (batch, capacity); graphs read and update them in place


class State:
    def __init__(self, model: "FastModel", B: int, cap: int, mtp: bool = True):
        d, dev = model.d, model.device
        self.B, self.cap = B, cap
        act = model.embed.dtype
        self.lens = torch.zeros(B, dtype=torch.int32, device=dev)  # tokens in the main model's cache
        self.mtp_lens = torch.zeros(B, dtype=torch.int32, device=dev)
        self.conv, self.rec, self.kv = {}, {}, {}
        for i, L in enumerate(model.layers):
            if L.kind == LINEAR_ATTENTION:
                self.conv[i] = torch.zeros(B, d.C, d.Kc - 1, dtype=act, device=dev)
                self.rec[i] = torch.zeros(B, d.Hv, d.Dk, d.Dv, dtype=F32, device=dev)
            else:
                self.kv[i] = tuple(torch.zeros(B, cap, d.Hkv, d.D, dtype=act, device=dev) for _ in range(2))
        self.mtp_kv = tuple(torch.zeros(B, cap, d.Hkv, d.D, dtype=act, device=dev) for _ in range(2)) \
            if (mtp and model.mtp is not None) else None

    def randomize(self, gen=None):
        """Timing runs: states and caches hold random values (never zeros), as after a real prompt."""
        for t in [*self.conv.values(), *self.rec.values()]:
            t.normal_(0, 0.05, generator=gen)
        for kv in [*self.kv.values(), *([self.mtp_kv] if self.mtp_kv else [])]:
            for t in kv:
                t.normal_(0, 1.0, generator=gen)

    def small_tensors(self):
        return [self.lens, self.mtp_lens, *self.conv.values(), *self.rec.values()]

    def snapshot(self):
        return [t.clone() for t in self.small_tensors()]

    def restore(self, snap):
        for t, s in zip(self.small_tensors(), snap):
            t.copy_(s)

    def nbytes(self) -> int:
        kvs = [*self.kv.values(), *([self.mtp_kv] if self.mtp_kv else [])]
        return sum(t.numel() * t.element_size() for t in [*self.conv.values(), *self.rec.values(), *[x for kv in kvs for x in kv]])


# ------------------------------------------------------------------------------------------------
# Ops: the torch versions (the peer, the CPU check, and the fallback of each fused kernel) ...


def sdpa(q, k, v, **kw):
    try:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1], **kw)
    except (TypeError, RuntimeError):
        g = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), **kw)


def act_quant_1x128(x):
    """Dynamic FP8 activations, one scale per token per 128 columns (the checkpoint's `activation_scheme:
    dynamic`), scales laid out outer-dim-major as torch's block-scaled scaled_mm wants them."""
    M, K = x.shape
    xb = x.float().view(M, K // 128, 128)
    sc = xb.abs().amax(-1).clamp_min(1e-12) / 448.0
    return (xb / sc[..., None]).to(FP8).view(M, K), sc.t().contiguous().t()


class ScaledMM:
    """torch's block-scaled FP8 GEMM (cuBLAS, SM90): 1x128 activation blocks x the checkpoint's 128x128."""

    def __init__(self, pad_m: int = 1):
        from torch.nn.functional import ScalingType
        self.recipes = (ScalingType.BlockWise1x128, ScalingType.BlockWise128x128)
        self.pad_m = pad_m
        self._prep = {}

    def prepared(self, w, s):
        key = w.data_ptr()
        if key not in self._prep:
            nb, kb = s.shape
            padded = torch.zeros(nb, -(-kb // 4) * 4, dtype=F32, device=s.device)
            padded[:, :kb] = s
            self._prep[key] = (w.t(), padded.t())
        return self._prep[key]

    def __call__(self, x, w, s):
        wt, sb = self.prepared(w, s)
        M = x.shape[0]
        Mp = -(-M // self.pad_m) * self.pad_m
        if Mp != M:
            x = torch.cat([x, x.new_zeros(Mp - M, x.shape[1])])
        q, sa = act_quant_1x128(x)
        y = F.scaled_mm(q, wt, sa, self.recipes[0], sb, self.recipes[1], output_dtype=BF16)
        return y[:M]


def dequant_gemm(x, w, s):
    """What a user without a block-scaled FP8 GEMM does: dequantise to bf16 per call, then a bf16 GEMM."""
    return x @ dequantize_blocks(w, s).to(x.dtype).t()


class TorchOps:
    name = "torch"

    def __init__(self, d: Dims, gemm=None):
        self.d = d
        self.gemm_fn = gemm or dequant_gemm
        self.expert_counts = None  # a list while counting the experts each MoE call touches (eager only)

    # projections ----------------------------------------------------------------------------------
    def gemm(self, x, w, s, split=None, wb=None):
        """x @ W^T for an FP8 weight (W = w * block scales); `split` cuts the output columns in two; `wb`, a bf16
        weight read from the same input, appends x @ wb^T (kernels may run both in one launch)."""
        y = self.gemm_fn(x, w, s)
        out = (y,) if split is None else (y[:, :split].contiguous(), y[:, split:].contiguous())
        if wb is not None:
            out = (*out, F.linear(x, wb))
        return out[0] if len(out) == 1 else out

    # norms and residual -----------------------------------------------------------------------------
    def add_rmsnorm(self, x, w, d1=None, d2=None, hs=None, wsg=None):
        """x += d1 (+ sigmoid(hs . wsg) * d2) in place (the residual stream), then the zero-centred RMSNorm."""
        if d1 is not None:
            add = d1.float()
            if d2 is not None:
                add = add + torch.sigmoid(hs.float() @ wsg.float())[:, None] * d2.float()
            x.copy_((x.float() + add).to(x.dtype))
        return F.rms_norm(x.float(), (x.shape[-1],), 1.0 + w.float(), self.d.eps).to(x.dtype)

    # DeltaNet ----------------------------------------------------------------------------------------
    def conv(self, x, w, state):
        """x [B, C, T]; state [B, C, K-1] updated in place."""
        y, new = causal_conv1d_with_state(x, w, state)
        state.copy_(new)
        return y

    def gdn_prep(self, mixed, ba, A_log, dt_bias):
        """conv output [N, 2Kd+Vd] and [b|a] [N, 2Hv] -> L2-normalised q, k, v, decay g, beta (float32)."""
        d = self.d
        N = mixed.shape[0]
        kd = d.Hk * d.Dk
        xf = mixed.float()

        def l2(t):
            t = t.reshape(N, d.Hk, d.Dk)
            return (t * torch.rsqrt(t.pow(2).sum(-1, keepdim=True) + 1e-6)).reshape(N, kd)

        q, k, v = l2(xf[:, :kd]), l2(xf[:, kd:2 * kd]), xf[:, 2 * kd:].contiguous()
        b, a = ba[:, :d.Hv].float(), ba[:, d.Hv:].float()
        g = -A_log.float().exp() * F.softplus(a + dt_bias.float())
        return q, k, v, g, torch.sigmoid(b)

    def scan(self, q, k, v, g, beta, state, B, T):
        """Gated delta rule, float32; state [B, Hv, Dk, Dv] updated in place. Returns [N, Hv*Dv] float32."""
        d = self.d
        r = d.Hv // d.Hk
        qq = q.view(B, T, d.Hk, d.Dk).repeat_interleave(r, 2)
        kk = k.view(B, T, d.Hk, d.Dk).repeat_interleave(r, 2)
        vv = v.view(B, T, d.Hv, d.Dv)
        fn = recurrent_gated_delta_rule if T <= 4 else chunk_gated_delta_rule
        out, new = fn(qq, kk, vv, g.view(B, T, d.Hv), beta.view(B, T, d.Hv), initial_state=state, scale=d.Dk**-0.5)
        state.copy_(new)
        return out.reshape(B * T, d.Hv * d.Dv)

    def gated_norm(self, o, z, w):
        """The reference's gated RMSNorm (Qwen3NextRMSNormGated) over [N, Hv*Dv], rounding as it does."""
        d = self.d
        x = o.to(z.dtype).view(-1, d.Hv, d.Dv)
        xf = F.rms_norm(x.float(), (d.Dv,), None, d.eps)
        y = w * xf.to(z.dtype)
        return (y * F.silu(z.view(-1, d.Hv, d.Dv).float())).to(z.dtype).view(-1, d.Hv * d.Dv)

    # attention ---------------------------------------------------------------------------------------
    def attn_prep(self, qkv, qn, kn, cos, sin, pos, lens, kc, vc, B, T):
        """q/k RMSNorm, partial RoPE; k, v written to the caches [B, cap, Hkv, D] at positions `pos` [N].
        Returns q [N, Hq, D]."""
        d = self.d
        N = qkv.shape[0]
        q = qkv[:, :d.Hq * 2 * d.D].view(N, d.Hq, 2 * d.D)[..., :d.D]
        k = qkv[:, d.Hq * 2 * d.D:d.Hq * 2 * d.D + d.Hkv * d.D].view(N, d.Hkv, d.D)
        v = qkv[:, d.Hq * 2 * d.D + d.Hkv * d.D:].view(N, d.Hkv, d.D)

        def norm_rope(x, w):
            x = F.rms_norm(x.float(), (d.D,), 1.0 + w.float(), d.eps).to(qkv.dtype)
            c = torch.cat([cos, cos], -1)[:, None].to(x.dtype)
            s = torch.cat([sin, sin], -1)[:, None].to(x.dtype)
            xr, xp = x[..., :d.R], x[..., d.R:]
            rot = torch.cat([-xr[..., d.R // 2:], xr[..., :d.R // 2]], -1)
            return torch.cat([xr * c + rot * s, xp], -1)

        flat = (torch.arange(B, device=qkv.device).repeat_interleave(T) * kc.shape[1] + pos)
        kc.view(-1, d.Hkv, d.D).index_copy_(0, flat, norm_rope(k, kn))
        vc.view(-1, d.Hkv, d.D).index_copy_(0, flat, v)
        return norm_rope(q, qn)

    def attn_decode(self, q, kc, vc, lens, gate, B, T):
        """T new tokens per sequence after `lens` cached ones (their k/v already written): query t sees keys
        < lens + t + 1. SDPA over the whole cache with a key mask; the 8 query heads of a KV head fold into rows."""
        d = self.d
        G = d.Hq // d.Hkv
        qf = q.view(B, T, d.Hkv, G, d.D).permute(0, 2, 3, 1, 4).reshape(B, d.Hkv, G * T, d.D)
        t = torch.arange(T, device=q.device).repeat(G)
        visible = torch.arange(kc.shape[1], device=q.device)[None, None, :] < (lens[:, None, None] + t[None, :, None] + 1)
        o = F.scaled_dot_product_attention(qf, kc.transpose(1, 2), vc.transpose(1, 2), attn_mask=visible[:, None],
                                           scale=d.D**-0.5)
        o = o.view(B, d.Hkv, G, T, d.D).permute(0, 3, 1, 2, 4).reshape(B * T, d.Hq * d.D)
        return o * torch.sigmoid(gate)

    def attn_prefill(self, q, kc, vc, gate, B, T):
        """Prompt attention from an empty cache: causal SDPA (flash) over the keys just written."""
        d = self.d
        o = sdpa(q.view(B, T, d.Hq, d.D).transpose(1, 2), kc[:, :T].transpose(1, 2), vc[:, :T].transpose(1, 2),
                 is_causal=True, scale=d.D**-0.5)
        return o.transpose(1, 2).reshape(B * T, d.Hq * d.D) * torch.sigmoid(gate)

    # MoE ---------------------------------------------------------------------------------------------
    def count(self, logits):
        if self.expert_counts is not None:
            self.expert_counts.append(int(torch.topk(logits.float(), self.d.topk, -1).indices.unique().numel()))

    def moe(self, x, logits, L):
        """Routed experts. Decode: gather the chosen experts' FP8 weights per (token, slot), dequantise, bmm
        (graph-capturable). Many tokens: dequantise the layer's experts to bf16 and torch._grouped_mm."""
        self.count(logits)
        d = self.d
        w, idx = route_tokens(logits, d.topk, d.norm_topk)
        N = x.shape[0]
        if N * d.topk > 512:
            return self.moe_grouped(x, w, idx, L)
        e = idx.reshape(-1)
        fc1 = dequantize_fc1(u8(L.fc1)[e].view(FP8), L.s1[e]).to(x.dtype)  # [N*k, 2I, H]
        h = torch.bmm(fc1, x.repeat_interleave(d.topk, 0)[:, :, None])[..., 0]
        a = F.silu(h[:, 0::2]) * h[:, 1::2]
        fc2 = dequantize_blocks(u8(L.fc2)[e].view(FP8), L.s2[e]).to(x.dtype)  # [N*k, H, I]
        y = torch.bmm(fc2, a[:, :, None])[..., 0].view(N, d.topk, d.H)
        return (y * w.to(x.dtype)[..., None]).sum(1)

    def moe_grouped(self, x, w, idx, L):
        d = self.d
        N = x.shape[0]
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token = order // d.topk
        counts = torch.bincount(flat, minlength=d.E)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        xs = x[token]
        w1 = dequantize_fc1(L.fc1, L.s1).to(x.dtype)  # [E, 2I, H]
        try:
            h = torch._grouped_mm(xs, w1.transpose(1, 2), offs=offs)
        except Exception:  # noqa: BLE001 - no grouped GEMM here: one GEMM per expert
            h = torch.cat([xs[a:b] @ w1[e].t() for e, (a, b) in enumerate(zip([0, *offs[:-1].tolist()], offs.tolist()))])
        del w1
        a = F.silu(h[:, 0::2]) * h[:, 1::2]
        w2 = dequantize_blocks(L.fc2, L.s2).to(x.dtype)  # [E, H, I]
        try:
            y = torch._grouped_mm(a.contiguous(), w2.transpose(1, 2), offs=offs)
        except Exception:  # noqa: BLE001
            y = torch.cat([a[a0:b0] @ w2[e].t() for e, (a0, b0) in enumerate(zip([0, *offs[:-1].tolist()], offs.tolist()))])
        del w2
        out = torch.zeros(N, d.H, dtype=F32, device=x.device)
        out.index_add_(0, token, y.float() * w.reshape(-1)[order, None])
        return out.to(x.dtype)

    def silu_mul(self, h):
        i = h.shape[1] // 2
        return F.silu(h[:, :i]) * h[:, i:]


# ------------------------------------------------------------------------------------------------
# ... and the fast versions: the project's CUDA kernels (plugins/, C library) and fused Triton glue

if triton is not None:

    @triton.jit
    def _add_rmsnorm_kernel(x_ptr, d1_ptr, d2_ptr, hs_ptr, wsg_ptr, w_ptr, y_ptr, H, eps,
                            MODE: tl.constexpr, BH: tl.constexpr):
        # MODE 0: y = norm(x); 1: x += d1; 2: x += d1 + sigmoid(hs . wsg) * d2 (routed + gated shared expert)
        row = tl.program_id(0)
        o = tl.arange(0, BH)
        m = o < H
        x = tl.load(x_ptr + row * H + o, mask=m, other=0.0).to(tl.float32)
        if MODE >= 1:
            add = tl.load(d1_ptr + row * H + o, mask=m, other=0.0).to(tl.float32)
            if MODE == 2:
                hs = tl.load(hs_ptr + row * H + o, mask=m, other=0.0).to(tl.float32)
                wsg = tl.load(wsg_ptr + o, mask=m, other=0.0).to(tl.float32)
                gate = tl.sigmoid(tl.sum(hs * wsg, 0))
                add += gate * tl.load(d2_ptr + row * H + o, mask=m, other=0.0).to(tl.float32)
            xb = (x + add).to(tl.bfloat16)
            tl.store(x_ptr + row * H + o, xb, mask=m)
            x = xb.to(tl.float32)
        w = tl.load(w_ptr + o, mask=m, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, 0) / H + eps)
        tl.store(y_ptr + row * H + o, (x * r * (1.0 + w)).to(tl.bfloat16), mask=m)

    @triton.jit
    def _gdn_prep_kernel(c_ptr, ba_ptr, alog_ptr, dtb_ptr, q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, stride_c, stride_ba,
                         HK: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr):
        n = tl.program_id(0)
        hk = tl.arange(0, HK)
        dk = tl.arange(0, DK)
        tile = hk[:, None] * DK + dk[None, :]
        base = c_ptr + n * stride_c
        q = tl.load(base + tile).to(tl.float32)
        tl.store(q_ptr + n * HK * DK + tile, q * tl.rsqrt(tl.sum(q * q, 1) + 1e-6)[:, None])
        k = tl.load(base + HK * DK + tile).to(tl.float32)
        tl.store(k_ptr + n * HK * DK + tile, k * tl.rsqrt(tl.sum(k * k, 1) + 1e-6)[:, None])
        hv = tl.arange(0, HV)
        vt = hv[:, None] * DV + tl.arange(0, DV)[None, :]
        tl.store(v_ptr + n * HV * DV + vt, tl.load(base + 2 * HK * DK + vt).to(tl.float32))
        b = tl.load(ba_ptr + n * stride_ba + hv).to(tl.float32)
        a = tl.load(ba_ptr + n * stride_ba + HV + hv).to(tl.float32)
        x = a + tl.load(dtb_ptr + hv).to(tl.float32)
        e = tl.exp(-tl.abs(x))
        # softplus = max(x, 0) + log1p(exp(-|x|)); log1p by its series where 1 + e would round
        sp = tl.maximum(x, 0.0) + tl.where(e < 1e-4, e - 0.5 * e * e, tl.log(1.0 + e))
        tl.store(g_ptr + n * HV + hv, -tl.exp(tl.load(alog_ptr + hv).to(tl.float32)) * sp)
        tl.store(beta_ptr + n * HV + hv, tl.sigmoid(b))

    @triton.jit
    def _gated_norm_kernel(o_ptr, z_ptr, w_ptr, y_ptr, stride_z, eps, HV: tl.constexpr, DV: tl.constexpr):
        n = tl.program_id(0)
        t = tl.arange(0, HV)[:, None] * DV + tl.arange(0, DV)[None, :]
        o = tl.load(o_ptr + n * HV * DV + t).to(tl.bfloat16).to(tl.float32)
        r = tl.rsqrt(tl.sum(o * o, 1) / DV + eps)
        xn = (o * r[:, None]).to(tl.bfloat16).to(tl.float32)
        w = tl.load(w_ptr + tl.arange(0, DV)).to(tl.float32)
        y = (w[None, :] * xn).to(tl.bfloat16).to(tl.float32)
        z = tl.load(z_ptr + n * stride_z + t).to(tl.float32)
        tl.store(y_ptr + n * HV * DV + t, (y * z * tl.sigmoid(z)).to(tl.bfloat16))

    @triton.jit
    def _silu_mul_kernel(h_ptr, y_ptr, I: tl.constexpr):
        n = tl.program_id(0)
        o = tl.arange(0, I)
        g = tl.load(h_ptr + n * 2 * I + o).to(tl.float32)
        u = tl.load(h_ptr + n * 2 * I + I + o).to(tl.float32)
        tl.store(y_ptr + n * I + o, (g * tl.sigmoid(g)).to(tl.bfloat16).to(tl.float32) * u)

    @triton.jit(do_not_specialize=["T"])
    def _attn_prep_kernel(qkv_ptr, qn_ptr, kn_ptr, cos_ptr, sin_ptr, lens_ptr, q_ptr, kc_ptr, vc_ptr,
                          stride_qkv, T, stride_cb, stride_cl, eps,
                          HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, R: tl.constexpr):
        # q/k RMSNorm (zero-centred weight) + RoPE on the first R dims (pairs (j, j + R/2)); k, v -> caches
        n = tl.program_id(0)
        b = n // T
        pos = tl.load(lens_ptr + b) + n % T
        d = tl.arange(0, D)
        half = R // 2
        rot = d < R
        partner = tl.where(d < half, d + half, tl.where(rot, d - half, d))
        sign = tl.where(d < half, -1.0, 1.0)
        c = tl.load(cos_ptr + n * half + d % half, mask=rot, other=1.0)
        s = tl.load(sin_ptr + n * half + d % half, mask=rot, other=0.0)
        row = qkv_ptr + n * stride_qkv

        hq = tl.arange(0, HQ)[:, None]
        x = tl.load(row + hq * 2 * D + d[None, :]).to(tl.float32)
        xp = tl.load(row + hq * 2 * D + partner[None, :]).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, 1) / D + eps)[:, None]
        xn = (x * r * (1.0 + tl.load(qn_ptr + d).to(tl.float32))[None, :]).to(tl.bfloat16).to(tl.float32)
        xpn = (xp * r * (1.0 + tl.load(qn_ptr + partner).to(tl.float32))[None, :]).to(tl.bfloat16).to(tl.float32)
        y = tl.where(rot[None, :], xn * c[None, :] + sign[None, :] * xpn * s[None, :], xn)
        tl.store(q_ptr + n * HQ * D + hq * D + d[None, :], y.to(tl.bfloat16))

        hk = tl.arange(0, HKV)[:, None]
        kb = row + HQ * 2 * D
        x = tl.load(kb + hk * D + d[None, :]).to(tl.float32)
        xp = tl.load(kb + hk * D + partner[None, :]).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, 1) / D + eps)[:, None]
        xn = (x * r * (1.0 + tl.load(kn_ptr + d).to(tl.float32))[None, :]).to(tl.bfloat16).to(tl.float32)
        xpn = (xp * r * (1.0 + tl.load(kn_ptr + partner).to(tl.float32))[None, :]).to(tl.bfloat16).to(tl.float32)
        y = tl.where(rot[None, :], xn * c[None, :] + sign[None, :] * xpn * s[None, :], xn)
        dst = b * stride_cb + pos * stride_cl + hk * D + d[None, :]
        tl.store(kc_ptr + dst, y.to(tl.bfloat16))
        tl.store(vc_ptr + dst, tl.load(kb + HKV * D + hk * D + d[None, :]))

    @triton.jit(do_not_specialize=["T", "chunk", "nsplit"])
    def _attn_partial_kernel(q_ptr, kc_ptr, vc_ptr, lens_ptr, acc_ptr, ml_ptr, T, chunk, nsplit, scale,
                             stride_cb, stride_cl,
                             HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr,
                             F32_DOT: tl.constexpr):
        # Split-KV decode attention: program (sequence x KV head, split) folds the G query heads of the KV
        # head and the T new tokens into BR rows (row = g*T + t) and runs an online softmax over its key range.
        bh = tl.program_id(0)
        sp = tl.program_id(1)
        b = bh // HKV
        h = bh % HKV
        r = tl.arange(0, BR)
        d = tl.arange(0, D)
        g = r // T
        t = r % T
        rows = r < G * T
        q = tl.load(q_ptr + ((b * T + t) * (HKV * G) + h * G + g)[:, None] * D + d[None, :], mask=rows[:, None], other=0.0)
        before = tl.load(lens_ptr + b)
        limit = before + t + 1
        start = sp * chunk
        end = tl.minimum(start + chunk, before + T)
        m_i = tl.full([BR], float("-inf"), tl.float32)
        l_i = tl.zeros([BR], tl.float32)
        acc = tl.zeros([BR, D], tl.float32)
        kb = kc_ptr + b * stride_cb + h * D
        vb = vc_ptr + b * stride_cb + h * D
        if F32_DOT:
            q = q.to(tl.float32)
        for n0 in range(start, end, BN):
            offs = n0 + tl.arange(0, BN)
            ok = offs < end
            kt = tl.load(kb + offs[:, None] * stride_cl + d[None, :], mask=ok[:, None], other=0.0)
            vt = tl.load(vb + offs[:, None] * stride_cl + d[None, :], mask=ok[:, None], other=0.0)
            if F32_DOT:
                kt = kt.to(tl.float32)
                vt = vt.to(tl.float32)
            s = tl.dot(q, tl.trans(kt)) * scale
            s = tl.where((offs[None, :] < limit[:, None]) & ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            if F32_DOT:
                acc = acc * alpha[:, None] + tl.dot(p, vt)
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(tl.bfloat16), vt)
            m_i = m_new
        slot = bh * nsplit + sp
        tl.store(acc_ptr + (slot * BR + r)[:, None] * D + d[None, :], acc)
        tl.store(ml_ptr + (slot * 2) * BR + r, m_i)
        tl.store(ml_ptr + (slot * 2 + 1) * BR + r, l_i)

    @triton.jit(do_not_specialize=["T", "nsplit"])
    def _attn_reduce_kernel(acc_ptr, ml_ptr, qkv_ptr, out_ptr, T, nsplit, stride_qkv,
                            HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BR: tl.constexpr, DB: tl.constexpr,
                            SB: tl.constexpr):
        # Combine the splits' online-softmax partials, SB splits per load (program: sequence x KV head x DB of
        # the D columns); multiply by the output gate sigmoid(gate) on the way out.
        bh = tl.program_id(0)
        b = bh // HKV
        h = bh % HKV
        r = tl.arange(0, BR)
        d = tl.program_id(1) * DB + tl.arange(0, DB)
        sb = tl.arange(0, SB)
        M = tl.full([BR], float("-inf"), tl.float32)
        for s0 in range(0, nsplit, SB):
            sp = s0 + sb
            m = tl.load(ml_ptr + ((bh * nsplit + sp) * 2)[:, None] * BR + r[None, :], mask=(sp < nsplit)[:, None],
                        other=float("-inf"))
            M = tl.maximum(M, tl.max(m, 0))
        M = tl.where(M == float("-inf"), 0.0, M)
        Lsum = tl.zeros([BR], tl.float32)
        acc = tl.zeros([BR, DB], tl.float32)
        for s0 in range(0, nsplit, SB):
            sp = s0 + sb
            ok = sp < nsplit
            slot = bh * nsplit + sp
            w = tl.exp(tl.load(ml_ptr + (slot * 2)[:, None] * BR + r[None, :], mask=ok[:, None], other=float("-inf"))
                       - M[None, :])
            Lsum += tl.sum(w * tl.load(ml_ptr + (slot * 2 + 1)[:, None] * BR + r[None, :], mask=ok[:, None], other=0.0), 0)
            part = tl.load(acc_ptr + ((slot[:, None, None] * BR + r[None, :, None]) * D + d[None, None, :]),
                           mask=ok[:, None, None], other=0.0)
            acc += tl.sum(w[:, :, None] * part, 0)
        g = r // T
        t = r % T
        rows = r < G * T
        n = b * T + t
        head = h * G + g
        gate = tl.load(qkv_ptr + n[:, None] * stride_qkv + (head * 2 * D + D)[:, None] + d[None, :], mask=rows[:, None],
                       other=0.0).to(tl.float32)
        o = (acc / tl.where(Lsum > 0, Lsum, 1.0)[:, None]).to(tl.bfloat16).to(tl.float32)
        tl.store(out_ptr + n[:, None] * (HKV * G * D) + (head * D)[:, None] + d[None, :],
                 (o * tl.sigmoid(gate)).to(tl.bfloat16), mask=rows[:, None])


def _next_pow2(n):
    return 1 << max(0, (n - 1).bit_length())


class KernelOps(TorchOps):
    """The project's plugin kernels (C library, in place on the state buffers) + Triton GEMM and glue.
    `use` names the fused Triton kernels that passed their check; the others fall back to TorchOps."""

    name = "kernels"
    PLUGIN = ("conv", "scan", "moe")
    FUSED = ("add_rmsnorm", "gdn_prep", "gated_norm", "silu_mul", "attn_prep", "attn_decode")

    def __init__(self, d: Dims, gemm, use=PLUGIN + FUSED, lib=None, sm_count=132):
        super().__init__(d, gemm)
        self.use = set(use) - (set() if lib is not None else set(self.PLUGIN))
        self.lib = lib
        self.sm_count = sm_count
        self.moe_ws = {}

    def gemm(self, x, w, s, split=None, wb=None):
        return self.gemm_fn(x, w, s, split, wb)

    def _stream(self):
        return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)

    @staticmethod
    def _p(t):
        return ctypes.c_void_p(t.data_ptr())

    def _check(self, name, rc):
        if rc != 0:
            from qwen3next_trt.plugins.torch_ops import status_message
            raise RuntimeError(f"{name} returned {rc}: {status_message(rc)}")

    # plugin kernels ------------------------------------------------------------------------------
    def conv(self, x, w, state):
        if "conv" not in self.use:
            return super().conv(x, w, state)
        B, C, T = x.shape
        x = x.contiguous()
        y = torch.empty_like(x)
        # present_state may alias past_state (plugins/causal_conv/README.md): the state updates in place
        rc = self.lib.q3n_causal_conv_with_state(self._p(x), self._p(w), None, self._p(state), self._p(y), self._p(state),
                                                 B, C, T, w.shape[-1], 1, 2, self._stream())
        self._check("q3n_causal_conv_with_state", rc)
        return y

    def scan(self, q, k, v, g, beta, state, B, T):
        if "scan" not in self.use:
            return super().scan(q, k, v, g, beta, state, B, T)
        d = self.d
        out = torch.empty(B * T, d.Hv * d.Dv, dtype=F32, device=q.device)
        # float32 inputs, as the exporter feeds the LinearAttention node; impl 0 = what the TensorRT plugin
        # dispatches to (decode kernel for 1-4 tokens, split chunked scan above, with the plugin's workspace)
        ws_bytes = self.lib.q3n_linear_attention_workspace_size(B, T, d.Hk, d.Hv, d.Dk, d.Dv)
        ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=q.device)
        rc = self.lib.q3n_linear_attention_impl(self._p(q), self._p(k), self._p(v), self._p(state), self._p(g), self._p(beta),
                                                self._p(out), self._p(state), B, T, d.Hk, d.Hv, d.Dk, d.Dv,
                                                ctypes.c_float(d.Dk**-0.5), 0, self._p(ws), ws_bytes, 0, self._stream())
        self._check("q3n_linear_attention_impl", rc)
        return out

    def moe(self, x, logits, L):
        if "moe" not in self.use:
            return super().moe(x, logits, L)
        self.count(logits)
        d = self.d
        N = x.shape[0]
        if N not in self.moe_ws:  # first call of a size runs outside graph capture (the warm-up)
            size = int(self.lib.q3n_moe_workspace_size(N, d.E, d.topk, d.H, d.I))
            self.moe_ws[N] = torch.empty(max(size, 16), dtype=torch.uint8, device=x.device)
        ws = self.moe_ws[N]
        out = torch.empty_like(x)
        rc = self.lib.q3n_moe_fp8_impl(self._p(x), self._p(logits), self._p(L.fc1), self._p(L.s1), self._p(L.fc2),
                                       self._p(L.s2), self._p(out), N, d.H, d.I, d.E, d.topk, int(d.norm_topk), 2,
                                       self._p(ws), ws.numel(), 0, self._stream())
        self._check("q3n_moe_fp8_impl", rc)
        return out

    # fused Triton glue ---------------------------------------------------------------------------
    def add_rmsnorm(self, x, w, d1=None, d2=None, hs=None, wsg=None):
        if "add_rmsnorm" not in self.use:
            return super().add_rmsnorm(x, w, d1, d2, hs, wsg)
        N, H = x.shape
        y = torch.empty_like(x)
        mode = 0 if d1 is None else (1 if d2 is None else 2)
        _add_rmsnorm_kernel[(N,)](x, d1 if d1 is not None else x, d2 if d2 is not None else x, hs if hs is not None else x,
                                  wsg if wsg is not None else w, w, y, H, self.d.eps, MODE=mode, BH=_next_pow2(H))
        return y

    def gdn_prep(self, mixed, ba, A_log, dt_bias):
        if "gdn_prep" not in self.use:
            return super().gdn_prep(mixed, ba, A_log, dt_bias)
        d = self.d
        N = mixed.shape[0]
        dev = mixed.device
        q = torch.empty(N, d.Hk * d.Dk, dtype=F32, device=dev)
        k = torch.empty_like(q)
        v = torch.empty(N, d.Hv * d.Dv, dtype=F32, device=dev)
        g = torch.empty(N, d.Hv, dtype=F32, device=dev)
        beta = torch.empty_like(g)
        _gdn_prep_kernel[(N,)](mixed, ba, A_log, dt_bias, q, k, v, g, beta, mixed.stride(0), ba.stride(0),
                               HK=d.Hk, HV=d.Hv, DK=d.Dk, DV=d.Dv)
        return q, k, v, g, beta

    def gated_norm(self, o, z, w):
        if "gated_norm" not in self.use:
            return super().gated_norm(o, z, w)
        d = self.d
        y = torch.empty(o.shape[0], d.Hv * d.Dv, dtype=z.dtype, device=z.device)
        _gated_norm_kernel[(o.shape[0],)](o, z, w, y, z.stride(0), d.eps, HV=d.Hv, DV=d.Dv)
        return y

    def silu_mul(self, h):
        if "silu_mul" not in self.use:
            return super().silu_mul(h)
        i = h.shape[1] // 2
        y = torch.empty(h.shape[0], i, dtype=h.dtype, device=h.device)
        _silu_mul_kernel[(h.shape[0],)](h, y, I=i)
        return y

    def attn_prep(self, qkv, qn, kn, cos, sin, pos, lens, kc, vc, B, T):
        if "attn_prep" not in self.use:
            return super().attn_prep(qkv, qn, kn, cos, sin, pos, lens, kc, vc, B, T)
        d = self.d
        N = qkv.shape[0]
        q = torch.empty(N, d.Hq, d.D, dtype=qkv.dtype, device=qkv.device)
        _attn_prep_kernel[(N,)](qkv, qn, kn, cos, sin, lens, q, kc, vc, qkv.stride(0), T, kc.stride(0), kc.stride(1),
                                d.eps, HQ=d.Hq, HKV=d.Hkv, D=d.D, R=d.R)
        return q

    def attn_split(self, B, cap, T):
        """Splits of the key range: enough (sequence, KV head, split) programs to fill the GPU twice over."""
        d = self.d
        bn = 64
        blocks = -(-(cap) // bn)
        # >= 4 key blocks per split (the combine reads every split's partials), else enough programs for one wave
        nsplit = max(1, min(-(-blocks // 4), -(-self.sm_count // (B * d.Hkv))))
        chunk = -(-blocks // nsplit) * bn
        return -(-cap // chunk), chunk, bn

    def attn_decode(self, q, kc, vc, lens, gate, B, T):
        if "attn_decode" not in self.use:
            return super().attn_decode(q, kc, vc, lens, gate, B, T)
        d = self.d
        G = d.Hq // d.Hkv
        BR = max(16, _next_pow2(G * T))
        nsplit, chunk, bn = self.attn_split(B, kc.shape[1], T)
        acc = torch.empty(B * d.Hkv * nsplit * BR * d.D, dtype=F32, device=q.device)
        ml = torch.empty(B * d.Hkv * nsplit * 2 * BR, dtype=F32, device=q.device)
        _attn_partial_kernel[(B * d.Hkv, nsplit)](q, kc, vc, lens, acc, ml, T, chunk, nsplit, d.D**-0.5,
                                                  kc.stride(0), kc.stride(1), HKV=d.Hkv, G=G, D=d.D, BR=BR, BN=bn,
                                                  F32_DOT=INTERPRET, num_warps=4, num_stages=2)
        out = torch.empty(B * T, d.Hq * d.D, dtype=q.dtype, device=q.device)
        qkv = gate.qkv  # the gate columns are read straight from the fused qkv projection
        db = min(32, d.D)
        _attn_reduce_kernel[(B * d.Hkv, d.D // db)](acc, ml, qkv, out, T, nsplit, qkv.stride(0), HKV=d.Hkv, G=G, D=d.D, BR=BR,
                                                    DB=db, SB=8)
        return out


class Gate:
    """The attention output gate: columns of the fused qkv projection, viewed lazily (the fused kernel reads
    them in place; the torch path materialises them)."""

    def __init__(self, qkv, d: Dims):
        self.qkv, self.d = qkv, d

    def tensor(self):
        d = self.d
        return self.qkv[:, :d.Hq * 2 * d.D].view(-1, d.Hq, 2 * d.D)[..., d.D:].reshape(-1, d.Hq * d.D)


# ------------------------------------------------------------------------------------------------
# The model step


PROFILE_LABELS = False


def part(name):
    """A record_function label (torch.profiler) for the breakdown; nothing when not profiling."""
    return torch.profiler.record_function(name) if PROFILE_LABELS else contextlib.nullcontext()


class FastModel:
    def __init__(self, cfg: Qwen3NextConfig, device):
        self.cfg, self.d, self.device = cfg, Dims.of(cfg), torch.device(device)
        self.layers = []
        self.mtp = None
        inv_freq, scaling = rope_inverse_frequencies(cfg)
        if scaling != 1.0:
            raise ValueError("rope attention scaling != 1 is not wired into the fused kernels")
        self.inv_freq = inv_freq.to(self.device)

    def add_layer(self, W, prefix, kind):
        return pack_layer(W, prefix, kind, self.d)

    def set_globals(self, W):
        self.embed = W.pop("model.embed_tokens.weight")
        self.final_norm = W.pop("model.norm.weight")
        self.lm_head = W.pop("lm_head.weight")
        if "mtp.fc.weight" in W:
            self.mtp = SimpleNamespace(fc=W.pop("mtp.fc.weight"), norm_e=W.pop("mtp.pre_fc_norm_embedding.weight"),
                                       norm_h=W.pop("mtp.pre_fc_norm_hidden.weight"), norm=W.pop("mtp.norm.weight"),
                                       layer=None)

    def weight_bytes(self) -> int:
        seen, total = set(), 0
        objs = [*self.layers, self] + ([self.mtp, self.mtp.layer] if self.mtp else [])
        for o in objs:
            for t in vars(o).values():
                if isinstance(t, torch.Tensor) and t.is_cuda and t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
        return total

    # one layer --------------------------------------------------------------------------------------
    def deltanet(self, h, L, conv_state, rec_state, ops, B, T):
        d = self.d
        kd2v = 2 * d.Hk * d.Dk + d.Hv * d.Dv
        with part("projections"):
            if "projections" in SKIP:
                mixed, z = standin("qkv", (B * T, kd2v), BF16, h.device), standin("z", (B * T, d.Hv * d.Dv), BF16, h.device)
                ba = standin("ba", (B * T, 2 * d.Hv), BF16, h.device)
            else:
                mixed, z, ba = ops.gemm(h, L.w_qkvz, L.s_qkvz, split=kd2v, wb=L.w_ba)
        with part("deltanet_mixer"):
            if "deltanet_mixer" in SKIP:
                o = standin("gnorm", (B * T, d.Hv * d.Dv), BF16, h.device)
            else:
                x = mixed.view(B, T, kd2v).transpose(1, 2) if T > 1 else mixed.view(B, kd2v, 1)
                y = ops.conv(x, L.conv_w, conv_state)
                y = y.transpose(1, 2).reshape(B * T, kd2v) if T > 1 else y.view(B, kd2v)
                q, k, v, g, beta = ops.gdn_prep(y, ba, L.A_log, L.dt_bias)
                out = ops.scan(q, k, v, g, beta, rec_state, B, T)
                o = ops.gated_norm(out, z, L.gnorm)
        with part("projections"):
            if "projections" in SKIP:
                return standin("out", (B * T, d.H), BF16, h.device)
            return ops.gemm(o, L.w_out, L.s_out)

    def attention(self, h, L, kc, vc, lens, pos, cos, sin, ops, B, T):
        d = self.d
        with part("projections"):
            qkv = standin("qkvA", (B * T, L.w_qkv.shape[0]), BF16, h.device) if "projections" in SKIP \
                else ops.gemm(h, L.w_qkv, L.s_qkv)
        with part("attention_mixer"):
            if "attention_mixer" in SKIP:
                o = standin("attn", (B * T, d.Hq * d.D), BF16, h.device)
            else:
                q = ops.attn_prep(qkv, L.qn, L.kn, cos, sin, pos, lens, kc, vc, B, T)
                gate = Gate(qkv, d)
                if T > 4:
                    o = ops.attn_prefill(q, kc, vc, gate.tensor(), B, T)
                elif isinstance(ops, KernelOps) and "attn_decode" in ops.use:
                    o = ops.attn_decode(q, kc, vc, lens, gate, B, T)
                else:
                    o = TorchOps.attn_decode(ops, q, kc, vc, lens, gate.tensor(), B, T)
        with part("projections"):
            if "projections" in SKIP:
                return standin("oproj", (B * T, d.H), BF16, h.device)
            return ops.gemm(o, L.w_o, L.s_o)

    def moe(self, h2, L, ops):
        d = self.d
        with part("moe"):
            if "moe" in SKIP:
                N = h2.shape[0]
                return standin("routed", (N, d.H), BF16, h2.device), standin("shared", (N, d.H), BF16, h2.device)
            sh, logits = ops.gemm(h2, L.w_sh1, L.s_sh1, wb=L.w_router)  # shared expert gate/up + router
            routed = ops.moe(h2, logits, L)
            shared = ops.gemm(ops.silu_mul(sh), L.w_sh2, L.s_sh2)
            return routed, shared

    def layer(self, x, L, pending, st: State, idx, ops, B, T, pos, cos, sin, lens, kv=None):
        with part("norms"):
            h = x if "norms" in SKIP else ops.add_rmsnorm(x, L.in_norm, *pending)
        if L.kind == LINEAR_ATTENTION:
            delta = self.deltanet(h, L, st.conv[idx], st.rec[idx], ops, B, T)
        else:
            kc, vc = kv if kv is not None else st.kv[idx]
            delta = self.attention(h, L, kc, vc, lens, pos, cos, sin, ops, B, T)
        with part("norms"):
            h2 = delta if "norms" in SKIP else ops.add_rmsnorm(x, L.post_norm, delta)
        routed, shared = self.moe(h2, L, ops)
        return (routed, shared, h2, L.w_sg)

    def rope(self, lens, T):
        pos = (lens.to(torch.int64)[:, None] + torch.arange(T, device=lens.device)[None, :]).reshape(-1)
        ang = pos.float()[:, None] * self.inv_freq[None, :]
        return pos, ang.cos().contiguous(), ang.sin().contiguous()

    def head(self, x, norm_w, pending, ops, B, T, last_only):
        with part("norms"):
            y = ops.add_rmsnorm(x, norm_w, *pending)
        with part("lm_head"):
            sel = y.view(B, T, -1)[:, -1] if last_only else y
            if "lm_head" in SKIP:
                logits = standin("logits", (sel.shape[0], self.d.V), BF16, y.device)
            else:
                logits = F.linear(sel, self.lm_head)
        return logits, y

    # whole steps ------------------------------------------------------------------------------------
    def forward(self, ids, st: State, ops, last_only=False, depth=None, advance=True):
        """Main model over ids [B, T] after st.lens cached tokens: logits [B*T or B, V], normed hidden [B*T, H].
        T <= 4: decode / verify (graph-capturable); T > 4: prompt from an empty cache."""
        B, T = ids.shape
        with part("embed"):
            x = F.embedding(ids.reshape(-1), self.embed)
            pos, cos, sin = self.rope(st.lens, T)
        pending = (None,)
        for i, L in enumerate(self.layers[:depth]):
            pending = self.layer(x, L, pending, st, i, ops, B, T, pos, cos, sin, st.lens)
        logits, y = self.head(x, self.final_norm, pending, ops, B, T, last_only)
        if advance:
            st.lens.add_(T)
        return logits, y

    def mtp_forward(self, ids, hidden, st: State, ops, advance=True):
        """MTP head: next tokens ids [B, T] with the main model's normed hidden [B*T, H] at positions
        st.mtp_lens + t -> draft logits [B*T, V], MTP hidden."""
        B, T = ids.shape
        m = self.mtp
        with part("embed"):
            e = F.embedding(ids.reshape(-1), self.embed)
            pos, cos, sin = self.rope(st.mtp_lens, T)
        with part("norms"):
            a = ops.add_rmsnorm(e, m.norm_e)
            b = ops.add_rmsnorm(hidden.contiguous(), m.norm_h)
        with part("projections"):
            x = F.linear(torch.cat([a, b], -1), m.fc)
        pending = self.layer(x, m.layer, (None,), st, -1, ops, B, T, pos, cos, sin, st.mtp_lens, kv=st.mtp_kv)
        logits, y = self.head(x, m.norm, pending, ops, B, T, False)
        if advance:
            st.mtp_lens.add_(T)
        return logits, y


def greedy_step(model, st, ids_buf, ops, depth=None):
    """A decode step as a generation loop runs it: logits, hidden, and the argmax fed back into ids_buf."""
    logits, y = model.forward(ids_buf, st, ops, depth=depth)
    if ids_buf.shape[1] == 1:
        ids_buf.copy_(logits.argmax(-1).view(-1, 1))
    return logits, y


# ------------------------------------------------------------------------------------------------
# Building models


def build_fast(cfg, device, seed, n_layers=None, with_mtp=True, keep_reference=None, log=print):
    """The fast model on `device`; with keep_reference = a reference model (same config), its parameters
    are filled with the same weights dequantised (float32) as each layer is made."""
    maker = WeightMaker(cfg, seed, device)
    model = FastModel(cfg, device)
    n = cfg.num_hidden_layers if n_layers is None else n_layers
    t0 = time.time()
    for i in range(n):
        prefix = f"model.layers.{i}."
        W = maker.layer(prefix, cfg.layer_types[i])
        if keep_reference is not None:
            fill_reference(keep_reference.model.layers[i], W, prefix)
        model.layers.append(model.add_layer(W, prefix, cfg.layer_types[i]))
        if (i + 1) % 8 == 0 or i + 1 == n:
            log(f"  layers 0..{i} made ({time.time() - t0:.1f} s, {torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0:.1f} GiB)")
    G = maker.globals(with_mtp)
    if keep_reference is not None:
        ref = keep_reference
        fill_params(ref.model.embed_tokens, G, "model.embed_tokens.")
        fill_params(ref.model.norm, G, "model.norm.")
        fill_params(ref.lm_head, G, "lm_head.")
        if with_mtp:
            for n_ in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm", "fc"):
                fill_params(getattr(ref.mtp, n_), G, f"mtp.{n_}.")
    model.set_globals(G)
    if with_mtp:
        prefix = "mtp.layers.0."
        W = maker.layer(prefix, FULL_ATTENTION)
        if keep_reference is not None:
            fill_reference(keep_reference.mtp.layers[0], W, prefix)
        model.mtp.layer = model.add_layer(W, prefix, FULL_ATTENTION)
    return model


def official_value(W, name):
    """A reference parameter's value from the checkpoint tensors (dequantised where FP8), float32."""
    if name in W:
        t = W[name]
        return dequantize_blocks(t, W[name + "_scale_inv"]) if t.dtype == FP8 else t.float()
    if ".experts." in name:  # model.layers.i.mlp.experts.{e}.gate_proj.weight -> stacked [E, ...][e]
        head, rest = name.split(".experts.")
        e, proj = rest.split(".", 1)
        stacked = f"{head}.experts.{proj}"
        return dequantize_blocks(W[stacked][int(e)], W[stacked + "_scale_inv"][int(e)])
    raise KeyError(name)


def fill_reference(module, W, prefix):
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(official_value(W, prefix + name).reshape(p.shape))


def fill_params(module, G, prefix):
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(G[prefix + name].float().reshape(p.shape))


def reference_copy(ref, dtype):
    """The reference model again with its parameters in `dtype` (made empty, then copied: no float32 double)."""
    rc = ref.config
    with torch.device("meta"):
        out = Qwen3NextForCausalLM(rc)
    out = out.to_empty(device=ref.lm_head.weight.device).to(dtype)
    out.model.rotary_emb = Qwen3NextRotaryEmbedding(rc).to(ref.lm_head.weight.device)
    with torch.no_grad():
        for (n1, p1), (n2, p2) in zip(out.named_parameters(), ref.named_parameters()):
            assert n1 == n2
            p1.copy_(p2)
    return out.eval()


def reference_model(cfg, n_layers, device):
    rc = dataclasses.replace(cfg, num_hidden_layers=n_layers, layer_types=cfg.layer_types[:n_layers])
    with torch.device("meta"):
        ref = Qwen3NextForCausalLM(rc)
    ref = ref.to_empty(device=device).float()
    ref.model.rotary_emb = Qwen3NextRotaryEmbedding(rc).to(device)
    return ref.eval()


def with_activation_dtype(model, dtype):
    """The fast model with every non-FP8 tensor in `dtype` (float32: the torch step must then match the float32
    reference to rounding, which tests the plumbing: row regrouping, RoPE, caches, MTP, verify)."""
    objs = [*model.layers, model] + ([model.mtp, model.mtp.layer] if model.mtp else [])
    for o in objs:
        for k, v in list(vars(o).items()):
            if isinstance(v, torch.Tensor) and v.dtype == BF16:
                setattr(o, k, v.to(dtype))
    return model


# ------------------------------------------------------------------------------------------------
# Checks: the step against the reference model


def compare(fast, ref):
    """Logits [P, V] each: per-position cosine (min, mean), top-1 agreement, max |diff| / max |ref|."""
    a, b = fast.float().reshape(-1, fast.shape[-1]), ref.float().reshape(-1, ref.shape[-1])
    cos = F.cosine_similarity(a, b, dim=-1)
    return {"positions": a.shape[0], "cos_min": float(cos.min()), "cos_mean": float(cos.mean()),
            "top1": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
            "max_abs_rel": float((a - b).abs().max() / b.abs().max())}


def capture(fn, warmup=2):
    """A CUDA graph of fn() after `warmup` eager runs on the capture stream; returns (graph, fn's outputs)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    torch.cuda.synchronize()
    return g, out


@torch.no_grad()
def baseline_check(ref_b, ref, B=2, P=128, steps=4, seed=1, log=print):
    """The same comparisons as numerics_check between two reference models (e.g. bf16 vs float32): how far
    rounding alone moves this random model's logits, the yardstick for the fast path's numbers."""
    dev = ref.lm_head.weight.device
    V = ref.config.vocab_size
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, V, (B, P), generator=g).to(dev)
    ca, cb = ref.new_cache(B), ref_b.new_cache(B)
    la, ha = ref(ids, ca, return_hidden=True)
    lb, hb = ref_b(ids, cb, return_hidden=True)
    res = {"prefill": compare(lb, la)}
    nxt = lb[:, -1].argmax(-1)
    mids = torch.cat([ids[:, 1:], nxt[:, None]], 1)
    pos = torch.arange(P, device=dev).expand(B, P)
    if ref.mtp is not None:
        res["mtp_prefill"] = compare(ref_b.mtp_forward(mids, hb, pos, cb)[0], ref.mtp_forward(mids, ha, pos, ca)[0])
    tok = nxt.view(B, 1)
    dec, mdec = [], []
    for _ in range(steps):
        la, ha = ref(tok, ca, return_hidden=True)
        lb, hb = ref_b(tok, cb, return_hidden=True)
        dec.append((lb[:, -1], la[:, -1]))
        tok = lb[:, -1].argmax(-1).view(B, 1)
        if ref.mtp is not None:
            p1 = (ca.seq_len - 1) * torch.ones(B, 1, dtype=torch.long, device=dev)
            mdec.append((ref_b.mtp_forward(tok, hb, p1, cb)[0][:, -1], ref.mtp_forward(tok, ha, p1, ca)[0][:, -1]))
    res["decode"] = compare(torch.stack([x for x, _ in dec]), torch.stack([y for _, y in dec]))
    if mdec:
        res["mtp_decode"] = compare(torch.stack([x for x, _ in mdec]), torch.stack([y for _, y in mdec]))
    ids3 = torch.randint(0, V, (B, 3), generator=g).to(dev)
    res["verify3"] = compare(ref_b(ids3, cb), ref(ids3, ca))
    for k, v in res.items():
        log(f"  {k} {v}")
    return res


@torch.no_grad()
def numerics_check(model, ref, ops, B=2, P=128, steps=4, seed=1, graphs=True, log=print):
    """Prefill (all positions), `steps` decode steps (CUDA graphs when `graphs`), MTP over the prompt and after
    each decode step, one 3-token verify step: fast path vs reference, same tokens fed to both."""
    dev = model.device
    d = model.d
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, d.V, (B, P), generator=g).to(dev)
    st = State(model, B, P + steps + 8)
    res = {}
    cache = ref.new_cache(B)
    ref_logits, ref_h = ref(ids, cache, return_hidden=True)
    logits, hid = model.forward(ids, st, ops)
    res["prefill"] = compare(logits.view(B, P, -1), ref_logits)
    nxt = logits.view(B, P, -1)[:, -1].argmax(-1)
    mtp_ids = torch.cat([ids[:, 1:], nxt[:, None]], 1)
    if model.mtp is not None:
        rl, _ = ref.mtp_forward(mtp_ids, ref_h, torch.arange(P, device=dev).expand(B, P), cache)
        ml, _ = model.mtp_forward(mtp_ids, hid, st, ops)
        res["mtp_prefill"] = compare(ml.view(B, P, -1), rl)
    log(f"  prefill {res['prefill']}" + (f"\n  mtp prefill {res['mtp_prefill']}" if model.mtp is not None else ""))

    ids_buf = nxt.view(B, 1).clone()
    ids3 = torch.randint(0, d.V, (B, 3), generator=g).to(dev)
    if graphs:
        snap = st.snapshot()
        g_main, (lg, hd) = capture(lambda: greedy_step(model, st, ids_buf, ops))
        if model.mtp is not None:
            g_mtp, (mlg, _) = capture(lambda: model.mtp_forward(ids_buf, hd, st, ops))
        g_ver, (vlg, _) = capture(lambda: model.forward(ids3, st, ops))
        st.restore(snap)
        ids_buf.copy_(nxt.view(B, 1))
        run_main, run_ver = g_main.replay, g_ver.replay
        run_mtp = g_mtp.replay if model.mtp is not None else None
    else:
        box = {}

        def run_main():
            box["m"] = greedy_step(model, st, ids_buf, ops)

        def run_mtp():
            box["t"] = model.mtp_forward(ids_buf, box["m"][1], st, ops)

        def run_ver():
            box["v"] = model.forward(ids3, st, ops)

    dec, mtp_dec = [], []
    for _ in range(steps):
        tok = ids_buf.clone()
        run_main()
        if not graphs:
            lg, hd = box["m"]
        rl, rh = ref(tok, cache, return_hidden=True)
        dec.append((lg.float().clone(), rl[:, -1].float()))
        if model.mtp is not None:
            run_mtp()
            if not graphs:
                mlg = box["t"][0]
            pos = (cache.seq_len - 1) * torch.ones(B, 1, dtype=torch.long, device=dev)
            rml, _ = ref.mtp_forward(ids_buf.clone(), rh, pos, cache)
            mtp_dec.append((mlg.float().clone(), rml[:, -1].float()))
    res["decode"] = compare(torch.stack([a for a, _ in dec]), torch.stack([b for _, b in dec]))
    if mtp_dec:
        res["mtp_decode"] = compare(torch.stack([a for a, _ in mtp_dec]), torch.stack([b for _, b in mtp_dec]))
    run_ver()
    if not graphs:
        vlg = box["v"][0]
    rv = ref(ids3, cache)
    res["verify3"] = compare(vlg.view(B, 3, -1), rv)
    log(f"  decode {res['decode']}\n  verify(3) {res['verify3']}" + (f"\n  mtp decode {res['mtp_decode']}" if mtp_dec else ""))
    return res


# ------------------------------------------------------------------------------------------------
# Fused kernels vs their torch versions (random inputs at the model's sizes)


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / max(b.norm(), 1e-30))


@torch.no_grad()
def check_fused(fast: KernelOps, ref: TorchOps, d: Dims, device, tol=2e-2, log=print, progress=None, layer=None) -> dict:
    """Each fused Triton kernel (and, given a layer, each plugin op) against the torch op it replaces; one that
    errs or misses `tol` (bf16 outputs: ~4e-3 expected) is dropped from `fast.use` and the step uses the torch
    op instead. `progress(res)` is called before and after each check, so that a check which kills the
    process (an illegal address poisons the CUDA context) is left marked 'running'."""
    g = torch.Generator(device="cpu").manual_seed(7)
    rnd = lambda *s, dt=BF16, sc=1.0: (torch.randn(*s, generator=g) * sc).to(device, dt)  # noqa: E731
    N, B, T, cap = 6, 2, 3, 300
    res = {}

    def run(name, fn):
        res[name] = {"ok": False, "status": "running"}
        if progress:
            progress(res)
        try:
            err = fn()
            if device != "cpu" and torch.cuda.is_available():
                torch.cuda.synchronize()
            res[name] = {"rel_err": err, "ok": err <= tol}
        except Exception as e:  # noqa: BLE001
            res[name] = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        if not res[name]["ok"]:
            fast.use.discard(name)
        if progress:
            progress(res)
        log(f"  {name}: {res[name]}")

    if layer is not None and fast.lib is not None:
        def conv():
            errs = []
            for t in (1, 7):
                x = rnd(B, d.C, t)
                s1 = rnd(B, d.C, d.Kc - 1)
                s2 = s1.clone()
                errs += [rel(fast.conv(x, layer.conv_w, s1), ref.conv(x, layer.conv_w, s2)), rel(s1, s2)]
            return max(errs)

        def scan():
            errs = []
            for t in (1, 3, 70):
                n = B * t
                q, k = [torch.nn.functional.normalize(rnd(n, d.Hk, d.Dk, dt=F32), dim=-1).view(n, -1) for _ in range(2)]
                v = rnd(n, d.Hv * d.Dv, dt=F32)
                gg = -torch.rand(n, d.Hv, generator=g).to(device) * 0.5
                beta = torch.rand(n, d.Hv, generator=g).to(device)
                s1 = rnd(B, d.Hv, d.Dk, d.Dv, dt=F32, sc=0.1)
                s2 = s1.clone()
                errs += [rel(fast.scan(q, k, v, gg, beta, s1, B, t), ref.scan(q, k, v, gg, beta, s2, B, t)), rel(s1, s2)]
            return max(errs)

        def moe():
            errs = []
            for n in (3, 260):
                x, lg = rnd(n, d.H), rnd(n, d.E)
                errs.append(rel(fast.moe(x, lg, layer), TorchOps.moe(ref, x, lg, layer)))
            return max(errs)

        for name, fn in (("conv", conv), ("scan", scan), ("moe", moe)):
            run(name, fn)

    def add_rmsnorm():
        errs = []
        for mode in range(3):
            x = rnd(N, d.H)
            args = [rnd(N, d.H)] if mode else []
            if mode == 2:
                args += [rnd(N, d.H), rnd(N, d.H), rnd(d.H, sc=0.05)]
            w = rnd(d.H, sc=0.1)
            x2 = x.clone()
            y1, y2 = fast.add_rmsnorm(x, w, *args), ref.add_rmsnorm(x2, w, *args)
            errs += [rel(y1, y2), rel(x, x2)]
        return max(errs)

    def gdn_prep():
        mixed, ba = rnd(N, 2 * d.Hk * d.Dk + d.Hv * d.Dv), rnd(N, 2 * d.Hv, sc=3.0)
        A, dt = rnd(d.Hv, sc=1.0), rnd(d.Hv)
        return max(rel(a, b) for a, b in zip(fast.gdn_prep(mixed, ba, A, dt), ref.gdn_prep(mixed, ba, A, dt)))

    def gated_norm():
        o, z, w = rnd(N, d.Hv * d.Dv, dt=F32), rnd(N, d.Hv * d.Dv), rnd(d.Dv, sc=0.1) + 1
        return rel(fast.gated_norm(o, z, w), ref.gated_norm(o, z, w))

    def silu_mul():
        h = rnd(N, 2 * d.Is)
        return rel(fast.silu_mul(h), ref.silu_mul(h))

    def attn():
        qkv = rnd(B * T, (2 * d.Hq + 2 * d.Hkv) * d.D)
        qn, kn = rnd(d.D, sc=0.1), rnd(d.D, sc=0.1)
        lens = torch.tensor([37, cap - T - 1], dtype=torch.int32, device=device)
        pos = (lens.long()[:, None] + torch.arange(T, device=device)).reshape(-1)
        ang = pos.float()[:, None] * torch.rand(d.R // 2, generator=g).to(device)
        cos, sin = ang.cos().contiguous(), ang.sin().contiguous()
        caches = [rnd(B, cap, d.Hkv, d.D) for _ in range(2)]
        c1, c2 = [c.clone() for c in caches], [c.clone() for c in caches]
        q1 = fast.attn_prep(qkv, qn, kn, cos, sin, pos, lens, *c1, B, T)
        q2 = ref.attn_prep(qkv, qn, kn, cos, sin, pos, lens, *c2, B, T)
        e_prep = max(rel(q1, q2), rel(c1[0], c2[0]), rel(c1[1], c2[1]))
        res["attn_prep"] = {"rel_err": e_prep, "ok": e_prep <= tol}
        if e_prep > tol:
            fast.use.discard("attn_prep")
        o1 = fast.attn_decode(q2, *c2, lens, Gate(qkv, d), B, T)
        o2 = ref.attn_decode(q2, *c2, lens, Gate(qkv, d).tensor(), B, T)
        return max(e_prep, rel(o1, o2))

    for name, fn in (("add_rmsnorm", add_rmsnorm), ("gdn_prep", gdn_prep), ("gated_norm", gated_norm),
                     ("silu_mul", silu_mul)):
        run(name, fn)
    run("attn_decode", attn)
    if not res["attn_decode"]["ok"] and "rel_err" not in res.get("attn_prep", {}):
        fast.use.discard("attn_prep")
        res["attn_prep"] = {"ok": False, "error": "not reached (attn check failed before it)"}
    return res


# ------------------------------------------------------------------------------------------------
# FP8 GEMM: which implementation, which tiles


def mkey(M: int) -> int:
    """GEMM choice class of M: 1, 2, 4, 8 (the GEMV's sizes), then plugins/fp8_gemm.py's CONFIGS classes."""
    return 1 << max(0, (M - 1).bit_length()) if M <= fp8mod.GEMV_MAX_M else fp8mod.m_class(M)


class GemmDispatch:
    """Per M class: our Triton GEMV (M <= 8; runs a bf16 side weight in the same launch), our Triton GEMM, or
    torch's block-scaled scaled_mm."""

    def __init__(self, choice: dict, scaled: ScaledMM | None):
        self.choice, self.scaled = choice, scaled

    def __call__(self, x, w, s, split=None, wb=None):
        how = self.choice.get(mkey(x.shape[0]), "gemv" if x.shape[0] <= fp8mod.GEMV_MAX_M else "triton")
        if how == "gemv":
            return fp8mod.fp8_gemv(x, w, s, split=split, wb=wb)
        if how == "scaled_mm" and self.scaled is not None:
            y = self.scaled(x, w, s)
            out = (y,) if split is None else (y[:, :split].contiguous(), y[:, split:].contiguous())
        else:
            out = fp8mod.fp8_gemm(x, w, s, split=split)
            out = out if isinstance(out, tuple) else (out,)
        if wb is not None:
            out = (*out, F.linear(x, wb))
        return out[0] if len(out) == 1 else out

    def describe(self):
        return {str(c) if c < 1 << 40 else "big": v for c, v in sorted(self.choice.items())}


def choose_gemm(device, deadline, log=print):
    """Times the Triton GEMV's and GEMM's tile candidates and torch's block-scaled scaled_mm (if it runs) on the
    step's projection shapes at decode and prefill M: graph replays over rotated weights (no L2 reuse), each
    candidate first checked against the dequantised product. Returns (dispatch, report, scaled_mm or None)."""
    from kernels import timed_calls

    shapes = {"in_proj_qkvz": (12288, 2048), "out_proj": (2048, 4096), "attn_qkv": (9216, 2048), "shared_fc1": (1024, 2048),
              "shared_fc2": (2048, 512)}
    g = torch.Generator(device=device).manual_seed(3)
    weights = {}
    for name, (N, K) in shapes.items():
        copies = max(2, min(16, (256 << 20) // (N * K)))
        weights[name] = [quantize_blocks(torch.randn(N, K, generator=g, device=device) * K**-0.5) for _ in range(copies)]
    xs = {K: torch.randn(4096, K, generator=g, device=device).to(BF16) for K in (512, 2048, 4096)}
    exact = {M: xs[2048][:M].float() @ dequantize_blocks(*weights["in_proj_qkvz"][0]).t() for M in (1, 2, 3, 4, 8, 16, 32, 64, 256)}
    report = {"tiles": {}, "gemv_tiles": {}, "times_us": {}, "scaled_mm": {}}

    def total_us(fn, M, names):
        t = 0.0
        for name in names:
            x = xs[shapes[name][1]][:M]
            t += timed_calls([lambda w=w, s=s: fn(x, w, s) for w, s in weights[name]], reps=10)[0] * 1e3
        return t

    def err(fn, M):
        w, s = weights["in_proj_qkvz"][0]
        return rel(fn(xs[2048][:M], w, s).float(), exact[M])

    def tune(table, kind, key, M, cands, names, call):
        best = None
        for cfg in cands:
            if time.time() > deadline:
                break
            try:
                e = err(lambda x, w, s: call(x, w, s, cfg), min(M, 256))
                if e > 1e-2:
                    table[f"{key}:{cfg}"] = f"wrong: rel err {e:.2e}"
                    continue
                t = total_us(lambda x, w, s: call(x, w, s, cfg), M, names)
            except Exception as e:  # noqa: BLE001
                table[f"{key}:{cfg}"] = f"error {type(e).__name__}: {str(e)[:160]}"
                continue
            table[f"{key}:{cfg}"] = t
            if best is None or t < best[0]:
                best = (t, cfg)
        log(f"  {kind} tiles M={M}: best {best}")
        return best

    gemv_cands = {1: [(16, 256, 4, 3), (16, 512, 4, 3), (32, 256, 4, 3), (8, 512, 4, 4), (32, 512, 8, 3)],
                  2: [(16, 256, 4, 3), (8, 512, 4, 3), (16, 512, 8, 3)],
                  4: [(8, 256, 4, 3), (16, 256, 8, 3), (4, 512, 4, 3)],
                  8: [(8, 128, 4, 3), (8, 256, 8, 3), (4, 256, 4, 3)]}
    all_names = list(shapes)
    for mp, cands in gemv_cands.items():
        best = tune(report["gemv_tiles"], "gemv", mp, mp, cands, all_names,
                    lambda x, w, s, cfg: fp8mod.fp8_gemv(x, w, s, config=cfg))
        if best:
            fp8mod.GEMV_CONFIGS[mp] = best[1]
    dot_cands = {16: [(16, 32, 4, 6), (16, 32, 4, 4), (16, 64, 4, 4)], 64: [(64, 32, 4, 4), (64, 64, 4, 4)],
                 1 << 62: [(128, 128, 8, 3), (128, 128, 4, 4)]}
    probe_m = {1: 1, 2: 2, 4: 4, 8: 8, 16: 16, 32: 32, 64: 64, 256: 256, 1 << 62: 4096}
    for c, cands in dot_cands.items():
        names = all_names if c != 1 << 62 else ["in_proj_qkvz", "out_proj"]
        best = tune(report["tiles"], "gemm", c, probe_m[c], cands, names,
                    lambda x, w, s, cfg: fp8mod.fp8_gemm(x, w, s, config=cfg))
        if best:
            fp8mod.CONFIGS[c] = best[1]

    # the fused form the step uses: split output + a bf16 side weight in the same launch
    w, s = weights["in_proj_qkvz"][0]
    wb = (torch.randn(64, 2048, generator=g, device=device) * 2048**-0.5).to(BF16)
    gemv_ok = True
    for M in (1, 3, 8):
        try:
            y1, y2, yb = fp8mod.fp8_gemv(xs[2048][:M], w, s, split=8192, wb=wb)
            e = max(rel(torch.cat([y1, y2], 1).float(), exact[M] if M in exact else exact[8][:M]),
                    rel(yb.float(), xs[2048][:M].float() @ wb.float().t()))
        except Exception as ex:  # noqa: BLE001
            e = f"{type(ex).__name__}: {str(ex)[:160]}"
        report.setdefault("gemv_fused_err", {})[M] = e
        gemv_ok &= isinstance(e, float) and e < 1e-2
    scaled = None
    for pad in (1, 16, 128):
        try:
            sm = ScaledMM(pad_m=pad)
            errs = {M: rel(sm(xs[2048][:M], w, s).float(), exact[M]) for M in (1, 8, 64)}
            report["scaled_mm"][f"pad_m={pad}"] = errs
            if max(errs.values()) < 0.08:
                scaled = sm
                report["scaled_pad"] = pad
                break
        except Exception as e:  # noqa: BLE001
            report["scaled_mm"][f"pad_m={pad}"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    log(f"  scaled_mm (block 1x128 x 128x128): {report['scaled_mm']}")
    choice = {}
    names = ["in_proj_qkvz", "out_proj", "shared_fc2"]
    for c, M in probe_m.items():
        t = {}
        if M <= fp8mod.GEMV_MAX_M and gemv_ok:
            t["gemv"] = total_us(lambda x, w, s: fp8mod.fp8_gemv(x, w, s), M, names)
        t["triton"] = total_us(lambda x, w, s: fp8mod.fp8_gemm(x, w, s), M, names)
        if scaled is not None:
            try:
                t["scaled_mm"] = total_us(scaled, M, names)
            except Exception as e:  # noqa: BLE001
                report["scaled_mm"][f"M={M}"] = f"{type(e).__name__}: {str(e)[:120]}"
        report["times_us"][str(M)] = t
        choice[c] = min(t, key=t.get)
        log(f"  M={M} (qkvz + out_proj + shared_fc2): " + ", ".join(f"{k} {v:.1f} us" for k, v in t.items()) + f" -> {choice[c]}")
    report["choice"] = {str(c): v for c, v in choice.items()}
    report["configs"] = {str(c): v for c, v in fp8mod.CONFIGS.items()}
    report["gemv_configs"] = {str(c): v for c, v in fp8mod.GEMV_CONFIGS.items()}
    report["bytes_per_M1_pass"] = sum(shapes[n][0] * shapes[n][1] for n in names)
    weights = xs = exact = None  # noqa: F841 - frees the GPU buffers before returning
    torch.cuda.empty_cache()
    return GemmDispatch(choice, scaled), report, scaled


# ------------------------------------------------------------------------------------------------
# Rows


def step_bytes(model: FastModel, B, ctx, T, touched) -> dict:
    """Bytes one step must move: weights once (routed experts: those the routing touched, per layer), DeltaNet
    states read + written, KV cache read (+ this step's tokens written), embedding rows, lm_head."""
    d = model.d
    w = e = 0
    for L, n in zip(model.layers, touched):
        lb = layer_bytes(L)
        w += lb["dense"]
        e += n * lb["expert"]
    w += model.lm_head.numel() * 2 + B * T * d.H * 2 + model.final_norm.numel() * 2
    lin = sum(L.kind == LINEAR_ATTENTION for L in model.layers)
    att = len(model.layers) - lin
    states = lin * B * 2 * (d.Hv * d.Dk * d.Dv * 4 + d.C * (d.Kc - 1) * 2)
    kv = att * B * (ctx + 2 * T) * d.Hkv * d.D * 2 * 2
    return {"weights": w, "experts": e, "states": states, "kv": kv, "total": w + e + states + kv}


def time_graph(g, reps, before=None) -> float:
    """Median ms of graph replays, CUDA events around each replay; `before` (not timed) runs first each time."""
    times = []
    for i in range(reps + 2):
        if before is not None:
            before()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        if i >= 2:
            times.append(a.elapsed_time(b))
    return statistics.median(times)


def touched_experts(model, st, ids, ops, T=1):
    """One eager step with the MoE ops counting the distinct experts each layer's routing chose."""
    ops.expert_counts = []
    snap = st.snapshot()
    model.forward(ids, st, ops)
    counts, ops.expert_counts = ops.expert_counts, None
    st.restore(snap)
    return counts[:len(model.layers)]


@torch.no_grad()
def decode_row(model, ops, B, ctx, rates, reps, label="kernels", gen=None):
    dev = model.device
    st = State(model, B, ctx + 16, mtp=False)
    st.randomize(gen)
    st.lens.fill_(ctx)
    ids = torch.randint(0, model.d.V, (B, 1), generator=gen, device=dev)
    touched = touched_experts(model, st, ids, ops)
    torch.cuda.reset_peak_memory_stats()
    g, _ = capture(lambda: greedy_step(model, st, ids, ops))
    ms = time_graph(g, reps, before=lambda: st.lens.fill_(ctx))
    by = step_bytes(model, B, ctx, 1, touched)
    floor = by["total"] / (rates["copy_GBps"] * 1e9) * 1e3
    row = {"ops": label, "batch": B, "context": ctx, "tpot_ms": ms, "tokens_per_s": B / ms * 1e3,
           "bytes": by, "floor_ms": floor, "pct_of_floor": floor / ms, "experts_touched_mean": sum(touched) / len(touched),
           "peak_alloc_GiB": torch.cuda.max_memory_allocated() / 2**30, "state_GiB": st.nbytes() / 2**30}
    g = st = None  # noqa: F841 - the graph pool and the states go back before the next row
    torch.cuda.empty_cache()
    return row


def prefill_flops(model, T):
    d = model.d
    per_tok = 0
    for L in model.layers:
        if L.kind == LINEAR_ATTENTION:
            per_tok += L.w_qkvz.numel() + L.w_ba.numel() + L.w_out.numel()
        else:
            per_tok += L.w_qkv.numel() + L.w_o.numel()
        per_tok += L.w_router.numel() + L.w_sh1.numel() + L.w_sh2.numel() + d.topk * 3 * d.H * d.I
    lin = sum(L.kind == LINEAR_ATTENTION for L in model.layers)
    att = len(model.layers) - lin
    gemm = 2 * per_tok * T
    attn = att * 2 * 2 * d.Hq * d.D * T * T / 2  # QK^T and PV, causal half
    scan = lin * T * d.Hv * 4 * 2 * d.Dk * d.Dv
    return {"gemm": gemm, "attention": attn, "scan": scan, "total": gemm + attn + scan + 2 * d.V * d.H}


@torch.no_grad()
def prefill_row(model, ops, T, rates, runs, label="kernels", gen=None, profile=False):
    dev = model.device
    st = State(model, 1, T + 8, mtp=False)
    ids = torch.randint(0, model.d.V, (1, T), generator=gen, device=dev)
    torch.cuda.reset_peak_memory_stats()
    times = []

    def fresh():
        st.lens.zero_()
        for t in [*st.conv.values(), *st.rec.values()]:
            t.zero_()

    def prompt():
        logits, _ = model.forward(ids, st, ops, last_only=True)
        return logits.argmax(-1)

    for _ in range(runs):
        fresh()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        prompt()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    prof = None
    if profile:
        fresh()
        try:
            prof = profile_kernels(prompt)
        except Exception as e:  # noqa: BLE001
            prof = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    ms = statistics.median(times)
    fl = prefill_flops(model, T)
    by = step_bytes(model, 1, 0, T, [model.d.E] * len(model.layers))
    floor_b = by["total"] / (rates["copy_GBps"] * 1e9) * 1e3
    floor_c = fl["total"] / (rates["bf16_TFLOPs"] * 1e12) * 1e3
    row = {"ops": label, "tokens": T, "ttft_ms": ms, "tokens_per_s": T / ms * 1e3, "runs_ms": times, "bytes": by,
           "hbm_floor_ms": floor_b, "compute_floor_ms": floor_c, "flops": fl, "pct_of_floor": max(floor_b, floor_c) / ms,
           "peak_alloc_GiB": torch.cuda.max_memory_allocated() / 2**30}
    if prof is not None:
        row["profile"] = prof
    st = None  # noqa: F841
    if isinstance(ops, KernelOps):
        ops.moe_ws.pop(T, None)
    torch.cuda.empty_cache()
    return row


CUBLAS = "cuBLAS GEMMs (bf16: router / in_proj_ba where not fused, lm_head, mtp.fc; FP8 scaled_mm where chosen)"
KERNEL_GROUPS = (  # kernel-name fragment -> what it is (for the profile of one graph replay)
    ("_fp8_gem", "FP8 projections (Triton; at M <= 8 the router and in_proj_ba ride along)"), ("e4m3", "FP8 projections (cuBLAS scaled_mm)"),
    ("f8f6f4", "FP8 projections (cuBLAS scaled_mm)"), ("flash", "attention (SDPA flash)"), ("fmha", "attention (SDPA)"), ("q3n_moe", "routed MoE (plugin)"),
    ("route_kernel", "routed MoE (plugin)"), ("fc1_swiglu", "routed MoE (plugin)"), ("fc2_combine", "routed MoE (plugin)"),
    ("count_kernel", "routed MoE (plugin)"), ("q3n_gdn", "GDN scan (plugin)"), ("gated_delta", "GDN scan (plugin)"),
    ("causal_conv", "causal conv (plugin)"), ("_attn_partial", "attention (Triton)"), ("_attn_reduce", "attention (Triton)"),
    ("_attn_prep", "attention q/k norm + RoPE + KV write (Triton)"), ("_add_rmsnorm", "norms + residual (Triton)"),
    ("_gdn_prep", "DeltaNet l2norm + gates (Triton)"), ("_gated_norm", "DeltaNet gated norm (Triton)"),
    ("_silu_mul", "shared expert SwiGLU (Triton)"), ("gemv", CUBLAS), ("gemm", CUBLAS), ("nvjet", CUBLAS), ("xmma", CUBLAS),
    ("cutlass", CUBLAS), ("elementwise", "torch elementwise / copies (transposes, casts, activation quantisation, rope tables)"),
    ("reduce", "torch reductions (argmax, amax of activation quantisation)"),
)


def kernel_group(name):
    low = name.lower()
    for frag, group in KERNEL_GROUPS:
        if frag.lower() in low:
            return group
    return "other torch kernels (embedding, index, cat, SDPA glue)"


def profile_kernels(fn, n=1) -> dict:
    """Kernel time by kind (KERNEL_GROUPS) of n runs of fn (graph replays included), per run."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    groups, count, busy = {}, 0.0, 0.0
    for ev in prof.events():
        if str(getattr(ev, "device_type", "")).endswith("CUDA") and "memset" not in ev.name.lower() \
                and "memcpy" not in ev.name.lower():
            ms = ev.time_range.elapsed_us() / n / 1e3
            gname = kernel_group(ev.name)
            groups.setdefault(gname, [0.0, 0.0])
            groups[gname][0] += ms
            groups[gname][1] += 1 / n
            busy += ms
            count += 1 / n
    return {"kernels": {k: {"ms": v[0], "launches": round(v[1])} for k, v in sorted(groups.items(), key=lambda kv: -kv[1][0])},
            "kernel_busy_ms": busy, "kernel_launches": round(count)}


@torch.no_grad()
def breakdown(model, ops, rates, reps, gen=None, log=print):
    """Batch 1, 1K context: each part's cost = T(step) - T(step with that part replaced by stand-ins), and the
    kernel time of one replay by kind (torch.profiler over graph replays); launch gaps = T(step) - busy."""
    global SKIP
    dev = model.device
    ctx = 1024
    st = State(model, 1, ctx + 16, mtp=False)
    st.randomize(gen)
    ids = torch.randint(0, model.d.V, (1, 1), generator=gen, device=dev)
    reset = lambda: st.lens.fill_(ctx)  # noqa: E731
    out = {"context": ctx, "batch": 1}
    reset()
    g_full, _ = capture(lambda: greedy_step(model, st, ids, ops))
    full = time_graph(g_full, reps, reset)
    out["step_ms"] = full
    parts = {}
    for p in ("moe", "projections", "deltanet_mixer", "attention_mixer", "lm_head", "norms"):
        try:
            SKIP = {p}
            reset()
            g, _ = capture(lambda: greedy_step(model, st, ids, ops))
            t = time_graph(g, reps, reset)
            parts[p] = {"ms": full - t, "share": (full - t) / full, "step_without_ms": t}
            del g
        except Exception as e:  # noqa: BLE001
            parts[p] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        finally:
            SKIP = set()
        log(f"  without {p}: {parts[p]}")
    out["parts"] = parts
    try:
        prof = profile_kernels(lambda: (reset(), g_full.replay()), n=5)
        out.update(prof)
        out["launch_gaps_ms"] = full - prof["kernel_busy_ms"] if prof["kernel_launches"] else None
        if not prof["kernel_launches"]:
            out["profiler_note"] = "the profiler reported no kernels inside graph replays"
    except Exception as e:  # noqa: BLE001
        out["profiler_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    by = step_bytes(model, 1, ctx, 1, touched_experts(model, st, ids, ops))
    out["floor_ms"] = by["total"] / (rates["copy_GBps"] * 1e9) * 1e3
    g_full = st = None  # noqa: F841
    torch.cuda.empty_cache()
    return out


def load_measured_acceptance():
    """Per-position acceptance of the trained tiny model (bench/results/runtime-cpu.json): fraction of rounds in
    which draft i was accepted (so P(the first i drafts accepted))."""
    path = Path(__file__).resolve().parent / "results" / "runtime-cpu.json"
    out = {}
    try:
        for r in json.loads(path.read_text())["rows"]:
            if r["mtp_k"] >= 1:
                out[f"batch{r['batch']}_k{r['mtp_k']}"] = r["acceptance_per_position"]
    except (OSError, KeyError, ValueError):
        pass
    return out


@torch.no_grad()
def mtp_rows(model, ops, B, ctx, reps, gen=None, log=print):
    """Cost of a draft + verify round for k = 1..3 drafts, and the speedup it gives at given acceptance.
    Round = k MTP steps (1 token each) + snapshot of the DeltaNet states + a verify pass of the main model over
    k+1 tokens + (when not every draft is accepted) restoring the snapshot and re-running conv + scan of the 36
    DeltaNet layers over the accepted tokens (timed at k tokens), as runtime/ does it."""
    dev = model.device
    d = model.d
    st = State(model, B, ctx + 16, mtp=True)
    st.randomize(gen)
    reset = lambda: (st.lens.fill_(ctx), st.mtp_lens.fill_(ctx - 1))  # noqa: E731
    ids = torch.randint(0, d.V, (B, 1), generator=gen, device=dev)
    reset()
    g_dec, (_, hid) = capture(lambda: greedy_step(model, st, ids, ops))
    t_dec = time_graph(g_dec, reps, reset)
    hidden = torch.randn(B, d.H, generator=gen, device=dev).to(BF16)
    reset()
    g_mtp, _ = capture(lambda: model.mtp_forward(ids, hidden, st, ops))
    t_mtp = time_graph(g_mtp, reps, reset)
    snap = [t.clone() for t in [*st.conv.values(), *st.rec.values()]]
    live = [*st.conv.values(), *st.rec.values()]

    def take_snapshot():
        for s, t in zip(snap, live):
            s.copy_(t)

    g_snap, _ = capture(take_snapshot)
    t_snap = time_graph(g_snap, reps)
    out = {"batch": B, "context": ctx, "decode_ms": t_dec, "mtp_step_ms": t_mtp, "snapshot_ms": t_snap, "k": {}}
    lin = [i for i, L in enumerate(model.layers) if L.kind == LINEAR_ATTENTION]
    kd2v = 2 * d.Hk * d.Dk + d.Hv * d.Dv
    for k in (1, 2, 3):
        idk = torch.randint(0, d.V, (B, k + 1), generator=gen, device=dev)
        reset()
        g_ver, _ = capture(lambda: model.forward(idk, st, ops))
        t_ver = time_graph(g_ver, reps, reset)
        xs = torch.randn(B, kd2v, k, generator=gen, device=dev).to(BF16)
        qk = [torch.nn.functional.normalize(torch.randn(B * k, d.Hk, d.Dk, generator=gen, device=dev), dim=-1).view(B * k, -1)
              for _ in range(2)]
        v = torch.randn(B * k, d.Hv * d.Dv, generator=gen, device=dev)
        gg = -torch.rand(B * k, d.Hv, generator=gen, device=dev)
        beta = torch.rand(B * k, d.Hv, generator=gen, device=dev)

        def rollback():
            for s, t in zip(snap, live):
                t.copy_(s)
            for i in lin:
                L = model.layers[i]
                ops.conv(xs, L.conv_w, st.conv[i])
                ops.scan(qk[0], qk[1], v, gg, beta, st.rec[i], B, k)

        g_rb, _ = capture(rollback)
        t_rb = time_graph(g_rb, reps)
        out["k"][k] = {"verify_ms": t_ver, "rollback_ms": t_rb}
        del g_ver, g_rb
    rates = {f"a={a}": {k: [a**i for i in range(1, k + 1)] for k in (1, 2, 3)} for a in (0.5, 0.7, 0.9)}
    measured = load_measured_acceptance()
    for b in (1, 8):
        m = {k: measured.get(f"batch{b}_k{k}") for k in (1, 2, 3)}
        if all(m.values()):
            rates[f"tiny-trained batch {b}"] = m
    speed = {}
    for name, per_k in rates.items():
        speed[name] = {}
        for k in (1, 2, 3):
            p = per_k[k]
            tokens = 1 + sum(p)
            c = out["k"][k]
            rnd = k * t_mtp + t_snap + c["verify_ms"] + (1 - p[-1]) * c["rollback_ms"]
            speed[name][k] = {"tokens_per_round": tokens, "round_ms": rnd, "speedup": (tokens / rnd) / (1 / t_dec),
                              "acceptance": p}
    out["speedup"] = speed
    g_dec = g_mtp = g_snap = st = None  # noqa: F841
    torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------------
# Output


class Results:
    def __init__(self, path: Path | None, meta: dict):
        self.path, self.data = path, {**meta, "sections": {}, "errors": []}

    def put(self, section, key, value):
        self.data["sections"].setdefault(section, {})[key] = value
        self.write()

    def error(self, where, e):
        msg = f"{where}: {type(e).__name__}: {e}"
        self.data["errors"].append({"where": where, "error": f"{type(e).__name__}: {str(e)[:2000]}",
                                    "traceback": traceback.format_exc()[-3000:]})
        print(f"[e2e] ERROR {msg[:500]}", flush=True)
        self.write()

    def write(self):
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


def fmt(x, nd=1):
    return "-" if x is None else (f"{x:,.{nd}f}" if isinstance(x, (int, float)) else str(x))


def print_tables(res: Results):
    D = res.data
    S = D["sections"]
    lines = [f"\n## Qwen3-Next-80B-A3B, {D.get('device')} ({D.get('date')}), backend: {D.get('backend')}",
             f"copy {fmt(D.get('rates', {}).get('copy_GBps'), 0)} GB/s, bf16 matmul {fmt(D.get('rates', {}).get('bf16_TFLOPs'), 0)} TFLOP/s "
             f"(measured in this run); weights {fmt(D.get('weights_GiB'), 2)} GiB on the GPU"]
    num = S.get("numerics", {})
    if num:
        lines.append(f"Numerics, {num.get('layers')} layers + MTP vs the reference model in float32 holding the same weights "
                     f"dequantised (logits cosine min / mean, top-1 agreement):")
    for label, key in (("reference in bf16 (yardstick: bf16 rounding alone)", "reference_bf16"), ("kernels", "kernels"),
                       ("peer", "peer")):
        r = num.get(key)
        if isinstance(r, dict) and "prefill" in r:
            lines.append(f"  {label}: " + "; ".join(f"{k} {v['cos_min']:.4f}/{v['cos_mean']:.4f} {v['top1']:.0%}"
                                                   for k, v in r.items() if isinstance(v, dict) and "cos_min" in v))
        elif r is not None:
            lines.append(f"  {label}: {str(r)[:200]}")
    mem = D.get("memory_after_build_GiB")
    if mem:
        peaks = [(r["peak_alloc_GiB"], k) for sec in ("decode", "prefill") for k, r in S.get(sec, {}).items()
                 if isinstance(r, dict) and "peak_alloc_GiB" in r]
        top = max(peaks) if peaks else (None, "-")
        lines.append(f"GPU memory: weights {fmt(D.get('weights_GiB'), 2)} GiB, allocated after build {mem['allocated']:.1f} GiB, "
                     f"device in use {mem['device_used']:.1f} GiB; peak allocated {fmt(top[0], 1)} GiB ({top[1]}) of "
                     f"{fmt(D.get('memory_GiB', {}).get('device_total'), 1)} GiB")
    dec = S.get("decode", {})
    if dec:
        lines += ["", "| ops | batch | context | TPOT ms | tokens/s | bytes/step GB | HBM floor ms | % of floor | experts/layer | peak GiB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for key, r in dec.items():
            if "tpot_ms" in r:
                lines.append(f"| {r['ops']} | {r['batch']} | {r['context']} | {r['tpot_ms']:.3f} | {r['tokens_per_s']:,.0f} | "
                             f"{r['bytes']['total'] / 1e9:.2f} | {r['floor_ms']:.3f} | {r['pct_of_floor']:.0%} | "
                             f"{r['experts_touched_mean']:.0f} | {r.get('peak_alloc_GiB', 0):.1f} |")
            else:
                lines.append(f"| {key} | error: {str(r.get('error'))[:100]} |")
    pre = S.get("prefill", {})
    if pre:
        lines += ["", "| ops | prompt | TTFT ms | tokens/s | HBM floor ms | compute floor ms | % of floor |", "|---|---|---|---|---|---|---|"]
        for key, r in pre.items():
            if "ttft_ms" in r:
                lines.append(f"| {r['ops']} | 1 x {r['tokens']} | {r['ttft_ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['hbm_floor_ms']:.1f} | "
                             f"{r['compute_floor_ms']:.1f} | {r['pct_of_floor']:.0%} |")
            else:
                lines.append(f"| {key} | error: {str(r.get('error'))[:100]} |")
    for key, r in pre.items():
        prof = r.get("profile") if isinstance(r, dict) else None
        if prof and "kernels" in prof:
            lines += [f"Prefill {key} ({r['ops']}): kernel time by kind (one run, {prof['kernel_busy_ms']:.1f} ms busy of "
                      f"{r['ttft_ms']:.1f} ms)", "| kernels | ms | share |", "|---|---|---|"]
            for k, v in prof["kernels"].items():
                lines.append(f"| {k} | {v['ms']:.1f} | {v['ms'] / r['ttft_ms']:.0%} |")
    bd = S.get("breakdown", {}).get("batch1_1k")
    if bd and "parts" in bd:
        lines += ["", f"Breakdown, batch 1, 1K context: step {bd['step_ms']:.3f} ms (HBM floor {bd['floor_ms']:.3f} ms)",
                  "| part (removed from the graph) | ms | share |", "|---|---|---|"]
        for p, v in bd["parts"].items():
            lines.append(f"| {p} | {fmt(v.get('ms'), 3)} | {fmt(100 * v['share'] if 'share' in v else None, 0)}% |")
        if bd.get("kernels"):
            gaps = bd.get("launch_gaps_ms")
            gap_text = (f"{gaps:.3f} ms" if gaps is None or gaps >= 0 else
                        f"~0 (kernel time exceeds the step by {-gaps:.3f} ms: kernels overlap, the MoE chain by programmatic "
                        "dependent launch)")
            lines += [f"kernel busy {bd['kernel_busy_ms']:.3f} ms in {bd['kernel_launches']} launches "
                      f"({bd['kernel_busy_ms'] / max(bd['kernel_launches'], 1) * 1e3:.1f} us each on average); launch gaps {gap_text}",
                      "| kernels | ms | launches |", "|---|---|---|"]
            for k, v in bd["kernels"].items():
                lines.append(f"| {k} | {v['ms']:.3f} | {v['launches']} |")
    mtp = S.get("mtp", {})
    for key, m in mtp.items():
        if "speedup" not in m:
            lines.append(f"MTP {key}: error {str(m.get('error'))[:200]}")
            continue
        lines += ["", f"MTP, batch {m['batch']}, {m['context']} context: decode {m['decode_ms']:.3f} ms, MTP step {m['mtp_step_ms']:.3f} ms, "
                  f"state snapshot {m['snapshot_ms']:.3f} ms; verify k+1 tokens / rollback: " + ", ".join(
                      f"k={k} {v['verify_ms']:.3f}/{v['rollback_ms']:.3f} ms" for k, v in m["k"].items()),
                  "| acceptance | k=1 speedup | k=2 speedup | k=3 speedup |", "|---|---|---|---|"]
        for name, per_k in m["speedup"].items():
            lines.append(f"| {name} | " + " | ".join(f"{per_k[k]['speedup']:.2f}x ({per_k[k]['tokens_per_round']:.2f} tok / "
                                                     f"{per_k[k]['round_ms']:.2f} ms)" for k in per_k) + " |")
    an = ANCHORS
    lines += ["", f"Anchors (published, not measured here): {an['single_stream_tokens_per_s'][1]}: {an['single_stream_tokens_per_s'][0]} tokens/s; "
              f"{an['vllm_c8_tpot_ms'][1]} {an['vllm_c8_tpot_ms'][0]} ms ({8 / an['vllm_c8_tpot_ms'][0] * 1e3:,.0f} tokens/s total)."]
    ratios = S.get("ratios", {})
    if ratios:
        lines.append("Ratios: " + "; ".join(f"{k} {fmt(v, 2)}" for k, v in ratios.items()))
    lines.append("Targets (moonshot): " + ", ".join(f"{k} >= {v:,}" for k, v in TARGETS.items()))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


# ------------------------------------------------------------------------------------------------
# Main


def mini_config() -> Qwen3NextConfig:
    """The 80B preset shrunk for the CPU check: same head and block sizes (so every 128-block layout rule
    holds), fewer heads, experts and layers."""
    c = load_preset("qwen3-next-80b-a3b")
    return dataclasses.replace(c, hidden_size=256, num_hidden_layers=4, layer_types=c.layer_types[:4],
                               num_attention_heads=2, num_key_value_heads=1, linear_num_key_heads=2,
                               linear_num_value_heads=4, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
                               shared_expert_intermediate_size=128, vocab_size=512)


def cpu_check() -> int:
    """Dev machine: the torch step (and, with TRITON_INTERPRET=1, the Triton glue + GEMM) vs the reference."""
    torch.manual_seed(0)
    cfg = mini_config()
    ref = reference_model(cfg, 4, "cpu")
    model = build_fast(cfg, "cpu", seed=0, keep_reference=ref)
    d = model.d
    print(f"fc1 re-rounding error (gate/up under one scale): {model.reround_err}")
    ok = True
    ref16 = reference_copy(ref, BF16)
    print("reference in bf16 vs float32 (what bf16 rounding alone does to this random model):")
    baseline_check(ref16, ref, B=2, P=12, steps=3)
    print("torch step (bf16) vs reference (float32):")
    res = numerics_check(model, ref, TorchOps(d), B=2, P=12, steps=3, graphs=False)
    ok &= all(v["cos_mean"] > 0.99 and v["top1"] >= 0.8 for v in res.values())
    print("torch step with float32 activations vs the reference holding the kernel layout's gate/up:")
    exact_ref = copy.deepcopy(ref)
    reference_with_kernel_fc1(exact_ref, model)
    m32 = with_activation_dtype(copy.deepcopy(model), F32)
    res32 = numerics_check(m32, exact_ref, TorchOps(d), B=2, P=12, steps=3, graphs=False)
    ok &= all(v["cos_min"] > 0.99999 and v["top1"] == 1.0 for v in res32.values())
    del m32, exact_ref
    # the grouped path of the torch MoE (prefill) against its decode path
    L = model.layers[0]
    x = torch.randn(40, d.H).to(BF16)
    lg = torch.randn(40, d.E).to(BF16)
    ops = TorchOps(d)
    w, idx = route_tokens(lg, d.topk, d.norm_topk)
    big, small = ops.moe_grouped(x, w, idx, L), torch.cat([ops.moe(x[i:i + 8], lg[i:i + 8], L) for i in range(0, 40, 8)])
    e = rel(big, small)
    print(f"torch MoE grouped vs gather: rel err {e:.2e}")
    ok &= e < 1e-2
    if triton is not None and INTERPRET:
        fast = KernelOps(d, gemm=GemmDispatch({}, None), lib=None, sm_count=4)
        chk = check_fused(fast, TorchOps(d), d, "cpu")
        ok &= all(v.get("ok") for v in chk.values() if isinstance(v, dict))
        print("Triton glue + GEMM (interpreter) step vs reference (float32):")
        res2 = numerics_check(model, ref, fast, B=2, P=12, steps=3, graphs=False)
        ok &= all(v["cos_mean"] > 0.99 and v["top1"] >= 0.8 for v in res2.values())
    else:
        print("Triton kernels not checked (run with triton installed and TRITON_INTERPRET=1)")
    print("CPU CHECK", "PASS" if ok else "FAIL")
    return 0 if ok else 1


def gemm_from_report(report: dict):
    """The GEMM choice a selftest process made (tiles, Triton or scaled_mm per M class)."""
    for c, cfg in report.get("configs", {}).items():
        fp8mod.CONFIGS[int(c)] = tuple(cfg)
    for c, cfg in report.get("gemv_configs", {}).items():
        fp8mod.GEMV_CONFIGS[int(c)] = tuple(cfg)
    scaled = ScaledMM(report["scaled_pad"]) if report.get("scaled_pad") else None
    return GemmDispatch({int(c): v for c, v in report.get("choice", {}).items()}, scaled), scaled


def selftest(path: Path, seed: int, log) -> int:
    """First process of a device run: GEMM choice, then every plugin op and fused kernel against its torch
    version at the 80B sizes (one real layer), results written after each check. A kernel that crashes
    the process stays marked 'running' and the main process leaves it out."""
    out = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}

    def write():
        path.write_text(json.dumps(out, indent=1, default=str))

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    dev = torch.device("cuda")
    cfg = load_preset("qwen3-next-80b-a3b")
    d = Dims.of(cfg)
    lib = None
    try:
        from qwen3next_trt.plugins import torch_ops
        t0 = time.time()
        lib = torch_ops.load_library()
        out["plugin_library"] = f"loaded ({time.time() - t0:.1f} s)"
    except Exception as e:  # noqa: BLE001
        out["plugin_library"] = f"{type(e).__name__}: {str(e)[:1000]}"
    write()
    log(f"plugin library: {out['plugin_library']}")
    out["gemm"] = {"status": "running"}
    write()
    try:
        gemm, report, _ = choose_gemm(dev, time.time() + 130, log)
        out["gemm"] = report
    except Exception as e:  # noqa: BLE001
        out["gemm"] = {"error": f"{type(e).__name__}: {str(e)[:1000]}", "traceback": traceback.format_exc()[-2000:]}
        gemm = GemmDispatch({}, None)
    write()
    W = WeightMaker(cfg, seed, dev).layer("model.layers.0.", LINEAR_ATTENTION)
    layer0 = pack_layer(W, "model.layers.0.", LINEAR_ATTENTION, d)
    ops = KernelOps(d, gemm, lib=lib, sm_count=torch.cuda.get_device_properties(dev).multi_processor_count)
    check_fused(ops, TorchOps(d), d, dev, log=log, layer=layer0,
                progress=lambda r: (out.__setitem__("checks", r), write()))
    out["use"] = sorted(ops.use)
    write()
    log(f"selftest done: use {out['use']}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="directory for e2e_80b.json (default: bench/results)")
    ap.add_argument("--budget-s", type=float, default=470.0, help="wall-clock budget of the whole run")
    ap.add_argument("--sections", default="numerics,decode,breakdown,prefill,mtp,peer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=20, help="graph replays per decode row (median)")
    ap.add_argument("--cpu-check", action="store_true")
    ap.add_argument("--selftest", metavar="JSON", help="only the GEMM choice and the kernel checks, written to JSON")
    ap.add_argument("--selftest-json", metavar="JSON", help="take the GEMM choice and kernel checks from a --selftest run")
    ap.add_argument("--print", metavar="JSON", help="only print the tables of a results file")
    args = ap.parse_args()
    if args.print:
        res = Results(None, {})
        res.data = json.loads(Path(args.print).read_text())
        print_tables(res)
        return 0
    if args.cpu_check:
        return cpu_check()
    if args.selftest:
        return selftest(Path(args.selftest), args.seed, lambda *a: print("[selftest]", *a, flush=True))
    if not torch.cuda.is_available():
        sys.exit("bench/e2e_80b.py needs a CUDA GPU (or --cpu-check)")
    t_start = time.time()
    deadline = t_start + args.budget_s
    left = lambda: deadline - time.time()  # noqa: E731
    sections = set(args.sections.split(","))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from kernels import machine_rates

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    clocks = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm,clocks.mem,driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True).stdout.strip()
    out_dir = Path(args.out) if args.out else Path(__file__).resolve().parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"device": name, "capability": "sm_%d%d" % torch.cuda.get_device_capability(), "clocks_sm_maxsm_mem_driver": clocks,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join(["python3", *sys.argv]), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": getattr(triton, "__version__", None), "python": platform.python_version(),
            "model": "qwen3-next-80b-a3b preset (48 layers, 512 experts top-10, 1 MTP layer), seeded random FP8 weights",
            "anchors": ANCHORS, "targets": TARGETS}
    res = Results(out_dir / "e2e_80b.json", meta)
    log = lambda *a: print("[e2e]", *a, flush=True)  # noqa: E731
    rates = machine_rates()
    res.data["rates"] = rates
    log(f"{name} ({meta['capability']}), clocks sm/max/mem/driver {clocks}; {meta['date']}; torch {torch.__version__} "
        f"CUDA {torch.version.cuda} triton {meta['triton']}; copy {rates['copy_GBps']:.0f} GB/s, bf16 {rates['bf16_TFLOPs']:.0f} TFLOP/s")
    cfg = load_preset("qwen3-next-80b-a3b")
    d = Dims.of(cfg)
    gen = torch.Generator(device=dev).manual_seed(args.seed + 11)

    lib = None
    try:
        from qwen3next_trt.plugins import torch_ops
        t0 = time.time()
        lib = torch_ops.load_library()
        log(f"plugin library loaded ({time.time() - t0:.1f} s)")
    except Exception as e:  # noqa: BLE001
        res.error("plugin library", e)
    sm = torch.cuda.get_device_properties(dev).multi_processor_count
    st_json = json.loads(Path(args.selftest_json).read_text()) if args.selftest_json and Path(args.selftest_json).is_file() else {}
    res.data["selftest"] = st_json
    try:
        if "configs" in st_json.get("gemm", {}):
            gemm, scaled = gemm_from_report(st_json["gemm"])
            log(f"GEMM choice from the selftest: {gemm.describe()}, tiles {fp8mod.CONFIGS}")
        else:
            gemm, gemm_report, scaled = choose_gemm(dev, time.time() + 60, log)
            res.data["gemm"] = gemm_report
    except Exception as e:  # noqa: BLE001
        res.error("gemm choice", e)
        gemm, scaled = GemmDispatch({}, None), None
    ops = KernelOps(d, gemm, lib=lib, sm_count=sm)
    checks = st_json.get("checks", {})
    if checks:
        ops.use = {n for n in ops.use if checks.get(n, {}).get("ok")}
        log(f"kernels from the selftest: {sorted(ops.use)} (left out: {sorted(set(KernelOps.PLUGIN + KernelOps.FUSED) - ops.use)})")
    else:
        try:
            res.data["fused_checks"] = check_fused(ops, TorchOps(d), d, dev, log=log)
        except Exception as e:  # noqa: BLE001
            res.error("fused checks", e)
    peer_gemm_name = "torch scaled_mm (block 1x128 x 128x128)" if scaled is not None else "per-call dequantisation + bf16 matmul"
    peer = TorchOps(d, gemm=scaled if scaled is not None else dequant_gemm)
    res.data["backend"] = (f"PyTorch {torch.__version__} + CUDA graphs; project kernels: {sorted(set(KernelOps.PLUGIN) & ops.use)} "
                           f"(torch for the others); FP8 GEMM per M class {gemm.describe()}; fused Triton glue: "
                           f"{sorted(set(KernelOps.FUSED) & ops.use)}; peer: {peer_gemm_name}, SDPA, torch scan/conv, "
                           "gather-dequant-bmm MoE (decode) / torch._grouped_mm (prefill)")
    res.write()

    # 1. numerics at 4 layers + MTP ----------------------------------------------------------------
    if "numerics" in sections:
        try:
            t0 = time.time()
            n_layers = 4
            ref = reference_model(cfg, n_layers, dev)
            small = build_fast(cfg, dev, args.seed, n_layers=n_layers, keep_reference=ref, log=log)
            res.put("numerics", "layers", n_layers)
            log(f"numerics: models made ({time.time() - t0:.1f} s)")
            try:
                log("numerics (reference in bf16 vs float32: the yardstick):")
                ref16 = reference_copy(ref, BF16)
                res.put("numerics", "reference_bf16", baseline_check(ref16, ref, log=log))
                del ref16
            except Exception as e:  # noqa: BLE001
                res.error("numerics reference_bf16", e)
            torch.cuda.empty_cache()
            for label, o in (("kernels", ops), ("peer", peer)):
                if left() < 150 and label == "peer":
                    res.put("numerics", label, "skipped: time budget")
                    continue
                try:
                    log(f"numerics ({label}):")
                    res.put("numerics", label, numerics_check(small, ref, o, log=log))
                except Exception as e:  # noqa: BLE001
                    res.put("numerics", label, {"error": f"{type(e).__name__}: {str(e)[:500]}"})
                    res.error(f"numerics {label}", e)
            res.put("numerics", "seconds", time.time() - t0)
            del ref, small
        except Exception as e:  # noqa: BLE001
            res.error("numerics", e)
        torch.cuda.empty_cache()

    # 2. the full model ----------------------------------------------------------------------------
    try:
        t0 = time.time()
        log("making the 80B model on the GPU ...")
        model = build_fast(cfg, dev, args.seed, log=log)
        res.data["weights_GiB"] = model.weight_bytes() / 2**30
        res.data["build_s"] = time.time() - t0
        res.data["memory_after_build_GiB"] = {"allocated": torch.cuda.memory_allocated() / 2**30,
                                              "device_used": (lambda f: (f[1] - f[0]) / 2**30)(torch.cuda.mem_get_info())}
        log(f"model made in {time.time() - t0:.1f} s: weights {res.data['weights_GiB']:.2f} GiB; fc1 re-round err (first layers) "
            f"{[round(x, 4) for x in model.reround_err[:3]]}")
        res.write()
    except Exception as e:  # noqa: BLE001
        res.error("build", e)
        print_tables(res)
        return 1

    def row(section, key, fn, need_s):
        if left() < need_s:
            res.put(section, key, {"error": f"skipped: time budget ({left():.0f} s left, needs ~{need_s} s)"})
            log(f"{section} {key}: skipped (budget)")
            return None
        try:
            t0 = time.time()
            r = fn()
            r["seconds"] = time.time() - t0
            res.put(section, key, r)
            log(f"{section} {key}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                                                  if not isinstance(v, dict)))
            return r
        except Exception as e:  # noqa: BLE001
            res.put(section, key, {"error": f"{type(e).__name__}: {str(e)[:500]}"})
            res.error(f"{section} {key}", e)
            torch.cuda.empty_cache()
            return None

    # 3. decode rows --------------------------------------------------------------------------------
    if "decode" in sections:
        for ctx in (1024, 32768):
            for B in (1, 8, 32, 64):
                row("decode", f"b{B}_ctx{ctx}", lambda: decode_row(model, ops, B, ctx, rates, args.reps, gen=gen), 25)
    if "breakdown" in sections:
        row("breakdown", "batch1_1k", lambda: breakdown(model, ops, rates, args.reps, gen=gen, log=log), 30)
    if "prefill" in sections:
        row("prefill", "1x4096", lambda: prefill_row(model, ops, 4096, rates, 3, gen=gen, profile=True), 20)
        row("prefill", "1x32768", lambda: prefill_row(model, ops, 32768, rates, 3, gen=gen, profile=True), 40)
    if "mtp" in sections:
        row("mtp", "b1_1k", lambda: mtp_rows(model, ops, 1, 1024, args.reps, gen=gen, log=log), 30)
    if "peer" in sections:
        for B in (1, 8):
            row("decode", f"peer_b{B}_ctx1024", lambda: decode_row(model, peer, B, 1024, rates, 10, label="peer", gen=gen), 30)
        row("prefill", "peer_1x4096", lambda: prefill_row(model, peer, 4096, rates, 1, label="peer", gen=gen), 60)
    if "mtp" in sections:
        row("mtp", "b8_1k", lambda: mtp_rows(model, ops, 8, 1024, args.reps, gen=gen, log=log), 30)

    # ratios ----------------------------------------------------------------------------------------
    S = res.data["sections"]
    dec = S.get("decode", {})
    ratios = {}

    def tps(key, sec=dec):
        r = sec.get(key, {})
        return r.get("tokens_per_s")

    if tps("b1_ctx1024"):
        ratios["batch 1 1K vs anchor 210.8 tok/s"] = tps("b1_ctx1024") / ANCHORS["single_stream_tokens_per_s"][0]
        if tps("peer_b1_ctx1024"):
            ratios["batch 1 1K vs peer"] = tps("b1_ctx1024") / tps("peer_b1_ctx1024")
    if tps("b8_ctx1024"):
        ratios["batch 8 1K TPOT vs vLLM 9.85 ms (anchor TPOT / ours)"] = ANCHORS["vllm_c8_tpot_ms"][0] / dec["b8_ctx1024"]["tpot_ms"]
        if tps("peer_b8_ctx1024"):
            ratios["batch 8 1K vs peer"] = tps("b8_ctx1024") / tps("peer_b8_ctx1024")
    pre = S.get("prefill", {})
    if tps("1x4096", pre) and tps("peer_1x4096", pre):
        ratios["prefill 1x4096 vs peer"] = tps("1x4096", pre) / tps("peer_1x4096", pre)
    res.data["sections"]["ratios"] = ratios
    res.data["memory_GiB"] = {"max_allocated": torch.cuda.max_memory_allocated() / 2**30,
                              "device_total": torch.cuda.get_device_properties(dev).total_memory / 2**30}
    res.data["wall_s"] = time.time() - t_start
    res.write()
    text = print_tables(res)
    (out_dir / "e2e_80b.md").write_text(text + "\n")
    log(f"wrote {res.path} ({time.time() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
