// LinearAttention (com.microsoft, update_rule gated_delta): the gated delta rule scan of Gated DeltaNet,
// token by token (the recurrent form of model/gated_delta_rule.py). Per value head, state S [Dk, Dv]:
//
//   S <- exp(g_t) S;   d_t = beta_t (v_t - S^T k_t);   S <- S + k_t d_t^T;   o_t = S^T (scale q_t)
//
// Layout: one block per (batch, value head), one thread per state column j. Column j of S only ever
// needs column j of S, k_t, q_t and the scalars v_t[j], g_t, beta_t, so a thread updates its column
// with no communication; the block only shares k_t and q_t (staged in shared memory per token).
// The state lives in present_state itself (float32, global memory, L1-resident for one block): at
// Dk = Dv = 128 it is 64 KiB per head, more than a block's default shared memory.
#include "../common.cuh"
#include "fast.cuh"
#include "split.cuh"

namespace {

using q3n::load;
using q3n::store;

constexpr int kMaxHeadDim = 256;

template <typename T>
__global__ void gated_delta_rule_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                        const float* past_state, const T* __restrict__ decay, const T* __restrict__ beta,
                                        T* __restrict__ out, float* present_state, int seq, int num_k_heads,
                                        int num_v_heads, int head_k_dim, int head_v_dim, float scale) {
    __shared__ float k_t[kMaxHeadDim];
    __shared__ float q_t[kMaxHeadDim];

    const int b = blockIdx.x / num_v_heads;
    const int h = blockIdx.x % num_v_heads;
    const int kh = h / (num_v_heads / num_k_heads);
    const int j = threadIdx.x;
    const int Dk = head_k_dim, Dv = head_v_dim;

    // Column j of this head's state: element i at S[i * Dv]. Reading each element before writing
    // it, in the same thread, makes past_state == present_state (an in-place update) safe.
    float* S = present_state + ((int64_t)b * num_v_heads + h) * Dk * Dv + j;
    const float* S0 = past_state ? past_state + ((int64_t)b * num_v_heads + h) * Dk * Dv + j : nullptr;
    for (int i = 0; i < Dk; ++i) S[(int64_t)i * Dv] = S0 ? S0[(int64_t)i * Dv] : 0.0f;

    const int64_t qk_stride = (int64_t)num_k_heads * Dk;  // one token of q or k
    const int64_t v_stride = (int64_t)num_v_heads * Dv;
    for (int t = 0; t < seq; ++t) {
        const int64_t token = (int64_t)b * seq + t;
        __syncthreads();  // everyone is done with the previous token's k_t, q_t
        for (int i = j; i < Dk; i += blockDim.x) {
            k_t[i] = load(k, token * qk_stride + (int64_t)kh * Dk + i);
            q_t[i] = load(q, token * qk_stride + (int64_t)kh * Dk + i) * scale;
        }
        __syncthreads();

        const float gate = expf(load(decay, token * num_v_heads + h));
        const float b_t = load(beta, token * num_v_heads + h);

        // Pass 1: what the decayed state predicts for k_t.
        float predicted = 0.0f;
        for (int i = 0; i < Dk; ++i) predicted += (gate * S[(int64_t)i * Dv]) * k_t[i];
        const float delta = b_t * (load(v, token * v_stride + (int64_t)h * Dv + j) - predicted);

        // Pass 2: decay + rank-1 update, written back, and the output read off the new state.
        float o = 0.0f;
        for (int i = 0; i < Dk; ++i) {
            const float s = gate * S[(int64_t)i * Dv] + k_t[i] * delta;
            S[(int64_t)i * Dv] = s;
            o += s * q_t[i];
        }
        store(out, token * v_stride + (int64_t)h * Dv + j, o);
    }
}

template <typename T>
int launch(const void* q, const void* k, const void* v, const float* past_state, const void* decay, const void* beta,
           void* out, float* present_state, int batch, int seq, int num_k_heads, int num_v_heads, int head_k_dim,
           int head_v_dim, float scale, cudaStream_t stream) {
    gated_delta_rule_kernel<T><<<batch * num_v_heads, head_v_dim, 0, stream>>>(
        static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), past_state,
        static_cast<const T*>(decay), static_cast<const T*>(beta), static_cast<T*>(out), present_state, seq, num_k_heads,
        num_v_heads, head_k_dim, head_v_dim, scale);
    return q3n::launch_status();
}

}  // namespace

