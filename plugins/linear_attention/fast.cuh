// Fast gated delta rule kernels (Dk = 128, Dv a multiple of 32), chosen by q3n_linear_attention when the
// shapes fit; the token-serial kernel in kernel.cu stays the fallback and the oracle.
//
// decode_kernel<T, NT>: NT = 1..4 tokens per call (decode, speculative verification). Memory-bound on
//   the state (64 KiB per head in float32), so the state is read once into registers, all tokens are
//   applied there, and it is written once. Block = (batch, value head, 32 state columns), 128 threads;
//   thread (warp w, lane) holds 8 rows x 4 columns as float4, rows w*4 + lane/8 + 16*r, so each warp
//   load covers 4 whole 128-byte row segments. The NT tokens are applied in the chunked form (a chunk
//   of NT): one pass over the old state gives S^T k_t and S^T q_t of every token, one shared-memory
//   reduction sums them, each thread solves the small triangular system for its columns' deltas, and
//   a second pass applies all NT rank-1 updates: one reduction and barrier per call, not per token.
//
// chunk_kernel / chunk_tc_kernel: prefill, the chunked WY form of model/gated_delta_rule.py with
//   chunks of 64 tokens. Block = (batch, value head, 32 state columns), 256 threads, the state slice
//   [128 x 32] in shared memory for the whole sequence; per chunk:
//       G = cumsum(g);  L_ij = beta_i e^(G_i-G_j) k_i.k_j (j<i);  P_ij = e^(G_i-G_j) q_i.k_j (j<=i)
//       rhs = beta (V - e^G K S);  (I + L) D = rhs  (forward substitution, per column);
//       O = e^G (Q S) + P D;  S <- e^(G_last) S + (e^(G_last-G) K)^T D
//   which is the reference's U - W S with W, U folded into one triangular solve on the right-hand
//   side: no inverse, no per-chunk workspace. The k-only work (L, P) is repeated by the Dv/32 column
//   blocks of a head; that buys 4x more blocks for one long sequence (32 heads -> 128 blocks).
//   chunk_kernel does the products on CUDA cores, chunk_tc_kernel on tensor cores (WMMA tf32, split
//   into high and low parts for float32 accuracy); the latter is what the dispatch picks.
#pragma once

#include <mma.h>

#include <type_traits>

#include "../common.cuh"

