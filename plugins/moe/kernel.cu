// MoE (com.microsoft, activation swiglu, swiglu_fusion 1): routed SwiGLU experts, with bf16/fp16/fp32
// weights (q3n_moe) or FP8 e4m3 weights with 128x128 block scales (q3n_moe_fp8).
//
// Three launches on the caller's stream, with float32 intermediates in the workspace:
//   1. route:  per token, softmax over all E logits in float32, top-k (ties: lower expert index), optional
//              renormalisation          -> workspace: expert ids [N*k] int32, routing weights [N*k] float32
//   2. fc1:    per (token, slot) and intermediate row j: g, u = the interleaved gate/up rows 2j, 2j+1 of fc1
//              dotted with x, act = silu(g) * u  -> workspace: act [N*k, I] float32
//   3. fc2:    per token and hidden row h: out = sum over slots of w * (fc2[e, h, :] . act + b2[e, h]),
//              summed in registers and written once: no atomics, so the result is deterministic.
// The GEMVs give one warp to each output row (lanes stride the reduction dimension, so a warp reads
// a weight row with coalesced loads); x and act rows are re-read from L1/L2 rather than staged.
#include <cuda_fp8.h>

#include <cfloat>
#include <climits>

#include "../common.cuh"
#include "fast.cuh"
#include "prefill.cuh"

namespace {

using q3n::load;
using q3n::store;

constexpr int kRouterThreads = 256;
constexpr int kWarpsPerBlock = 8;  // GEMV rows per block
constexpr int kFp8Block = 128;     // the official checkpoint's weight_block_size
constexpr size_t kWorkspaceAlign = 256;
constexpr int kMaxExperts = 12288;  // router probabilities in 48 KiB of shared memory
constexpr int kMaxGridY = 65535;

size_t align_up(size_t n) { return (n + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign; }

struct Workspace {
    int* experts;    // [N, k]
    float* weights;  // [N, k]
    float* act;      // [N, k, I]
    q3n_moe_prefill::Workspace prefill;  // counts, tiles, permutation, per-pair fc2 outputs [N, k, H]
};

// One layout for every path (the TensorRT binding sizes it once per profile); the prefill part comes
// last, so the first three regions sit where they always did.
size_t workspace_bytes_for(int tokens, int experts, int top_k, int hidden, int inter, Workspace* ws, void* base) {
    const size_t pairs = (size_t)tokens * top_k;
    const size_t ids = align_up(pairs * sizeof(int)), wts = align_up(pairs * sizeof(float));
    const size_t act = align_up(pairs * inter * sizeof(float));
    const size_t counts = align_up((size_t)experts * sizeof(int)), starts = align_up(((size_t)experts + 1) * sizeof(int));
    const size_t y = align_up(pairs * hidden * sizeof(float));
    if (ws) {
        char* p = static_cast<char*>(base);
        ws->experts = reinterpret_cast<int*>(p);
        ws->weights = reinterpret_cast<float*>(p + ids);
        ws->act = reinterpret_cast<float*>(p + ids + wts);
        p += ids + wts + act;
        ws->prefill.counts = reinterpret_cast<int*>(p);
        ws->prefill.tile_start = reinterpret_cast<int*>(p + counts);
        ws->prefill.offsets = reinterpret_cast<int*>(p + counts + starts);
        ws->prefill.perm = reinterpret_cast<int*>(p + counts + 2 * starts);
        ws->prefill.pos = reinterpret_cast<int*>(p + counts + 2 * starts + ids);
        ws->prefill.y = reinterpret_cast<float*>(p + counts + 2 * starts + 2 * ids);
    }
    return ids + wts + act + counts + 2 * starts + 2 * ids + y;
}

// ------------------------------------------------------------------------------------------------
// weights: one accessor per storage format, so the GEMV kernels are written once

template <typename T>
struct DenseWeights {  // [E, rows, cols] of T
    const T* w;
    int rows, cols;
    __device__ __forceinline__ float at(int e, int r, int c) const { return load(w, ((int64_t)e * rows + r) * cols + c); }
};

// [E, rows, cols] of e4m3 bytes with float32 128x128 block scales [E, scale_rows, ceil(cols/128)].
// fc2: scale row r/128 (scale_rows = ceil(rows/128)). fc1 (interleaved gate/up rows, `gate_up`): the
// checkpoint's gate and up scales one above the other, scale_rows = 2 * ceil(I/128): row 2i (gate i)
// takes scale row i/128, row 2i+1 (up i) scale row ceil(I/128) + i/128, so both keep their own scales.
struct Fp8BlockWeights {
    const unsigned char* w;
    const float* scale;
    int rows, cols, scale_rows, scale_cols;
    bool gate_up;
    __device__ __forceinline__ int scale_row(int r) const {
        return gate_up ? (r & 1) * (scale_rows / 2) + (r >> 1) / kFp8Block : r / kFp8Block;
    }
    __device__ __forceinline__ float at(int e, int r, int c) const {
        __nv_fp8_e4m3 f;
        f.__x = w[((int64_t)e * rows + r) * cols + c];
        return static_cast<float>(f) * scale[((int64_t)e * scale_rows + scale_row(r)) * scale_cols + c / kFp8Block];
    }
};

// ------------------------------------------------------------------------------------------------
// 1. routing

struct Candidate {
    float value;
    int index;
};

// Higher probability wins; equal probabilities go to the lower expert index (torch.topk's order).
__device__ __forceinline__ Candidate better(Candidate a, Candidate b) {
    return (a.value > b.value || (a.value == b.value && a.index < b.index)) ? a : b;
}

__device__ Candidate block_best(Candidate c, Candidate* scratch) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        Candidate other{__shfl_xor_sync(0xffffffffu, c.value, offset), __shfl_xor_sync(0xffffffffu, c.index, offset)};
        c = better(c, other);
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    __syncthreads();  // scratch may still be read from the previous call
    if (lane == 0) scratch[warp] = c;
    __syncthreads();
    Candidate best = scratch[0];
    for (int w = 1; w < warps; ++w) best = better(best, scratch[w]);
    return best;
}

__device__ float block_sum(float v, float* scratch) {
    v = q3n::warp_sum(v);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = 0.0f;
    for (int w = 0; w < warps; ++w) total += scratch[w];
    return total;
}

__device__ float block_max(float v, float* scratch) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float m = scratch[0];
    for (int w = 1; w < warps; ++w) m = fmaxf(m, scratch[w]);
    return m;
}

