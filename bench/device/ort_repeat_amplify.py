"""How far one unit in the last place grows through the stitched layers (issue 17, 16-bit repeatability).

On the H200 the CUDA provider's com.microsoft::MoE gives outputs that differ run to run by 1-2 units in the
last place (bench/device/ort_repeat.py), while the stitched model's logits differ by up to 0.5 (fp16) / 1.2
(bf16). This replays that on a deterministic backend (ONNX Runtime's CPU provider, fp16 export): the per-layer
prefill graphs chained (embed -> layer_00..N -> final) on validate's fresh T=70 feed, once as is and once per
seed with layer 0's hidden output moved by one ulp (random sign) in a random `--frac` of its elements, the
size and share of the MoE's run-to-run differences. Per seed: how many (token, layer) top-k expert sets
changed in the later layers or met an exact tie at the top-k boundary (routing flips), and the logits' max
abs difference: at all, before each row's first flipped position (the graphs are causal) and from it on.

    python3 bench/device/ort_repeat_amplify.py out/dev17/fp16 [--seeds 10] [--frac 0.3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def with_router_output(src: Path, dst: Path) -> str | None:
    """`src` with the MoE's router-logits input added as a graph output (saved beside it); its name."""
    import onnx

    m = onnx.load(str(src), load_external_data=False)
    moe = next((n for n in m.graph.node if n.op_type == "MoE"), None)
    if moe is None:
        return None
    name = moe.input[1]
    vi = next(v for v in list(m.graph.value_info) if v.name == name)
    m.graph.output.append(vi)
    onnx.save(m, str(dst))
    return name


def one_ulp(x: np.ndarray, rng, frac: float) -> np.ndarray:
    """x (float16) with a random `frac` of its elements moved one ulp up or down."""
    bits = x.view(np.uint16).astype(np.int32).copy()
    pick = rng.random(x.shape) < frac
    step = np.where(rng.random(x.shape) < 0.5, 1, -1)
    zero = (bits & 0x7FFF) == 0
    bits = np.where(pick & ~zero, bits + step, bits)  # for either sign, +-1 on the bits is one ulp in magnitude
    return bits.astype(np.uint16).view(np.float16)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--frac", type=float, default=0.3)
    ap.add_argument("--json")
    a = ap.parse_args()
    from qwen3next_trt.export.manifest import Manifest
    from qwen3next_trt.sessions import OrtSession
    from qwen3next_trt.validate.inputs import feeds_for

    d = Path(a.dir)
    man = Manifest.load(d)
    assert man.dtype == "fp16", "the CPU provider runs fp16 (not bf16) exports"
    k = man.config.get("num_experts_per_tok", 4)
    embed = man.graph("embed")
    _, efeed = feeds_for(man.graph("model.prefill"), man.vocab_size)[0]  # validate's fresh T=70 feed of the stitched graph
    tokens = efeed["input_ids"]
    layers, tmp = [], []
    for i in range(man.n_layers):
        rec = man.layer(i, "prefill")
        dst = d / f"_amp_{rec.name}.onnx"
        router = with_router_output(d / rec.file, dst)
        tmp.append(dst)
        feed = next(f for label, f in feeds_for(rec, man.vocab_size) if label.startswith("fresh"))
        layers.append((OrtSession(dst), router, feed))
    final = OrtSession(d / man.graph("final").file)
    hidden0 = OrtSession(d / embed.file).run(None, {"input_ids": tokens})[0]

    def forward(perturb=None):
        h, sets = hidden0, []
        for i, (s, router, feed) in enumerate(layers):
            out = dict(zip(s.output_names, s.run(None, dict(feed, hidden=h))))
            h = out["hidden_out"]
            if router:
                r = out[router].reshape(-1, out[router].shape[-1]).astype(np.float32)
                top = -np.sort(-r, -1)
                # (expert set, exact tie at the top-k boundary: which one the kernel takes is its own rule)
                sets.append((np.sort(np.argsort(-r, -1, kind="stable")[:, :k], -1), top[:, k - 1] == top[:, k]))
            else:
                sets.append(None)
            if i == 0 and perturb is not None:
                h = perturb(h)
        return final.run(None, {"hidden": h})[0].astype(np.float64), sets

    base, base_sets = forward()
    rows = []
    for seed in range(a.seeds):
        rng = np.random.default_rng(seed)
        logits, sets = forward(lambda h: one_ulp(h, rng, a.frac))
        # [tokens] per MoE layer: expert set changed, or an exact boundary tie in either run (the kernel may break
        # it either way: seen here, a tie made by the ulp that ONNX Runtime resolved to the other expert)
        changed = [(s[0] != b[0]).any(-1) | s[1] | b[1] for s, b in zip(sets, base_sets) if s is not None]
        flips = [int(c.sum()) for c in changed]
        # the graphs are causal: a position before its row's first flipped token (any layer) is untouched by flips
        flipped = np.any(changed, 0).reshape(tokens.shape)
        diff = np.abs(logits - base).max(-1)  # [batch, seq]
        first = [int(np.flatnonzero(r)[0]) if r.any() else r.size for r in flipped]
        before = max((float(diff[b, :f].max()) for b, f in enumerate(first) if f > 0), default=0.0)
        after = max((float(diff[b, f:].max()) for b, f in enumerate(first) if f < diff.shape[1]), default=0.0)
        rows.append({"seed": seed, "routing_flips_per_layer": flips, "routing_flips": sum(flips),
                     "logits_max_abs": float(diff.max()), "before_first_flip": before, "from_first_flip": after})
        print(json.dumps(rows[-1]), flush=True)
    for p in tmp:
        p.unlink()
    summary = {"export": str(d), "tokens": int(tokens.size), "layers": man.n_layers, "k": k, "frac": a.frac,
               "seeds": a.seeds, "seeds_with_flips": sum(r["routing_flips"] > 0 for r in rows),
               "logits_max_abs_before_first_flip": max(r["before_first_flip"] for r in rows),
               "logits_max_abs_from_first_flip": max(r["from_first_flip"] for r in rows),
               "logits_max_abs_of_base": float(np.abs(base).max()), "rows": rows}
    print(json.dumps({k2: v for k2, v in summary.items() if k2 != "rows"}))
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
