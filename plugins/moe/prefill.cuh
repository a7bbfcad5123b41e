// FP8 MoE prefill path (q3n_moe_fp8 when many (token, slot) pairs share each expert). The decode path
// (fast.cuh) gives every (token, slot) pair its own pass over its expert's weights; with thousands of
// tokens that is ~80 passes per expert (from L2 at best). Here the pairs are grouped by expert, so each
// expert's weights are read once per 64 of its pairs, and the products run on tensor cores:
//   route:   fast.cuh's route_kernel (expert ids, weights per pair).
//   count:   pairs per expert (integer atomics: exact, order-free).
//   scatter: block per expert: its offset and first tile (sums over the lower experts), then its pairs
//            in increasing pair index (stable ballot compaction) -> perm[sorted] = pair, pos[pair] = sorted.
//   fc1:     block (64 sorted pairs of one expert, 128 interleaved gate/up rows): x rows gathered by
//            token, SwiGLU in the epilogue -> act[sorted, I] float32.
//   fc2:     block (64 sorted pairs, 128 hidden rows) -> y[sorted, H] float32.
//   combine: out[n] = sum over slots s (in slot order) of w[n, s] * y[pos[n, s]]: no float atomics, so
//            the result is deterministic.
// GEMM tiles (64 pairs x 128 outputs, 8 warps of 32 x 32): per 128-column step (one 128 x 128 scale
// block) the FP8 weights are copied into shared memory with cp.async, the next step's while this step
// computes, read with ldmatrix and converted to fp16 in registers (exact); the activations are scaled per
// row by a power of two into fp16's range and stored as fp16 (16-bit x: exact) or fp16 high part +
// remainder (float32: two products, ~2^-22 relative); mma.sync m16n8k16 with float32 accumulation; the
// step's partial sums times the block scale and the rows' powers of two.
#pragma once

#include <type_traits>

#include "fast.cuh"

namespace q3n_moe_prefill {

using bf16 = __nv_bfloat16;

constexpr int kBM = 64;    // sorted pairs per tile
constexpr int kBN = 128;   // output rows per tile: one scale block (fc1: 64 gate + 64 up rows, a block of each)
constexpr int kBK = 128;   // reduction columns per step: one scale block
constexpr int kThreads = 256;  // 8 warps as 2 (pairs) x 4 (outputs), 32 x 32 each
// Row strides. A (fp16, 288 bytes): a warp's 8-byte fragment reads cover 4 rows x 32 bytes per 128-byte
// wavefront, conflict-free. W (FP8, 144 bytes): ldmatrix's 8 rows x 16 bytes land in distinct banks.
constexpr int kLdA = kBK + 16;
constexpr int kLdW = kBK + 16;
constexpr int kLdC = kBN + 4;
// auto dispatch: average (token, slot) pairs per expert from which prefill is taken. Measured on the H200
// at 80B sizes (bench/device/moe_crossover.py, 2026-12-02, the mma.sync GEMM): decode path 0.68 / 1.23 ms,
// prefill 0.93 / 1.18 ms at 1.25 / 2.5 pairs per expert (64 / 128 tokens): the crossover lies between.
constexpr int kMinPairsPerExpert = 2;

struct Stage {
    __half a_hi[kBM][kLdA];
    __half a_lo[kBM][kLdA];
    unsigned char w[kBN][kLdW];
    float row_scale[kBM];  // 2^e of each staged row: a = 2^e (hi + lo)
};
struct alignas(128) Smem {
    union {
        Stage st[2];          // double-buffered: the next step's weights arrive during this step's products
        float c[kBM][kLdC];  // the tile's float32 results (after the last product)
    };
    int src[kBM];  // x row (fc1: token) or act row (fc2: sorted pair) of each tile row
};
constexpr size_t kSmemBytes = sizeof(Smem);

// Extra workspace the prefill path needs beyond kernel.cu's (expert ids, weights, act).
struct Workspace {
    int* counts;      // [E]
    int* tile_start;  // [E + 1]: first tile of each expert; [E] = number of tiles
    int* offsets;     // [E + 1]: first sorted pair of each expert
    int* perm;        // [N*k]: sorted position -> pair
    int* pos;         // [N*k]: pair -> sorted position
    float* y;         // [N*k, H]: fc2 output per sorted pair
};

__device__ __forceinline__ int block_sum_int(int v, int* scratch) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
    __syncthreads();
    int total = 0;
    for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
    return total;
}