namespace q3n_gdn {

using q3n::load;
using q3n::store;

constexpr int kDk = 128;
constexpr int kCols = 32;  // state columns per block (both kernels)

// ------------------------------------------------------------------------------------------------
// decode

constexpr int kMaxDecodeTokens = 4;
constexpr int kDecWarps = 4;
constexpr int kDecThreads = 32 * kDecWarps;
constexpr int kDecRows = kDk / (4 * kDecWarps);  // 8 rows per thread

// Sums x[0..V) over the 4 lanes of a column group (lanes cg, cg + 8, cg + 16, cg + 24) and leaves lane
// cg + 8 r with sums r V/4 .. (r + 1) V/4 - 1: two halving exchanges, 3V/4 shuffles (an all-reduce
// takes 2V).
template <int V>
__device__ __forceinline__ void reduce_scatter4(const float (&x)[V], float (&out)[V / 4], int lane) {
    static_assert(V % 4 == 0, "four lanes");
    const bool hi1 = lane & 16, hi0 = lane & 8;
    float y[V / 2];
#pragma unroll
    for (int i = 0; i < V / 2; ++i) {
        const float send = hi1 ? x[i] : x[i + V / 2], keep = hi1 ? x[i + V / 2] : x[i];
        y[i] = keep + __shfl_xor_sync(0xffffffffu, send, 16);
    }
#pragma unroll
    for (int i = 0; i < V / 4; ++i) {
        const float send = hi0 ? y[i] : y[i + V / 4], keep = hi0 ? y[i + V / 4] : y[i];
        out[i] = keep + __shfl_xor_sync(0xffffffffu, send, 8);
    }
}

// NT tokens at once (the chunked form over NT <= 4 tokens, G_t = sum of the log decays up to t,
// a_t = S^T k_t and b_t = S^T q_t of the state S the call starts from):
//     d_t = beta_t (v_t - e^G_t a_t - sum_{j<t} e^(G_t-G_j) (k_j.k_t) d_j)
//     o_t = e^G_t b_t + sum_{j<=t} e^(G_t-G_j) (k_j.q_t) d_j
//     S  <- e^G_last S + sum_j e^(G_last-G_j) k_j d_j^T
// so the state is passed over twice (all a_t, b_t; then the update) with a single block reduction
// between, instead of one reduction round and barrier per token.
template <typename T, int NT>
__global__ void __launch_bounds__(kDecThreads, 7) decode_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const float* past_state,
    const T* __restrict__ decay, const T* __restrict__ beta, T* __restrict__ out, float* present_state,
    int num_k_heads, int num_v_heads, int head_v_dim, float scale) {
    static_assert(NT >= 1 && NT <= kMaxDecodeTokens, "1..4 tokens");
    __shared__ float4 kt[kDk];  // k_t[row] for t = 0..3
    __shared__ float4 qt[kDk];  // scale q_t[row]
    __shared__ float4 kw[kDk];  // e^(G_last-G_j) k_j[row]
    __shared__ float kk[NT][NT];  // e^(G_t-G_j) k_j.k_t (j < t) in kk[j][t]; e^(G_t-G_j) k_j.q_t (j <= t) in kq[j][t]
    __shared__ float kq[NT][NT];
    __shared__ float4 red[kDecWarps][2][NT][kCols / 4];  // per warp: a_t, b_t partial sums by column group
    __shared__ float Gs[NT], Es[NT], Bs[NT];  // G_t, e^G_t, beta_t
    __shared__ float4 vs[NT][kCols / 4];     // v_t of this block's columns

    const int Dv = head_v_dim;
    const int slices = Dv / kCols;
    const int slice = blockIdx.x % slices;
    const int bh = blockIdx.x / slices;  // b * Hv + h
    const int h = bh % num_v_heads, b = bh / num_v_heads;
    const int kh = h / (num_v_heads / num_k_heads);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int cg = lane & 7, rsub = lane >> 3;
    const int col = slice * kCols + cg * 4;
    const int64_t base = (int64_t)bh * kDk * Dv + col;

    // State loads go out first: they are the bytes that matter. Plain loads (not the read-only path):
    // past_state may be present_state.
    float4 s[kDecRows];
#pragma unroll
    for (int r = 0; r < kDecRows; ++r) {
        const int row = r * 16 + warp * 4 + rsub;
        s[r] = past_state ? *reinterpret_cast<const float4*>(past_state + base + (int64_t)row * Dv)
                          : make_float4(0.f, 0.f, 0.f, 0.f);
    }

    // Every per-token input is loaded up front, so the block waits for one round trip to memory.
    const int64_t qk_stride = (int64_t)num_k_heads * kDk;
    const int64_t v_stride = (int64_t)num_v_heads * Dv;
    float kin[4] = {}, qin[4] = {}, G[NT], b_t[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) {
        const int64_t token = (int64_t)b * NT + t;
        const int64_t off = token * qk_stride + (int64_t)kh * kDk + threadIdx.x;
        kin[t] = load(k, off);
        qin[t] = load(q, off) * scale;
        G[t] = load(decay, token * num_v_heads + h);
        b_t[t] = load(beta, token * num_v_heads + h);
    }
    // v of the block's columns, one element per thread (through shared memory: 16 fewer registers)
    const float v_in = threadIdx.x < NT * kCols
                           ? load(v, ((int64_t)b * NT + threadIdx.x / kCols) * v_stride + (int64_t)h * Dv +
                                         slice * kCols + threadIdx.x % kCols)
                           : 0.f;
#pragma unroll
    for (int t = 1; t < NT; ++t) G[t] += G[t - 1];
    {
        float w[4] = {};
#pragma unroll
        for (int j = 0; j < NT; ++j) w[j] = expf(G[NT - 1] - G[j]) * kin[j];
        kt[threadIdx.x] = make_float4(kin[0], kin[1], kin[2], kin[3]);
        qt[threadIdx.x] = make_float4(qin[0], qin[1], qin[2], qin[3]);
        kw[threadIdx.x] = make_float4(w[0], w[1], w[2], w[3]);
        if (threadIdx.x < NT * kCols) reinterpret_cast<float*>(vs)[threadIdx.x] = v_in;
        if (threadIdx.x == 0)
#pragma unroll
            for (int t = 0; t < NT; ++t) Gs[t] = G[t], Es[t] = expf(G[t]), Bs[t] = b_t[t];
    }
    __syncthreads();

    // The NT^2 token-pair products (NT (NT-1) / 2 of k.k, NT (NT+1) / 2 of k.q), a warp each in turn;
    // read after the reduction barrier below.
#pragma unroll
    for (int p = warp; p < NT * NT; p += kDecWarps) {
        const int j = p / NT, t = p % NT;
        const bool is_kq = j <= t;  // pair (j, t): k_j.q_t when j <= t, else k_t.k_j (t < j)
        const int lo = is_kq ? j : t, hi_t = is_kq ? t : j;
        const float* a = reinterpret_cast<const float*>(kt) + lo;
        const float* c = reinterpret_cast<const float*>(is_kq ? qt : kt) + hi_t;
        float acc = 0.f;
#pragma unroll
        for (int i = lane; i < kDk; i += 32) acc += a[4 * i] * c[4 * i];
        acc = q3n::warp_sum(acc);
        if (lane == 0) {
            const float e = expf(Gs[hi_t] - Gs[lo]);
            if (is_kq)
                kq[lo][hi_t] = e * acc;
            else
                kk[lo][hi_t] = e * acc;
        }
    }

    // Pass 1: a_t and b_t over this thread's 8 rows, two tokens at a time (16 accumulators), summed over
    // the warp's rows (reduce_scatter4) into red.
#pragma unroll
    for (int t0 = 0; t0 < NT; t0 += 2) {
        float acc[16] = {};  // [a / b][token t0 + u][column]; a token past NT stays zero
#pragma unroll
        for (int r = 0; r < kDecRows; ++r) {
            const int row = r * 16 + warp * 4 + rsub;
            const float4 k4 = kt[row], q4 = qt[row];
            const float kv[4] = {k4.x, k4.y, k4.z, k4.w}, qv[4] = {q4.x, q4.y, q4.z, q4.w};
            const float sv[4] = {s[r].x, s[r].y, s[r].z, s[r].w};
#pragma unroll
            for (int u = 0; u < 2; ++u)
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    if (t0 + u < NT) {
                        acc[u * 4 + c] += sv[c] * kv[t0 + u];
                        acc[(2 + u) * 4 + c] += sv[c] * qv[t0 + u];
                    }
                }
        }
        float part[4];
        reduce_scatter4<16>(acc, part, lane);  // lane rsub: a / b = rsub / 2, token t0 + rsub % 2, 4 columns
        if (t0 + (rsub & 1) < NT)
            red[warp][rsub >> 1][t0 + (rsub & 1)][cg] = make_float4(part[0], part[1], part[2], part[3]);
    }
    __syncthreads();

    // Deltas of this thread's 4 columns, every token (each thread redundantly: no second barrier).
    float d[NT][4];
