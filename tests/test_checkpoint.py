"""Checkpoint reading: transformers' own checkpoints, FP8 block-quantised ones, layer streaming, MTP.

transformers is the oracle for names and layouts: a checkpoint it writes must load into our model
tensor for tensor, bit for bit. FP8 checkpoints are quantised here by hand (not by project code) the
way the official Qwen3-Next FP8 release is: float8_e4m3fn weights with one float32 scale per 128x128
block.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from qwen3next_trt.model import CheckpointReader, dequantize_fp8_blocks, load_layer, load_model, load_preset
from qwen3next_trt.model.loader import model_tensors, random_layer, random_model, save_model

INDEX = "model.safetensors.index.json"


def assert_same_tensors(ours: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]):
    assert sorted(ours) == sorted(expected)
    for name, t in expected.items():
        assert ours[name].dtype == t.dtype and torch.equal(ours[name], t), name


# ------------------------------------------------------------------------------------------------
# Round trip from transformers


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """(directory, transformers model): a small sharded checkpoint written by transformers itself."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3NextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        max_position_embeddings=256,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = transformers.Qwen3NextForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        # transformers initialises norms to constants and A_log / dt_bias to fixed patterns: draw
        # everything anew so that a swapped or skipped tensor cannot go unnoticed.
        for name, p in hf.named_parameters():
            scale = p.shape[-1] ** -0.5 if p.dim() >= 2 else 0.3
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if name.endswith("linear_attn.norm.weight") else 0.0))
    path = tmp_path_factory.mktemp("hf") / "ckpt"
    hf.save_pretrained(path, max_shard_size="200KB")
    return path, hf


def hf_equivalent(name: str, hf_sd: dict[str, torch.Tensor], inter: int) -> tuple[str, torch.Tensor]:
    """(transformers' name, tensor) for our tensor `name`; transformers fuses each layer's experts."""
    if ".mlp.experts." not in name:
        return name, hf_sd[name]
    prefix, rest = name.split(".mlp.experts.")
    e, proj = rest.split(".")[:2]
    if proj == "down_proj":
        fused = f"{prefix}.mlp.experts.down_proj"  # [E, H, I]
        return fused, hf_sd[fused][int(e)]
    fused = f"{prefix}.mlp.experts.gate_up_proj"  # [E, 2I, H]: gate rows, then up rows
    rows = slice(0, inter) if proj == "gate_proj" else slice(inter, 2 * inter)
    return fused, hf_sd[fused][int(e), rows]


def test_transformers_checkpoint_loads_bit_exact(hf_checkpoint):
    path, hf = hf_checkpoint
    assert (path / INDEX).exists() and len(list(path.glob("*.safetensors"))) > 2, "meant to be sharded"
    ours = load_model(path)
    assert ours.mtp is None  # transformers writes no MTP weights
    hf_sd = {k: v for k, v in hf.state_dict().items() if "rotary_emb" not in k}
    cfg = ours.config
    covered = set()
    for name, t in model_tensors(ours).items():
        hf_name, ref = hf_equivalent(name, hf_sd, cfg.moe_intermediate_size)
        assert t.dtype == ref.dtype and torch.equal(t, ref), name
        covered.add(hf_name)
    assert covered == set(hf_sd), "every transformers tensor has a counterpart in our model"

    ids = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(input_ids=ids, use_cache=False).logits
        err = (ours(ids) - ref).abs().max().item()
    assert err <= 1e-4, f"logits differ by {err:.3g} (|logits| up to {ref.abs().max().item():.3g})"


# ------------------------------------------------------------------------------------------------
# FP8 block-quantised checkpoints
#
# Error bound. Per element, with s the block's stored scale and x = fl(w / s) (|x| <= 448):
#   e4m3 has 3 mantissa bits, so round-to-nearest moves a normal x (|x| >= 2**-6) by at most half an
#   ulp, 2**-4 * |x|; a subnormal one by at most half the subnormal step 2**-9, i.e. 2**-10.
#   The float32 division and the product q * s add relative errors of 2**-24 each.
# So |w - q * s| <= 2**-4 * |w| + 2**-10 * s + (a few) * 2**-24 * |w| <= BOUND_REL * |w| + BOUND_SUB * s.
# (The subnormal term is what a rough "scale * 2**-9" over-covers by a factor of 2.)
BOUND_REL = 2**-4 + 2**-20
BOUND_SUB = 2**-10
BLOCK = 128
# Modules the official FP8 release keeps in BF16 (names end with these, or are these).
KEPT_BF16 = ("mlp.gate", "shared_expert_gate", "in_proj_ba", "conv1d", "lm_head", "model.embed_tokens", "mtp.fc")


