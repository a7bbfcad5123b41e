"""Materialise the reference model (whole, or one layer at a time) from a checkpoint or a seed.

Modules are built on the meta device (no memory, no init cost) and then receive every parameter
from the checkpoint, checked for presence, shape and dtype; so a model is never half random.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from pathlib import Path

import torch
from torch import nn

from qwen3next_trt.errors import InputError

from .checkpoint import INDEX_FILE, CheckpointReader, write_checkpoint
from .config import Qwen3NextConfig
from .modeling_qwen3_next import (
    Qwen3NextDecoderLayer,
    Qwen3NextForCausalLM,
    Qwen3NextMTP,
    Qwen3NextRMSNorm,
    Qwen3NextRotaryEmbedding,
)
from .presets import PRESETS, load_preset


def resolve_config(model: str) -> Qwen3NextConfig:
    """A preset name or a checkpoint directory (its config.json) -> config."""
    if model in PRESETS:
        return load_preset(model)
    path = Path(model)
    if not path.exists():
        raise InputError(f"{model}: not a preset ({', '.join(PRESETS)}) and no such directory")
    if path.is_dir() and not any(path.glob("*.safetensors")) and not (path / INDEX_FILE).exists():
        # a config.json alone (what `random-checkpoint` and `info` need): no weights to map
        return Qwen3NextConfig.from_file(path / "config.json")
    return CheckpointReader(path).config


def _empty(build, dtype, device="cpu"):
    with torch.device("meta"):
        module = build()
    return module.to_empty(device=device).to(dtype)


def layer_prefix(layer_idx: int, config: Qwen3NextConfig) -> str:
    if layer_idx < config.num_hidden_layers:
        return f"model.layers.{layer_idx}."
    return f"mtp.layers.{layer_idx - config.num_hidden_layers}."


def load_parameters(module: nn.Module, reader: CheckpointReader, prefix: str):
    """Copy every parameter of `module` from tensors named prefix + parameter name."""
    for name, param in module.named_parameters():
        full = prefix + name
        tensor = reader.get(full)
        if tuple(tensor.shape) != tuple(param.shape):
            raise InputError(
                f"{reader.file_of(full)}: tensor '{full}' has shape {tuple(tensor.shape)}: expected {tuple(param.shape)}"
            )
        with torch.no_grad():
            param.copy_(tensor.to(param.dtype))


def _empty_layer(cfg: Qwen3NextConfig, layer_idx: int, dtype, device="cpu") -> Qwen3NextDecoderLayer:
    # MTP layers continue the numbering past layer_types; they are full-attention MoE layers (as in Qwen3NextMTP).
    if layer_idx < cfg.num_hidden_layers:
        return _empty(lambda: Qwen3NextDecoderLayer(cfg, layer_idx), dtype, device)
    return _empty(lambda: Qwen3NextDecoderLayer(cfg, layer_idx, layer_type="full_attention", moe=cfg.num_experts > 0), dtype, device)


def load_layer(reader: CheckpointReader, layer_idx: int, dtype=torch.float32) -> Qwen3NextDecoderLayer:
    """One decoder layer (MTP layers continue the numbering), reading only that layer's tensors."""
    layer = _empty_layer(reader.config, layer_idx, dtype)
    load_parameters(layer, reader, layer_prefix(layer_idx, reader.config))
    return layer


