"""FP8 block-scaled GEMM for the dense projections, in Triton: y = x @ W^T with W kept exactly as the
official FP8 checkpoint stores it (float8 e4m3 [N, K] + float32 `weight_scale_inv` [ceil(N/128), ceil(K/128)],
W = fp8 * scale[n // 128, k // 128]).

    fp8_gemm(x [M, K] bf16, w [N, K] float8_e4m3fn, scale [N/128, K/128] f32)          -> y [M, N] bf16
    fp8_gemm(x, w, scale, split=n1)                                                     -> (y[:, :n1], y[:, n1:]) as two
                                                                                           contiguous tensors
    fp8_gemv(x [M <= 8, K], w, scale, split=None, wb=None [NB, K] bf16)                 -> the same (+ x @ wb^T appended)
Why a kernel of ours: on the H200 with torch 2.11 `torch._scaled_mm` takes per-tensor and row-wise scales,
which cannot represent the checkpoint's 128 x 128 blocks, and its block-scaled form was refused in the forms
tried (../shared/PLATFORM.md); `bench/e2e_80b.py` times `torch.nn.functional.scaled_mm`'s block recipes
again beside this kernel and takes the faster one that runs.

Weight-only: activations stay bf16; each weight tile is converted to bf16 in registers (exact: every e4m3
value is a bf16 value) and multiplied on tensor cores; the block scale multiplies the tile's partial product
(one scale per 128 x 128 block: BK = 128), accumulation in float32, one rounding of the output. Decode-sized
M is bound by the weight bytes, so the tiles are chosen to spread N over enough programs to keep the memory
system busy; large M (prefill) uses 128 x 128 tiles in grouped order so that neighbouring programs share
weight tiles in L2. `split` writes the first n1 output columns and the rest to two tensors (n1 a multiple of
the tile width), so a fused projection (e.g. DeltaNet's [q|k|v] and z) needs no copy afterwards.

`fp8_gemv` is the decode form for M <= 8 (one to eight tokens): no tensor cores, each program streams BN
weight rows once, keeps [M, BN, BK] float32 partial products in registers (the block scale folded into the
activations of each 128-column block) and reduces once at the end, so nothing passes through shared memory
between the load and the multiply. It can also run a bf16 weight that reads the same input in the same
launch (`wb`: DeltaNet's in_proj_ba beside in_proj_qkvz, the router beside the shared expert's gate/up),
which saves a launch of a few microseconds per layer.
"""

from __future__ import annotations

import os

import torch

try:  # Triton is there on GPU machines; the CPU dev machine may lack it (then only the torch reference runs)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

