"""Plugin kernels at Qwen3-Next-80B-A3B sizes on one GPU, with peers and roofline floors in the same run.

    python bench/kernels.py [--out bench/results/kernels-<device>.json] [--quick] [--only decode|prefill|moe]
    python bench/kernels.py --peer ort [--only decode|prefill|moe]     # ONNX Runtime's CUDA kernels as the peer
    python bench/kernels.py --merge PART.json... --out ALL.json

Rows: Gated DeltaNet prefill (1x4096, 1x32768, 4x8192: the chunked kernel on tensor cores (what the
plugin dispatches to), the same on CUDA cores, and the simple token loop),
decode (batch 1/32/256 x 1..4 tokens per call: the fused decode kernel; the simple kernel at 1 token),
MoE FP8 (1/8/64/1024/4096 tokens: the decode fast path, the grouped-GEMM prefill path from 1024 tokens,
and the simple GEMVs), bf16 activations. Peers: FLA's
Triton kernels when `fla` imports, else the PyTorch reference on the GPU (chunked scan / expert loop); for
prefill also FlashQLA (`flash_qla`, TileLang kernels; bench/device/peers_pack.sh carries it) as "peer 2".

Timing: small calls are captured R times into one CUDA graph (R input sets, rotated, so that repeated
calls do not re-read their bytes from the 50 MB L2 as a real decode step would not: decode states,
MoE routing), one replay timed with CUDA events, divided by R; median over repetitions. Calls that
cannot be captured (the PyTorch expert loop synchronises) are timed call by call with events. Each row:
time, the floor max(bytes / measured copy bandwidth, FLOPs / measured bf16 matmul rate) with bytes =
every input read once + every output written once (MoE: the experts the routing actually touched),
ratio to the peer (same inputs, same timing method where it captures), and the relative error
against the reference. Prints the device, clocks and date; writes JSON.

`--peer ort`: ONNX Runtime's own CUDA kernels (onnxruntime-gpu, a single com.microsoft node per graph:
LinearAttention gated_delta at decode 32x1 / 256x1 and prefill 1x4096 / 1x32768, MoE swiglu_fusion 1 with
bf16 weights (ONNX Runtime has no FP8 MoE) at 1 / 8 / 64 tokens) on the same input sets as our kernel in
the same process, each row ours (the kernel the plugin dispatches to) against it. The node runs on a
torch stream handed to the provider (`user_compute_stream`) with the end-of-run synchronisation off, so
the same CUDA events time it; it is captured by ONNX Runtime's own CUDA graphs (one `gpu_graph_id` per
input set, replays timed) where the provider captures it, else timed call by call ("events": the
provider's per-run host work included when it is longer than the kernel). LinearAttention twice: float32
throughout (our state precision) and bf16 with a bf16 state (its CUDA kernel wants the state in the
activation dtype).
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


_GRAPHS = []  # captured graphs stay alive: a peer may cache tensors allocated in a graph's memory pool


def timed_calls(fns, reps=20, graph=True) -> tuple[float, str]:
    """Milliseconds per call of the closures `fns` (different inputs, run in turn): CUDA graph replay
    of all of them when `graph` and capture works, else per-call CUDA events. Returns (ms, method)."""
    for f in fns:  # warm-up: compilation, autotuning, allocator pools
        f()
    torch.cuda.synchronize()
    try:
        if not graph:
            raise RuntimeError("not captured")
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for f in fns:
                f()
            with torch.cuda.graph(graph, stream=stream):
                for f in fns:
                    f()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        ms = timed(graph.replay, warmup=2, reps=reps)
        _GRAPHS.append(graph)
        return ms / len(fns), "graph"
    except Exception:  # noqa: BLE001
        torch.cuda.synchronize()
        ms = timed(lambda: [f() for f in fns], warmup=1, reps=max(3, reps // 4))
        return ms / len(fns), "events"


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


def why(e: Exception, n: int) -> str:
    """A failure's reason for a row: the first line of its message (or its type), at most n characters."""
    text = str(e).strip()
    return text.splitlines()[0][:n] if text else type(e).__name__


def try_fla():
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

        return chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    except Exception as e:  # noqa: BLE001
        return why(e, 100)


