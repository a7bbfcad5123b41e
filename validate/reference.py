"""The PyTorch reference for any exported graph.

For a graph of the manifest it rebuilds the same part of the model from the manifest's weight source
and runs the reference code path of its kind (export/kinds.py: each kind's `reference_module` and
`reference_outputs`), never the export kernels. Computation is float32; for a 16-bit export the
weights are the 16-bit ones (rounded exactly as the export rounded them), upcast.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from qwen3next_trt.errors import InputError
from qwen3next_trt.export.kinds import KINDS
from qwen3next_trt.export.manifest import GraphRecord, Manifest
from qwen3next_trt.model import AttentionCache
from qwen3next_trt.model.fp8 import WeightQuantizer, fake_quantize_, fake_quantize_activations_, graph_scales, kv_quantizer
from qwen3next_trt.model.loader import RANDOM_INIT_VERSION, WeightSource
from qwen3next_trt.model.modeling_qwen3_next import Qwen3NextRotaryEmbedding, Qwen3NextSparseMoeBlock
from qwen3next_trt.sessions import torch_dtype

from .tolerances import routing_near_ties


def weight_quantizer(manifest: Manifest, source: WeightSource) -> WeightQuantizer | None:
    """The FP8 rounding the export applied to its weights (None for a float export)."""
    weights = manifest.precision.weights
    return WeightQuantizer(weights.quantizer_scheme, source.reader) if weights.fp8 else None


def weight_source(manifest: Manifest, model: str | None = None) -> WeightSource:
    """The weights the export used: `model` overrides the manifest's source (e.g. a moved checkpoint)."""
    src = manifest.source
    if model is None and src.kind == "random" and src.init_version != RANDOM_INIT_VERSION:
        raise InputError(f"this export's random weights (preset {src.preset}, init version {src.init_version}) "
                         f"were drawn by another version of the generator (now {RANDOM_INIT_VERSION}): export again")
    source = WeightSource(model or src.model, seed=src.seed, dtype=torch_dtype(manifest.dtype))
    # the manifest's config must be its source's: an edited one would validate a model that is not the export's
    for key in ("num_hidden_layers", "hidden_size", "vocab_size", "num_experts"):
        have, want = manifest.config.get(key), getattr(source.config, key, None)
        if have != want:
            raise InputError(f"{manifest.path}: config.{key} is {have!r}, its weight source {src.model} has {want!r}: "
                             "the manifest was edited, or --model names another model")
    return source


def dequantize_kv(bits: np.ndarray, scale: float) -> np.ndarray:
    """float32 values of float8e4m3fn bits (uint8) times the state's scale."""
    return torch.from_numpy(np.ascontiguousarray(bits)).view(torch.float8_e4m3fn).float().numpy() * np.float32(scale)


def routing_ties(modules, run, unit_roundoff: float) -> list:
    """Run `run()` with the MoE routers of `modules` watched; per router call (in call order), a boolean
    per token of that call: a routing near-tie (tolerances.routing_near_ties)."""
    blocks = [b for m in modules for b in m.modules() if isinstance(b, Qwen3NextSparseMoeBlock)]
    found = []

    def watch(block):
        def hook(gate, inputs, logits):
            found.append(routing_near_ties(inputs[0].detach(), logits.detach(), gate.weight.detach(), block.top_k, unit_roundoff))
        return block.gate.register_forward_hook(hook)

    handles = [watch(b) for b in blocks]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return found


class ReferenceContext:
    """What a kind's reference needs beside its module: the config, rotary in float32, and attention
    caches over (possibly float8) key/value feeds."""

    def __init__(self, config, kv_scales: dict[str, float], fake_quantize_kv: bool):
        self.config, self.kv_scales, self.fake_quantize_kv = config, kv_scales, fake_quantize_kv
        self.rope = Qwen3NextRotaryEmbedding(config)

    def rotation(self, position_ids):
        return self.rope.rotation(position_ids, torch.float32)

    def attention_cache(self, t: dict, tag: str, mask) -> AttentionCache:
        cache = AttentionCache.from_tensors(t[tag + "past_key"], t[tag + "past_value"], mask)
        if tag + "past_key" in self.kv_scales and self.fake_quantize_kv:
            cache.quantize = kv_quantizer(self.kv_scales[tag + "past_key"], self.kv_scales[tag + "past_value"])
        return cache


class ReferencePart:
    """Callable: feed dict (numpy) -> outputs dict (numpy, float32 for floats), for one graph group."""

    def __init__(self, record: GraphRecord, source: WeightSource, quantizer: WeightQuantizer | None = None,
                 act_scales: dict | None = None, kv_scales: dict[str, float] | None = None, fake_quantize_kv: bool = True,
                 scale_dtype: torch.dtype | None = None):
        self.record, self.config = record, source.config
        # FP8 scales as the graphs hold them: rounded to the export's dtype (model/fp8.py graph_scales)
        act_scales, kv_scales = graph_scales(act_scales, scale_dtype), graph_scales(kv_scales, scale_dtype)
        # FP8 KV cache: {state port: scale} (Manifest.kv_scales); float8 inputs are read with these scales,
        # and new keys/values are rounded through E4M3 unless fake_quantize_kv is False (the float model)
        self.kv_scales = kv_scales or {}
        # FP8 activations: rounded while act_rounding["on"] (tolerances.activation_rounding_effect turns it off)
        self.act_rounding = {"on": True}
        self.kind = KINDS[record.kind]
        self.rounds_activations = bool(act_scales) and quantizer is not None and self.kind.fp8_weights
        self.module = self.kind.reference_module(source, record)
        mods = self.module if isinstance(self.module, tuple) else (self.module,)
        if quantizer is not None and self.kind.fp8_weights:  # the float model an FP8 export must reproduce
            prefix = self.kind.weight_prefix(record, self.config)
            for m in mods:
                fake_quantize_(m, prefix, quantizer)
                if act_scales:
                    fake_quantize_activations_(m, prefix, act_scales, self.act_rounding)
        for m in mods:
            m.to(torch.float32)
        self.context = ReferenceContext(self.config, self.kv_scales, fake_quantize_kv)

    def routing_ties(self, feed: dict, unit_roundoff: float) -> list:
        """Per MoE router of this graph (in call order): which of the feed's tokens (flattened batch x
        sequence) sit at a routing near-tie. Empty for a graph without MoE."""
        mods = self.module if isinstance(self.module, tuple) else (self.module,)
        return routing_ties(mods, lambda: self(feed), unit_roundoff)

    @torch.no_grad()
    def __call__(self, feed: dict) -> OrderedDict:
        t = {k: torch.from_numpy(dequantize_kv(v, self.kv_scales[k]) if k in self.kv_scales else np.asarray(v)) for k, v in feed.items()}
        t = {k: v.float() if v.is_floating_point() else v for k, v in t.items()}
        outs = self.kind.reference_outputs(self.module, t, self.context, self.record)
        return OrderedDict((n, np.ascontiguousarray(o.float().numpy())) for n, o in zip(self.record.output_names, outs))
