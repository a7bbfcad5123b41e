// Split chunked prefill (Dk = 128, Dv a multiple of 32, sm_80+): the chunk algebra of chunk_tc_kernel
// (fast.cuh) in two passes, so that the only work left in the sequential walk over chunks is the part
// that needs the state.
//
// factor_kernel, parallel over (batch, key head, chunk): everything that depends on k, q, g, beta only.
//     G = cumsum(g);  L_ij = beta_i e^(G_i-G_j) k_i.k_j (j<i);  M = (I + L)^-1 diag(beta)
//     P_ij = scale e^(G_i-G_j) q_i.k_j (j<=i)
//   The Gram products k_i.k_j, q_i.k_j once per key head, then for each value head that shares it (GVA),
//   two at a time: M by forward substitution, one column per thread. M, P (64 x 64 float32, or for bf16
//   inputs two bf16 planes each, high part and remainder, in the same bytes) and G of each value head go
//   to the workspace.
// state pass, one block per (batch, value head, 32 state columns), the chunks in order:
//     D = M (V - e^G (K S));  O = scale e^G (Q S) + P D;  S <- e^(G_last) S + K^T (e^(G_last-G) D)
//   every product on mma.sync with float32 accumulation; an operand the mma type does not hold exactly
//   (the state, M, P, R, D; float32 k and q) is split into parts whose cross products are summed: for bf16
//   inputs two bf16 parts on m16n8k16 (16 significant bits: the carried state stays within ~5e-6 of
//   float64 over the whole sequence), otherwise tf32 high part + remainder on m16n8k8 (remainder x
//   remainder dropped). 16-bit k, q are exact in bf16 / tf32.
//   state_columns_kernel (16-bit inputs): each pair of warps owns 8 of the 32 state columns for the whole
//   chunk (R, D, O and the state's columns never mix), so a chunk takes two pair barriers and one block
//   barrier; all inputs of the next chunk are copied in by cp.async while this one computes.
//   state_kernel (float32 inputs, whose k, q rows are too wide for that layout): the block-wide walk.
// A sequence longer than the workspace holds is walked in segments (factor pass, then state pass, per
// segment), the state passing through present_state between them.
#pragma once

#include <algorithm>
#include <cstdint>

#include "fast.cuh"

