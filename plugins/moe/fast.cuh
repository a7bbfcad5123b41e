// Fast FP8 MoE path (q3n_moe_fp8 when the shapes fit): the same three stages as kernel.cu, the same
// workspace layout, rewritten for bandwidth. At decode sizes the layer is a stream of FP8 weight
// bytes (10 experts x 3 MiB per token at 80B sizes), so what matters is 16-byte loads, many of them in
// flight per thread, no dependent-load chains, and little time between kernels:
//   route:  one block per token, one thread per expert (E <= 1024): softmax, warp sorts, ranks.
//   fc1:    block (token*k + slot, 8 intermediate rows j); warp = two gate/up row pairs (2j, 2j+1):
//           each lane loads 16 FP8 bytes per 512 columns of all four rows at once, dequantises
//           (cvt e4m3x2 -> half2), dots with x, applies the block scale per 16 columns; at decode
//           sizes it also prefetches the expert's fc2 rows into L2.
//   fc2:    block (token, 16 hidden rows); warp = one row h: the k expert ids and weights are read
//           first, then all k weight loads are issued before any arithmetic, so the k experts'
//           latencies overlap instead of adding up; the token's k SwiGLU rows are staged once per
//           block in shared memory (in registers they cost more than the weights in flight);
//           weighted sum in registers, no atomics (deterministic).
// On sm_90 the three kernels are chained with programmatic dependent launch: each starts while the
// previous drains and waits (griddepcontrol.wait) before reading its results.
#pragma once

#include <cuda_fp8.h>

#include <cfloat>
#include <climits>

#include "../common.cuh"

namespace q3n_moe_fast {

constexpr int kMaxTopK = 16;
constexpr int kMaxExperts = 1024;  // 32 logits per lane
constexpr int kFc1Warps = 4;
constexpr int kFc1Rows = 2;  // intermediate rows per fc1 warp
constexpr int kPrefetchPairs = 64;  // fc1 prefetches fc2 into L2 up to this many (token, slot) pairs
constexpr int kFc2Warps = 16;  // rows per fc2 block: divides 128, so a block's rows share their scale row
constexpr int kMaxScaleCols = 32;  // ceil(I / 128) for fc2's staged scales
constexpr int kMaxActFloats = 11264;  // top_k * (inter rounded up to 512) floats: fc2 staging, 44 KiB (+ static) < 48 KiB
constexpr int kFp8Block = 128;
constexpr int kChunkCols = 512;  // columns one warp covers with one 16-byte load per lane

// 16 consecutive activations as float, from a 16-element-aligned position.
template <typename T>
__device__ __forceinline__ void load16(const T* p, float v[16]) {
#pragma unroll
    for (int i = 0; i < 16; ++i) v[i] = q3n::to_float(p[i]);
}
template <>
__device__ __forceinline__ void load16<__nv_bfloat16>(const __nv_bfloat16* p, float v[16]) {
    const uint4 a = *reinterpret_cast<const uint4*>(p), b = *reinterpret_cast<const uint4*>(p + 8);
    const uint32_t w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        // bf16 -> float is a 16-bit shift
        v[2 * i] = __uint_as_float(w[i] << 16);
        v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
template <>
__device__ __forceinline__ void load16<float>(const float* p, float v[16]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float4 f = reinterpret_cast<const float4*>(p)[i];
        v[4 * i] = f.x, v[4 * i + 1] = f.y, v[4 * i + 2] = f.z, v[4 * i + 3] = f.w;
    }
}

// sum_i fp8[i] * x[i] over 16 e4m3 values packed in a uint4.
__device__ __forceinline__ float dot16_fp8(uint4 w, const float x[16]) {
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
    float acc = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int half_word = 0; half_word < 2; ++half_word) {
            const __nv_fp8x2_storage_t pair = static_cast<__nv_fp8x2_storage_t>(words[i] >> (16 * half_word));
            const __half2_raw h2 = __nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3);
            const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h2));
            acc += f.x * x[4 * i + 2 * half_word] + f.y * x[4 * i + 2 * half_word + 1];
        }
    }
    return acc;
}

struct Cand {
    float value;
    int index;
};
// Higher probability wins; ties go to the lower expert index (torch.topk's order, as kernel.cu).
__device__ __forceinline__ Cand better(Cand a, Cand b) {
    return (a.value > b.value || (a.value == b.value && a.index < b.index)) ? a : b;
}

__device__ __forceinline__ bool is_better(Cand a, Cand b) {
    return a.value > b.value || (a.value == b.value && a.index < b.index);
}

