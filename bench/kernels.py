"""Plugin kernels at Qwen3-Next-80B-A3B sizes on one GPU, with peers and roofline floors in the same run.

    python bench/kernels.py [--out bench/results/kernels-<device>.json] [--quick]

Rows: Gated DeltaNet prefill (1x4096, 1x32768, 4x8192), decode (batch 1/32/256), MoE FP8 (1/8/64/4096
tokens), bf16 activations. Peers: FLA's Triton kernels when `fla` imports, else the PyTorch reference
on the GPU (chunked scan / expert loop). Each row: time (median of CUDA-event timings), the floor
max(bytes / measured copy bandwidth, FLOPs / measured bf16 matmul rate), ratio to the peer, and the
relative error against the reference. Prints the device, clocks and date; writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

import torch

from qwen3next_trt.model.fp8 import quantize
from qwen3next_trt.model.modeling_qwen3_next import linear_attention as reference_scan
from qwen3next_trt.model.modeling_qwen3_next import moe_dispatch, route_tokens
from qwen3next_trt.plugins import torch_ops

HK, HV, D = 16, 32, 128
H, INTER, E, TOPK = 2048, 512, 512, 10


def timed(fn, warmup=3, reps=10) -> float:
    """Median milliseconds of `fn` over `reps` runs, CUDA events, after `warmup` runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def machine_rates() -> dict:
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = timed(lambda: a @ a)
    return {"copy_GBps": 2 * n / ms / 1e6, "bf16_TFLOPs": 2 * 8192**3 / mm / 1e9}


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / max(b.norm(), 1e-30))


def try_fla():
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

        return chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    except Exception as e:  # noqa: BLE001
        return str(e).splitlines()[0][:100]


def gdn_inputs(B, T, g):
    q = torch.nn.functional.normalize(torch.randn(B, T, HK, D, generator=g), dim=-1).reshape(B, T, HK * D)
    k = torch.nn.functional.normalize(torch.randn(B, T, HK, D, generator=g), dim=-1).reshape(B, T, HK * D)
    v = torch.randn(B, T, HV * D, generator=g)
    decay = -torch.rand(B, T, HV, generator=g) * 0.5
    beta = torch.rand(B, T, HV, generator=g)
    state = torch.randn(B, HV, D, D, generator=g) * 0.1
    cuda = lambda t, dt=torch.bfloat16: t.to("cuda", dt)  # noqa: E731
    return cuda(q), cuda(k), cuda(v), cuda(state, torch.float32), cuda(decay), cuda(beta)


