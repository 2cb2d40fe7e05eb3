// Fused kernels for the CUDA path: GroupNorm (optionally followed by SiLU) and a per-channel
// bias add with an optional residual, over contiguous NCHW tensors. Statistics and arithmetic
// in f32 whatever the storage type. Compiled ahead of time to SASS for sm_80/86/89/90 (plus
// PTX for newer GPUs) by build.rs, so nothing is compiled when a worker starts.
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

// Sum over the block; every thread gets the result. `shared` holds one float per warp.
__device__ __forceinline__ float block_sum(float v, float* shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) / 32;
    v = lane < warps ? shared[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

// GroupNorm in two kernels, so that a large group (the VAE's at 512×512: a million
// elements) is spread over many blocks. `group_stats`: blocks (split, group·image) each sum
// one slice of a group's contiguous run, x and x², into `stats` (double, zeroed beforehand).
template <typename T>
__device__ void group_stats(const T* __restrict__ x, double* __restrict__ stats, int64_t run) {
    __shared__ float shared[32];
    const int64_t chunk = (run + gridDim.x - 1) / gridDim.x;
    const int64_t begin = (int64_t)blockIdx.x * chunk;
    const int64_t end = min(begin + chunk, run);
    const T* xs = x + (int64_t)blockIdx.y * run;
    float sum = 0.f, sq = 0.f;
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
        float v = to_f(xs[i]);
        sum += v;
        sq += v * v;
    }
    sum = block_sum(sum, shared);
    sq = block_sum(sq, shared);
    if (threadIdx.x == 0) {
        atomicAdd(&stats[2 * blockIdx.y], (double)sum);
        atomicAdd(&stats[2 * blockIdx.y + 1], (double)sq);
    }
}

// `group_apply`: every element normalised with its group's statistics, scaled and shifted
// by its channel's weight and bias, then SiLU when asked.
template <typename T, bool SILU>
__device__ void group_apply(const T* __restrict__ x, const double* __restrict__ stats,
                            const T* __restrict__ gamma, const T* __restrict__ beta,
                            T* __restrict__ y, int channels, int hw, int cpg, int64_t n,
                            float eps) {
    const int64_t run = (int64_t)cpg * hw;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t g = i / run;
        const double mean = stats[2 * g] / (double)run;
        const double var = fmax(stats[2 * g + 1] / (double)run - mean * mean, 0.0);
        const float rstd = rsqrtf((float)var + eps);
        const int c = (int)((i / hw) % channels);
        float v = (to_f(x[i]) - (float)mean) * rstd * to_f(gamma[c]) + to_f(beta[c]);
        if (SILU) v = v / (1.f + __expf(-v));
        y[i] = from_f<T>(v);
    }
}

// The epilogue of a convolution, in place: y[i] += bias[c] (+ per_image[n, c]) (+ residual[i]).
template <typename T>
__device__ void bias_add(T* __restrict__ y, const T* __restrict__ bias,
                         const T* __restrict__ residual, int with_residual,
                         const T* __restrict__ per_image, int with_per_image, int channels,
                         int hw, int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t plane = i / hw;  // n·channels + c
        float v = to_f(y[i]) + to_f(bias[plane % channels]);
        if (with_per_image) v += to_f(per_image[plane]);
        if (with_residual) v += to_f(residual[i]);
        y[i] = from_f<T>(v);
    }
}