// One block per token, one thread per expert (32 * ceil(E/32) threads): softmax by block reductions;
// each warp sorts its 32 candidates (bitonic, by `better`), its first k go to shared memory, and
// each of those candidates finds its rank among them by counting the better ones: k experts
// without k sequential rounds.
template <typename T>
__global__ void __launch_bounds__(kMaxExperts) route_kernel(const T* __restrict__ logits, int tokens, int experts,
                                                            int top_k, int normalize, int* __restrict__ selected,
                                                            float* __restrict__ weights) {
    __shared__ float red[32];
    __shared__ Cand cand[kMaxExperts / 32 * kMaxTopK];
    __shared__ Cand chosen[kMaxTopK];
    q3n::launch_dependents();
    const int64_t n = blockIdx.x;
    const int e = threadIdx.x, lane = e & 31, warp = e >> 5, warps = blockDim.x >> 5;
    const float l = e < experts ? q3n::load(logits + n * experts, e) : -INFINITY;

    float m = l;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (lane == 0) red[warp] = m;
    __syncthreads();
    m = red[0];
    for (int w = 1; w < warps; ++w) m = fmaxf(m, red[w]);
    const float p = e < experts ? expf(l - m) : 0.f;
    __syncthreads();  // red is reused
    const float ws = q3n::warp_sum(p);
    if (lane == 0) red[warp] = ws;
    __syncthreads();
    float s = 0.f;
    for (int w = 0; w < warps; ++w) s += red[w];
    const float v = p / s;
    // NaN ranks as -0.5 so that k distinct experts are still chosen; padding ranks lowest
    Cand c{e < experts ? (v != v ? -0.5f : v) : -3.0f, e};

#pragma unroll
    for (int size = 2; size <= 32; size <<= 1) {
#pragma unroll
        for (int stride = size / 2; stride > 0; stride >>= 1) {
            const Cand o{__shfl_xor_sync(0xffffffffu, c.value, stride), __shfl_xor_sync(0xffffffffu, c.index, stride)};
            const bool first = (lane & stride) == 0, descending = (lane & size) == 0;
            const bool keep_better = first == descending;
            c = is_better(o, c) == keep_better ? o : c;
        }
    }
    if (lane < top_k) cand[warp * top_k + lane] = c;
    __syncthreads();
    const int ncand = warps * min(top_k, 32);
    if (e < ncand) {
        const Cand me = cand[e];
        int rank = 0;
        for (int j = 0; j < ncand; ++j) rank += is_better(cand[j], me);
        if (rank < top_k) chosen[rank] = me;
    }
    __syncthreads();
    if (e < top_k) {
        float total = 0.f;
        for (int r = 0; r < top_k; ++r) total += chosen[r].value == -0.5f ? NAN : chosen[r].value;
        const float w = chosen[e].value == -0.5f ? NAN : chosen[e].value;
        selected[n * top_k + e] = chosen[e].index;
        weights[n * top_k + e] = normalize ? w / total : w;
    }
}