BLOCK = 128
# Triton's CPU interpreter (TRITON_INTERPRET=1, how the dev machine tests these kernels) multiplies bf16 dot
# operands wrongly; there the operands go to float32 first. Compiled kernels keep bf16 tensor-core dots.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def dequantize(w: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """W = fp8 * scale per 128 x 128 block (N and K multiples of 128), in `dtype`: the oracle of the kernel."""
    N, K = w.shape
    blocks = w.view(N // BLOCK, BLOCK, K // BLOCK, BLOCK).to(dtype)
    return (blocks * scale.to(dtype)[:, None, :, None]).view(N, K)


if triton is not None:

    @triton.jit(do_not_specialize=["M", "n_split"])  # one compile per tile config, whatever the batch
    def _fp8_gemm_kernel(x_ptr, w_ptr, s_ptr, y_ptr, y2_ptr, M, N, K, n_split,
                         stride_xm, stride_wn, stride_sn, stride_ym, stride_y2m,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                         F32_DOT: tl.constexpr):
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        # Grouped order: GROUP_M row tiles walk the column tiles together, so a weight tile read by one
        # program is still in L2 for the next (matters only when M spans several row tiles: prefill).
        per_group = GROUP_M * num_n
        group = pid // per_group
        first_m = group * GROUP_M
        rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % rows_in_group
        pid_n = (pid % per_group) // rows_in_group

        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_k = tl.arange(0, BK)
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
        w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :]
        s_ptrs = s_ptr + (offs_n // 128) * stride_sn
        m_ok = offs_m[:, None] < M
        n_ok = offs_n[:, None] < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            a = tl.load(x_ptrs, mask=m_ok, other=0.0)
            b = tl.load(w_ptrs, mask=n_ok, other=0.0).to(tl.bfloat16)
            if F32_DOT:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            s = tl.load(s_ptrs + k0 // 128, mask=offs_n < N, other=0.0)
            acc += tl.dot(a, tl.trans(b)) * s[None, :]
            x_ptrs += BK
            w_ptrs += BK
        out = acc.to(y_ptr.dtype.element_ty)
        if pid_n * BN < n_split:
            ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
            tl.store(ptrs, out, mask=m_ok & (offs_n[None, :] < n_split))
        else:
            ptrs = y2_ptr + offs_m[:, None] * stride_y2m + (offs_n[None, :] - n_split)
            tl.store(ptrs, out, mask=m_ok & (offs_n[None, :] < N))


    @triton.jit(do_not_specialize=["M", "n_split"])
    def _fp8_gemv_kernel(x_ptr, w_ptr, s_ptr, wb_ptr, y_ptr, y2_ptr, yb_ptr, M, N, NB, K, n_split,
                         stride_xm, stride_wn, stride_sn, stride_wbn, stride_ym, stride_y2m, stride_ybm,
                         MP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pid = tl.program_id(0)
        fp8_tiles = tl.cdiv(N, BN)
        offs_m = tl.arange(0, MP)
        offs_k = tl.arange(0, BK)
        m_ok = offs_m[:, None] < M
        acc = tl.zeros((MP, BN, BK), dtype=tl.float32)
        if pid < fp8_tiles:
            offs_n = pid * BN + tl.arange(0, BN)
            n_ok = offs_n[:, None] < N
            s_row = s_ptr + ((pid * BN) // 128) * stride_sn  # BN divides 128: one row of scale blocks per tile
            for k0 in range(0, K, BK):
                w = tl.load(w_ptr + offs_n[:, None] * stride_wn + (k0 + offs_k)[None, :], mask=n_ok, other=0.0)
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :], mask=m_ok, other=0.0)
                xs = x.to(tl.float32) * tl.load(s_row + (k0 + offs_k) // 128)[None, :]
                acc += w.to(tl.float32)[None, :, :] * xs[:, None, :]
            out = tl.sum(acc, 2).to(y_ptr.dtype.element_ty)
            if pid * BN < n_split:
                tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], out, mask=m_ok & (offs_n[None, :] < n_split))
            else:
                tl.store(y2_ptr + offs_m[:, None] * stride_y2m + (offs_n[None, :] - n_split), out,
                         mask=m_ok & (offs_n[None, :] < N))
        else:
            offs_n = (pid - fp8_tiles) * BN + tl.arange(0, BN)
            n_ok = offs_n[:, None] < NB
            for k0 in range(0, K, BK):
                w = tl.load(wb_ptr + offs_n[:, None] * stride_wbn + (k0 + offs_k)[None, :], mask=n_ok, other=0.0)
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :], mask=m_ok, other=0.0)
                acc += w.to(tl.float32)[None, :, :] * x.to(tl.float32)[:, None, :]
            out = tl.sum(acc, 2).to(yb_ptr.dtype.element_ty)
            tl.store(yb_ptr + offs_m[:, None] * stride_ybm + offs_n[None, :], out, mask=m_ok & (offs_n[None, :] < NB))


# (BM, BN, num_warps, num_stages) by the smallest M class that holds M. Decode classes keep BN small so
# that N = 2048 still spreads over >= 64 programs; bench/e2e_80b.py may replace entries after timing.
CONFIGS = {
    16: (16, 32, 4, 4),
    32: (32, 32, 4, 4),
    64: (64, 64, 4, 4),
    256: (64, 128, 4, 3),
    1 << 62: (128, 128, 8, 3),
}


# fp8_gemv: (BN, BK, num_warps, num_stages) by MP = M rounded up to a power of two (1, 2, 4, 8)
GEMV_CONFIGS = {1: (16, 256, 4, 3), 2: (16, 256, 4, 3), 4: (8, 256, 4, 3), 8: (8, 128, 4, 3)}
GEMV_MAX_M = 8


def m_class(M: int) -> int:
    return min(c for c in CONFIGS if M <= c)