def _finish(model: Qwen3NextForCausalLM):
    # Buffers are not in checkpoints: recompute them on the real device, and restore weight tying.
    cfg = model.config
    model.model.rotary_emb = Qwen3NextRotaryEmbedding(cfg).to(model.lm_head.weight.device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def load_model(path: str | Path, dtype=torch.float32, with_mtp: bool = True) -> Qwen3NextForCausalLM:
    reader = CheckpointReader(path)
    cfg = reader.config
    if not with_mtp:
        cfg.num_mtp_layers = 0
    model = _empty(lambda: Qwen3NextForCausalLM(cfg), dtype)
    _finish(model)
    load_parameters(model.model.embed_tokens, reader, "model.embed_tokens.")
    for i, layer in enumerate(model.model.layers):
        load_parameters(layer, reader, layer_prefix(i, cfg))
    load_parameters(model.model.norm, reader, "model.norm.")
    if not cfg.tie_word_embeddings:
        load_parameters(model.lm_head, reader, "lm_head.")
    if model.mtp is not None:
        load_parameters(model.mtp, reader, "mtp.")
    return model


# ------------------------------------------------------------------------------------------------
# Seeded random weights: each tensor drawn from a generator seeded by (seed, its name), so one layer
# materialised alone equals the same layer of the whole model. RANDOM_INIT_VERSION changes whenever
# the draw changes: exports record it, and validating an export made with another draw is refused.

RANDOM_INIT_VERSION = 2


def random_tensor(name: str, shape, seed: int, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """The seeded draw of one tensor. On the CPU in float32 (the defaults) this is the reference
    stream of RANDOM_INIT_VERSION; on a GPU the same recipe gives other numbers (another generator),
    which is why a source drawn there says so in its identity (WeightSource.describe)."""
    g = torch.Generator(device=device).manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) % 2**63)
    like = {"device": device, "dtype": dtype}
    randn = lambda: torch.randn(shape, generator=g, **like)  # noqa: E731
    leaf = name.rsplit(".", 2)
    if name.endswith("A_log"):
        # Decay rates spread log-uniformly from long memory (A = 0.01: a state survives hundreds of
        # tokens) to short (A = 16), so state precision matters as it does in trained models.
        return torch.empty(shape, **like).uniform_(math.log(0.01), math.log(16.0), generator=g)
    if name.endswith("dt_bias"):
        return 1.0 + 0.5 * randn()
    if name.endswith("linear_attn.norm.weight"):  # gated norm: plain weight around 1
        return 1.0 + 0.1 * randn()
    if "norm" in leaf[-2] or leaf[-2].endswith("layernorm"):  # zero-centred norms: offsets from 1
        return 0.1 * randn()
    if name.endswith("conv1d.weight"):
        return randn() / shape[-1] ** 0.5
    if name.endswith("embed_tokens.weight"):  # also the LM head when tied: keeps logits O(1)-O(10)
        return 0.35 * randn()
    if name.endswith("bias"):
        return 0.02 * randn()
    std = shape[-1] ** -0.5  # linear [out, in]: unit gain
    if name.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight")):
        # Residual branches write back at a quarter gain. With unit gain a random model is chaotic:
        # float32 rounding grows to ~1e-3 at the logits (measured against a float64 run), which
        # would drown the 1e-4 parity thresholds; at 1/4 it stays ~5e-5.
        std /= 4
    return std * randn()


def randomize_(module: nn.Module, prefix: str, seed: int, on_device: bool = False):
    """Fill every parameter with its seeded draw. `on_device`: draw where the parameter lives, in its
    dtype (a GPU fills an 80B layer in well under a second; the CPU stream takes ~40 s per layer on
    two cores), giving other numbers than the CPU stream."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if on_device:
                p.copy_(random_tensor(prefix + name, p.shape, seed, p.device, p.dtype))
            else:
                p.copy_(random_tensor(prefix + name, p.shape, seed).to(p.dtype))
    return module


def random_model(config: Qwen3NextConfig, seed: int = 0, dtype=torch.float32) -> Qwen3NextForCausalLM:
    model = _empty(lambda: Qwen3NextForCausalLM(config), dtype)
    _finish(model)
    return randomize_(model, "", seed)


def random_layer(config: Qwen3NextConfig, layer_idx: int, seed: int = 0, dtype=torch.float32) -> Qwen3NextDecoderLayer:
    return randomize_(_empty_layer(config, layer_idx, dtype), layer_prefix(layer_idx, config), seed)


def model_tensors(model: Qwen3NextForCausalLM) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: the state dict without buffers and without a tied lm_head."""
    sd = {k: v for k, v in model.state_dict().items() if "rotary_emb" not in k}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def save_model(model: Qwen3NextForCausalLM, out_dir: str | Path, max_shard_bytes: int = 2**30) -> Path:
    config = model.config.to_hf_dict()
    config.setdefault("num_nextn_predict_layers", model.config.num_mtp_layers)
    config["torch_dtype"] = str(model.lm_head.weight.dtype).removeprefix("torch.")
    return write_checkpoint(model_tensors(model), config, out_dir, max_shard_bytes)