// Block (pair, kFc1Warps * kFc1Rows intermediate rows); warp = kFc1Rows (gate, up) row pairs, so each
// lane has 4 * kFc1Rows 16-byte weight loads in flight per 2048 columns, and at 80B sizes a 1-token
// call (10 pairs x 64 blocks of 128 threads) fits in one wave. With `prefetch_fc2`, each block also
// pulls its share of the expert's fc2 rows into L2, so that fc2 (next kernel) reads them from L2 and
// the whole layer is one stream from memory (decode; pointless when many tokens share experts).
template <typename T>
__global__ void __launch_bounds__(32 * kFc1Warps, 5) fc1_kernel(const T* __restrict__ x, const unsigned char* __restrict__ fc1,
                                                                const float* __restrict__ scale1, const int* selected,
                                                                float* act, const unsigned char* __restrict__ fc2,
                                                                int prefetch_fc2, int hidden, int inter, int top_k,
                                                                int scale_rows, int scale_cols) {
    q3n::launch_dependents();
    const int64_t pair = blockIdx.x;
    const int64_t n = pair / top_k;
    const int lane = threadIdx.x & 31;
    const int j0 = (blockIdx.y * kFc1Warps + threadIdx.x / 32) * kFc1Rows;
    q3n::grid_dependency_wait();
    const int e = selected[pair];
    const T* xr = x + n * hidden;
    float g[kFc1Rows] = {}, u[kFc1Rows] = {};
    for (int c0 = 0; c0 < hidden; c0 += 4 * kChunkCols) {
        uint4 a[kFc1Rows][4], b[kFc1Rows][4];
#pragma unroll
        for (int r = 0; r < kFc1Rows; ++r) {
            const unsigned char* wg = fc1 + ((int64_t)e * 2 * inter + 2 * (j0 + r)) * hidden;
#pragma unroll
            for (int m = 0; m < 4; ++m) {
                const int c = c0 + m * kChunkCols + lane * 16;
                if (c < hidden) {
                    a[r][m] = __ldg(reinterpret_cast<const uint4*>(wg + c));
                    b[r][m] = __ldg(reinterpret_cast<const uint4*>(wg + hidden + c));
                }
            }
        }
#pragma unroll
        for (int m = 0; m < 4; ++m) {
            const int c = c0 + m * kChunkCols + lane * 16;
            if (c < hidden) {
                float xv[16];
                load16(xr + c, xv);
#pragma unroll
                for (int r = 0; r < kFc1Rows; ++r) {
                    // gate and up rows keep their own scales (scale rows: gate blocks, then up blocks)
                    const float* sr = scale1 + ((int64_t)e * scale_rows + (j0 + r) / kFp8Block) * scale_cols + c / kFp8Block;
                    g[r] += __ldg(sr) * dot16_fp8(a[r][m], xv);
                    u[r] += __ldg(sr + (int64_t)(scale_rows / 2) * scale_cols) * dot16_fp8(b[r][m], xv);
                }
            }
        }
    }
    if (prefetch_fc2) {
        // this block's 1/gridDim.y of fc2[e] (H * I bytes, contiguous), in 128-byte lines
        const int64_t bytes = (int64_t)hidden * inter;
        const int64_t begin = bytes * blockIdx.y / gridDim.y, end = bytes * (blockIdx.y + 1) / gridDim.y;
        const unsigned char* base = fc2 + (int64_t)e * bytes;
        for (int64_t off = (begin & ~int64_t(127)) + 128 * threadIdx.x; off < end; off += 128 * blockDim.x)
            asm volatile("prefetch.global.L2 [%0];" ::"l"(base + off));
    }
#pragma unroll
    for (int r = 0; r < kFc1Rows; ++r) {
        const float gs = q3n::warp_sum(g[r]), us = q3n::warp_sum(u[r]);
        if (lane == 0) act[pair * inter + j0 + r] = q3n::silu(gs) * us;
    }
}

template <typename T>
__global__ void __launch_bounds__(32 * kFc2Warps) fc2_kernel(const unsigned char* __restrict__ fc2,
                                                             const float* __restrict__ scale2, const int* selected,
                                                             const float* weights, const float* act, T* __restrict__ out,
                                                             int hidden, int inter, int top_k, int scale_rows,
                                                             int scale_cols) {
    // [top_k, inter_pad]: this token's SwiGLU rows, shared by all warps. Within each 512 columns, the
    // 16 floats lane l needs are stored as 4 float4 at l, 32 + l, 64 + l, 96 + l: conflict-free reads.
    extern __shared__ __align__(16) float act_s[];
    q3n::launch_dependents();
    const int64_t n = blockIdx.x;
    const int lane = threadIdx.x & 31;
    const int h = blockIdx.y * kFc2Warps + threadIdx.x / 32;
    q3n::grid_dependency_wait();
    __shared__ const unsigned char* rows[kMaxTopK];  // row h of each slot's expert: no 64-bit addresses held in registers
    __shared__ float wt[kMaxTopK];
    // the block's 16 rows share one 128-row scale group: its scales for every slot, staged once
    __shared__ float scales[kMaxTopK * kMaxScaleCols];
    const int h_first = blockIdx.y * kFc2Warps;
    if (threadIdx.x < top_k) {
        rows[threadIdx.x] = fc2 + (int64_t)selected[n * top_k + threadIdx.x] * hidden * inter;
        wt[threadIdx.x] = weights[n * top_k + threadIdx.x];
    }
    for (int i = threadIdx.x; i < top_k * scale_cols; i += blockDim.x) {
        const int s = i / scale_cols, col = i % scale_cols;
        const int e = selected[n * top_k + s];
        scales[s * scale_cols + col] = scale2[((int64_t)e * scale_rows + h_first / kFp8Block) * scale_cols + col];
    }
    __syncthreads();
    float total = 0.f;
    for (int c0 = 0; c0 < inter; c0 += kChunkCols) {
        const int c = c0 + lane * 16;
        const bool in = c < inter;
        // All k weight loads first: their DRAM latencies overlap.
        uint4 w[kMaxTopK];
#pragma unroll
        for (int s = 0; s < kMaxTopK; ++s)
            if (s < top_k && in) w[s] = __ldg(reinterpret_cast<const uint4*>(rows[s] + (int64_t)h * inter + c));
        const int inter_pad = (inter + kChunkCols - 1) / kChunkCols * kChunkCols;
        if (c0 == 0) {
            const float4* src = reinterpret_cast<const float4*>(act + n * top_k * inter);
            float4* dst = reinterpret_cast<float4*>(act_s);
            for (int i = threadIdx.x; i < top_k * inter / 4; i += blockDim.x) {
                const int s = i / (inter / 4), cc = 4 * (i % (inter / 4));
                const int base = s * inter_pad + (cc & ~(kChunkCols - 1)), within = cc & (kChunkCols - 1);
                dst[base / 4 + ((within >> 2) & 3) * 32 + (within >> 4)] = src[i];
            }
            __syncthreads();
        }
#pragma unroll
        for (int s = 0; s < kMaxTopK; ++s) {
            if (s < top_k && in) {
                float av[16];
                const float4* a4 = reinterpret_cast<const float4*>(act_s + s * inter_pad + c0) + lane;
#pragma unroll
                for (int m = 0; m < 4; ++m) {
                    const float4 f = a4[32 * m];
                    av[4 * m] = f.x, av[4 * m + 1] = f.y, av[4 * m + 2] = f.z, av[4 * m + 3] = f.w;
                }
                const float sc = scales[s * scale_cols + c / kFp8Block];
                total += wt[s] * sc * dot16_fp8(w[s], av);
            }
        }
    }
    total = q3n::warp_sum(total);
    if (lane == 0) q3n::store(out, n * hidden + h, total);
}

