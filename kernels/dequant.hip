// dequant.hip - dequantize GGUF rows (whole tensors, or gathered rows = embedding lookup).
//
// Reference: gguf.quants.dequantize (tests/gpu/test_dequant.py, test_embed.py).
// Weights are read from the weight arena at a byte offset (arena + w_off); row r of the
// tensor starts at arena + w_off + r * row_bytes.
//
//   dequant_<t>_f32 / dequant_<t>_f16(arena, w_off, row_bytes, cols, ids, n_rows, out)
//     out[i, :] = row (ids ? ids[i] : i) of the tensor, as f32 or f16 bits; out is [n_rows, cols]
//   One thread per 32-value item; grid-stride loop over n_rows * cols / 32 items.
#include "compat.h"
#include "quant_blocks.h"

template <class T, bool F16>
RF_DEV void dequant_rows(const rf_u8* __restrict__ arena, rf_i64 w_off, rf_i64 row_bytes, int cols,
                         const int* __restrict__ ids, int n_rows, void* __restrict__ out) {
    const int items_per_row = cols / 32;
    const rf_i64 n_items = (rf_i64)n_rows * items_per_row;
    for (rf_i64 it = (rf_i64)blockIdx.x * blockDim.x + threadIdx.x; it < n_items;
         it += (rf_i64)gridDim.x * blockDim.x) {
        const int i = (int)(it / items_per_row);
        const int k = (int)(it % items_per_row);
        const rf_i64 row = ids ? (rf_i64)ids[i] : (rf_i64)i;
        const rf_u8* blk = arena + w_off + row * row_bytes + (rf_i64)(k / T::SUBS) * T::BS;
        float v[32];
        T::load32(blk, k % T::SUBS, v);
        const rf_i64 o = (rf_i64)i * cols + (rf_i64)k * 32;
        if (F16) {
            rf_f4* dst = (rf_f4*)((rf_u16*)out + o);  // 64-byte aligned item: four 16-byte stores
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                rf_u32 w[4];
#pragma unroll
                for (int u = 0; u < 4; ++u)
                    w[u] = (rf_u32)rf_f2h(v[8 * j + 2 * u]) | ((rf_u32)rf_f2h(v[8 * j + 2 * u + 1]) << 16);
                rf_f4 t;
                t.x = __uint_as_float(w[0]); t.y = __uint_as_float(w[1]);
                t.z = __uint_as_float(w[2]); t.w = __uint_as_float(w[3]);
                dst[j] = t;
            }
        } else {
            rf_f4* dst = (rf_f4*)((float*)out + o);  // 128-byte aligned item
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                rf_f4 t;
                t.x = v[4 * j]; t.y = v[4 * j + 1]; t.z = v[4 * j + 2]; t.w = v[4 * j + 3];
                dst[j] = t;
            }
        }
    }
}

#define RF_DEQUANT_KERNELS(T, name)                                                                   \
    RF_KERNEL void dequant_##name##_f32(const rf_u8* arena, rf_i64 w_off, rf_i64 row_bytes, int cols, \
                                        const int* ids, int n_rows, float* out) {                     \
        dequant_rows<T, false>(arena, w_off, row_bytes, cols, ids, n_rows, out);                      \
    }                                                                                                 \
    RF_KERNEL void dequant_##name##_f16(const rf_u8* arena, rf_i64 w_off, rf_i64 row_bytes, int cols, \
                                        const int* ids, int n_rows, rf_u16* out) {                    \
        dequant_rows<T, true>(arena, w_off, row_bytes, cols, ids, n_rows, out);                       \
    }

RF_FOR_EACH_QTYPE(RF_DEQUANT_KERNELS)