def try_flashqla():
    """FlashQLA's forward (Qwen's TileLang kernels; GVA heads native) and its name, or why it is not there."""
    try:
        import flash_qla
        from flash_qla import chunk_gated_delta_rule_fwd

        return chunk_gated_delta_rule_fwd, f"FlashQLA {flash_qla.__version__} chunk_gated_delta_rule_fwd"
    except Exception as e:  # noqa: BLE001 - a missing or broken peer is reported, not fatal
        return why(e, 100)


def flashqla_peer(fqla, sets, B, T, ref_out) -> dict:
    """The second prefill peer's fields for a row: FlashQLA on the same input sets (its auto intra-card
    context parallelism on, as shipped), or the reason it did not run."""
    if isinstance(fqla, str):
        return {"peer2": f"FlashQLA (not run: {fqla})"}
    fn, name = fqla

    def call(a):
        q, k, v, s0, decay, beta = a
        return lambda: fn(q.view(B, T, HK, D), k.view(B, T, HK, D), v.view(B, T, HV, D), decay.float(), beta,
                          scale=D**-0.5, initial_state=s0, output_final_state=True)

    try:
        out = call(sets[0])()[2]
        ms, method = timed_calls([call(a) for a in sets], reps=5 if T > 4096 else 20)
        return {"peer2": name, "peer2_ms": ms, "peer2_timing": method,
                "peer2_rel_err_out": rel_err(out.float().reshape(ref_out.shape), ref_out)}
    except Exception as e:  # noqa: BLE001
        return {"peer2": f"{name} (failed: {why(e, 80)})"}


def gdn_inputs(B, T, g):
    q = torch.nn.functional.normalize(torch.randn(B, T, HK, D, generator=g), dim=-1).reshape(B, T, HK * D)
    k = torch.nn.functional.normalize(torch.randn(B, T, HK, D, generator=g), dim=-1).reshape(B, T, HK * D)
    v = torch.randn(B, T, HV * D, generator=g)
    decay = -torch.rand(B, T, HV, generator=g) * 0.5
    beta = torch.rand(B, T, HV, generator=g)
    state = torch.randn(B, HV, D, D, generator=g) * 0.1
    cuda = lambda t, dt=torch.bfloat16: t.to("cuda", dt)  # noqa: E731
    return cuda(q), cuda(k), cuda(v), cuda(state, torch.float32), cuda(decay), cuda(beta)


def gdn_copies(q, k, v, s0, decay, beta, copies):
    """`copies` input sets: the first as given, the others perturbed (state too), so no call re-reads another's bytes."""
    sets = [(q, k, v, s0, decay, beta)]
    for i in range(1, copies):
        sets.append((q.roll(i, 0) if q.shape[0] > 1 else q, k, v, s0 * (1 + 1e-3 * i), decay, beta))
    return sets


