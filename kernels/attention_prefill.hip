// attention_prefill.hip - fused causal attention for a prompt (tiled, online softmax).
//
//   attn_prefill_<c>_hd<HD>(q, k_cache, v_cache, out, layer, n, n_head, n_head_kv, n_ctx, start, scale)
//     q [n, n_head, HD] f32 at positions start..start+n-1; the cache already holds keys
//     0..start+n-1 (kv_append ran first); out [n, n_head * HD] f32.
//     Grid (ceil(n / 16), n_head), 128 threads: 16 queries per block, 8 threads per query, each
//     thread owning HD/8 dimensions (strided by 8, so shared-memory reads are conflict-free).
//     K and V tiles of BK = 4096 / HD keys are staged in shared memory (f32, 32 KiB) and shared
//     by the block's 16 queries; each query keeps a running max m, sum l and output acc:
//       m' = max(m, s); acc = acc * e^(m - m') + e^(s - m') v; l = l * e^(m - m') + e^(s - m')
//     (computed as powers of 2 of scores scaled by log2 e, two keys per step).
//     out = acc / l. GQA by indexing (KV head h / (n_head / n_head_kv)).
//   attn_prefill_dev_<c>_hd<HD>(..., const int* start, scale): the same, start read from device
//     memory (backend/prefill.py's captured graphs serve every start position).
//   HD in {64, 80, 96, 112, 128, 256}; other head sizes use the three-op path.
// Reference: float64 causal softmax(q K^T * scale) V in tests/gpu/test_attention_fused.py.
#include "compat.h"

#define RF_PF_BQ 16
#define RF_PF_TPQ 8
#define RF_PF_TILE 4096

// eight cache values (16-byte aligned) as floats
RF_DEV void pf_load8(const rf_u16* p, float* out) {
    const rf_f4 r = *(const rf_f4*)p;
    const rf_u32 w[4] = {__float_as_uint(r.x), __float_as_uint(r.y), __float_as_uint(r.z), __float_as_uint(r.w)};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        out[2 * i] = rf_h2f((rf_u16)(w[i] & 0xffffu));
        out[2 * i + 1] = rf_h2f((rf_u16)(w[i] >> 16));
    }
}
RF_DEV void pf_load8(const float* p, float* out) {
    const rf_f4 a = *(const rf_f4*)p, b = *(const rf_f4*)(p + 4);
    out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
    out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
}