#pragma unroll
    for (int t = 0; t < NT; ++t) {
        float a[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int w = 0; w < kDecWarps; ++w) {
            const float4 p = red[w][0][t][cg];
            a[0] += p.x, a[1] += p.y, a[2] += p.z, a[3] += p.w;
        }
        const float gt = Es[t], bt = Bs[t];
        const float4 v4 = vs[t][cg];
        const float vv[4] = {v4.x, v4.y, v4.z, v4.w};
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            float x = vv[c] - gt * a[c];
#pragma unroll
            for (int j = 0; j < t; ++j) x -= kk[j][t] * d[j][c];
            d[t][c] = bt * x;
        }
    }
    // Outputs: token t by warp t's first lane of each column group.
    if (rsub == 0 && warp < NT) {
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            if (t != warp) continue;
            float o[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int w = 0; w < kDecWarps; ++w) {
                const float4 p = red[w][1][t][cg];
                o[0] += p.x, o[1] += p.y, o[2] += p.z, o[3] += p.w;
            }
            const float gt = Es[t];
            T* dst = out + ((int64_t)b * NT + t) * v_stride + (int64_t)h * Dv + col;
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                float x = gt * o[c];
#pragma unroll
                for (int j = 0; j <= t; ++j) x += kq[j][t] * d[j][c];
                store(dst, c, x);
            }
        }
    }

    // Pass 2: S <- e^G_last S + sum_j (e^(G_last-G_j) k_j) d_j^T
    const float g_last = Es[NT - 1];
#pragma unroll
    for (int r = 0; r < kDecRows; ++r) {
        const int row = r * 16 + warp * 4 + rsub;
        const float4 w4 = kw[row];
        const float wv[4] = {w4.x, w4.y, w4.z, w4.w};
        float sv[4] = {g_last * s[r].x, g_last * s[r].y, g_last * s[r].z, g_last * s[r].w};
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) sv[c] += wv[j] * d[j][c];
        *reinterpret_cast<float4*>(present_state + base + (int64_t)row * Dv) = make_float4(sv[0], sv[1], sv[2], sv[3]);
    }
}

// ------------------------------------------------------------------------------------------------
// chunked prefill

constexpr int kChunk = 64;
constexpr int kChThreads = 256;
constexpr int kKT = kChunk + 4;  // row stride of the transposed k/q tiles: float4-aligned, fewer conflicts
constexpr int kTri = kChunk + 1;  // row stride of L and P: column walks hit distinct banks

struct ChunkSmem {
    float kT[kDk][kKT];     // k of the chunk, transposed: kT[d][i]
    float qT[kDk][kKT];     // scale * q, transposed
    float S[kDk][kCols];    // the state slice
    float D[kChunk][kCols];  // v slice -> right-hand side -> deltas
    float QS[kChunk][kCols];
    float L[kChunk][kTri];
    float P[kChunk][kTri];
    float G[kChunk];
    float eG[kChunk];
    float bt[kChunk];
};

// acc[r][c] += sum over d of At[d][ti*4 + r] * Bt[d][tj*4 + c]: a 4x4 tile of A B^T from transposed
// (dimension-major) chunk operands, d in ascending order (both callers relied on that order).
__device__ __forceinline__ void tile_dot_4x4(const float (*At)[kKT], const float (*Bt)[kKT], int ti, int tj,
                                             float acc[4][4]) {
#pragma unroll 4
    for (int d = 0; d < kDk; ++d) {
        const float4 ai = *reinterpret_cast<const float4*>(&At[d][ti * 4]);
        const float4 bj4 = *reinterpret_cast<const float4*>(&Bt[d][tj * 4]);
        const float a[4] = {ai.x, ai.y, ai.z, ai.w}, bj[4] = {bj4.x, bj4.y, bj4.z, bj4.w};
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[r][c] += a[r] * bj[c];
    }
}

constexpr size_t kChunkSmemBytes = sizeof(ChunkSmem);

// Where a prefill block works: (batch, value head, 32-column slice of the state); both chunk kernels.
struct ChunkBlock {
    int Dv, nvh, h, b, kh, col0;
    int64_t state_base, qk_stride, v_stride;
    __device__ __forceinline__ ChunkBlock(int num_k_heads, int num_v_heads, int head_v_dim) {
        Dv = head_v_dim, nvh = num_v_heads;
        const int slices = Dv / kCols;
        const int slice = blockIdx.x % slices;
        const int bh = blockIdx.x / slices;
        h = bh % num_v_heads, b = bh / num_v_heads;
        kh = h / (num_v_heads / num_k_heads);
        col0 = slice * kCols;
        state_base = (int64_t)bh * kDk * Dv + col0;
        qk_stride = (int64_t)num_k_heads * kDk;
        v_stride = (int64_t)num_v_heads * Dv;
    }
    // element offset of token i of the chunk starting at t0, in the [B, T, Hv, Dv] v / out layout
    __device__ __forceinline__ int64_t v_off(int seq, int t0, int i) const {
        return ((int64_t)b * seq + t0 + i) * v_stride + (int64_t)h * Dv + col0;
    }
};

