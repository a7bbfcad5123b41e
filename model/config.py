"""Qwen3-Next configuration: read from a Hugging Face `config.json` (model_type `qwen3_next`).

Field names are the checkpoint's. Defaults are those of transformers' `Qwen3NextConfig`, so a
config that transformers accepts means the same thing here; the fields that define tensor shapes
have no safe default and must be present.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen3next_trt.errors import InputError

LINEAR_ATTENTION = "linear_attention"
FULL_ATTENTION = "full_attention"

# Fields without which the tensor shapes are unknown: a missing one is an error, never a guess.
REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "linear_num_key_heads",
    "linear_num_value_heads",
    "linear_key_head_dim",
    "linear_value_head_dim",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
)

ROPE_TYPES = ("default", "linear", "yarn")


@dataclass
class RopeConfig:
    rope_type: str = "default"
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass
class Qwen3NextConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    head_dim: int = 256
    intermediate_size: int = 5632
    shared_expert_intermediate_size: int = 512
    linear_conv_kernel_dim: int = 4
    layer_types: list[str] = field(default_factory=list)
    mlp_only_layers: list[int] = field(default_factory=list)
    decoder_sparse_step: int = 1
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    attention_bias: bool = False
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    rope: RopeConfig = field(default_factory=RopeConfig)
    # Multi-token prediction layers (the official checkpoints carry one under `mtp.*`).
    num_mtp_layers: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # The config.json as read, for writing it back out unchanged.
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    source: str = field(default="<dict>", repr=False, compare=False)

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rope.partial_rotary_factor)

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def linear_conv_dim(self) -> int:
        return 2 * self.linear_key_dim + self.linear_value_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            layer_idx not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    @property
    def full_attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == FULL_ATTENTION]

    @property
    def linear_attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == LINEAR_ATTENTION]

    # ---- reading -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> "Qwen3NextConfig":
        def bad(fieldname: str, expected: str) -> InputError:
            return InputError(f"{source}: field '{fieldname}': expected {expected}, got {d.get(fieldname)!r}")

        if d.get("model_type") != "qwen3_next":
            if "model_type" not in d:
                raise InputError(f"{source}: field 'model_type' is missing: expected 'qwen3_next'")
            raise bad("model_type", "'qwen3_next'")
        missing = [f for f in REQUIRED_FIELDS if f not in d]
        if missing:
            raise InputError(f"{source}: missing config field(s) {', '.join(missing)}")

        def get_int(name: str, default: int | None = None, minimum: int = 1) -> int:
            v = d.get(name, default)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise bad(name, f"an integer >= {minimum}")
            return v

        def get_float(name: str, default: float) -> float:
            v = d.get(name, default)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise bad(name, "a positive number")
            return float(v)

        def get_bool(name: str, default: bool) -> bool:
            v = d.get(name, default)
            if not isinstance(v, bool):
                raise bad(name, "true or false")
            return v

        # num_experts 0 is a dense model (every layer a plain MLP), as in transformers
        ints = {name: get_int(name, minimum=0 if name == "num_experts" else 1) for name in REQUIRED_FIELDS}
        n_layers = ints["num_hidden_layers"]

        layer_types = d.get("layer_types")
        if layer_types is None:
            interval = get_int("full_attention_interval", 4)
            layer_types = [
                LINEAR_ATTENTION if (i + 1) % interval else FULL_ATTENTION for i in range(n_layers)
            ]
        if (
            not isinstance(layer_types, list)
            or len(layer_types) != n_layers
            or any(t not in (LINEAR_ATTENTION, FULL_ATTENTION) for t in layer_types)
        ):
            raise bad("layer_types", f"a list of {n_layers} entries, each 'linear_attention' or 'full_attention'")

        mlp_only = d.get("mlp_only_layers") or []
        if not isinstance(mlp_only, list) or any(not isinstance(i, int) for i in mlp_only):
            raise bad("mlp_only_layers", "a list of layer indices")

        hidden_act = d.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise bad("hidden_act", "'silu' (the only activation Qwen3-Next uses)")

        cfg = cls(
            **ints,
            head_dim=get_int("head_dim", 256),
            intermediate_size=get_int("intermediate_size", 5632),
            shared_expert_intermediate_size=get_int("shared_expert_intermediate_size", 512, minimum=0),
            linear_conv_kernel_dim=get_int("linear_conv_kernel_dim", 4),
            layer_types=list(layer_types),
            mlp_only_layers=list(mlp_only),
            decoder_sparse_step=get_int("decoder_sparse_step", 1),
            norm_topk_prob=get_bool("norm_topk_prob", True),
            rms_norm_eps=get_float("rms_norm_eps", 1e-6),
            hidden_act=hidden_act,
            attention_bias=get_bool("attention_bias", False),
            max_position_embeddings=get_int("max_position_embeddings", 32768),
            tie_word_embeddings=get_bool("tie_word_embeddings", False),
            rope=_read_rope(d, source, bad),
            num_mtp_layers=_read_mtp_layers(d, source),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            raw=dict(d),
            source=source,
        )
        cfg._check_consistency(bad)
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "Qwen3NextConfig":
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: config file not found")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise InputError(f"{path}: expected a JSON object")
        return cls.from_dict(d, source=str(path))

    def _check_consistency(self, bad) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad("num_key_value_heads", f"a divisor of num_attention_heads={self.num_attention_heads}")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise bad("linear_num_key_heads", f"a divisor of linear_num_value_heads={self.linear_num_value_heads}")
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise bad("num_experts_per_tok", f"between 1 and num_experts={self.num_experts}")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise InputError(
                f"{self.source}: partial_rotary_factor={self.rope.partial_rotary_factor} with "
                f"head_dim={self.head_dim} gives rotary dim {self.rotary_dim}: expected an even number in 2..head_dim"
            )

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json to write beside a checkpoint (the one read, when there was one)."""
        if self.raw:
            return dict(self.raw)
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("rope", "raw", "source", "num_mtp_layers")}
        rope = {k: v for k, v in dataclasses.asdict(self.rope).items() if v is not None}
        if rope.get("truncate", True):
            rope.pop("truncate", None)
        d.update(model_type="qwen3_next", architectures=["Qwen3NextForCausalLM"], rope_parameters=rope)
        if self.num_mtp_layers:
            d["num_nextn_predict_layers"] = self.num_mtp_layers
        return d


