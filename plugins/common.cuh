// Shared by the plugin kernels: status codes, dtype codes, float conversions, dtype dispatch.
//
// Every exported function returns an int: 0 on success, a positive cudaError_t value when a CUDA
// call or launch failed, or one of the negative Q3N_ERR_* codes below for a bad argument (checked
// before anything is launched, so nothing has been written then).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#define Q3N_API extern "C" __attribute__((visibility("default")))

enum Q3nStatus : int {
    Q3N_OK = 0,
    Q3N_ERR_NULL_POINTER = -1,    // a required pointer is NULL
    Q3N_ERR_BAD_SHAPE = -2,       // a size is negative / zero where it must be positive, or sizes disagree
    Q3N_ERR_BAD_DTYPE = -3,       // dtype code is not 0 (float32), 1 (float16) or 2 (bfloat16)
    Q3N_ERR_BAD_ATTRIBUTE = -4,   // activation or top_k out of range
    Q3N_ERR_UNSUPPORTED = -5,     // a size is beyond this implementation's limits (see the op's README)
    Q3N_ERR_WORKSPACE = -6,       // workspace NULL, too small, or not 16-byte aligned
};

enum Q3nDtype : int { Q3N_FLOAT32 = 0, Q3N_FLOAT16 = 1, Q3N_BFLOAT16 = 2 };

namespace q3n {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T> __device__ __forceinline__ float load(const T* p, size_t i) { return to_float(p[i]); }
template <typename T> __device__ __forceinline__ void store(T* p, size_t i, float v) { p[i] = from_float<T>(v); }

// Plain expf, not __expf: these kernels are the accuracy baseline the fast ones are checked against.
__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Status of the launches just made. cudaPeekAtLastError would leave a sticky launch error in place
// for the next caller to trip over; cudaGetLastError consumes it, and we report it instead.
inline int launch_status() {
    cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? Q3N_OK : static_cast<int>(err);
}

inline bool aligned(const void* p, size_t bytes) { return (reinterpret_cast<uintptr_t>(p) % bytes) == 0; }

}  // namespace q3n

// Calls `launcher<T>(args...)` with T the element type of dtype code `dtype`; returns its status,
// or Q3N_ERR_BAD_DTYPE for an unknown code.
#define Q3N_DISPATCH_DTYPE(dtype, launcher, ...)                                   \
    do {                                                                           \
        switch (dtype) {                                                           \
            case Q3N_FLOAT32: return launcher<float>(__VA_ARGS__);                 \
            case Q3N_FLOAT16: return launcher<__half>(__VA_ARGS__);                \
            case Q3N_BFLOAT16: return launcher<__nv_bfloat16>(__VA_ARGS__);        \
            default: return Q3N_ERR_BAD_DTYPE;                                     \
        }                                                                          \
    } while (0)