template <class C, int HD>
RF_DEV void attn_prefill_impl(const float* __restrict__ q, const C* __restrict__ kc, const C* __restrict__ vc,
                              float* __restrict__ out, int layer, int n, int n_head, int n_head_kv, int n_ctx,
                              int start, float scale) {
    constexpr int DPT = HD / RF_PF_TPQ;
    constexpr int BK = RF_PF_TILE / HD;
    __shared__ float ks[RF_PF_TILE];
    __shared__ float vs[RF_PF_TILE];
    const int h = blockIdx.y;
    const int kvh = h / (n_head / n_head_kv);
    const int q0 = blockIdx.x * RF_PF_BQ;
    const int tid = threadIdx.x;
    const int sub = tid % RF_PF_TPQ;
    const int qi = q0 + tid / RF_PF_TPQ;
    const bool live = qi < n;

    const float scale_log2 = scale * 1.4426950408889634f;  // softmax via exp2: e^x = 2^(x log2 e)
    float qr[DPT], acc[DPT];
#pragma unroll
    for (int k = 0; k < DPT; ++k) {
        qr[k] = live ? q[((rf_i64)qi * n_head + h) * HD + sub + RF_PF_TPQ * k] * scale_log2 : 0.0f;
        acc[k] = 0.0f;
    }
    float m = -RF_INF, l = 0.0f;
    const int last_q = min(q0 + RF_PF_BQ, n) - 1;
    const int kend = start + last_q + 1;  // keys this block needs: 0 .. start + last_q
    const rf_i64 cache_off = ((rf_i64)layer * n_head_kv + kvh) * n_ctx * HD;
    const int my_last = start + qi;

    for (int t0 = 0; t0 < kend; t0 += BK) {
        __syncthreads();  // previous tile fully consumed
        // the tile's keys are contiguous in the cache: 16-byte loads, all issued before any store
        const int valid = min(BK, kend - t0) * HD;  // a multiple of 8
        const C* ksrc = kc + cache_off + (rf_i64)t0 * HD;
        const C* vsrc = vc + cache_off + (rf_i64)t0 * HD;
#pragma unroll 4
        for (int e = tid * 8; e < RF_PF_TILE; e += blockDim.x * 8) {
            float kv8[8], vv8[8];
            if (e < valid) {
                pf_load8(ksrc + e, kv8);
                pf_load8(vsrc + e, vv8);
            } else {
#pragma unroll
                for (int u = 0; u < 8; ++u) kv8[u] = vv8[u] = 0.0f;
            }
#pragma unroll
            for (int u = 0; u < 8; ++u) {
                ks[e + u] = kv8[u];
                vs[e + u] = vv8[u];
            }
        }
        __syncthreads();
        const int nk = min(BK, kend - t0);
        // keys in pairs: two independent dot products and shuffle reductions in flight, and one
        // running-max correction per pair (scores are in log2 units: exp2 of them)
        int jj = 0;
        for (; jj + 1 < nk; jj += 2) {
            float s0 = 0.0f, s1 = 0.0f;
#pragma unroll
            for (int k = 0; k < DPT; ++k) {
                s0 += qr[k] * ks[jj * HD + sub + RF_PF_TPQ * k];
                s1 += qr[k] * ks[(jj + 1) * HD + sub + RF_PF_TPQ * k];
            }
            s0 = rf_group_sum(s0, RF_PF_TPQ);  // all lanes take part; masking happens below
            s1 = rf_group_sum(s1, RF_PF_TPQ);
            const int j = t0 + jj;
            if (live && j <= my_last) {
                const bool has1 = j + 1 <= my_last;
                const float m_new = fmaxf(m, has1 ? fmaxf(s0, s1) : s0);
                const float corr = exp2f(m - m_new);  // m = -inf at first: corr = 0
                const float p0 = exp2f(s0 - m_new);
                const float p1 = has1 ? exp2f(s1 - m_new) : 0.0f;
                l = l * corr + p0 + p1;
#pragma unroll
                for (int k = 0; k < DPT; ++k)
                    acc[k] = acc[k] * corr + p0 * vs[jj * HD + sub + RF_PF_TPQ * k] +
                             p1 * vs[(jj + 1) * HD + sub + RF_PF_TPQ * k];
                m = m_new;
            }
        }
        if (jj < nk) {  // an odd last key
            float sc = 0.0f;
#pragma unroll
            for (int k = 0; k < DPT; ++k) sc += qr[k] * ks[jj * HD + sub + RF_PF_TPQ * k];
            sc = rf_group_sum(sc, RF_PF_TPQ);
            const int j = t0 + jj;
            if (live && j <= my_last) {
                const float m_new = fmaxf(m, sc);
                const float corr = exp2f(m - m_new);
                const float p = exp2f(sc - m_new);
                l = l * corr + p;
#pragma unroll
                for (int k = 0; k < DPT; ++k) acc[k] = acc[k] * corr + p * vs[jj * HD + sub + RF_PF_TPQ * k];
                m = m_new;
            }
        }
    }
    if (live) {
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        float* o = out + (rf_i64)qi * n_head * HD + (rf_i64)h * HD;
#pragma unroll
        for (int k = 0; k < DPT; ++k) o[sub + RF_PF_TPQ * k] = acc[k] * inv;
    }
}

#define RF_PREFILL_KERNEL(C, cname, HD)                                                                       \
    RF_KERNEL void attn_prefill_##cname##_hd##HD(const float* q, const C* kc, const C* vc, float* out,        \
                                                 int layer, int n, int n_head, int n_head_kv, int n_ctx,      \
                                                 int start, float scale) {                                    \
        attn_prefill_impl<C, HD>(q, kc, vc, out, layer, n, n_head, n_head_kv, n_ctx, start, scale);           \
    }
// the same with the start position read from device memory (the prefill's captured graphs)
#define RF_PREFILL_KERNEL_DEV(C, cname, HD)                                                                   \
    RF_KERNEL void attn_prefill_dev_##cname##_hd##HD(const float* q, const C* kc, const C* vc, float* out,    \
                                                     int layer, int n, int n_head, int n_head_kv, int n_ctx,  \
                                                     const int* start, float scale) {                         \
        attn_prefill_impl<C, HD>(q, kc, vc, out, layer, n, n_head, n_head_kv, n_ctx, *start, scale);          \
    }
#define RF_PREFILL_ALL_HD(C, cname) \
    RF_PREFILL_KERNEL(C, cname, 64)  \
    RF_PREFILL_KERNEL(C, cname, 80)  \
    RF_PREFILL_KERNEL(C, cname, 96)  \
    RF_PREFILL_KERNEL(C, cname, 112) \
    RF_PREFILL_KERNEL(C, cname, 128) \
    RF_PREFILL_KERNEL(C, cname, 256) \
    RF_PREFILL_KERNEL_DEV(C, cname, 64)  \
    RF_PREFILL_KERNEL_DEV(C, cname, 80)  \
    RF_PREFILL_KERNEL_DEV(C, cname, 96)  \
    RF_PREFILL_KERNEL_DEV(C, cname, 112) \
    RF_PREFILL_KERNEL_DEV(C, cname, 128) \
    RF_PREFILL_KERNEL_DEV(C, cname, 256)

RF_PREFILL_ALL_HD(rf_u16, f16)
RF_PREFILL_ALL_HD(float, f32)
