// The engine's own kernels for the CUDA path: GroupNorm (+SiLU) and the convolution epilogue
// over channels-last maps, softmax, GEGLU, LayerNorm and flash attention. Statistics and
// arithmetic in f32 whatever the storage type. Compiled ahead of time to SASS for sm_80/86/89/90 (plus
// PTX for newer GPUs) by build.rs, so nothing is compiled when a worker starts.
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>
#include "tiles.cuh"

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

// Sum over the warp; every lane gets the result.
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

// Sum over the block; every thread gets the result. `shared` holds one float per warp.
__device__ __forceinline__ float block_sum(float v, float* shared) {
    v = warp_sum(v);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) / 32;
    v = lane < warps ? shared[lane] : 0.f;
    return warp_sum(v);
}

// GroupNorm (optionally followed by SiLU) and the convolution epilogue over channels-last
// maps `[b, hw, c]`, where a pixel's channels are contiguous.
// Threads walk channels (VEC at a time, one 16-byte access for 16-bit types when c is a
// multiple of 8), so a warp reads consecutive addresses.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
    T v[VEC];
};

// Statistics: blocks (split, image) take a slice of the image's pixels and add, for every
// group, the sums of x and x² (shared, then into `stats`, double, zeroed beforehand).
// A pixel's channels are `channels / VEC` vectors; the block's threads are as many lanes of
// that many threads as fit (six of 40 for 320 channels), each lane walking every `lanes`-th
// pixel of the slice with one vector of channels fixed per thread, so no thread idles while
// the channels are fewer than the threads. Wider pixels loop over their vectors instead.
template <typename T, int VEC>
__device__ void group_stats_last(const T* __restrict__ x, double* __restrict__ stats, int hw,
                                 int channels, int cpg, int groups) {
    extern __shared__ float acc[];  // 2·groups
    for (int i = threadIdx.x; i < 2 * groups; i += blockDim.x) acc[i] = 0.f;
    __syncthreads();
    const int b = blockIdx.y;
    const int chunk = (hw + gridDim.x - 1) / gridDim.x;
    const int p0 = blockIdx.x * chunk, p1 = min(p0 + chunk, hw);
    const T* xs = x + (int64_t)b * hw * channels;
    const int vecs = channels / VEC;
    const int lanes = max(1, (int)blockDim.x / vecs);
    const int lane = threadIdx.x / vecs;
    if (lane < lanes) {
        for (int c = (threadIdx.x % vecs) * VEC; c < channels;
             c += (vecs > (int)blockDim.x ? blockDim.x * VEC : channels)) {
            float sum[VEC], sq[VEC];
#pragma unroll
            for (int j = 0; j < VEC; j++) sum[j] = sq[j] = 0.f;
            for (int p = p0 + lane; p < p1; p += lanes) {
                const Pack<T, VEC> in =
                    *reinterpret_cast<const Pack<T, VEC>*>(xs + (int64_t)p * channels + c);
#pragma unroll
                for (int j = 0; j < VEC; j++) {
                    const float v = to_f(in.v[j]);
                    sum[j] += v;
                    sq[j] += v * v;
                }
            }
            // Channels of one group next to each other add up before the shared atomics.
            float gs = sum[0], gq = sq[0];
            int g = c / cpg;
#pragma unroll
            for (int j = 1; j < VEC; j++) {
                const int gj = (c + j) / cpg;
                if (gj != g) {
                    atomicAdd(&acc[2 * g], gs);
                    atomicAdd(&acc[2 * g + 1], gq);
                    g = gj;
                    gs = gq = 0.f;
                }
                gs += sum[j];
                gq += sq[j];
            }
            atomicAdd(&acc[2 * g], gs);
            atomicAdd(&acc[2 * g + 1], gq);
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < 2 * groups; i += blockDim.x)
        atomicAdd(&stats[2 * b * groups + i], (double)acc[i]);
}

// Apply: each block first turns the statistics into a scale and shift per channel of its
// image (shared), then walks the image's elements VEC at a time.
template <typename T, int VEC, bool SILU>
__device__ void group_apply_last(const T* __restrict__ x, const double* __restrict__ stats,
                                 const T* __restrict__ gamma, const T* __restrict__ beta,
                                 T* __restrict__ y, int hw, int channels, int cpg, int groups,
                                 float eps) {
    extern __shared__ float coef[];  // scale[channels], shift[channels]
    const int b = blockIdx.y;
    const double count = (double)cpg * hw;
    for (int c = threadIdx.x; c < channels; c += blockDim.x) {
        const int g = b * groups + c / cpg;
        const double mean = stats[2 * g] / count;
        const double var = fmax(stats[2 * g + 1] / count - mean * mean, 0.0);
        const float scale = rsqrtf((float)var + eps) * to_f(gamma[c]);
        coef[c] = scale;
        coef[channels + c] = to_f(beta[c]) - (float)mean * scale;
    }
    __syncthreads();
    const int n = hw * channels;
    const T* xs = x + (int64_t)b * n;
    T* ys = y + (int64_t)b * n;
    for (int i = (blockIdx.x * blockDim.x + threadIdx.x) * VEC; i < n;
         i += gridDim.x * blockDim.x * VEC) {
        const int c = i % channels;
        const Pack<T, VEC> in = *reinterpret_cast<const Pack<T, VEC>*>(xs + i);
        Pack<T, VEC> out;
#pragma unroll
        for (int j = 0; j < VEC; j++) {
            float v = to_f(in.v[j]) * coef[c + j] + coef[channels + c + j];
            if (SILU) v = v / (1.f + __expf(-v));
            out.v[j] = from_f<T>(v);
        }
        *reinterpret_cast<Pack<T, VEC>*>(ys + i) = out;
    }
}

// The convolution epilogue over a channels-last output `[b, hw, c]`, in place:
// y += bias[c] (+ per_image[b, c]) (+ residual); blocks (x, image).
template <typename T, int VEC>
__device__ void bias_add_last(T* __restrict__ y, const T* __restrict__ bias,
                              const T* __restrict__ residual, int with_residual,
                              const T* __restrict__ per_image, int with_per_image, int channels,
                              int hw) {
    const int b = blockIdx.y;
    const int n = hw * channels;
    T* ys = y + (int64_t)b * n;
    const T* rs = residual + (int64_t)b * n;
    const T* pis = per_image + (int64_t)b * channels;
    for (int i = (blockIdx.x * blockDim.x + threadIdx.x) * VEC; i < n;
         i += gridDim.x * blockDim.x * VEC) {
        const int c = i % channels;
        Pack<T, VEC> out = *reinterpret_cast<const Pack<T, VEC>*>(ys + i);
        const Pack<T, VEC> add = *reinterpret_cast<const Pack<T, VEC>*>(bias + c);
        Pack<T, VEC> res, pi;
        if (with_residual) res = *reinterpret_cast<const Pack<T, VEC>*>(rs + i);
        if (with_per_image) pi = *reinterpret_cast<const Pack<T, VEC>*>(pis + c);
#pragma unroll
        for (int j = 0; j < VEC; j++) {
            float v = to_f(out.v[j]) + to_f(add.v[j]);
            if (with_per_image) v += to_f(pi.v[j]);
            if (with_residual) v += to_f(res.v[j]);
            out.v[j] = from_f<T>(v);
        }
        *reinterpret_cast<Pack<T, VEC>*>(ys + i) = out;
    }
}

// Channels-last copies that candle would make element by element through a strided
// layout: VEC channels per access, one thread per output vector.
// Nearest-neighbour upsampling by two, `[b, h, w, c]` → `[b, 2h, 2w, c]`.
template <typename T, int VEC>
__device__ void upsample2x_last(const T* __restrict__ x, T* __restrict__ y, int h, int w,
                                int channels, int total) {
    const int vecs = channels / VEC;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        const int v = i % vecs;
        int t = i / vecs;
        const int ox = t % (2 * w);
        t /= 2 * w;
        const int oy = t % (2 * h);
        const int n = t / (2 * h);
        const int64_t from = (((int64_t)n * h + oy / 2) * w + ox / 2) * vecs + v;
        reinterpret_cast<Pack<T, VEC>*>(y)[i] = reinterpret_cast<const Pack<T, VEC>*>(x)[from];
    }
}