namespace q3n_gdn {

constexpr int kSplitC = kChunk;                                 // 64 tokens per chunk
constexpr int kFactorFloats = 2 * kSplitC * kSplitC + kSplitC;  // M, P, G of one (batch, value head, chunk)
constexpr size_t kFactorBytes = kFactorFloats * sizeof(float);
// Workspace a plugin asks for at most (unless one chunk of factors for every (batch, head) needs more):
// segments of this size keep the factor pass's grid large (>= 127 chunks x 32 heads at batch 1).
constexpr size_t kSplitWorkspaceCap = size_t(128) << 20;
constexpr int kFactorThreads = 128;
constexpr int kStateThreads = 256;
constexpr int kMPLd = kSplitC + 4;  // M, P row stride: A-fragment reads (4g + t) hit distinct banks
constexpr int kColLd = kCols + 8;   // S, R, D, O row stride: B-fragment reads (8t + g) hit distinct banks

// k / q rows in shared memory, as loaded (16-bit or float32): row strides of 68 and 132 words.
template <typename T>
constexpr int kRowLd = sizeof(T) == 2 ? kDk + 8 : kDk + 4;

// bf16 inputs: every product of the state pass on bf16 m16n8k16 mma (fragments by ldmatrix), each operand
// that bf16 does not hold (the state, M, P, R, D, the scaled deltas) split into kBf16Parts bf16 parts; k and
// q are exact. Two parts hold 16 significant bits (2^-17 relative per element): the carried state stays
// within ~5e-6 of float64 over any length, the outputs within ~1e-5 (bench/gdn_bf16_parts.py; a third part,
// 5e-9, costs half as many mma again). float16 / float32 inputs keep the split-tf32 products (an fp16
// split would underflow).
template <typename T>
constexpr bool kBf16Path = std::is_same<T, __nv_bfloat16>::value;
constexpr int kBf16Parts = 2;
// On the bf16 path the factor pass writes M and P as two bf16 planes (high part, remainder), the 16 KiB a
// float32 matrix takes, so the workspace layout is the same for every dtype.
constexpr int kPlaneLd = kSplitC + 8;  // M, P plane row stride in shared memory: ldmatrix rows hit distinct banks

// ------------------------------------------------------------------------------------------------
// tf32 mma

__device__ __forceinline__ void mma_tf32(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// m16n8k8 fragments split into a tf32 high part and remainder (A: rows g, g+8 x cols t, t+4; B: rows t,
// t+4 x col g; g = lane / 4, t = lane % 4). kExact: the values are tf32 values (no remainder).
struct FragA {
    uint32_t hi[4], lo[4];
};
struct FragB {
    uint32_t hi[2], lo[2];
};
// hi: x rounded to tf32 (nearest, ties away) by integer arithmetic, 2 instructions where cvt.rna.tf32 takes 4
// (its infinity / NaN test and select); lo: the remainder truncated to tf32. A NaN may lose its NaN-ness in hi
// (0x7fffffff + 0x1000 wraps) but lo = x - hi is NaN and truncation keeps it, so NaN still propagates.
__device__ __forceinline__ void split_tf32(float x, bool exact, uint32_t& hi, uint32_t& lo) {
    hi = exact ? __float_as_uint(x) : (__float_as_uint(x) + 0x1000u) & 0xffffe000u;
    lo = exact ? 0u : __float_as_uint(x - __uint_as_float(hi)) & 0xffffe000u;
}
template <bool kExact>
__device__ __forceinline__ FragA frag_a(float a0, float a1, float a2, float a3) {
    FragA f;
    split_tf32(a0, kExact, f.hi[0], f.lo[0]);
    split_tf32(a1, kExact, f.hi[1], f.lo[1]);
    split_tf32(a2, kExact, f.hi[2], f.lo[2]);
    split_tf32(a3, kExact, f.hi[3], f.lo[3]);
    return f;
}
template <bool kExact>
__device__ __forceinline__ FragB frag_b(float b0, float b1) {
    FragB f;
    split_tf32(b0, kExact, f.hi[0], f.lo[0]);
    split_tf32(b1, kExact, f.hi[1], f.lo[1]);
    return f;
}

// d[0] += Ah Bh, d[1] += Al Bh, d[2] += Ah Bl: one accumulator per pass, so the three products of a step
// do not wait on each other (the kernels are latency-bound); sum3 adds them at the end.
template <bool kAExact, bool kBExact>
__device__ __forceinline__ void mma3(float d[3][4], const FragA& a, const FragB& b) {
    mma_tf32(d[0], a.hi, b.hi);
    if (!kAExact) mma_tf32(d[1], a.lo, b.hi);
    if (!kBExact) mma_tf32(d[2], a.hi, b.lo);
}
__device__ __forceinline__ float sum3(const float d[3][4], int e) { return d[0][e] + (d[1][e] + d[2][e]); }

using q3n::cp_async16;
using q3n::cp_async_commit;
using q3n::cp_async_wait;

// The 64 k (or q) rows of a chunk into rows[64][kRowLd<T>]; rows past `valid` become zeros.
template <typename T, int kThreads>
__device__ __forceinline__ void copy_rows(T (*rows)[kRowLd<T>], const T* src, int64_t row0, int64_t row_stride,
                                          int valid) {
    constexpr int kVec = 16 / sizeof(T), kPerRow = kDk / kVec;
    for (int idx = threadIdx.x; idx < kSplitC * kPerRow; idx += kThreads) {
        const int i = idx / kPerRow, u = idx % kPerRow;
        const bool ok = i < valid;
        cp_async16(&rows[i][u * kVec], src + (ok ? row0 + i * row_stride : row0) + u * kVec, ok);
    }
}

// Workspace offset (floats) of the factors of (batch b, value head h, chunk n of the segment).
__device__ __forceinline__ int64_t factor_base(int b, int h, int n, int num_v_heads, int seg_chunks) {
    return (((int64_t)b * num_v_heads + h) * seg_chunks + n) * kFactorFloats;
}

// ------------------------------------------------------------------------------------------------
// factor pass

// Value heads per round of a factor block: its 128 threads solve two heads' systems at once (a column each).
constexpr int kFactorHeads = 2;

template <typename T>
struct FactorSmem {
    union {
        struct {
            T K[kSplitC][kRowLd<T>];
            T Q[kSplitC][kRowLd<T>];
        } in;                                  // until the Gram products are done
        float L[kFactorHeads][kSplitC][kMPLd];  // then the round's L matrices
    };
    float Gkk[kSplitC][kMPLd];  // k_i.k_j (j <= i, by 8-column tiles), shared by the key head's value heads
    float Gqk[kSplitC][kMPLd];  // q_i.k_j (likewise)
    float G[kFactorHeads][kSplitC];
    float bt[kFactorHeads][kSplitC];
};

// One block per (batch, key head, chunk): the Gram products K K^T and Q K^T once, then the factors of each
// value head that shares the key head (GVA), two heads per round.
template <typename T>
__global__ void __launch_bounds__(kFactorThreads) factor_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ decay, const T* __restrict__ beta,
    float* __restrict__ ws, int seq, int num_k_heads, int num_v_heads, int chunk0, int seg_chunks, float scale) {
    static_assert(kFactorThreads == kFactorHeads * kSplitC, "one thread per (head of the round, column)");
    extern __shared__ __align__(128) unsigned char smem_raw[];
    FactorSmem<T>& sm = *reinterpret_cast<FactorSmem<T>*>(smem_raw);
    constexpr bool kExact = sizeof(T) == 2;
    const int n = blockIdx.x, kh = blockIdx.y, b = blockIdx.z;
    const int group = num_v_heads / num_k_heads;  // value heads kh * group .. kh * group + group - 1
    const int t0 = (chunk0 + n) * kSplitC, valid = min(kSplitC, seq - t0);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;

    const int64_t qk_stride = (int64_t)num_k_heads * kDk;
    const int64_t row0 = ((int64_t)b * seq + t0) * qk_stride + (int64_t)kh * kDk;
    copy_rows<T, kFactorThreads>(sm.in.K, k, row0, qk_stride, valid);
    copy_rows<T, kFactorThreads>(sm.in.Q, q, row0, qk_stride, valid);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    // K K^T (m-tile = warp) and Q K^T (m-tile = 3 - warp), lower n-tiles only: 10 tiles per warp.
#pragma unroll 1
    for (int job = 0; job < 2; ++job) {
        const int mi = job == 0 ? warp : 3 - warp, tiles = 2 * mi + 2;
        const T(*A)[kRowLd<T>] = job == 0 ? sm.in.K : sm.in.Q;
        float(*Gram)[kMPLd] = job == 0 ? sm.Gkk : sm.Gqk;
        if constexpr (sizeof(T) == 2) {
            // 16-bit k, q: m16n8k16 on their own type (products exact in float32), fragments by ldmatrix; B = K^T
            // is K's rows as stored (n-tile pairs: lanes 0-15 the first tile's k halves, 16-31 the second's)
            float acc[8][4] = {};
            const int ar = 16 * mi + (lane & 15), ac = (lane >> 4) * 8;
            const int br = (lane & 7) + ((lane >> 4) & 1) * 8, bc = ((lane >> 3) & 1) * 8;
#pragma unroll 2
            for (int k0 = 0; k0 < kDk; k0 += 16) {
                uint32_t a[4];
                q3n::ldmatrix_x4(a, &A[ar][k0 + ac]);
#pragma unroll
                for (int np = 0; np < 4; ++np) {
                    if (2 * np < tiles) {
                        uint32_t b[4];
                        q3n::ldmatrix_x4(b, &sm.in.K[16 * np + br][k0 + bc]);
                        q3n::mma_16816<T>(acc[2 * np], a, b);
                        q3n::mma_16816<T>(acc[2 * np + 1], a, b + 2);
                    }
                }
            }
#pragma unroll
            for (int nj = 0; nj < 8; ++nj) {
                if (nj >= tiles) continue;
#pragma unroll
                for (int e = 0; e < 4; ++e) Gram[16 * mi + g + (e >> 1) * 8][8 * nj + 2 * t + (e & 1)] = acc[nj][e];
            }
            continue;
        }
        float acc[8][3][4] = {};
#pragma unroll 2
        for (int k0 = 0; k0 < kDk; k0 += 8) {
            const int r = 16 * mi + g;
            const FragA a = frag_a<kExact>(q3n::to_float(A[r][k0 + t]), q3n::to_float(A[r + 8][k0 + t]),
                                           q3n::to_float(A[r][k0 + t + 4]), q3n::to_float(A[r + 8][k0 + t + 4]));
#pragma unroll
            for (int nj = 0; nj < 8; ++nj) {
                if (nj < tiles)
                    mma3<kExact, kExact>(acc[nj], a, frag_b<kExact>(q3n::to_float(sm.in.K[8 * nj + g][k0 + t]),
                                                                    q3n::to_float(sm.in.K[8 * nj + g][k0 + t + 4])));
            }
        }
#pragma unroll
        for (int nj = 0; nj < 8; ++nj) {
            if (nj >= tiles) continue;
#pragma unroll
            for (int e = 0; e < 4; ++e) Gram[16 * mi + g + (e >> 1) * 8][8 * nj + 2 * t + (e & 1)] = sum3(acc[nj], e);
        }
    }
    __syncthreads();  // K, Q are dead: L takes their place

    const int64_t gi0 = ((int64_t)b * seq + t0) * num_v_heads;
#pragma unroll 1
    for (int h0 = 0; h0 < group; h0 += kFactorHeads) {
        const int heads = min(kFactorHeads, group - h0);
        if (warp < heads) {
            // inclusive scan of g over the chunk, two tokens per lane; padded tokens: g = beta = 0
            const int h = kh * group + h0 + warp, i0 = 2 * lane, i1 = 2 * lane + 1;
            const float g0 = i0 < valid ? q3n::load(decay, gi0 + (int64_t)i0 * num_v_heads + h) : 0.f;
            const float g1 = i1 < valid ? q3n::load(decay, gi0 + (int64_t)i1 * num_v_heads + h) : 0.f;
            float run = g0 + g1;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const float up = __shfl_up_sync(0xffffffffu, run, o);
                if (lane >= o) run += up;
            }
            sm.G[warp][i0] = run - g1;
            sm.G[warp][i1] = run;
            sm.bt[warp][i0] = i0 < valid ? q3n::load(beta, gi0 + (int64_t)i0 * num_v_heads + h) : 0.f;
            sm.bt[warp][i1] = i1 < valid ? q3n::load(beta, gi0 + (int64_t)i1 * num_v_heads + h) : 0.f;
        }
        __syncthreads();
        // L_ij = beta_i e^(G_i - G_j) k_i.k_j below the diagonal (all the substitution reads); G is
        // non-increasing, so e^(G_i - G_j) <= 1 there
        for (int idx = tid; idx < heads * kSplitC * kSplitC; idx += kFactorThreads) {
            const int p = idx / (kSplitC * kSplitC), i = (idx / kSplitC) % kSplitC, j = idx % kSplitC;
            if (j < i) sm.L[p][i][j] = sm.bt[p][i] * expf(sm.G[p][i] - sm.G[p][j]) * sm.Gkk[i][j];
        }
        __syncthreads();
        const int p = tid / kSplitC, c = tid % kSplitC;
        if (p < heads) {
            // (I + L) X = I by forward substitution; thread (p, c) owns column c of head p (x_j = 0 for j < c)
            float* f = ws + factor_base(b, kh * group + h0 + p, n, num_v_heads, seg_chunks);
            float x[kSplitC];
#pragma unroll
            for (int i = 0; i < kSplitC; ++i) {
                float s4[4] = {i == c ? 1.f : 0.f, 0.f, 0.f, 0.f};
#pragma unroll
                for (int j = 0; j < (i & ~3); j += 4) {
                    const float4 l4 = *reinterpret_cast<const float4*>(&sm.L[p][i][j]);
                    s4[0] -= l4.x * x[j];
                    s4[1] -= l4.y * x[j + 1];
                    s4[2] -= l4.z * x[j + 2];
                    s4[3] -= l4.w * x[j + 3];
                }
#pragma unroll
                for (int j = i & ~3; j < i; ++j) s4[j & 3] -= sm.L[p][i][j] * x[j];
                x[i] = (s4[0] + s4[1]) + (s4[2] + s4[3]);
            }
            const float bc = sm.bt[p][c];
            if constexpr (kBf16Path<T>) {
                __nv_bfloat16* m = reinterpret_cast<__nv_bfloat16*>(f);
#pragma unroll
                for (int i = 0; i < kSplitC; ++i) {
                    const float v = x[i] * bc;
                    const __nv_bfloat16 hi = __float2bfloat16_rn(v);
                    m[i * kSplitC + c] = hi;
                    m[kSplitC * kSplitC + i * kSplitC + c] = __float2bfloat16_rn(v - __bfloat162float(hi));
                }
            } else {
#pragma unroll
                for (int i = 0; i < kSplitC; ++i) f[i * kSplitC + c] = x[i] * bc;
            }
        }
        // P_ij = scale e^(G_i - G_j) q_i.k_j (zeros above the diagonal) and G, as float4 rows
        for (int idx = tid; idx < heads * kSplitC * kSplitC / 4; idx += kFactorThreads) {
            const int hp = idx / (kSplitC * kSplitC / 4), r = idx % (kSplitC * kSplitC / 4);
            const int i = r / (kSplitC / 4), j = (r % (kSplitC / 4)) * 4;
            float* f = ws + factor_base(b, kh * group + h0 + hp, n, num_v_heads, seg_chunks);
            float pv[4];
#pragma unroll
            for (int e = 0; e < 4; ++e)
                pv[e] = j + e <= i ? scale * expf(sm.G[hp][i] - sm.G[hp][j + e]) * sm.Gqk[i][j + e] : 0.f;
            if constexpr (kBf16Path<T>) {
                __nv_bfloat16* pp = reinterpret_cast<__nv_bfloat16*>(f + kSplitC * kSplitC) + i * kSplitC + j;
                __nv_bfloat162 hi[2], lo[2];
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    hi[e] = __floats2bfloat162_rn(pv[2 * e], pv[2 * e + 1]);
                    lo[e] = __floats2bfloat162_rn(pv[2 * e] - __low2float(hi[e]), pv[2 * e + 1] - __high2float(hi[e]));
                }
                *reinterpret_cast<uint2*>(pp) = *reinterpret_cast<const uint2*>(hi);
                *reinterpret_cast<uint2*>(pp + kSplitC * kSplitC) = *reinterpret_cast<const uint2*>(lo);
            } else {
                *reinterpret_cast<float4*>(&f[kSplitC * kSplitC + i * kSplitC + j]) = make_float4(pv[0], pv[1], pv[2], pv[3]);
            }
        }
        if (tid < heads * kSplitC)
            ws[factor_base(b, kh * group + h0 + tid / kSplitC, n, num_v_heads, seg_chunks) + 2 * kSplitC * kSplitC +
               tid % kSplitC] = sm.G[tid / kSplitC][tid % kSplitC];
        __syncthreads();  // G, bt and L are rewritten by the next round
    }
}

