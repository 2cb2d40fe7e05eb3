// Fused kernels for the CUDA path: GroupNorm (optionally followed by SiLU) and a per-channel
// bias add with an optional residual, over contiguous NCHW tensors. Statistics and arithmetic
// in f32 whatever the storage type. Compiled ahead of time to SASS for sm_80/86/89/90 (plus
// PTX for newer GPUs) by build.rs, so nothing is compiled when a worker starts.
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>
#include <mma.h>

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
// by its channel's weight and bias, then SiLU when asked. Blocks (x, plane) cover one
// channel plane at a time (plane = image·channels + channel), so the channel, the group and the
// group's mean and deviation are computed once per thread, not per element.
template <typename T, bool SILU>
__device__ void group_apply(const T* __restrict__ x, const double* __restrict__ stats,
                            const T* __restrict__ gamma, const T* __restrict__ beta,
                            T* __restrict__ y, int channels, int hw, int cpg, int64_t n,
                            float eps) {
    const int64_t planes = n / hw;
    for (int64_t plane = blockIdx.y; plane < planes; plane += gridDim.y) {
        const int c = (int)(plane % channels);
        const int64_t g = plane / cpg;
        const double count = (double)cpg * hw;
        const double mean = stats[2 * g] / count;
        const double var = fmax(stats[2 * g + 1] / count - mean * mean, 0.0);
        const float rstd = rsqrtf((float)var + eps);
        const float scale = rstd * to_f(gamma[c]);
        const float shift = to_f(beta[c]) - (float)mean * scale;
        const T* xs = x + plane * hw;
        T* ys = y + plane * hw;
        for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < hw; i += gridDim.x * blockDim.x) {
            float v = to_f(xs[i]) * scale + shift;
            if (SILU) v = v / (1.f + __expf(-v));
            ys[i] = from_f<T>(v);
        }
    }
}