// `[rows, ca]` beside `[rows, cb]` → `[rows, ca + cb]`: the UNet's skip connections.
template <typename T, int VEC>
__device__ void concat_last(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y,
                            int ca, int cb, int total) {
    const int va = ca / VEC, vb = cb / VEC, vy = va + vb;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        const int row = i / vy, v = i % vy;
        reinterpret_cast<Pack<T, VEC>*>(y)[i] =
            v < va ? reinterpret_cast<const Pack<T, VEC>*>(a)[(int64_t)row * va + v]
                   : reinterpret_cast<const Pack<T, VEC>*>(b)[(int64_t)row * vb + v - va];
    }
}

// Entry points of the channels-last kernels above, VEC elements per access.
#define CHANNELS_LAST_VEC(T, NAME, VEC)                                                       \
    extern "C" __global__ void group_stats_last##VEC##_##NAME(                                \
        const T* x, double* stats, int hw, int channels, int cpg, int groups) {               \
        group_stats_last<T, VEC>(x, stats, hw, channels, cpg, groups);                        \
    }                                                                                         \
    extern "C" __global__ void group_apply_last##VEC##_##NAME(                                \
        const T* x, const double* stats, const T* gamma, const T* beta, T* y, int hw,         \
        int channels, int cpg, int groups, float eps) {                                       \
        group_apply_last<T, VEC, false>(x, stats, gamma, beta, y, hw, channels, cpg, groups,  \
                                        eps);                                                 \
    }                                                                                         \
    extern "C" __global__ void group_apply_silu_last##VEC##_##NAME(                           \
        const T* x, const double* stats, const T* gamma, const T* beta, T* y, int hw,         \
        int channels, int cpg, int groups, float eps) {                                       \
        group_apply_last<T, VEC, true>(x, stats, gamma, beta, y, hw, channels, cpg, groups,   \
                                       eps);                                                  \
    }                                                                                         \
    extern "C" __global__ void bias_add_last##VEC##_##NAME(                                   \
        T* y, const T* bias, const T* residual, int with_residual, const T* per_image,        \
        int with_per_image, int channels, int hw) {                                           \
        bias_add_last<T, VEC>(y, bias, residual, with_residual, per_image, with_per_image,    \
                              channels, hw);                                                  \
    }                                                                                         \
    extern "C" __global__ void upsample2x_last##VEC##_##NAME(const T* x, T* y, int h, int w,  \
                                                             int channels, int total) {       \
        upsample2x_last<T, VEC>(x, y, h, w, channels, total);                                 \
    }                                                                                         \
    extern "C" __global__ void concat_last##VEC##_##NAME(const T* a, const T* b, T* y, int ca, \
                                                         int cb, int total) {                 \
        concat_last<T, VEC>(a, b, y, ca, cb, total);                                          \
    }