// ------------------------------------------------------------------------------------------------
// state pass: shared parts

// x = p0 + p1 (bf16) to within 2^-17 |x|; two neighbouring values as bf16 pairs (p[part][r][c..c+1]).
template <int kRows>
__device__ __forceinline__ void store_split(__nv_bfloat16 (&p)[kBf16Parts][kRows][kColLd], int r, int c, float x0,
                                            float x1) {
    float rest[2] = {x0, x1};
#pragma unroll
    for (int part = 0; part < kBf16Parts; ++part) {
        const __nv_bfloat162 v = __floats2bfloat162_rn(rest[0], rest[1]);
        *reinterpret_cast<__nv_bfloat162*>(&p[part][r][c]) = v;
        rest[0] -= __low2float(v), rest[1] -= __high2float(v);
    }
}

// The state slice as step 1's B operand: tf32 high part and remainder, or kBf16Parts bf16 parts.
template <typename T>
struct StateCopy {
    uint32_t h[kDk][kColLd];
    uint32_t l[kDk][kColLd];
};
template <>
struct StateCopy<__nv_bfloat16> {
    __nv_bfloat16 p[kBf16Parts][kDk][kColLd];
};
// e^(G_last - G_i) D_i in kBf16Parts bf16 parts (step 5's B operand on the bf16 path; nothing otherwise).
template <typename T>
struct alignas(16) DeltaCopy {};
template <>
struct DeltaCopy<__nv_bfloat16> {
    __nv_bfloat16 p[kBf16Parts][kSplitC][kColLd];
};