// One block per token. Selected experts are marked -1 (probabilities are >= 0); a NaN probability is
// ranked as -0.5 so that k distinct experts are always chosen (the NaN still reaches the output).
template <typename T>
__global__ void route_kernel(const T* __restrict__ logits, int experts, int top_k, int normalize,
                             int* __restrict__ selected, float* __restrict__ weights) {
    extern __shared__ float probs[];
    __shared__ float scratch[32];
    __shared__ Candidate best_scratch[32];
    const int64_t n = blockIdx.x;
    const T* row = logits + n * experts;

    float m = -INFINITY;
    for (int e = threadIdx.x; e < experts; e += blockDim.x) m = fmaxf(m, load(row, e));
    m = block_max(m, scratch);
    float s = 0.0f;
    for (int e = threadIdx.x; e < experts; e += blockDim.x) {
        probs[e] = expf(load(row, e) - m);
        s += probs[e];
    }
    s = block_sum(s, scratch);
    for (int e = threadIdx.x; e < experts; e += blockDim.x) {
        const float p = probs[e] / s;
        probs[e] = p != p ? -0.5f : p;
    }

    float* w_out = weights + n * top_k;
    int* e_out = selected + n * top_k;
    for (int r = 0; r < top_k; ++r) {
        __syncthreads();  // probs written (first round) / the last winner marked
        Candidate c{-2.0f, INT_MAX};
        for (int e = threadIdx.x; e < experts; e += blockDim.x) c = better(c, Candidate{probs[e], e});
        c = block_best(c, best_scratch);
        if (threadIdx.x == 0) {
            e_out[r] = c.index;
            w_out[r] = probs[c.index] == -0.5f ? NAN : c.value;
            probs[c.index] = -1.0f;
        }
    }
    if (normalize && threadIdx.x == 0) {
        float total = 0.0f;
        for (int r = 0; r < top_k; ++r) total += w_out[r];
        for (int r = 0; r < top_k; ++r) w_out[r] /= total;
    }
}