def is_quantised(name: str, t: torch.Tensor) -> bool:
    module = name.removesuffix(".weight")
    return name.endswith(".weight") and t.dim() == 2 and not any(module.endswith(k) for k in KEPT_BF16)


def quantise_fp8(w: torch.Tensor, block=(BLOCK, BLOCK)) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.float()
    rows, cols = math.ceil(w.shape[0] / block[0]), math.ceil(w.shape[1] / block[1])
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    scale = torch.empty(rows, cols, dtype=torch.float32)
    for i in range(rows):
        for j in range(cols):
            r, c = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            scale[i, j] = w[r, c].abs().max() / 448.0
            q[r, c] = (w[r, c] / scale[i, j]).to(torch.float8_e4m3fn)
    return q, scale


def expand_scale(scale: torch.Tensor, shape, block=(BLOCK, BLOCK)) -> torch.Tensor:
    return scale[torch.arange(shape[0]) // block[0]][:, torch.arange(shape[1]) // block[1]]


def assert_within_fp8_rounding(deq: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, block=(BLOCK, BLOCK)):
    w = w.float()
    bound = BOUND_REL * w.abs() + BOUND_SUB * expand_scale(scale, w.shape, block)
    ratio = ((deq - w).abs() / bound).max().item()
    assert ratio <= 1.0, f"error {ratio:.3f} x the FP8 rounding bound"
    return ratio


@pytest.mark.parametrize("block", [(128, 128), (32, 64)])
def test_dequantize_partial_blocks(block):
    # 200 x 300 leaves partial blocks in both directions for both block sizes.
    g = torch.Generator().manual_seed(3)
    w = torch.randn(200, 300, generator=g) * torch.logspace(-3, 1, 300)  # spread of magnitudes: subnormals too
    q, scale = quantise_fp8(w, block)
    assert scale.shape == (math.ceil(200 / block[0]), math.ceil(300 / block[1]))
    deq = dequantize_fp8_blocks(q, scale, block)
    assert deq.dtype == torch.float32 and torch.equal(deq, q.float() * expand_scale(scale, w.shape, block))
    ratio = assert_within_fp8_rounding(deq, w, scale, block)
    assert ratio > 0.5, "the bound is meant to be tight"


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    """(directory, BF16 source tensors, {name: (fp8, scale)}) for the tiny preset, MTP included."""
    cfg = load_preset("tiny")
    source = model_tensors(random_model(cfg, seed=5, dtype=torch.bfloat16))
    tensors, quantised = {}, {}
    for name, t in source.items():
        if is_quantised(name, t):
            q, s = quantise_fp8(t)
            tensors[name], tensors[name + "_scale_inv"] = q, s
            quantised[name] = (q, s)
        else:
            tensors[name] = t
    assert any(t.shape[0] % BLOCK or t.shape[1] % BLOCK for t, _ in quantised.values()), "partial blocks wanted"
    config = cfg.to_hf_dict()
    config["torch_dtype"] = "bfloat16"
    config["quantization_config"] = {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK],
        "modules_to_not_convert": sorted(n.removesuffix(".weight") for n, t in source.items() if t.dim() >= 2 and n not in quantised),
    }
    # Two shards by hand, splitting some weights from their scales.
    path = tmp_path_factory.mktemp("fp8") / "ckpt"
    path.mkdir()
    names = list(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2 + 1], "model-00002-of-00002.safetensors": names[len(names) // 2 + 1 :]}
    for fname, part in halves.items():
        save_file({n: tensors[n].contiguous() for n in part}, str(path / fname), metadata={"format": "pt"})
    (path / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {n: f for f, part in halves.items() for n in part}}))
    (path / "config.json").write_text(json.dumps(config))
    return path, source, quantised


def test_fp8_checkpoint_loads_within_rounding(fp8_checkpoint):
    path, source, quantised = fp8_checkpoint
    model = load_model(path)
    loaded = model_tensors(model)
    assert sorted(loaded) == sorted(source)
    worst = 0.0
    for name, w in source.items():
        if name in quantised:
            q, s = quantised[name]
            assert torch.equal(loaded[name], q.float() * expand_scale(s, q.shape)), name
            worst = max(worst, assert_within_fp8_rounding(loaded[name], w, s))
        else:
            assert torch.equal(loaded[name], w.float()), name
    assert worst > 0.5
    assert {n.split(".")[-2] for n in quantised} >= {"in_proj_qkvz", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj",
                                                     "gate_proj", "up_proj", "down_proj"}
    assert any(n.startswith("mtp.") for n in quantised)