// A warp's state registers in C-fragment layout, s[j][e] = row row0 + 16 j + 8 (e / 2), column col + e % 2 of
// the block's slice: from / to global memory, and published as high part + remainder for step 1's B (tf32 path).
template <int J, class F>
__device__ __forceinline__ void for_state_frags(int row0, int col, F f) {
#pragma unroll
    for (int j = 0; j < J; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) f(j, e, row0 + 16 * j + (e >> 1) * 8, col + (e & 1));
}
template <int J>
__device__ __forceinline__ void load_state_frags(float (&s)[J][4], const float* state_in, const ChunkBlock& cb, int row0,
                                                 int col) {
    for_state_frags<J>(row0, col, [&](int j, int e, int r, int c) {
        s[j][e] = state_in ? state_in[cb.state_base + (int64_t)r * cb.Dv + c] : 0.f;
    });
}
template <int J>
__device__ __forceinline__ void store_state_frags(const float (&s)[J][4], float* state_out, const ChunkBlock& cb, int row0,
                                                  int col) {
    for_state_frags<J>(row0, col, [&](int j, int e, int r, int c) { state_out[cb.state_base + (int64_t)r * cb.Dv + c] = s[j][e]; });
}
template <int J>
__device__ __forceinline__ void publish_tf32(const float (&s)[J][4], uint32_t (*h)[kColLd], uint32_t (*l)[kColLd], int row0,
                                             int col) {
    for_state_frags<J>(row0, col, [&](int j, int e, int r, int c) { split_tf32(s[j][e], false, h[r][c], l[r][c]); });
}

// ------------------------------------------------------------------------------------------------
// state pass, float32 inputs: the block-wide walk (float32 k, q rows are twice as wide, so nothing but k is
// double-buffered and the column walk's layout does not fit; five barriers per chunk)

template <typename T>
struct StateSmem {
    T K[2][kSplitC][kRowLd<T>];  // double-buffered: the next chunk's k arrives while this one's is in use
    T Q[kSplitC][kRowLd<T>];
    float M[kSplitC][kMPLd];
    float P[kSplitC][kMPLd];
    T V[kSplitC][kCols + 8];
    float G[2][kSplitC];
    float wl[kSplitC];  // e^(G_last - G_i)
    StateCopy<T> S;  // the state slice as step 1's B (the float32 state stays in its row-owner warp's registers)
    float R[kSplitC][kColLd];  // V - e^G K S
    float D[kSplitC][kColLd];  // deltas
    float O[kSplitC][kColLd];  // scale e^G Q S -> outputs
};

