"""FP8 (E4M3) weights: which linear weights are quantised, and how.

The official Qwen3-Next FP8 checkpoint quantises every linear weight except its
`modules_to_not_convert` (norms, the router `mlp.gate`, `shared_expert_gate`, `in_proj_ba`, `conv1d`,
`A_log`, `dt_bias`, `lm_head`, `mtp.fc`; the embedding stays BF16 too), with one float32 scale per
128x128 block: W = fp8 * scale[i // 128, j // 128].

In ONNX a weight is dequantised by `DequantizeLinear`, whose blocked form runs along one axis only;
so a 128x128 block scale is written as a per-row, per-128-column scale `row_scale [out, ceil(in/128)]`
(each block's scale repeated over its 128 rows). The same layout carries per-output-channel scales
(`[out, 1]` with one block spanning all columns) and survives the interleaving of gate/up rows that
the MoE op wants (rows move with their scales), so it is the one layout used everywhere below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128
SCHEMES = ("block", "channel")

# Name fragments of the linear weights the official FP8 checkpoint keeps in BF16.
KEPT_IN_BF16 = ("norm", "mlp.gate.", "shared_expert_gate", "in_proj_ba", "conv1d", "A_log", "dt_bias", "lm_head",
                "mtp.fc", "embed_tokens")


def is_quantized(weight_name: str) -> bool:
    """Whether `weight_name` (a checkpoint tensor name ending in .weight) is stored in FP8 officially."""
    return weight_name.endswith(".weight") and not any(s in weight_name for s in KEPT_IN_BF16)


@dataclass
class FP8Weight:
    """fp8 [.., out, in] and row_scale [.., out, ceil(in / block)] float32: W = fp8 * row_scale (per block of columns)."""

    fp8: torch.Tensor
    row_scale: torch.Tensor
    block: int  # columns per scale; == in for per-channel scales

    def dequantize(self) -> torch.Tensor:
        cols = self.fp8.shape[-1]
        scale = self.row_scale.repeat_interleave(self.block, dim=-1)[..., :cols]
        return self.fp8.float() * scale


def _safe_scale(amax: torch.Tensor) -> torch.Tensor:
    # an all-zero block keeps scale 1 (any scale reproduces zeros) rather than dividing by 0
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


def quantize(w: torch.Tensor, scheme: str = "block") -> FP8Weight:
    """amax/448 scaling of a 2-D weight: per 128x128 block, or per output channel."""
    w = w.float()
    out, cols = w.shape
    if scheme == "channel":
        scale = _safe_scale(w.abs().amax(dim=1, keepdim=True))
        return FP8Weight((w / scale).to(FP8_DTYPE), scale, cols)
    if scheme != "block":
        raise ValueError(f"FP8 scheme {scheme!r}: expected one of {SCHEMES}")
    rb, cb = math.ceil(out / BLOCK), math.ceil(cols / BLOCK)
    padded = torch.zeros(rb * BLOCK, cb * BLOCK)
    padded[:out, :cols] = w
    amax = padded.reshape(rb, BLOCK, cb, BLOCK).abs().amax(dim=(1, 3))
    return from_block_scales((w / block_scale_per_element(_safe_scale(amax), out, cols)).to(FP8_DTYPE), _safe_scale(amax))


def block_scale_per_element(scale: torch.Tensor, out: int, cols: int, block=(BLOCK, BLOCK)) -> torch.Tensor:
    return scale.repeat_interleave(block[0], 0)[:out].repeat_interleave(block[1], 1)[:, :cols]


def from_block_scales(fp8: torch.Tensor, scale: torch.Tensor, block=(BLOCK, BLOCK)) -> FP8Weight:
    """An FP8 weight with [ceil(out/b0), ceil(in/b1)] block scales (the checkpoint format), unchanged values."""
    row_scale = scale.float().repeat_interleave(block[0], 0)[: fp8.shape[0]]
    return FP8Weight(fp8, row_scale, block[1])


def dequantize_blocks(fp8: torch.Tensor, scale: torch.Tensor, block=(BLOCK, BLOCK)) -> torch.Tensor:
    return fp8.float() * block_scale_per_element(scale.float(), *fp8.shape, block)


def row_blocks(row_scale: torch.Tensor, block: int = BLOCK) -> torch.Tensor | None:
    """[..., rows, cb] per-row scales -> [..., ceil(rows/block), cb] block scales, or None when the rows of
    some block do not share their scales (per-channel scales have no 128x128 block form)."""
    rows = row_scale.shape[-2]
    first = row_scale[..., ::block, :]
    if not torch.equal(first.repeat_interleave(block, dim=-2)[..., :rows, :], row_scale):
        return None
    return first.contiguous()


def fc1_block_scales(row_scale: torch.Tensor, block: int = BLOCK) -> torch.Tensor | None:
    """The MoE kernels' fc1 scales [E, 2 * ceil(I/block), cb] from the exported per-row scales of the
    interleaved fc1 rows [E, 2I, cb] (row 2i = gate i, 2i+1 = up i): the gate blocks above the up
    blocks, i.e. the checkpoint's two weight_scale_inv tensors unchanged. None if not block-shaped."""
    gate, up = row_blocks(row_scale[..., 0::2, :], block), row_blocks(row_scale[..., 1::2, :], block)
    return None if gate is None or up is None else torch.cat([gate, up], dim=-2)