#define GROUP_NORM(T, NAME)                                                                   \
    extern "C" __global__ void group_stats_##NAME(const T* x, double* stats, int64_t run) {   \
        group_stats<T>(x, stats, run);                                                        \
    }                                                                                         \
    extern "C" __global__ void group_apply_##NAME(const T* x, const double* stats,            \
                                                  const T* gamma, const T* beta, T* y,        \
                                                  int channels, int hw, int cpg, int64_t n,   \
                                                  float eps) {                                \
        group_apply<T, false>(x, stats, gamma, beta, y, channels, hw, cpg, n, eps);           \
    }                                                                                         \
    extern "C" __global__ void group_apply_silu_##NAME(const T* x, const double* stats,       \
                                                       const T* gamma, const T* beta, T* y,   \
                                                       int channels, int hw, int cpg,         \
                                                       int64_t n, float eps) {                \
        group_apply<T, true>(x, stats, gamma, beta, y, channels, hw, cpg, n, eps);            \
    }                                                                                         \
    extern "C" __global__ void bias_add_##NAME(T* y, const T* bias, const T* residual,        \
                                               int with_residual, const T* per_image,         \
                                               int with_per_image, int channels, int hw,      \
                                               int64_t n) {                                   \
        bias_add<T>(y, bias, residual, with_residual, per_image, with_per_image, channels,    \
                    hw, n);                                                                   \
    }

GROUP_NORM(float, f32)
GROUP_NORM(__half, f16)
GROUP_NORM(__nv_bfloat16, bf16)

// Softmax over the last dimension, one block of 128 threads per row, the row held in
// registers (ELEMS per thread): one read and one write of the scores, where a kernel that
// re-reads the row for its maximum, its sum and its output moves three times the data.
template <typename T, int ELEMS>
__device__ void softmax_rows(const T* __restrict__ x, T* __restrict__ y, int cols) {
    __shared__ float shared[32];
    const T* row = x + (int64_t)blockIdx.x * cols;
    T* out = y + (int64_t)blockIdx.x * cols;
    float v[ELEMS];
    float m = -INFINITY;
#pragma unroll
    for (int j = 0; j < ELEMS; j++) {
        int c = threadIdx.x + j * 128;
        v[j] = c < cols ? to_f(row[c]) : -INFINITY;
        m = fmaxf(m, v[j]);
    }
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, o));
    if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = m;
    __syncthreads();
    m = fmaxf(fmaxf(shared[0], shared[1]), fmaxf(shared[2], shared[3]));
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < ELEMS; j++) {
        v[j] = __expf(v[j] - m);
        sum += v[j];
    }
    sum = block_sum(sum, shared + 4);
    const float inv = 1.f / sum;
#pragma unroll
    for (int j = 0; j < ELEMS; j++) {
        int c = threadIdx.x + j * 128;
        if (c < cols) out[c] = from_f<T>(v[j] * inv);
    }
}

// GEGLU: `[rows, 2·inner]` → `[rows, inner]`, value · GELU(gate) with the exact (erf) GELU,
// reading the projection once instead of slicing it into two strided halves.
template <typename T>
__device__ void geglu(const T* __restrict__ x, T* __restrict__ y, int inner, int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t row = i / inner;
        const int col = (int)(i % inner);
        const float value = to_f(x[row * 2 * inner + col]);
        const float gate = to_f(x[row * 2 * inner + inner + col]);
        y[i] = from_f<T>(value * 0.5f * gate * (1.f + erff(gate * 0.70710678118654752f)));
    }
}

#define ROWS(T, NAME)                                                                        \
    extern "C" __global__ void softmax_1_##NAME(const T* x, T* y, int cols) {                \
        softmax_rows<T, 1>(x, y, cols);                                                      \
    }                                                                                        \
    extern "C" __global__ void softmax_8_##NAME(const T* x, T* y, int cols) {                \
        softmax_rows<T, 8>(x, y, cols);                                                      \
    }                                                                                        \
    extern "C" __global__ void softmax_32_##NAME(const T* x, T* y, int cols) {               \
        softmax_rows<T, 32>(x, y, cols);                                                     \
    }                                                                                        \
    extern "C" __global__ void softmax_64_##NAME(const T* x, T* y, int cols) {               \
        softmax_rows<T, 64>(x, y, cols);                                                     \
    }                                                                                        \
    extern "C" __global__ void geglu_##NAME(const T* x, T* y, int inner, int64_t n) {        \
        geglu<T>(x, y, inner, n);                                                            \
    }

ROWS(float, f32)
ROWS(__half, f16)
ROWS(__nv_bfloat16, bf16)
