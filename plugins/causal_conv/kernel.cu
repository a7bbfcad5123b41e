// CausalConvWithState (com.microsoft): depthwise causal 1-D conv that continues from a K-1 column state.
//
// window[b, c, :] = concat(past_state[b, c, :], x[b, c, :])          (length K-1+T, past = 0 when NULL)
// y[b, c, t]      = act(bias[c] + sum_j weight[c, 0, j] * window[b, c, t + j])
// present_state   = window[b, c, T:]                                  (its last K-1 columns)
//
// Two launches on the caller's stream: outputs first, then the state. The order is what lets
// present_state be the very buffer past_state is (an in-place state update): every read of the
// old state by the output kernel is done before the state kernel overwrites it.
#include "../common.cuh"

namespace {

using q3n::load;
using q3n::store;

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ float window_at(const T* x, const T* past_state, int64_t row, int seq, int hist, int pos) {
    if (pos >= hist) return load(x, row * seq + (pos - hist));
    return past_state ? load(past_state, row * hist + pos) : 0.0f;
}

// One thread per output element, t fastest, so neighbouring threads read neighbouring inputs.
template <typename T>
__global__ void causal_conv_output_kernel(const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ bias,
                                          const T* past_state, T* __restrict__ y, int64_t rows, int channels, int seq,
                                          int kernel, int activation) {
    const int hist = kernel - 1;
    const int64_t total = rows * seq;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t row = i / seq;  // b * C + c
        const int t = (int)(i - row * seq);
        const int c = (int)(row % channels);
        float acc = bias ? load(bias, c) : 0.0f;
        for (int j = 0; j < kernel; ++j)
            acc += load(weight, (int64_t)c * kernel + j) * window_at(x, past_state, row, seq, hist, t + j);
        store(y, i, activation == 1 ? q3n::silu(acc) : acc);
    }
}

// One thread per (b, c) row, columns in increasing order: column m reads window position T+m, which
// is either in x or at old-state column T+m > m, not yet overwritten when past_state == present_state.
template <typename T>
__global__ void causal_conv_state_kernel(const T* __restrict__ x, const T* past_state, T* present_state, int64_t rows,
                                         int seq, int kernel) {
    const int hist = kernel - 1;
    for (int64_t row = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; row < rows; row += (int64_t)gridDim.x * blockDim.x) {
        for (int m = 0; m < hist; ++m) {
            const int pos = seq + m;
            T v = pos >= hist ? x[row * seq + (pos - hist)] : (past_state ? past_state[row * hist + pos] : q3n::from_float<T>(0.0f));
            present_state[row * hist + m] = v;  // a copy: the state keeps the input's exact bits
        }
    }
}

int blocks_for(int64_t work) {
    // Grid-stride loops cover the rest; the cap keeps the grid within any device's limits.
    const int64_t blocks = (work + kThreads - 1) / kThreads;
    return (int)(blocks < (1 << 20) ? blocks : (1 << 20));
}

template <typename T>
int launch(const void* x, const void* weight, const void* bias, const void* past_state, void* y, void* present_state,
           int batch, int channels, int seq, int kernel, int activation, cudaStream_t stream) {
    const int64_t rows = (int64_t)batch * channels;
    const int64_t outputs = rows * seq;
    if (outputs > 0) {
        causal_conv_output_kernel<T><<<blocks_for(outputs), kThreads, 0, stream>>>(
            static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<const T*>(bias),
            static_cast<const T*>(past_state), static_cast<T*>(y), rows, channels, seq, kernel, activation);
    }
    if (kernel > 1) {
        causal_conv_state_kernel<T><<<blocks_for(rows), kThreads, 0, stream>>>(
            static_cast<const T*>(x), static_cast<const T*>(past_state), static_cast<T*>(present_state), rows, seq, kernel);
    }
    return q3n::launch_status();
}

}  // namespace

// Returns 0, a cudaError_t value, or a negative Q3N_ERR_* code (common.cuh).
Q3N_API int q3n_causal_conv_with_state(const void* x, const void* weight, const void* bias, const void* past_state,
                                       void* y, void* present_state, int batch, int channels, int seq, int kernel,
                                       int activation, int dtype, cudaStream_t stream) {
    if (batch < 0 || channels <= 0 || seq < 0 || kernel <= 0) return Q3N_ERR_BAD_SHAPE;
    if (activation != 0 && activation != 1) return Q3N_ERR_BAD_ATTRIBUTE;
    if (dtype < Q3N_FLOAT32 || dtype > Q3N_BFLOAT16) return Q3N_ERR_BAD_DTYPE;
    if (batch == 0) return Q3N_OK;
    if (!weight) return Q3N_ERR_NULL_POINTER;
    if (seq > 0 && (!x || !y)) return Q3N_ERR_NULL_POINTER;
    if (kernel > 1 && !present_state) return Q3N_ERR_NULL_POINTER;
    Q3N_DISPATCH_DTYPE(dtype, launch, x, weight, bias, past_state, y, present_state, batch, channels, seq, kernel,
                       activation, stream);
}
