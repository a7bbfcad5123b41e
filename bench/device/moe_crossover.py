"""Where the FP8 MoE prefill path overtakes the decode-style fast path (80B sizes: E 512, k 10, H 2048,
I 512, bf16 activations): both forced, timed with CUDA events over calls on fresh routing (the weights,
1.5 GB, do not fit in L2). Sets q3n_moe_prefill::kMinPairsPerExpert. Run on the device (moe_prefill_run.sh)."""

import torch

from qwen3next_trt.plugins import torch_ops

E, K, H, I = 512, 10, 2048, 512
g = torch.Generator(device="cuda").manual_seed(0)
fc1 = torch.randint(0, 126, (E, 2 * I, H), generator=g, device="cuda", dtype=torch.uint8)
fc2 = torch.randint(0, 126, (E, H, I), generator=g, device="cuda", dtype=torch.uint8)
s1 = torch.rand(E, 2 * (I // 128), H // 128, generator=g, device="cuda") * H**-0.5
s2 = torch.rand(E, H // 128, I // 128, generator=g, device="cuda") * I**-0.5
print("tokens  pairs/expert  fast ms  prefill ms")
for n in (16, 32, 64, 128, 256, 384, 512, 768, 1024):
    sets = [(torch.randn(n, H, generator=g, device="cuda").bfloat16(), torch.randn(n, E, generator=g, device="cuda").bfloat16())
            for _ in range(4)]
    ms = {}
    for impl in ("fast", "prefill"):
        for x, lg in sets:
            torch_ops.moe_fp8(x, lg, fc1, s1, fc2, s2, K, 1, impl=impl)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            for x, lg in sets:
                torch_ops.moe_fp8(x, lg, fc1, s1, fc2, s2, K, 1, impl=impl)
        end.record()
        torch.cuda.synchronize()
        ms[impl] = start.elapsed_time(end) / 20
    print(f"{n:6d}  {n * K / E:12.2f}  {ms['fast']:7.4f}  {ms['prefill']:10.4f}", flush=True)
