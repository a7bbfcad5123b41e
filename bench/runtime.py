"""Generation runtime throughput: tokens/s and time to first token, with and without MTP speculation.

    python bench/train_tiny.py --out out/tiny-trained                  # ~5 min on 2 cores
    qwen3next-trt export --model out/tiny-trained --out out/tiny-trained-onnx
    python bench/runtime.py --onnx out/tiny-trained-onnx [--engines DIR] [--out bench/results/runtime-cpu.json]

Prompts are held-out Python stdlib text (every tenth file, as bench/train_tiny.py holds out), bytes
as tokens. Rows: batch 1 and 8, MTP k = 0 (plain greedy) .. 4, each after its own warm-up run, medians of 5 runs; ratios are
against k = 0 of the same batch in the same run, and every row's tokens are checked against k = 0
(speculation must not change a token). `--engines` runs TensorRT engines where they run (a GPU that
the TensorRT in use supports); ONNX Runtime on the CPU otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import onnxruntime

from qwen3next_trt.model.calibration import stdlib_sources
from qwen3next_trt.runtime import Generator
from qwen3next_trt.tables import text_table


def held_out_prompts(count: int, length: int) -> list[list[int]]:
    files = [p for i, p in enumerate(stdlib_sources()) if i % 10 == 0]
    prompts = []
    for path in files:
        data = path.read_bytes()
        if len(data) >= 2 * length:
            mid = len(data) // 2
            prompts.append(list(data[mid : mid + length]))
        if len(prompts) == count:
            return prompts
    raise SystemExit(f"only {len(prompts)} held-out files of >= {2 * length} bytes")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", required=True, help="export of a trained model (see above)")
    ap.add_argument("--engines", help="TensorRT engines directory")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--max-k", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per row (medians reported)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    gen = Generator(args.onnx, engines_dir=args.engines)
    backend = f"TensorRT engines ({args.engines})" if args.engines else f"ONNX Runtime {onnxruntime.__version__} CPU"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"[bench] {backend}, {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), {when}; "
          f"prompt {args.prompt} tokens, {args.tokens} new tokens per request", flush=True)
    rows, table = [], []
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = held_out_prompts(batch, args.prompt)
        base = None
        for k in range(0, args.max_k + 1):
            gen.generate(prompts, 4, mtp_k=k)  # warm-up: first runs of each graph at these shapes, allocations
            runs = []
            for _ in range(args.repeats):  # this machine's timings vary run to run: medians
                tokens = gen.generate(prompts, args.tokens, mtp_k=k)
                st = gen.last_stats
                runs.append((st.generated_tokens / st.total_s, st.time_to_first_token_s * 1e3, tokens))
            tps = statistics.median(r[0] for r in runs)
            ttft = statistics.median(r[1] for r in runs)
            if base is None:
                base = {"tokens": tokens, "tps": tps}
            row = {"batch": batch, "mtp_k": k, "tokens_per_s": tps, "time_to_first_token_ms": ttft,
                   "runs_tokens_per_s": [r[0] for r in runs],
                   "speedup_vs_k0": tps / base["tps"], "tokens_per_main_pass": st.tokens_per_main_pass,
                   "acceptance_per_position": st.acceptance, "main_passes": st.main_passes,
                   "identical_to_k0": all(r[2] == base["tokens"] for r in runs), "stats": st.as_dict()}
            rows.append(row)
            table.append([str(batch), str(k), f"{tps:.1f}", f"{row['speedup_vs_k0']:.2f}x", f"{ttft:.0f}",
                          f"{st.tokens_per_main_pass:.2f}", " ".join(f"{a:.0%}" for a in st.acceptance) or "-",
                          "yes" if row["identical_to_k0"] else "NO"])
            print(f"[bench] batch {batch} k={k}: {tps:.1f} tokens/s", flush=True)
    print()
    print("\n".join(text_table(("batch", "mtp k", "tokens/s", "vs k=0", "TTFT ms", "tokens/pass", "acceptance per position", "same tokens"),
                               table, left=2)))
    if args.out:
        Path(args.out).write_text(json.dumps({"command": " ".join(["python"] + sys.argv), "date": when, "backend": backend,
                                              "cpu_cores": os.cpu_count(), "onnx": args.onnx, "rows": rows}, indent=1))
        print(f"wrote {args.out}")
    return 0 if all(r["identical_to_k0"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