template <typename T>
__global__ void __launch_bounds__(kStateThreads, 1) state_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const float* __restrict__ ws,
    T* __restrict__ out, const float* state_in, float* state_out, int seq, int num_k_heads, int num_v_heads,
    int head_v_dim, int chunk0, int chunks, int seg_chunks, float scale) {
    static_assert(std::is_same<T, float>::value, "float32 inputs (16-bit ones take state_columns_kernel)");
    extern __shared__ __align__(128) unsigned char smem_raw[];
    StateSmem<T>& sm = *reinterpret_cast<StateSmem<T>*>(smem_raw);
    constexpr int kVec = 16 / sizeof(T);
    const ChunkBlock cb(num_k_heads, num_v_heads, head_v_dim);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;

    const auto t0_of = [&](int n) { return (chunk0 + n) * kSplitC; };
    const auto valid_of = [&](int n) { return min(kSplitC, seq - t0_of(n)); };
    const auto qk_row0 = [&](int n) { return ((int64_t)cb.b * seq + t0_of(n)) * cb.qk_stride + (int64_t)cb.kh * kDk; };
    const auto factors = [&](int n) { return ws + factor_base(cb.b, cb.h, n, num_v_heads, seg_chunks); };
    const auto copy_k = [&](int n) { copy_rows<T, kStateThreads>(sm.K[n & 1], k, qk_row0(n), cb.qk_stride, valid_of(n)); };
    const auto copy_q = [&](int n) {
        copy_rows<T, kStateThreads>(sm.Q, q, qk_row0(n), cb.qk_stride, valid_of(n));
    };
    const auto copy_mat = [&](float (*dst)[kMPLd], const float* src) {
        for (int idx = tid; idx < kSplitC * kSplitC / 4; idx += kStateThreads)
            cp_async16(&dst[idx / (kSplitC / 4)][(idx % (kSplitC / 4)) * 4], src + idx * 4, true);
    };
    const auto copy_vg = [&](int n) {
        constexpr int kPerRow = kCols / kVec;
        const int valid = valid_of(n);
        for (int idx = tid; idx < kSplitC * kPerRow; idx += kStateThreads) {
            const int i = idx / kPerRow, u = idx % kPerRow;
            cp_async16(&sm.V[i][u * kVec], v + cb.v_off(seq, t0_of(n), i < valid ? i : 0) + u * kVec, i < valid);
        }
        if (tid < kSplitC / 4) cp_async16(&sm.G[n & 1][tid * 4], factors(n) + 2 * kSplitC * kSplitC + tid * 4, true);
    };

    // Warp w owns the state's n-tile w % 4 (8 columns) on m-tiles 4 (w / 4) .. 4 (w / 4) + 3 (64 rows), in
    // C-fragment layout: s[j][e] is row 16 (4 (w / 4) + j) + g + 8 (e / 2), column 8 (w % 4) + 2t + e % 2.
    // (One n-tile per warp: step 5's B operand, the deltas, is split once per warp for four m-tiles.)
    const int s_nt = warp & 3, s_row0 = 64 * (warp >> 2) + g, s_col = 8 * s_nt + 2 * t;
    float s[4][4];
    const auto publish_state = [&]() { publish_tf32(s, sm.S.h, sm.S.l, s_row0, s_col); };
    load_state_frags(s, state_in, cb, s_row0, s_col);
    publish_state();

    // prologue: all of chunk 0, then chunk 1's k
    copy_k(0);
    copy_q(0);
    copy_mat(sm.M, factors(0));
    copy_mat(sm.P, factors(0) + kSplitC * kSplitC);
    copy_vg(0);
    cp_async_commit();
    if (chunks > 1) copy_k(1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    // Products with 64-row outputs: warp = (m-tile pair {0, 3} or {1, 2}: equal work under the causal
    // masks) x one n-tile, the pair's two m-tiles interleaved in one k-loop.
    const int pair_nt = warp & 3;
    const int pm0 = (warp >> 2) == 0 ? 0 : 1, pm1 = 3 - pm0;

#pragma unroll 1
    for (int n = 0; n < chunks; ++n) {
        const int kb = n & 1;
        const float* G = sm.G[kb];
        float(*O)[kColLd] = sm.O;
        const bool more = n + 1 < chunks;

        // 1. [K; Q] S: warps 0-3 K rows 16w.., warps 4-7 Q rows 16(w-4)..
        float acc[4][3][4] = {};
        {
            const T(*A)[kRowLd<T>] = warp < 4 ? sm.K[kb] : sm.Q;
            const int r = 16 * (warp & 3) + g;
#pragma unroll 4
            for (int k0 = 0; k0 < kDk; k0 += 8) {
                const FragA a = frag_a<false>(A[r][k0 + t], A[r + 8][k0 + t], A[r][k0 + t + 4], A[r + 8][k0 + t + 4]);
#pragma unroll
                for (int nt = 0; nt < 4; ++nt) {
                    const int c = 8 * nt + g;
                    const FragB b = {{sm.S.h[k0 + t][c], sm.S.h[k0 + t + 4][c]}, {sm.S.l[k0 + t][c], sm.S.l[k0 + t + 4][c]}};
                    mma3<false, false>(acc[nt], a, b);
                }
            }
        }
        __syncthreads();  // Q is refilled: every warp must be done with it
        if (more) copy_q(n + 1);
        cp_async_commit();

        // 2. R = V - e^G K S (warps 0-3); O = scale e^G Q S (warps 4-7)
        {
            const int r0 = 16 * (warp & 3) + g;
            const float e[2] = {expf(G[r0]), expf(G[r0 + 8])};
#pragma unroll
            for (int nt = 0; nt < 4; ++nt)
#pragma unroll
                for (int el = 0; el < 4; ++el) {
                    const int i = r0 + (el >> 1) * 8, c = 8 * nt + 2 * t + (el & 1);
                    if (warp < 4)
                        sm.R[i][c] = sm.V[i][c] - e[el >> 1] * sum3(acc[nt], el);
                    else
                        O[i][c] = scale * e[el >> 1] * sum3(acc[nt], el);
                }
            if (tid < kSplitC) sm.wl[tid] = expf(G[kSplitC - 1] - G[tid]);
        }
        __syncthreads();
        if (more) copy_vg(n + 1);
        cp_async_commit();

        // 3. D = M R, 4. O += P D (M, P lower triangular: m-tile mi needs k-steps 0 .. 2 mi + 1)
        const auto lower_product = [&](const float (*A)[kMPLd], const float (*B)[kColLd], float d[2][3][4]) {
            const int c = 8 * pair_nt + g;
#pragma unroll
            for (int ks = 0; ks < 8; ++ks) {
                if (ks > 2 * pm1 + 1) break;
                const int k0 = 8 * ks;
                const FragB b = frag_b<false>(B[k0 + t][c], B[k0 + t + 4][c]);
#pragma unroll
                for (int p = 0; p < 2; ++p) {
                    const int mi = p == 0 ? pm0 : pm1, r = 16 * mi + g;
                    if (ks <= 2 * mi + 1)
                        mma3<false, false>(d[p], frag_a<false>(A[r][k0 + t], A[r + 8][k0 + t], A[r][k0 + t + 4],
                                                               A[r + 8][k0 + t + 4]), b);
                }
            }
        };
        {
            float d[2][3][4] = {};
            lower_product(sm.M, sm.R, d);
#pragma unroll
            for (int p = 0; p < 2; ++p) {
                const int r = 16 * (p == 0 ? pm0 : pm1) + g, c = 8 * pair_nt + 2 * t;
                sm.D[r][c] = sum3(d[p], 0), sm.D[r][c + 1] = sum3(d[p], 1);
                sm.D[r + 8][c] = sum3(d[p], 2), sm.D[r + 8][c + 1] = sum3(d[p], 3);
            }
        }
        __syncthreads();
        if (more) copy_mat(sm.M, factors(n + 1));
        cp_async_commit();
        {
            float o[2][3][4] = {};
            lower_product(sm.P, sm.D, o);
#pragma unroll
            for (int p = 0; p < 2; ++p) {
                const int r = 16 * (p == 0 ? pm0 : pm1) + g, c = 8 * pair_nt + 2 * t;
                O[r][c] += sum3(o[p], 0), O[r][c + 1] += sum3(o[p], 1);
                O[r + 8][c] += sum3(o[p], 2), O[r + 8][c + 1] += sum3(o[p], 3);
            }
        }
        __syncthreads();  // P is refilled: every warp must be done with it
        if (more) copy_mat(sm.P, factors(n + 1) + kSplitC * kSplitC);
        cp_async_commit();

        // 5. S <- e^(G_last) S + K^T (e^(G_last - G) D) on this warp's part of the state
        {
            const float e_last = expf(G[kSplitC - 1]);
            float u[4][3][4] = {};
            const T(*Kc)[kRowLd<T>] = sm.K[kb];
            const int c = 8 * s_nt + g;
#pragma unroll 2
            for (int k0 = 0; k0 < kSplitC; k0 += 8) {
                const FragB b = frag_b<false>(sm.wl[k0 + t] * sm.D[k0 + t][c], sm.wl[k0 + t + 4] * sm.D[k0 + t + 4][c]);
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int r = s_row0 + 16 * j;
                    mma3<false, false>(u[j], frag_a<false>(Kc[k0 + t][r], Kc[k0 + t][r + 8], Kc[k0 + t + 4][r], Kc[k0 + t + 4][r + 8]), b);
                }
            }
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[j][e] = e_last * s[j][e] + sum3(u[j], e);
            publish_state();
        }
        // One barrier ends the chunk: the state is published, all of chunk n + 1 has landed, every warp is
        // done with this chunk's K buffer (chunk n + 2's k goes there next) and O is complete.
        cp_async_wait<0>();
        __syncthreads();
        if (n + 2 < chunks) copy_k(n + 2);
        cp_async_commit();

        // outputs: 8 consecutive columns of one row per thread (O is next written after the next chunk's first
        // barrier)
        {
            const int i = tid / 4, c = (tid % 4) * 8;
            if (i < valid_of(n)) {
                T* dst = out + cb.v_off(seq, t0_of(n), i) + c;
#pragma unroll
                for (int e = 0; e < 8; ++e) dst[e] = q3n::from_float<T>(O[i][c + e]);
            }
        }
    }
    cp_async_wait<0>();
    store_state_frags(s, state_out, cb, s_row0, s_col);
}

// ------------------------------------------------------------------------------------------------
// state pass, 16-bit inputs: the column-separable walk

// Every quantity of the walk except K, Q, M, P, V, G splits by state column (R, D, O and the state's
// columns never mix), so warp pair p (warps p and p + 4, one SM sub-partition) owns n-tile p, 8 of the
// block's 32 columns, for the whole chunk, its two warps sharing the work evenly:
//   K-warp p:      R = V - e^G K S;  D = M R on m-tiles 0, 3;  the state update (all 128 rows, registers)
//   Q-warp p + 4:  O = scale e^G Q S (registers);  D = M R on m-tiles 1, 2;  O += P D and the outputs
// Per chunk: two 64-thread named barriers per pair (R, then D, complete) and one block barrier (the
// cp.async buffers of K, Q, M, P, V, G rotate; the state tiles are published). Every input buffer is
// double-buffered, so chunk n + 1's copies are issued right after that barrier.
// M, P of one chunk (float32, or bf16 planes), and R, D of the block's columns (float32, or bf16 parts)
template <typename T>
using ChunkMat = std::conditional_t<kBf16Path<T>, __nv_bfloat16[kBf16Parts][kSplitC][kPlaneLd], float[kSplitC][kMPLd]>;
template <typename T>
using ColMat = std::conditional_t<kBf16Path<T>, __nv_bfloat16[kBf16Parts][kSplitC][kColLd], float[kSplitC][kColLd]>;