// The state slice to / from shared memory (Smem: either kernel's layout, the row strides differ).
template <class Smem>
__device__ __forceinline__ void load_state(Smem& sm, const float* past_state, const ChunkBlock& cb) {
    for (int idx = threadIdx.x; idx < kDk * kCols; idx += kChThreads) {
        const int d = idx / kCols, c = idx % kCols;
        sm.S[d][c] = past_state ? past_state[cb.state_base + (int64_t)d * cb.Dv + c] : 0.f;
    }
}

template <class Smem>
__device__ __forceinline__ void store_state(const Smem& sm, float* present_state, const ChunkBlock& cb) {
    for (int idx = threadIdx.x; idx < kDk * kCols; idx += kChThreads) {
        const int d = idx / kCols, c = idx % kCols;
        present_state[cb.state_base + (int64_t)d * cb.Dv + c] = sm.S[d][c];
    }
}

// Phase a of both chunk kernels: the chunk's k, q (times scale when kScaleQ) transposed into kT, qT,
// its v slice into D, and (warp 0) G = cumsum(g), e^G, beta; ends with a barrier. Padded tokens are
// k = q = v = beta = g = 0 and change nothing. tok(m), dim(m): the token and key dimension of this
// thread's m-th k/q element (the kernels map threads differently, for their shared-memory banks).
// All of the chunk's loads are issued before the first shared-memory store (one round trip per chunk
// instead of one per element group).
template <bool kScaleQ, class Smem, typename T, class Tok, class Dim>
__device__ __forceinline__ void load_chunk(Smem& sm, const T* __restrict__ q, const T* __restrict__ k,
                                           const T* __restrict__ v, const T* __restrict__ decay,
                                           const T* __restrict__ beta, const ChunkBlock& cb, int seq, int t0,
                                           int valid, float scale, Tok tok, Dim dim) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    {
        constexpr int kPerThread = kChunk * kDk / kChThreads;     // 32
        constexpr int kVPerThread = kChunk * kCols / kChThreads;  // 8
        float kr[kPerThread], qr[kPerThread], vr[kVPerThread];
#pragma unroll
        for (int m = 0; m < kPerThread; ++m) {
            const int i = tok(m), d = dim(m);
            const int64_t off = ((int64_t)cb.b * seq + t0 + i) * cb.qk_stride + (int64_t)cb.kh * kDk + d;
            kr[m] = i < valid ? load(k, off) : 0.f;
            qr[m] = i < valid ? load(q, off) : 0.f;
        }
#pragma unroll
        for (int m = 0; m < kVPerThread; ++m) {
            const int i = m * (kChThreads / kCols) + tid / kCols, c = tid % kCols;
            vr[m] = i < valid ? load(v, cb.v_off(seq, t0, i) + c) : 0.f;
        }
#pragma unroll
        for (int m = 0; m < kPerThread; ++m) {
            sm.kT[dim(m)][tok(m)] = kr[m];
            sm.qT[dim(m)][tok(m)] = kScaleQ ? qr[m] * scale : qr[m];
        }
#pragma unroll
        for (int m = 0; m < kVPerThread; ++m) sm.D[m * (kChThreads / kCols) + tid / kCols][tid % kCols] = vr[m];
    }
    if (warp == 0) {
        // inclusive scan of g over the chunk: two tokens per lane
        const int i0 = 2 * lane, i1 = 2 * lane + 1;
        const int nh = cb.nvh;
        const int64_t gi = ((int64_t)cb.b * seq + t0) * nh + cb.h;
        const float g0 = i0 < valid ? load(decay, gi + (int64_t)i0 * nh) : 0.f;
        const float g1 = i1 < valid ? load(decay, gi + (int64_t)i1 * nh) : 0.f;
        float run = g0 + g1;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const float up = __shfl_up_sync(0xffffffffu, run, o);
            if (lane >= o) run += up;
        }
        const float before = run - g0 - g1;
        sm.G[i0] = before + g0;
        sm.G[i1] = run;
        sm.eG[i0] = expf(before + g0);
        sm.eG[i1] = expf(run);
        sm.bt[i0] = i0 < valid ? load(beta, gi + (int64_t)i0 * nh) : 0.f;
        sm.bt[i1] = i1 < valid ? load(beta, gi + (int64_t)i1 * nh) : 0.f;
    }
    __syncthreads();
}