#define CHANNELS_LAST(T, NAME)     \
    CHANNELS_LAST_VEC(T, NAME, 1)  \
    CHANNELS_LAST_VEC(T, NAME, 8)

CHANNELS_LAST(float, f32)
CHANNELS_LAST(__half, f16)
CHANNELS_LAST(__nv_bfloat16, bf16)

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
    // 8 at a time (16-byte accesses) where widths and addresses allow.
    if (sizeof(T) == 2 && inner % 8 == 0 && (uintptr_t)x % 16 == 0 && (uintptr_t)y % 16 == 0) {
        const int chunks = inner / 8;
        for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n / 8;
             i += (int64_t)gridDim.x * blockDim.x) {
            const int64_t row = i / chunks;
            const int col = (int)(i % chunks) * 8;
            const T* in = x + row * 2 * inner + col;
            const Pack<T, 8> value = *reinterpret_cast<const Pack<T, 8>*>(in);
            const Pack<T, 8> gate = *reinterpret_cast<const Pack<T, 8>*>(in + inner);
            Pack<T, 8> out;
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const float g = to_f(gate.v[j]);
                out.v[j] = from_f<T>(to_f(value.v[j]) * 0.5f * g *
                                     (1.f + erff(g * 0.70710678118654752f)));
            }
            *reinterpret_cast<Pack<T, 8>*>(y + row * inner + col) = out;
        }
        return;
    }
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t row = i / inner;
        const int col = (int)(i % inner);
        const float value = to_f(x[row * 2 * inner + col]);
        const float gate = to_f(x[row * 2 * inner + inner + col]);
        y[i] = from_f<T>(value * 0.5f * gate * (1.f + erff(gate * 0.70710678118654752f)));
    }
}