template <typename T>
struct ColSmem {
    T K[2][kSplitC][kRowLd<T>];
    T Q[2][kSplitC][kRowLd<T>];
    ChunkMat<T> M[2];
    ChunkMat<T> P[2];
    T V[2][kSplitC][kCols + 8];
    float G[2][kSplitC];
    StateCopy<T> S;
    DeltaCopy<T> DW;
    ColMat<T> R;  // each pair's columns
    ColMat<T> D;
};

// the pair's barrier: ids 1-4 (0 is __syncthreads), its two warps only
__device__ __forceinline__ void pair_sync(int pair) { asm volatile("bar.sync %0, 64;\n" ::"r"(pair + 1) : "memory"); }

template <typename T>
__device__ __forceinline__ void store_pair(T* dst, float a, float b) {
    if constexpr (std::is_same<T, __nv_bfloat16>::value)
        *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(a, b);
    else
        *reinterpret_cast<__half2*>(dst) = __floats2half2_rn(a, b);
}

template <typename T>
__global__ void __launch_bounds__(kStateThreads, 1) state_columns_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const float* __restrict__ ws,
    T* __restrict__ out, const float* state_in, float* state_out, int seq, int num_k_heads, int num_v_heads,
    int head_v_dim, int chunk0, int chunks, int seg_chunks, float scale) {
    static_assert(sizeof(T) == 2, "16-bit inputs (float32 ones take state_kernel)");
    extern __shared__ __align__(128) unsigned char smem_raw[];
    ColSmem<T>& sm = *reinterpret_cast<ColSmem<T>*>(smem_raw);
    constexpr int kVec = 16 / sizeof(T);
    const ChunkBlock cb(num_k_heads, num_v_heads, head_v_dim);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const int pair = warp & 3, c8 = 8 * pair;
    const bool kwarp = warp < 4;

    const auto t0_of = [&](int n) { return (chunk0 + n) * kSplitC; };
    const auto valid_of = [&](int n) { return min(kSplitC, seq - t0_of(n)); };
    // Copy plan, the same for every chunk up to one chunk's stride (the per-chunk address arithmetic was a
    // fifth of the kernel's instructions): thread tid moves 16 bytes of k and of q on rows kq_row + 16 m
    // (m < 4), float4 tid + 256 m of M and of P, 16 bytes of v on row tid / 4, and float4 tid of G (tid < 16).
    static_assert(kSplitC * kDk / kVec == 4 * kStateThreads && kSplitC * kSplitC / 4 == 4 * kStateThreads &&
                      kSplitC * kCols / kVec == kStateThreads, "the copy plan's shape");
    const int kq_row = tid / (kDk / kVec), kq_col = (tid % (kDk / kVec)) * kVec, v_row = tid / (kCols / kVec);
    const int64_t kq0 = ((int64_t)cb.b * seq + t0_of(0)) * cb.qk_stride + (int64_t)cb.kh * kDk + kq_col;
    const int64_t kq_chunk = (int64_t)kSplitC * cb.qk_stride, kq_16rows = 16 * cb.qk_stride;
    const int64_t kq_rows = (int64_t)kq_row * cb.qk_stride;
    const float* f0 = ws + factor_base(cb.b, cb.h, 0, num_v_heads, seg_chunks) + 4 * tid;
    const T* v0 = v + cb.v_off(seq, t0_of(0), 0) + (tid % (kCols / kVec)) * kVec;
    // in two halves, so that one chunk's copies are issued between its computations rather than in one burst
    // (the burst stalled the issuing warps: ncu long_sb at the LDGSTS operands' reuse)
    const auto copy_kq = [&](int n) {
        const int valid = valid_of(n), bf = n & 1;
        const int64_t kq = kq0 + n * kq_chunk;
#pragma unroll
        for (int m = 0; m < 4; ++m) {
            const int i = kq_row + 16 * m;
            const int64_t off = i < valid ? kq + kq_rows + m * kq_16rows : kq;  // rows past the sequence: zeros
            cp_async16(&sm.K[bf][i][kq_col], k + off, i < valid);
            cp_async16(&sm.Q[bf][i][kq_col], q + off, i < valid);
        }
    };
    const auto copy_rest = [&](int n) {
        const int valid = valid_of(n), bf = n & 1;
        const float* f = f0 + (int64_t)n * kFactorFloats;
#pragma unroll
        for (int m = 0; m < 4; ++m) {
            const int idx = tid + kStateThreads * m;  // 16-byte unit of the matrix
            void *dm, *dp;
            if constexpr (kBf16Path<T>) {  // plane idx / 512, row (idx / 8) % 64, 8 columns
                const int part = idx / (kSplitC * kSplitC / 8), r = (idx / 8) % kSplitC, c = (idx % 8) * 8;
                dm = &sm.M[bf][part][r][c], dp = &sm.P[bf][part][r][c];
            } else {
                dm = &sm.M[bf][idx / (kSplitC / 4)][(idx % (kSplitC / 4)) * 4];
                dp = &sm.P[bf][idx / (kSplitC / 4)][(idx % (kSplitC / 4)) * 4];
            }
            cp_async16(dm, f + kStateThreads * 4 * m, true);
            cp_async16(dp, f + kSplitC * kSplitC + kStateThreads * 4 * m, true);
        }
        const T* vp = v0 + (int64_t)n * kSplitC * cb.v_stride;
        cp_async16(&sm.V[bf][v_row][(tid % (kCols / kVec)) * kVec], vp + (v_row < valid ? v_row : 0) * cb.v_stride, v_row < valid);
        if (tid < kSplitC / 4) cp_async16(&sm.G[bf][tid * 4], f + 2 * kSplitC * kSplitC, true);
        cp_async_commit();
    };

    // K-warp: s[j][e] = state row 16 j + g + 8 (e / 2), column c8 + 2t + e % 2 (C-fragment layout)
    const int s_row0 = g, s_col = c8 + 2 * t;
    float s[8][4];
    const auto publish_state = [&]() {
        if constexpr (kBf16Path<T>) {
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                store_split(sm.S.p, s_row0 + 16 * j, s_col, s[j][0], s[j][1]);
                store_split(sm.S.p, s_row0 + 16 * j + 8, s_col, s[j][2], s[j][3]);
            }
        } else {
            publish_tf32(s, sm.S.h, sm.S.l, s_row0, s_col);
        }
    };
    if (kwarp) {
        load_state_frags(s, state_in, cb, s_row0, s_col);
        publish_state();
    }
    copy_kq(0);
    copy_rest(0);
    cp_async_wait<0>();
    __syncthreads();

    // D = M R or O += P D on the pair's n-tile, m-tiles mi[0 .. NM): a lower-triangular 64 x 64 A (m-tile mi
    // needs its first 16 (mi + 1) columns) times B's columns; neither operand is exact in the mma type, so
    // bf16: two planes each (the remainder x remainder product dropped), float16: split tf32
    const auto lower_product = [&](const ChunkMat<T>& A, const ColMat<T>& B, auto& d, const int* mis) {
        constexpr int NM = sizeof(d) / sizeof(d[0]);
        if constexpr (kBf16Path<T>) {
            // bf16 planes: A_hi B_hi, A_lo B_hi, A_hi B_lo per k16 step (m-tile mi needs k-steps 0 .. mi)
            const int ar = lane & 15, ac = (lane >> 4) * 8;
#pragma unroll
            for (int k0 = 0; k0 < kSplitC; k0 += 16) {
                uint32_t b01[4];
                q3n::ldmatrix_x4_trans(b01, &B[lane >> 4][k0 + (lane & 15)][c8]);
#pragma unroll
                for (int x = 0; x < NM; ++x) {
                    if (k0 > 16 * mis[x]) continue;
                    uint32_t ah[4], al[4];
                    q3n::ldmatrix_x4(ah, &A[0][16 * mis[x] + ar][k0 + ac]);
                    q3n::ldmatrix_x4(al, &A[1][16 * mis[x] + ar][k0 + ac]);
                    q3n::mma_16816<T>(d[x][0], ah, b01);
                    q3n::mma_16816<T>(d[x][1], al, b01);
                    q3n::mma_16816<T>(d[x][2], ah, b01 + 2);
                }
            }
        } else {
#pragma unroll
            for (int ks = 0; ks < 8; ++ks) {
                const int k0 = 8 * ks;
                const FragB b = frag_b<false>(B[k0 + t][c8 + g], B[k0 + t + 4][c8 + g]);
#pragma unroll
                for (int x = 0; x < NM; ++x) {
                    const int r = 16 * mis[x] + g;
                    if (ks <= 2 * mis[x] + 1)
                        mma3<false, false>(d[x], frag_a<false>(A[r][k0 + t], A[r + 8][k0 + t], A[r][k0 + t + 4], A[r + 8][k0 + t + 4]), b);
                }
            }
        }
    };