template <typename T>
__global__ void __launch_bounds__(kChThreads) chunk_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const float* past_state,
    const T* __restrict__ decay, const T* __restrict__ beta, T* __restrict__ out, float* present_state, int seq,
    int num_k_heads, int num_v_heads, int head_v_dim, float scale) {
    extern __shared__ __align__(128) unsigned char smem_raw[];
    ChunkSmem& sm = *reinterpret_cast<ChunkSmem*>(smem_raw);

    const ChunkBlock cb(num_k_heads, num_v_heads, head_v_dim);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    load_state(sm, past_state, cb);

    const int chunks = (seq + kChunk - 1) / kChunk;
    for (int n = 0; n < chunks; ++n) {
        const int t0 = n * kChunk;
        const int valid = min(kChunk, seq - t0);
        // ---- a. load the chunk (thread = one key dimension, every second token)
        load_chunk<true>(sm, q, k, v, decay, beta, cb, seq, t0, valid, scale,
                         [&](int m) { return m * (kChThreads / kDk) + tid / kDk; }, [&](int) { return tid % kDk; });

        // ---- b. L (4x4 tile per thread), then rhs and QS (2 rows x 4 columns per thread)
        {
            const int ti = tid / 16, tj = tid % 16;
            float kk[4][4] = {};
            tile_dot_4x4(sm.kT, sm.kT, ti, tj, kk);
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int i = ti * 4 + r;
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int j = tj * 4 + c;
                    // G is non-increasing, so e^(G_i - G_j) <= 1 only for j <= i: mask before exp.
                    sm.L[i][j] = j < i ? sm.bt[i] * expf(sm.G[i] - sm.G[j]) * kk[r][c] : 0.f;
                }
            }
        }
        {
            const int ti = tid / 8, tc = tid % 8;
            const int i0 = ti, i1 = ti + 32;
            float ks0[4] = {}, ks1[4] = {}, qs0[4] = {}, qs1[4] = {};
#pragma unroll 4
            for (int d = 0; d < kDk; ++d) {
                const float4 s4 = *reinterpret_cast<const float4*>(&sm.S[d][tc * 4]);
                const float sv[4] = {s4.x, s4.y, s4.z, s4.w};
                const float k0 = sm.kT[d][i0], k1 = sm.kT[d][i1], q0 = sm.qT[d][i0], q1 = sm.qT[d][i1];
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    ks0[c] += k0 * sv[c];
                    ks1[c] += k1 * sv[c];
                    qs0[c] += q0 * sv[c];
                    qs1[c] += q1 * sv[c];
                }
            }
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int cc = tc * 4 + c;
                sm.D[i0][cc] = sm.bt[i0] * (sm.D[i0][cc] - sm.eG[i0] * ks0[c]);
                sm.D[i1][cc] = sm.bt[i1] * (sm.D[i1][cc] - sm.eG[i1] * ks1[c]);
                sm.QS[i0][cc] = qs0[c];
                sm.QS[i1][cc] = qs1[c];
            }
        }
        __syncthreads();

        // ---- c. warp 0: (I + L) D = rhs in place, lane = column, the 64 deltas in registers (a
        //      sequential solve has no use for more threads); warps 1..7 meanwhile: P (needed in d only)
        if (warp == 0) {
            float dl[kChunk];
#pragma unroll
            for (int j = 0; j < kChunk; ++j) dl[j] = sm.D[j][lane];
#pragma unroll
            for (int i = 1; i < kChunk; ++i) {
                float acc0 = 0.f, acc1 = 0.f;
#pragma unroll
                for (int j = 0; j + 1 < i; j += 2) {
                    acc0 += sm.L[i][j] * dl[j];
                    acc1 += sm.L[i][j + 1] * dl[j + 1];
                }
                if (i % 2 == 1) acc0 += sm.L[i][i - 1] * dl[i - 1];
                dl[i] -= acc0 + acc1;
            }
#pragma unroll
            for (int j = 0; j < kChunk; ++j) sm.D[j][lane] = dl[j];
        } else {
            for (int tile = tid - 32; tile < (kChunk / 4) * (kChunk / 4); tile += kChThreads - 32) {
                const int ti = tile / 16, tj = tile % 16;
                if (tj > ti) {  // strictly above the diagonal in 4x4 blocks: all zero
#pragma unroll
                    for (int r = 0; r < 4; ++r)
#pragma unroll
                        for (int c = 0; c < 4; ++c) sm.P[ti * 4 + r][tj * 4 + c] = 0.f;
                    continue;
                }
                float qk[4][4] = {};
                tile_dot_4x4(sm.qT, sm.kT, ti, tj, qk);
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    const int i = ti * 4 + r;
#pragma unroll
                    for (int c = 0; c < 4; ++c) {
                        const int j = tj * 4 + c;
                        sm.P[i][j] = j <= i ? expf(sm.G[i] - sm.G[j]) * qk[r][c] : 0.f;
                    }
                }
            }
        }
        __syncthreads();

        // ---- d. outputs and the state update
        {
            const int ti = tid / 8, tc = tid % 8;
            const int i0 = ti, i1 = ti + 32;
            float o0[4], o1[4];
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                o0[c] = sm.eG[i0] * sm.QS[i0][tc * 4 + c];
                o1[c] = sm.eG[i1] * sm.QS[i1][tc * 4 + c];
            }
            for (int j = 0; j <= i1; ++j) {
                const float4 d4 = *reinterpret_cast<const float4*>(&sm.D[j][tc * 4]);
                const float dv[4] = {d4.x, d4.y, d4.z, d4.w};
                const float p0 = j <= i0 ? sm.P[i0][j] : 0.f, p1 = sm.P[i1][j];
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    o0[c] += p0 * dv[c];
                    o1[c] += p1 * dv[c];
                }
            }
            if (i0 < valid) {
                T* dst = out + cb.v_off(seq, t0, i0) + tc * 4;
#pragma unroll
                for (int c = 0; c < 4; ++c) store(dst, c, o0[c]);
            }
            if (i1 < valid) {
                T* dst = out + cb.v_off(seq, t0, i1) + tc * 4;
#pragma unroll
                for (int c = 0; c < 4; ++c) store(dst, c, o1[c]);
            }
        }
        // Other threads read S only in phase b, before the last barrier: updating it now is safe.
        {
            const int td = tid / 8, tc = tid % 8;  // rows td*4..+3, columns tc*4..+3
            const float g_last = sm.G[kChunk - 1];
            const float e_last = expf(g_last);
            float acc[4][4];
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const float4 s4 = *reinterpret_cast<const float4*>(&sm.S[td * 4 + r][tc * 4]);
                acc[r][0] = e_last * s4.x, acc[r][1] = e_last * s4.y, acc[r][2] = e_last * s4.z, acc[r][3] = e_last * s4.w;
            }
            for (int i = 0; i < kChunk; ++i) {
                const float w = expf(g_last - sm.G[i]);
                const float4 d4 = *reinterpret_cast<const float4*>(&sm.D[i][tc * 4]);
                const float dv[4] = {w * d4.x, w * d4.y, w * d4.z, w * d4.w};
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    const float kd = sm.kT[td * 4 + r][i];
#pragma unroll
                    for (int c = 0; c < 4; ++c) acc[r][c] += kd * dv[c];
                }
            }
            // each thread rewrites exactly the S elements it read above: no barrier needed
