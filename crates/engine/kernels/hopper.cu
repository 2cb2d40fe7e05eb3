// Flash attention on Hopper's warpgroup matrix instructions (`wgmma`, sm_90a): the engine's
// attention for heads up to 64 wide on H100/H200, where `mma.sync` (kernels/fused.cu) leaves
// the tensor cores half idle. Compiled by build.rs for sm_90a only; loaded on such GPUs only.
//
// A block is two warpgroups, each with 64 queries of one (image, head); K and V come through
// shared memory 64 keys at a time, two stages deep (`cp.async`). Per key tile a warpgroup
// runs S = Q·Kᵀ with both operands in shared memory, the online softmax on S in registers,
// then O += P·V with P straight from registers and V in shared memory.
//
// Shared-memory tiles are laid out as wgmma reads them without swizzling: core matrices of
// 8 rows × 16 bytes, 128 contiguous bytes each; the core matrices of one row block are
// adjacent (128 bytes apart), row blocks `CH · 128` bytes apart. For Q and K the 16 bytes
// run along the head (the K dimension of Q·Kᵀ); V, laid out the same, is the B operand of
// P·V read transposed (its 16 bytes run along N).
#include "tiles.cuh"

struct F16Tag {};
struct Bf16Tag {};
template <typename T> struct Tag;
template <> struct Tag<__half> { using type = F16Tag; };
template <> struct Tag<__nv_bfloat16> { using type = Bf16Tag; };

// D (64 × N per warpgroup, f32, 4 per thread and n8 block, as `mma.sync`'s C fragments per
// warp) = A·B (+ D when `acc`). `ss`: A and B from shared memory by descriptor; `rs`: A from
// registers (the `mma.sync` A fragment of each warp's 16 rows), B transposed.
#define D8(i)                                                                             \
    "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
        "+f"(d[i + 6]), "+f"(d[i + 7])
#define R24 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23"
#define R32 R24 ", %24, %25, %26, %27, %28, %29, %30, %31"
#define WGMMA_OPS(TAG, TY)                                                                     \
    __device__ __forceinline__ void wgmma_ss64(float* d, uint64_t a, uint64_t b, int acc, TAG) { \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                               \
                     "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " {" R32          \
                     "}, %32, %33, p, 1, 1, 0, 0;\n}\n"                                        \
                     : D8(0), D8(8), D8(16), D8(24)                                            \
                     : "l"(a), "l"(b), "r"(acc));                                              \
    }                                                                                          \
    __device__ __forceinline__ void wgmma_rs48(float* d, const uint32_t* a, uint64_t b, TAG) {  \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                                 \
                     "wgmma.mma_async.sync.aligned.m64n48k16.f32." TY "." TY " {" R24          \
                     "}, {%24, %25, %26, %27}, %28, p, 1, 1, 1;\n}\n"                          \
                     : D8(0), D8(8), D8(16)                                                    \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));                    \
    }                                                                                          \
    __device__ __forceinline__ void wgmma_rs64(float* d, const uint32_t* a, uint64_t b, TAG) {  \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                                 \
                     "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " {" R32          \
                     "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                          \
                     : D8(0), D8(8), D8(16), D8(24)                                            \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));                    \
    }
WGMMA_OPS(F16Tag, "f16")
WGMMA_OPS(Bf16Tag, "bf16")

// Descriptor of a shared-memory operand without swizzling: `lead` bytes between core
// matrices adjacent along K, `stride` bytes between those adjacent along M or N.
__device__ __forceinline__ uint64_t smem_desc(const void* p, uint32_t lead, uint32_t stride) {
    const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
    return (uint64_t)((a >> 4) & 0x3FFF) | ((uint64_t)((lead >> 4) & 0x3FFF) << 16) |
           ((uint64_t)((stride >> 4) & 0x3FFF) << 32);
}

// The compiler must not move reads or writes of accumulators across the asynchronous
// products that own them.
template <int N> __device__ __forceinline__ void pin(float* r) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(r[i])::"memory");
}
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_commit_wait() {
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
}

constexpr int WG_Q = 64;      // queries per warpgroup
constexpr int WG_K = 64;      // keys per tile
constexpr int WG_GROUPS = 2;  // warpgroups per block

