"""Train the `tiny` preset for a few minutes on the CPU, so FP8 quality and MTP acceptance mean something.

Corpus: the Python standard library's own source files (ship with every Python; no download),
read as bytes, one token per byte (the preset's vocabulary of 512 holds them). Files are split
deterministically: every tenth file (sorted by path) is held out. Loss: next-token cross-entropy plus
0.3 x the MTP head's cross-entropy for the token after next.

    python bench/train_tiny.py --out out/tiny-trained [--minutes 4] [--seed 0]

Writes an HF-format checkpoint (float32) and `train_log.json` (steps, losses, held-out perplexity).
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time

import torch
import torch.nn.functional as F

from qwen3next_trt.model import load_preset, random_model, save_model
from qwen3next_trt.model.calibration import stdlib_sources


def corpus(held_out: bool) -> torch.Tensor:
    files = [p for p in stdlib_sources() if p.stat().st_size < 200_000]
    chosen = [p for i, p in enumerate(files) if (i % 10 == 0) == held_out]
    data = b"".join(p.read_bytes() for p in chosen)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)  # widened per batch: 8x less memory


def batches(tokens: torch.Tensor, batch: int, seq: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, tokens.numel() - seq - 2, (batch,), generator=generator)
        yield torch.stack([tokens[s : s + seq + 2] for s in starts.tolist()]).long()


def losses(model, chunk: torch.Tensor):
    """(next-token loss, MTP loss) on chunk [B, T+2]."""
    ids, nxt, after = chunk[:, :-2], chunk[:, 1:-1], chunk[:, 2:]
    logits, hidden = model(ids, return_hidden=True)
    main = F.cross_entropy(logits.flatten(0, 1), nxt.flatten())
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    mtp_logits, _ = model.mtp_forward(nxt, hidden, positions)
    return main, F.cross_entropy(mtp_logits.flatten(0, 1), after.flatten())


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seq: int = 256, windows: int = 24) -> float:
    """exp(mean next-token loss) over `windows` evenly spaced windows of the held-out text."""
    step = (tokens.numel() - seq - 1) // windows
    total = 0.0
    for w in range(windows):
        chunk = tokens[w * step : w * step + seq + 1][None].long()
        total += F.cross_entropy(model(chunk[:, :-1]).flatten(0, 1), chunk[:, 1:].flatten()).item()
    return math.exp(total / windows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    train, held = corpus(False), corpus(True)
    print(f"[train] corpus: {train.numel():,} training bytes, {held.numel():,} held-out bytes (Python {sysconfig.get_python_version()} stdlib)")
    model = random_model(load_preset("tiny"), seed=args.seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(args.seed)
    log, start, step = [], time.time(), 0
    budget = args.minutes * 60
    for chunk in batches(train, args.batch, args.seq, g):
        elapsed = time.time() - start
        if elapsed > budget:
            break
        lr = args.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(elapsed / budget, 1.0))))
        for group in opt.param_groups:
            group["lr"] = lr
        main_loss, mtp_loss = losses(model, chunk)
        opt.zero_grad(set_to_none=True)
        (main_loss + 0.3 * mtp_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 25 == 0:
            rate = step * args.batch * args.seq / (time.time() - start)
            log.append({"step": step, "loss": round(main_loss.item(), 4), "mtp_loss": round(mtp_loss.item(), 4)})
            print(f"[train] step {step:5d}  loss {main_loss.item():.3f}  mtp {mtp_loss.item():.3f}  "
                  f"{rate:,.0f} tokens/s  {elapsed:5.0f}/{budget:.0f} s", flush=True)
    model.eval()
    ppl = perplexity(model, held)
    print(f"[train] {step} steps in {time.time() - start:.0f} s; held-out perplexity {ppl:.3f} (per byte)")
    out = save_model(model, args.out, max_shard_bytes=2**30)
    (out / "train_log.json").write_text(json.dumps({
        "steps": step, "seconds": round(time.time() - start, 1), "batch": args.batch, "seq": args.seq,
        "seed": args.seed, "held_out_perplexity": ppl, "log": log,
        "corpus": f"Python {sysconfig.get_python_version()} stdlib *.py (every tenth file held out), bytes as tokens",
    }, indent=2))
    print(f"[train] wrote {out}")


if __name__ == "__main__":
    main()