#pragma unroll
            for (int r = 0; r < 4; ++r)
                *reinterpret_cast<float4*>(&sm.S[td * 4 + r][tc * 4]) = make_float4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
        }
        __syncthreads();
    }

    store_state(sm, present_state, cb);
}

// ------------------------------------------------------------------------------------------------
// chunked prefill on tensor cores: the same algorithm as chunk_kernel, every product (L, P, K S, Q S,
// P D, K^T D) as WMMA tf32 m16n16k8 tiles with float32 accumulation. Operands are split into a tf32
// high part and a tf32 remainder and three products are summed (the remainder x remainder term is
// dropped), which keeps float32-level accuracy: the state is carried across the whole sequence.
// Operands that tf32 holds exactly (bf16 inputs: k, unscaled q) skip their remainder products.
// Elementwise work (causal masks, decays, beta, scale) runs between the products on shared memory.

namespace wmma = nvcuda::wmma;
using FragAR = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using FragAC = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
using FragBR = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;

// Row strides of 8 mod 32 floats: the 8 x 4 element pattern of a tf32 fragment load then hits 32
// distinct banks (and tiles stay 32-byte aligned, as WMMA requires).
constexpr int kTcLd = kChunk + 8;  // kT, qT, L, P
constexpr int kTcCols = kCols + 8;  // S, D, KS, QS

struct alignas(128) ChunkTcSmem {
    float kT[kDk][kTcLd];  // k^T: kT[d][i]
    float qT[kDk][kTcLd];  // q^T, unscaled (scale is applied in the elementwise passes)
    float S[kDk][kTcCols];
    float D[kChunk][kTcCols];   // v -> rhs -> deltas
    float KS[kChunk][kTcCols];  // K S -> deltas scaled to the chunk end
    float QS[kChunk][kTcCols];  // Q S -> e^G scale Q S -> outputs
    float L[kChunk][kTcLd];
    float P[kChunk][kTcLd];
    float G[kChunk];
    float eG[kChunk];
    float bt[kChunk];
};
constexpr size_t kChunkTcSmemBytes = sizeof(ChunkTcSmem);

template <class Frag>
__device__ __forceinline__ void split_tf32(const Frag& f, Frag& hi, Frag& lo) {
#pragma unroll
    for (int i = 0; i < f.num_elements; ++i) {
        const float h = wmma::__float_to_tf32(f.x[i]);
        hi.x[i] = h;
        lo.x[i] = wmma::__float_to_tf32(f.x[i] - h);
    }
}

// acc += A B in split tf32 (see above); kAExact / kBExact: the operand is exact in tf32.
template <bool kAExact, bool kBExact, class FA, class FB>
__device__ __forceinline__ void mma3(FragC& acc, const FA& a, const FB& b) {
    FA ah, al;
    FB bh, bl;
    split_tf32(a, ah, al);
    split_tf32(b, bh, bl);
    if (!kAExact) wmma::mma_sync(acc, al, bh, acc);
    if (!kBExact) wmma::mma_sync(acc, ah, bl, acc);
    wmma::mma_sync(acc, ah, bh, acc);
}

// acc += A B over kK = k-steps of 8, both operands in shared memory: a_at(k0) / b_at(k0) address the
// fragments of step k0 (leading dimensions lda / ldb). One loop for every product of the chunk.
template <class FragA, bool kAExact, bool kBExact, int kK, int kUnroll, class AAt, class BAt>
__device__ __forceinline__ void mma_k(FragC& acc, AAt a_at, unsigned lda, BAt b_at, unsigned ldb) {
#pragma unroll kUnroll
    for (int k0 = 0; k0 < kK; k0 += 8) {
        FragA a;
        FragBR bb;
        wmma::load_matrix_sync(a, a_at(k0), lda);
        wmma::load_matrix_sync(bb, b_at(k0), ldb);
        mma3<kAExact, kBExact>(acc, a, bb);
    }
}