__global__ void count_kernel(const int* __restrict__ selected, int pairs, int* __restrict__ counts) {
    const int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p < pairs) atomicAdd(&counts[selected[p]], 1);
}

__global__ void __launch_bounds__(kThreads) scatter_kernel(const int* __restrict__ selected, int pairs, int experts,
                                                           const int* __restrict__ counts, int* __restrict__ tile_start,
                                                           int* __restrict__ offsets, int* __restrict__ perm,
                                                           int* __restrict__ pos) {
    __shared__ int scratch[kThreads / 32];
    __shared__ int warp_count[kThreads / 32];
    const int e = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int off = 0, tiles = 0;
    for (int i = threadIdx.x; i < e; i += kThreads) {
        const int c = counts[i];
        off += c;
        tiles += (c + kBM - 1) / kBM;
    }
    off = block_sum_int(off, scratch);
    tiles = block_sum_int(tiles, scratch);
    const int count = counts[e];
    if (threadIdx.x == 0) {
        offsets[e] = off;
        tile_start[e] = tiles;
        if (e == experts - 1) {
            offsets[experts] = off + count;
            tile_start[experts] = tiles + (count + kBM - 1) / kBM;
        }
    }
    // stable: the expert's pairs keep their pair order (token-major), whatever the launch order
    int done = 0;
    for (int p0 = 0; p0 < pairs && done < count; p0 += kThreads) {
        const int p = p0 + threadIdx.x;
        const bool mine = p < pairs && selected[p] == e;
        const unsigned ballot = __ballot_sync(0xffffffffu, mine);
        if (lane == 0) warp_count[warp] = __popc(ballot);
        __syncthreads();
        int before = 0, total = 0;
        for (int w = 0; w < kThreads / 32; ++w) {
            before += w < warp ? warp_count[w] : 0;
            total += warp_count[w];
        }
        if (mine) {
            const int at = off + done + before + __popc(ballot & ((1u << lane) - 1));
            perm[at] = p;
            pos[p] = at;
        }
        done += total;
        __syncthreads();  // warp_count is rewritten next round
    }
}