def dequantize_fc1(fp8: torch.Tensor, scale1: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Float fc1 [..., 2I, H] from its FP8 bytes and the kernels' scale1 [..., 2*ceil(I/block), cb]
    (row 2i = gate i, scaled by scale row i/block; row 2i+1 = up i, by scale row ceil(I/block) + i/block)."""
    n, rows, cols = scale1.shape[-2] // 2, fp8.shape[-2] // 2, fp8.shape[-1]
    per_row = torch.stack([scale1[..., :n, :], scale1[..., n:, :]], dim=-2).float()  # [..., n, gate/up, cb]
    per_row = per_row.repeat_interleave(block, dim=-3)[..., :rows, :, :].flatten(-3, -2)  # [..., 2I, cb] interleaved
    return fp8.float() * per_row.repeat_interleave(block, dim=-1)[..., :cols]


class WeightQuantizer:
    """FP8 for a named weight: the checkpoint's own FP8 bytes and scales when it has them (carried over
    exactly, never re-quantised), else amax/448 quantisation of the float weight by `scheme`."""

    def __init__(self, scheme: str = "block", reader=None):
        if scheme not in SCHEMES:
            raise ValueError(f"FP8 scheme {scheme!r}: expected one of {SCHEMES}")
        self.scheme, self.reader = scheme, reader

    def describe(self) -> dict:
        carried = self.reader is not None and any(self.reader.is_fp8(n) for n in self.reader.names())
        return {"format": "float8e4m3fn", "scheme": "checkpoint 128x128 blocks" if carried else self.scheme,
                "scales": "row_scale [out, ceil(in/block)] float32, DequantizeLinear(axis=-1, block_size=block)",
                "source": "checkpoint FP8 tensors, exactly" if carried else "quantised by qwen3next-trt (amax/448)"}

    def __call__(self, name: str, weight: torch.Tensor) -> FP8Weight:
        if self.reader is not None and self.reader.is_fp8(name):
            fp8, scale = self.reader.get_fp8(name)
            return from_block_scales(fp8, scale, self.reader.block_size)
        return quantize(weight, self.scheme)


def fake_quantize_(module: torch.nn.Module, prefix: str, quantizer: WeightQuantizer) -> torch.nn.Module:
    """Replace every FP8-stored linear weight of `module` (names prefix + parameter name) by its
    dequantised value: the float model that FP8 graphs must reproduce."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            full = prefix + name
            if p.dim() == 2 and is_quantized(full):
                p.copy_(quantizer(full, p.detach()).dequantize().to(p.dtype))
    return module


# ------------------------------------------------------------------------------------------------
# Activations: static per-tensor scales from calibration (amax / 448), applied as quantize-dequantize.