def fp8_gemv(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, split: int | None = None, wb: torch.Tensor | None = None,
             config=None):
    """fp8_gemm for M <= 8; with `wb` [NB, K] (bf16) also x @ wb^T from the same launch, appended to the result."""
    if triton is None:
        raise RuntimeError("fp8_gemv needs triton")
    M, K = x.shape
    N = w.shape[0]
    if M > GEMV_MAX_M or w.shape[1] != K or K % BLOCK or x.stride(1) != 1 or not w.is_contiguous() or not scale.is_contiguous():
        raise ValueError(f"fp8_gemv: x {tuple(x.shape)}, w {tuple(w.shape)}: M <= {GEMV_MAX_M}, K a multiple of 128 matching, "
                         "row-contiguous operands")
    MP = 1 << max(0, (M - 1).bit_length())
    BN, BK, warps, stages = config or GEMV_CONFIGS[MP]
    while K % BK:  # a short K (e.g. the shared expert's down projection) takes a shorter step
        BK //= 2
    if 128 % BN or BK < 128:
        raise ValueError(f"fp8_gemv: tile BN={BN} must divide 128 and BK={BK} be a power of two >= 128")
    n1 = N if split is None else int(split)
    if n1 % BN and n1 != N:
        raise ValueError(f"fp8_gemv: split {n1} is not a multiple of the tile width {BN}")
    y = torch.empty(M, n1, device=x.device, dtype=x.dtype)
    y2 = torch.empty(M, N - n1, device=x.device, dtype=x.dtype) if n1 < N else y
    NB = 0 if wb is None else wb.shape[0]
    if wb is not None and (wb.shape[1] != K or not wb.is_contiguous()):
        raise ValueError(f"fp8_gemv: wb {tuple(wb.shape)} must be [NB, {K}] contiguous")
    yb = torch.empty(M, NB, device=x.device, dtype=x.dtype) if NB else y
    grid = (triton.cdiv(N, BN) + triton.cdiv(NB, BN),)
    _fp8_gemv_kernel[grid](x, w, scale, wb if wb is not None else w, y, y2, yb, M, N, NB, K, n1, x.stride(0), w.stride(0),
                           scale.stride(0), wb.stride(0) if wb is not None else 0, y.stride(0), y2.stride(0), yb.stride(0),
                           MP=MP, BN=BN, BK=BK, num_warps=warps, num_stages=stages)
    out = (y,) if split is None else (y, y2)
    if NB:
        out = (*out, yb)
    return out[0] if len(out) == 1 else out


def fp8_gemm(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, split: int | None = None, config=None):
    """y = x @ dequantize(w, scale)^T in x's dtype. x [M, K] (row stride free, unit column stride);
    w [N, K] float8_e4m3fn contiguous; scale [ceil(N/128), ceil(K/128)] float32 contiguous."""
    if triton is None:
        raise RuntimeError("fp8_gemm needs triton")
    M, K = x.shape
    N = w.shape[0]
    if w.shape[1] != K or K % BLOCK or x.stride(1) != 1 or not w.is_contiguous() or not scale.is_contiguous():
        raise ValueError(f"fp8_gemm: x {tuple(x.shape)} stride {x.stride()}, w {tuple(w.shape)}: K must match, be a multiple "
                         "of 128, and x/w/scale be row-contiguous")
    BM, BN, warps, stages = config or CONFIGS[m_class(M)]
    n1 = N if split is None else int(split)
    if n1 % BN and n1 != N:
        raise ValueError(f"fp8_gemm: split {n1} is not a multiple of the tile width {BN}")
    y = torch.empty(M, n1, device=x.device, dtype=x.dtype)
    y2 = torch.empty(M, N - n1, device=x.device, dtype=x.dtype) if n1 < N else y
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    _fp8_gemm_kernel[grid](x, w, scale, y, y2, M, N, K, n1, x.stride(0), w.stride(0), scale.stride(0),
                           y.stride(0), y2.stride(0), BM=BM, BN=BN, BK=BLOCK, GROUP_M=8, F32_DOT=INTERPRET,
                           num_warps=warps, num_stages=stages)
    return y if split is None else (y, y2)


__all__ = ["CONFIGS", "GEMV_CONFIGS", "GEMV_MAX_M", "dequantize", "fp8_gemm", "fp8_gemv", "m_class"]