// The expert of a tile: the last e whose first tile is <= tile (that one has tiles: see scatter_kernel).
__device__ __forceinline__ int tile_expert(int tile, const int* __restrict__ tile_start, int experts) {
    int lo = 0, hi = experts - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (tile_start[mid] <= tile) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// 8 consecutive activations as float (8-element aligned).
template <typename T>
__device__ __forceinline__ void load8(const T* p, float v[8]) {
    const uint4 a = *reinterpret_cast<const uint4*>(p);
    const T* h = reinterpret_cast<const T*>(&a);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = q3n::to_float(h[i]);
}
template <>
__device__ __forceinline__ void load8<float>(const float* p, float v[8]) {
    const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

// 2^e as a float for |e| <= 126.
__device__ __forceinline__ float pow2(int e) { return __int_as_float((127 + e) << 23); }

// Grouped GEMM over the sorted pairs: C[pair, n] = sum_k A[pair, k] W_e[n, k] for the tile's expert e.
// kFc1: A = x[token of the pair] (T), epilogue SwiGLU over the interleaved (gate, up) columns -> act;
// else A = act[sorted pair] (float32), epilogue -> y. K = reduction size, N = output rows of W.
//
// Per 128-column step (one scale block): the FP8 weights go to shared memory by cp.async (the next
// step's during this step's products) and become fp16 in registers after ldmatrix (e4m3 values are fp16
// values: exact); each A row's 128 values are scaled by a power of two 2^-e that puts their largest
// magnitude in [2^14, 2^15) and stored as fp16 (bf16 / fp16 activations: exact, but for values 2^-28
// below the row's largest) or, for float32, as fp16 high part + fp16 remainder (two products: ~2^-22
// relative). The step's partial sums are multiplied by the weights' block scale and each row's 2^e.
// Fragments: ldmatrix hands lane (g, t) the FP8 bytes k = 4t..4t+3 of weight row g; they serve as the
// B fragment's k pairs (2t, 2t+1) and (2t+8, 2t+9), so A's fragment takes the same four columns
// 4t..4t+3 of its rows (one 8-byte load): a permutation of k inside each 16, the same on both sides.
template <typename T, bool kFc1>
__global__ void __launch_bounds__(kThreads, 2) gemm_kernel(const T* __restrict__ x, const float* __restrict__ act_in,
                                                        const unsigned char* __restrict__ w,
                                                        const float* __restrict__ scale, const int* __restrict__ tile_start,
                                                        const int* __restrict__ offsets, const int* __restrict__ perm,
                                                        int experts, int top_k, int K, int N, float* __restrict__ out) {
    // fp16 holds bf16 / fp16 activations exactly after the row scaling: no remainder products then
    constexpr bool kSplit = !(kFc1 && sizeof(T) == 2);
    extern __shared__ __align__(128) unsigned char smem_raw[];
    Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
    const int tile = blockIdx.x;
    if (tile >= tile_start[experts]) return;  // the grid is sized for the worst case
    const int e = tile_expert(tile, tile_start, experts);
    const int row0 = offsets[e] + (tile - tile_start[e]) * kBM;
    const int rows = min(kBM, offsets[e + 1] - row0);
    const int n0 = blockIdx.y * kBN;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wm = warp / 4, wn = warp % 4;
    const int g = lane >> 2, t = lane & 3;
    if (tid < kBM) sm.src[tid] = tid < rows ? (kFc1 ? perm[row0 + tid] / top_k : row0 + tid) : -1;
    __syncthreads();

    const int scale_rows = N / q3n_moe_fast::kFp8Block, scale_cols = K / q3n_moe_fast::kFp8Block;
    const unsigned char* we = w + ((int64_t)e * N + n0) * K;
    // fc1: the tile's 128 interleaved rows are intermediate rows n0/2 .. n0/2+63, gate and up; staged as
    // 64 gate rows then 64 up rows, so that warps wn < 2 hold gate columns only and wn >= 2 up columns,
    // and each warp scales its partial sums by its own half's block scale (gate blocks, then up blocks:
    // the checkpoint's separate gate / up scales, unchanged)
    const float* se = scale + ((int64_t)e * scale_rows + (kFc1 ? n0 / 2 : n0) / q3n_moe_fast::kFp8Block) * scale_cols
                      + (kFc1 && wn >= 2 ? (int64_t)(scale_rows / 2) * scale_cols : 0);

    // W: 128 rows x 128 FP8 bytes per step, 4 x 16 bytes per thread
    const auto fetch_w = [&](int k0, Stage& st) {
#pragma unroll
        for (int m = 0; m < kBN * kBK / 16 / kThreads; ++m) {
            const int i = tid + m * kThreads, r = i / (kBK / 16), c = (i % (kBK / 16)) * 16;
            const int src = kFc1 ? (r < kBN / 2 ? 2 * r : 2 * (r - kBN / 2) + 1) : r;
            q3n::cp_async16(&st.w[r][c], we + (int64_t)src * K + k0 + c);
        }
        q3n::cp_async_commit();
    };
    // A: thread = (row tid / 4, 32 columns); the row's four threads are neighbouring lanes of one warp
    const auto stage_a = [&](int k0, Stage& st) {
        const int r = tid >> 2, c0 = (tid & 3) * 32;
        const int src = sm.src[r];
        float v[32];
#pragma unroll
        for (int i = 0; i < 32; i += 8) {
            if (src >= 0) {
                if (kFc1) load8(x + (int64_t)src * K + k0 + c0 + i, v + i);
                else load8(act_in + (int64_t)src * K + k0 + c0 + i, v + i);
            } else {
#pragma unroll
                for (int j = 0; j < 8; ++j) v[i + j] = 0.f;
            }
        }
        float amax = 0.f;
#pragma unroll
        for (int i = 0; i < 32; ++i) amax = fmaxf(amax, fabsf(v[i]));
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
        // largest magnitude into [2^14, 2^15): fp16's normal range with room; 0 / NaN / Inf rows unscaled
        int ex = 0;
        if (amax > 0.f && amax <= FLT_MAX) ex = max(-100, min(100, ilogbf(amax) - 14));
        const float down = pow2(-ex);
#pragma unroll
        for (int i = 0; i < 32; i += 8) {
            __align__(16) __half hi[8], lo[8];
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const float a = v[i + j] * down;
                hi[j] = __float2half_rn(a);
                lo[j] = __float2half_rn(a - __half2float(hi[j]));
            }
            *reinterpret_cast<uint4*>(&st.a_hi[r][c0 + i]) = *reinterpret_cast<const uint4*>(hi);
            if (kSplit) *reinterpret_cast<uint4*>(&st.a_lo[r][c0 + i]) = *reinterpret_cast<const uint4*>(lo);
        }
        if ((tid & 3) == 0) st.row_scale[r] = pow2(ex);
    };

    float acc[2][4][4] = {};
    fetch_w(0, sm.st[0]);
    stage_a(0, sm.st[0]);
    q3n::cp_async_wait<0>();
    __syncthreads();
    const int steps = K / kBK;
    for (int ks = 0; ks < steps; ++ks) {
        Stage& st = sm.st[ks & 1];
        if (ks + 1 < steps) fetch_w((ks + 1) * kBK, sm.st[(ks + 1) & 1]);  // its buffer's readers passed the last barrier
        float part[2][4][4] = {};
#pragma unroll 2
        for (int kk = 0; kk < kBK; kk += 16) {
            uint32_t b[4][2];
            {
                uint32_t raw[4];
                // matrix j = n-tile j of this warp: rows 32 wn + 8 j + (lane % 8), bytes kk .. kk + 15
                q3n::ldmatrix_x4(raw, &st.w[32 * wn + 8 * (lane >> 3) + (lane & 7)][kk]);
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const __half2_raw lo2 = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(raw[j] & 0xffffu), __NV_E4M3);
                    const __half2_raw hi2 = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(raw[j] >> 16), __NV_E4M3);
                    b[j][0] = static_cast<uint32_t>(lo2.x) | (static_cast<uint32_t>(lo2.y) << 16);
                    b[j][1] = static_cast<uint32_t>(hi2.x) | (static_cast<uint32_t>(hi2.y) << 16);
                }
            }
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const int r = 32 * wm + 16 * i + g;
                const uint2 h0 = *reinterpret_cast<const uint2*>(&st.a_hi[r][kk + 4 * t]);
                const uint2 h1 = *reinterpret_cast<const uint2*>(&st.a_hi[r + 8][kk + 4 * t]);
                const uint32_t ah[4] = {h0.x, h1.x, h0.y, h1.y};
#pragma unroll
                for (int j = 0; j < 4; ++j) q3n::mma_16816<__half>(part[i][j], ah, b[j]);
                if (kSplit) {
                    const uint2 l0 = *reinterpret_cast<const uint2*>(&st.a_lo[r][kk + 4 * t]);
                    const uint2 l1 = *reinterpret_cast<const uint2*>(&st.a_lo[r + 8][kk + 4 * t]);
                    const uint32_t al[4] = {l0.x, l1.x, l0.y, l1.y};
#pragma unroll
                    for (int j = 0; j < 4; ++j) q3n::mma_16816<__half>(part[i][j], al, b[j]);
                }
            }
        }
        const float sw = __ldg(se + ks);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int r = 32 * wm + 16 * i + g;
            const float s0 = sw * st.row_scale[r], s1 = sw * st.row_scale[r + 8];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                acc[i][j][0] += s0 * part[i][j][0], acc[i][j][1] += s0 * part[i][j][1];
                acc[i][j][2] += s1 * part[i][j][2], acc[i][j][3] += s1 * part[i][j][3];
            }
        }
        if (ks + 1 < steps) stage_a((ks + 1) * kBK, sm.st[(ks + 1) & 1]);
        q3n::cp_async_wait<0>();
        __syncthreads();  // the next step's A and W are in; this step's buffers are free
    }
    // C fragment: rows g, g + 8 of each m-tile, columns 2t, 2t + 1 of each n-tile (the staging buffers are
    // free: the loop ended on a barrier)
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int r = 32 * wm + 16 * i + g, c = 32 * wn + 8 * j + 2 * t;
            sm.c[r][c] = acc[i][j][0], sm.c[r][c + 1] = acc[i][j][1];
            sm.c[r + 8][c] = acc[i][j][2], sm.c[r + 8][c + 1] = acc[i][j][3];
        }
    __syncthreads();
    if (kFc1) {
        // columns j, 64 + j = gate, up of intermediate row n0/2 + j (staged that way); act has N/2 columns
        const int inter = N / 2;
        for (int i = tid; i < kBM * kBN / 2; i += kThreads) {
            const int r = i / (kBN / 2), j = i % (kBN / 2);
            if (r < rows) out[(int64_t)(row0 + r) * inter + n0 / 2 + j] = q3n::silu(sm.c[r][j]) * sm.c[r][kBN / 2 + j];
        }
    } else {
        for (int i = tid; i < kBM * kBN / 4; i += kThreads) {
            const int r = i / (kBN / 4), c = (i % (kBN / 4)) * 4;
            if (r < rows)
                *reinterpret_cast<float4*>(out + (int64_t)(row0 + r) * N + n0 + c) =
                    make_float4(sm.c[r][c], sm.c[r][c + 1], sm.c[r][c + 2], sm.c[r][c + 3]);
        }
    }
}

