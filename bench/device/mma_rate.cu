// Raw mma.sync rates on the lent GPU: TF32 m16n8k8 and BF16 m16n8k16, `chains` independent accumulators per
// warp, at 1 block (8 warps) per SM and at 4. What the split GDN prefill's state pass (3-pass TF32) can
// expect per SM; wgmma is not measured here.
//   nvcc -O3 -gencode=arch=compute_90a,code=sm_90a bench/device/mma_rate.cu -o /tmp/mma_rate && /tmp/mma_rate
#include <cstdint>
#include <cstdio>

// kBf16: mma.m16n8k16 BF16 (4096 FLOP), else mma.m16n8k8 TF32 (2048 FLOP); the operands' values do not matter.
template <bool kBf16, int kChains>
__global__ void mma_kernel(float* out, int iters) {
    float d[kChains][4] = {};
    uint32_t a[4] = {threadIdx.x, threadIdx.x * 3u, 7u, 9u}, b[2] = {threadIdx.x * 5u, 11u};
    for (int i = 0; i < iters; ++i)
#pragma unroll
        for (int c = 0; c < kChains; ++c) {
            if (kBf16)
                asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                             : "+f"(d[c][0]), "+f"(d[c][1]), "+f"(d[c][2]), "+f"(d[c][3])
                             : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
            else
                asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                             : "+f"(d[c][0]), "+f"(d[c][1]), "+f"(d[c][2]), "+f"(d[c][3])
                             : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
        }
    float s = 0.f;
    for (int c = 0; c < kChains; ++c) s += d[c][0] + d[c][1] + d[c][2] + d[c][3];
    out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

template <class K>
void run(const char* name, K kernel, int blocks_per_sm, int chains, double flop_per_mma) {
    int sms = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
    const int blocks = sms * blocks_per_sm, threads = 256, iters = 4096;
    float* out;
    cudaMalloc(&out, sizeof(float) * blocks * threads);
    kernel<<<blocks, threads>>>(out, 16);
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    cudaEventRecord(e0);
    kernel<<<blocks, threads>>>(out, iters);
    cudaEventRecord(e1);
    cudaEventSynchronize(e1);
    float ms = 0.f;
    cudaEventElapsedTime(&ms, e0, e1);
    const double mmas = (double)blocks * (threads / 32) * iters * chains;
    printf("%-5s %d block(s)/SM x 8 warps, %d chains: %7.1f TFLOP/s, %.2f ns per mma per SM\n", name, blocks_per_sm, chains,
           mmas * flop_per_mma / ms / 1e9, ms * 1e6 / (mmas / sms));
    cudaFree(out);
}

int main() {
    for (int bps : {1, 4}) {
        run("tf32", mma_kernel<false, 1>, bps, 1, 2048.0);
        run("tf32", mma_kernel<false, 4>, bps, 4, 2048.0);
        run("tf32", mma_kernel<false, 8>, bps, 8, 2048.0);
        run("bf16", mma_kernel<true, 1>, bps, 1, 4096.0);
        run("bf16", mma_kernel<true, 4>, bps, 4, 4096.0);
        run("bf16", mma_kernel<true, 8>, bps, 8, 4096.0);
    }
    return 0;
}
