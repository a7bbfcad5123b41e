"""model/: the PyTorch reference of Qwen3-Next, its config, checkpoint reader and caches."""

from .cache import AttentionCache, DeltaNetCache, Qwen3NextCache
from .checkpoint import CheckpointReader, dequantize_fp8_blocks, write_checkpoint
from .config import FULL_ATTENTION, LINEAR_ATTENTION, Qwen3NextConfig
from .gated_delta_rule import chunk_gated_delta_rule, gated_delta_rule, recurrent_gated_delta_rule
from .loader import load_layer, load_model, random_layer, random_model, resolve_config, save_model
from .modeling_qwen3_next import Qwen3NextDecoderLayer, Qwen3NextForCausalLM, Qwen3NextModel, Qwen3NextMTP
from .presets import PRESETS, load_preset

__all__ = [
    "AttentionCache", "DeltaNetCache", "Qwen3NextCache", "CheckpointReader", "dequantize_fp8_blocks",
    "write_checkpoint", "FULL_ATTENTION", "LINEAR_ATTENTION", "Qwen3NextConfig", "chunk_gated_delta_rule",
    "gated_delta_rule", "recurrent_gated_delta_rule", "load_layer", "load_model", "random_layer",
    "random_model", "resolve_config", "save_model", "Qwen3NextDecoderLayer", "Qwen3NextForCausalLM",
    "Qwen3NextModel", "Qwen3NextMTP", "PRESETS", "load_preset",
]