#pragma unroll 1
    for (int n = 0; n < chunks; ++n) {
        const int bf = n & 1;
        const float* G = sm.G[bf];
        if (n + 1 < chunks) copy_kq(n + 1);  // into the buffers of chunk n - 1, free since the last barrier

        // 1. (K or Q) S on the pair's n-tile, all 64 rows
        float acc[4][3][4] = {};
        const T(*A)[kRowLd<T>] = kwarp ? sm.K[bf] : sm.Q[bf];
        if constexpr (kBf16Path<T>) {
            const int ar = lane & 15, ac = (lane >> 4) * 8;
#pragma unroll 2
            for (int k0 = 0; k0 < kDk; k0 += 16) {
                uint32_t b01[4];  // the state's parts 0, 1 (each k16 x n8)
                q3n::ldmatrix_x4_trans(b01, &sm.S.p[lane >> 4][k0 + (lane & 15)][c8]);
#pragma unroll
                for (int mi = 0; mi < 4; ++mi) {
                    uint32_t a[4];
                    q3n::ldmatrix_x4(a, &A[16 * mi + ar][k0 + ac]);
                    q3n::mma_16816<T>(acc[mi][0], a, b01);
                    q3n::mma_16816<T>(acc[mi][1], a, b01 + 2);
                }
            }
        } else {
#pragma unroll 4
            for (int k0 = 0; k0 < kDk; k0 += 8) {
                const int c = c8 + g;
                const FragB b = {{sm.S.h[k0 + t][c], sm.S.h[k0 + t + 4][c]}, {sm.S.l[k0 + t][c], sm.S.l[k0 + t + 4][c]}};
#pragma unroll
                for (int mi = 0; mi < 4; ++mi) {
                    const int r = 16 * mi + g;
                    mma3<true, false>(acc[mi], frag_a<true>(q3n::to_float(A[r][k0 + t]), q3n::to_float(A[r + 8][k0 + t]),
                                                            q3n::to_float(A[r][k0 + t + 4]), q3n::to_float(A[r + 8][k0 + t + 4])), b);
                }
            }
        }

        // 2. R = V - e^G K S (K-warp); O = scale e^G Q S (Q-warp, registers: rows 16 mi + g + 8 (e / 2),
        // columns s_col + e % 2)
        float o[4][4];
        if (kwarp) {
#pragma unroll
            for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    const int i = 16 * mi + g + half * 8;
                    const float eg = expf(G[i]);
                    const float r0 = q3n::to_float(sm.V[bf][i][s_col]) - eg * sum3(acc[mi], 2 * half);
                    const float r1 = q3n::to_float(sm.V[bf][i][s_col + 1]) - eg * sum3(acc[mi], 2 * half + 1);
                    if constexpr (kBf16Path<T>)
                        store_split(sm.R, i, s_col, r0, r1);
                    else
                        sm.R[i][s_col] = r0, sm.R[i][s_col + 1] = r1;
                }
        } else {
#pragma unroll
            for (int mi = 0; mi < 4; ++mi) {
                const float e0 = scale * expf(G[16 * mi + g]), e1 = scale * expf(G[16 * mi + g + 8]);
                o[mi][0] = e0 * sum3(acc[mi], 0), o[mi][1] = e0 * sum3(acc[mi], 1);
                o[mi][2] = e1 * sum3(acc[mi], 2), o[mi][3] = e1 * sum3(acc[mi], 3);
            }
        }
        pair_sync(pair);  // R of the pair's columns is complete

        // 3. D = M R, m-tiles {0, 3} (K-warp) or {1, 2} (Q-warp): equal work under the causal mask; the deltas
        // and, for the bf16 update, e^(G_last - G) D in parts
        {
            const int mis[2] = {kwarp ? 0 : 1, kwarp ? 3 : 2};
            float d[2][3][4] = {};
            lower_product(sm.M[bf], sm.R, d, mis);
            const float g_last = G[kSplitC - 1];
#pragma unroll
            for (int x = 0; x < 2; ++x) {
                const int r = 16 * mis[x] + g;
                const float d0 = sum3(d[x], 0), d1 = sum3(d[x], 1), d2 = sum3(d[x], 2), d3 = sum3(d[x], 3);
                if constexpr (kBf16Path<T>) {
                    store_split(sm.D, r, s_col, d0, d1);
                    store_split(sm.D, r + 8, s_col, d2, d3);
                    const float w0 = expf(g_last - G[r]), w1 = expf(g_last - G[r + 8]);
                    store_split(sm.DW.p, r, s_col, w0 * d0, w0 * d1);
                    store_split(sm.DW.p, r + 8, s_col, w1 * d2, w1 * d3);
                } else {
                    sm.D[r][s_col] = d0, sm.D[r][s_col + 1] = d1;
                    sm.D[r + 8][s_col] = d2, sm.D[r + 8][s_col + 1] = d3;
                }
            }
        }
        pair_sync(pair);  // D (and DW) of the pair's columns are complete
        if (n + 1 < chunks) copy_rest(n + 1);

        if (!kwarp) {
            // 4. O += P D, then the outputs (rows past the sequence are not written)
            const int mis[4] = {0, 1, 2, 3};
            float pd[4][3][4] = {};
            lower_product(sm.P[bf], sm.D, pd, mis);
            const int valid = valid_of(n);
#pragma unroll
            for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    const int i = 16 * mi + g + 8 * half;
                    if (i < valid)
                        store_pair(out + cb.v_off(seq, t0_of(n), i) + s_col, o[mi][2 * half] + sum3(pd[mi], 2 * half),
                                   o[mi][2 * half + 1] + sum3(pd[mi], 2 * half + 1));
                }
        } else {
            // 5. S <- e^(G_last) S + K^T (e^(G_last - G) D), all 128 rows of the pair's n-tile, 64 at a time
            const float e_last = expf(G[kSplitC - 1]);
            const T(*Kc)[kRowLd<T>] = sm.K[bf];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float u[4][3][4] = {};
                if constexpr (kBf16Path<T>) {
                    // A = K^T by transposed ldmatrix of K (rows = tokens); B = the scaled deltas' parts
                    const int m0 = 64 * h + ((lane >> 3) & 1) * 8, kr = (lane & 7) + ((lane >> 4) & 1) * 8;
#pragma unroll
                    for (int k0 = 0; k0 < kSplitC; k0 += 16) {
                        uint32_t b01[4];
                        q3n::ldmatrix_x4_trans(b01, &sm.DW.p[lane >> 4][k0 + (lane & 15)][c8]);
#pragma unroll
                        for (int j = 0; j < 4; ++j) {
                            uint32_t a[4];
                            q3n::ldmatrix_x4_trans(a, &Kc[k0 + kr][m0 + 16 * j]);
                            q3n::mma_16816<T>(u[j][0], a, b01);
                            q3n::mma_16816<T>(u[j][1], a, b01 + 2);
                        }
                    }
                } else {
                    const float g_last = G[kSplitC - 1];
                    const int c = c8 + g;
#pragma unroll 2
                    for (int k0 = 0; k0 < kSplitC; k0 += 8) {
                        const FragB b = frag_b<false>(expf(g_last - G[k0 + t]) * sm.D[k0 + t][c],
                                                      expf(g_last - G[k0 + t + 4]) * sm.D[k0 + t + 4][c]);
#pragma unroll
                        for (int j = 0; j < 4; ++j) {
                            const int r = 64 * h + s_row0 + 16 * j;
                            mma3<true, false>(u[j], frag_a<true>(q3n::to_float(Kc[k0 + t][r]), q3n::to_float(Kc[k0 + t][r + 8]),
                                                                 q3n::to_float(Kc[k0 + t + 4][r]), q3n::to_float(Kc[k0 + t + 4][r + 8])), b);
                        }
                    }
                }
#pragma unroll
                for (int j = 0; j < 4; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e) s[4 * h + j][e] = e_last * s[4 * h + j][e] + sum3(u[j], e);
            }
            publish_state();
        }
        // chunk n + 1's inputs have landed, the state tiles are published, and every warp is done with chunk n's
        // buffers (chunk n + 2's copies go there next)
        cp_async_wait<0>();
        __syncthreads();
    }

    if (kwarp) store_state_frags(s, state_out, cb, s_row0, s_col);
}

