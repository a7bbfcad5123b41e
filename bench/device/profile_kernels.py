"""Per-kernel device times of the fast plugin kernels (torch.profiler / CUPTI), for finding where a
call's time goes without hardware counters. Run on the device machine:  python3 bench/device/profile_kernels.py
"""

import torch

from qwen3next_trt.plugins import torch_ops

HK, HV, D = 16, 32, 128
H, INTER, E, TOPK = 2048, 512, 512, 10


def moe_case(n, g):
    fc1 = torch.randn(E, 2 * INTER, H, generator=g, device="cuda").to(torch.float8_e4m3fn)
    fc2 = torch.randn(E, H, INTER, generator=g, device="cuda").to(torch.float8_e4m3fn)
    s1 = torch.rand(E, 2 * (INTER // 128), H // 128, generator=g, device="cuda") * 0.01
    s2 = torch.rand(E, H // 128, INTER // 128, generator=g, device="cuda") * 0.01
    xs = [torch.randn(n, H, generator=g, device="cuda").bfloat16() for _ in range(8)]
    ls = [torch.randn(n, E, generator=g, device="cuda").bfloat16() for _ in range(8)]
    return [lambda x=x, lg=lg: torch_ops.moe_fp8(x, lg, fc1, s1, fc2, s2, TOPK, 1) for x, lg in zip(xs, ls)]


def gdn_case(B, T, impl, g):
    q = torch.nn.functional.normalize(torch.randn(B, T, HK, D, generator=g, device="cuda"), dim=-1).reshape(B, T, -1).bfloat16()
    k = torch.nn.functional.normalize(torch.randn(B, T, HK, D, generator=g, device="cuda"), dim=-1).reshape(B, T, -1).bfloat16()
    v = torch.randn(B, T, HV * D, generator=g, device="cuda").bfloat16()
    dec = (-torch.rand(B, T, HV, generator=g, device="cuda") * 0.5).bfloat16()
    beta = torch.rand(B, T, HV, generator=g, device="cuda").bfloat16()
    s0 = torch.randn(B, HV, D, D, generator=g, device="cuda") * 0.1
    return [lambda: torch_ops.linear_attention(q, k, v, s0, dec, beta, HK, HV, D**-0.5, impl=impl)]


def main():
    import sys

    g = torch.Generator(device="cuda").manual_seed(0)
    if len(sys.argv) > 1 and sys.argv[1] == "--once":  # one call of each, for ncu
        for f in moe_case(1, g)[:2] + gdn_case(1, 4096, "chunk_tc", g):
            f()
        torch.cuda.synchronize()
        return
    cases = {"moe 1 token": moe_case(1, g), "moe 8 tokens": moe_case(8, g), "gdn chunk_tc 1x4096": gdn_case(1, 4096, "chunk_tc", g),
             "gdn chunk 1x4096": gdn_case(1, 4096, "chunk", g), "gdn decode 32x4": gdn_case(32, 4, "decode", g)}
    for name, fns in cases.items():
        for f in fns:
            f()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), torch.cuda.graph(graph, stream=s):
            for f in fns:
                f()
        torch.cuda.synchronize()
        graph.replay()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                graph.replay()
            torch.cuda.synchronize()
        print(f"== {name} ({len(fns)} calls per replay, 5 replays)")
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        events.sort(key=lambda e: e.time_range.start)
        by = {}
        for e in events:
            by.setdefault(e.name[:90], []).append(e.time_range.elapsed_us())
        for k, v in by.items():
            print(f"  {k:<90} n={len(v):4d} mean {sum(v) / len(v):9.2f} us")
        if len(events) > 1:
            span = events[-1].time_range.end - events[0].time_range.start
            print(f"  span of all kernels: {span:.1f} us over {len(events)} kernels; first 6 starts/ends (us):")
            t0 = events[0].time_range.start
            for e in events[:6]:
                print(f"    {e.name[:40]:<40} {e.time_range.start - t0:9.2f} -> {e.time_range.end - t0:9.2f}")


if __name__ == "__main__":
    main()
