"""Where the split GDN prefill's time goes: per-kernel GPU time (torch.profiler, CUDA activity) of the factor
and state passes, for bf16 and float32 inputs (the exporter feeds the LinearAttention node float32).

    python3 bench/device/split_profile.py [--shapes 1x4096,1x32768] [--impls chunk_split,chunk_tc]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from qwen3next_trt.plugins import torch_ops

HK, HV, D = 16, 32, 128


def inputs(B, T, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(B, T, HK, D, generator=g, device="cuda"), dim=-1).reshape(B, T, HK * D)
    k = torch.nn.functional.normalize(torch.randn(B, T, HK, D, generator=g, device="cuda"), dim=-1).reshape(B, T, HK * D)
    v = torch.randn(B, T, HV * D, generator=g, device="cuda")
    decay = -torch.rand(B, T, HV, generator=g, device="cuda") * 0.5
    beta = torch.rand(B, T, HV, generator=g, device="cuda")
    s0 = torch.randn(B, HV, D, D, generator=g, device="cuda") * 0.1
    return [x.to(dtype) for x in (q, k, v)] + [s0, decay.to(dtype), beta.to(dtype)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="1x4096,1x32768,4x8192")
    ap.add_argument("--impls", default="chunk_split,chunk_tc")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    for shape in a.shapes.split(","):
        B, T = map(int, shape.split("x"))
        for dtype in (torch.bfloat16, torch.float32):
            q, k, v, s0, decay, beta = inputs(B, T, dtype)
            for impl in a.impls.split(","):
                call = lambda: torch_ops.linear_attention(q, k, v, s0, decay, beta, HK, HV, D**-0.5, impl=impl)  # noqa: E731
                call()
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(a.reps):
                        call()
                    torch.cuda.synchronize()
                per = defaultdict(float)
                for ev in prof.events():
                    if ev.device_type == torch.autograd.DeviceType.CUDA:
                        name = ev.name.split("<")[0].split("(")[0].replace("void ", "").replace("q3n_gdn::", "")
                        per[name] += ev.device_time / a.reps / 1e3
                parts = ", ".join(f"{n} {ms:.3f} ms" for n, ms in sorted(per.items(), key=lambda x: -x[1]) if ms > 0.001)
                print(f"{shape} {str(dtype).split('.')[-1]:9s} {impl:12s} total {sum(per.values()):.3f} ms: {parts}", flush=True)
            del q, k, v, s0, decay, beta
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
