"""FP8 weights vs the unquantised model on held-out text: perplexity, top-1 agreement, top-5 overlap, KL.

    python bench/fp8_quality.py --model out/tiny-trained [--out bench/results/fp8_quality.json]

Activation scales: static per-tensor, calibrated on 16 x 256 tokens of stdlib text
(model/calibration.py: windows of the first 400 source files, which include some held-out files;
only one maximum per activation is taken from them). The FP8 model is the reference with every officially-FP8 linear
weight replaced by its dequantised FP8 value (and, in the last row, every such layer's input rounded
through FP8 with its calibrated scale) (the model that `export --precision fp8` graphs compute: the validator holds them to it
within 2e-6 on ONNX Runtime). Both 128x128 block scales (the official scheme) and per-channel scales.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from qwen3next_trt.model import load_model
from qwen3next_trt.model.calibration import calibrate, calibration_tokens
from qwen3next_trt.model.fp8 import WeightQuantizer, fake_quantize_, fake_quantize_activations_
from qwen3next_trt.model.loader import WeightSource
from qwen3next_trt.validate.quality import logit_metrics

sys.path.insert(0, str(Path(__file__).parent))
from train_tiny import corpus  # noqa: E402  (the same held-out split)


@torch.no_grad()
def evaluate(model, tokens, seq=256, windows=24):
    step = (tokens.numel() - seq - 1) // windows
    losses, logits = [], []
    for w in range(windows):
        chunk = tokens[w * step : w * step + seq + 1][None].long()
        out = model(chunk[:, :-1])
        losses.append(F.cross_entropy(out.flatten(0, 1), chunk[:, 1:].flatten()).item())
        logits.append(out[0])
    return math.exp(sum(losses) / len(losses)), torch.cat(logits).numpy()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="checkpoint directory (e.g. from bench/train_tiny.py)")
    ap.add_argument("--out", default="bench/results/fp8_quality.json")
    args = ap.parse_args()
    held = corpus(True)
    base = load_model(args.model, with_mtp=False)
    ppl_ref, logits_ref = evaluate(base, held)
    rows = [{"weights": "float32 (trained)", "perplexity": ppl_ref}]
    source = WeightSource(args.model)
    scales = calibrate(source, calibration_tokens(16, 256, source.config.vocab_size), progress=lambda m: None)
    variants = [("block", None), ("channel", None), ("block", scales)]
    for scheme, act in variants:
        model = fake_quantize_(load_model(args.model, with_mtp=False), "", WeightQuantizer(scheme))
        if act:
            fake_quantize_activations_(model, "", act)
        ppl, logits = evaluate(model, held)
        m = logit_metrics(logits_ref, logits)
        rows.append({"weights": f"FP8 E4M3, {scheme} scales" + (" + FP8 activations" if act else ""), "perplexity": ppl,
                     "perplexity_change": ppl / ppl_ref - 1, **m})
    print(f"held-out text: {held.numel():,} bytes of Python stdlib source; 24 windows of 256 tokens")
    print(f"{'weights':<44}{'perplexity':>11}{'change':>9}{'top-1':>8}{'top-5':>8}{'KL mean':>10}")
    for r in rows:
        extra = (f"{r['perplexity_change']:>+9.2%}{r['top1_agreement']:>8.1%}{r['top5_overlap']:>8.1%}{r['kl_mean']:>10.2e}"
                 if "kl_mean" in r else "")
        print(f"{r['weights']:<44}{r['perplexity']:>11.4f}{extra}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv), "model": args.model, "device": "cpu", "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