def test_fp8_get_fp8_returns_stored_bytes(fp8_checkpoint):
    path, _, quantised = fp8_checkpoint
    reader = CheckpointReader(path)
    assert reader.block_size == (BLOCK, BLOCK)
    for name, (q, s) in quantised.items():
        assert reader.is_fp8(name)
        w8, scale = reader.get_fp8(name)
        assert w8.dtype == torch.float8_e4m3fn and torch.equal(w8.view(torch.uint8), q.view(torch.uint8)), name
        assert scale.dtype == torch.float32 and torch.equal(scale, s), name
    assert not reader.is_fp8("model.layers.0.mlp.gate.weight")
    assert reader.get("model.layers.0.mlp.gate.weight").dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------
# Streaming one layer at a time


def record_reads(monkeypatch) -> tuple[list[str], list]:
    names, files = [], []
    raw, open_ = CheckpointReader.raw, CheckpointReader._open

    def recording_raw(self, name):
        names.append(name)
        return raw(self, name)

    def recording_open(self, f, *args, **kwargs):
        files.append(f)
        return open_(self, f, *args, **kwargs)

    monkeypatch.setattr(CheckpointReader, "raw", recording_raw)
    monkeypatch.setattr(CheckpointReader, "_open", recording_open)
    return names, files


@pytest.mark.parametrize("which", ["transformers", "fp8"])
def test_load_layer_reads_only_that_layer(which, hf_checkpoint, fp8_checkpoint, monkeypatch):
    path = (hf_checkpoint if which == "transformers" else fp8_checkpoint)[0]
    whole = load_model(path)
    reader = CheckpointReader(path)
    names, files = record_reads(monkeypatch)
    for n in (0, reader.config.num_hidden_layers - 1):
        names.clear()
        files.clear()
        layer = load_layer(reader, n)
        prefix = f"model.layers.{n}."
        assert names and all(name.startswith(prefix) for name in names), [x for x in names if not x.startswith(prefix)]
        assert set(files) <= {reader.file_of(name) for name in names}, "opened a shard holding none of its tensors"
        assert_same_tensors(layer.state_dict(), whole.model.layers[n].state_dict())


def test_random_layer_equals_random_model_layer():
    cfg = load_preset("tiny")
    model = random_model(cfg, seed=7)
    layers = list(model.model.layers) + list(model.mtp.layers)
    for i in (0, 3, cfg.num_hidden_layers - 1, cfg.num_hidden_layers):  # linear, full, last, MTP
        assert_same_tensors(random_layer(cfg, i, seed=7).state_dict(), layers[i].state_dict())
    assert not torch.equal(random_layer(cfg, 0, seed=8).input_layernorm.weight, layers[0].input_layernorm.weight)


# ------------------------------------------------------------------------------------------------
# MTP weights


def test_mtp_weights_round_trip(tmp_path, monkeypatch):
    cfg = load_preset("tiny")
    assert cfg.num_mtp_layers == 1
    model = random_model(cfg, seed=9)
    path = save_model(model, tmp_path / "ckpt", max_shard_bytes=2**21)
    reader = CheckpointReader(path)
    mtp_names = [n for n in reader.names() if n.startswith("mtp.")]
    assert "mtp.fc.weight" in mtp_names and any(n.startswith("mtp.layers.0.mlp.experts.") for n in mtp_names)
    assert set(mtp_names) == {"mtp." + n for n in model.mtp.state_dict()}

    loaded = load_model(path)
    assert_same_tensors(model_tensors(loaded), model_tensors(model))
    assert load_model(path, with_mtp=False).mtp is None

    # Official configs say nothing of MTP: the reader counts the MTP layers from the tensors.
    config = json.loads((path / "config.json").read_text())
    del config["num_nextn_predict_layers"]
    (path / "config.json").write_text(json.dumps(config))
    reader = CheckpointReader(path)
    assert reader.config.num_mtp_layers == 1
    assert_same_tensors(load_model(path).mtp.state_dict(), model.mtp.state_dict())

    names, _ = record_reads(monkeypatch)
    layer = load_layer(reader, cfg.num_hidden_layers)
    assert names and all(n.startswith("mtp.layers.0.") for n in names)
    assert_same_tensors(layer.state_dict(), model.mtp.layers[0].state_dict())