// Block (token, 1024 hidden columns): the token's k slots summed in slot order, as the other paths.
template <typename T>
__global__ void __launch_bounds__(kThreads) combine_kernel(const float* __restrict__ y, const int* __restrict__ pos,
                                                           const float* __restrict__ weights, T* __restrict__ out,
                                                           int hidden, int top_k) {
    const int64_t n = blockIdx.x;
    const int h = (blockIdx.y * kThreads + threadIdx.x) * 4;
    if (h >= hidden) return;
    float total[4] = {0.f, 0.f, 0.f, 0.f};
    for (int s = 0; s < top_k; ++s) {
        const float wt = weights[n * top_k + s];
        const float4 v = *reinterpret_cast<const float4*>(y + (int64_t)pos[n * top_k + s] * hidden + h);
        total[0] += wt * v.x, total[1] += wt * v.y, total[2] += wt * v.z, total[3] += wt * v.w;
    }
#pragma unroll
    for (int c = 0; c < 4; ++c) q3n::store(out, n * hidden + h + c, total[c]);
}

// The decode path's limits (routing kernel, alignment) plus whole 128 x 128 scale blocks.
inline bool shapes_fit(const void* x, const void* fc1, const void* fc2, int tokens, int hidden, int inter, int experts,
                       int top_k) {
    return q3n_moe_fast::shapes_fit(x, fc1, fc2, tokens, hidden, inter, experts, top_k) && hidden % kBK == 0 &&
           inter % kBK == 0 && hidden / kBN <= 65535 && 2 * inter / kBN <= 65535;
}