def gdn_rows(rates, fla, quick, part, fqla="not asked"):
    g = torch.Generator().manual_seed(0)
    rows = []
    prefill = [(1, 4096), (1, 32768), (4, 8192)] if not quick else [(1, 4096)]
    decode = [(b, t) for b in (1, 32, 256) for t in (1, 2, 3, 4)] if not quick else [(32, 1), (32, 4)]
    for B, T in (prefill if part == "prefill" else decode):
        q, k, v, s0, decay, beta = gdn_inputs(B, T, g)
        state_bytes = 2 * B * HV * D * D * 4
        copies = 1 if T > 4 else max(1, min(64, (256 << 20) // state_bytes))
        sets = gdn_copies(q, k, v, s0, decay, beta, copies)
        scan = lambda impl, a: (lambda: torch_ops.linear_attention(*a[:3], a[3], a[4], a[5], HK, HV, D**-0.5, impl=impl))  # noqa: E731
        ref_out, ref_state = reference_scan(q.float(), k.float(), v.float(), s0, decay.float(), beta.float(), HK, HV, D**-0.5)
        act_bytes = B * T * (2 * HK * D + 2 * HV * D + 2 * HV) * 2
        flops = B * T * HV * 4 * 2 * D * D
        floor = max((act_bytes + state_bytes) / rates["copy_GBps"] / 1e6, flops / rates["bf16_TFLOPs"] / 1e9)
        peer_name, peer_ms, peer_method = "PyTorch reference (GPU, fp32)", None, None
        if not isinstance(fla, str):
            chunk, recurrent = fla

            def fla_call(a, T=T):
                qq, kk, vv, ss, dd, bb = a
                qf, kf = (x.view(B, T, HK, D).repeat_interleave(HV // HK, 2) for x in (qq, kk))
                fn = recurrent if T <= 4 else chunk
                return lambda: fn(qf, kf, vv.view(B, T, HV, D), dd.float(), bb, scale=D**-0.5, initial_state=ss, output_final_state=True)

            peer_name = "FLA " + ("fused_recurrent" if T <= 4 else "chunk") + "_gated_delta_rule"
            try:
                peer_ms, peer_method = timed_calls([fla_call(a) for a in sets], reps=5 if T > 4096 else 20)
            except Exception as e:  # noqa: BLE001
                peer_name += f" (failed: {why(e, 80)})"
        elif T <= 8192:
            peer_ms, peer_method = timed_calls([lambda: reference_scan(q.float(), k.float(), v.float(), s0, decay.float(), beta.float(), HK, HV, D**-0.5)], reps=3, graph=False)
        kernel = "GDN decode" if T <= 4 else "GDN prefill"
        impls = ([("auto", "decode")] + ([("simple", "simple")] if T == 1 else [])) if T <= 4 \
            else [("auto", "chunk_split"), ("chunk_tc", "chunk_tc"), ("chunk", "chunk"), ("simple", "simple")]
        for impl, label in impls:
            out, state = scan(impl, sets[0])()
            t, method = timed_calls([scan(impl, a) for a in sets], reps=5 if (T > 4096 or impl == "simple") else 20)
            rows.append({"kernel": f"{kernel} {label}", "shape": f"{B}x{T}", "ms": t, "timing": method, "copies": copies,
                         "floor_ms": floor, "peer": peer_name, "peer_ms": peer_ms, "peer_timing": peer_method,
                         "ratio_to_peer": (t / peer_ms) if peer_ms else None,
                         "state_bandwidth_fraction": (state_bytes / t / 1e6 / rates["copy_GBps"]) if T <= 4 else None,
                         "rel_err_out": rel_err(out.float(), ref_out), "rel_err_state": rel_err(state, ref_state)})
            print_row(rows[-1])
        if T > 4:
            # after ours, so that a fault in the peer cannot cost our rows of this shape
            peer2 = flashqla_peer(fqla, sets, B, T, ref_out)
            first = len(rows) - len(impls)
            for r in rows[first:]:
                r.update(peer2, **({"ratio_to_peer2": r["ms"] / peer2["peer2_ms"]} if "peer2_ms" in peer2 else {}))
            print(f"  peer 2: {peer2['peer2']}" + (f" {peer2['peer2_ms']:.4f} ms [{peer2['peer2_timing']}], rel err "
                                                   f"{peer2['peer2_rel_err_out']:.1e}" if "peer2_ms" in peer2 else ""), flush=True)
        del sets
        torch.cuda.empty_cache()
    return rows


def moe_weights(g):
    """Routed experts at the 80B sizes: FP8 bytes + 128x128 scales as the kernel takes them, and the
    same weights dequantised to bf16 (gate, up, down) for the reference and the bf16 peers."""
    gate = [torch.randn(INTER, H, generator=g) / H**0.5 for _ in range(E)]
    up = [torch.randn(INTER, H, generator=g) / H**0.5 for _ in range(E)]
    down = [torch.randn(H, INTER, generator=g) / INTER**0.5 for _ in range(E)]
    # gate and up quantised separately in 128x128 blocks (the checkpoint's form); the kernel takes their
    # bytes interleaved and their scales one above the other (plugins/moe/README.md)
    qg, qu, q2 = [quantize(w) for w in gate], [quantize(w) for w in up], [quantize(w) for w in down]
    fc1 = torch.stack([torch.stack([a.fp8, b.fp8], 1).reshape(2 * INTER, H) for a, b in zip(qg, qu)]).cuda()
    s1 = torch.stack([torch.cat([a.row_scale[::128], b.row_scale[::128]]) for a, b in zip(qg, qu)]).cuda()
    fc2 = torch.stack([q.fp8 for q in q2]).cuda()
    s2 = torch.stack([q.row_scale[::128] for q in q2]).cuda()  # row_scale repeats each block scale over its rows
    deq_gate = torch.stack([q.dequantize() for q in qg]).to("cuda", torch.bfloat16)
    deq_up = torch.stack([q.dequantize() for q in qu]).to("cuda", torch.bfloat16)
    deq_down = torch.stack([q.dequantize() for q in q2]).to("cuda", torch.bfloat16)
    del gate, up, down, qg, qu
    return fc1, s1, fc2, s2, deq_gate, deq_up, deq_down


def moe_rows(rates, quick):
    g = torch.Generator().manual_seed(1)
    fc1, s1, fc2, s2, deq_gate, deq_up, deq_down = moe_weights(g)
    rows = []
    for n in ((1, 8, 64, 1024, 4096) if not quick else (1, 64)):
        # Different routing per call: a repeated call would find its experts in L2.
        copies = 1 if n >= 4096 else max(1, min(32, 320 // (n * TOPK) * 4))
        xs = [torch.randn(n, H, generator=g).to("cuda", torch.bfloat16) for _ in range(copies)]
        ls = [torch.randn(n, E, generator=g).to("cuda", torch.bfloat16) for _ in range(copies)]
        call = lambda impl, x, lg: (lambda: torch_ops.moe_fp8(x, lg, fc1, s1, fc2, s2, TOPK, 1, impl=impl))  # noqa: E731
        w, idx = route_tokens(ls[0], TOPK, True)
        ref_out = moe_dispatch(xs[0], w, idx, deq_gate, deq_up, deq_down)
        peer, peer_method = timed_calls([lambda x=x, lg=lg: moe_dispatch(x, *route_tokens(lg, TOPK, True), deq_gate, deq_up, deq_down)
                                         for x, lg in zip(xs, ls)][:4], reps=8, graph=False)
        touched = sum(route_tokens(lg, TOPK, True)[1].unique().numel() for lg in ls) / copies
        weight_bytes = touched * 3 * H * INTER + touched * (2 * INTER // 128 * H // 128 + H // 128 * INTER // 128) * 4
        act_bytes = n * (2 * H * 2 + E * 2)
        flops = n * TOPK * 3 * 2 * H * INTER
        floor = max((weight_bytes + act_bytes) / rates["copy_GBps"] / 1e6, flops / rates["bf16_TFLOPs"] / 1e9)
        # each path forced (auto takes prefill from 2 pairs per expert: 103 tokens here)
        impls = (("fast", "fast"),) + ((("prefill", "prefill"),) if n >= 1024 else ()) + (("simple", "simple"),)
        for impl, label in impls:
            out = call(impl, xs[0], ls[0])()
            t, method = timed_calls([call(impl, x, lg) for x, lg in zip(xs, ls)], reps=5 if n >= 4096 else 20)
            rows.append({"kernel": f"MoE FP8 {label}", "shape": f"{n} tokens", "ms": t, "timing": method, "copies": copies,
                         "experts_touched": touched, "floor_ms": floor,
                         "peer": "PyTorch expert loop (bf16 dequantised weights)", "peer_ms": peer, "peer_timing": peer_method,
                         "ratio_to_peer": t / peer, "rel_err_out": rel_err(out.float(), ref_out.float())})
            print_row(rows[-1])
    return rows


# -- ONNX Runtime's CUDA kernels as peers (--peer ort) ----------------------------------------------

def ort_name() -> str:
    import onnxruntime as ort

    return f"ORT CUDA {ort.__version__}"


_ONNX_TYPES = {torch.float32: 1, torch.float16: 10, torch.bfloat16: 16, torch.int64: 7}


def single_node_model(op: str, inputs: dict, outputs: dict, **attrs) -> bytes:
    """One com.microsoft node over graph inputs/outputs named and typed as the given tensors ('' = an
    omitted optional input)."""
    from onnx import helper

    io = lambda d: [helper.make_tensor_value_info(n, _ONNX_TYPES[t.dtype], list(t.shape)) for n, t in d.items() if t is not None]  # noqa: E731
    node = helper.make_node(op, [n if t is not None else "" for n, t in inputs.items()], list(outputs), domain="com.microsoft", **attrs)
    model = helper.make_model(helper.make_graph([node], op, io(inputs), io(outputs)),
                              opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model.SerializeToString()


def ort_timed(model: bytes, calls: list, reps: int) -> tuple[float | None, str, str | None]:
    """ms per call of the single-node graph over `calls` [(inputs {name: cuda tensor}, outputs {name:
    cuda tensor written in place})], run in turn; CUDA events on the stream the provider computes on.
    Returns (ms, method, note: why the provider's CUDA graph was not used, or the error)."""
    import onnxruntime as ort

    stream = torch.cuda.Stream()
    dev = torch.cuda.current_device()
    note = None
    torch.cuda.synchronize()
    for graph in (True, False):
        try:
            options = {"device_id": str(dev), "use_tf32": "0", "user_compute_stream": str(stream.cuda_stream)}
            if graph:
                options["enable_cuda_graph"] = "1"
            so = ort.SessionOptions()
            so.log_severity_level = 3
            sess = ort.InferenceSession(model, so, providers=[("CUDAExecutionProvider", options)])
            binds, runs = [], []
            for j, (ins, outs) in enumerate(calls):
                b = sess.io_binding()
                for n, t in ins.items():
                    if t is not None:
                        b.bind_input(n, "cuda", dev, _ONNX_TYPES[t.dtype], list(t.shape), t.data_ptr())
                for n, t in outs.items():
                    b.bind_output(n, "cuda", dev, _ONNX_TYPES[t.dtype], list(t.shape), t.data_ptr())
                r = ort.RunOptions()
                r.add_run_config_entry("disable_synchronize_execution_providers", "1")
                if graph:
                    r.add_run_config_entry("gpu_graph_id", str(j + 1))
                binds.append(b)
                runs.append(r)
            with torch.cuda.stream(stream):
                ms = timed(lambda: [sess.run_with_iobinding(b, r) for b, r in zip(binds, runs)], warmup=4, reps=reps)
            torch.cuda.synchronize()
            return ms / len(calls), "ort-graph" if graph else "events", note
        except Exception as e:  # noqa: BLE001 - the provider's reason goes into the row
            torch.cuda.synchronize()
            note = f"{'CUDA graph' if graph else 'run'} refused: {why(e, 200)}"
    return None, "failed", note


def ort_gdn_rows(rates, part):
    """Our GDN kernel and ONNX Runtime's LinearAttention (float32; bf16 with a bf16 state) on the same inputs."""
    g = torch.Generator().manual_seed(0)
    rows = []
    shapes = [(32, 1), (256, 1)] if part == "decode" else [(1, 4096), (1, 32768)]
    for B, T in shapes:
        q, k, v, s0, decay, beta = gdn_inputs(B, T, g)
        state_bytes = 2 * B * HV * D * D * 4
        copies = 1 if T > 4 else max(1, min(64, (256 << 20) // state_bytes))
        sets = gdn_copies(q, k, v, s0, decay, beta, copies)
        ref_out, ref_state = reference_scan(q.float(), k.float(), v.float(), s0, decay.float(), beta.float(), HK, HV, D**-0.5)
        act_bytes = B * T * (2 * HK * D + 2 * HV * D + 2 * HV) * 2
        flops = B * T * HV * 4 * 2 * D * D
        floor = max((act_bytes + state_bytes) / rates["copy_GBps"] / 1e6, flops / rates["bf16_TFLOPs"] / 1e9)
        label = "decode" if T <= 4 else "chunk_split"
        reps = 5 if T > 4096 else 20
        scan = lambda a: (lambda: torch_ops.linear_attention(*a[:3], a[3], a[4], a[5], HK, HV, D**-0.5, impl="auto"))  # noqa: E731
        out, state = scan(sets[0])()
        ours, method = timed_calls([scan(a) for a in sets], reps=reps)
        ours_err = (rel_err(out.float(), ref_out), rel_err(state, ref_state))
        del out, state
        for dtype, state_dtype, tag in ((torch.float32, torch.float32, "fp32"), (torch.bfloat16, torch.bfloat16, "bf16, bf16 state")):
            calls = []
            for qq, kk, vv, ss, dd, bb in sets:
                ins = {"query": qq.to(dtype), "key": kk.to(dtype), "value": vv.to(dtype), "past_state": ss.to(state_dtype),
                       "decay": dd.to(dtype), "beta": bb.to(dtype)}
                outs = {"output": torch.full((B, T, HV * D), float("nan"), device="cuda", dtype=dtype),
                        "present_state": torch.full((B, HV, D, D), float("nan"), device="cuda", dtype=state_dtype)}
                calls.append((ins, outs))
            model = single_node_model("LinearAttention", calls[0][0], calls[0][1], q_num_heads=HK, kv_num_heads=HV,
                                      update_rule="gated_delta", scale=D**-0.5)
            peer_ms, peer_method, note = ort_timed(model, calls, reps)
            o = calls[0][1]
            rows.append({"kernel": f"GDN {'decode' if T <= 4 else 'prefill'} {label}", "shape": f"{B}x{T}", "ms": ours, "timing": method,
                         "copies": copies, "floor_ms": floor, "peer": f"{ort_name()} LinearAttention ({tag})", "peer_ms": peer_ms,
                         "peer_timing": peer_method, "peer_note": note, "ratio_to_peer": ours / peer_ms if peer_ms else None,
                         "rel_err_out": ours_err[0], "rel_err_state": ours_err[1],
                         "peer_rel_err_out": rel_err(o["output"].float(), ref_out) if peer_ms else None,
                         "peer_rel_err_state": rel_err(o["present_state"].float(), ref_state) if peer_ms else None})
            print_row(rows[-1])
            del calls
            torch.cuda.empty_cache()
        del sets
        torch.cuda.empty_cache()
    return rows


def ort_moe_rows(rates):
    """Our FP8 MoE (fast decode path) and ONNX Runtime's MoE (bf16 weights: the same values dequantised,
    which is also what the reference computes with) on the same tokens and router logits."""
    g = torch.Generator().manual_seed(1)
    fc1, s1, fc2, s2, deq_gate, deq_up, deq_down = moe_weights(g)
    # swiglu_fusion 1: gate and up rows interleaved, as the export hands them to the node
    fc1_bf16 = torch.stack([deq_gate, deq_up], 2).reshape(E, 2 * INTER, H).contiguous()
    rows = []
    for n in (1, 8, 64):
        copies = max(1, min(32, 320 // (n * TOPK) * 4))
        xs = [torch.randn(n, H, generator=g).to("cuda", torch.bfloat16) for _ in range(copies)]
        ls = [torch.randn(n, E, generator=g).to("cuda", torch.bfloat16) for _ in range(copies)]
        w, idx = route_tokens(ls[0], TOPK, True)
        ref_out = moe_dispatch(xs[0], w, idx, deq_gate, deq_up, deq_down)
        touched = sum(route_tokens(lg, TOPK, True)[1].unique().numel() for lg in ls) / copies
        weight_bytes = touched * 3 * H * INTER + touched * (2 * INTER // 128 * H // 128 + H // 128 * INTER // 128) * 4
        floor = max((weight_bytes + n * (2 * H * 2 + E * 2)) / rates["copy_GBps"] / 1e6, n * TOPK * 3 * 2 * H * INTER / rates["bf16_TFLOPs"] / 1e9)
        call = lambda x, lg: (lambda: torch_ops.moe_fp8(x, lg, fc1, s1, fc2, s2, TOPK, 1, impl="fast"))  # noqa: E731
        out = call(xs[0], ls[0])()
        ours, method = timed_calls([call(x, lg) for x, lg in zip(xs, ls)], reps=20)
        calls = [({"input": x, "router_probs": lg, "fc1_experts_weights": fc1_bf16, "fc1_experts_bias": None,
                   "fc2_experts_weights": deq_down, "fc2_experts_bias": None},
                  {"output": torch.full((n, H), float("nan"), device="cuda", dtype=torch.bfloat16)}) for x, lg in zip(xs, ls)]
        model = single_node_model("MoE", calls[0][0], calls[0][1], k=TOPK, activation_type="swiglu", swiglu_fusion=1,
                                  normalize_routing_weights=1, use_sparse_mixer=0, activation_alpha=1.0, activation_beta=0.0)
        peer_ms, peer_method, note = ort_timed(model, calls, 20)
        rows.append({"kernel": "MoE FP8 fast", "shape": f"{n} tokens", "ms": ours, "timing": method, "copies": copies,
                     "experts_touched": touched, "floor_ms": floor, "peer": f"{ort_name()} MoE (bf16 weights)", "peer_ms": peer_ms,
                     "peer_timing": peer_method, "peer_note": note, "ratio_to_peer": ours / peer_ms if peer_ms else None,
                     "rel_err_out": rel_err(out.float(), ref_out.float()),
                     "peer_rel_err_out": rel_err(calls[0][1]["output"].float(), ref_out.float()) if peer_ms else None})
        print_row(rows[-1])
    return rows


def print_row(r):
    peer = f"{r['peer_ms']:.4f} ms ({r['ratio_to_peer']:.2f}x)" if r.get("peer_ms") else "-"
    extra = f"  state BW {r['state_bandwidth_fraction']:.0%}" if r.get("state_bandwidth_fraction") else ""
    if r.get("peer_rel_err_out") is not None:
        extra += f"  peer rel err {r['peer_rel_err_out']:.1e}"
    if r.get("peer_note"):
        extra += f"  [{r['peer']}: {r['peer_note']}]"
    print(f"{r['kernel']:<20}{r['shape']:>12}{r['ms']:>10.4f} ms [{r['timing']}]  floor {r['floor_ms']:.4f} ms "
          f"({r['floor_ms'] / r['ms']:.0%} of it)  peer {peer:<24}  rel err {r['rel_err_out']:.1e}{extra}", flush=True)


def peer_cells(r, key: str) -> list[str]:
    """A row's table cells for one peer (key "peer" or "peer2"): name, ms (timing), ours/peer, its rel err."""
    return [r.get(key) or "-",
            f"{r[key + '_ms']:.4f} ({r.get(key + '_timing')})" if r.get(key + "_ms") else "-",
            f"{r['ratio_to_' + key]:.2f}x" if r.get("ratio_to_" + key) else "-",
            f"{r[key + '_rel_err_out']:.1e}" if r.get(key + "_rel_err_out") is not None else "-"]


def print_table(rows):
    second = any("peer2" in r for r in rows)
    print("\n| kernel | shape | ours ms | peer | peer ms | ours/peer | floor ms | % of floor | rel err | peer rel err |"
          + (" peer 2 | peer 2 ms | ours/peer 2 | peer 2 rel err |" if second else ""))
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|---|" if second else ""))
    for r in rows:
        name, ms, ratio, err = peer_cells(r, "peer")
        cells = [r["kernel"], r["shape"], f"{r['ms']:.4f}", name, ms, ratio, f"{r['floor_ms']:.4f}",
                 f"{r['floor_ms'] / r['ms']:.0%}", f"{r['rel_err_out']:.1e}", err] + (peer_cells(r, "peer2") if second else [])
        print("| " + " | ".join(cells) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["decode", "prefill", "moe"], help="one part (bench/device/kernels_run.sh runs each in its own process)")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="only merge these per-part results into --out and print the table")
    ap.add_argument("--peer", choices=["ort"], help="ort: ONNX Runtime's CUDA kernels as the peer, at their shapes (needs onnxruntime-gpu)")
    args = ap.parse_args()
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        merged = {**parts[0], "command": " ; ".join(p["command"] for p in parts), "rows": [r for p in parts for r in p["rows"]]}
        Path(args.out).write_text(json.dumps(merged, indent=2))
        print_table(merged["rows"])
        return
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA GPU")
    name = torch.cuda.get_device_name()
    clocks = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm,clocks.mem", "--format=csv,noheader"],
                            capture_output=True, text=True).stdout.strip()
    rates = machine_rates()
    fla = try_fla()
    fqla = try_flashqla() if args.only in (None, "prefill") and args.peer is None else "not asked"
    print(f"{name} (sm_{''.join(map(str, torch.cuda.get_device_capability()))}), clocks sm/max/mem {clocks}; "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; copy {rates['copy_GBps']:.0f} GB/s, "
          f"bf16 matmul {rates['bf16_TFLOPs']:.0f} TFLOP/s; FLA: {'yes' if not isinstance(fla, str) else 'no (' + fla + ')'}"
          + (f"; FlashQLA: {'yes' if not isinstance(fqla, str) else 'no (' + fqla + ')'}" if fqla != "not asked" else ""))
    rows = []
    for part in ("decode", "prefill", "moe"):
        if args.only not in (None, part):
            continue
        if args.peer == "ort":
            rows += ort_moe_rows(rates) if part == "moe" else ort_gdn_rows(rates, part)
        else:
            rows += moe_rows(rates, args.quick) if part == "moe" else gdn_rows(rates, fla, args.quick, part, fqla)
    print_table(rows)
    out = Path(args.out or f"bench/results/kernels-{name.replace(' ', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, "clocks": clocks, "rates": rates, "command": " ".join(sys.argv),
                               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                               "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