def _read_rope(d: dict[str, Any], source: str, bad) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters`; older configs keep rope_theta/partial_rotary_factor
    # at top level with an optional `rope_scaling` dict. Both mean the same.
    key = "rope_parameters" if d.get("rope_parameters") is not None else "rope_scaling"
    params = d.get(key) or {}
    if not isinstance(params, dict):
        raise bad(key, "an object or null")
    params = dict(params)
    params.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    params.setdefault("partial_rotary_factor", d.get("partial_rotary_factor", 0.25))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in ROPE_TYPES:
        raise InputError(f"{source}: field '{key}.rope_type': expected one of {ROPE_TYPES}, got {rope_type!r}")
    fields = {f.name: f for f in dataclasses.fields(RopeConfig)}
    values = {}
    for name, v in params.items():
        if name not in fields or v is None:
            continue
        if name == "truncate":
            if not isinstance(v, bool):
                raise InputError(f"{source}: field '{key}.truncate': expected true or false, got {v!r}")
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise InputError(f"{source}: field '{key}.{name}': expected a positive number, got {v!r}")
        values[name] = v
    rope = RopeConfig(rope_type=rope_type, **values)
    if rope_type == "linear" and rope.factor is None:
        raise InputError(f"{source}: field '{key}.factor' is required for rope_type 'linear'")
    if rope_type == "yarn":
        if rope.original_max_position_embeddings is None:
            rope.original_max_position_embeddings = d.get("original_max_position_embeddings", d.get("max_position_embeddings", 32768))
        if rope.factor is None:
            rope.factor = d.get("max_position_embeddings", 32768) / rope.original_max_position_embeddings
    return rope


def _read_mtp_layers(d: dict[str, Any], source: str) -> int:
    # The official config has no MTP field although its checkpoint carries `mtp.*`; loaders set the
    # count from the checkpoint's tensors when the config is silent (see checkpoint.py).
    for name in ("num_nextn_predict_layers", "mtp_num_hidden_layers"):
        if name in d:
            v = d[name]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InputError(f"{source}: field '{name}': expected an integer >= 0, got {v!r}")
            return v
    return 0