inline bool worth_it(int tokens, int top_k, int experts) {
    return (int64_t)tokens * top_k >= (int64_t)kMinPairsPerExpert * experts;
}

// Tiles a grid must cover: at most pairs / kBM full tiles plus one partial tile per expert that has pairs.
inline int max_tiles(int pairs, int experts) { return pairs / kBM + min(experts, pairs); }

template <typename T, bool kFc1>
cudaError_t launch_gemm(const T* x, const float* act_in, const unsigned char* w, const float* scale, const Workspace& ws,
                        int pairs, int experts, int top_k, int K, int N, float* out, cudaStream_t stream) {
    cudaError_t err = cudaFuncSetAttribute(gemm_kernel<T, kFc1>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           (int)kSmemBytes);
    if (err != cudaSuccess) return err;
    gemm_kernel<T, kFc1><<<dim3(max_tiles(pairs, experts), N / kBN), kThreads, kSmemBytes, stream>>>(
        x, act_in, w, scale, ws.tile_start, ws.offsets, ws.perm, experts, top_k, K, N, out);
    return cudaGetLastError();
}

// route, count, scatter: the pairs grouped by expert (ws.offsets, ws.perm, ws.pos) in tiles of kBM.
template <typename T>
cudaError_t group_pairs(const void* router_logits, int tokens, int experts, int top_k, int normalize, int* ws_experts,
                        float* ws_weights, const Workspace& ws, cudaStream_t stream) {
    const int pairs = tokens * top_k;
    q3n_moe_fast::route_kernel<T><<<tokens, 32 * ((experts + 31) / 32), 0, stream>>>(
        static_cast<const T*>(router_logits), tokens, experts, top_k, normalize, ws_experts, ws_weights);
    cudaError_t err = cudaGetLastError();
    if (err == cudaSuccess) err = cudaMemsetAsync(ws.counts, 0, experts * sizeof(int), stream);
    if (err == cudaSuccess) {
        count_kernel<<<(pairs + kThreads - 1) / kThreads, kThreads, 0, stream>>>(ws_experts, pairs, ws.counts);
        scatter_kernel<<<experts, kThreads, 0, stream>>>(ws_experts, pairs, experts, ws.counts, ws.tile_start,
                                                         ws.offsets, ws.perm, ws.pos);
        err = cudaGetLastError();
    }
    return err;
}