def gdn_rows(rates, fla, quick):
    g = torch.Generator().manual_seed(0)
    rows = []
    shapes = [(1, 4096), (1, 32768), (4, 8192)] if not quick else [(1, 4096)]
    for B, T in shapes + [(b, 1) for b in (1, 32, 256)]:
        q, k, v, s0, decay, beta = gdn_inputs(B, T, g)
        ours = lambda: torch_ops.linear_attention(q, k, v, s0, decay, beta, HK, HV, D**-0.5)  # noqa: E731
        out, state = ours()
        ref_out, ref_state = reference_scan(q.float(), k.float(), v.float(), s0, decay.float(), beta.float(), HK, HV, D**-0.5)
        t = timed(ours, reps=5 if T > 4096 else 10)
        act_bytes = B * T * (2 * HK * D + 2 * HV * D + 2 * HV) * 2
        state_bytes = 2 * B * HV * D * D * 4
        flops = B * T * HV * 4 * 2 * D * D
        floor = max((act_bytes + state_bytes) / rates["copy_GBps"] / 1e6, flops / rates["bf16_TFLOPs"] / 1e9)
        peer_name, peer_ms = "PyTorch reference (GPU, fp32)", None
        if not isinstance(fla, str):
            chunk, recurrent = fla
            qf, kf = (x.view(B, T, HK, D).repeat_interleave(HV // HK, 2) for x in (q, k))
            vf = v.view(B, T, HV, D)
            fn = (lambda: recurrent(qf, kf, vf, decay.float(), beta, scale=D**-0.5, initial_state=s0, output_final_state=True)) if T == 1 \
                else (lambda: chunk(qf, kf, vf, decay.float(), beta, scale=D**-0.5, initial_state=s0, output_final_state=True))
            peer_name, peer_ms = "FLA " + ("fused_recurrent" if T == 1 else "chunk") + "_gated_delta_rule", timed(fn, reps=5)
        elif T <= 8192:
            peer_ms = timed(lambda: reference_scan(q.float(), k.float(), v.float(), s0, decay.float(), beta.float(), HK, HV, D**-0.5), warmup=1, reps=3)
        rows.append({"kernel": "GDN decode" if T == 1 else "GDN prefill", "shape": f"{B}x{T}", "ms": t, "floor_ms": floor,
                     "peer": peer_name, "peer_ms": peer_ms, "ratio_to_peer": (t / peer_ms) if peer_ms else None,
                     "state_bandwidth_fraction": (state_bytes / t / 1e6 / rates["copy_GBps"]) if T == 1 else None,
                     "rel_err_out": rel_err(out.float(), ref_out), "rel_err_state": rel_err(state, ref_state)})
        print_row(rows[-1])
    return rows


def moe_rows(rates, quick):
    g = torch.Generator().manual_seed(1)
    gate = [torch.randn(INTER, H, generator=g) / H**0.5 for _ in range(E)]
    up = [torch.randn(INTER, H, generator=g) / H**0.5 for _ in range(E)]
    down = [torch.randn(H, INTER, generator=g) / INTER**0.5 for _ in range(E)]
    # fc1 quantised as the kernel reads it: 128x128 blocks over the interleaved gate/up rows
    q1 = [quantize(torch.stack([a, b], 1).reshape(2 * INTER, H)) for a, b in zip(gate, up)]
    q2 = [quantize(w) for w in down]
    fc1 = torch.stack([q.fp8 for q in q1]).cuda()
    s1 = torch.stack([q.row_scale[::128] for q in q1]).cuda()  # row_scale repeats each block scale over its rows
    fc2 = torch.stack([q.fp8 for q in q2]).cuda()
    s2 = torch.stack([q.row_scale[::128] for q in q2]).cuda()
    fc1_deq = torch.stack([q.dequantize() for q in q1])
    deq_gate = fc1_deq[:, 0::2].to("cuda", torch.bfloat16)
    deq_up = fc1_deq[:, 1::2].to("cuda", torch.bfloat16)
    deq_down = torch.stack([q.dequantize() for q in q2]).to("cuda", torch.bfloat16)
    del gate, up, down, fc1_deq
    rows = []
    for n in ((1, 8, 64, 4096) if not quick else (1, 64)):
        x = torch.randn(n, H, generator=g).to("cuda", torch.bfloat16)
        logits = torch.randn(n, E, generator=g).to("cuda", torch.bfloat16)
        ours = lambda: torch_ops.moe_fp8(x, logits, fc1, s1, fc2, s2, TOPK, 1)  # noqa: E731
        out = ours()
        w, idx = route_tokens(logits, TOPK, True)
        ref = lambda: moe_dispatch(x, w, idx, deq_gate, deq_up, deq_down)  # noqa: E731
        ref_out = ref()
        t, peer = timed(ours), timed(ref, warmup=1, reps=5)
        experts_touched = min(E, n * TOPK)
        weight_bytes = experts_touched * 3 * H * INTER
        flops = n * TOPK * 3 * 2 * H * INTER
        floor = max(weight_bytes / rates["copy_GBps"] / 1e6, flops / rates["bf16_TFLOPs"] / 1e9)
        rows.append({"kernel": "MoE FP8", "shape": f"{n} tokens", "ms": t, "floor_ms": floor,
                     "peer": "PyTorch expert loop (bf16 dequantised weights)", "peer_ms": peer, "ratio_to_peer": t / peer,
                     "rel_err_out": rel_err(out.float(), ref_out.float())})
        print_row(rows[-1])
    return rows


def print_row(r):
    peer = f"{r['peer_ms']:.3f} ms ({r['ratio_to_peer']:.2f}x)" if r.get("peer_ms") else "-"
    extra = f"  state BW {r['state_bandwidth_fraction']:.0%}" if r.get("state_bandwidth_fraction") else ""
    print(f"{r['kernel']:<12}{r['shape']:>12}{r['ms']:>10.3f} ms  floor {r['floor_ms']:.4f} ms ({r['floor_ms'] / r['ms']:.0%} of it)"
          f"  peer {peer:<22}  rel err {r['rel_err_out']:.1e}{extra}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA GPU")
    name = torch.cuda.get_device_name()
    clocks = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm,clocks.mem", "--format=csv,noheader"],
                            capture_output=True, text=True).stdout.strip()
    rates = machine_rates()
    fla = try_fla()
    print(f"{name} (sm_{''.join(map(str, torch.cuda.get_device_capability()))}), clocks sm/max/mem {clocks}; "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; copy {rates['copy_GBps']:.0f} GB/s, "
          f"bf16 matmul {rates['bf16_TFLOPs']:.0f} TFLOP/s; FLA: {'yes' if not isinstance(fla, str) else 'no (' + fla + ')'}")
    rows = gdn_rows(rates, fla, args.quick) + moe_rows(rates, args.quick)
    out = Path(args.out or f"bench/results/kernels-{name.replace(' ', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, "clocks": clocks, "rates": rates, "command": " ".join(sys.argv),
                               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                               "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