enum LinearAttentionImpl : int {
    Q3N_LA_AUTO = 0,    // the fastest kernel that fits (below)
    Q3N_LA_SIMPLE = 1,  // the token-serial kernel above: any shape, the oracle
    Q3N_LA_DECODE = 2,  // q3n_gdn::decode_kernel: Dk = 128, Dv % 32 == 0, 1 <= seq <= 4
    Q3N_LA_CHUNK = 3,   // q3n_gdn::chunk_kernel (CUDA cores): Dk = 128, Dv % 32 == 0, seq >= 1, 134 KiB shared memory
    Q3N_LA_CHUNK_TC = 4,  // q3n_gdn::chunk_tc_kernel (tensor cores, sm_80+): as CHUNK, 159 KiB shared memory
    Q3N_LA_CHUNK_SPLIT = 5,  // q3n_gdn::factor_kernel + state_kernel (split.cuh, tensor cores, sm_80+): as CHUNK,
                             // 214 KiB shared memory, q/k/v/out 16-byte aligned, a workspace (below)
};

// Workspace bytes the split prefill wants for these shapes (0: it does not apply); any amount that holds
// one chunk of factors per (batch, value head) works, in more segments.
Q3N_API size_t q3n_linear_attention_workspace_size(int batch, int seq, int num_k_heads, int num_v_heads,
                                                   int head_k_dim, int head_v_dim) {
    if (batch <= 0 || seq <= q3n_gdn::kMaxDecodeTokens || num_k_heads <= 0 || num_v_heads <= 0 ||
        head_k_dim != q3n_gdn::kDk || head_v_dim <= 0 || head_v_dim % q3n_gdn::kCols != 0)
        return 0;
    return q3n_gdn::split_workspace_size(batch, seq, num_v_heads);
}