def fake_quantize_activation(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x rounded through E4M3 with one scale (saturating at +-448, as ONNX QuantizeLinear does)."""
    return (quantize_tensor(x, scale).float() * scale.float()).to(x.dtype)


# Dynamic per-token scales: the alternative to calibration. Each token (row of the last axis) gets
# scale = max|x| / 448 at run time; a row of zeros gets the smallest scale instead of 0 (which
# would divide by zero). The manifest and the exporter carry the string PER_TOKEN where static
# mode carries the dict of calibrated scales.
PER_TOKEN = "per-token"
MIN_SCALE = 2.0**-40


def fake_quantize_activation_per_token(x: torch.Tensor) -> torch.Tensor:
    scale = (x.float().abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(MIN_SCALE)
    return fake_quantize_activation(x, scale)


def quantize_tensor(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """E4M3 values of x / scale (saturating): what QuantizeLinear with a float8 zero point stores."""
    return (x.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def kv_quantizer(key_scale: float, value_scale: float):
    """The AttentionCache.quantize of an FP8 KV cache with static per-tensor scales."""
    sk, sv = torch.tensor(key_scale), torch.tensor(value_scale)
    return lambda k, v: (fake_quantize_activation(k, sk), fake_quantize_activation(v, sv))


def fake_quantize_kv_(model, scales: dict[str, float]):
    """Give a Qwen3NextForCausalLM the FP8 KV cache of an export (scales from its manifest)."""
    for i, t in enumerate(model.config.layer_types):
        key = f"model.layers.{i}.self_attn.key"
        if key in scales:
            model.kv_quantize[i] = kv_quantizer(scales[key], scales[f"model.layers.{i}.self_attn.value"])
    return model


def activation_scale(scales: dict | str, name: str):
    """The scale of one activation point: a calibrated float, or PER_TOKEN."""
    return PER_TOKEN if scales == PER_TOKEN else scales[name]


def activation_points(module: torch.nn.Module, prefix: str):
    """(name, submodule) of every activation that FP8 quantises: the input of each FP8-stored linear
    (named by its weight) and the routed experts' input of each MoE block (`<prefix>mlp.experts`)."""
    from .modeling_qwen3_next import Qwen3NextSparseMoeBlock

    for name, sub in module.named_modules():
        full = prefix + name
        if not full:  # a bare root module has no checkpoint name
            continue
        if isinstance(sub, torch.nn.Linear) and is_quantized(full + ".weight") and ".experts." not in full + ".":
            # (routed experts' linears are not called as modules: their input is the block's point below)
            yield full + ".weight", sub
        elif isinstance(sub, Qwen3NextSparseMoeBlock):
            yield full + ".experts", sub


def graph_scale(value: float, dtype: torch.dtype) -> torch.Tensor:
    """A calibrated FP8 scale as an export of `dtype` holds it: QuantizeLinear / DequantizeLinear take
    their scale in the activation's type, so a 16-bit export rounds each scale to 16 bits. The one
    place that rounding is decided (export/kinds.py stores these; the reference applies them)."""
    return torch.tensor(value, dtype=dtype)


def graph_scales(scales, dtype: torch.dtype | None):
    """{name: scale} as `graph_scale` rounds them (floats), for a reference that must round activations
    and K/V with the very scales the graphs use: with the unrounded float32 scales ~1% of the E4M3
    roundings of a float16 export land on the other side. PER_TOKEN, None and float32 pass through."""
    if not isinstance(scales, dict) or dtype in (None, torch.float32):
        return scales
    return {k: float(graph_scale(v, dtype)) for k, v in scales.items()}


def fake_quantize_activations_(module: torch.nn.Module, prefix: str, scales: dict[str, float], enabled: dict | None = None):
    """Round every quantised activation of `module` through FP8 with its calibrated scale (hooks).
    enabled: {"on": bool}, read at every call: off, the activations pass unrounded (the float model a
    tolerance compares the rounding's own effect against, validate/tolerances.py)."""
    for name, sub in activation_points(module, prefix):
        if scales == PER_TOKEN:
            rounding = fake_quantize_activation_per_token
        else:
            rounding = lambda x, s=torch.tensor(scales[name]): fake_quantize_activation(x, s)  # noqa: E731
        quant = rounding if enabled is None else (lambda x, r=rounding: r(x) if enabled["on"] else x)
        if name.endswith(".experts"):
            sub.expert_input_quant = quant
        else:
            sub.register_forward_pre_hook(lambda m, args, q=quant: (q(args[0]), *args[1:]))
    return module