template <typename T>
cudaError_t launch_combine(const Workspace& ws, const float* ws_weights, void* out, int tokens, int hidden, int top_k,
                           cudaStream_t stream) {
    combine_kernel<T><<<dim3(tokens, (hidden + 4 * kThreads - 1) / (4 * kThreads)), kThreads, 0, stream>>>(
        ws.y, ws.pos, ws_weights, static_cast<T*>(out), hidden, top_k);
    return cudaGetLastError();
}

template <typename T>
int launch(const void* x, const void* router_logits, const unsigned char* fc1, const float* scale1,
           const unsigned char* fc2, const float* scale2, void* out, int tokens, int hidden, int inter, int experts,
           int top_k, int normalize, int* ws_experts, float* ws_weights, float* ws_act, const Workspace& ws,
           cudaStream_t stream) {
    const int pairs = tokens * top_k;
    cudaError_t err = group_pairs<T>(router_logits, tokens, experts, top_k, normalize, ws_experts, ws_weights, ws, stream);
    const T* xt = static_cast<const T*>(x);
    if (err == cudaSuccess)
        err = launch_gemm<T, true>(xt, nullptr, fc1, scale1, ws, pairs, experts, top_k, hidden, 2 * inter, ws_act, stream);
    if (err == cudaSuccess)
        err = launch_gemm<T, false>(xt, ws_act, fc2, scale2, ws, pairs, experts, top_k, inter, hidden, ws.y, stream);
    if (err == cudaSuccess) err = launch_combine<T>(ws, ws_weights, out, tokens, hidden, top_k, stream);
    if (err != cudaSuccess) {
        cudaGetLastError();
        return static_cast<int>(err);
    }
    return q3n::launch_status();
}

}  // namespace q3n_moe_prefill