// ------------------------------------------------------------------------------------------------
// 2. fc1 + swiglu: block (token*k + slot, group of kWarpsPerBlock intermediate rows)

template <typename T, typename W>
__global__ void fc1_swiglu_kernel(const T* __restrict__ x, W fc1, const T* __restrict__ fc1_bias,
                                  const int* __restrict__ selected, float* __restrict__ act, int hidden, int inter,
                                  int top_k) {
    const int64_t pair = blockIdx.x;
    const int64_t n = pair / top_k;
    const int j = blockIdx.y * kWarpsPerBlock + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (j >= inter) return;
    const int e = selected[pair];
    float g = 0.0f, u = 0.0f;
    for (int c = lane; c < hidden; c += 32) {
        const float xv = load(x, n * hidden + c);
        g += fc1.at(e, 2 * j, c) * xv;
        u += fc1.at(e, 2 * j + 1, c) * xv;
    }
    g = q3n::warp_sum(g);
    u = q3n::warp_sum(u);
    if (lane == 0) {
        if (fc1_bias) {
            g += load(fc1_bias, (int64_t)e * 2 * inter + 2 * j);
            u += load(fc1_bias, (int64_t)e * 2 * inter + 2 * j + 1);
        }
        act[pair * inter + j] = q3n::silu(g) * u;
    }
}

// ------------------------------------------------------------------------------------------------
// 3. fc2 and the weighted sum over the k slots: block (token, group of kWarpsPerBlock hidden rows)

template <typename T, typename W>
__global__ void fc2_combine_kernel(W fc2, const T* __restrict__ fc2_bias, const int* __restrict__ selected,
                                   const float* __restrict__ weights, const float* __restrict__ act, T* __restrict__ out,
                                   int hidden, int inter, int top_k) {
    const int64_t n = blockIdx.x;
    const int h = blockIdx.y * kWarpsPerBlock + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (h >= hidden) return;
    float total = 0.0f;
    for (int s = 0; s < top_k; ++s) {
        const int64_t pair = n * top_k + s;
        const int e = selected[pair];
        const float* a = act + pair * inter;
        float acc = 0.0f;
        for (int c = lane; c < inter; c += 32) acc += fc2.at(e, h, c) * a[c];
        acc = q3n::warp_sum(acc);
        if (fc2_bias) acc += load(fc2_bias, (int64_t)e * hidden + h);
        total += weights[pair] * acc;
    }
    if (lane == 0) store(out, n * hidden + h, total);
}

// ------------------------------------------------------------------------------------------------

int check_moe_args(const void* x, const void* router_logits, const void* fc1, const void* fc2, void* out, int tokens,
                   int hidden, int inter, int experts, int top_k, int dtype, void* workspace, size_t workspace_bytes) {
    if (tokens < 0 || hidden <= 0 || inter <= 0 || experts <= 0) return Q3N_ERR_BAD_SHAPE;
    if (top_k <= 0 || top_k > experts) return Q3N_ERR_BAD_ATTRIBUTE;
    if (dtype < Q3N_FLOAT32 || dtype > Q3N_BFLOAT16) return Q3N_ERR_BAD_DTYPE;
    if (experts > kMaxExperts || (inter + kWarpsPerBlock - 1) / kWarpsPerBlock > kMaxGridY ||
        (hidden + kWarpsPerBlock - 1) / kWarpsPerBlock > kMaxGridY || (int64_t)tokens * top_k > INT_MAX)
        return Q3N_ERR_UNSUPPORTED;
    if (tokens == 0) return Q3N_OK;
    if (!x || !router_logits || !fc1 || !fc2 || !out) return Q3N_ERR_NULL_POINTER;
    if (!workspace || !q3n::aligned(workspace, 16) || workspace_bytes < workspace_bytes_for(tokens, experts, top_k, hidden, inter, nullptr, nullptr))
        return Q3N_ERR_WORKSPACE;
    return Q3N_OK;
}

