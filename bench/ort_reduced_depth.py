"""A reduced-depth Qwen3-Next-80B-A3B through the runtime on ONNX Runtime's CUDA provider: decode tokens/s
and where a step's time goes (session calls vs kernels).

    python bench/ort_reduced_depth.py --out DIR [--layers 4] [--dtype bf16] [--batches 1,8] [--new 64]
    (on the device tool: bash bench/device/ort_device.sh 80b, which exports there: the weights are GBs)

The official 80B configuration with `num_hidden_layers` cut to --layers (full_attention_interval 4: layers
0-2 Gated DeltaNet, 3 gated attention, each with the 512-expert MoE), no MTP, seeded random weights,
exported by the project's exporter (`export --model <that preset> --dtype bf16`) into DIR/onnx. Then
`Generator(..., device="cuda")`: prefill through the prefill graphs, decode through runtime/device.py
(states on the GPU, IO binding), with and without ONNX Runtime's CUDA graphs. Per batch: decode tokens/s
(decode steps x batch / the decode loop's wall time, setup excluded), host wall time per step split by
part (embed, DeltaNet layers, attention layers, final + logits to host), and over 16 further steps the
GPU kernel time per step from torch's profiler (CUPTI sees every kernel of the process, ONNX Runtime's
too): wall - kernels = what the per-layer session calls cost beyond the kernels. Writes DIR/result.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np


def reduced_preset(layers: int, where: Path, base: str = "qwen3-next-80b-a3b") -> str:
    """Register a preset: `base` with num_hidden_layers = layers and no MTP (model/presets reads it)."""
    from qwen3next_trt.model import presets

    cfg = json.loads(presets.preset_path(base).read_text())
    cfg["num_hidden_layers"] = layers
    for key in ("num_nextn_predict_layers", "num_mtp_layers"):
        cfg.pop(key, None)
    path = where / f"{base}-{layers}layers.json"
    path.write_text(json.dumps(cfg, indent=1))
    name = path.stem
    presets.PRESETS[name] = (str(path.resolve()), 0)  # an absolute path: preset_path joins it as is
    return name


def kernel_time_per_step(dec, tokens, positions, mask, steps: int) -> tuple[float, float]:
    """(wall s, GPU kernel s) per step over `steps` steps of DeviceDecoder `dec`, torch's profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for s in range(steps):
            logits = dec.step(tokens, positions + s, mask[:, : dec.L + 1])
            tokens = logits.argmax(-1)
        wall = time.perf_counter() - t0
    kernel_us = 0.0
    for e in prof.events():
        if str(getattr(e, "device_type", "")).endswith("CUDA") and e.device_time is not None:
            kernel_us += e.device_time  # microseconds, each kernel / memcpy on the GPU
    return wall / steps, kernel_us * 1e-6 / steps


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--preset", default="qwen3-next-80b-a3b")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--precision", choices=("none", "fp8"), default="none",
                    help="fp8: FP8 block-scaled weights (export --precision fp8); on the CUDA provider the projections run as "
                         "MatMulBlockQuantizedFp8Weight and the experts are dequantised to --dtype at load (engines/fold.py)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--skip-export", action="store_true", help="reuse OUT/onnx from an earlier run")
    ap.add_argument("--export-only", action="store_true", help="export and stop (a long export in a call of its own)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": " ".join(sys.argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "rows": [], "errors": []}
    res_path = out / "result.json"

    def save():
        res_path.write_text(json.dumps(result, indent=2))

    import torch  # noqa: F401  (the CUDA 13 libraries ONNX Runtime's CUDA provider links)
    import onnxruntime as ort

    result["onnxruntime"] = ort.__version__
    result["precision"] = args.precision
    if torch.cuda.is_available():
        result["device"] = torch.cuda.get_device_name()
    onnx_dir = out / "onnx"
    if not args.skip_export:
        from qwen3next_trt.export.exporter import Exporter

        name = reduced_preset(args.layers, out, args.preset)
        t = time.time()
        Exporter(name, onnx_dir, dtype=args.dtype, precision=args.precision, progress=lambda m: print(m, flush=True)).run()
        result["export_s"] = round(time.time() - t, 1)
        result["export_bytes"] = sum(f.stat().st_size for f in onnx_dir.iterdir() if f.is_file())
        print(f"export: {result['export_s']} s, {result['export_bytes'] / 2**30:.1f} GiB", flush=True)
        save()
        if args.export_only:
            return

    from qwen3next_trt.runtime import Generator
    from qwen3next_trt.runtime.device import DeviceDecoder

    rng = np.random.default_rng(0)
    t = time.time()
    gen = Generator(onnx_dir, device=args.device, step_times=True, device_resident=True if args.device == "cpu" else None)
    load_s = time.time() - t
    m = gen.model
    if args.device == "cuda":  # what the FP8 graphs became on the CUDA provider, and the GPU memory they hold
        import torch

        result["gpu_memory_used_gib"] = round((torch.cuda.mem_get_info()[1] - torch.cuda.mem_get_info()[0]) / 2**30, 2)
        rewrites = {}
        for s in getattr(m, "sessions", {}).values():
            for k, v in (getattr(s, "rewrites", None) or {}).items():
                rewrites.setdefault(k, []).extend(v)
        result["ort_cuda_fp8"] = {"gemms_rewritten": sum(r.get("rewritten", False) for r in rewrites.get("fp8_gemms", [])),
                                  "gemms": len(rewrites.get("fp8_gemms", [])),
                                  "dequantised": len(rewrites.get("dequantised", [])),
                                  "dequantised_gib": round(sum(r["bytes"] for r in rewrites.get("dequantised", [])) / 2**30, 2)}
        print(f"sessions: {load_s:.1f} s, GPU memory in use {result['gpu_memory_used_gib']} GiB, FP8 rewrites {result['ort_cuda_fp8']}", flush=True)
    for graphs in (True, False):
        gen.cuda_graphs = graphs
        for B in map(int, args.batches.split(",")):
            row = {"batch": B, "cuda_graphs_asked": graphs, "sessions_load_s": round(load_s, 1), "layers": m.n_layers,
                   "attention_layers": int(sum(m.is_attention))}
            try:
                prompts = rng.integers(0, gen.vocab_size, (B, args.prompt)).tolist()
                gen.generate(prompts, 8)  # warm-up: allocator arenas, kernel selection
                tokens = gen.generate(prompts, args.new)
                st = gen.last_stats
                steps = st.decode_steps
                row.update({"decode_steps": steps, "decode_tokens_per_s": steps * B / st.decode_s,
                            "step_ms": st.decode_s / steps * 1e3, "decode_setup_s": st.decode_setup_s,
                            "time_to_first_token_s": st.time_to_first_token_s, "captured": st.cuda_graphs,
                            "device_notes": st.device_notes,
                            "step_parts_ms": {k: v / steps * 1e3 for k, v in st.step_parts_s.items()},
                            "session_calls_per_step": 2 + m.n_layers})
                if B == 1 and graphs:  # the same tokens through the host path (same sessions, numpy round trips)
                    gen.device_resident = False
                    t = time.perf_counter()
                    n = min(16, args.new)
                    host = gen.generate(prompts, n)
                    row[f"host_path_tokens_equal_first_{n}"] = host[0] == tokens[0][:n]
                    row["host_path_step_ms"] = (time.perf_counter() - t - gen.last_stats.time_to_first_token_s) / (n - 1) * 1e3
                    gen.device_resident = True
                if args.device == "cuda":
                    P = args.prompt
                    store = m.new_store(B, P + 40)
                    store.mask[:, : P + 40] = True
                    ids = np.array(prompts, np.int64)
                    logits, _, _ = m.forward(ids, store, np.arange(B), np.broadcast_to(np.arange(P), (B, P)), (0, 0), "prefill")
                    dec = DeviceDecoder(m, store, P, cuda_graphs=graphs)
                    first = logits[:, -1].argmax(-1)
                    kernel_time_per_step(dec, first, np.full(B, P), store.mask, 3)  # warm-up
                    wall, kern = kernel_time_per_step(dec, first, np.full(B, P + 3), store.mask, 16)
                    row.update({"profiled_step_ms": wall * 1e3, "kernel_ms_per_step": kern * 1e3,
                                "outside_kernels_ms_per_step": (wall - kern) * 1e3,
                                "outside_kernels_us_per_session_call": (wall - kern) / (2 + m.n_layers) * 1e6})
            except Exception as e:  # noqa: BLE001 - every row is written, errors included
                import traceback

                row["error"] = traceback.format_exc()[-1500:]
            result["rows"].append(row)
            save()
            print(json.dumps({k: v for k, v in row.items() if k not in ("error",)}, default=str), flush=True)
            if "error" in row:
                print(row["error"], flush=True)
    print(f"\n| batch | CUDA graphs (captured) | decode tokens/s | step ms | kernels ms/step | outside kernels ms/step "
          f"| per session call us | host parts ms/step |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        if "decode_tokens_per_s" not in r:
            continue
        parts = ", ".join(f"{k} {v:.2f}" for k, v in r["step_parts_ms"].items())
        print(f"| {r['batch']} | {'on' if r['cuda_graphs_asked'] else 'off'} ({', '.join(r['captured']) or 'none'}) | "
              f"{r['decode_tokens_per_s']:.1f} | {r['step_ms']:.2f} | {r.get('kernel_ms_per_step', float('nan')):.2f} | "
              f"{r.get('outside_kernels_ms_per_step', float('nan')):.2f} | {r.get('outside_kernels_us_per_session_call', float('nan')):.0f} | {parts} |")
    save()
    print(f"wrote {res_path}")


if __name__ == "__main__":
    main()
