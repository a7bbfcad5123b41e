"""Parity of the reference against Hugging Face transformers' Qwen3NextForCausalLM on one checkpoint.

transformers is the independent oracle: it loads the checkpoint with its own code. For FP8
checkpoints (which transformers dequantises only on a GPU) it receives the weights our reader
dequantised, so that case checks the model code, and the FP8 reading is checked separately in tests.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from qwen3next_trt.errors import InputError
from qwen3next_trt.model import CheckpointReader, Qwen3NextForCausalLM, load_model


@dataclass
class ParityReport:
    checkpoint: str
    batch: int
    tokens: int
    prefill_tokens: int
    generated_tokens: int
    full_forward_max_abs: float
    cached_decode_max_abs: float
    greedy_agreement: float
    atol: float
    hf_loader: str
    seconds: float
    logits_max_abs: float = 0.0
    first_mismatch: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return (
            self.full_forward_max_abs <= self.atol
            and self.cached_decode_max_abs <= self.atol
            and self.greedy_agreement == 1.0
        )

    def to_dict(self):
        return {**asdict(self), "passed": self.passed}

    def table(self) -> str:
        ok = lambda x: "ok" if x <= self.atol else "FAIL"  # noqa: E731
        rows = [
            ("checkpoint", self.checkpoint),
            ("transformers loaded by", self.hf_loader),
            ("batch x tokens", f"{self.batch} x {self.tokens} (|logits| max {self.logits_max_abs:.3g})"),
            ("full forward: max abs logits error", f"{self.full_forward_max_abs:.3e}  <= {self.atol:g}  {ok(self.full_forward_max_abs)}"),
            (f"prefill {self.prefill_tokens} + {self.tokens - self.prefill_tokens} cached decode steps vs full forward",
             f"{self.cached_decode_max_abs:.3e}  <= {self.atol:g}  {ok(self.cached_decode_max_abs)}"),
            (f"greedy tokens agreeing ({self.generated_tokens} generated)",
             f"{self.greedy_agreement:.1%}  {'ok' if self.greedy_agreement == 1.0 else 'FAIL'}"),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        if self.first_mismatch:
            lines.append(f"first greedy mismatch: {self.first_mismatch}")
        lines.append(f"result: {'PASS' if self.passed else 'FAIL'}  ({self.seconds:.1f} s, device cpu, float32)")
        return "\n".join(lines)


def load_transformers_model(path: str | Path, reader: CheckpointReader):
    """(transformers model in float32 on CPU, how it was loaded)."""
    try:
        from transformers import Qwen3NextConfig as HFConfig
        from transformers import Qwen3NextForCausalLM as HFModel
    except ImportError as e:
        raise InputError(f"parity needs transformers >= 5 with Qwen3NextForCausalLM ({e}); pip install 'qwen3next-trt[test]'") from None
    raw = dict(reader.config.raw)
    if "quantization_config" not in raw:
        model = HFModel.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager")
        return model.eval(), "transformers.from_pretrained"
    raw.pop("quantization_config")
    hf_cfg = HFConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type", "transformers_version")})
    hf_cfg._attn_implementation = "eager"
    model = HFModel(hf_cfg).to(torch.float32).eval()
    model.load_state_dict(_hf_state_dict(reader, model), strict=True)
    return model, "our FP8 reader's dequantised weights (transformers dequantises FP8 on GPU only)"


def _hf_state_dict(reader: CheckpointReader, hf_model) -> dict[str, torch.Tensor]:
    # transformers keeps experts fused: gate_up_proj [E, 2I, H] = [gate; up] rows, down_proj [E, H, I].
    cfg = reader.config
    sd = {}
    for name in hf_model.state_dict():
        if ".mlp.experts." in name:
            prefix, kind = name.rsplit(".", 1)
            experts = range(cfg.num_experts)
            if kind == "gate_up_proj":
                sd[name] = torch.stack(
                    [torch.cat([reader.get(f"{prefix}.{e}.gate_proj.weight"), reader.get(f"{prefix}.{e}.up_proj.weight")]) for e in experts]
                ).float()
            else:
                sd[name] = torch.stack([reader.get(f"{prefix}.{e}.down_proj.weight") for e in experts]).float()
        elif name == "lm_head.weight" and cfg.tie_word_embeddings:
            sd[name] = reader.get("model.embed_tokens.weight", torch.float32)
        else:
            sd[name] = reader.get(name, torch.float32)
    return sd


@torch.no_grad()
def run_parity(path: str | Path, tokens: int = 100, batch: int = 1, generate: int = 24, atol: float = 1e-4,
               seed: int = 0, progress=print) -> ParityReport:
    start = time.time()
    reader = CheckpointReader(path)
    cfg = reader.config
    if tokens < 2:
        raise InputError(f"--tokens {tokens}: expected at least 2 (a prefill and one decode step)")
    progress(f"loading {path} into the reference (float32, cpu)")
    ours: Qwen3NextForCausalLM = load_model(path, torch.float32, with_mtp=False)
    progress("loading it into transformers' Qwen3NextForCausalLM (float32, cpu)")
    hf, how = load_transformers_model(path, reader)

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, tokens), generator=g)

    progress(f"full forward of {batch} x {tokens} tokens")
    ref = hf(input_ids=ids, use_cache=False).logits.float()
    full_err = (ours(ids) - ref).abs().max().item()

    prefill = max(1, (tokens * 3) // 5)
    progress(f"prefill {prefill} then {tokens - prefill} cached decode steps")
    cache = ours.new_cache(batch)
    pieces = [ours(ids[:, :prefill], cache)]
    for t in range(prefill, tokens):
        pieces.append(ours(ids[:, t : t + 1], cache))
    cached_err = (torch.cat(pieces, dim=1) - ref).abs().max().item()

    progress(f"greedy generation of {generate} tokens (transformers generate vs reference with cache)")
    prompt = ids[:, : min(tokens, 16)]
    hf_out = hf.generate(prompt, max_new_tokens=generate, min_new_tokens=generate, do_sample=False,
                         eos_token_id=None, pad_token_id=0)[:, prompt.shape[1]:]
    our_out = ours.generate_greedy(prompt, generate)
    agree = (hf_out == our_out).float().mean().item()
    mismatch = {}
    if agree < 1.0:
        b, t = (hf_out != our_out).nonzero()[0].tolist()
        mismatch = {"batch": b, "step": t, "transformers": int(hf_out[b, t]), "reference": int(our_out[b, t])}

    return ParityReport(
        checkpoint=str(path), batch=batch, tokens=tokens, prefill_tokens=prefill, generated_tokens=generate,
        full_forward_max_abs=full_err, cached_decode_max_abs=cached_err, greedy_agreement=agree, atol=atol,
        hf_loader=how, seconds=time.time() - start, logits_max_abs=ref.abs().max().item(), first_mismatch=mismatch,
    )