inline bool shapes_fit(const void* x, const void* fc1, const void* fc2, int tokens, int hidden, int inter, int experts,
                       int top_k) {
    // 16-byte loads: rows of fc1/fc2 and x start 16-aligned when H, I are multiples of 16 and the bases are.
    return hidden % 16 == 0 && inter % 16 == 0 && inter % (kFc1Warps * kFc1Rows) == 0 && hidden % kFc2Warps == 0 &&
           top_k * ((inter + kChunkCols - 1) / kChunkCols * kChunkCols) <= kMaxActFloats &&
           (inter + kFp8Block - 1) / kFp8Block <= kMaxScaleCols &&
           top_k <= kMaxTopK && experts <= kMaxExperts && (int64_t)tokens * top_k <= INT_MAX &&
           tokens <= INT_MAX && inter / (kFc1Warps * kFc1Rows) <= 65535 && hidden / kFc2Warps <= 65535 && q3n::aligned(x, 16) &&
           q3n::aligned(fc1, 16) && q3n::aligned(fc2, 16);
}

template <typename T>
int launch(const void* x, const void* router_logits, const unsigned char* fc1, const float* scale1,
           const unsigned char* fc2, const float* scale2, void* out, int tokens, int hidden, int inter, int experts,
           int top_k, int normalize, int* ws_experts, float* ws_weights, float* ws_act, cudaStream_t stream) {
    const bool pdl = q3n::current_device().cc >= 90;
    auto blocks = [](int n) { return (n + kFp8Block - 1) / kFp8Block; };
    cudaError_t err = q3n::launch_kernel(false, route_kernel<T>, dim3(tokens), dim3(32 * ((experts + 31) / 32)), 0,
                                         stream, static_cast<const T*>(router_logits), tokens, experts, top_k, normalize,
                                         ws_experts, ws_weights);
    const int prefetch = (int64_t)tokens * top_k <= kPrefetchPairs;
    if (err == cudaSuccess)
        err = q3n::launch_kernel(pdl, fc1_kernel<T>, dim3(tokens * top_k, inter / (kFc1Warps * kFc1Rows)),
                                 dim3(32 * kFc1Warps), 0, stream, static_cast<const T*>(x), fc1, scale1,
                                 static_cast<const int*>(ws_experts), ws_act, fc2, prefetch, hidden, inter, top_k,
                                 2 * blocks(inter), blocks(hidden));
    if (err == cudaSuccess)
        err = q3n::launch_kernel(pdl, fc2_kernel<T>, dim3(tokens, hidden / kFc2Warps), dim3(32 * kFc2Warps),
                                 top_k * ((inter + kChunkCols - 1) / kChunkCols * kChunkCols) * sizeof(float), stream,
                                 fc2, scale2, static_cast<const int*>(ws_experts), static_cast<const float*>(ws_weights),
                                 static_cast<const float*>(ws_act), static_cast<T*>(out), hidden, inter, top_k,
                                 blocks(hidden), blocks(inter));
    if (err != cudaSuccess) {
        cudaGetLastError();
        return static_cast<int>(err);
    }
    return q3n::launch_status();
}

}  // namespace q3n_moe_fast