// ------------------------------------------------------------------------------------------------
// host side

// Chunks per segment that `workspace_bytes` holds (0: not even one).
inline int split_segment_chunks(size_t workspace_bytes, int batch, int num_v_heads, int chunks) {
    const size_t per_chunk = (size_t)batch * num_v_heads * kFactorBytes;
    const size_t fit = workspace_bytes / per_chunk;
    return (int)(fit < (size_t)chunks ? fit : (size_t)chunks);
}

// What a caller should provide: the whole sequence's factors up to kSplitWorkspaceCap, or one chunk of
// them when that alone is larger. min(all, max(one, cap)) grows with batch and seq, so a workspace sized
// for a plugin's largest shapes also holds what any smaller call asks for.
inline size_t split_workspace_size(int batch, int seq, int num_v_heads) {
    if (batch <= 0 || seq <= 0) return 0;
    const size_t per_chunk = (size_t)batch * num_v_heads * kFactorBytes;
    const size_t all = (size_t)((seq + kSplitC - 1) / kSplitC) * per_chunk;
    const size_t most = per_chunk > kSplitWorkspaceCap ? per_chunk : kSplitWorkspaceCap;
    return all < most ? all : most;
}

template <typename T>
constexpr size_t kFactorSmemBytes = sizeof(FactorSmem<T>);
// the state pass: the column-separable walk for 16-bit inputs, state_kernel for float32 ones
template <typename T>
constexpr size_t kStateSmemBytes = sizeof(T) == 2 ? sizeof(ColSmem<T>) : sizeof(StateSmem<T>);
template <typename T>
constexpr auto state_pass() {
    if constexpr (sizeof(T) == 2)
        return state_columns_kernel<T>;
    else
        return state_kernel<T>;
}
// the largest of either kernel and dtype
constexpr size_t kSplitSmemBytes =
    std::max({kStateSmemBytes<float>, kStateSmemBytes<__half>, kStateSmemBytes<__nv_bfloat16>});
static_assert(kSplitSmemBytes <= 232448, "227 KiB: the most an sm_90 block may have");

template <typename T>
int launch_split(const void* q, const void* k, const void* v, const float* past_state, const void* decay,
                 const void* beta, void* out, float* present_state, int batch, int seq, int num_k_heads,
                 int num_v_heads, int head_v_dim, float scale, void* workspace, size_t workspace_bytes,
                 cudaStream_t stream) {
    const int chunks = (seq + kSplitC - 1) / kSplitC;
    const int seg = split_segment_chunks(workspace_bytes, batch, num_v_heads, chunks);
    if (seg < 1) return Q3N_ERR_WORKSPACE;
    cudaError_t err = cudaFuncSetAttribute(factor_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           (int)kFactorSmemBytes<T>);
    if (err == cudaSuccess)
        err = cudaFuncSetAttribute(state_pass<T>(), cudaFuncAttributeMaxDynamicSharedMemorySize, (int)kStateSmemBytes<T>);
    if (err != cudaSuccess) {
        cudaGetLastError();
        return static_cast<int>(err);
    }
    const T* qt = static_cast<const T*>(q);
    const T* kt = static_cast<const T*>(k);
    float* ws = static_cast<float*>(workspace);
    const int state_blocks = batch * num_v_heads * (head_v_dim / kCols);
    for (int c0 = 0; c0 < chunks; c0 += seg) {
        const int n = chunks - c0 < seg ? chunks - c0 : seg;
        factor_kernel<T><<<dim3(n, num_k_heads, batch), kFactorThreads, kFactorSmemBytes<T>, stream>>>(
            qt, kt, static_cast<const T*>(decay), static_cast<const T*>(beta), ws, seq, num_k_heads, num_v_heads, c0,
            seg, scale);
        state_pass<T>()<<<state_blocks, kStateThreads, kStateSmemBytes<T>, stream>>>(
            qt, kt, static_cast<const T*>(v), ws, static_cast<T*>(out), c0 == 0 ? past_state : present_state,
            present_state, seq, num_k_heads, num_v_heads, head_v_dim, c0, n, seg, scale);
        const int rc = q3n::launch_status();
        if (rc != Q3N_OK) return rc;
    }
    return Q3N_OK;
}

}  // namespace q3n_gdn