// The epilogue of a convolution, in place: y += bias[c] (+ per_image[n, c]) (+ residual),
// blocks (x, plane) over one channel plane each.
template <typename T>
__device__ void bias_add(T* __restrict__ y, const T* __restrict__ bias,
                         const T* __restrict__ residual, int with_residual,
                         const T* __restrict__ per_image, int with_per_image, int channels,
                         int hw, int64_t n) {
    const int64_t planes = n / hw;
    for (int64_t plane = blockIdx.y; plane < planes; plane += gridDim.y) {
        float add = to_f(bias[plane % channels]);
        if (with_per_image) add += to_f(per_image[plane]);
        T* ys = y + plane * hw;
        const T* rs = residual + plane * hw;
        for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < hw; i += gridDim.x * blockDim.x) {
            float v = to_f(ys[i]) + add;
            if (with_residual) v += to_f(rs[i]);
            ys[i] = from_f<T>(v);
        }
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

// Attention without the score matrix (the flash-attention scheme): per (image, head), a
// block of 4 warps takes 64 queries, walks the keys 64 at a time, and keeps a running
// maximum, sum and output per query, so the n×m scores never reach global memory. The
// products run on tensor cores (WMMA, f32 accumulation); the softmax in f32.
//
// q: [b, n, heads·d], k and v: [b, m, heads·d] with the given batch and row strides (d
// contiguous, head h at column h·d); out: [b, n, heads·d] contiguous. DP is d rounded up to
// a multiple of 16; the padding is zero.
constexpr int FA_BQ = 64, FA_BK = 64, FA_WARPS = 4;

template <int DP, typename T>
struct FaLayout {
    static constexpr int LD = DP + 8;          // shared row length of Q, K, V (halves)
    static constexpr int PLD = FA_BK + 8;      // shared row length of P
    static constexpr int SCR = 16 * (DP > FA_BK ? DP : FA_BK);
    static constexpr int WARP_FLOATS = SCR + 16 * DP + 32 + 16 * PLD * (int)sizeof(T) / 4;
    static constexpr int BYTES = 3 * 64 * LD * (int)sizeof(T) + FA_WARPS * WARP_FLOATS * 4;
};

template <typename T, int DP>
__device__ void flash_attention(const T* __restrict__ q, const T* __restrict__ k,
                                const T* __restrict__ v, T* __restrict__ out, int heads, int n,
                                int m, int d, int64_t q_batch, int64_t q_row, int64_t kv_batch,
                                int64_t kv_row, float scale) {
    using namespace nvcuda;
    using L = FaLayout<DP, T>;
    constexpr int LD = L::LD, PLD = L::PLD;
    extern __shared__ __align__(128) unsigned char smem[];
    T* Qs = reinterpret_cast<T*>(smem);
    T* Ks = Qs + FA_BQ * LD;
    T* Vs = Ks + FA_BK * LD;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float* S = reinterpret_cast<float*>(Vs + FA_BK * LD) + warp * L::WARP_FLOATS;
    float* O = S + L::SCR;
    float* row_m = O + 16 * DP;
    float* row_l = row_m + 16;
    T* P = reinterpret_cast<T*>(row_l + 16);

    const int b = blockIdx.y / heads, h = blockIdx.y % heads;
    const int q0 = blockIdx.x * FA_BQ;
    const T* qb = q + b * q_batch + (int64_t)h * d;
    const T* kb = k + b * kv_batch + (int64_t)h * d;
    const T* vb = v + b * kv_batch + (int64_t)h * d;
    const T zero = from_f<T>(0.f);

    // Rows are moved 16 bytes at a time when a head's width allows (d a multiple of 8).
    const bool wide = d % 8 == 0;
    auto load_tile = [&](T* dst, const T* src, int first, int count, int64_t row) {
        if (wide) {
            constexpr int CH = DP / 8;
            const int dch = d / 8;
            for (int idx = threadIdx.x; idx < 64 * CH; idx += blockDim.x) {
                int r = idx / CH, c = idx % CH, i = first + r;
                uint4 val = make_uint4(0, 0, 0, 0);
                if (i < count && c < dch)
                    val = *reinterpret_cast<const uint4*>(src + (int64_t)i * row + c * 8);
                *reinterpret_cast<uint4*>(dst + r * LD + c * 8) = val;
            }
        } else {
            for (int idx = threadIdx.x; idx < 64 * DP; idx += blockDim.x) {
                int r = idx / DP, c = idx % DP, i = first + r;
                dst[r * LD + c] = (i < count && c < d) ? src[(int64_t)i * row + c] : zero;
            }
        }
    };
    load_tile(Qs, qb, q0, n, q_row);
    for (int idx = lane; idx < 16 * DP; idx += 32) O[idx] = 0.f;
    if (lane < 16) {
        row_m[lane] = -INFINITY;
        row_l[lane] = 0.f;
    }

    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> qf[DP / 16];
    for (int k0 = 0; k0 < m; k0 += FA_BK) {
        __syncthreads();
        load_tile(Ks, kb, k0, m, kv_row);
        load_tile(Vs, vb, k0, m, kv_row);
        __syncthreads();
        if (k0 == 0) {
            // This warp's queries stay in registers for the whole walk over the keys.
#pragma unroll
            for (int kk = 0; kk < DP / 16; kk++)
                wmma::load_matrix_sync(qf[kk], Qs + warp * 16 * LD + kk * 16, LD);
        }

        // S = Q·Kᵀ for this warp's 16 queries and the tile's 64 keys.
#pragma unroll
        for (int nn = 0; nn < FA_BK / 16; nn++) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.f);
#pragma unroll
            for (int kk = 0; kk < DP / 16; kk++) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bt;
                wmma::load_matrix_sync(bt, Ks + nn * 16 * LD + kk * 16, LD);
                wmma::mma_sync(acc, qf[kk], bt, acc);
            }
            wmma::store_matrix_sync(S + nn * 16, acc, FA_BK, wmma::mem_row_major);
        }
        __syncwarp();

        // Online softmax: each lane owns keys `lane` and `lane + 32` of every row, so the
        // warp reads and writes shared memory without bank conflicts.
        {
            const bool in0 = k0 + lane < m, in1 = k0 + lane + 32 < m;
            for (int r = 0; r < 16; r++) {
                const float s0 = in0 ? S[r * FA_BK + lane] * scale : -INFINITY;
                const float s1 = in1 ? S[r * FA_BK + lane + 32] * scale : -INFINITY;
                float mx = fmaxf(s0, s1);
                for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, o));
                const float m_old = row_m[r];
                const float m_new = fmaxf(m_old, mx);
                const float p0 = __expf(s0 - m_new), p1 = __expf(s1 - m_new);
                P[r * PLD + lane] = from_f<T>(p0);
                P[r * PLD + lane + 32] = from_f<T>(p1);
                float sum = p0 + p1;
                for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
                const float alpha = __expf(m_old - m_new);
                if (lane == 0) {
                    row_m[r] = m_new;
                    row_l[r] = row_l[r] * alpha + sum;
                }
                for (int c = lane; c < DP; c += 32) O[r * DP + c] *= alpha;
            }
        }
        __syncwarp();

        // O += P·V, through the scratch tile.
