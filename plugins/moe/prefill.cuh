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
// GEMM tiles: the FP8 weights of one 128 x 128 scale block are converted to bf16 (exact: e4m3 values
// are bf16 values) in shared memory, the activations are split into bf16 high + bf16 remainder (two
// products, float32 accumulation: ~2^-17 relative, so float32 callers keep float32-level accuracy;
// bf16 x needs no remainder), and the block scale multiplies the 128-column partial sums, as the
// decode path does. WMMA 16x16x16 bf16; the next step's weights are loaded into registers during
// the current step's products (no cp.async / TMA pipelining yet).
#pragma once

#include <mma.h>

#include <type_traits>

#include "fast.cuh"

namespace q3n_moe_prefill {

namespace wmma = nvcuda::wmma;
using bf16 = __nv_bfloat16;

constexpr int kBM = 64;    // sorted pairs per tile
constexpr int kBN = 128;   // output rows per tile: one scale block (fc1: 64 gate + 64 up rows, a block of each)
constexpr int kBK = 128;   // reduction columns per step: one scale block
constexpr int kThreads = 256;  // 8 warps as 2 (pairs) x 4 (outputs), 32 x 32 each
constexpr int kLdA = kBK + 8;  // bf16 row stride: rows shifted by 16 bytes (fewer bank conflicts), 32-byte tiles
constexpr int kLdC = kBN + 4;
// auto dispatch: average (token, slot) pairs per expert from which prefill is taken. Measured on the H200
// at 80B sizes (bench/device/moe_crossover.py): decode path 1.19 / 2.36 ms, prefill 1.47 / 1.60 ms at
// 2.5 / 5 pairs per expert (128 / 256 tokens).
constexpr int kMinPairsPerExpert = 4;

struct alignas(128) Smem {
    union {
        struct {
            bf16 a_hi[kBM][kLdA];
            bf16 a_lo[kBM][kLdA];
            bf16 w[kBN][kLdA];
        } in;
        float c[kBM][kLdC];  // the tile's float32 results (after the last product)
    };
    int src[kBM];  // x row (fc1: token) or act row (fc2: sorted pair) of each tile row
};
constexpr size_t kSmemBytes = sizeof(Smem);

using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major>;
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

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

// Grouped GEMM over the sorted pairs: C[pair, n] = sum_k A[pair, k] W_e[n, k] for the tile's expert e.
// kFc1: A = x[token of the pair] (T), epilogue SwiGLU over the interleaved (gate, up) columns -> act;
// else A = act[sorted pair] (float32), epilogue -> y. K = reduction size, N = output rows of W.
template <typename T, bool kFc1>
__global__ void __launch_bounds__(kThreads, 2) gemm_kernel(const T* __restrict__ x, const float* __restrict__ act_in,
                                                        const unsigned char* __restrict__ w,
                                                        const float* __restrict__ scale, const int* __restrict__ tile_start,
                                                        const int* __restrict__ offsets, const int* __restrict__ perm,
                                                        int experts, int top_k, int K, int N, float* __restrict__ out) {
    // bf16 x splits with a zero remainder: skip those products
    constexpr bool kSplit = !(kFc1 && std::is_same<T, bf16>::value);
    extern __shared__ __align__(128) unsigned char smem_raw[];
    Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
    const int tile = blockIdx.x;
    if (tile >= tile_start[experts]) return;  // the grid is sized for the worst case
    // the tile's expert: the last e whose first tile is <= tile (that one has tiles: see scatter_kernel)
    int lo = 0, hi = experts - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (tile_start[mid] <= tile) lo = mid; else hi = mid - 1;
    }
    const int e = lo;
    const int row0 = offsets[e] + (tile - tile_start[e]) * kBM;
    const int rows = min(kBM, offsets[e + 1] - row0);
    const int n0 = blockIdx.y * kBN;
    const int tid = threadIdx.x, warp = tid >> 5, wm = warp / 4, wn = warp % 4;
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
    FragC acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

