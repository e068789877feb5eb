// prefill.hip - the glue kernels of the GPU prefill (rocmforge_lab/backend/prefill.py).
//
// Prefill multiplies n tokens by every weight with cuBLAS f16 GEMMs (weights dequantized to f16
// in chunks). These kernels sit between the GEMMs and fold the small elementwise steps together,
// so one layer takes ~20 launches instead of ~40 (prefill of small models is bound by launches):
//
//   (RMSNorm to f16 for the GEMM inputs: norm.hip's rms_norm_f16)
//   pf_qkv_rope_store_{f16,f32}(qkv, bias, q_out, k_cache, v_cache, positions, n, n_head, n_head_kv,
//                               head_dim, n_rot, base, neox, layer, n_ctx)
//     qkv: [n, (n_head + 2 n_head_kv) * head_dim] f32, the Q|K|V product of the layer; bias: the
//     same width or null. Adds the bias, rotates Q and K (rope_math.h, as rope.hip),
//     writes Q to q_out [n, n_head, head_dim] f32 and K, V to the cache rows positions[0..n)
//     (device memory, so a captured graph serves every start position).
//     One thread per (token, head of Q|K|V, pair of values).
//   pf_swiglu_f16(gu, out_h, n, ff)
//     gu: [n, 2 ff] f32 = gate | up (one GEMM); out_h[i, j] = f16( silu(gate) * up )
//     (elementwise.hip's swiglu arithmetic, rounded once to f16: the down projection's input)
// Reference: tests/gpu/test_prefill.py (against the op-by-op program on the same backend).
#include "compat.h"
#include "rope_math.h"

template <class C>
RF_DEV void pf_qkv_rope_store_impl(const float* __restrict__ qkv, const float* __restrict__ bias,
                                   float* __restrict__ q_out, C* __restrict__ kc, C* __restrict__ vc,
                                   const int* __restrict__ positions, int n, int n_head, int n_head_kv,
                                   int head_dim, int n_rot, float base, int neox, int layer, int n_ctx) {
    const int heads = n_head + 2 * n_head_kv;   // Q heads, then K heads, then V heads
    const int width = heads * head_dim;
    const int pairs = head_dim / 2;
    const int half_rot = n_rot / 2;
    const rf_i64 total = (rf_i64)n * heads * pairs;
    for (rf_i64 t = (rf_i64)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (rf_i64)gridDim.x * blockDim.x) {
        const int i = (int)(t % pairs);
        const int head = (int)((t / pairs) % heads);
        const int tok = (int)(t / ((rf_i64)pairs * heads));
        const float* row = qkv + (rf_i64)tok * width + (rf_i64)head * head_dim;
        const float* brow = bias ? bias + (rf_i64)head * head_dim : nullptr;
        // the two values of this pair: rotated pairs as rope.hip pairs them, the tail as (c, c+1)
        int a, b;
        if (i < half_rot) {
            rf_rope_pair_index(i, half_rot, neox, &a, &b);
        } else {
            a = n_rot + 2 * (i - half_rot);
            b = a + 1;
        }
        float x0 = row[a], x1 = row[b];
        if (brow) {
            x0 += brow[a];
            x1 += brow[b];
        }
        const bool is_v = head >= n_head + n_head_kv;
        if (!is_v && i < half_rot) rf_rope_rotate(&x0, &x1, positions[tok], i, n_rot, base);
        if (head < n_head) {
            float* o = q_out + ((rf_i64)tok * n_head + head) * head_dim;
            o[a] = x0;
            o[b] = x1;
        } else {
            const int h = is_v ? head - n_head - n_head_kv : head - n_head;
            const int p = positions[tok];
            if (p < 0 || p >= n_ctx) continue;
            C* cache = is_v ? vc : kc;
            C* o = cache + (((rf_i64)layer * n_head_kv + h) * n_ctx + p) * head_dim;
            rf_store(o + a, x0);
            rf_store(o + b, x1);
        }
    }
}

RF_KERNEL void pf_qkv_rope_store_f16(const float* qkv, const float* bias, float* q_out, rf_u16* kc, rf_u16* vc,
                                     const int* positions, int n, int n_head, int n_head_kv, int head_dim,
                                     int n_rot, float base, int neox, int layer, int n_ctx) {
    pf_qkv_rope_store_impl<rf_u16>(qkv, bias, q_out, kc, vc, positions, n, n_head, n_head_kv, head_dim, n_rot,
                                   base, neox, layer, n_ctx);
}
RF_KERNEL void pf_qkv_rope_store_f32(const float* qkv, const float* bias, float* q_out, float* kc, float* vc,
                                     const int* positions, int n, int n_head, int n_head_kv, int head_dim,
                                     int n_rot, float base, int neox, int layer, int n_ctx) {
    pf_qkv_rope_store_impl<float>(qkv, bias, q_out, kc, vc, positions, n, n_head, n_head_kv, head_dim, n_rot,
                                  base, neox, layer, n_ctx);
}

RF_KERNEL void pf_swiglu_f16(const float* __restrict__ gu, rf_u16* __restrict__ out, int n, int ff) {
    const rf_i64 total = (rf_i64)n * ff;
    for (rf_i64 i = (rf_i64)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (rf_i64)gridDim.x * blockDim.x) {
        const rf_i64 tok = i / ff;
        const int j = (int)(i % ff);
        const float g = gu[tok * 2 * ff + j];
        const float u = gu[tok * 2 * ff + ff + j];
        out[i] = rf_f2h(g / (1.0f + expf(-g)) * u);
    }
}