template <typename T>
__global__ void __launch_bounds__(kChThreads) chunk_tc_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const float* past_state,
    const T* __restrict__ decay, const T* __restrict__ beta, T* __restrict__ out, float* present_state, int seq,
    int num_k_heads, int num_v_heads, int head_v_dim, float scale) {
    extern __shared__ __align__(128) unsigned char smem_raw[];
    ChunkTcSmem& sm = *reinterpret_cast<ChunkTcSmem*>(smem_raw);
    constexpr bool kExact = std::is_same<T, __nv_bfloat16>::value;  // bf16 values are tf32 values

    const ChunkBlock cb(num_k_heads, num_v_heads, head_v_dim);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    load_state(sm, past_state, cb);

    const int chunks = (seq + kChunk - 1) / kChunk;
    for (int n = 0; n < chunks; ++n) {
        const int t0 = n * kChunk;
        const int valid = min(kChunk, seq - t0);
        // ---- a. load (q unscaled). A warp instruction covers 8 tokens x 4 key dimensions: its
        //      transposed stores kT[d][i] land in 32 distinct banks (row stride 8 mod 32).
        load_chunk<false>(sm, q, k, v, decay, beta, cb, seq, t0, valid, scale,
                          [&](int m) { return ((m * (kChThreads / 32) + warp) % 8) * 8 + lane % 8; },
                          [&](int m) { return ((m * (kChThreads / 32) + warp) / 8) * 4 + lane / 8; });

        // ---- b. products: jobs 0-9 L (lower 16x16 tiles), 10-19 P, 20-27 K S, 28-35 Q S
        for (int job = warp; job < 36; job += kChThreads / 32) {
            FragC acc;
            wmma::fill_fragment(acc, 0.f);
            if (job < 20) {
                int t = job % 10, ti = 0;
                while (t > ti) t -= ++ti;  // t-th lower tile in row order: (ti, tj = t)
                const int tj = t;
                const float* A = job < 10 ? &sm.kT[0][0] : &sm.qT[0][0];
                mma_k<FragAC, kExact, kExact, kDk, 4>(
                    acc, [&](int k0) { return A + k0 * kTcLd + ti * 16; }, kTcLd, [&](int k0) { return &sm.kT[k0][tj * 16]; }, kTcLd);
                wmma::store_matrix_sync(job < 10 ? &sm.L[ti * 16][tj * 16] : &sm.P[ti * 16][tj * 16], acc, kTcLd,
                                        wmma::mem_row_major);
            } else {
                const int t = (job - 20) % 8, ti = t / 2, tc = t % 2;
                const float* A = job < 28 ? &sm.kT[0][0] : &sm.qT[0][0];
                mma_k<FragAC, kExact, false, kDk, 4>(
                    acc, [&](int k0) { return A + k0 * kTcLd + ti * 16; }, kTcLd, [&](int k0) { return &sm.S[k0][tc * 16]; }, kTcCols);
                wmma::store_matrix_sync(job < 28 ? &sm.KS[ti * 16][tc * 16] : &sm.QS[ti * 16][tc * 16], acc, kTcCols,
                                        wmma::mem_row_major);
            }
        }
        __syncthreads();
        // elementwise: masks and decays of L and P; rhs; e^G scale Q S
        for (int idx = tid; idx < kChunk * kChunk; idx += kChThreads) {
            const int i = idx / kChunk, j = idx % kChunk;
            // G is non-increasing, so e^(G_i - G_j) <= 1 only for j <= i: mask before exp.
            const float dec = j <= i ? expf(sm.G[i] - sm.G[j]) : 0.f;
            sm.L[i][j] = j < i ? sm.bt[i] * dec * sm.L[i][j] : 0.f;
            sm.P[i][j] = j <= i ? scale * dec * sm.P[i][j] : 0.f;
        }
        for (int idx = tid; idx < kChunk * kCols; idx += kChThreads) {
            const int i = idx / kCols, c = idx % kCols;
            sm.D[i][c] = sm.bt[i] * (sm.D[i][c] - sm.eG[i] * sm.KS[i][c]);
            sm.QS[i][c] *= scale * sm.eG[i];
        }
        __syncthreads();

        // ---- c. (I + L) D = rhs, blocked by 16 rows: warp 0 solves a diagonal block (lane = column,
        //      deltas in registers), then all threads subtract its contribution from the rows below
        for (int blk = 0; blk < kChunk; blk += 16) {
            if (warp == 0) {
                float dl[16];
#pragma unroll
                for (int r = 0; r < 16; ++r) dl[r] = sm.D[blk + r][lane];
#pragma unroll
                for (int r = 1; r < 16; ++r) {
                    float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                    for (int j = 0; j < r; j += 4) {
                        // L is zero from the diagonal on: the padding terms of the last float4 add 0
                        const float4 l4 = *reinterpret_cast<const float4*>(&sm.L[blk + r][blk + j]);
                        acc[0] += l4.x * dl[j];
                        if (j + 1 < r) acc[1] += l4.y * dl[j + 1];
                        if (j + 2 < r) acc[2] += l4.z * dl[j + 2];
                        if (j + 3 < r) acc[3] += l4.w * dl[j + 3];
                    }
                    dl[r] -= (acc[0] + acc[1]) + (acc[2] + acc[3]);
                }
#pragma unroll
                for (int r = 0; r < 16; ++r) sm.D[blk + r][lane] = dl[r];
            }
            __syncthreads();
            if (blk + 16 < kChunk) {
                for (int idx = tid; idx < (kChunk - blk - 16) * kCols; idx += kChThreads) {
                    const int i = blk + 16 + idx / kCols, c = idx % kCols;
                    float acc = 0.f;
#pragma unroll
                    for (int j = 0; j < 16; j += 4) {
                        const float4 l4 = *reinterpret_cast<const float4*>(&sm.L[i][blk + j]);
                        acc += l4.x * sm.D[blk + j][c] + l4.y * sm.D[blk + j + 1][c] + l4.z * sm.D[blk + j + 2][c] +
                               l4.w * sm.D[blk + j + 3][c];
                    }
                    sm.D[i][c] -= acc;
                }
                __syncthreads();
            }
        }

        // ---- d. deltas scaled to the chunk end, then O = e^G scale Q S + P D and S <- e^G_last S + K^T D_w
        const float g_last = sm.G[kChunk - 1];
        for (int idx = tid; idx < kChunk * kCols; idx += kChThreads) {
            const int i = idx / kCols, c = idx % kCols;
            sm.KS[i][c] = sm.D[i][c] * expf(g_last - sm.G[i]);
        }
        __syncthreads();
        const float e_last = expf(g_last);
        for (int job = warp; job < 24; job += kChThreads / 32) {
            FragC acc;
            if (job < 8) {
                const int ti = job / 2, tc = job % 2;
                wmma::load_matrix_sync(acc, &sm.QS[ti * 16][tc * 16], kTcCols, wmma::mem_row_major);
                mma_k<FragAR, false, false, kChunk, kChunk / 8>(
                    acc, [&](int k0) { return &sm.P[ti * 16][k0]; }, kTcLd, [&](int k0) { return &sm.D[k0][tc * 16]; }, kTcCols);
                wmma::store_matrix_sync(&sm.QS[ti * 16][tc * 16], acc, kTcCols, wmma::mem_row_major);
            } else {
                const int td = (job - 8) / 2, tc = (job - 8) % 2;
                wmma::load_matrix_sync(acc, &sm.S[td * 16][tc * 16], kTcCols, wmma::mem_row_major);
#pragma unroll
                for (int i = 0; i < acc.num_elements; ++i) acc.x[i] *= e_last;
                mma_k<FragAR, kExact, false, kChunk, kChunk / 8>(
                    acc, [&](int k0) { return &sm.kT[td * 16][k0]; }, kTcLd, [&](int k0) { return &sm.KS[k0][tc * 16]; }, kTcCols);
                wmma::store_matrix_sync(&sm.S[td * 16][tc * 16], acc, kTcCols, wmma::mem_row_major);
            }
        }
        __syncthreads();
        for (int idx = tid; idx < kChunk * kCols; idx += kChThreads) {
            const int i = idx / kCols, c = idx % kCols;
            if (i < valid) store(out, cb.v_off(seq, t0, i) + c, sm.QS[i][c]);
        }
        // The next chunk's loads write kT, qT, D, G only: the outputs read above are not among them.
    }
    __syncthreads();
    store_state(sm, present_state, cb);
}