    // W: 128 rows x 128 FP8 columns per step, 16 bytes per thread-load; the next step's loads are issued
    // before this step's products, so their latency hides behind the tensor-core work
    constexpr int kWLoads = kBN * kBK / 16 / kThreads;
    uint4 wraw[kWLoads];
    auto fetch_w = [&](int k0) {
#pragma unroll
        for (int m = 0; m < kWLoads; ++m) {
            const int i = tid + m * kThreads, r = i / (kBK / 16), c = (i % (kBK / 16)) * 16;
            const int src = kFc1 ? (r < kBN / 2 ? 2 * r : 2 * (r - kBN / 2) + 1) : r;
            wraw[m] = __ldg(reinterpret_cast<const uint4*>(we + (int64_t)src * K + k0 + c));
        }
    };
    fetch_w(0);
    for (int k0 = 0; k0 < K; k0 += kBK) {
        // A: 64 rows x 128 columns, 8 per thread-step; padding rows are zeros
        for (int i = tid; i < kBM * kBK / 8; i += kThreads) {
            const int r = i / (kBK / 8), c = (i % (kBK / 8)) * 8;
            const int src = sm.src[r];
            float v[8] = {};
            if (src >= 0) {
                if (kFc1) load8(x + (int64_t)src * K + k0 + c, v);
                else load8(act_in + (int64_t)src * K + k0 + c, v);
            }
            __align__(16) bf16 h[8], l[8];
#pragma unroll
            for (int t = 0; t < 8; ++t) {
                h[t] = __float2bfloat16_rn(v[t]);
                l[t] = __float2bfloat16_rn(v[t] - __bfloat162float(h[t]));
            }
            *reinterpret_cast<uint4*>(&sm.in.a_hi[r][c]) = *reinterpret_cast<const uint4*>(h);
            if (kSplit) *reinterpret_cast<uint4*>(&sm.in.a_lo[r][c]) = *reinterpret_cast<const uint4*>(l);
        }
        // W converted exactly to bf16
#pragma unroll
        for (int m = 0; m < kWLoads; ++m) {
            const int i = tid + m * kThreads, r = i / (kBK / 16), c = (i % (kBK / 16)) * 16;
            const uint32_t words[4] = {wraw[m].x, wraw[m].y, wraw[m].z, wraw[m].w};
            __align__(16) __nv_bfloat162 b[8];
#pragma unroll
            for (int q = 0; q < 8; ++q) {
                const __nv_fp8x2_storage_t pair = static_cast<__nv_fp8x2_storage_t>(words[q / 2] >> (16 * (q % 2)));
                const __half2_raw h2 = __nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3);
                b[q] = __float22bfloat162_rn(__half22float2(*reinterpret_cast<const __half2*>(&h2)));
            }
            *reinterpret_cast<uint4*>(&sm.in.w[r][c]) = reinterpret_cast<const uint4*>(b)[0];
            *reinterpret_cast<uint4*>(&sm.in.w[r][c + 8]) = reinterpret_cast<const uint4*>(b)[1];
        }
        __syncthreads();
        if (k0 + kBK < K) fetch_w(k0 + kBK);
        FragC part[2][2];
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::fill_fragment(part[i][j], 0.f);
#pragma unroll
        for (int kk = 0; kk < kBK; kk += 16) {
            FragA ah[2], al[2];
            FragB bw[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                wmma::load_matrix_sync(ah[i], &sm.in.a_hi[wm * 32 + i * 16][kk], kLdA);
                if (kSplit) wmma::load_matrix_sync(al[i], &sm.in.a_lo[wm * 32 + i * 16][kk], kLdA);
            }
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(bw[j], &sm.in.w[wn * 32 + j * 16][kk], kLdA);
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    if (kSplit) wmma::mma_sync(part[i][j], al[i], bw[j], part[i][j]);
                    wmma::mma_sync(part[i][j], ah[i], bw[j], part[i][j]);
                }
        }
        const float s = __ldg(se + k0 / kBK);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 2; ++j)
#pragma unroll
                for (int t = 0; t < acc[i][j].num_elements; ++t) acc[i][j].x[t] += s * part[i][j].x[t];
        __syncthreads();  // the next step overwrites the tiles
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
            wmma::store_matrix_sync(&sm.c[wm * 32 + i * 16][wn * 32 + j * 16], acc[i][j], kLdC, wmma::mem_row_major);
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

template <typename T, bool kFc1>
cudaError_t launch_gemm(const T* x, const float* act_in, const unsigned char* w, const float* scale, const Workspace& ws,
                        int pairs, int experts, int top_k, int K, int N, float* out, cudaStream_t stream) {
    cudaError_t err = cudaFuncSetAttribute(gemm_kernel<T, kFc1>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           (int)kSmemBytes);
    if (err != cudaSuccess) return err;
    // at most pairs/64 full tiles plus one partial tile per expert that has pairs
    const int max_tiles = pairs / kBM + min(experts, pairs);
    gemm_kernel<T, kFc1><<<dim3(max_tiles, N / kBN), kThreads, kSmemBytes, stream>>>(
        x, act_in, w, scale, ws.tile_start, ws.offsets, ws.perm, experts, top_k, K, N, out);
    return cudaGetLastError();
}

template <typename T>
int launch(const void* x, const void* router_logits, const unsigned char* fc1, const float* scale1,
           const unsigned char* fc2, const float* scale2, void* out, int tokens, int hidden, int inter, int experts,
           int top_k, int normalize, int* ws_experts, float* ws_weights, float* ws_act, const Workspace& ws,
           cudaStream_t stream) {
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
    const T* xt = static_cast<const T*>(x);
    if (err == cudaSuccess)
        err = launch_gemm<T, true>(xt, nullptr, fc1, scale1, ws, pairs, experts, top_k, hidden, 2 * inter, ws_act, stream);
    if (err == cudaSuccess)
        err = launch_gemm<T, false>(xt, ws_act, fc2, scale2, ws, pairs, experts, top_k, inter, hidden, ws.y, stream);
    if (err == cudaSuccess) {
        combine_kernel<T><<<dim3(tokens, (hidden + 4 * kThreads - 1) / (4 * kThreads)), kThreads, 0, stream>>>(
            ws.y, ws.pos, ws_weights, static_cast<T*>(out), hidden, top_k);
        err = cudaGetLastError();
    }
    if (err != cudaSuccess) {
        cudaGetLastError();
        return static_cast<int>(err);
    }
    return q3n::launch_status();
}

}  // namespace q3n_moe_prefill