// LayerNorm over the last dimension (up to 2048, a multiple of 8): one warp per row, the
// row in registers, mean and variance from it exactly (two passes over registers, not
// E[x²] − E[x]²), 16-byte loads and stores.
constexpr int LN_CHUNKS = 8;
template <typename T>
__device__ void layer_norm_rows(const T* __restrict__ x, const T* __restrict__ gamma,
                                const T* __restrict__ beta, T* __restrict__ y, int cols,
                                int64_t rows, float eps) {
    const int warps = blockDim.x / 32, lane = threadIdx.x % 32;
    for (int64_t row = (int64_t)blockIdx.x * warps + threadIdx.x / 32; row < rows;
         row += (int64_t)gridDim.x * warps) {
        const T* xr = x + row * cols;
        T* yr = y + row * cols;
        float v[LN_CHUNKS][8];
        float sum = 0.f;
#pragma unroll
        for (int k = 0; k < LN_CHUNKS; k++) {
            const int c = (k * 32 + lane) * 8;
            if (c < cols) {
                const Pack<T, 8> in = *reinterpret_cast<const Pack<T, 8>*>(xr + c);
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    v[k][j] = to_f(in.v[j]);
                    sum += v[k][j];
                }
            }
        }
        const float mean = warp_sum(sum) / cols;
        float sq = 0.f;
#pragma unroll
        for (int k = 0; k < LN_CHUNKS; k++) {
            if ((k * 32 + lane) * 8 < cols) {
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    const float d = v[k][j] - mean;
                    sq += d * d;
                }
            }
        }
        const float rstd = rsqrtf(warp_sum(sq) / cols + eps);
#pragma unroll
        for (int k = 0; k < LN_CHUNKS; k++) {
            const int c = (k * 32 + lane) * 8;
            if (c < cols) {
                const Pack<T, 8> g = *reinterpret_cast<const Pack<T, 8>*>(gamma + c);
                const Pack<T, 8> b = *reinterpret_cast<const Pack<T, 8>*>(beta + c);
                Pack<T, 8> out;
#pragma unroll
                for (int j = 0; j < 8; j++)
                    out.v[j] = from_f<T>((v[k][j] - mean) * rstd * to_f(g.v[j]) + to_f(b.v[j]));
                *reinterpret_cast<Pack<T, 8>*>(yr + c) = out;
            }
        }
    }
}

#define ROWS(T, NAME)                                                                        \
    extern "C" __global__ void layer_norm_##NAME(const T* x, const T* gamma, const T* beta,  \
                                                 T* y, int cols, int64_t rows, float eps) {  \
        layer_norm_rows<T>(x, gamma, beta, y, cols, rows, eps);                              \
    }                                                                                        \
    ROWS_REST(T, NAME)
#define ROWS_REST(T, NAME)                                                                        \
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

// Attention without the score matrix (the flash-attention scheme): per (image, head), a
// block of 4 warps takes 64 queries (16 per warp) and walks the keys 64 at a time, keeping a
// running maximum, sum and output per query, so the n×m scores never reach global memory.
// The products run on tensor cores through `mma.sync` m16n8k16 with f32 accumulation; the
// scores, probabilities and output stay in registers (the accumulator of Q·Kᵀ is reused as
// the A operand of P·V). K and V tiles arrive by `cp.async` one tile ahead (two stages of
// shared memory) up to heads 128 wide, so the loads of the next keys overlap this tile's
// products; wider heads, whose two stages would not fit beside Q on every GPU, load V while
// Q·Kᵀ runs.
//
// q: [b, n, heads·d], k and v: [b, m, heads·d] with the given batch and row strides (d
// contiguous, head h at column h·d; d a multiple of 8, rows 16-byte aligned); out: [b, n,
// heads·d] contiguous. DP is d rounded up to a multiple of 16; the padding is zero.
constexpr int FA_BK = 64;