// Returns 0, a cudaError_t value, or a negative Q3N_ERR_* code (common.cuh). Q3N_ERR_UNSUPPORTED
// when an explicitly requested kernel does not fit the shapes.
Q3N_API int q3n_linear_attention_impl(const void* q, const void* k, const void* v, const float* past_state,
                                      const void* decay, const void* beta, void* out, float* present_state, int batch,
                                      int seq, int num_k_heads, int num_v_heads, int head_k_dim, int head_v_dim,
                                      float scale, int dtype, void* workspace, size_t workspace_bytes, int impl,
                                      cudaStream_t stream) {
    if (batch < 0 || seq < 0 || num_k_heads <= 0 || num_v_heads <= 0 || head_k_dim <= 0 || head_v_dim <= 0)
        return Q3N_ERR_BAD_SHAPE;
    if (num_v_heads % num_k_heads != 0) return Q3N_ERR_BAD_SHAPE;
    if (head_k_dim > kMaxHeadDim || head_v_dim > kMaxHeadDim) return Q3N_ERR_UNSUPPORTED;
    if ((int64_t)batch * num_v_heads > 0x7fffffff) return Q3N_ERR_UNSUPPORTED;
    if (dtype < Q3N_FLOAT32 || dtype > Q3N_BFLOAT16) return Q3N_ERR_BAD_DTYPE;
    if (impl < Q3N_LA_AUTO || impl > Q3N_LA_CHUNK_SPLIT) return Q3N_ERR_BAD_ATTRIBUTE;
    if (batch == 0) return Q3N_OK;
    if (!present_state) return Q3N_ERR_NULL_POINTER;
    if (seq > 0 && (!q || !k || !v || !decay || !beta || !out)) return Q3N_ERR_NULL_POINTER;

    const bool fits = q3n_gdn::shapes_fit(past_state, present_state, num_k_heads, num_v_heads, head_k_dim,
                                          head_v_dim, batch);
    const bool decode_fits = fits && seq >= 1 && seq <= q3n_gdn::kMaxDecodeTokens;
    const q3n::DeviceInfo device = (impl == Q3N_LA_CHUNK || impl == Q3N_LA_CHUNK_TC || impl == Q3N_LA_CHUNK_SPLIT ||
                                    (impl == Q3N_LA_AUTO && !decode_fits))
                                       ? q3n::current_device() : q3n::DeviceInfo{};
    const bool chunk_fits = fits && seq >= 1 && (size_t)device.smem_optin >= q3n_gdn::kChunkSmemBytes;
    const bool chunk_tc_fits = fits && seq >= 1 && device.cc >= 80 && (size_t)device.smem_optin >= q3n_gdn::kChunkTcSmemBytes;
    const bool split_fits = chunk_tc_fits && (size_t)device.smem_optin >= q3n_gdn::kSplitSmemBytes &&
                            batch <= 65535 && num_v_heads <= 65535 && q3n::aligned(q, 16) && q3n::aligned(k, 16) &&
                            q3n::aligned(v, 16) && q3n::aligned(out, 16);
    const bool workspace_ok = workspace && q3n::aligned(workspace, 16) &&
                              q3n_gdn::split_segment_chunks(workspace_bytes, batch, num_v_heads, 1) >= 1;
    if (impl == Q3N_LA_AUTO)
        impl = decode_fits ? Q3N_LA_DECODE
               : split_fits && workspace_ok ? Q3N_LA_CHUNK_SPLIT
               : chunk_tc_fits ? Q3N_LA_CHUNK_TC
               : chunk_fits ? Q3N_LA_CHUNK : Q3N_LA_SIMPLE;
    if ((impl == Q3N_LA_DECODE && !decode_fits) || (impl == Q3N_LA_CHUNK && !chunk_fits) ||
        (impl == Q3N_LA_CHUNK_TC && !chunk_tc_fits) || (impl == Q3N_LA_CHUNK_SPLIT && !split_fits))
        return Q3N_ERR_UNSUPPORTED;
    if (impl == Q3N_LA_CHUNK_SPLIT && !workspace_ok) return Q3N_ERR_WORKSPACE;
    if (impl == Q3N_LA_DECODE)
        Q3N_DISPATCH_DTYPE(dtype, q3n_gdn::launch_decode, q, k, v, past_state, decay, beta, out, present_state, batch,
                           seq, num_k_heads, num_v_heads, head_v_dim, scale, stream);
    if (impl == Q3N_LA_CHUNK_SPLIT)
        Q3N_DISPATCH_DTYPE(dtype, q3n_gdn::launch_split, q, k, v, past_state, decay, beta, out, present_state, batch,
                           seq, num_k_heads, num_v_heads, head_v_dim, scale, workspace, workspace_bytes, stream);
    if (impl == Q3N_LA_CHUNK_TC)
        Q3N_DISPATCH_DTYPE(dtype, q3n_gdn::launch_chunk_tc, q, k, v, past_state, decay, beta, out, present_state, batch,
                           seq, num_k_heads, num_v_heads, head_v_dim, scale, stream);
    if (impl == Q3N_LA_CHUNK)
        Q3N_DISPATCH_DTYPE(dtype, q3n_gdn::launch_chunk, q, k, v, past_state, decay, beta, out, present_state, batch,
                           seq, num_k_heads, num_v_heads, head_v_dim, scale, stream);
    Q3N_DISPATCH_DTYPE(dtype, launch, q, k, v, past_state, decay, beta, out, present_state, batch, seq, num_k_heads,
                       num_v_heads, head_k_dim, head_v_dim, scale, stream);
}

// The TensorRT plugin's entry point: the fastest kernel that fits (the split prefill only when the
// workspace holds at least one chunk of factors; NULL / 0 is allowed and picks another kernel).
Q3N_API int q3n_linear_attention(const void* q, const void* k, const void* v, const float* past_state,
                                 const void* decay, const void* beta, void* out, float* present_state, int batch,
                                 int seq, int num_k_heads, int num_v_heads, int head_k_dim, int head_v_dim, float scale,
                                 int dtype, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    return q3n_linear_attention_impl(q, k, v, past_state, decay, beta, out, present_state, batch, seq, num_k_heads,
                                     num_v_heads, head_k_dim, head_v_dim, scale, dtype, workspace, workspace_bytes,
                                     Q3N_LA_AUTO, stream);
}
