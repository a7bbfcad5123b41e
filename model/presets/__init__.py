"""Named model configurations shipped with the package (`--model tiny`, `--model qwen3-next-80b-a3b`)."""

from __future__ import annotations

from pathlib import Path

from qwen3next_trt.errors import InputError

_HERE = Path(__file__).parent

# name -> (config file, MTP layers). The 80B file is the official config.json byte for byte; that
# config is silent about MTP although the official checkpoint carries one MTP layer (`mtp.*`).
PRESETS = {
    "tiny": ("tiny.json", 1),
    "qwen3-next-80b-a3b": ("qwen3-next-80b-a3b.json", 1),
}


def preset_path(name: str) -> Path:
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}: expected one of {', '.join(PRESETS)} or a checkpoint directory")
    return _HERE / PRESETS[name][0]


def load_preset(name: str):
    from ..config import Qwen3NextConfig

    cfg = Qwen3NextConfig.from_file(preset_path(name))
    cfg.source = f"preset {name}"
    if not cfg.num_mtp_layers:
        cfg.num_mtp_layers = PRESETS[name][1]
    return cfg
