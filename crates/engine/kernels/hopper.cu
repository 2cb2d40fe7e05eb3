// Flash attention on Hopper's warpgroup matrix instructions (`wgmma`, sm_90a): the engine's
// attention for heads up to 64 wide on H100/H200, where `mma.sync` (kernels/fused.cu) leaves
// the tensor cores half idle. Compiled by build.rs for sm_90a only; loaded on such GPUs only.
//
// A block is one or two warpgroups, each with 64 queries of one (image, head); K and V come
// through shared memory 64 keys at a time, two or three stages deep (`cp.async`). Per key
// tile a warpgroup runs S = Q·Kᵀ with both operands in shared memory, the online softmax on
// S in registers, then O += P·V with P straight from registers and V in shared memory.
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

// Loads `rows` rows of `src` from row `first` (zeros from row `count` and column `d` on)
// into the layout above at `dst`. Eight threads take eight consecutive rows of one 16-byte
// column: each eight write one core matrix (128 contiguous bytes), and each warp reads whole
// 32-byte sectors. (Q's rows, once per block; K and V tiles go through `TileCopies`.)
template <typename T, int DP>
__device__ __forceinline__ void load_rows(unsigned char* dst, const T* src, int rows, int first,
                                          int count, int64_t row, int d) {
    constexpr int CH = DP / 8, ROWS = CH * 128;
    for (int u = threadIdx.x; u < rows * CH; u += blockDim.x) {
        const int g = u / 8, r = (g / CH) * 8 + u % 8, c = g % CH, i = first + r;
        const bool inside = i < count && c * 8 < d;
        cp_async16(dst + (r / 8) * ROWS + c * 128 + (r % 8) * 16,
                   inside ? src + (int64_t)i * row + c * 8 : src, inside);
    }
}

// The copies this thread made are in; the tensor cores (another proxy) may read them once
// every thread has passed the barrier that follows.
__device__ __forceinline__ void copies_visible() {
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// Issues S = Q·Kᵀ for one warpgroup: 64 queries × 64 keys, K = DP in steps of 16.
template <typename T, int DP>
__device__ __forceinline__ void issue_scores(float* s, const unsigned char* qs,
                                             const unsigned char* ks) {
    constexpr int ROWS = DP / 8 * 128;
#pragma unroll
    for (int kk = 0; kk < DP / 16; kk++)
        wgmma_ss64(s, smem_desc(qs + kk * 256, 128, ROWS), smem_desc(ks + kk * 256, 128, ROWS),
                   kk > 0, typename Tag<T>::type{});
}

// Issues O += P·V: K = 64 keys in steps of 16, two n8 blocks of P per step.
template <typename T, int DP>
__device__ __forceinline__ void issue_values(float* o, const uint32_t (&p)[8][2],
                                             const unsigned char* vs, uint32_t lead,
                                             uint32_t stride) {
    constexpr int ROWS = DP / 8 * 128;
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
        const uint32_t a[4] = {p[2 * kk][0], p[2 * kk][1], p[2 * kk + 1][0], p[2 * kk + 1][1]};
        const uint64_t desc = smem_desc(vs + kk * 2 * ROWS, lead, stride);
        if constexpr (DP == 48)
            wgmma_rs48(o, a, desc, typename Tag<T>::type{});
        else
            wgmma_rs64(o, a, desc, typename Tag<T>::type{});
    }
}

// Scores of keys from `m` on (a last, partial tile starting at key `k0`) count for nothing.
__device__ __forceinline__ void mask_scores(float* s, int k0, int m, int lane) {
    if (k0 + WG_K <= m) return;
#pragma unroll
    for (int j = 0; j < 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++)
            if (k0 + j * 8 + (lane % 4) * 2 + (e % 2) >= m) s[4 * j + e] = -INFINITY;
}

