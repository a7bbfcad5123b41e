"""Configs the presets do not cover, through the whole pipeline: export, validate, generate.

Parity against transformers (tests/test_parity_hf.py) proves the reference; it says nothing about
the exported graphs. Issue 12 was a checkpoint that passed parity and failed validation
(norm_topk_prob false: ONNX Runtime's MoE kernel lost the routed experts in the exported graph).
So every config here is written as a config.json, made a seeded random checkpoint and exported by
the CLI (`random-checkpoint`, `export`; fp32: embed,
every layer, final; the runtime needs neither the stitched model nor the MTP graphs), validated by
the project's validator (every graph against the PyTorch reference through ONNX Runtime, and
greedy decoding through the per-layer graphs), and decoded greedily by the runtime, token for
token against transformers' own `generate` on the same checkpoint (the independent oracle).

Budget (CI runs this file on 2 cores): tiny configs, 7 graphs each; tracing is single-threaded
CPU work, so the exports run two at a time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import qwen3next_trt.model.presets as presets_package
from qwen3next_trt.cli import main
from qwen3next_trt.model import Qwen3NextConfig, load_model, random_model, save_model
from qwen3next_trt.runtime import Generator
from qwen3next_trt.validate.tolerances import greedy_check
from qwen3next_trt.validate.validator import Validator

transformers = pytest.importorskip("transformers")

TINY = json.loads((Path(presets_package.__file__).parent / "tiny.json").read_text())

# The tiny preset at a size that exports in seconds: 2 layers (linear, full attention), the same
# head ratios, 16 experts top-4, an MTP layer in the checkpoint, untied, no bias, default RoPE.
SMALL_TINY = {**TINY, "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "full_attention_interval": 2, "head_dim": 16, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
              "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16, "max_position_embeddings": 256}

ZOO = {
    # issue 12: the same model with the top-k weights not renormalised, and nothing else changed
    "norm_topk_false": {**SMALL_TINY, "norm_topk_prob": False},
    # irregular layer order (full attention first), a dense layer by mlp_only_layers, tied embeddings,
    # plain multi-head attention (as many KV heads as query heads), 3 value heads per key head, no MTP layer,
    # no shared expert (shared_expert_intermediate_size 0)
    "dense_tied_irregular_mha": {
        "model_type": "qwen3_next", "vocab_size": 200, "hidden_size": 48, "intermediate_size": 80,
        "num_hidden_layers": 2, "layer_types": ["full_attention", "linear_attention"], "mlp_only_layers": [0],
        "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16,
        "linear_num_key_heads": 1, "linear_num_value_heads": 3, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
        "num_experts": 6, "num_experts_per_tok": 2, "moe_intermediate_size": 24, "shared_expert_intermediate_size": 0,
        "tie_word_embeddings": True, "max_position_embeddings": 256,
    },
    # odd head sizes (attention 24 with half-rotary YaRN, DeltaNet keys 12 / values 20, conv width 3),
    # 3 query heads on 1 KV head, attention bias, MoE every other layer (decoder_sparse_step 2: the
    # linear layer is dense, the full one sparse), no renormalisation with k = 3, no MTP layer
    "odd_yarn_bias_sparse_step": {
        "model_type": "qwen3_next", "vocab_size": 160, "hidden_size": 40, "intermediate_size": 56,
        "num_hidden_layers": 2, "full_attention_interval": 2, "decoder_sparse_step": 2,
        "num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": 24, "attention_bias": True,
        "linear_num_key_heads": 2, "linear_num_value_heads": 2, "linear_key_head_dim": 12, "linear_value_head_dim": 20,
        "linear_conv_kernel_dim": 3,
        "num_experts": 6, "num_experts_per_tok": 3, "norm_topk_prob": False,
        "moe_intermediate_size": 20, "shared_expert_intermediate_size": 28, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 256,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 5000.0, "partial_rotary_factor": 0.5,
                            "factor": 4.0, "original_max_position_embeddings": 64},
    },
}

# what the runtime needs: embed, every layer (prefill + decode), final (with lm_head)
RUNTIME_GRAPHS = "embed,final,layers"
# issue 12 broke the FP8 export the same way; its layer 0 (DeltaNet + MoE) is enough to show it
FP8 = ("norm_topk_false", ["--layers", "0", "--precision", "fp8"])
# a 16-bit export of a MoE model: top-k routing near-ties are decided either way by 16-bit rounding
FP16 = ("norm_topk_false", ["--layers", RUNTIME_GRAPHS + ",model", "--dtype", "fp16"])
GENERATE = 16
PROMPTS = [[5, 17, 3, 99, 42, 7, 61, 8, 23, 11, 70, 2], [9, 31, 4, 56, 13, 88, 40]]


def _layer_graphs(n: int) -> set[str]:
    return {f"layer_{i:02d}.{m}" for i in range(n) for m in ("prefill", "decode")}


def _export(ckpt: Path, out: Path, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "qwen3next_trt.cli", "export", "--model", str(ckpt), "--out", str(out),
           "--max-positions", "128", *args]
    # one thread each: two exports share the two cores
    return subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """name -> (checkpoint, export dir) for every zoo config, plus "fp8" for the FP8 export."""
    root = tmp_path_factory.mktemp("zoo")
    jobs = {}
    for name, fields in ZOO.items():
        # a config.json alone, made into a checkpoint by the CLI, as a user would
        (root / name / "config").mkdir(parents=True)
        (root / name / "config" / "config.json").write_text(json.dumps(fields))
        ckpt = root / name / "ckpt"
        assert main(["random-checkpoint", "--model", str(root / name / "config"), "--out", str(ckpt), "--seed", "3"]) == 0
        jobs[name] = (ckpt, root / name / "onnx", ["--layers", RUNTIME_GRAPHS])
    jobs["fp8"] = (jobs[FP8[0]][0], root / "fp8", FP8[1])
    jobs["fp16"] = (jobs[FP16[0]][0], root / "fp16", FP16[1])
    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        done = dict(zip(jobs, pool.map(lambda job: _export(*job), jobs.values())))
    failed = {name: r.stderr[-2000:] for name, r in done.items() if r.returncode}
    assert not failed, failed
    return {name: (ckpt, out) for name, (ckpt, out, _) in jobs.items()}


def _assert_validated(onnx_dir: Path, report_dir: Path, graphs: set[str], greedy: bool):
    report = Validator(onnx_dir, report_dir=report_dir, generate=GENERATE, progress=lambda m: None).run()
    compared = {r.graph for r in report.rows}
    assert compared == graphs, compared ^ graphs
    failed = [(r.graph, r.feed, r.output, r.max_abs, r.tolerance) for r in report.rows if not r.passed]
    assert not failed, failed
    if greedy:
        e2e = report.end_to_end.get("greedy_per_layer_graphs[onnxrt]")
        assert e2e is not None, report.notes  # the greedy check ran
        assert e2e["passed"], e2e
    assert report.passed


@pytest.mark.parametrize("name", sorted(ZOO))
def test_export_validates(name, exports, tmp_path):
    ckpt, onnx_dir = exports[name]
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    graphs = {g["name"] for g in manifest["graphs"]}
    assert graphs == {"embed", "final", "lm_head"} | _layer_graphs(ZOO[name]["num_hidden_layers"])
    _assert_validated(onnx_dir, tmp_path / "report", graphs, greedy=True)


@pytest.mark.parametrize("name", sorted(ZOO))
@torch.no_grad()
def test_runtime_greedy_matches_transformers_generate(name, exports):
    ckpt, onnx_dir = exports[name]
    got = Generator(onnx_dir).generate(PROMPTS, max_new_tokens=GENERATE)  # one batch, prompts of two lengths
    hf = transformers.Qwen3NextForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32, attn_implementation="eager").eval()
    for prompt, tokens in zip(PROMPTS, got):
        assert len(tokens) == GENERATE
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=GENERATE, min_new_tokens=GENERATE, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].numpy()
        # transformers' logits along the runtime's path: each runtime token is its greedy choice (up to
        # the parity tolerance), and equal to its own tokens before any near-tie of its two best logits
        hf_logits = hf(torch.tensor([prompt + tokens[:-1]])).logits[:, len(prompt) - 1:].float().numpy()
        check = greedy_check(np.array([tokens]), expected[None], hf_logits, 1e-4)
        assert check["consistent"] and check["agreement_before_tie"] == 1.0, (name, prompt, tokens, expected.tolist(), check)


def test_fp8_export_validates_without_topk_renormalisation(exports, tmp_path):
    _, onnx_dir = exports["fp8"]
    assert json.loads((onnx_dir / "manifest.json").read_text())["weights_precision"]["format"] == "float8e4m3fn"
    _assert_validated(onnx_dir, tmp_path / "report", _layer_graphs(1), greedy=False)


def test_fp16_export_validates_with_routing_near_ties_named(exports, tmp_path):
    """fp16 validates per layer with the tokens at a routing near-tie left out (few, and named); a
    comparison a near-tie makes undecidable (the stitched model, greedy decoding past it) is excused
    with that reason, never silently passed. The rule itself: tests/test_tolerances.py."""
    _, onnx_dir = exports["fp16"]
    report = Validator(onnx_dir, report_dir=tmp_path / "report", generate=GENERATE, progress=lambda m: None).run()
    failed = [(r.graph, r.feed, r.output, r.max_abs, r.tolerance) for r in report.rows if not r.passed and not r.excused]
    assert not failed, failed
    layer_rows = [r for r in report.rows if not r.graph.startswith("model")]
    assert layer_rows and all(not r.excused for r in layer_rows)
    assert sum(r.left_out for r in layer_rows if r.output == "hidden_out") <= 0.1 * 70 * 2 * len(
        [r for r in layer_rows if r.output == "hidden_out"])
    assert all("routing near-tie" in r.excused for r in report.rows if r.excused)
    e2e = report.end_to_end["greedy_per_layer_graphs[onnxrt]"]
    assert e2e["passed"] or "routing near-tie" in (e2e.get("excused") or ""), e2e
    assert report.passed


@torch.no_grad()
def test_model_without_experts_matches_transformers(tmp_path):
    """num_experts 0 (every layer a dense MLP) is a config transformers accepts; the reader refused it.
    Dense layers are exported above (mlp_only_layers, decoder_sparse_step); here the reading and the model."""
    cfg = Qwen3NextConfig.from_dict({**ZOO["dense_tied_irregular_mha"], "num_experts": 0})
    assert not any(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    path = save_model(random_model(cfg, seed=3), tmp_path / "ckpt")
    hf = transformers.Qwen3NextForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.tensor([PROMPTS[0] * 6])  # 72 tokens: more than one 64-token scan chunk
    ref = hf(ids).logits
    assert ref.abs().max() > 1.0
    assert (load_model(path)(ids) - ref).abs().max() <= 1e-4