// ------------------------------------------------------------------------------------------------
// dispatch helpers

inline bool shapes_fit(const void* past_state, const float* present_state, int num_k_heads, int num_v_heads,
                       int head_k_dim, int head_v_dim, int64_t batch) {
    return head_k_dim == kDk && head_v_dim % kCols == 0 && q3n::aligned(present_state, 16) &&
           (!past_state || q3n::aligned(past_state, 16)) && batch * num_v_heads * (head_v_dim / kCols) <= 0x7fffffff;
}

template <typename T>
int launch_decode(const void* q, const void* k, const void* v, const float* past_state, const void* decay,
                  const void* beta, void* out, float* present_state, int batch, int seq, int num_k_heads,
                  int num_v_heads, int head_v_dim, float scale, cudaStream_t stream) {
    const int blocks = batch * num_v_heads * (head_v_dim / kCols);
    const auto launch = [&](auto kernel) {
        kernel<<<blocks, kDecThreads, 0, stream>>>(static_cast<const T*>(q), static_cast<const T*>(k),
                                                   static_cast<const T*>(v), past_state, static_cast<const T*>(decay),
                                                   static_cast<const T*>(beta), static_cast<T*>(out), present_state,
                                                   num_k_heads, num_v_heads, head_v_dim, scale);
    };
    switch (seq) {  // the dispatch only sends 1 <= seq <= kMaxDecodeTokens
        case 1: launch(decode_kernel<T, 1>); break;
        case 2: launch(decode_kernel<T, 2>); break;
        case 3: launch(decode_kernel<T, 3>); break;
        default: launch(decode_kernel<T, 4>); break;
    }
    return q3n::launch_status();
}

// The two chunked kernels share their arguments and grid and differ only in shared memory.
template <typename T, typename Kernel>
int launch_chunked(Kernel kernel, size_t smem_bytes, const void* q, const void* k, const void* v, const float* past_state,
                   const void* decay, const void* beta, void* out, float* present_state, int batch, int seq,
                   int num_k_heads, int num_v_heads, int head_v_dim, float scale, cudaStream_t stream) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_bytes);
    if (err != cudaSuccess) {
        cudaGetLastError();
        return static_cast<int>(err);
    }
    const int blocks = batch * num_v_heads * (head_v_dim / kCols);
    kernel<<<blocks, kChThreads, smem_bytes, stream>>>(
        static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), past_state,
        static_cast<const T*>(decay), static_cast<const T*>(beta), static_cast<T*>(out), present_state, seq,
        num_k_heads, num_v_heads, head_v_dim, scale);
    return q3n::launch_status();
}

template <typename T>
int launch_chunk_tc(const void* q, const void* k, const void* v, const float* past_state, const void* decay,
                    const void* beta, void* out, float* present_state, int batch, int seq, int num_k_heads,
                    int num_v_heads, int head_v_dim, float scale, cudaStream_t stream) {
    return launch_chunked<T>(chunk_tc_kernel<T>, kChunkTcSmemBytes, q, k, v, past_state, decay, beta, out, present_state,
                             batch, seq, num_k_heads, num_v_heads, head_v_dim, scale, stream);
}

template <typename T>
int launch_chunk(const void* q, const void* k, const void* v, const float* past_state, const void* decay,
                 const void* beta, void* out, float* present_state, int batch, int seq, int num_k_heads,
                 int num_v_heads, int head_v_dim, float scale, cudaStream_t stream) {
    return launch_chunked<T>(chunk_kernel<T>, kChunkSmemBytes, q, k, v, past_state, decay, beta, out, present_state,
                             batch, seq, num_k_heads, num_v_heads, head_v_dim, scale, stream);
}

}  // namespace q3n_gdn