# ------------------------------------------------------------------------------------------------
# One place to get modules from, whatever the weights' origin; the exporter and the validator use it
# so that both see the same weights, part by part.


class WeightSource:
    """Modules of a model, materialised one part at a time: from a checkpoint directory, or for a
    preset from seeded random weights (each tensor drawn from (seed, its name))."""

    def __init__(self, model: str, seed: int = 0, dtype=torch.float32, device="cpu", draw: str = "cpu"):
        """`device`: where modules are materialised; `draw` ('cpu' or 'device'): where a preset's random
        weights are drawn ('cpu': the reference stream, copied to `device`; 'device': drawn there, faster
        on a GPU, but other weights than an export of the same preset and seed)."""
        self.model, self.seed, self.dtype = model, seed, dtype
        self.device = torch.device(device)
        if draw not in ("cpu", "device"):
            raise ValueError(f"draw {draw!r}: expected 'cpu' or 'device'")
        self.draw_on_device = draw == "device" and self.device.type != "cpu"
        if model in PRESETS:
            self.reader = None
            self.config = load_preset(model)
        else:
            self.reader = CheckpointReader(model)
            self.config = self.reader.config

    def describe(self) -> dict:
        if self.reader is None:
            d = {"kind": "random", "preset": self.model, "seed": self.seed, "init_version": RANDOM_INIT_VERSION}
            if self.draw_on_device:
                d["drawn_on"] = self.device.type  # another stream than the CPU's: other weights
            return d
        return {"kind": "checkpoint", "path": str(Path(self.model).resolve()), "fingerprint": self.reader.fingerprint()}

    def _fill(self, module: nn.Module, prefix: str) -> nn.Module:
        if self.reader is None:
            randomize_(module, prefix, self.seed, on_device=self.draw_on_device)
        else:
            load_parameters(module, self.reader, prefix)
        return module.eval()

    def layer(self, layer_idx: int) -> Qwen3NextDecoderLayer:
        """Decoder layer `layer_idx`; MTP layers continue the numbering."""
        return self._fill(_empty_layer(self.config, layer_idx, self.dtype, self.device), layer_prefix(layer_idx, self.config))

    def embedding(self) -> nn.Embedding:
        cfg = self.config
        return self._fill(_empty(lambda: nn.Embedding(cfg.vocab_size, cfg.hidden_size), self.dtype, self.device), "model.embed_tokens.")

    def final_norm(self) -> nn.Module:
        cfg = self.config
        return self._fill(_empty(lambda: Qwen3NextRMSNorm(cfg.hidden_size, cfg.rms_norm_eps), self.dtype, self.device), "model.norm.")

    def lm_head(self) -> nn.Linear:
        cfg = self.config
        head = _empty(lambda: nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False), self.dtype, self.device)
        if cfg.tie_word_embeddings:
            with torch.no_grad():
                head.weight.copy_(self.embedding().weight)
            return head.eval()
        return self._fill(head, "lm_head.")

    def mtp(self) -> Qwen3NextMTP:
        cfg = self.config
        return self._fill(_empty(lambda: Qwen3NextMTP(cfg), self.dtype, self.device), "mtp.")

    def whole_model(self, with_mtp: bool = True) -> Qwen3NextForCausalLM:
        if self.reader is not None:
            return load_model(self.model, self.dtype, with_mtp=with_mtp)
        cfg = self.config
        if not with_mtp:
            cfg = dataclasses.replace(cfg, num_mtp_layers=0)
        return random_model(cfg, self.seed, self.dtype)