// ONES (heads narrower than DP): V's first padding column holds ones, so P·V also yields
// each row's sum of the very probabilities it weighs (f32 accumulation on tensor cores), and
// the softmax needs no additions of its own; the probabilities come from `exp2_pair`.
template <typename T, int DP, int RT, bool ONES>
__device__ void flash_attention(const T* __restrict__ q, const T* __restrict__ k,
                                const T* __restrict__ v, T* __restrict__ out, int heads, int n,
                                int m, int d, int64_t q_batch, int64_t q_row, int64_t kv_batch,
                                int64_t kv_row, float scale_log2) {
    constexpr int LD = DP + 8;  // shared row length: rows land on distinct banks for ldmatrix
    constexpr int KT = DP / 16, NT = DP / 8, CH = DP / 8, BQ = 64 * RT;
    constexpr int STAGES = DP <= 128 ? 2 : 1;
    extern __shared__ __align__(128) unsigned char smem[];
    T* Qs = reinterpret_cast<T*>(smem);
    // Stage s: K tile at Qs + BQ·LD + 2s·FA_BK·LD, its V tile right after.
    auto k_tile = [&](int stage) { return Qs + (BQ + 2 * stage * FA_BK) * LD; };
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int b = blockIdx.y / heads, h = blockIdx.y % heads;
    const int q0 = blockIdx.x * BQ;
    const T* qb = q + b * q_batch + (int64_t)h * d;
    const T* kb = k + b * kv_batch + (int64_t)h * d;
    const T* vb = v + b * kv_batch + (int64_t)h * d;

    // `keep_padding`: leave the columns from d on as they are (V's ones and zeros, written
    // once below) rather than zeroing them.
    auto load_tile = [&](T* dst, const T* src, int rows, int first, int count, int64_t row,
                         bool keep_padding = false) {
        for (int idx = threadIdx.x; idx < rows * CH; idx += blockDim.x) {
            const int r = idx / CH, c = (idx % CH) * 8, i = first + r;
            if (keep_padding && c >= d) continue;
            const bool inside = i < count && c < d;
            cp_async16(dst + r * LD + c, inside ? src + (int64_t)i * row + c : src, inside);
        }
    };
    if (ONES) {
        for (int idx = threadIdx.x; idx < STAGES * FA_BK * (DP - d) / 8; idx += blockDim.x) {
            const int per_row = (DP - d) / 8;
            const int r = idx / per_row, c = d + (idx % per_row) * 8;
            Pack<T, 8> pad;
#pragma unroll
            for (int j = 0; j < 8; j++) pad.v[j] = from_f<T>(c == d && j == 0 ? 1.f : 0.f);
            T* vs = k_tile(r / FA_BK) + FA_BK * LD + (r % FA_BK) * LD;
            *reinterpret_cast<Pack<T, 8>*>(vs + c) = pad;
        }
    }
    load_tile(Qs, qb, BQ, q0, n, q_row);
    if (STAGES == 2) {
        load_tile(k_tile(0), kb, FA_BK, 0, m, kv_row);
        load_tile(k_tile(0) + FA_BK * LD, vb, FA_BK, 0, m, kv_row, ONES);
    }
    cp_async_commit();

    // Each warp takes RT tiles of 16 queries, which share every K and V fragment it loads.
    uint32_t qf[RT][KT][4];
    float o[RT][NT][4];
#pragma unroll
    for (int r = 0; r < RT; r++)
#pragma unroll
        for (int t = 0; t < NT; t++) o[r][t][0] = o[r][t][1] = o[r][t][2] = o[r][t][3] = 0.f;
    // Each lane holds two rows of each tile: `lane / 4` and `lane / 4 + 8`.
    float row_max[RT][2], row_sum[RT][2];
#pragma unroll
    for (int r = 0; r < RT; r++) {
        row_max[r][0] = row_max[r][1] = -INFINITY;
        row_sum[r][0] = row_sum[r][1] = 0.f;
    }

    for (int k0 = 0, tile = 0; k0 < m; k0 += FA_BK, tile++) {
        T* Ks = k_tile(STAGES == 2 ? tile % 2 : 0);
        T* Vs = Ks + FA_BK * LD;
        __syncthreads();  // every warp is done with the tiles about to be overwritten
        if (STAGES == 2) {
            if (k0 + FA_BK < m) {
                T* next = k_tile((tile + 1) % 2);
                load_tile(next, kb, FA_BK, k0 + FA_BK, m, kv_row);
                load_tile(next + FA_BK * LD, vb, FA_BK, k0 + FA_BK, m, kv_row, ONES);
            }
            cp_async_commit();   // perhaps empty: the groups stay one per tile
            cp_async_wait<1>();  // everything but the next tile is in
        } else {
            load_tile(Ks, kb, FA_BK, k0, m, kv_row);
            cp_async_commit();
            load_tile(Vs, vb, FA_BK, k0, m, kv_row, ONES);
            cp_async_commit();
            cp_async_wait<1>();  // Q (first round) and K are in; V may still be on its way
        }
        __syncthreads();
        if (k0 == 0) {
#pragma unroll
            for (int r = 0; r < RT; r++)
#pragma unroll
                for (int kk = 0; kk < KT; kk++)
                    ldsm_x4(qf[r][kk], Qs + ((warp * RT + r) * 16 + lane % 16) * LD + kk * 16 +
                                           (lane / 16) * 8);
        }

        // S = Q·Kᵀ: 16 queries × 64 keys per tile, eight n8 tiles.
        float s[RT][8][4];
#pragma unroll
        for (int r = 0; r < RT; r++)
#pragma unroll
            for (int j = 0; j < 8; j++) s[r][j][0] = s[r][j][1] = s[r][j][2] = s[r][j][3] = 0.f;
#pragma unroll
        for (int j = 0; j < 8; j += 2) {
#pragma unroll
            for (int kk = 0; kk < KT; kk++) {
                uint32_t kf[4];
                ldsm_x4(kf, Ks + (j * 8 + lane % 8 + (lane / 16) * 8) * LD + kk * 16 +
                                ((lane / 8) % 2) * 8);
#pragma unroll
                for (int r = 0; r < RT; r++) {
                    Mma<T>::run(s[r][j], qf[r][kk], kf);
                    Mma<T>::run(s[r][j + 1], qf[r][kk], kf + 2);
                }
            }
        }
        if (k0 + FA_BK > m) {
#pragma unroll
            for (int r = 0; r < RT; r++)
#pragma unroll
                for (int j = 0; j < 8; j++)
#pragma unroll
                    for (int e = 0; e < 4; e++)
                        if (k0 + j * 8 + (lane % 4) * 2 + (e % 2) >= m) s[r][j][e] = -INFINITY;
        }

        // Online softmax over this tile, rows reduced across the 4 lanes that share them.
        // The probabilities end packed in pairs, as P·V takes them: p[r][j][hr].
        uint32_t p[RT][8][2];
#pragma unroll
        for (int r = 0; r < RT; r++) {
#pragma unroll
            for (int hr = 0; hr < 2; hr++) {
                float mx = row_max[r][hr];
#pragma unroll
                for (int j = 0; j < 8; j++)
                    mx = fmaxf(mx, fmaxf(s[r][j][2 * hr], s[r][j][2 * hr + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
                const float shift = mx * scale_log2;
                const float alpha = exp2f(row_max[r][hr] * scale_log2 - shift);
                row_max[r][hr] = mx;
                if (ONES) {
#pragma unroll
                    for (int j = 0; j < 8; j++)
                        p[r][j][hr] = exp2_pair<T>(s[r][j][2 * hr] * scale_log2 - shift,
                                                   s[r][j][2 * hr + 1] * scale_log2 - shift);
                } else {
                    float sum = 0.f;
#pragma unroll
                    for (int j = 0; j < 8; j++) {
                        const float e0 = exp2f(s[r][j][2 * hr] * scale_log2 - shift);
                        const float e1 = exp2f(s[r][j][2 * hr + 1] * scale_log2 - shift);
                        sum += e0 + e1;
                        p[r][j][hr] = Mma<T>::pack(e0, e1);
                    }
                    row_sum[r][hr] = row_sum[r][hr] * alpha + sum;
                }
#pragma unroll
                for (int t = 0; t < NT; t++) {
                    o[r][t][2 * hr] *= alpha;
                    o[r][t][2 * hr + 1] *= alpha;
                }
            }
        }

        if (STAGES == 1) {
            cp_async_wait<0>();
            __syncthreads();
        }
        // O += P·V: the probabilities of two adjacent key tiles are one A fragment.
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            uint32_t pa[RT][4];
#pragma unroll
            for (int r = 0; r < RT; r++) {
                pa[r][0] = p[r][2 * kk][0];
                pa[r][1] = p[r][2 * kk][1];
                pa[r][2] = p[r][2 * kk + 1][0];
                pa[r][3] = p[r][2 * kk + 1][1];
            }
#pragma unroll
            for (int t = 0; t < NT; t += 2) {
                uint32_t vf[4];
                ldsm_x4_trans(vf, Vs + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * LD + t * 8 +
                                      (lane / 16) * 8);
#pragma unroll
                for (int r = 0; r < RT; r++) {
                    Mma<T>::run(o[r][t], pa[r], vf);
                    Mma<T>::run(o[r][t + 1], pa[r], vf + 2);
                }
            }
        }
    }

#pragma unroll
    for (int r = 0; r < RT; r++) {
#pragma unroll
        for (int hr = 0; hr < 2; hr++) {
            float total = row_sum[r][hr];
            if (ONES) {
                // Column d of the output, held by the first lane of each four.
#pragma unroll
                for (int t = 0; t < NT; t++)
                    if (t * 8 == d) total = o[r][t][2 * hr];
                total = __shfl_sync(0xffffffff, total, lane & ~3);
            } else {
                total += __shfl_xor_sync(0xffffffff, total, 1);
                total += __shfl_xor_sync(0xffffffff, total, 2);
            }
            const int i = q0 + (warp * RT + r) * 16 + lane / 4 + 8 * hr;
            if (i >= n) continue;
            const float inv = 1.f / total;
            T* row = out + ((int64_t)b * n + i) * heads * d + (int64_t)h * d;
#pragma unroll
            for (int t = 0; t < NT; t++) {
                const int c = t * 8 + (lane % 4) * 2;
                if (c < d)
                    *reinterpret_cast<uint32_t*>(row + c) =
                        Mma<T>::pack(o[r][t][2 * hr] * inv, o[r][t][2 * hr + 1] * inv);
            }
        }
    }
}

// RT = 2 (two 16-query tiles per warp, 128 queries per block) only where the registers
// allow it: heads up to 64 wide. BLOCKS: the blocks per SM the registers must leave room
// for (three for SD 1.5's 40-wide heads fit in 168 registers without spilling; 64-wide
// heads would spill). The `p` kernels are the ONES form, for heads narrower than DP.
#define FLASH(T, NAME, DP, RT, BLOCKS, ONES, SUFFIX)                                          \
    extern "C" __global__ void __launch_bounds__(128, BLOCKS)                                 \
        flash_attention_##DP##x##RT##SUFFIX##_##NAME(                                         \
            const T* q, const T* k, const T* v, T* out, int heads, int n, int m, int d,       \
            int64_t q_batch, int64_t q_row, int64_t kv_batch, int64_t kv_row,                 \
            float scale_log2) {                                                               \
        flash_attention<T, DP, RT, ONES>(q, k, v, out, heads, n, m, d, q_batch, q_row,        \
                                         kv_batch, kv_row, scale_log2);                       \
    }
#define FLASH_ALL(T, NAME)                   \
    FLASH(T, NAME, 48, 1, 1, false, )        \
    FLASH(T, NAME, 48, 2, 2, false, )        \
    FLASH(T, NAME, 48, 2, 3, true, p)        \
    FLASH(T, NAME, 64, 1, 1, false, )        \
    FLASH(T, NAME, 64, 2, 1, false, )        \
    FLASH(T, NAME, 80, 1, 1, false, )        \
    FLASH(T, NAME, 128, 1, 1, false, )       \
    FLASH(T, NAME, 160, 1, 1, false, )
FLASH_ALL(__half, f16)
FLASH_ALL(__nv_bfloat16, bf16)