// q: [b, n, heads·d], k and v: [b, m, heads·d] with the given batch and row strides (d
// contiguous, head h at column h·d, d a multiple of 8, rows 16-byte aligned); out: [b, n,
// heads·d] contiguous. DP: d rounded up to 48 or 64; the padding is zero. SWAP reads V's
// descriptor with the roles of its two strides exchanged (a check of the layout's reading).
template <typename T, int DP, bool SWAP>
__device__ void flash_attention_wg(const T* __restrict__ q, const T* __restrict__ k,
                                   const T* __restrict__ v, T* __restrict__ out, int heads,
                                   int n, int m, int d, int64_t q_batch, int64_t q_row,
                                   int64_t kv_batch, int64_t kv_row, float scale_log2) {
    using Ty = typename Tag<T>::type;
    constexpr int BQ = WG_Q * WG_GROUPS, CH = DP / 8, ROWS = CH * 128;
    constexpr int TILE = WG_K * DP * 2;  // bytes of one K or V tile
    extern __shared__ __align__(128) unsigned char smem[];
    unsigned char* qs = smem;
    auto k_tile = [&](int stage) { return smem + BQ * DP * 2 + stage * 2 * TILE; };
    const int tid = threadIdx.x, group = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
    const int b = blockIdx.y / heads, h = blockIdx.y % heads;
    const int q0 = blockIdx.x * BQ;
    const T* qb = q + b * q_batch + (int64_t)h * d;
    const T* kb = k + b * kv_batch + (int64_t)h * d;
    const T* vb = v + b * kv_batch + (int64_t)h * d;

    // Eight threads take eight consecutive rows of one 16-byte column: each eight write one
    // core matrix (128 contiguous bytes), each warp reads whole 32-byte sectors.
    auto load_tile = [&](unsigned char* dst, const T* src, int rows, int first, int count,
                         int64_t row) {
        for (int u = tid; u < rows * CH; u += blockDim.x) {
            const int g = u / 8, r = (g / CH) * 8 + u % 8, c = g % CH, i = first + r;
            const bool inside = i < count && c * 8 < d;
            cp_async16(dst + (r / 8) * ROWS + c * 128 + (r % 8) * 16,
                       inside ? src + (int64_t)i * row + c * 8 : src, inside);
        }
    };
    load_tile(qs, qb, BQ, q0, n, q_row);
    load_tile(k_tile(0), kb, WG_K, 0, m, kv_row);
    load_tile(k_tile(0) + TILE, vb, WG_K, 0, m, kv_row);
    cp_async_commit();

    float o[DP / 2];
#pragma unroll
    for (int i = 0; i < DP / 2; i++) o[i] = 0.f;
    // Each thread holds two rows of its warp's 16: `lane / 4` and `lane / 4 + 8`.
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
    const unsigned char* my_q = qs + group * (WG_Q / 8) * ROWS;
    const uint32_t v_lead = SWAP ? 128 : ROWS, v_stride = SWAP ? ROWS : 128;

    for (int k0 = 0, tile = 0; k0 < m; k0 += WG_K, tile++) {
        const unsigned char* ks = k_tile(tile % 2);
        const unsigned char* vs = ks + TILE;
        __syncthreads();  // every warpgroup is done with the stage about to be overwritten
        if (k0 + WG_K < m) {
            unsigned char* next = k_tile((tile + 1) % 2);
            load_tile(next, kb, WG_K, k0 + WG_K, m, kv_row);
            load_tile(next + TILE, vb, WG_K, k0 + WG_K, m, kv_row);
        }
        cp_async_commit();   // perhaps empty: the groups stay one per tile
        cp_async_wait<1>();  // everything but the next tile is in
        // Written by this thread's copies, read next by the tensor cores' (async) proxy.
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        __syncthreads();

        // S = Q·Kᵀ: 64 queries × 64 keys per warpgroup, K = DP in steps of 16.
        float s[32];
#pragma unroll
        for (int i = 0; i < 32; i++) s[i] = 0.f;
        pin<32>(s);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < DP / 16; kk++)
            wgmma_ss64(s, smem_desc(my_q + kk * 256, 128, ROWS), smem_desc(ks + kk * 256, 128, ROWS),
                       kk > 0, Ty{});
        wg_commit_wait();
        pin<32>(s);
        if (k0 + WG_K > m) {
#pragma unroll
            for (int j = 0; j < 8; j++)
#pragma unroll
                for (int e = 0; e < 4; e++)
                    if (k0 + j * 8 + (lane % 4) * 2 + (e % 2) >= m) s[4 * j + e] = -INFINITY;
        }

        // Online softmax, rows reduced across the 4 lanes that share them; the probabilities
        // end packed in pairs as the A fragments of P·V take them: p[j][hr].
        uint32_t p[8][2];
#pragma unroll
        for (int hr = 0; hr < 2; hr++) {
            float mx = row_max[hr];
#pragma unroll
            for (int j = 0; j < 8; j++) mx = fmaxf(mx, fmaxf(s[4 * j + 2 * hr], s[4 * j + 2 * hr + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
            const float shift = mx * scale_log2;
            const float alpha = exp2f(row_max[hr] * scale_log2 - shift);
            row_max[hr] = mx;
            float sum = 0.f;
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const float e0 = exp2f(s[4 * j + 2 * hr] * scale_log2 - shift);
                const float e1 = exp2f(s[4 * j + 2 * hr + 1] * scale_log2 - shift);
                sum += e0 + e1;
                p[j][hr] = Mma<T>::pack(e0, e1);
            }
            row_sum[hr] = row_sum[hr] * alpha + sum;
#pragma unroll
            for (int t = 0; t < DP / 8; t++) {
                o[4 * t + 2 * hr] *= alpha;
                o[4 * t + 2 * hr + 1] *= alpha;
            }
        }

        // O += P·V: K = 64 keys in steps of 16, two n8 blocks of P per step.
        pin<DP / 2>(o);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            const uint32_t a[4] = {p[2 * kk][0], p[2 * kk][1], p[2 * kk + 1][0], p[2 * kk + 1][1]};
            const uint64_t desc = smem_desc(vs + kk * 2 * ROWS, v_lead, v_stride);
            if constexpr (DP == 48)
                wgmma_rs48(o, a, desc, Ty{});
            else
                wgmma_rs64(o, a, desc, Ty{});
        }
        wg_commit_wait();
        pin<DP / 2>(o);
    }

#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        float total = row_sum[hr];
        total += __shfl_xor_sync(0xffffffff, total, 1);
        total += __shfl_xor_sync(0xffffffff, total, 2);
        const int i = q0 + group * WG_Q + warp * 16 + lane / 4 + 8 * hr;
        if (i >= n) continue;
        const float inv = 1.f / total;
        T* row = out + ((int64_t)b * n + i) * heads * d + (int64_t)h * d;
#pragma unroll
        for (int t = 0; t < DP / 8; t++) {
            const int c = t * 8 + (lane % 4) * 2;
            if (c < d)
                *reinterpret_cast<uint32_t*>(row + c) =
                    Mma<T>::pack(o[4 * t + 2 * hr] * inv, o[4 * t + 2 * hr + 1] * inv);
        }
    }
}

#define FLASH_WG(T, NAME, DP, SWAP, SUFFIX)                                                    \
    extern "C" __global__ void __launch_bounds__(128 * WG_GROUPS, 2)                          \
        flash_attention_wg##DP##SUFFIX##_##NAME(                                              \
            const T* q, const T* k, const T* v, T* out, int heads, int n, int m, int d,       \
            int64_t q_batch, int64_t q_row, int64_t kv_batch, int64_t kv_row,                 \
            float scale_log2) {                                                               \
        flash_attention_wg<T, DP, SWAP>(q, k, v, out, heads, n, m, d, q_batch, q_row,         \
                                        kv_batch, kv_row, scale_log2);                        \
    }
#define FLASH_WG_ALL(T, NAME)          \
    FLASH_WG(T, NAME, 48, false, )     \
    FLASH_WG(T, NAME, 64, false, )     \
    FLASH_WG(T, NAME, 48, true, swap)  \
    FLASH_WG(T, NAME, 64, true, swap)
FLASH_WG_ALL(__half, f16)
FLASH_WG_ALL(__nv_bfloat16, bf16)
