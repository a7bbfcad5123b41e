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
#include <type_traits>

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

// Compute capability (major * 10 + minor) and opt-in shared memory per block of the current device,
// queried once per device: the fast kernels are chosen per call (TensorRT enqueue) and the attribute
// queries are not free. Racing threads write identical values, so no lock is needed.
struct DeviceInfo {
    int cc = 0;
    int smem_optin = 0;
};
inline DeviceInfo current_device() {
    constexpr int kMaxDevices = 64;
    static DeviceInfo cache[kMaxDevices];
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) {
        cudaGetLastError();
        return DeviceInfo{};
    }
    if (cache[dev].cc == 0) {
        int major = 0, minor = 0, smem = 0;
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
        cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
        cudaGetLastError();
        cache[dev].smem_optin = smem;
        cache[dev].cc = major * 10 + minor;
    }
    return cache[dev];
}

// Programmatic dependent launch (sm_90+): a kernel launched with the attribute may start while the
// previous kernel on the stream drains; it must call grid_dependency_wait() before reading what that
// kernel wrote. launch_dependents() lets the next kernel start early. No-ops on older archs.
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// cp.async (sm_80+): 16 bytes global -> shared, or 16 zero bytes when !valid (nothing is read from src then);
// groups committed and waited for by count.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid = true) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8 x 8 matrices of 16-bit elements from shared memory; lane l addresses row l % 8 of matrix l / 8.
// _trans: each matrix transposed (a lane gets two elements of one column).
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* row) {
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* row) {
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

// mma.sync m16n8k16 with fp16 or bf16 operands (T) and float32 accumulation.
template <typename T>
__device__ __forceinline__ void mma_16816(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    if constexpr (std::is_same<T, __half>::value)
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    else
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Launch `kernel` with programmatic stream serialization when `pdl` is set (device cc >= 90).
template <typename... KArgs, typename... Args>
inline cudaError_t launch_kernel(bool pdl, void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                                 cudaStream_t stream, Args... args) {
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    config.attrs = attr;
    config.numAttrs = pdl ? 1 : 0;
    return cudaLaunchKernelEx(&config, kernel, static_cast<KArgs>(args)...);
}

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