template <typename T, typename W1, typename W2>
int launch_moe(const void* x, const void* router_logits, W1 fc1, const void* fc1_bias, W2 fc2, const void* fc2_bias,
               void* out, int tokens, int hidden, int inter, int experts, int top_k, int normalize, void* workspace,
               cudaStream_t stream) {
    Workspace ws;
    workspace_bytes_for(tokens, experts, top_k, hidden, inter, &ws, workspace);
    route_kernel<T><<<tokens, kRouterThreads, experts * sizeof(float), stream>>>(
        static_cast<const T*>(router_logits), experts, top_k, normalize, ws.experts, ws.weights);
    const dim3 block(32 * kWarpsPerBlock);
    const dim3 grid1(tokens * top_k, (inter + kWarpsPerBlock - 1) / kWarpsPerBlock);
    fc1_swiglu_kernel<T, W1><<<grid1, block, 0, stream>>>(static_cast<const T*>(x), fc1, static_cast<const T*>(fc1_bias),
                                                          ws.experts, ws.act, hidden, inter, top_k);
    const dim3 grid2(tokens, (hidden + kWarpsPerBlock - 1) / kWarpsPerBlock);
    fc2_combine_kernel<T, W2><<<grid2, block, 0, stream>>>(fc2, static_cast<const T*>(fc2_bias), ws.experts, ws.weights,
                                                           ws.act, static_cast<T*>(out), hidden, inter, top_k);
    return q3n::launch_status();
}

template <typename T>
int launch_dense(const void* x, const void* router_logits, const void* fc1, const void* fc1_bias, const void* fc2,
                 const void* fc2_bias, void* out, int tokens, int hidden, int inter, int experts, int top_k,
                 int normalize, void* workspace, cudaStream_t stream) {
    const DenseWeights<T> w1{static_cast<const T*>(fc1), 2 * inter, hidden};
    const DenseWeights<T> w2{static_cast<const T*>(fc2), hidden, inter};
    return launch_moe<T>(x, router_logits, w1, fc1_bias, w2, fc2_bias, out, tokens, hidden, inter, experts, top_k,
                         normalize, workspace, stream);
}

int blocks_of(int n) { return (n + kFp8Block - 1) / kFp8Block; }

template <typename T>
int launch_fp8(const void* x, const void* router_logits, const unsigned char* fc1, const float* scale1,
               const unsigned char* fc2, const float* scale2, void* out, int tokens, int hidden, int inter,
               int experts, int top_k, int normalize, void* workspace, cudaStream_t stream) {
    const Fp8BlockWeights w1{fc1, scale1, 2 * inter, hidden, 2 * blocks_of(inter), blocks_of(hidden), true};
    const Fp8BlockWeights w2{fc2, scale2, hidden, inter, blocks_of(hidden), blocks_of(inter), false};
    return launch_moe<T>(x, router_logits, w1, nullptr, w2, nullptr, out, tokens, hidden, inter, experts, top_k,
                         normalize, workspace, stream);
}

}  // namespace

// Bytes of workspace q3n_moe / q3n_moe_fp8 need (0 for invalid sizes, which those calls then reject).
Q3N_API size_t q3n_moe_workspace_size(int tokens, int experts, int top_k, int hidden, int inter) {
    if (tokens <= 0 || experts <= 0 || top_k <= 0 || top_k > experts || hidden <= 0 || inter <= 0) return 0;
    return workspace_bytes_for(tokens, experts, top_k, hidden, inter, nullptr, nullptr);
}

// Returns 0, a cudaError_t value, or a negative Q3N_ERR_* code (common.cuh).
Q3N_API int q3n_moe(const void* x, const void* router_logits, const void* fc1, const void* fc1_bias, const void* fc2,
                    const void* fc2_bias, void* out, int tokens, int hidden, int inter, int experts, int top_k,
                    int normalize, int dtype, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    const int status = check_moe_args(x, router_logits, fc1, fc2, out, tokens, hidden, inter, experts, top_k, dtype,
                                      workspace, workspace_bytes);
    if (status != Q3N_OK || tokens == 0) return status;
    Q3N_DISPATCH_DTYPE(dtype, launch_dense, x, router_logits, fc1, fc1_bias, fc2, fc2_bias, out, tokens, hidden, inter,
                       experts, top_k, normalize, workspace, stream);
}

enum MoeImpl : int {
    Q3N_MOE_AUTO = 0,    // prefill for many tokens, else the fast path when it fits, else the simple one
    Q3N_MOE_SIMPLE = 1,  // the GEMV kernels above: any shape, the oracle
    Q3N_MOE_FAST = 2,    // fast.cuh: H, I multiples of 16, k <= 16, E <= 1024, 16-byte aligned x/fc1/fc2
    Q3N_MOE_PREFILL = 3,  // prefill.cuh: FAST's limits and H, I multiples of 128; auto from 2 pairs per expert
};