// The online softmax of one tile of scores, rows reduced across the 4 lanes that share
// them: the probabilities packed in pairs as the A fragments of P·V take them (p[j][hr]),
// and for each of the thread's two rows the factor `alpha` by which what O holds so far
// must shrink. ONES: the row sums come from V's column of ones, and the exponentials are
// f32 ones packed (the packed f16 exponential is two f32-rate ones on sm_90).
template <typename T, bool ONES>
__device__ __forceinline__ void softmax_tile(const float* s, uint32_t (&p)[8][2], float* row_max,
                                             float* row_sum, float* alpha, float scale_log2) {
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        float mx = row_max[hr];
#pragma unroll
        for (int j = 0; j < 8; j++) mx = fmaxf(mx, fmaxf(s[4 * j + 2 * hr], s[4 * j + 2 * hr + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
        const float shift = mx * scale_log2;
        alpha[hr] = exp2f(row_max[hr] * scale_log2 - shift);
        row_max[hr] = mx;
        if (ONES) {
            // f32 exponentials: on sm_90 a packed f16 one is two of them and a repacking.
#pragma unroll
            for (int j = 0; j < 8; j++)
                p[j][hr] = Mma<T>::pack(exp2f(s[4 * j + 2 * hr] * scale_log2 - shift),
                                        exp2f(s[4 * j + 2 * hr + 1] * scale_log2 - shift));
        } else {
            float sum = 0.f;
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const float e0 = exp2f(s[4 * j + 2 * hr] * scale_log2 - shift);
                const float e1 = exp2f(s[4 * j + 2 * hr + 1] * scale_log2 - shift);
                sum += e0 + e1;
                p[j][hr] = Mma<T>::pack(e0, e1);
            }
            row_sum[hr] = row_sum[hr] * alpha[hr] + sum;
        }
    }
}

template <int DP> __device__ __forceinline__ void rescale(float* o, const float* alpha) {
#pragma unroll
    for (int t = 0; t < DP / 8; t++) {
        o[4 * t] *= alpha[0];
        o[4 * t + 1] *= alpha[0];
        o[4 * t + 2] *= alpha[1];
        o[4 * t + 3] *= alpha[1];
    }
}

// q: [b, n, heads·d], k and v: [b, m, heads·d] with the given batch and row strides (d
// contiguous, head h at column h·d, d a multiple of 8, rows 16-byte aligned); out: [b, n,
// heads·d] contiguous. DP: d rounded up to 48 or 64; the padding is zero.
// SWAP reads V's descriptor with the roles of its two strides exchanged (a check of the
// layout's reading). PIPE: Q·Kᵀ of the next tile and P·V of this one run on the tensor
// cores while the softmax of the next tile runs beside them (three stages of K and V).
// ONES (with PIPE, d < DP): V's column d holds ones, so P·V also yields the row sums.
// GROUPS: warpgroups per block, which share each K and V tile and meet at its barriers (one:
// blocks of 64 queries that wait for no other warpgroup, each copying its own tiles).
template <typename T, int DP, bool SWAP, bool ONES, bool PIPE, int GROUPS>
__device__ void flash_attention_wg(const T* __restrict__ q, const T* __restrict__ k,
                                   const T* __restrict__ v, T* __restrict__ out, int heads,
                                   int n, int m, int d, int64_t q_batch, int64_t q_row,
                                   int64_t kv_batch, int64_t kv_row, float scale_log2) {
    constexpr int ROWS = DP / 8 * 128, TILE = WG_K * DP * 2, STAGES = PIPE ? 3 : 2;
    constexpr int WG_BQ = WG_Q * GROUPS;
    extern __shared__ __align__(128) unsigned char smem[];
    // Stage s: a K tile, then its V tile.
    auto k_tile = [&](int tile) { return smem + WG_BQ * DP * 2 + (tile % STAGES) * 2 * TILE; };
    const int group = threadIdx.x / 128, warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
    const int b = blockIdx.y / heads, h = blockIdx.y % heads;
    const int q0 = blockIdx.x * WG_BQ;
    const T* qb = q + b * q_batch + (int64_t)h * d;
    const T* kb = k + b * kv_batch + (int64_t)h * d;
    const T* vb = v + b * kv_batch + (int64_t)h * d;
    // K and V tiles share their rows' places: each thread's copies are worked out here once.
    const TileCopies<WG_K, DP / 8, 128 * GROUPS> kv_copies(
        kv_row, d,
        [](int u, int& r, int& c) {
            const int g = u / 8;
            r = (g / (DP / 8)) * 8 + u % 8;
            c = g % (DP / 8);
        },
        [](int r, int c) { return static_cast<uint32_t>((r / 8) * ROWS + c * 128 + (r % 8) * 16); });
    auto load_tile = [&](int tile) {
        kv_copies.copy(k_tile(tile), kb, tile * WG_K, m, kv_row);
        kv_copies.copy(k_tile(tile) + TILE, vb, tile * WG_K, m, kv_row);
    };
    {
        // Once for every stage, the columns from d on, which no tile's copy writes: zeros in
        // K, and in V zeros or (ONES) a one in column d and zeros after it.
        const int pad = DP / 8 - d / 8;  // 16-byte chunks per row from column d on
        for (int idx = threadIdx.x; idx < 2 * STAGES * WG_K * pad; idx += blockDim.x) {
            const int which = idx / (WG_K * pad), r = idx / pad % WG_K, c = d / 8 + idx % pad;
            const bool is_v = which % 2 == 1;
            uint32_t* chunk = reinterpret_cast<uint32_t*>(k_tile(which / 2) + (is_v ? TILE : 0) +
                                                           (r / 8) * ROWS + c * 128 + (r % 8) * 16);
            chunk[0] = Mma<T>::pack(ONES && is_v && c * 8 == d ? 1.f : 0.f, 0.f);
            chunk[1] = chunk[2] = chunk[3] = 0u;
        }
    }
    const int tiles = (m + WG_K - 1) / WG_K;
    load_rows<T, DP>(smem, qb, WG_BQ, q0, n, q_row, d);
    load_tile(0);
    cp_async_commit();
    if (PIPE) {
        if (tiles > 1) load_tile(1);
        cp_async_commit();
    }

    float o[DP / 2];
#pragma unroll
    for (int i = 0; i < DP / 2; i++) o[i] = 0.f;
    // Each thread holds two rows of its warp's 16: `lane / 4` and `lane / 4 + 8`.
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f}, alpha[2];
    const unsigned char* my_q = smem + group * (WG_Q / 8) * ROWS;
    const uint32_t v_lead = SWAP ? 128 : ROWS, v_stride = SWAP ? ROWS : 128;
    float s[32];
    // S for one tile, waited for, the keys past the last masked.
    auto scores_of = [&](int tile) {
#pragma unroll
        for (int i = 0; i < 32; i++) s[i] = 0.f;
        pin<32>(s);
        wg_fence();
        issue_scores<T, DP>(s, my_q, k_tile(tile));
        wg_commit_wait();
        pin<32>(s);
        mask_scores(s, tile * WG_K, m, lane);
    };

    if constexpr (!PIPE) {
        uint32_t p[8][2];
        for (int tile = 0; tile < tiles; tile++) {
            __syncthreads();  // every warpgroup is done with the stage about to be overwritten
            if (tile + 1 < tiles) load_tile(tile + 1);
            cp_async_commit();   // perhaps empty: the groups stay one per tile
            cp_async_wait<1>();  // everything but the next tile is in
            copies_visible();
            __syncthreads();
            scores_of(tile);
            softmax_tile<T, false>(s, p, row_max, row_sum, alpha, scale_log2);
            rescale<DP>(o, alpha);
            pin<DP / 2>(o);
            wg_fence();
            issue_values<T, DP>(o, p, k_tile(tile) + TILE, v_lead, v_stride);
            wg_commit_wait();
            pin<DP / 2>(o);
        }
    } else {
        // The first tile's scores and probabilities, then per tile: the next tile's scores
        // and this tile's P·V on the tensor cores, the next softmax beside them. P is held
        // twice over (this tile's, read by P·V in flight, and the next one's).
        uint32_t pa[8][2], pb[8][2];
        cp_async_wait<1>();  // Q and the first tile are in
        copies_visible();
        __syncthreads();
        scores_of(0);
        softmax_tile<T, ONES>(s, pa, row_max, row_sum, alpha, scale_log2);
        auto step = [&](int tile, const uint32_t(&cur)[8][2], uint32_t(&next)[8][2]) {
            __syncthreads();  // every warpgroup is done with the previous tile's stage
            if (tile + 2 < tiles) load_tile(tile + 2);
            cp_async_commit();   // perhaps empty: the groups stay one per tile
            cp_async_wait<1>();  // the next tile is in
            copies_visible();
            __syncthreads();
            const bool more = tile + 1 < tiles;
#pragma unroll
            for (int i = 0; i < 32; i++) s[i] = 0.f;
            pin<32>(s);
            pin<DP / 2>(o);
            wg_fence();
            // Past the last tile these are the scores of a stage's stale keys, never used:
            // issuing them anyway keeps the products out of branches, which would make the
            // compiler run them one at a time.
            issue_scores<T, DP>(s, my_q, k_tile(tile + 1));
            asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
            issue_values<T, DP>(o, cur, k_tile(tile) + TILE, v_lead, v_stride);
            asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
            asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
            pin<32>(s);
            if (more) {
                mask_scores(s, (tile + 1) * WG_K, m, lane);
                softmax_tile<T, ONES>(s, next, row_max, row_sum, alpha, scale_log2);
            }
            asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
            pin<DP / 2>(o);
            if (more) rescale<DP>(o, alpha);
        };
        for (int tile = 0; tile < tiles; tile += 2) {
            step(tile, pa, pb);
            if (tile + 1 < tiles) step(tile + 1, pb, pa);
        }
    }

#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        float total = row_sum[hr];
        if (ONES) {
            // Column d of the output, held by the first lane of each four.
#pragma unroll
            for (int t = 0; t < DP / 8; t++)
                if (t * 8 == d) total = o[4 * t + 2 * hr];
            total = __shfl_sync(0xffffffff, total, lane & ~3);
        } else {
            total += __shfl_xor_sync(0xffffffff, total, 1);
            total += __shfl_xor_sync(0xffffffff, total, 2);
        }
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

// Blocks of two warpgroups, two per SM; of one, four per SM (the same warps, each thread
// at most 128 registers), three for heads 64 wide (which would spill in 128).
#define FLASH_WG(T, NAME, DP, SWAP, ONES, PIPE, GROUPS, SUFFIX)                               \
    extern "C" __global__ void __launch_bounds__(128 * GROUPS,                                \
                                                 GROUPS == 2 ? 2 : (DP == 64 ? 3 : 4))        \
        flash_attention_wg##DP##SUFFIX##_##NAME(                                              \
            const T* q, const T* k, const T* v, T* out, int heads, int n, int m, int d,       \
            int64_t q_batch, int64_t q_row, int64_t kv_batch, int64_t kv_row,                 \
            float scale_log2) {                                                               \
        flash_attention_wg<T, DP, SWAP, ONES, PIPE, GROUPS>(                                  \
            q, k, v, out, heads, n, m, d, q_batch, q_row, kv_batch, kv_row, scale_log2);      \
    }
#define FLASH_WG_ALL(T, NAME)                              \
    FLASH_WG(T, NAME, 48, false, false, false, 2, )        \
    FLASH_WG(T, NAME, 64, false, false, false, 2, )        \
    FLASH_WG(T, NAME, 48, true, false, false, 2, swap)     \
    FLASH_WG(T, NAME, 64, true, false, false, 2, swap)     \
    FLASH_WG(T, NAME, 48, false, false, true, 2, pipe)     \
    FLASH_WG(T, NAME, 64, false, false, true, 2, pipe)     \
    FLASH_WG(T, NAME, 48, false, true, true, 2, pipep)     \
    FLASH_WG(T, NAME, 64, false, true, true, 2, pipep)     \
    FLASH_WG(T, NAME, 48, false, false, true, 1, pipe1)    \
    FLASH_WG(T, NAME, 64, false, false, true, 1, pipe1)    \
    FLASH_WG(T, NAME, 48, false, true, true, 1, pipep1)    \
    FLASH_WG(T, NAME, 64, false, true, true, 1, pipep1)
FLASH_WG_ALL(__half, f16)
FLASH_WG_ALL(__nv_bfloat16, bf16)
