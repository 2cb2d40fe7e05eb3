// Tile helpers shared by the attention kernels: tensor-core fragments (`mma.sync`,
// `ldmatrix`), asynchronous global → shared copies, packed exponentials.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

template <typename T> struct Mma;
// D += A·B on tensor cores for one 16-bit type (PTX name TY), and two floats packed as it.
#define MMA(T, TY, PAIR, PACK)                                                                 \
    template <> struct Mma<T> {                                                                \
        static __device__ __forceinline__ void run(float* c, const uint32_t* a,                \
                                                   const uint32_t* b) {                        \
            asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TY "." TY                    \
                         ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"          \
                         : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                      \
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1])); \
        }                                                                                      \
        static __device__ __forceinline__ uint32_t pack(float lo, float hi) {                  \
            PAIR h = PACK(lo, hi);                                                             \
            return *reinterpret_cast<uint32_t*>(&h);                                           \
        }                                                                                      \
    };
MMA(__half, "f16", __half2, __floats2half2_rn)
MMA(__nv_bfloat16, "bf16", __nv_bfloat162, __floats2bfloat162_rn)

// Four 8×8 matrices of 16-bit values from shared memory, each lane naming one row.
__device__ __forceinline__ void ldsm_x4(uint32_t* r, const void* row) {
    uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t* r, const void* row) {
    uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
// 16 bytes global → shared without passing through registers; zeros when `copy` is false.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool copy) {
    uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(a), "l"(src),
                 "r"(copy ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

// One thread's share of copying tiles of `Rows` rows × `CH` 16-byte chunks into shared
// memory, worked out once per kernel, so that copying a tile is an address and a bounds
// check per chunk. Chunks from column `d` on are never copied (a kernel writes them once),
// nor are slots past the tile. `place(u, r, c)` names chunk u's row and column chunk,
// `offset(r, c)` its byte offset in the tile. A tile's rows are at most 2³¹ elements apart
// in all (`Rows · stride`).
template <int Rows, int CH, int Threads>
struct TileCopies {
    static_assert(Rows <= 255, "a tile's row must fit in a byte beside the NONE mark");
    static constexpr int SLOTS = (Rows * CH + Threads - 1) / Threads;
    static constexpr uint32_t NONE = 0xFF;
    // Per slot, two registers: the row in the tile in the low byte (NONE: the slot copies
    // nothing) and the byte offset in the tile above it; the elements from the tile's first
    // row.
    uint32_t place[SLOTS];
    int src[SLOTS];
    template <typename Place, typename Offset>
    __device__ __forceinline__ TileCopies(int64_t stride, int d, Place chunk, Offset offset) {
#pragma unroll
        for (int j = 0; j < SLOTS; j++) {
            const int u = threadIdx.x + j * Threads;
            int r, c;
            chunk(u, r, c);
            const bool used = u < Rows * CH && c * 8 < d;
            place[j] = (used ? static_cast<uint32_t>(r) : NONE) | offset(r, c) << 8;
            src[j] = used ? static_cast<int>(r * stride) + c * 8 : 0;
        }
    }
    // Rows `first`.. of `base`, `stride` elements apart, into `tile`; rows from `count` on
    // as zeros.
    template <typename T>
    __device__ __forceinline__ void copy(unsigned char* tile, const T* base, int first,
                                         int count, int64_t stride) const {
        const T* at = base + first * stride;
#pragma unroll
        for (int j = 0; j < SLOTS; j++) {
            const uint32_t r = place[j] & 0xFF;
            if (r == NONE) continue;
            const bool inside = first + static_cast<int>(r) < count;
            cp_async16(tile + (place[j] >> 8), inside ? at + src[j] : base, inside);
        }
    }
};

// exp2 of two floats, packed as two 16-bit values: one `ex2.approx.f16x2` for f16 (the
// argument rounded to f16 first, which costs about as much accuracy as rounding the
// probability to f16 does; sm_80 to sm_90 run it as two f16 exponentials and a repacking),
// two f32 ones for bf16 (whose packed form needs sm_90).
template <typename T> __device__ __forceinline__ uint32_t exp2_pair(float x0, float x1);
template <> __device__ __forceinline__ uint32_t exp2_pair<__half>(float x0, float x1) {
    __half2 h = __floats2half2_rn(x0, x1);
    uint32_t in = *reinterpret_cast<uint32_t*>(&h), out;
    asm("ex2.approx.f16x2 %0, %1;" : "=r"(out) : "r"(in));
    return out;
}
template <> __device__ __forceinline__ uint32_t exp2_pair<__nv_bfloat16>(float x0, float x1) {
    return Mma<__nv_bfloat16>::pack(exp2f(x0), exp2f(x1));
}
