"""The PyTorch reference for any exported graph, as a polygraphy runner.

For a graph of the manifest it rebuilds the same part of the model from the manifest's weight source
and runs the reference code path (reference kernels: chunked/recurrent scan, explicit softmax
attention, HF-style rotary), never the export kernels. Computation is float32; for a 16-bit export
the weights are the 16-bit ones (rounded exactly as the export rounded them), upcast.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata
from polygraphy.datatype import DataType

from qwen3next_trt.model import AttentionCache, DeltaNetCache, Qwen3NextCache
from qwen3next_trt.model.config import LINEAR_ATTENTION
from qwen3next_trt.errors import InputError
from qwen3next_trt.model.fp8 import WeightQuantizer, fake_quantize_, fake_quantize_activations_, kv_quantizer
from qwen3next_trt.model.loader import RANDOM_INIT_VERSION, WeightSource, layer_prefix
from qwen3next_trt.model.modeling_qwen3_next import Qwen3NextRotaryEmbedding

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def weight_quantizer(manifest: dict, source: WeightSource) -> WeightQuantizer | None:
    precision = manifest.get("weights_precision", {})
    if precision.get("format") != "float8e4m3fn":
        return None
    scheme = precision["scheme"] if precision["scheme"] in ("block", "channel") else "block"
    return WeightQuantizer(scheme, source.reader)


def weight_source(manifest: dict, model: str | None = None) -> WeightSource:
    """The weights the export used: `model` overrides the manifest's source (e.g. a moved checkpoint)."""
    src = manifest["source"]
    if model is None and src["kind"] == "random" and src.get("init_version") != RANDOM_INIT_VERSION:
        raise InputError(f"this export's random weights (preset {src['preset']}, init version {src.get('init_version')}) "
                         f"were drawn by another version of the generator (now {RANDOM_INIT_VERSION}): export again")
    if model is None:
        model = src["preset"] if src["kind"] == "random" else src["path"]
    return WeightSource(model, seed=src.get("seed", 0), dtype=TORCH_DTYPES[manifest["dtype"]])


def kv_scales_for(record: dict, manifest: dict, config) -> dict[str, float]:
    """{state port: scale} of a graph's float8 key/value ports; empty without an FP8 KV cache."""
    kv = manifest.get("kv_cache", {})
    if kv.get("format") != "float8e4m3fn":
        return {}
    out = {}

    def add(tag, prefix):
        for kind in ("key", "value"):
            out[f"{tag}past_{kind}"] = out[f"{tag}present_{kind}"] = kv["scales"][f"{prefix}self_attn.{kind}"]

    if record["kind"] == "full_attention":
        add("", layer_prefix(record["layer"], config))
    elif record["kind"] == "mtp":
        add("", "mtp.layers.0.")
    elif record["kind"] == "model":
        for i, t in enumerate(config.layer_types):
            if t != LINEAR_ATTENTION:
                add(f"layer_{i:02d}.", layer_prefix(i, config))
    return out


def dequantize_kv(bits: np.ndarray, scale: float) -> np.ndarray:
    """float32 values of float8e4m3fn bits (uint8) times the state's scale."""
    return torch.from_numpy(np.ascontiguousarray(bits)).view(torch.float8_e4m3fn).float().numpy() * np.float32(scale)


