"""Config reading, presets, RoPE variants, and `info` numbers, against transformers where it has them."""

import json
import re
from pathlib import Path

import pytest
import torch

from qwen3next_trt.cli import main
from qwen3next_trt.model import Qwen3NextConfig, load_preset
from qwen3next_trt.model.modeling_qwen3_next import rope_inverse_frequencies
from qwen3next_trt.model.presets import preset_path
from qwen3next_trt.model.stats import model_stats

transformers = pytest.importorskip("transformers")

SHARED_REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "qwen3-next-80b-a3b-instruct.config.json"


def hf_config(d):
    return transformers.Qwen3NextConfig(**{k: v for k, v in d.items() if k not in ("model_type", "architectures", "num_nextn_predict_layers")})


@pytest.mark.skipif(not SHARED_REFERENCE.exists(), reason="../shared/reference not beside this checkout")
def test_80b_preset_is_the_official_config():
    assert preset_path("qwen3-next-80b-a3b").read_bytes() == SHARED_REFERENCE.read_bytes()


def test_80b_layer_plan_and_sizes():
    cfg = load_preset("qwen3-next-80b-a3b")
    assert len(cfg.linear_attention_layers) == 36 and cfg.full_attention_layers == list(range(3, 48, 4))
    st = model_stats(cfg)
    assert 79e9 < st.main.total < 81e9
    assert 2.8e9 < st.main.active - st.embeddings < 3.5e9  # "A3B": active parameters without embeddings
    assert 70 * 2**30 < st.main.fp8_bytes < 80 * 2**30


def test_info_cli_80b(capsys):
    assert main(["info", "--model", "qwen3-next-80b-a3b"]) == 0
    out = capsys.readouterr().out
    assert "layers: 48 (36 linear attention / Gated DeltaNet, 12 full attention)" in out
    total, active = re.search(r"main model\s+([\d.]+) B\s+([\d.]+) B", out).groups()
    assert 79 < float(total) < 81 and 3 < float(active) < 4


@pytest.mark.parametrize("preset", ["tiny"])
def test_parameter_count_equals_transformers(preset):
    cfg = load_preset(preset)
    hf = transformers.Qwen3NextForCausalLM(hf_config(cfg.raw))
    assert model_stats(cfg).main.total == sum(p.numel() for p in hf.parameters())


def test_tiny_preset_has_the_structure_of_the_real_model():
    cfg = load_preset("tiny")
    assert cfg.num_hidden_layers >= 8 and cfg.full_attention_layers == [3, 7]
    assert cfg.linear_num_value_heads == 2 * cfg.linear_num_key_heads
    assert cfg.num_experts >= 16 and cfg.num_experts_per_tok >= 2 and cfg.shared_expert_intermediate_size > 0
    assert cfg.rotary_dim == cfg.head_dim // 4 and cfg.num_mtp_layers == 1


def test_layer_types_from_interval_and_explicit_list():
    base = json.loads(preset_path("tiny").read_text())
    explicit = dict(base, layer_types=["full_attention"] + ["linear_attention"] * 7)
    explicit.pop("full_attention_interval")
    assert Qwen3NextConfig.from_dict(explicit).full_attention_layers == [0]
    assert Qwen3NextConfig.from_dict(dict(base, full_attention_interval=2)).full_attention_layers == [1, 3, 5, 7]


ROPES = {
    "default": {"rope_theta": 1e7, "partial_rotary_factor": 0.25},
    "linear": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "rope_theta": 5e4},
    "yarn": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}},
    "yarn-new-style": {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "partial_rotary_factor": 0.5,
                                           "factor": 8.0, "original_max_position_embeddings": 512,
                                           "beta_fast": 16, "beta_slow": 2}},
}


@pytest.mark.parametrize("name", sorted(ROPES))
def test_rope_frequencies_match_transformers(name):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    d = dict(json.loads(preset_path("tiny").read_text()), **ROPES[name])
    ours, ours_scale = rope_inverse_frequencies(Qwen3NextConfig.from_dict(dict(d)))
    hc = hf_config(d)
    kind = hc.rope_parameters["rope_type"]
    if kind == "default":
        theirs, scale = transformers.models.qwen3_next.modeling_qwen3_next.Qwen3NextRotaryEmbedding.compute_default_rope_parameters(hc)
    else:
        theirs, scale = ROPE_INIT_FUNCTIONS[kind](hc)
    assert torch.allclose(ours, theirs.float(), rtol=1e-6, atol=0) and ours_scale == pytest.approx(scale)