#pragma unroll
        for (int nn = 0; nn < DP / 16; nn++) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.f);
#pragma unroll
            for (int kk = 0; kk < FA_BK; kk += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bv;
                wmma::load_matrix_sync(a, P + kk, PLD);
                wmma::load_matrix_sync(bv, Vs + kk * LD + nn * 16, LD);
                wmma::mma_sync(acc, a, bv, acc);
            }
            wmma::store_matrix_sync(S + nn * 16, acc, DP, wmma::mem_row_major);
        }
        __syncwarp();
        for (int idx = lane; idx < 16 * DP; idx += 32) O[idx] += S[idx];
        __syncwarp();
    }

    for (int idx = lane; idx < 16 * d; idx += 32) {
        int r = idx / d, c = idx % d, i = q0 + warp * 16 + r;
        if (i < n)
            out[((int64_t)b * n + i) * heads * d + (int64_t)h * d + c] =
                from_f<T>(O[r * DP + c] / row_l[r]);
    }
}

#define FLASH(T, NAME, DP)                                                                   \
    extern "C" __global__ void __launch_bounds__(128)                                        \
        flash_attention_##DP##_##NAME(const T* q, const T* k, const T* v, T* out, int heads, \
                                      int n, int m, int d, int64_t q_batch, int64_t q_row,   \
                                      int64_t kv_batch, int64_t kv_row, float scale) {       \
        flash_attention<T, DP>(q, k, v, out, heads, n, m, d, q_batch, q_row, kv_batch,       \
                               kv_row, scale);                                               \
    }
#define FLASH_ALL(T, NAME) \
    FLASH(T, NAME, 48)     \
    FLASH(T, NAME, 64)     \
    FLASH(T, NAME, 80)     \
    FLASH(T, NAME, 128)    \
    FLASH(T, NAME, 160)
FLASH_ALL(__half, f16)
FLASH_ALL(__nv_bfloat16, bf16)

// The epilogue of a linear layer: y = x + bias[column] (+ residual), x `[rows, cols]`.
template <typename T>
__device__ void rows_epilogue(const T* __restrict__ x, const T* __restrict__ bias,
                              const T* __restrict__ residual, int with_residual,
                              T* __restrict__ y, int cols, int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        float v = to_f(x[i]) + to_f(bias[i % cols]);
        if (with_residual) v += to_f(residual[i]);
        y[i] = from_f<T>(v);
    }
}

#define EPILOGUE(T, NAME)                                                                     \
    extern "C" __global__ void rows_epilogue_##NAME(const T* x, const T* bias,               \
                                                    const T* residual, int with_residual,    \
                                                    T* y, int cols, int64_t n) {              \
        rows_epilogue<T>(x, bias, residual, with_residual, y, cols, n);                       \
    }
EPILOGUE(float, f32)
EPILOGUE(__half, f16)
EPILOGUE(__nv_bfloat16, bf16)