class ReferencePart:
    """Callable: feed dict (numpy) -> outputs dict (numpy, float32 for floats), for one graph group."""

    def __init__(self, record: dict, source: WeightSource, quantizer: WeightQuantizer | None = None,
                 act_scales: dict | None = None, kv_scales: dict[str, float] | None = None, fake_quantize_kv: bool = True):
        self.record, self.config = record, source.config
        # FP8 KV cache: {state port: scale} (kv_scales_for); float8 inputs are read with these scales,
        # and new keys/values are rounded through E4M3 unless fake_quantize_kv is False (the float model)
        self.kv_scales = kv_scales or {}
        self.fake_quantize_kv = fake_quantize_kv
        kind = record["kind"]
        f32 = torch.float32
        if kind == "embed":
            self.module = source.embedding()
        elif kind in (LINEAR_ATTENTION, "full_attention"):
            self.module = source.layer(record["layer"])
        elif kind == "final":
            self.module = (source.final_norm(), source.lm_head())
        elif kind == "lm_head":
            self.module = source.lm_head()
        elif kind == "mtp":
            self.module = source.mtp()
        elif kind == "model":
            self.module = source.whole_model(with_mtp=False)
        else:
            raise ValueError(f"unknown graph kind {kind!r}")
        mods = self.module if isinstance(self.module, tuple) else (self.module,)
        if quantizer is not None and kind not in ("embed", "final", "lm_head"):  # the float model an FP8 export must reproduce
            prefix = {"mtp": "mtp.", "model": ""}.get(kind, layer_prefix(record["layer"], self.config) if record.get("layer") is not None else "")
            for m in mods:
                fake_quantize_(m, prefix, quantizer)
                if act_scales:
                    fake_quantize_activations_(m, prefix, act_scales)
        for m in mods:
            m.to(f32)
        self.rope = Qwen3NextRotaryEmbedding(self.config)

    @torch.no_grad()
    def __call__(self, feed: dict) -> OrderedDict:
        t = {k: torch.from_numpy(dequantize_kv(v, self.kv_scales[k]) if k in self.kv_scales else np.asarray(v)) for k, v in feed.items()}
        t = {k: v.float() if v.is_floating_point() else v for k, v in t.items()}
        kind, m = self.record["kind"], self.module

        def attention_cache(tag, mask):
            cache = AttentionCache.from_tensors(t[tag + "past_key"], t[tag + "past_value"], mask)
            if tag + "past_key" in self.kv_scales and self.fake_quantize_kv:
                cache.quantize = kv_quantizer(self.kv_scales[tag + "past_key"], self.kv_scales[tag + "past_value"])
            return cache

        if kind == "embed":
            outs = [m(t["input_ids"])]
        elif kind == LINEAR_ATTENTION:
            cache = DeltaNetCache.from_tensors(t["conv_state"], t["recurrent_state"])
            outs = [m(t["hidden"], None, cache), cache.conv_state, cache.recurrent_state]
        elif kind == "full_attention":
            cache = attention_cache("", t["attention_mask"])
            rotate = self.rope.rotation(t["position_ids"], torch.float32)
            outs = [m(t["hidden"], rotate, cache), cache.key, cache.value]
        elif kind == "final":
            norm, head = m
            normed = norm(t["hidden"])
            outs = [head(normed), normed]
        elif kind == "lm_head":
            outs = [m(t["hidden"])]
        elif kind == "mtp":
            cache = attention_cache("", t["attention_mask"])
            rotate = self.rope.rotation(t["position_ids"], torch.float32)
            outs = [m(t["next_embeds"], t["hidden"], rotate, cache), cache.key, cache.value]
        else:  # the stitched model
            cache = Qwen3NextCache(self.config, t["input_ids"].shape[0])
            for i, layer_type in enumerate(self.config.layer_types):
                tag = f"layer_{i:02d}."
                if layer_type == LINEAR_ATTENTION:
                    cache.layers[i].conv_state, cache.layers[i].recurrent_state = t[tag + "conv_state"], t[tag + "recurrent_state"]
                else:
                    cache.layers[i] = attention_cache(tag, t["attention_mask"])
            logits, normed = m(t["input_ids"], cache, position_ids=t["position_ids"], return_hidden=True)
            outs = [logits, normed]
            for layer_cache in cache.layers:
                outs += ([layer_cache.conv_state, layer_cache.recurrent_state] if isinstance(layer_cache, DeltaNetCache)
                         else [layer_cache.key, layer_cache.value])
        names = [o["name"] for o in self.record["outputs"]]
        return OrderedDict((n, np.ascontiguousarray(o.float().numpy())) for n, o in zip(names, outs))


def input_metadata(ports: list[dict]) -> TensorMetadata:
    """polygraphy's view of a graph's inputs (it feeds each runner only the inputs listed here)."""
    meta = TensorMetadata()
    for p in ports:
        dtype = {"int64": np.int64, "float16": np.float16, "bool": np.bool_, "float8e4m3fn": np.uint8}.get(p["dtype"], np.float32)
        meta.add(p["name"], dtype=DataType.from_dtype(np.dtype(dtype)), shape=[d if isinstance(d, int) else None for d in p["shape"]])
    return meta


class ReferenceRunner(BaseRunner):
    """polygraphy runner over a ReferencePart, so its results are RunResults like any backend's."""

    def __init__(self, part: ReferencePart, name: str):
        super().__init__(name=name, prefix="pytorch-reference")
        self.part = part

    def activate_impl(self):
        pass

    def get_input_metadata_impl(self):
        return input_metadata(self.part.record["inputs"])

    def infer_impl(self, feed_dict):
        start = time.time()
        out = self.part(feed_dict)
        self.inference_time = time.time() - start  # polygraphy sums these
        return out

    def deactivate_impl(self):
        pass