// The fast.cuh (decode) or prefill.cuh path, on kernel.cu's workspace layout.
template <typename T>
int launch_fp8_tuned(const void* x, const void* router_logits, const unsigned char* fc1, const float* scale1,
                     const unsigned char* fc2, const float* scale2, void* out, int tokens, int hidden, int inter,
                     int experts, int top_k, int normalize, void* workspace, int impl, cudaStream_t stream) {
    Workspace ws;
    workspace_bytes_for(tokens, experts, top_k, hidden, inter, &ws, workspace);
    if (impl == Q3N_MOE_PREFILL)
        return q3n_moe_prefill::launch<T>(x, router_logits, fc1, scale1, fc2, scale2, out, tokens, hidden, inter,
                                          experts, top_k, normalize, ws.experts, ws.weights, ws.act, ws.prefill, stream);
    return q3n_moe_fast::launch<T>(x, router_logits, fc1, scale1, fc2, scale2, out, tokens, hidden, inter, experts, top_k,
                                   normalize, ws.experts, ws.weights, ws.act, stream);
}

// Same workspace for all paths (q3n_moe_workspace_size). Q3N_ERR_UNSUPPORTED when the requested
// implementation does not fit.
Q3N_API int q3n_moe_fp8_impl(const void* x, const void* router_logits, const unsigned char* fc1, const float* scale1,
                             const unsigned char* fc2, const float* scale2, void* out, int tokens, int hidden,
                             int inter, int experts, int top_k, int normalize, int dtype, void* workspace,
                             size_t workspace_bytes, int impl, cudaStream_t stream) {
    const int status = check_moe_args(x, router_logits, fc1, fc2, out, tokens, hidden, inter, experts, top_k, dtype,
                                      workspace, workspace_bytes);
    if (status != Q3N_OK) return status;
    if (impl < Q3N_MOE_AUTO || impl > Q3N_MOE_PREFILL) return Q3N_ERR_BAD_ATTRIBUTE;
    if (tokens == 0) return Q3N_OK;
    if (!scale1 || !scale2) return Q3N_ERR_NULL_POINTER;
    const bool fast_fits = q3n_moe_fast::shapes_fit(x, fc1, fc2, tokens, hidden, inter, experts, top_k);
    const bool prefill_fits = q3n_moe_prefill::shapes_fit(x, fc1, fc2, tokens, hidden, inter, experts, top_k);
    if (impl == Q3N_MOE_AUTO)
        impl = prefill_fits && q3n_moe_prefill::worth_it(tokens, top_k, experts) ? Q3N_MOE_PREFILL
               : fast_fits                                                      ? Q3N_MOE_FAST
                                                                                : Q3N_MOE_SIMPLE;
    if (impl == Q3N_MOE_FAST || impl == Q3N_MOE_PREFILL) {
        if (!(impl == Q3N_MOE_FAST ? fast_fits : prefill_fits)) return Q3N_ERR_UNSUPPORTED;
        Q3N_DISPATCH_DTYPE(dtype, launch_fp8_tuned, x, router_logits, fc1, scale1, fc2, scale2, out, tokens, hidden,
                           inter, experts, top_k, normalize, workspace, impl, stream);
    }
    Q3N_DISPATCH_DTYPE(dtype, launch_fp8, x, router_logits, fc1, scale1, fc2, scale2, out, tokens, hidden, inter,
                       experts, top_k, normalize, workspace, stream);
}

Q3N_API int q3n_moe_fp8(const void* x, const void* router_logits, const unsigned char* fc1, const float* scale1,
                        const unsigned char* fc2, const float* scale2, void* out, int tokens, int hidden, int inter,
                        int experts, int top_k, int normalize, int dtype, void* workspace, size_t workspace_bytes,
                        cudaStream_t stream) {
    return q3n_moe_fp8_impl(x, router_logits, fc1, scale1, fc2, scale2, out, tokens, hidden, inter, experts, top_k,
                            normalize, dtype, workspace, workspace_bytes, Q3N_MOE_AUTO, stream);
}
