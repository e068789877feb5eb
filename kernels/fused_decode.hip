// fused_decode.hip - the fused kernels of the graphed decode fast path (backend/fast_decode.py).
//
// One decode step (one token) is a fixed sequence of launches over fixed buffers; every kernel
// reads the position / token id / "done" flag from device memory (`state` = [pos, token, done]),
// so the sequence can be captured once as a CUDA/HIP graph and replayed per token:
//
//   fd_qkv_<c>       RMSNorm of the residual (every block stages it itself: fd_stage_norm) + Q/K/V
//                    matvecs (+ bias) + RoPE (cos/sin table) + KV-cache append at state.pos; q -> q_out
//   fd_attn_<c>_hd<D> split-K decode attention over positions 0..pos (GQA-aware: each K/V row is
//                    read once per group) -> per-split partials; only where the partials exceed
//                    merge_max does the last block of each KV head merge them (else fd_oproj does)
//   fd_oproj         o-projection + residual add; each block merges the attention partials itself
//                    (fd_stage_merge) while they are small, else reads the merged, quantized vector
//   fd_matvec        down-projection matvec + residual add (y += W x), or a plain matvec (+ bias):
//                    also the kernel the per-type NumPy-reference tests use
//   fd_gate_up       RMSNorm (staged per block) + gate and up matvecs + SwiGLU -> act (+ quantized)
//   fd_output        RMSNorm (staged per block) + output matvec -> logits + block argmax partials;
//                    the last block picks the token (lowest index on ties, like numpy.argmax),
//                    writes it to tokens_out[pos] and state.token, sets state.done on a stop id,
//                    advances state.pos, and writes the token's embedding row into resid
//   fd_embed         resid = embedding row of state.token (once, before the first step)
//   (<c> = f16 | f32: the KV cache element type; <D> = head_dim 32 | 64 | 128)
// On CUDA sm_90+ the graph launches them with programmatic dependent launch: each kernel prefetches
// weights, then fd_pdl_wait()s for its predecessor (see fd_pdl_wait).
//
// Activations in the matvecs. A matvec's input vector x is held as 16-bit integers per 32-value
// block (staged in shared memory by each block where the kernel normalizes the residual or merges
// the attention partials itself, else written to global memory by the producing kernel):
//   x_i ~= s_b * q_i,  q_i = round(x_i / s_b) in [-32639, 32639],  s_b = max|x_b| / 32639,
// stored as two signed bytes h_i, l_i with q_i = 256 h_i + l_i, plus the exact f32 sum of every
// 16 values. A weight row's integer quants are dotted with the h and l bytes by 4-way byte dot
// products (dp4a on CUDA; plain C elsewhere), exactly in int32, then scaled in f32:
//   sum_i w_i x_i = d * s_b * (256 * sum q_w h + sum q_w l)  (- min terms with the x sums).
// The only rounding beyond f32 is x's: relative 1.5e-5 of the block maximum (tests hold the
// kernels to 1e-4 of sum|w||x| + 3e-5 of sum|w| max|x|; end to end the logits move ~1e-5).
//
// Matvec engine. Weights stay in their GGUF block layout in the weight arena (`arena` + byte
// offset, `row_bytes` per row). A group of `lpr` lanes (8, 16 or 32) computes one *task*: two rows
// sharing one x (a RoPE pair of Q or K, two rows of V, gate[r] and up[r], rows r and r+1), so each
// x word is loaded once for two rows. Lanes walk the rows' *units* (32 values: a whole block of the
// 32-value types, 16 bytes of qs for Q4_K/Q5_K, 8 positions x 4 groups for Q6_K) with the widest
// aligned loads the block layout allows. Other types (F32, F16, BF16, Q2_K, Q3_K, MXFP4) use the
// float decoders of quant_blocks.h on reconstructed x. Task loops are warp-uniform, so the group
// reductions' shuffles always see the whole warp.
// The wide engine (fd_rows_w; kernels fd_gate_up_w1_q4k, fd_output_w1_q6k / _q4k, fd_matvec_w1_*; N = 1)
// takes 64-value units of Q4_K (a sub-block pair: header + 32 bytes of qs as 16-byte loads) and
// Q6_K (16 positions x 4 groups, the 2-byte-aligned blocks read as aligned words and funnel-shifted)
// and loads N units of each row of a task before any math; the header / scale decode is paid once
// per 64 values. The decode plan uses it (N 1, at most 80 registers) for the Q4_K gate/up and the
// Q6_K output (7B shape, H200, eager: gate/up ~52-54 -> 46-48 us, output 222 -> 211 us per launch;
// decode 283 -> 297 tok/s with the gate/up prefetch change); the down projection stays on the
// 32-value engine (faster there). Measured on the H200 and dropped as slower (7B shape, 297-299
// tok/s with this engine): N 2 (128 registers; 224 tok/s), N 1 capped at 64 registers (285), Q4_K
// as coalesced 16-byte chunks (284 / 247 with 2 / 4 chunks in flight), a gate/up grid of one wave
// looping over the chunks, and prefetching each task's next rows into L2 (275-280). FD_PF_FIRST in
// bits 8.. of fd_gate_up's lpr argument: its prologue prefetches only each group's first row pair.
// The stream engine (fd_st_run; kernels fd_gate_up_s_q4k, fd_matvec_s_q4k / _q6k, fd_output_s_q4k /
// _q6k, and _v1 variants) copies each warp's Q4_K / Q6_K rows through a ring of shared-memory stages
// with cp.async (CUDA sm_80+), so the bytes in flight are not bounded by registers. H100, 7B shape
// (benchmarks/RESULTS.md v8): the gate/up kernel is faster (the decode plan's default where
// asynchronous copies exist), the down kernel slower and the output kernel no faster in the graph.
// The x-resident kernels (fd_matvec_xr_q4k / _q6k, fd_oproj_xr_q4k / _q6k, fd_gate_up_xr_q4k; end of
// this file) keep one 64-value unit of x per thread in registers for the whole kernel and stream
// every row past it.
// References: tests/gpu/test_fast_decode.py (GPU) and tests/gpu/test_emu_fused.py (CPU emulator).
#include "compat.h"
#include "quant_blocks.h"

#if defined(RF_HOST_EMU)
// the CPU emulator (tests/gpu/emu) has no atomics, fences or byte permutes: host versions
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
#define FD_NOINLINE
#else
#define FD_NOINLINE __noinline__
#endif

#define FD_ATT_KEYS 64      // keys per attention block
#define FD_ATT_MAXG 32      // query heads per KV head
#define FD_ATT_QMAX 4096    // G * head_dim
#define FD_ATT_HPP 8        // heads per pass
#define FD_ATT_ZMERGE 0x10000  // fd_attn's hpb flag: one merge per (KV head, head slice)
#define FD_ATT_MERGE1 0x20000  // fd_attn's hpb flag: the one-pass merge (<= 2 outputs per thread)
#define FD_QMAXF 32639.0f   // |q| bound of the 16-bit activation quantization
#define FD_ST_POS 0
#define FD_ST_TOK 1
#define FD_ST_DONE 2

struct alignas(16) fd_u4 {
    rf_u32 x, y, z, w;
};
struct alignas(16) fd_i4 {
    int x, y, z, w;
};
struct alignas(8) fd_i2 {
    int x, y;
};

// ---- small helpers ------------------------------------------------------------------------
RF_DEV rf_u32 fd_ld32(const rf_u8* p) { return *(const rf_u32*)p; }  // 4-byte aligned
RF_DEV rf_u32 fd_ld32a2(const rf_u8* p) {                              // 2-byte aligned
    const rf_u16* q = (const rf_u16*)p;
    return (rf_u32)q[0] | ((rf_u32)q[1] << 16);
}
RF_DEV float fd_f16(const rf_u8* p) { return rf_h2f(*(const rf_u16*)p); }  // 2-byte aligned
RF_DEV int fd_byte(rf_u32 w, int k) { return (int)((w >> (8 * k)) & 0xffu); }
// 4 bits b3..b0 -> bit 4 of bytes 3..0
RF_DEV rf_u32 fd_spread4(rf_u32 h) { return ((h * 0x00204081u) & 0x01010101u) << 4; }

// c + sum of the 4 signed-byte products of a and b
RF_DEV int fd_dp4a(int a, int b, int c) {
#if defined(RF_CUDA)
    return __dp4a(a, b, c);
#else
    return c + (int)(rf_i8)(a & 0xff) * (int)(rf_i8)(b & 0xff) + (int)(rf_i8)((a >> 8) & 0xff) * (int)(rf_i8)((b >> 8) & 0xff) +
           (int)(rf_i8)((a >> 16) & 0xff) * (int)(rf_i8)((b >> 16) & 0xff) +
           (int)(rf_i8)((a >> 24) & 0xff) * (int)(rf_i8)((b >> 24) & 0xff);
#endif
}

// start fetching a weight line into L2 (CUDA); nothing elsewhere. Built with FD_PF_L1 (tune
// "pf_l1"): into L1 as well, so the loads after the programmatic-launch wait of the block that
// prefetched hit its multiprocessor's L1 instead of L2.
RF_DEV void fd_prefetch(const void* p) {
#if defined(RF_CUDA) && defined(FD_PF_L1) && FD_PF_L1
    asm volatile("prefetch.global.L1 [%0];" ::"l"(p));
#elif defined(RF_CUDA)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#else
    (void)p;
#endif
}

// The "last block" pattern (a block's results -> global memory, then an atomic counter; the block
// that arrives last reads everyone's): fd_fence() orders the writes before the counter increment and
// the counter before the reads. Default __threadfence() (fence.sc.gpu on CUDA); built with
// FD_FENCE_AR=1 (tune "fence_ar"): fence.acq_rel.gpu (sm_70+), the weakest fence that still pairs a
// release with an acquire through the atomic. fd_ld_l2(p): a load of a value another block of the
// running kernel wrote: volatile by default; built with FD_LDCG=1 (tune "ldcg", CUDA): ld.global.cg
// (L2, not L1), which the compiler may batch freely (volatile loads stay in program order).
RF_DEV void fd_fence() {
#if defined(RF_CUDA) && defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 700) && defined(FD_FENCE_AR) && FD_FENCE_AR
    asm volatile("fence.acq_rel.gpu;" ::: "memory");
#else
    __threadfence();
#endif
}
RF_DEV float fd_ld_l2(const float* p) {
#if defined(RF_CUDA) && !defined(RF_HOST_EMU) && defined(FD_LDCG) && FD_LDCG
    return __ldcg(p);
#else
    return *(const volatile float*)p;
#endif
}

// Programmatic dependent launch (CUDA, sm_90+): the decode graph is captured with each kernel
// launched with programmatic stream serialization (fast_decode.py), so a kernel's blocks may start
// while the previous kernel of the step still runs. Everything before fd_pdl_wait() may only read
// the weight arena, the state buffer and KV rows of earlier positions (nothing the step writes
// before it); fd_pdl_wait() returns once the previous kernel has completed and its writes are
// visible; fd_pdl_trigger() then lets the next kernel start its own prologue (weight prefetches).
// Launched without the attribute (tests, eager mode, HIP) both are no-ops.
RF_DEV void fd_pdl_wait() {
#if defined(RF_CUDA) && defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
RF_DEV void fd_pdl_trigger() {
#if defined(RF_CUDA) && defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
RF_DEV void fd_pdl_sync() {
    fd_pdl_wait();
    fd_pdl_trigger();
}
// "Early state" (template flag ES of fd_attn / fd_oproj / fd_matvec; the "_ls" kernels read it late):
// the position and done flag are read before fd_pdl_wait(), so no kernel starts its post-wait chain
// with a dependent state load (the o-projection and down kernels branched on it before any load).
// Safe for every kernel but the step's first (fd_qkv of layer 0, which keeps reading it after the
// wait): only fd_output writes state, and a kernel's prologue runs after its predecessor's
// fd_pdl_wait() returned, so the previous step's fd_output has completed. Volatile: past L1.
RF_DEV int fd_ld_state(const int* state, int i) { return *(const volatile int*)(state + i); }

// ---- quantized activation vectors ------------------------------------------------------------
// A vector x of n values (n % 32 == 0) is kept in global memory as h[n/4], l[n/4] (int words
// holding bytes h_i / l_i of 4 consecutive values, q_i = 256 h_i + l_i), s[n/32] (the scale of each
// 32-value block) and sum16[n/16] (f32 sums of 16 values). The kernel that produces x writes it
// (a last-block tail for the normalized residual, the attention merge, the gate/up blocks), so the
// consumers stream their weights at once.
struct FdX {
    const int* h;
    const int* l;
    const float* s;
    const float* sum16;
};
RF_DEV FdX fd_x(const int* h, const int* l, const float* s, const float* sum16) {
    FdX X;
    X.h = h;
    X.l = l;
    X.s = s;
    X.sum16 = sum16;
    return X;
}

// Quantize value v of 32-block b (this lane holds value 32b + lane%32); every lane of the warp
// calls (shuffles), only lanes with `store` write.
RF_DEV void fd_quant32(float v, int b, bool store, int* xh, int* xl, float* xs, float* xsum) {
    const int lane = rf_lane() & 31;  // WARP_SIZE 64: lanes 32..63 hold a second 32-block
    float a = fabsf(v);
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) a = fmaxf(a, rf_shfl_xor(a, m));
    const float inv = a > 0.0f ? FD_QMAXF / a : 0.0f;
    const int q = (int)rintf(v * inv);
    const int h = (q + 128) >> 8;  // q = 256 h + l, h in [-127, 127], l in [-128, 127]
    const int l = q - 256 * h;
    float s16 = v;
#pragma unroll
    for (int m = 8; m > 0; m >>= 1) s16 += rf_shfl_xor(s16, m);
    if (store) {
        ((rf_i8*)xh)[32 * b + lane] = (rf_i8)h;
        ((rf_i8*)xl)[32 * b + lane] = (rf_i8)l;
        if ((lane & 15) == 0) xsum[2 * b + (lane >> 4)] = s16;
        if (lane == 0) xs[b] = a / FD_QMAXF;
    }
}

// The whole block quantizes src[0..n) into (xh, xl, xs, xsum), RMSNorm-ed with weight w first when
// w is not null: x_i * (1 / sqrt(mean(x^2) + eps)) * w_i (the arithmetic of norm.hip's rms_norm).
// `vol`: read src through volatile loads (values written by other blocks of the running kernel).
// With a shared buffer `xsh` (n <= FD_TAIL_MAX) src is read once, 8 independent loads per thread
// at a time, and both passes run from shared memory.
#define FD_TAIL_MAX 8192
RF_DEV void fd_block_quant(const float* src, bool vol, const float* __restrict__ w, int n, float eps, int* xh,
                           int* xl, float* xs, float* xsum, float* red, float* xsh) {
    const volatile float* vsrc = src;
    if (xsh != nullptr) {
        for (int c0 = threadIdx.x; c0 < n; c0 += 8 * blockDim.x) {
            float v[8];
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                const int c = c0 + k * blockDim.x;
                v[k] = c < n ? (vol ? vsrc[c] : src[c]) : 0.0f;
            }
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                const int c = c0 + k * blockDim.x;
                if (c < n) xsh[c] = v[k];
            }
        }
        __syncthreads();
        src = xsh;
        vol = false;
    }
    float inv = 1.0f;
    if (w != nullptr) {
        float ss = 0.0f;
        for (int c = threadIdx.x; c < n; c += blockDim.x) {
            const float t = vol ? vsrc[c] : src[c];
            ss += t * t;
        }
        ss = rf_block_sum(ss, red);
        inv = 1.0f / sqrtf(ss / (float)n + eps);
    }
    const int per_warp = WARP_SIZE / 32;  // 32-blocks per warp pass
    const int nw = (int)(blockDim.x / WARP_SIZE);
    const int nb = n / 32;
    for (int b0 = rf_warp() * per_warp; b0 < nb; b0 += nw * per_warp) {  // warp-uniform
        const int b = b0 + rf_lane() / 32;
        const bool ok = b < nb;
        const int c = 32 * b + (rf_lane() & 31);
        float v = ok ? (vol ? vsrc[c] : src[c]) : 0.0f;
        if (w != nullptr && ok) v = v * inv * w[c];
        fd_quant32(v, b, ok, xh, xl, xs, xsum);
    }
}

// x (global, n values) -> quantized (optionally RMSNorm-ed with the arena vector at norm_off); one
// block. For tests and tools; the decode step produces its vectors in the kernels' tails.
RF_KERNEL void fd_quantize(const rf_u8* __restrict__ arena, const float* __restrict__ x, int n, rf_i64 norm_off,
                           float eps, int* xh, int* xl, float* xs, float* xsum) {
    __shared__ float red[32];
    if (blockIdx.x == 0)
        fd_block_quant(x, false, norm_off >= 0 ? (const float*)(arena + norm_off) : nullptr, n, eps, xh, xl, xs, xsum,
                       red, nullptr);
}

// ---- a block's own copy of the normalized residual --------------------------------------------
// The consumers of the residual stream (fd_qkv, fd_gate_up, fd_output) do not wait for a producer's
// "last block" to normalize and quantize it: every block reads the residual (d_model floats, from
// L2), computes RMSNorm * w itself and quantizes it into shared memory (FdXs). That costs each block
// one L2 round trip and a block reduction, overlapped with its weight prefetches, and removes a
// grid-wide atomic, a fence and a serial phase from every o-projection / down-projection launch.
#define FD_XS_MAX 8192  // the largest d_model the staged kernels take (DecodePlan.check)
#define FD_XS_REG 2     // 8-value groups per thread kept in registers between the two passes
template <int N>
struct alignas(16) FdXsN {
    int h[N / 4];
    int l[N / 4];
    float s[N / 32];
    float sum[N / 16];
};
typedef FdXsN<FD_XS_MAX> FdXs;

// Quantize 8 consecutive values z (group g: values 8g..8g+7) into xs, as fd_quant32 does per value;
// the 4 groups of a 32-block sit in 4 consecutive lanes (lane quads). Every lane calls (shuffles).
template <class XS>
RF_DEV void fd_quant8(const float* z, int g, bool ok, XS* xs) {
    float a = 0.0f, s = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        a = fmaxf(a, fabsf(z[e]));
        s += z[e];
    }
    a = fmaxf(a, rf_shfl_xor(a, 1));
    a = fmaxf(a, rf_shfl_xor(a, 2));
    s += rf_shfl_xor(s, 1);  // the 16-value sum (groups 2m, 2m+1)
    const float inv = a > 0.0f ? FD_QMAXF / a : 0.0f;
    rf_u32 hw[2] = {0u, 0u}, lw[2] = {0u, 0u};
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        const int q = (int)rintf(z[e] * inv);
        const int h = (q + 128) >> 8;  // q = 256 h + l, h in [-127, 127], l in [-128, 127]
        const int l = q - 256 * h;
        hw[e >> 2] |= ((rf_u32)h & 0xffu) << (8 * (e & 3));
        lw[e >> 2] |= ((rf_u32)l & 0xffu) << (8 * (e & 3));
    }
    if (ok) {
        fd_i2 th, tl;
        th.x = (int)hw[0]; th.y = (int)hw[1];
        tl.x = (int)lw[0]; tl.y = (int)lw[1];
        *(fd_i2*)(xs->h + 2 * g) = th;
        *(fd_i2*)(xs->l + 2 * g) = tl;
        if ((g & 3) == 0) xs->s[g >> 2] = a / FD_QMAXF;
        if ((g & 1) == 0) xs->sum[g >> 1] = s;
    }
}

RF_DEV void fd_ld8f(const float* p, float* o) {
    const rf_f4 a = ((const rf_f4*)p)[0], b = ((const rf_f4*)p)[1];
    o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w; o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
}

// xs = quantized RMSNorm(src) * w (n <= FD_XS_MAX, n % 32 == 0, src and w 16-byte aligned): thread t
// takes the 8-value groups t, t + blockDim, ... (the products src * w of the first FD_XS_REG stay in
// registers, so src is read once: one round of independent 16-byte loads). The whole block calls; ends with a
// barrier, so the block may read xs at once. Arithmetic as norm.hip's rms_norm, then fd_quant32's.
template <class XS>
RF_DEV FdX fd_stage_norm(const float* __restrict__ src, const float* __restrict__ w, int n, float eps, XS* xs,
                         float* red) {
    const int n8 = n / 8, t = (int)threadIdx.x, bd = (int)blockDim.x;
    float z[FD_XS_REG][8];  // src * w (the norm scale applies after the block sum)
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < FD_XS_REG; ++k) {
        const int g = t + k * bd;
        float u[8], wu[8];
        if (g < n8) {
            fd_ld8f(src + 8 * g, u);
            fd_ld8f(w + 8 * g, wu);
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) u[e] = wu[e] = 0.0f;
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            ss += u[e] * u[e];
            z[k][e] = u[e] * wu[e];
        }
    }
    for (int g = t + FD_XS_REG * bd; g < n8; g += bd) {  // blocks of < n / (8 FD_XS_REG) threads
        float u[8];
        fd_ld8f(src + 8 * g, u);
#pragma unroll
        for (int e = 0; e < 8; ++e) ss += u[e] * u[e];
    }
    ss = rf_block_sum(ss, red);
    const float inv = 1.0f / sqrtf(ss / (float)n + eps);
#pragma unroll
    for (int k = 0; k < FD_XS_REG; ++k) {
        if (k * bd < n8) {  // block-uniform
#pragma unroll
            for (int e = 0; e < 8; ++e) z[k][e] *= inv;
            fd_quant8(z[k], t + k * bd, t + k * bd < n8, xs);
        }
    }
    for (int g0 = FD_XS_REG * bd; g0 < n8; g0 += bd) {  // block-uniform
        const int g = g0 + t;
        const bool ok = g < n8;
        float y[8], u[8], wu[8];
        if (ok) {
            fd_ld8f(src + 8 * g, u);
            fd_ld8f(w + 8 * g, wu);
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) y[e] = ok ? u[e] * wu[e] * inv : 0.0f;
        fd_quant8(y, g, ok, xs);
    }
    __syncthreads();
    FdX X;
    X.h = xs->h;
    X.l = xs->l;
    X.s = xs->s;
    X.sum16 = xs->sum;
    return X;
}

// The o-projection's input, merged by each of its blocks from the attention's split partials
// ("late merge": fd_attn then skips its last-block merge). part_acc[s, h, :] = sum_j e^(score_hj -
// m_sh) V_j, part_ml[s, h] = (m_sh, l_sh) for the splits s < nsv; out[h, :] = sum_s w_sh part_acc[s,
// h, :], w_sh = e^(m_sh - M_h) / sum_s e^(m_sh - M_h) l_sh, quantized into xs (8-value groups, as
// fd_stage_norm). Needs nsv * n_head * head_dim <= FD_MERGE_MAX, n_head * head_dim <= FD_XS_MAX.
#define FD_MERGE_MAX 12288
#define FD_MERGE_SR 8      // splits per round of independent loads
#define FD_MERGE_PART 2048 // shared partial sums when several threads share an 8-value group
// acc += the weighted partials of splits s_first, s_first + step, ... (FD_MERGE_SR of them) of group g
RF_DEV void fd_merge_round(const float* __restrict__ pa, const float* mw, int n, int n_head, int h, int g, bool ok,
                           int s_first, int step, int nsv, float* acc) {
    float a[FD_MERGE_SR][8];
#pragma unroll
    for (int k = 0; k < FD_MERGE_SR; ++k) {
        const int sp = s_first + k * step;
        if (ok && sp < nsv) {
            fd_ld8f(pa + (rf_i64)sp * n + 8 * g, a[k]);
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) a[k][e] = 0.0f;
        }
    }
#pragma unroll
    for (int k = 0; k < FD_MERGE_SR; ++k) {
        const int sp = s_first + k * step;
        const float wk = (ok && sp < nsv) ? mw[2 * (sp * n_head + h)] : 0.0f;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] = fmaf(wk, a[k][e], acc[e]);
    }
}

// The merge weights of heads h_first .. h_first + n_h - 1 over the splits s < nsv: w[s * ws + (h -
// h_first) * wh] = e^(m_sh - M_h) / L_h (M_h = max_s m_sh, L_h = sum_s e^(m_sh - M_h) l_sh), from
// pm[2 (s * n_head + h)] = (m_sh, l_sh). Groups of 16 lanes take one head each (lanes over its
// splits, 16-lane shuffles) and read (m, l) straight from global memory: one round of loads, no
// serial loop over the splits, no staging barrier. VOL: volatile loads (values other blocks of the
// running kernel wrote). The whole block calls (blockDim a multiple of 16); the caller syncs after.
template <bool VOL>
RF_DEV void fd_merge_weights(const float* __restrict__ pm, int nsv, int n_head, int h_first, int n_h, float* w,
                             int ws, int wh) {
    const volatile float* vpm = pm;
    const int t = (int)threadIdx.x, gi = t >> 4, gl = t & 15, ng = (int)blockDim.x >> 4;
#define FD_PM(s, k) (VOL ? vpm[2 * ((s) * n_head + h) + (k)] : pm[2 * ((s) * n_head + h) + (k)])
    for (int hb = 0; hb < n_h; hb += ng) {  // block-uniform
        const int hr = hb + gi, h = h_first + hr;
        const bool okh = hr < n_h;
        float m0 = -RF_INF, l0 = 0.0f;  // the first 16 splits: one load pair per lane
        if (okh && gl < nsv) {
            m0 = FD_PM(gl, 0);
            l0 = FD_PM(gl, 1);
        }
        float M = m0;
        for (int s = gl + 16; okh && s < nsv; s += 16) M = fmaxf(M, FD_PM(s, 0));
#pragma unroll
        for (int mm = 8; mm > 0; mm >>= 1) M = fmaxf(M, rf_shfl_xor(M, mm));
        const float e0 = m0 == -RF_INF ? 0.0f : expf(m0 - M);
        float Ls = e0 * l0;
        for (int s = gl + 16; okh && s < nsv; s += 16) {
            const float m = FD_PM(s, 0);
            Ls += m == -RF_INF ? 0.0f : expf(m - M) * FD_PM(s, 1);
        }
#pragma unroll
        for (int mm = 8; mm > 0; mm >>= 1) Ls += rf_shfl_xor(Ls, mm);
        const float inv = Ls > 0.0f ? 1.0f / Ls : 0.0f;
        if (okh && gl < nsv) w[gl * ws + hr * wh] = e0 * inv;
        for (int s = gl + 16; okh && s < nsv; s += 16) {
            const float m = FD_PM(s, 0);
            w[s * ws + hr * wh] = m == -RF_INF ? 0.0f : expf(m - M) * inv;
        }
    }
#undef FD_PM
}

// Threads take 8-value groups; where the block has P >= 2 threads per group (small vectors), the
// P threads of a group split its splits (fewer dependent rounds) and meet in shared memory.
// MV: merge version; 2 = the weights by fd_merge_weights, 1 = (m, l) staged in shared memory, then
// one thread per head loops over the splits (tune "merge_v" 1: kernels fd_oproj*_m1).
template <int MV>
RF_DEV FdX fd_stage_merge(const float* __restrict__ pa, const float* __restrict__ pm, int nsv, int n_head, int hd,
                          FdXs* xs) {
    __shared__ float mw[2 * FD_MERGE_MAX / 32];  // (m, l) per split and head, then the weights
    __shared__ float hm[FD_MERGE_MAX / 32], hinv[FD_MERGE_MAX / 32];
    __shared__ float part[FD_MERGE_PART];
    const int t = (int)threadIdx.x, bd = (int)blockDim.x, n = n_head * hd, n8 = n / 8;
    const int P = max(1, min(bd / n8, min(nsv, 1 + FD_MERGE_PART / n)));
    const int sp = t / n8, g = t - sp * n8;  // this thread's split part and group
    const bool own = sp < P;
    const int h0 = own ? 8 * g / hd : 0;
    // the first round of this thread's first group: loaded before the weights are known
    float a0[FD_MERGE_SR][8];
#pragma unroll
    for (int k = 0; k < FD_MERGE_SR; ++k) {
        const int s = sp + k * P;
        if (own && s < nsv) {
            fd_ld8f(pa + (rf_i64)s * n + 8 * g, a0[k]);
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) a0[k][e] = 0.0f;
        }
    }
    if (MV >= 2) {
        fd_merge_weights<false>(pm, nsv, n_head, 0, n_head, mw, 2 * n_head, 2);  // fd_merge_round's layout
    } else {
        for (int i = t; i < 2 * nsv * n_head; i += bd) mw[i] = pm[i];
        __syncthreads();
        for (int h = t; h < n_head; h += bd) {
            float M = -RF_INF;
            for (int s = 0; s < nsv; ++s) M = fmaxf(M, mw[2 * (s * n_head + h)]);
            float Ls = 0.0f;
            for (int s = 0; s < nsv; ++s) {
                const float m = mw[2 * (s * n_head + h)];
                Ls += m == -RF_INF ? 0.0f : expf(m - M) * mw[2 * (s * n_head + h) + 1];
            }
            hm[h] = M;
            hinv[h] = Ls > 0.0f ? 1.0f / Ls : 0.0f;
        }
        __syncthreads();
        for (int i = t; i < nsv * n_head; i += bd) {
            const float m = mw[2 * i];
            const int h = i % n_head;
            mw[2 * i] = m == -RF_INF ? 0.0f : expf(m - hm[h]) * hinv[h];
        }
    }
    __syncthreads();
    {
        float acc[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] = 0.0f;
#pragma unroll
        for (int k = 0; k < FD_MERGE_SR; ++k) {
            const int s = sp + k * P;
            const float wk = (own && s < nsv) ? mw[2 * (s * n_head + h0)] : 0.0f;
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[e] = fmaf(wk, a0[k][e], acc[e]);
        }
        for (int s0 = sp + FD_MERGE_SR * P; s0 < nsv; s0 += FD_MERGE_SR * P)
            fd_merge_round(pa, mw, n, n_head, h0, g, own, s0, P, nsv, acc);
        if (P > 1) {  // block-uniform
            if (own && sp > 0) {
#pragma unroll
                for (int e = 0; e < 8; ++e) part[(sp - 1) * n + 8 * g + e] = acc[e];
            }
            __syncthreads();
            if (sp == 0) {
                for (int q = 0; q < P - 1; ++q) {
#pragma unroll
                    for (int e = 0; e < 8; ++e) acc[e] += part[q * n + 8 * g + e];
                }
            }
        }
        fd_quant8(acc, g, own && sp == 0, xs);  // quads of consecutive lanes: sp == 0 lanes are t < n8
    }
    for (int gb = bd; gb < n8; gb += bd) {  // block-uniform: vectors of more than 8 * blockDim values (P = 1)
        const int gg = gb + t;
        const bool ok = gg < n8;
        const int h = ok ? 8 * gg / hd : 0;
        float acc[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] = 0.0f;
        for (int s0 = 0; s0 < nsv; s0 += FD_MERGE_SR) fd_merge_round(pa, mw, n, n_head, h, gg, ok, s0, 1, nsv, acc);
        fd_quant8(acc, gg, ok, xs);
    }
    __syncthreads();
    FdX X;
    X.h = xs->h;
    X.l = xs->l;
    X.s = xs->s;
    X.sum16 = xs->sum;
    return X;
}

// ---- per-type unit decoders ---------------------------------------------------------------
// QK values per block, BS bytes per block, UPB units per block; a unit's values are NR runs of
// RL consecutive values at block offsets run_off(u, r). dot(block, u, h, l, s, sum) returns
// sum_i w_i x_i over the unit given the x words of each run (h[r*RL/4 ..], l[..]), the run's
// 32-block scale s[r] and the run's f32 sum of x (sum[r]).

// s * (256 * sum q h + sum q l) over the words of one run
#define FD_QX(ah, al, s) ((s) * (256.0f * (float)(ah) + (float)(al)))

template <int NW>
RF_DEV void fd_qdot(const rf_u32* q, const int* h, const int* l, int& ah, int& al) {
#pragma unroll
    for (int i = 0; i < NW; ++i) {
        ah = fd_dp4a((int)q[i], h[i], ah);
        al = fd_dp4a((int)q[i], l[i], al);
    }
}

struct DQ4_0 {
    static constexpr bool GEN = false;  // f16 d | qs[16]; value = d * (q - 8)
    static constexpr int QK = 32, BS = 18, UPB = 1, NR = 2, RL = 16;
    RF_DEV static int run_off(int, int r) { return 16 * r; }
    RF_DEV static float dot(const rf_u8* b, int, const int* h, const int* l, const float* s, const float* sum) {
        const float d = fd_f16(b);
        rf_u32 lo[4], hi[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const rf_u32 w = fd_ld32a2(b + 2 + 4 * i);
            lo[i] = w & 0x0F0F0F0Fu;
            hi[i] = (w >> 4) & 0x0F0F0F0Fu;
        }
        int ah0 = 0, al0 = 0, ah1 = 0, al1 = 0;
        fd_qdot<4>(lo, h, l, ah0, al0);
        fd_qdot<4>(hi, h + 4, l + 4, ah1, al1);
        return d * (FD_QX(ah0, al0, s[0]) + FD_QX(ah1, al1, s[1]) - 8.0f * (sum[0] + sum[1]));
    }
};

struct DQ4_1 {
    static constexpr bool GEN = false;  // f16 d | f16 m | qs[16]; value = d * q + m
    static constexpr int QK = 32, BS = 20, UPB = 1, NR = 2, RL = 16;
    RF_DEV static int run_off(int, int r) { return 16 * r; }
    RF_DEV static float dot(const rf_u8* b, int, const int* h, const int* l, const float* s, const float* sum) {
        const rf_u32 dm = fd_ld32(b);
        const float d = rf_h2f((rf_u16)(dm & 0xffffu)), m = rf_h2f((rf_u16)(dm >> 16));
        rf_u32 lo[4], hi[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const rf_u32 w = fd_ld32(b + 4 + 4 * i);
            lo[i] = w & 0x0F0F0F0Fu;
            hi[i] = (w >> 4) & 0x0F0F0F0Fu;
        }
        int ah0 = 0, al0 = 0, ah1 = 0, al1 = 0;
        fd_qdot<4>(lo, h, l, ah0, al0);
        fd_qdot<4>(hi, h + 4, l + 4, ah1, al1);
        return d * (FD_QX(ah0, al0, s[0]) + FD_QX(ah1, al1, s[1])) + m * (sum[0] + sum[1]);
    }
};

struct DQ5_0 {
    static constexpr bool GEN = false;  // f16 d | u32 qh | qs[16]; value = d * (q - 16)
    static constexpr int QK = 32, BS = 22, UPB = 1, NR = 2, RL = 16;
    RF_DEV static int run_off(int, int r) { return 16 * r; }
    RF_DEV static float dot(const rf_u8* b, int, const int* h, const int* l, const float* s, const float* sum) {
        const float d = fd_f16(b);
        const rf_u32 qh = fd_ld32a2(b + 2);
        rf_u32 lo[4], hi[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const rf_u32 w = fd_ld32a2(b + 6 + 4 * i);
            lo[i] = (w & 0x0F0F0F0Fu) | fd_spread4((qh >> (4 * i)) & 15u);
            hi[i] = ((w >> 4) & 0x0F0F0F0Fu) | fd_spread4((qh >> (16 + 4 * i)) & 15u);
        }
        int ah0 = 0, al0 = 0, ah1 = 0, al1 = 0;
        fd_qdot<4>(lo, h, l, ah0, al0);
        fd_qdot<4>(hi, h + 4, l + 4, ah1, al1);
        return d * (FD_QX(ah0, al0, s[0]) + FD_QX(ah1, al1, s[1]) - 16.0f * (sum[0] + sum[1]));
    }
};

struct DQ5_1 {
    static constexpr bool GEN = false;  // f16 d | f16 m | u32 qh | qs[16]; value = d * q + m
    static constexpr int QK = 32, BS = 24, UPB = 1, NR = 2, RL = 16;
    RF_DEV static int run_off(int, int r) { return 16 * r; }
    RF_DEV static float dot(const rf_u8* b, int, const int* h, const int* l, const float* s, const float* sum) {
        const rf_u32 dm = fd_ld32(b);
        const float d = rf_h2f((rf_u16)(dm & 0xffffu)), m = rf_h2f((rf_u16)(dm >> 16));
        const rf_u32 qh = fd_ld32(b + 4);
        rf_u32 lo[4], hi[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const rf_u32 w = fd_ld32(b + 8 + 4 * i);
            lo[i] = (w & 0x0F0F0F0Fu) | fd_spread4((qh >> (4 * i)) & 15u);
            hi[i] = ((w >> 4) & 0x0F0F0F0Fu) | fd_spread4((qh >> (16 + 4 * i)) & 15u);
        }
        int ah0 = 0, al0 = 0, ah1 = 0, al1 = 0;
        fd_qdot<4>(lo, h, l, ah0, al0);
        fd_qdot<4>(hi, h + 4, l + 4, ah1, al1);
        return d * (FD_QX(ah0, al0, s[0]) + FD_QX(ah1, al1, s[1])) + m * (sum[0] + sum[1]);
    }
};

struct DQ8_0 {
    static constexpr bool GEN = false;  // f16 d | int8 qs[32]; value = d * q
    static constexpr int QK = 32, BS = 34, UPB = 1, NR = 1, RL = 32;
    RF_DEV static int run_off(int, int) { return 0; }
    RF_DEV static float dot(const rf_u8* b, int, const int* h, const int* l, const float* s, const float*) {
        const float d = fd_f16(b);
        rf_u32 q[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) q[i] = fd_ld32a2(b + 2 + 4 * i);
        int ah = 0, al = 0;
        fd_qdot<8>(q, h, l, ah, al);
        return d * FD_QX(ah, al, s[0]);
    }
};

// Q4_K/Q5_K 6-bit scale and min of sub-block jj (0..7) from the 12 scale bytes in 3 words,
// without branches (lanes of a warp decode different sub-blocks)
RF_DEV void fd_k4sm(rf_u32 s0, rf_u32 s1, rf_u32 s2, int jj, float* sc, float* m) {
    const int k = jj & 3;
    const int b0 = fd_byte(s0, k), b1 = fd_byte(s1, k), b2 = fd_byte(s2, k);
    const bool lo = jj < 4;
    *sc = (float)(lo ? (b0 & 63) : ((b2 & 15) | ((b0 >> 6) << 4)));
    *m = (float)(lo ? (b1 & 63) : ((b2 >> 4) | ((b1 >> 6) << 4)));
}

// Q4_K (256 values, 144 bytes): f16 d | f16 dmin | scales[12] | qs[128]. Unit u = 16 bytes of qs
// (j = u/2, half hf = u%2): low nibbles = sub-block 2j values 16hf..16hf+15, high = sub-block 2j+1.
struct DQ4_K {
    static constexpr bool GEN = false;
    static constexpr int QK = 256, BS = 144, UPB = 8, NR = 2, RL = 16;
    RF_DEV static int run_off(int u, int r) { return 64 * (u >> 1) + 32 * r + 16 * (u & 1); }
    RF_DEV static float dot(const rf_u8* b, int u, const int* h, const int* l, const float* s, const float* sum) {
        const int j = u >> 1, hf = u & 1;
        const fd_u4 q = *(const fd_u4*)(b + 16 + 32 * j + 16 * hf);
        const rf_u32 dm = fd_ld32(b);
        const rf_u32 s0 = fd_ld32(b + 4), s1 = fd_ld32(b + 8), s2 = fd_ld32(b + 12);
        const rf_u32 lo[4] = {q.x & 0x0F0F0F0Fu, q.y & 0x0F0F0F0Fu, q.z & 0x0F0F0F0Fu, q.w & 0x0F0F0F0Fu};
        const rf_u32 hi[4] = {(q.x >> 4) & 0x0F0F0F0Fu, (q.y >> 4) & 0x0F0F0F0Fu, (q.z >> 4) & 0x0F0F0F0Fu,
                              (q.w >> 4) & 0x0F0F0F0Fu};
        int ah0 = 0, al0 = 0, ah1 = 0, al1 = 0;
        fd_qdot<4>(lo, h, l, ah0, al0);
        fd_qdot<4>(hi, h + 4, l + 4, ah1, al1);
        const float d = rf_h2f((rf_u16)(dm & 0xffffu)), dmin = rf_h2f((rf_u16)(dm >> 16));
        float sc0, m0, sc1, m1;
        fd_k4sm(s0, s1, s2, 2 * j, &sc0, &m0);
        fd_k4sm(s0, s1, s2, 2 * j + 1, &sc1, &m1);
        return d * (sc0 * FD_QX(ah0, al0, s[0]) + sc1 * FD_QX(ah1, al1, s[1])) - dmin * (m0 * sum[0] + m1 * sum[1]);
    }
};

// Q5_K (176 bytes): f16 d | f16 dmin | scales[12] | qh[32] | qs[128]; as Q4_K plus the 5th bit of
// value l of sub-block sb = bit sb of qh[l]
struct DQ5_K {
    static constexpr bool GEN = false;
    static constexpr int QK = 256, BS = 176, UPB = 8, NR = 2, RL = 16;
    RF_DEV static int run_off(int u, int r) { return 64 * (u >> 1) + 32 * r + 16 * (u & 1); }
    RF_DEV static float dot(const rf_u8* b, int u, const int* h, const int* l, const float* s, const float* sum) {
        const int j = u >> 1, hf = u & 1;
        const fd_u4 q = *(const fd_u4*)(b + 48 + 32 * j + 16 * hf);
        const fd_u4 qh = *(const fd_u4*)(b + 16 + 16 * hf);
        const rf_u32 dm = fd_ld32(b);
        const rf_u32 s0 = fd_ld32(b + 4), s1 = fd_ld32(b + 8), s2 = fd_ld32(b + 12);
        const int sh0 = 2 * j, sh1 = 2 * j + 1;
        const rf_u32 lo[4] = {(q.x & 0x0F0F0F0Fu) | (((qh.x >> sh0) & 0x01010101u) << 4),
                              (q.y & 0x0F0F0F0Fu) | (((qh.y >> sh0) & 0x01010101u) << 4),
                              (q.z & 0x0F0F0F0Fu) | (((qh.z >> sh0) & 0x01010101u) << 4),
                              (q.w & 0x0F0F0F0Fu) | (((qh.w >> sh0) & 0x01010101u) << 4)};
        const rf_u32 hi[4] = {((q.x >> 4) & 0x0F0F0F0Fu) | (((qh.x >> sh1) & 0x01010101u) << 4),
                              ((q.y >> 4) & 0x0F0F0F0Fu) | (((qh.y >> sh1) & 0x01010101u) << 4),
                              ((q.z >> 4) & 0x0F0F0F0Fu) | (((qh.z >> sh1) & 0x01010101u) << 4),
                              ((q.w >> 4) & 0x0F0F0F0Fu) | (((qh.w >> sh1) & 0x01010101u) << 4)};
        int ah0 = 0, al0 = 0, ah1 = 0, al1 = 0;
        fd_qdot<4>(lo, h, l, ah0, al0);
        fd_qdot<4>(hi, h + 4, l + 4, ah1, al1);
        const float d = rf_h2f((rf_u16)(dm & 0xffffu)), dmin = rf_h2f((rf_u16)(dm >> 16));
        float sc0, m0, sc1, m1;
        fd_k4sm(s0, s1, s2, sh0, &sc0, &m0);
        fd_k4sm(s0, s1, s2, sh1, &sc1, &m1);
        return d * (sc0 * FD_QX(ah0, al0, s[0]) + sc1 * FD_QX(ah1, al1, s[1])) - dmin * (m0 * sum[0] + m1 * sum[1]);
    }
};

// Q6_K (210-byte blocks, 2-byte aligned): ql[128] | qh[64] | int8 scales[16] | f16 d.
// Half hh (values 128hh..), position p (0..31), group k (0..3): value 128hh + 32k + p =
//   ((ql[64hh + 32(k&1) + p] >> 4(k>>1)) & 15 | ((qh[32hh + p] >> 2k) & 3) << 4) - 32,
//   scale sc[8hh + 2k + p/16]. Unit u: hh = u/4, positions p0 = 8(u%4) .. p0+7, all 4 groups.
// The x sums of its 8-value runs come from the x words: s * (256 sum h + sum l) (dp4a with ones).
struct DQ6_K {
    static constexpr bool GEN = false;
    static constexpr int QK = 256, BS = 210, UPB = 8, NR = 4, RL = 8;
    RF_DEV static int run_off(int u, int r) { return 128 * (u >> 2) + 32 * r + 8 * (u & 3); }
    RF_DEV static float dot(const rf_u8* b, int u, const int* h, const int* l, const float* s, const float* sum) {
        const int hh = u >> 2, p0 = 8 * (u & 3);
        const rf_u8* ql = b + 64 * hh + p0;
        const rf_u8* qh = b + 128 + 32 * hh + p0;
        const rf_u8* sc = b + 192 + 8 * hh + (p0 >> 4);
        const rf_u32 L0 = fd_ld32a2(ql), L1 = fd_ld32a2(ql + 4);
        const rf_u32 M0 = fd_ld32a2(ql + 32), M1 = fd_ld32a2(ql + 36);
        const rf_u32 H0 = fd_ld32a2(qh), H1 = fd_ld32a2(qh + 4);
        const float d = fd_f16(b + 208);
        const rf_u32 q[8] = {(L0 & 0x0F0F0F0Fu) | ((H0 << 4) & 0x30303030u), (L1 & 0x0F0F0F0Fu) | ((H1 << 4) & 0x30303030u),
                             (M0 & 0x0F0F0F0Fu) | ((H0 << 2) & 0x30303030u), (M1 & 0x0F0F0F0Fu) | ((H1 << 2) & 0x30303030u),
                             ((L0 >> 4) & 0x0F0F0F0Fu) | (H0 & 0x30303030u), ((L1 >> 4) & 0x0F0F0F0Fu) | (H1 & 0x30303030u),
                             ((M0 >> 4) & 0x0F0F0F0Fu) | ((H0 >> 2) & 0x30303030u),
                             ((M1 >> 4) & 0x0F0F0F0Fu) | ((H1 >> 2) & 0x30303030u)};
        float r = 0.0f;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            int ah = 0, al = 0;
            fd_qdot<2>(q + 2 * k, h + 2 * k, l + 2 * k, ah, al);
            r += (float)(rf_i8)sc[2 * k] * (FD_QX(ah, al, s[k]) - 32.0f * sum[k]);
        }
        return d * r;
    }
};

// every other type: the 32-value items of quant_blocks.h, decoded to floats, dotted with the
// reconstructed x = s * (256 h + l)
template <class T>
struct DGen {
    static constexpr bool GEN = true;
    static constexpr int QK = T::QK, BS = T::BS, UPB = T::SUBS, NR = 1, RL = 32;
    RF_DEV static int run_off(int u, int) { return 32 * u; }
    RF_DEV static float dot(const rf_u8* b, int u, const int* h, const int* l, const float* s, const float*) {
        float v[32];
        T::load32(b, u, v);
        float acc = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const int hb = (int)(rf_i8)((h[i] >> (8 * k)) & 0xff), lb = (int)(rf_i8)((l[i] >> (8 * k)) & 0xff);
                acc = fmaf(v[4 * i + k], (float)(256 * hb + lb), acc);
            }
        }
        return acc * s[0];
    }
};

// ---- the row-task engine ------------------------------------------------------------------
template <int NW>
RF_DEV void fd_ldw(const int* p, int* out) {
    if (NW == 4) {
        const fd_i4 t = *(const fd_i4*)p;
        out[0] = t.x; out[1] = t.y; out[2] = t.z; out[3] = t.w;
    } else if (NW == 2) {
        const fd_i2 t = *(const fd_i2*)p;
        out[0] = t.x; out[1] = t.y;
    } else {
#pragma unroll
        for (int i = 0; i < NW; i += 4) {
            const fd_i4 t = *(const fd_i4*)(p + i);
            out[i] = t.x; out[i + 1] = t.y; out[i + 2] = t.z; out[i + 3] = t.w;
        }
    }
}

// Partial dots of rows A (and B when TWO) with the staged x over units gl, gl + lpr, ...
template <class D, bool TWO>
RF_DEV void fd_rows(const rf_u8* __restrict__ ra, const rf_u8* __restrict__ rb, const FdX& X, int cols, int gl,
                    int lpr, float& acc_a, float& acc_b) {
    const int n_units = cols / 32;  // every type: 32 values per unit
    constexpr int NWR = D::RL / 4;  // x words per run
    // the float decoders of the other types hold 32 values: no unrolling (register pressure)
#define FD_ROWS_BODY                                                                              \
    {                                                                                             \
        const int blk = it / D::UPB, u = it - blk * D::UPB;                                       \
        const int xo = blk * D::QK;                                                               \
        int h[D::NR * NWR], l[D::NR * NWR];                                                       \
        float s[D::NR], sum[D::NR];                                                               \
        _Pragma("unroll") for (int r = 0; r < D::NR; ++r) {                                       \
            const int o = xo + D::run_off(u, r);                                                  \
            fd_ldw<NWR>(X.h + o / 4, h + r * NWR);                                                \
            fd_ldw<NWR>(X.l + o / 4, l + r * NWR);                                                \
            s[r] = X.s[o / 32];                                                                   \
            if (D::RL == 16) {                                                                    \
                sum[r] = X.sum16[o / 16];                                                         \
            } else if (D::RL == 8) { /* 8-value runs: the sum from the quantized words */         \
                int sh = 0, sl = 0;                                                               \
                _Pragma("unroll") for (int i = 0; i < NWR; ++i) {                                 \
                    sh = fd_dp4a(0x01010101, h[r * NWR + i], sh);                                 \
                    sl = fd_dp4a(0x01010101, l[r * NWR + i], sl);                                 \
                }                                                                                 \
                sum[r] = FD_QX(sh, sl, s[r]);                                                     \
            } else {                                                                              \
                sum[r] = 0.0f;                                                                    \
            }                                                                                     \
        }                                                                                         \
        acc_a += D::dot(ra + (rf_i64)blk * D::BS, u, h, l, s, sum);                               \
        if (TWO) acc_b += D::dot(rb + (rf_i64)blk * D::BS, u, h, l, s, sum);                      \
    }
    if (D::GEN) {
#pragma unroll 1
        for (int it = gl; it < n_units; it += lpr) FD_ROWS_BODY
    } else {
#pragma unroll 2
        for (int it = gl; it < n_units; it += lpr) FD_ROWS_BODY
    }
#undef FD_ROWS_BODY
}

#define FD_SWITCH(t, M)                          \
    switch (t) {                                 \
        case RF_T_Q4_0: M(DQ4_0); break;         \
        case RF_T_Q4_1: M(DQ4_1); break;         \
        case RF_T_Q5_0: M(DQ5_0); break;         \
        case RF_T_Q5_1: M(DQ5_1); break;         \
        case RF_T_Q8_0: M(DQ8_0); break;         \
        case RF_T_Q4_K: M(DQ4_K); break;         \
        case RF_T_Q5_K: M(DQ5_K); break;         \
        case RF_T_Q6_K: M(DQ6_K); break;         \
        case RF_T_F32: M(DGen<QF32>); break;     \
        case RF_T_F16: M(DGen<QF16>); break;     \
        case RF_T_BF16: M(DGen<QBF16>); break;   \
        case RF_T_Q2_K: M(DGen<QQ2_K>); break;   \
        case RF_T_Q3_K: M(DGen<QQ3_K>); break;   \
        case RF_T_MXFP4: M(DGen<QMXFP4>); break; \
        default: break;                          \
    }

// the integer-dot types only: kernels instantiated for these need half the registers
#define FD_SWITCH_FAST(t, M)             \
    switch (t) {                         \
        case RF_T_Q4_0: M(DQ4_0); break; \
        case RF_T_Q4_1: M(DQ4_1); break; \
        case RF_T_Q5_0: M(DQ5_0); break; \
        case RF_T_Q5_1: M(DQ5_1); break; \
        case RF_T_Q8_0: M(DQ8_0); break; \
        case RF_T_Q4_K: M(DQ4_K); break; \
        case RF_T_Q5_K: M(DQ5_K); break; \
        case RF_T_Q6_K: M(DQ6_K); break; \
        default: break;                  \
    }

// Rows ra and rb (same type t) dotted with x: this lane's partial sums. Not inlined: one copy of
// the per-type loops serves every kernel of the module (compile time, code size). ANY: every
// type (the float-decoded ones too); else the integer-dot types of FD_SWITCH_FAST.
template <bool ANY>
__device__ FD_NOINLINE void fd_dot_pair(int t, const rf_u8* ra, const rf_u8* rb, FdX X, int cols, int gl, int lpr,
                                        float* va, float* vb) {
    float a = 0.0f, b = 0.0f;
#define FD_PAIR(D) fd_rows<D, true>(ra, rb, X, cols, gl, lpr, a, b)
    if (ANY) {
        FD_SWITCH(t, FD_PAIR)
    } else {
        FD_SWITCH_FAST(t, FD_PAIR)
    }
#undef FD_PAIR
    *va = a;
    *vb = b;
}
template <bool ANY>
__device__ FD_NOINLINE float fd_dot_one(int t, const rf_u8* ra, FdX X, int cols, int gl, int lpr) {
    float a = 0.0f, dummy = 0.0f;
#define FD_ONE(D) fd_rows<D, false>(ra, ra, X, cols, gl, lpr, a, dummy)
    if (ANY) {
        FD_SWITCH(t, FD_ONE)
    } else {
        FD_SWITCH_FAST(t, FD_ONE)
    }
#undef FD_ONE
    return a;
}

// prefetch rows ra / rb (nbytes each) into L2: lane gl of `lanes` takes the 128-byte lines gl,
// gl + lanes, ... (at most FD_PF_MAX per row), so a group's loads of its first task find them there
#define FD_PF_MAX 8
// fd_gate_up's lpr argument also carries prefetch flags (bits 8..): lpr | FD_PF_FIRST << 8: its
// prologue prefetches only each group's first row pair (not the block's 32)
#define FD_PF_FIRST 1
RF_DEV void fd_prefetch_rows(const rf_u8* ra, const rf_u8* rb, rf_i64 nbytes, int gl, int lanes) {
    const rf_i64 a0 = (rf_i64)(unsigned long long)ra & 127;
    int k = 0;
    for (rf_i64 o = 128 * (rf_i64)gl - a0; o < nbytes && k < FD_PF_MAX; o += 128 * (rf_i64)lanes, ++k) {
        fd_prefetch(ra + o);
        const rf_i64 ob = o + a0 - ((rf_i64)(unsigned long long)rb & 127);  // the same line index in row rb
        if (rb != nullptr && ob < nbytes) fd_prefetch(rb + ob);
    }
}

// ---- the wide engine (large matrices: the 7B's gate/up, down and output) -----------------------
// Streaming a large matrix is limited by the weight bytes each thread has in flight, and by the
// instructions per byte. The wide decoders (Q4_K, Q6_K) take 64-value units (a Q4_K sub-block
// pair: 32 bytes of qs; Q6_K: 16 positions x 4 groups) and split each unit into load(), which only
// issues the unit's raw aligned loads into registers, and dot(), which does the math: fd_rows_w
// loads NU units of each row of a task before any math (NU x 2 rows x 48 / 57 bytes per lane in
// flight), and the header / scale decode is paid once per 64 values. x of a unit: h[16], l[16]
// (its NR runs of RL values), s / sum per run, loaded by ldx() from the staged vector; dot() also
// gets the block's misalignment in bits (Q6_K; 0 for Q4_K).
// low 32 bits of (hi:lo) >> sh, sh 0 or 16 (2-byte aligned data read through aligned words)
RF_DEV rf_u32 fd_funnel(rf_u32 lo, rf_u32 hi, int sh) {
#if defined(RF_CUDA)
    return __funnelshift_r(lo, hi, sh);
#else
    return (rf_u32)((((unsigned long long)hi << 32) | lo) >> sh);
#endif
}
template <int NW>
RF_DEV void fd_ldx(const int* p, int* out) {
#pragma unroll
    for (int i = 0; i < NW; i += 4) {
        const fd_i4 t = *(const fd_i4*)(p + i);
        out[i] = t.x; out[i + 1] = t.y; out[i + 2] = t.z; out[i + 3] = t.w;
    }
}

// Q4_K unit j (0..3) = qs bytes 32j..32j+31: low nibbles = sub-block 2j (values 64j..64j+31), high
// nibbles = sub-block 2j+1 (values 64j+32..64j+63). Blocks 16-byte aligned (as DQ4_K reads them).
struct W4K {
    static constexpr int QK = 256, BS = 144, UPB = 4, NR = 2, RL = 32;
    struct W {
        fd_u4 hd, q0, q1;  // d, dmin | scales[12]; qs[32j .. 32j+31]
    };
    RF_DEV static void load(const rf_u8* b, int j, W& w) {
        w.hd = *(const fd_u4*)b;
        w.q0 = *(const fd_u4*)(b + 16 + 32 * j);
        w.q1 = *(const fd_u4*)(b + 32 + 32 * j);
    }
    // x of unit j: h/l[0..7] sub-block 2j, [8..15] sub-block 2j+1; s[2], sum[2] (32-value sums)
    RF_DEV static void ldx(const FdX& X, int xo, int j, int* h, int* l, float* s, float* sum) {
        const int o = xo + 64 * j;
        fd_ldx<16>(X.h + o / 4, h);
        fd_ldx<16>(X.l + o / 4, l);
        const fd_i2 sv = *(const fd_i2*)(X.s + o / 32);
        s[0] = __int_as_float(sv.x);
        s[1] = __int_as_float(sv.y);
        const rf_f4 m = *(const rf_f4*)(X.sum16 + o / 16);
        sum[0] = m.x + m.y;
        sum[1] = m.z + m.w;
    }
    RF_DEV static float dot(const W& w, int j, const int* h, const int* l, const float* s, const float* sum, int) {
        const rf_u32 q[8] = {w.q0.x, w.q0.y, w.q0.z, w.q0.w, w.q1.x, w.q1.y, w.q1.z, w.q1.w};
        int ah0 = 0, al0 = 0, ah1 = 0, al1 = 0;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int lo = (int)(q[i] & 0x0F0F0F0Fu), hi = (int)((q[i] >> 4) & 0x0F0F0F0Fu);
            ah0 = fd_dp4a(lo, h[i], ah0);
            al0 = fd_dp4a(lo, l[i], al0);
            ah1 = fd_dp4a(hi, h[8 + i], ah1);
            al1 = fd_dp4a(hi, l[8 + i], al1);
        }
        // 6-bit scales / mins of sub-blocks 2j, 2j+1: bytes 2(j&1), 2(j&1)+1 of each scale word
        const int sh = 16 * (j & 1);
        const rf_u32 a0 = w.hd.y >> sh, a1 = w.hd.z >> sh, a2 = w.hd.w >> sh;
        const bool lo4 = j < 2;
        const float sc0 = (float)(lo4 ? (a0 & 63u) : ((a2 & 15u) | (((a0 >> 6) & 3u) << 4)));
        const float sc1 = (float)(lo4 ? ((a0 >> 8) & 63u) : (((a2 >> 8) & 15u) | (((a0 >> 14) & 3u) << 4)));
        const float m0 = (float)(lo4 ? (a1 & 63u) : (((a2 >> 4) & 15u) | (((a1 >> 6) & 3u) << 4)));
        const float m1 = (float)(lo4 ? ((a1 >> 8) & 63u) : (((a2 >> 12) & 15u) | (((a1 >> 14) & 3u) << 4)));
        const float d = rf_h2f((rf_u16)(w.hd.x & 0xffffu)), dmin = rf_h2f((rf_u16)(w.hd.x >> 16));
        return d * (sc0 * FD_QX(ah0, al0, s[0]) + sc1 * FD_QX(ah1, al1, s[1])) - dmin * (m0 * sum[0] + m1 * sum[1]);
    }
};

// Q6_K unit u (0..3): half hh = u/2, positions p0 = 16(u%2) .. p0+15 of the 4 groups k (values
// 128hh + 32k + p0 ..: 16-value runs, so the x sums are the staged 16-sums). The 210-byte blocks
// are only 2-byte aligned: 16 bytes at byte offset o (o % 4 == 0 in the block) are read as 5
// aligned words and funnel-shifted by the block's misalignment (0 or 2 bytes) in dot().
struct W6K {
    static constexpr int QK = 256, BS = 210, UPB = 4, NR = 4, RL = 16;
    struct W {
        rf_u32 L[5], M[5], H[5], S[3];  // ql[64hh+p0 ..], ql[64hh+32+p0 ..], qh[32hh+p0 ..], scales[8hh ..]
        rf_u16 d;
    };
    RF_DEV static void load(const rf_u8* b, int u, W& w) {
        const int hh = u >> 1, p0 = 16 * (u & 1);
        const rf_u32* a = (const rf_u32*)((unsigned long long)b & ~3ull);  // the aligned word at / below b
        const rf_u32* L = a + (64 * hh + p0) / 4;
#pragma unroll
        for (int i = 0; i < 5; ++i) {
            w.L[i] = L[i];
            w.M[i] = L[8 + i];
        }
        const rf_u32* H = a + (128 + 32 * hh + p0) / 4;
#pragma unroll
        for (int i = 0; i < 5; ++i) w.H[i] = H[i];
        const rf_u32* S = a + (192 + 8 * hh) / 4;
#pragma unroll
        for (int i = 0; i < 3; ++i) w.S[i] = S[i];
        w.d = *(const rf_u16*)(b + 208);
    }
    RF_DEV static void ldx(const FdX& X, int xo, int u, int* h, int* l, float* s, float* sum) {
        const int hh = u >> 1, p0 = 16 * (u & 1);
        const int o = xo + 128 * hh + p0;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            fd_ldx<4>(X.h + (o + 32 * k) / 4, h + 4 * k);
            fd_ldx<4>(X.l + (o + 32 * k) / 4, l + 4 * k);
            sum[k] = X.sum16[(o + 32 * k) / 16];
        }
        const rf_f4 sv = *(const rf_f4*)(X.s + (xo + 128 * hh) / 32);
        s[0] = sv.x; s[1] = sv.y; s[2] = sv.z; s[3] = sv.w;
    }
    RF_DEV static float dot(const W& w, int u, const int* h, const int* l, const float* s, const float* sum,
                            int sh) {
        float r = 0.0f;
        const rf_u32 sc01 = fd_funnel(w.S[0], w.S[1], sh) >> (8 * (u & 1));  // sc[8hh + (u&1) + 0, 2]
        const rf_u32 sc23 = fd_funnel(w.S[1], w.S[2], sh) >> (8 * (u & 1));  // sc[8hh + (u&1) + 4, 6]
        const float sc[4] = {(float)(rf_i8)(sc01 & 0xffu), (float)(rf_i8)((sc01 >> 16) & 0xffu),
                             (float)(rf_i8)(sc23 & 0xffu), (float)(rf_i8)((sc23 >> 16) & 0xffu)};
        int ah[4] = {0, 0, 0, 0}, al[4] = {0, 0, 0, 0};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const rf_u32 L = fd_funnel(w.L[i], w.L[i + 1], sh), M = fd_funnel(w.M[i], w.M[i + 1], sh);
            const rf_u32 H = fd_funnel(w.H[i], w.H[i + 1], sh);
            const int q0 = (int)((L & 0x0F0F0F0Fu) | ((H << 4) & 0x30303030u));
            const int q1 = (int)((M & 0x0F0F0F0Fu) | ((H << 2) & 0x30303030u));
            const int q2 = (int)(((L >> 4) & 0x0F0F0F0Fu) | (H & 0x30303030u));
            const int q3 = (int)(((M >> 4) & 0x0F0F0F0Fu) | ((H >> 2) & 0x30303030u));
            ah[0] = fd_dp4a(q0, h[i], ah[0]);
            al[0] = fd_dp4a(q0, l[i], al[0]);
            ah[1] = fd_dp4a(q1, h[4 + i], ah[1]);
            al[1] = fd_dp4a(q1, l[4 + i], al[1]);
            ah[2] = fd_dp4a(q2, h[8 + i], ah[2]);
            al[2] = fd_dp4a(q2, l[8 + i], al[2]);
            ah[3] = fd_dp4a(q3, h[12 + i], ah[3]);
            al[3] = fd_dp4a(q3, l[12 + i], al[3]);
        }
#pragma unroll
        for (int k = 0; k < 4; ++k) r += sc[k] * (FD_QX(ah[k], al[k], s[k]) - 32.0f * sum[k]);
        return rf_h2f(w.d) * r;
    }
};

// Partial dots of rows A (and B when TWO) with the staged x over the 64-value units gl, gl + lpr,
// ...: NU units of each row loaded before the math of any of them
template <class D, bool TWO, int NU>
RF_DEV void fd_rows_w(const rf_u8* __restrict__ ra, const rf_u8* __restrict__ rb, const FdX& X, int cols, int gl,
                      int lpr, float& acc_a, float& acc_b) {
    const int n_units = cols / 64;
    const int sha = 8 * (int)((unsigned long long)ra & 2), shb = 8 * (int)((unsigned long long)rb & 2);
    constexpr int N = NU > 0 ? NU : 1;  // (NU 0: instantiated, never called)
#pragma unroll 1
    for (int it0 = gl; it0 < n_units; it0 += N * lpr) {
        typename D::W wa[N], wb[N];
#pragma unroll
        for (int k = 0; k < N; ++k) {
            const int it = it0 + k * lpr;
            if (it < n_units) {
                const int blk = it / D::UPB, u = it - blk * D::UPB;
                D::load(ra + (rf_i64)blk * D::BS, u, wa[k]);
                if (TWO) D::load(rb + (rf_i64)blk * D::BS, u, wb[k]);
            }
        }
#pragma unroll
        for (int k = 0; k < N; ++k) {
            const int it = it0 + k * lpr;
            if (it < n_units) {
                const int blk = it / D::UPB, u = it - blk * D::UPB;
                // the block's misalignment (Q6_K: 210 * blk bytes past a row start)
                const int ba = sha ^ ((blk & 1) * 8 * (D::BS & 2)), bb = shb ^ ((blk & 1) * 8 * (D::BS & 2));
                int h[16], l[16];
                float s[D::NR], sum[D::NR];
                D::ldx(X, blk * D::QK, u, h, l, s, sum);
                acc_a += D::dot(wa[k], u, h, l, s, sum, ba);
                if (TWO) acc_b += D::dot(wb[k], u, h, l, s, sum, bb);
            }
        }
    }
}

// Register cap of the wide kernels (CUDA): at most 256 threads per block and `b` blocks per
// multiprocessor resident (H200: 3 blocks of 256 = at most 80 registers), so the one-wave grids
// of DecodePlan (output: 3 blocks per multiprocessor) stay one wave
#if defined(RF_CUDA)
#define FD_LB(b) __launch_bounds__(256, b)
#define FD_LBT(t, b) __launch_bounds__(t, b)  // t threads per block, b blocks per multiprocessor
#else
#define FD_LB(b)
#define FD_LBT(t, b)
#endif

// fd_dot_pair / fd_dot_one through the wide engine for rows of type WT (RF_T_Q4_K / RF_T_Q6_K, NU
// units per row in flight), other types through the 32-value engine. One type and NU per kernel:
// a kernel's registers are the most any of its callees needs.
template <int WT, int NU>
__device__ FD_NOINLINE void fd_dot_pair_w(int t, const rf_u8* ra, const rf_u8* rb, FdX X, int cols, int gl, int lpr,
                                          float* va, float* vb) {
    float a = 0.0f, b = 0.0f;
    if (t == WT && WT == RF_T_Q4_K) {
        fd_rows_w<W4K, true, NU>(ra, rb, X, cols, gl, lpr, a, b);
    } else if (t == WT && WT == RF_T_Q6_K) {
        fd_rows_w<W6K, true, NU>(ra, rb, X, cols, gl, lpr, a, b);
    } else {
        fd_dot_pair<false>(t, ra, rb, X, cols, gl, lpr, &a, &b);
    }
    *va = a;
    *vb = b;
}
template <int WT, int NU>
__device__ FD_NOINLINE float fd_dot_one_w(int t, const rf_u8* ra, FdX X, int cols, int gl, int lpr) {
    float a = 0.0f, b = 0.0f;
    if (t == WT && WT == RF_T_Q4_K) {
        fd_rows_w<W4K, false, NU>(ra, ra, X, cols, gl, lpr, a, b);
    } else if (t == WT && WT == RF_T_Q6_K) {
        fd_rows_w<W6K, false, NU>(ra, ra, X, cols, gl, lpr, a, b);
    } else {
        a = fd_dot_one<false>(t, ra, X, cols, gl, lpr);
    }
    return a;
}

// ---- the stream engine (large Q4_K / Q6_K matrices: the 7B's gate/up, down and output) ----------
// A warp streams its rows through a ring of FD_SS shared-memory stages filled by asynchronous 16-byte
// copies (cp.async on CUDA sm_80+; plain copies elsewhere): while it computes stage i, stages
// i+1 .. i+S-1 are in flight, so the bytes in flight per warp are bounded by shared memory instead
// of registers, and the ring's first stages are issued before the programmatic-launch wait (weights
// only). A warp's work is a list of segments (a row, or two rows sharing x, over a range of their
// blocks); a segment is cut into `nst` stages of at most `C` whole blocks (at most SB - 16 bytes per
// row: the copy window is widened to 16-byte boundaries, so a stage keeps its rows' alignment mod
// 16). Lanes take the stage's 64-value units (W4K / W6K) round-robin; at a segment's last stage the
// warp sums its lanes (fixed order: deterministic) and hands the dots to the kernel's emit().
// The block's warps advance in lockstep (one __syncthreads per stage; FD_ST_WARP builds: one
// __syncwarp, each warp on its own), so every warp runs the same number of stages (empty ones where
// its list is shorter); the kernels synchronise the block after fd_st_run before reading other warps'
// results.
#define FD_SW 4       // warps per block of the stream kernels (128 threads of 32 lanes, or 256 of 64)
#define FD_SB 2048    // ring bytes per row per stage
#define FD_SS 2       // ring stages (FD_SS - 1 in flight while one is computed)
#define FD_SXS 4096   // d_model bound of the kernels that stage x (FdXsN<FD_SXS>: static shared <= 48 KiB)

// The ring's barrier between a stage's copies and its reads, and between its reads and the refill of
// its slot. Each warp copies into and reads from its own slots only, so a warp barrier is enough.
// Built with FD_ST_WARP=1 (the decoder's default build, tune "st_warp"; CUDA and the CPU emulator):
// __syncwarp, so each warp runs ahead on its own ring. Without it, and on HIP (where the ring's
// copies are plain stores), the block's barrier (the warps advance in lockstep).
RF_DEV void fd_st_bar() {
#if defined(FD_ST_WARP) && FD_ST_WARP && defined(RF_CUDA)
    __syncwarp();
#elif defined(FD_ST_WARP) && FD_ST_WARP && defined(RF_HOST_EMU)
    emu_syncwarp();
#else
    __syncthreads();
#endif
}

// 16 bytes global -> shared, asynchronously where the device can (dst, src 16-byte aligned)
RF_DEV void fd_cp16(void* dst, const void* src) {
#if defined(RF_CUDA) && defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
    unsigned long long s;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(s) : "l"(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"((unsigned)s), "l"(src) : "memory");
#else
    *(fd_u4*)dst = *(const fd_u4*)src;
#endif
}
RF_DEV void fd_cp_commit() {
#if defined(RF_CUDA) && defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
// wait until at most N of this thread's copy groups are pending
template <int N>
RF_DEV void fd_cp_wait() {
#if defined(RF_CUDA) && defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

// the warp copies bytes [src, src + n) into dst + (src % 16): whole 16-byte words around them
RF_DEV void fd_copy_window(rf_u8* dst, const rf_u8* src, int n, int lane) {
    const rf_u8* a0 = (const rf_u8*)((unsigned long long)src & ~15ull);
    const int nch = (int)((src + n - a0) + 15) / 16;
    for (int c = lane; c < nch; c += WARP_SIZE) fd_cp16(dst + 16 * c, a0 + 16 * c);
}

template <int NROW, int S, int SB>
struct alignas(16) FdRing {
    rf_u8 b[S][FD_SW][NROW][SB];
};

// Segment k of this warp (k >= 0): its rows p[0] (and p[1] when NROW == 2) and block range [b0, b1);
// false when the warp has fewer segments. Stage st of it: blocks [b0 + st C, min(b0 + (st+1) C, b1)).
struct FdSeg {
    const rf_u8* p[2];
    int b0, b1;
};

template <class D, int NROW, int S, int SB, class SegF>
RF_DEV void fd_st_issue(FdRing<NROW, S, SB>& R, int i, int n_items, int nst, int C, const SegF& seg) {
    FdSeg sg;
    if (i < n_items && seg(i / nst, sg)) {
        const int s0 = sg.b0 + (i % nst) * C, s1 = min(s0 + C, sg.b1);
        if (s0 < s1) {
#pragma unroll
            for (int r = 0; r < NROW; ++r)
                fd_copy_window(R.b[i % S][rf_warp()][r], sg.p[r] + (rf_i64)s0 * D::BS, (s1 - s0) * D::BS, rf_lane());
        }
    }
    fd_cp_commit();  // one group per stage, empty or not: the wait below counts groups
}

// The ring's first S - 1 stages (before fd_pdl_wait: they read weights only).
template <class D, int NROW, int S, int SB, class SegF>
RF_DEV void fd_st_start(FdRing<NROW, S, SB>& R, int n_items, int nst, int C, const SegF& seg) {
#pragma unroll
    for (int i = 0; i < S - 1; ++i) fd_st_issue<D>(R, i, n_items, nst, C, seg);
}

// Stages 0 .. n_items - 1 of this warp (n_items block-uniform; fd_st_start issued the first S - 1):
// emit(k, dot_a, dot_b) on every lane after segment k's last stage.
template <class D, int NROW, int S, int SB, class SegF, class EmitF>
RF_DEV void fd_st_run(FdRing<NROW, S, SB>& R, int n_items, int nst, int C, const SegF& seg, const FdX& X,
                      const EmitF& emit) {
    const int lane = rf_lane();
    float acc[2] = {0.0f, 0.0f};
    for (int i = 0; i < n_items; ++i) {  // block-uniform
        fd_st_issue<D>(R, i + S - 1, n_items, nst, C, seg);
        fd_cp_wait<S - 1>();
        fd_st_bar();  // stage i of this warp (every warp: block barrier) has landed
        FdSeg sg;
        const int k = i / nst, st = i - k * nst;
        if (seg(k, sg)) {  // warp-uniform
            const int s0 = sg.b0 + st * C, s1 = min(s0 + C, sg.b1);
            const int nu = max(s1 - s0, 0) * D::UPB;
            const rf_u8* base[2];
#pragma unroll
            for (int r = 0; r < NROW; ++r)
                base[r] = R.b[i % S][rf_warp()][r] + ((unsigned long long)(sg.p[r] + (rf_i64)s0 * D::BS) & 15);
            for (int u = lane; u < nu; u += WARP_SIZE) {
                const int bl = u / D::UPB, j = u - bl * D::UPB;
                typename D::W w[NROW];
#pragma unroll
                for (int r = 0; r < NROW; ++r) D::load(base[r] + bl * D::BS, j, w[r]);
                int h[16], l[16];
                float s[D::NR], sum[D::NR];
                D::ldx(X, (s0 + bl) * D::QK, j, h, l, s, sum);
#pragma unroll
                for (int r = 0; r < NROW; ++r)
                    acc[r] += D::dot(w[r], j, h, l, s, sum, 8 * (int)((unsigned long long)(base[r] + bl * D::BS) & 2));
            }
            if (st == nst - 1) {
                const float va = rf_warp_sum(acc[0]);
                const float vb = NROW == 2 ? rf_warp_sum(acc[1]) : 0.0f;
                emit(k, va, vb);
                acc[0] = acc[1] = 0.0f;
            }
        }
        fd_st_bar();  // the slot of stage i is refilled by the next iteration's issue
    }
    fd_cp_wait<0>();
}

// stages per segment and blocks per stage for segments of at most nb blocks (balanced stages)
template <class D, int SB>
RF_DEV void fd_st_shape(int nb, int& nst, int& C) {
    const int cmax = (SB - 16) / D::BS;
    nst = max(1, (nb + cmax - 1) / cmax);
    C = (nb + nst - 1) / nst;
}

// ---- embedding rows ---------------------------------------------------------------------------
// dst[0..d) = dequantized row `row` of a table of type t (threads of the block take 32-value items)
RF_DEV void fd_embed_row(int t, const rf_u8* row, int d, float* dst) {
    const int n_items = d / 32;
    for (int it = threadIdx.x; it < n_items; it += blockDim.x) {
        float v[32];
#define FD_EMB(T) T::load32(row + (rf_i64)(it / T::SUBS) * T::BS, it % T::SUBS, v)
        switch (t) {
            case RF_T_F32: FD_EMB(QF32); break;
            case RF_T_F16: FD_EMB(QF16); break;
            case RF_T_BF16: FD_EMB(QBF16); break;
            case RF_T_Q4_0: FD_EMB(QQ4_0); break;
            case RF_T_Q4_1: FD_EMB(QQ4_1); break;
            case RF_T_Q5_0: FD_EMB(QQ5_0); break;
            case RF_T_Q5_1: FD_EMB(QQ5_1); break;
            case RF_T_Q8_0: FD_EMB(QQ8_0); break;
            case RF_T_Q2_K: FD_EMB(QQ2_K); break;
            case RF_T_Q3_K: FD_EMB(QQ3_K); break;
            case RF_T_Q4_K: FD_EMB(QQ4_K); break;
            case RF_T_Q5_K: FD_EMB(QQ5_K); break;
            case RF_T_Q6_K: FD_EMB(QQ6_K); break;
            case RF_T_MXFP4: FD_EMB(QMXFP4); break;
            default:
#pragma unroll
                for (int i = 0; i < 32; ++i) v[i] = 0.0f;
                break;
        }
#undef FD_EMB
#pragma unroll
        for (int i = 0; i < 32; ++i) dst[it * 32 + i] = v[i];
    }
}

// resid = embedding row state.token (before the first step of a decode call); one block
RF_KERNEL void fd_embed(const rf_u8* __restrict__ arena, const int* __restrict__ state, int emb_t, rf_i64 emb_off,
                        rf_i64 emb_rb, int d, float* resid) {
    if (blockIdx.x != 0) return;
    fd_embed_row(emb_t, arena + emb_off + (rf_i64)state[FD_ST_TOK] * emb_rb, d, resid);
}

// ---- fd_qkv -----------------------------------------------------------------------------------
// Tasks: Q pairs (n_head * hd/2), K pairs (n_kv * hd/2), V row pairs (n_kv * hd/2). A Q/K task i
// of a head is RoPE pair i (normal: rows 2i, 2i+1; neox: rows i, i + n_rot/2; i >= n_rot/2: the
// unrotated rows n_rot + 2(i - n_rot/2) and +1). rope_cs[(pos * n_rot/2 + i) * 2 + {0,1}] =
// float(cos / sin(pos * base^(-2i/n_rot))) computed in float64 on the host.
template <class C, bool ANY>
RF_DEV void fd_qkv_impl(const rf_u8* __restrict__ arena, const int* __restrict__ state,
                        const float* __restrict__ resid, rf_i64 norm_off, float eps, int d, int tq, rf_i64 offq,
                        rf_i64 rbq, int tk, rf_i64 offk, rf_i64 rbk, int tv, rf_i64 offv, rf_i64 rbv, rf_i64 bq_off,
                        rf_i64 bk_off, rf_i64 bv_off, int n_head, int n_kv, int hd, int n_rot, int neox,
                        const float* __restrict__ rope_cs, C* __restrict__ kc, C* __restrict__ vc, int layer,
                        int n_ctx, float* __restrict__ q_out, int lpr) {
    __shared__ FdXs xsh;
    __shared__ float red[32];
    const int half = hd / 2, half_rot = n_rot / 2;
    const int nq = n_head * half, nk = n_kv * half;
    const int n_tasks = nq + 2 * nk;
    const int gpb = blockDim.x / lpr, g = threadIdx.x / lpr, gl = threadIdx.x % lpr;
    const int stride = gridDim.x * gpb;
    // which matrix / rows a task touches
#define FD_QKV_TASK(task)                                                                     \
    int which = 0, t = (task);                                                                \
    if (t >= nq) { t -= nq; which = 1; }                                                      \
    if (which == 1 && t >= nk) { t -= nk; which = 2; }                                        \
    const int head = t / half, i = t % half;                                                  \
    int a, bb;                                                                                \
    bool rot = false;                                                                         \
    if (which == 2) { a = 2 * i; bb = a + 1; }                                                \
    else if (i < half_rot) { a = neox ? i : 2 * i; bb = neox ? i + half_rot : 2 * i + 1; rot = true; } \
    else { a = n_rot + 2 * (i - half_rot); bb = a + 1; }                                      \
    const int ty = which == 0 ? tq : (which == 1 ? tk : tv);                                  \
    const rf_i64 off = which == 0 ? offq : (which == 1 ? offk : offv);                        \
    const rf_i64 rbytes = which == 0 ? rbq : (which == 1 ? rbk : rbv);                        \
    const rf_i64 boff = which == 0 ? bq_off : (which == 1 ? bk_off : bv_off);                 \
    const int row_a = head * hd + a, row_b = head * hd + bb;
    {
        const int task = blockIdx.x * gpb + g;
        if (task < n_tasks) {
            FD_QKV_TASK(task)
            (void)rot; (void)boff;
            fd_prefetch_rows(arena + off + (rf_i64)row_a * rbytes, arena + off + (rf_i64)row_b * rbytes, rbytes, gl, lpr);
        }
    }
    fd_pdl_sync();
    const int done = state[FD_ST_DONE], pos = state[FD_ST_POS];
    const FdX X = fd_stage_norm(resid, (const float*)(arena + norm_off), d, eps, &xsh, red);
    if (done) return;
    for (int base = blockIdx.x * gpb; base < n_tasks; base += stride) {  // warp-uniform
        const int task = base + g;
        const bool valid = task < n_tasks;
        FD_QKV_TASK(valid ? task : 0)
        float ba = 0.0f, bbias = 0.0f, cs = 1.0f, sn = 0.0f;
        if (valid && gl == 0) {  // epilogue operands, loaded before the dot products
            if (boff >= 0) {
                const float* bias = (const float*)(arena + boff);
                ba = bias[row_a];
                bbias = bias[row_b];
            }
            if (rot) {
                cs = rope_cs[((rf_i64)pos * half_rot + i) * 2];
                sn = rope_cs[((rf_i64)pos * half_rot + i) * 2 + 1];
            }
        }
        float va = 0.0f, vb = 0.0f;
        if (valid)
            fd_dot_pair<ANY>(ty, arena + off + (rf_i64)row_a * rbytes, arena + off + (rf_i64)row_b * rbytes, X, d, gl, lpr,
                        &va, &vb);
        va = rf_group_sum(va, lpr);
        vb = rf_group_sum(vb, lpr);
        if (valid && gl == 0) {
            va += ba;
            vb += bbias;
            float oa = va, ob = vb;
            if (rot) {
                oa = va * cs - vb * sn;
                ob = va * sn + vb * cs;
            }
            if (which == 0) {
                q_out[row_a] = oa;
                q_out[row_b] = ob;
            } else {
                C* cache = which == 1 ? kc : vc;
                const rf_i64 o = (((rf_i64)layer * n_kv + head) * n_ctx + pos) * hd;
                rf_store(cache + o + a, oa);
                rf_store(cache + o + bb, ob);
            }
        }
    }
#undef FD_QKV_TASK
}

#define FD_QKV_ARGS                                                                                     \
    const rf_u8 *arena, const int *state, const float *resid, rf_i64 norm_off, float eps, int d, int tq,  \
        rf_i64 offq, rf_i64 rbq, int tk, rf_i64 offk, rf_i64 rbk, int tv, rf_i64 offv, rf_i64 rbv,        \
        rf_i64 bq_off, rf_i64 bk_off, rf_i64 bv_off, int n_head, int n_kv, int hd, int n_rot, int neox,   \
        const float *rope_cs
#define FD_QKV_PASS                                                                                         \
    arena, state, resid, norm_off, eps, d, tq, offq, rbq, tk, offk, rbk, tv, offv, rbv, bq_off, bk_off, bv_off, \
        n_head, n_kv, hd, n_rot, neox, rope_cs

#define FD_QKV_KERNEL(name, C, ANY)                                                                 \
    RF_KERNEL void name(FD_QKV_ARGS, C* kc, C* vc, int layer, int n_ctx, float* q_out, int lpr) {    \
        fd_qkv_impl<C, ANY>(FD_QKV_PASS, kc, vc, layer, n_ctx, q_out, lpr);                          \
    }
FD_QKV_KERNEL(fd_qkv_f16, rf_u16, false)
FD_QKV_KERNEL(fd_qkv_f32, float, false)
FD_QKV_KERNEL(fd_qkv_f16_any, rf_u16, true)
FD_QKV_KERNEL(fd_qkv_f32_any, float, true)

// ---- fd_attn ----------------------------------------------------------------------------------
// Grid (n_split, n_kv, ceil(G / hpb)), 128 threads, n_split = ceil(n_ctx / 64). Block (s, g, z) takes
// keys [64s, 64s + 64) of KV head g for query heads z*hpb .. z*hpb + hpb - 1 of its group of G (8
// per pass; hpb < G spreads a large group's work over more blocks, each reading the same K/V rows),
// keys 0..pos:
//   scores: two threads per key (half of head_dim each, 16-byte loads of K), q in shared memory;
//   softmax of the chunk per head; V: each 32-lane group takes 16 keys, lanes take head_dim/32
//   dimensions; the 4 groups' sums meet in shared memory.
// Partials part_acc[s, h, :] = sum_j e^(score_hj - m_sh) V_j, part_ml[s, h] = (m_sh, l_sh). While the
// valid splits x n_head x head_dim stay <= merge_max, fd_oproj's blocks merge them (late merge);
// else the last block of KV head g (atomic counter) merges the valid splits into out[h*hd + d] and
// its quantized copy, and resets the counter; with FD_ATT_ZMERGE in hpb, the last block of each (KV
// head g, head slice z) merges that slice's heads (counter g * gridDim.z + z), so the slices' merges
// run in parallel (H100, 7B shape at position 640: 15.1 -> 13.0 us with 2 heads per block). (Tried on the H200, not kept: that merge with
// fd_merge_weights and 8 splits per load round, 35 instead of 25 us per launch for the Qwen2.5-7B
// shape; q staged with 8 independent loads per thread before the shared stores: no change.)
RF_DEV void fd_ld8(const rf_u16* p, float* o) {
    const fd_u4 t = *(const fd_u4*)p;
    o[0] = rf_h2f((rf_u16)(t.x & 0xffffu)); o[1] = rf_h2f((rf_u16)(t.x >> 16));
    o[2] = rf_h2f((rf_u16)(t.y & 0xffffu)); o[3] = rf_h2f((rf_u16)(t.y >> 16));
    o[4] = rf_h2f((rf_u16)(t.z & 0xffffu)); o[5] = rf_h2f((rf_u16)(t.z >> 16));
    o[6] = rf_h2f((rf_u16)(t.w & 0xffffu)); o[7] = rf_h2f((rf_u16)(t.w >> 16));
}
RF_DEV void fd_ld8(const float* p, float* o) {
    const rf_f4 a = ((const rf_f4*)p)[0], b = ((const rf_f4*)p)[1];
    o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w; o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
}
template <int K>
RF_DEV void fd_ldk(const rf_u16* p, float* o) {
    if (K == 1) {
        o[0] = rf_h2f(*p);
    } else if (K == 2) {
        const rf_u32 t = *(const rf_u32*)p;
        o[0] = rf_h2f((rf_u16)(t & 0xffffu)); o[1 % K] = rf_h2f((rf_u16)(t >> 16));
    } else {
        const fd_i2 t = *(const fd_i2*)p;
        o[0] = rf_h2f((rf_u16)(t.x & 0xffff)); o[1 % K] = rf_h2f((rf_u16)((rf_u32)t.x >> 16));
        o[2 % K] = rf_h2f((rf_u16)(t.y & 0xffff)); o[3 % K] = rf_h2f((rf_u16)((rf_u32)t.y >> 16));
    }
}
template <int K>
RF_DEV void fd_ldk(const float* p, float* o) {
    if (K == 1) {
        o[0] = *p;
    } else if (K == 2) {
        const fd_i2 t = *(const fd_i2*)p;
        o[0] = __int_as_float(t.x); o[1 % K] = __int_as_float(t.y);
    } else {
        const rf_f4 t = *(const rf_f4*)p;
        o[0] = t.x; o[1 % K] = t.y; o[2 % K] = t.z; o[3 % K] = t.w;
    }
}

// K cache elements of one V row slice, loaded raw (converted at use)
template <class C, int K>
struct FdV;
template <>
struct FdV<rf_u16, 1> {
    rf_u16 r;
    RF_DEV void load(const rf_u16* p) { r = *p; }
    RF_DEV void cvt(float* o) const { o[0] = rf_h2f(r); }
};
template <>
struct FdV<rf_u16, 2> {
    rf_u32 r;
    RF_DEV void load(const rf_u16* p) { r = *(const rf_u32*)p; }
    RF_DEV void cvt(float* o) const { o[0] = rf_h2f((rf_u16)(r & 0xffffu)); o[1] = rf_h2f((rf_u16)(r >> 16)); }
};
template <>
struct FdV<rf_u16, 4> {
    fd_i2 r;
    RF_DEV void load(const rf_u16* p) { r = *(const fd_i2*)p; }
    RF_DEV void cvt(float* o) const {
        o[0] = rf_h2f((rf_u16)(r.x & 0xffff)); o[1] = rf_h2f((rf_u16)((rf_u32)r.x >> 16));
        o[2] = rf_h2f((rf_u16)(r.y & 0xffff)); o[3] = rf_h2f((rf_u16)((rf_u32)r.y >> 16));
    }
};
template <>
struct FdV<float, 1> {
    float r;
    RF_DEV void load(const float* p) { r = *p; }
    RF_DEV void cvt(float* o) const { o[0] = r; }
};
template <>
struct FdV<float, 2> {
    fd_i2 r;
    RF_DEV void load(const float* p) { r = *(const fd_i2*)p; }
    RF_DEV void cvt(float* o) const { o[0] = __int_as_float(r.x); o[1] = __int_as_float(r.y); }
};
template <>
struct FdV<float, 4> {
    rf_f4 r;
    RF_DEV void load(const float* p) { r = *(const rf_f4*)p; }
    RF_DEV void cvt(float* o) const { o[0] = r.x; o[1] = r.y; o[2] = r.z; o[3] = r.w; }
};

// 8 cache elements from raw 16-byte words (f16: one word, f32: two)
RF_DEV void fd_cvt8(const fd_u4* r, float* o, const rf_u16*) {
    const fd_u4 t = r[0];
    o[0] = rf_h2f((rf_u16)(t.x & 0xffffu)); o[1] = rf_h2f((rf_u16)(t.x >> 16));
    o[2] = rf_h2f((rf_u16)(t.y & 0xffffu)); o[3] = rf_h2f((rf_u16)(t.y >> 16));
    o[4] = rf_h2f((rf_u16)(t.z & 0xffffu)); o[5] = rf_h2f((rf_u16)(t.z >> 16));
    o[6] = rf_h2f((rf_u16)(t.w & 0xffffu)); o[7] = rf_h2f((rf_u16)(t.w >> 16));
}
RF_DEV void fd_cvt8(const fd_u4* r, float* o, const float*) {
    const fd_u4 a = r[0], b = r[1];
    o[0] = __uint_as_float(a.x); o[1] = __uint_as_float(a.y); o[2] = __uint_as_float(a.z); o[3] = __uint_as_float(a.w);
    o[4] = __uint_as_float(b.x); o[5] = __uint_as_float(b.y); o[6] = __uint_as_float(b.z); o[7] = __uint_as_float(b.w);
}

template <class C, int HD, bool ES>
RF_DEV void fd_attn_impl(const int* __restrict__ state, const float* __restrict__ q, const C* __restrict__ kc,
                         const C* __restrict__ vc, float* part_acc, float* part_ml, int* counters, float* out,
                         int* oh, int* ol, float* os, float* osum, int layer, int n_head, int n_kv, int n_ctx,
                         float scale, int merge_max, int hpb) {
    constexpr int KPL = HD / 32;
    constexpr int HP = FD_ATT_HPP;
    __shared__ float qsh[FD_ATT_QMAX];
    __shared__ float sc[HP][FD_ATT_KEYS];
    __shared__ float vred[4][HP * HD];
    __shared__ float mls[FD_ATT_MAXG][2];
    __shared__ float wts[FD_ATT_MAXG][64];  // merge weights e^(m_s - M) / L per head and split
    __shared__ int s_last;
    const int split = blockIdx.x, kvh = blockIdx.y;
    const bool zmerge = (hpb & FD_ATT_ZMERGE) != 0;  // the merge per (KV head, head slice), see above
    const bool merge1 = (hpb & FD_ATT_MERGE1) != 0;  // the one-pass merge, see below
    hpb &= FD_ATT_ZMERGE - 1;
    const int G = n_head / n_kv, h0 = kvh * G;
    const int gb = (int)blockIdx.z * hpb, ge = min(G, gb + hpb);  // this block's query heads of the group
    const int j0 = split * FD_ATT_KEYS;
    const int tid = threadIdx.x, sw = tid >> 5, l32 = tid & 31;
    const int jj = tid >> 1, hf = tid & 1;
    const rf_i64 cache_off = ((rf_i64)layer * n_kv + kvh) * n_ctx * HD;
    const C* kb = kc + cache_off + (rf_i64)j0 * HD;
    const C* vb = vc + cache_off + (rf_i64)j0 * HD;
    int L = 0, done = 0;
    if (ES) {  // early state: loaded now, used after the K/V loads below are issued (no branch before them)
        done = fd_ld_state(state, FD_ST_DONE);
        L = fd_ld_state(state, FD_ST_POS) + 1;
    }
    // this thread's half K row (raw) and a prefetch of the V rows: issued before the position and q
    constexpr int KRW = (HD / 16) * (int)sizeof(C) / 2;  // 16-byte words of a half row
    fd_u4 kraw[KRW];
    const bool krow_ok = j0 + jj < n_ctx;
    if (krow_ok) {
        const fd_u4* src = (const fd_u4*)(kb + (rf_i64)jj * HD + hf * (HD / 2));
#pragma unroll
        for (int w = 0; w < KRW; ++w) kraw[w] = src[w];
        fd_prefetch(vb + (rf_i64)jj * HD + hf * (HD / 2));
    } else {
#pragma unroll
        for (int w = 0; w < KRW; ++w) kraw[w] = fd_u4{0u, 0u, 0u, 0u};
    }
    // this 32-lane group's 16 V rows (lane slice), raw
    FdV<C, KPL> vraw[16];
#pragma unroll
    for (int k = 0; k < 16; ++k) {
        const int j = 16 * sw + k;
        if (j0 + j < n_ctx) vraw[k].load(vb + (rf_i64)j * HD + l32 * KPL);
    }
    // early state: a finished sequence, or a split past the position (late merge), returns before the wait
    if (ES && (done || (j0 >= L && ((L + FD_ATT_KEYS - 1) / FD_ATT_KEYS) * n_head * HD <= merge_max))) return;
    fd_pdl_sync();
    if (!ES) {
        if (state[FD_ST_DONE]) return;
        L = state[FD_ST_POS] + 1;
    }
    // the row at pos was written by fd_qkv, possibly after the loads above (programmatic launch)
    if (j0 + jj == L - 1) {
        const fd_u4* src = (const fd_u4*)(kb + (rf_i64)jj * HD + hf * (HD / 2));
#pragma unroll
        for (int w = 0; w < KRW; ++w) kraw[w] = src[w];
    }
#pragma unroll
    for (int k = 0; k < 16; ++k) {
        const int j = 16 * sw + k;
        if (j0 + j == L - 1) vraw[k].load(vb + (rf_i64)j * HD + l32 * KPL);
    }
    const int nj = max(0, min(FD_ATT_KEYS, L - j0));
    if (nj > 0) {
        for (int t = gb * HD + tid; t < ge * HD; t += 128) qsh[t] = q[(rf_i64)h0 * HD + t] * scale;
        __syncthreads();
        for (int g0 = gb; g0 < ge; g0 += HP) {
            const int np = min(HP, ge - g0);
            float acc[HP];
#pragma unroll
            for (int g = 0; g < HP; ++g) acc[g] = 0.0f;
            if (jj < nj) {
#pragma unroll
                for (int dd = 0; dd < HD / 2; dd += 8) {
                    float kv[8];
                    fd_cvt8(kraw + (dd / 8) * (int)sizeof(C) / 2, kv, kc);
#pragma unroll
                    for (int g = 0; g < HP; ++g) {
                        if (g < np) {
                            const float* qg = qsh + (g0 + g) * HD + hf * (HD / 2) + dd;
#pragma unroll
                            for (int e = 0; e < 8; ++e) acc[g] = fmaf(qg[e], kv[e], acc[g]);
                        }
                    }
                }
            }
#pragma unroll
            for (int g = 0; g < HP; ++g) acc[g] += rf_shfl_xor(acc[g], 1);
            if (jj < nj && hf == 0) {
#pragma unroll
                for (int g = 0; g < HP; ++g)
                    if (g < np) sc[g][jj] = acc[g];
            }
            __syncthreads();
            for (int g = sw; g < np; g += 4) {  // uniform within each 32-lane group
                const float v0 = l32 < nj ? sc[g][l32] : -RF_INF;
                const float v1 = l32 + 32 < nj ? sc[g][l32 + 32] : -RF_INF;
                float m = fmaxf(v0, v1);
#pragma unroll
                for (int mm = 16; mm > 0; mm >>= 1) m = fmaxf(m, rf_shfl_xor(m, mm));
                const float e0 = l32 < nj ? expf(v0 - m) : 0.0f;
                const float e1 = l32 + 32 < nj ? expf(v1 - m) : 0.0f;
                float ls = e0 + e1;
#pragma unroll
                for (int mm = 16; mm > 0; mm >>= 1) ls += rf_shfl_xor(ls, mm);
                sc[g][l32] = e0;
                sc[g][l32 + 32] = e1;
                if (l32 == 0) {
                    mls[g0 + g][0] = m;
                    mls[g0 + g][1] = ls;
                }
            }
            __syncthreads();
            float va[HP][KPL];
#pragma unroll
            for (int g = 0; g < HP; ++g)
#pragma unroll
                for (int e = 0; e < KPL; ++e) va[g][e] = 0.0f;
#pragma unroll
            for (int k = 0; k < 16; ++k) {
                const int j = 16 * sw + k;
                if (j < nj) {
                    float vv[KPL];
                    vraw[k].cvt(vv);
#pragma unroll
                    for (int g = 0; g < HP; ++g) {
                        if (g < np) {
                            const float p = sc[g][j];
#pragma unroll
                            for (int e = 0; e < KPL; ++e) va[g][e] = fmaf(p, vv[e], va[g][e]);
                        }
                    }
                }
            }
#pragma unroll
            for (int g = 0; g < HP; ++g) {
                if (g < np) {
#pragma unroll
                    for (int e = 0; e < KPL; ++e) vred[sw][g * HD + l32 * KPL + e] = va[g][e];
                }
            }
            __syncthreads();
            for (int t = tid; t < np * HD; t += 128) {
                const float r = (vred[0][t] + vred[1][t]) + (vred[2][t] + vred[3][t]);
                part_acc[((rf_i64)split * n_head + h0 + g0 + t / HD) * HD + t % HD] = r;
            }
            __syncthreads();  // shared memory is reused by the next pass
        }
        for (int g = gb + tid; g < ge; g += 128) {
            part_ml[((rf_i64)split * n_head + h0 + g) * 2] = mls[g][0];
            part_ml[((rf_i64)split * n_head + h0 + g) * 2 + 1] = mls[g][1];
        }
    }
    const int nsv = (L + FD_ATT_KEYS - 1) / FD_ATT_KEYS;
    if (nsv * n_head * HD <= merge_max) return;  // late merge: the o-projection's blocks merge (fd_oproj)
    // the last block of this KV head (zmerge: of this KV head and head slice) merges the partials of
    // its heads mg0 .. mg1 - 1 of the group
    const int cnt_i = zmerge ? kvh * (int)gridDim.z + (int)blockIdx.z : kvh;
    const int mg0 = zmerge ? gb : 0, mg1 = zmerge ? ge : G, MG = mg1 - mg0;
    fd_fence();
    __syncthreads();
    if (tid == 0) {
        const int old = atomicAdd(counters + cnt_i, 1);
        s_last = old == (int)(zmerge ? gridDim.x : gridDim.x * gridDim.z) - 1;  // every split (and head slice)
    }
    __syncthreads();
    if (!s_last) return;
    fd_fence();
    const float* pa = part_acc;
    const float* pm = part_ml;
    if (merge1 && nsv <= 64 && MG * HD <= 2 * 128) {
        // one pass (FD_ATT_MERGE1): each thread merges its <= 2 outputs t = tid + 128 k (head mg0 + t / HD),
        // loading (m, l) and the partial of 8 splits at once per round, online rescaled to the running
        // maximum: one dependent round of loads per 8 splits instead of the (m, l) round, a barrier and
        // the partials' rounds below
        float acc[2] = {0.0f, 0.0f}, mx[2] = {-RF_INF, -RF_INF}, ls[2] = {0.0f, 0.0f};
        for (int sp0 = 0; sp0 < nsv; sp0 += 8) {
            float m[2][8], l[2][8], a[2][8];
#pragma unroll
            for (int k = 0; k < 2; ++k) {
                const int t = tid + 128 * k;
                const bool ok = t < MG * HD;
                const int h = h0 + mg0 + (ok ? t / HD : 0);
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    const int sp = sp0 + j;
                    const bool v = ok && sp < nsv;
                    m[k][j] = v ? fd_ld_l2(pm + ((rf_i64)sp * n_head + h) * 2) : -RF_INF;
                    l[k][j] = v ? fd_ld_l2(pm + ((rf_i64)sp * n_head + h) * 2 + 1) : 0.0f;
                    a[k][j] = v ? fd_ld_l2(pa + ((rf_i64)sp * n_head + h) * HD + t % HD) : 0.0f;
                }
            }
#pragma unroll
            for (int k = 0; k < 2; ++k) {
                float mc = mx[k];
#pragma unroll
                for (int j = 0; j < 8; ++j) mc = fmaxf(mc, m[k][j]);
                if (mc == -RF_INF) continue;  // nothing valid yet (no shuffles in this loop)
                const float r = mx[k] == -RF_INF ? 0.0f : expf(mx[k] - mc);
                acc[k] *= r;
                ls[k] *= r;
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    const float w = m[k][j] == -RF_INF ? 0.0f : expf(m[k][j] - mc);
                    acc[k] = fmaf(w, a[k][j], acc[k]);
                    ls[k] = fmaf(w, l[k][j], ls[k]);
                }
                mx[k] = mc;
            }
        }
#pragma unroll
        for (int k = 0; k < 2; ++k) {
            const int t = tid + 128 * k;
            if (t < MG * HD) {  // uniform within each 32-lane group (HD % 32 == 0)
                const float o = ls[k] > 0.0f ? acc[k] / ls[k] : 0.0f;
                out[(rf_i64)(h0 + mg0) * HD + t] = o;
                fd_quant32(o, ((h0 + mg0) * HD + t) / 32, true, oh, ol, os, osum);
            }
        }
        if (tid == 0) counters[cnt_i] = 0;
        return;
    }
    // per head: M = max_s m_s, inv = 1 / sum_s e^(m_s - M) l_s (32-lane groups, lanes over splits)
    float* mh = &sc[0][0];        // [G] maxima     (the score buffer is free now)
    float* ih = &sc[0][0] + 32;   // [G] inverses
    for (int g = mg0 + sw; g < mg1; g += 4) {
        const int h = h0 + g;
        float m0 = -RF_INF, l0 = 0.0f;  // the first 32 splits: one load pair per lane
        if (l32 < nsv) {
            m0 = fd_ld_l2(pm + ((rf_i64)l32 * n_head + h) * 2);
            l0 = fd_ld_l2(pm + ((rf_i64)l32 * n_head + h) * 2 + 1);
        }
        float M = m0;
        for (int sp = l32 + 32; sp < nsv; sp += 32) M = fmaxf(M, fd_ld_l2(pm + ((rf_i64)sp * n_head + h) * 2));
#pragma unroll
        for (int mm = 16; mm > 0; mm >>= 1) M = fmaxf(M, rf_shfl_xor(M, mm));
        float Ls = m0 == -RF_INF ? 0.0f : expf(m0 - M) * l0;
        for (int sp = l32 + 32; sp < nsv; sp += 32) {
            const float m = fd_ld_l2(pm + ((rf_i64)sp * n_head + h) * 2), l = fd_ld_l2(pm + ((rf_i64)sp * n_head + h) * 2 + 1);
            Ls += m == -RF_INF ? 0.0f : expf(m - M) * l;
        }
#pragma unroll
        for (int mm = 16; mm > 0; mm >>= 1) Ls += rf_shfl_xor(Ls, mm);
        const float inv = Ls > 0.0f ? 1.0f / Ls : 0.0f;
        if (l32 == 0) {
            mh[g] = M;
            ih[g] = inv;
        }
        if (nsv <= 64) {
            if (l32 < nsv) wts[g][l32] = m0 == -RF_INF ? 0.0f : expf(m0 - M) * inv;
            for (int sp = l32 + 32; sp < nsv; sp += 32) {
                const float m = fd_ld_l2(pm + ((rf_i64)sp * n_head + h) * 2);
                wts[g][sp] = m == -RF_INF ? 0.0f : expf(m - M) * inv;
            }
        }
    }
    __syncthreads();
    if (nsv <= 64 && MG * HD <= 8 * 128) {
        // every output of this thread at once, 4 splits per round: up to 32 loads in flight
        float acc[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) acc[k] = 0.0f;
        for (int sp0 = 0; sp0 < nsv; sp0 += 4) {
            float a[4][8];
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
                for (int k = 0; k < 8; ++k) {
                    const int t = tid + 128 * k;
                    a[kk][k] = (t < MG * HD && sp0 + kk < nsv)
                                   ? fd_ld_l2(pa + ((rf_i64)(sp0 + kk) * n_head + h0 + mg0 + t / HD) * HD + t % HD)
                                   : 0.0f;
                }
            }
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
                for (int k = 0; k < 8; ++k) {
                    const int t = tid + 128 * k;
                    if (t < MG * HD && sp0 + kk < nsv) acc[k] = fmaf(wts[mg0 + t / HD][sp0 + kk], a[kk][k], acc[k]);
                }
            }
        }
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const int t = tid + 128 * k;
            if (t < MG * HD) {  // uniform within each 32-lane group (HD % 32 == 0)
                out[(rf_i64)(h0 + mg0) * HD + t] = acc[k];
                fd_quant32(acc[k], ((h0 + mg0) * HD + t) / 32, true, oh, ol, os, osum);
            }
        }
    } else {
        for (int t = tid; t < MG * HD; t += 128) {
            const int g = mg0 + t / HD, h = h0 + g, dd = t % HD;
            const float M = mh[g];
            float acc = 0.0f;
            int sp = 0;
            for (; sp + 4 <= nsv; sp += 4) {  // 8 independent loads in flight
                float m[4], a[4];
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    m[k] = fd_ld_l2(pm + ((rf_i64)(sp + k) * n_head + h) * 2);
                    a[k] = fd_ld_l2(pa + ((rf_i64)(sp + k) * n_head + h) * HD + dd);
                }
#pragma unroll
                for (int k = 0; k < 4; ++k) acc += m[k] == -RF_INF ? 0.0f : expf(m[k] - M) * a[k];
            }
            for (; sp < nsv; ++sp) {
                const float m = fd_ld_l2(pm + ((rf_i64)sp * n_head + h) * 2);
                const float a = fd_ld_l2(pa + ((rf_i64)sp * n_head + h) * HD + dd);
                acc += m == -RF_INF ? 0.0f : expf(m - M) * a;
            }
            const float o = acc * ih[g];
            out[(rf_i64)h * HD + dd] = o;
            fd_quant32(o, (h * HD + dd) / 32, true, oh, ol, os, osum);
        }
    }
    if (tid == 0) counters[cnt_i] = 0;
}

#define FD_ATTN_KERNEL(kname, C, HD, ES)                                                                      \
    RF_KERNEL void kname(const int* state, const float* q, const C* kc, const C* vc, float* part_acc,          \
                         float* part_ml, int* counters, float* out, int* oh, int* ol, float* os, float* osum,  \
                         int layer, int n_head, int n_kv, int n_ctx, float scale, int merge_max, int hpb) {    \
        fd_attn_impl<C, HD, ES>(state, q, kc, vc, part_acc, part_ml, counters, out, oh, ol, os, osum, layer,   \
                                n_head, n_kv, n_ctx, scale, merge_max, hpb);                                   \
    }
FD_ATTN_KERNEL(fd_attn_f16_hd32, rf_u16, 32, true)
FD_ATTN_KERNEL(fd_attn_f16_hd64, rf_u16, 64, true)
FD_ATTN_KERNEL(fd_attn_f16_hd128, rf_u16, 128, true)
FD_ATTN_KERNEL(fd_attn_f32_hd32, float, 32, true)
FD_ATTN_KERNEL(fd_attn_f32_hd64, float, 64, true)
FD_ATTN_KERNEL(fd_attn_f32_hd128, float, 128, true)
FD_ATTN_KERNEL(fd_attn_f16_hd32_ls, rf_u16, 32, false)
FD_ATTN_KERNEL(fd_attn_f16_hd64_ls, rf_u16, 64, false)
FD_ATTN_KERNEL(fd_attn_f16_hd128_ls, rf_u16, 128, false)
FD_ATTN_KERNEL(fd_attn_f32_hd32_ls, float, 32, false)
FD_ATTN_KERNEL(fd_attn_f32_hd64_ls, float, 64, false)
FD_ATTN_KERNEL(fd_attn_f32_hd128_ls, float, 128, false)

// ---- fd_matvec --------------------------------------------------------------------------------
// y[r] = (accumulate ? y[r] : 0) + (bias ? bias[r] : 0) + W[r, :] . x   (tasks: rows r, r+1 or r; x the
// quantized vector xh/xl/xs/xsum). `ks` groups of `lpr` lanes share one task (split-K inside the
// block: group k takes units k*lpr + gl, step ks*lpr; the ks partial sums meet in shared memory):
// more lanes per long row (the 7B's down projection: 592 units per row) without a second pass.
// With tail_norm_off >= 0, the last block (atomic counter) then quantizes RMSNorm(y) * w_tail into
// oh/ol/os/osum (tools and tests; the decode plan normalizes in the consumers instead, fd_stage_norm).
// state may be null.
// the first task's rows of this lane group, prefetched into L2 before anything else
RF_DEV void fd_matvec_prefetch(const rf_u8* arena, int t, rf_i64 off, rf_i64 rb, int rows, int cols, int pair,
                               int lpr, int ks) {
    const int n_tasks = pair ? (rows + 1) / 2 : rows;
    const int ngr = blockDim.x / lpr, g = threadIdx.x / lpr, gl = threadIdx.x % lpr;
    const int gpb = ngr / ks, slot = g / ks;
    const int task = blockIdx.x * gpb + slot;
    if (task < n_tasks && slot < gpb) {
        const int ra = pair ? 2 * task : task;
        fd_prefetch_rows(arena + off + (rf_i64)ra * rb,
                         pair && ra + 1 < rows ? arena + off + (rf_i64)(ra + 1) * rb : nullptr, rb,
                         (g % ks) * lpr + gl, ks * lpr);
    }
}

// the task loop of fd_matvec / fd_oproj (every thread of the block calls)
// WT, NU: rows of type WT through the wide engine (fd_dot_pair_w; NU 0: the 32-value engine only)
template <bool ANY, int WT = 0, int NU = 0>
RF_DEV void fd_matvec_body(const rf_u8* __restrict__ arena, int t, rf_i64 off, rf_i64 rb, int rows, int cols,
                           const FdX& X, rf_i64 bias_off, float* y, int accumulate, int pair, int lpr, int ks) {
    __shared__ float kred[2][1024 / 8];  // split-K partials: [row a / b][group]
    // pair: tasks of rows (r, r+1) sharing the x loads; else one row per task (half the work per
    // lane: lower latency for small matrices)
    const int n_tasks = pair ? (rows + 1) / 2 : rows;
    const int ngr = blockDim.x / lpr, g = threadIdx.x / lpr, gl = threadIdx.x % lpr;
    const int gpb = ngr / ks, kp = g % ks, slot = g / ks;  // tasks per block, this group's K part
    const int gle = kp * lpr + gl, lpe = ks * lpr;         // lane index / lanes of the whole task
    const int stride = gridDim.x * gpb;
    const float* bias = bias_off >= 0 ? (const float*)(arena + bias_off) : nullptr;
    for (int base = blockIdx.x * gpb; base < n_tasks; base += stride) {  // block-uniform
        const int task = base + slot;
        const bool valid = task < n_tasks && slot < gpb;
        const int ra = pair ? 2 * task : task, rbw = ra + 1;
        const bool has_b = pair && rbw < rows;
        float ya = 0.0f, yb = 0.0f;
        if (valid && gl == 0 && kp == 0) {  // epilogue operands first
            if (accumulate) {
                ya = y[ra];
                if (has_b) yb = y[rbw];
            }
            if (bias) {
                ya += bias[ra];
                if (has_b) yb += bias[rbw];
            }
        }
        float va = 0.0f, vb = 0.0f;
        if (valid) {
            const rf_u8* wa = arena + off + (rf_i64)ra * rb;
            const rf_u8* wb = arena + off + (rf_i64)(has_b ? rbw : ra) * rb;
            if (NU > 0) {
                if (pair)
                    fd_dot_pair_w<WT, NU>(t, wa, wb, X, cols, gle, lpe, &va, &vb);
                else
                    va = fd_dot_one_w<WT, NU>(t, wa, X, cols, gle, lpe);
            } else if (pair) {
                fd_dot_pair<ANY>(t, wa, wb, X, cols, gle, lpe, &va, &vb);
            } else {
                va = fd_dot_one<ANY>(t, wa, X, cols, gle, lpe);
            }
        }
        va = rf_group_sum(va, lpr);
        vb = rf_group_sum(vb, lpr);
        if (ks > 1) {  // block-uniform
            if (gl == 0) {
                kred[0][g] = va;
                kred[1][g] = vb;
            }
            __syncthreads();
            if (gl == 0 && kp == 0) {
                for (int k = 1; k < ks; ++k) {
                    va += kred[0][g + k];
                    vb += kred[1][g + k];
                }
            }
            __syncthreads();  // kred is reused by the next task
        }
        if (valid && gl == 0 && kp == 0) {
            y[ra] = ya + va;
            if (has_b) y[rbw] = yb + vb;
        }
    }
}

template <bool ANY, bool ES, int WT = 0, int NU = 0>
RF_DEV void fd_matvec_impl(const rf_u8* __restrict__ arena, const int* __restrict__ state, int t, rf_i64 off,
                           rf_i64 rb, int rows, int cols, const int* xh, const int* xl, const float* xs,
                           const float* xsum, rf_i64 bias_off, float* y, int accumulate, int* counter,
                           rf_i64 tail_norm_off, float eps, int* oh, int* ol, float* os, float* osum, int pair, int lpr,
                           int ks) {
    __shared__ float red[32];
    __shared__ int s_last;
    int done = 0;
    if (ES && state != nullptr) done = fd_ld_state(state, FD_ST_DONE);
    fd_matvec_prefetch(arena, t, off, rb, rows, cols, pair, lpr, ks);
    fd_pdl_sync();
    if (!ES && state != nullptr) done = state[FD_ST_DONE];
    if (done) return;
    const FdX X = fd_x(xh, xl, xs, xsum);
    fd_matvec_body<ANY, WT, NU>(arena, t, off, rb, rows, cols, X, bias_off, y, accumulate, pair, lpr, ks);
    if (tail_norm_off < 0) return;
    fd_fence();
    __syncthreads();
    if (threadIdx.x == 0) {
        const int old = atomicAdd(counter, 1);
        s_last = old == (int)gridDim.x - 1;
    }
    __syncthreads();
    if (!s_last) return;
    fd_fence();
    fd_block_quant(y, true, (const float*)(arena + tail_norm_off), rows, eps, oh, ol, os, osum, red, nullptr);
    if (threadIdx.x == 0) *counter = 0;
}

#define FD_MATVEC_ARGS                                                                                    \
    const rf_u8 *arena, const int *state, int t, rf_i64 off, rf_i64 rb, int rows, int cols, const int *xh,   \
        const int *xl, const float *xs, const float *xsum, rf_i64 bias_off, float *y, int accumulate,        \
        int *counter, rf_i64 tail_norm_off, float eps, int *oh, int *ol, float *os, float *osum, int pair,   \
        int lpr, int ks
#define FD_MATVEC_PASS                                                                                    \
    arena, state, t, off, rb, rows, cols, xh, xl, xs, xsum, bias_off, y, accumulate, counter, tail_norm_off, \
        eps, oh, ol, os, osum, pair, lpr, ks
RF_KERNEL void fd_matvec(FD_MATVEC_ARGS) { fd_matvec_impl<false, true>(FD_MATVEC_PASS); }
RF_KERNEL void fd_matvec_any(FD_MATVEC_ARGS) { fd_matvec_impl<true, true>(FD_MATVEC_PASS); }
RF_KERNEL void fd_matvec_ls(FD_MATVEC_ARGS) { fd_matvec_impl<false, false>(FD_MATVEC_PASS); }
RF_KERNEL void fd_matvec_any_ls(FD_MATVEC_ARGS) { fd_matvec_impl<true, false>(FD_MATVEC_PASS); }
// the wide engine for Q4_K / Q6_K rows, N units per row in flight per lane (other types as fd_matvec)
// (wN: N units per row in flight; at most 256 threads per block)
RF_KERNEL FD_LB(3) void fd_matvec_w1_q4k(FD_MATVEC_ARGS) { fd_matvec_impl<false, true, RF_T_Q4_K, 1>(FD_MATVEC_PASS); }
RF_KERNEL FD_LB(3) void fd_matvec_w1_q6k(FD_MATVEC_ARGS) { fd_matvec_impl<false, true, RF_T_Q6_K, 1>(FD_MATVEC_PASS); }

// ---- fd_oproj ---------------------------------------------------------------------------------
// resid += W_o x, x = the attention output: while nsv * n_head * head_dim <= merge_max (nsv = the
// 64-key splits holding keys 0..state.pos, as fd_attn computes it) every block merges the split
// partials itself (fd_stage_merge) and fd_attn skipped its merge; otherwise x is the quantized
// vector fd_attn's merge wrote (xh/xl/xs/xsum). MV: fd_stage_merge's version (2; the "_m1" kernels: 1).
template <bool ANY, bool ES, int MV = 2>
RF_DEV void fd_oproj_impl(const rf_u8* __restrict__ arena, const int* __restrict__ state, int t, rf_i64 off,
                          rf_i64 rb, int rows, int cols, const int* xh, const int* xl, const float* xs,
                          const float* xsum, float* y, const float* part_acc, const float* part_ml, int n_head,
                          int hd, int merge_max, int pair, int lpr, int ks) {
    __shared__ FdXs xsh;
    int done = 0, pos = 0;
    if (ES) {
        done = fd_ld_state(state, FD_ST_DONE);
        pos = fd_ld_state(state, FD_ST_POS);
    }
    fd_matvec_prefetch(arena, t, off, rb, rows, cols, pair, lpr, ks);
    fd_pdl_sync();
    if (!ES) {
        done = state[FD_ST_DONE];
        pos = state[FD_ST_POS];
    }
    if (done) return;
    const int nsv = (pos + FD_ATT_KEYS) / FD_ATT_KEYS;
    FdX X;
    if (nsv * n_head * hd <= merge_max) {  // block-uniform
        X = fd_stage_merge<MV>(part_acc, part_ml, nsv, n_head, hd, &xsh);
    } else {
        X = fd_x(xh, xl, xs, xsum);
    }
    fd_matvec_body<ANY>(arena, t, off, rb, rows, cols, X, -1, y, 1, pair, lpr, ks);
}

#define FD_OPROJ_ARGS                                                                                      \
    const rf_u8 *arena, const int *state, int t, rf_i64 off, rf_i64 rb, int rows, int cols, const int *xh,    \
        const int *xl, const float *xs, const float *xsum, float *y, const float *part_acc,                   \
        const float *part_ml, int n_head, int hd, int merge_max, int pair, int lpr, int ks
#define FD_OPROJ_PASS                                                                                      \
    arena, state, t, off, rb, rows, cols, xh, xl, xs, xsum, y, part_acc, part_ml, n_head, hd, merge_max, pair, \
        lpr, ks
RF_KERNEL void fd_oproj(FD_OPROJ_ARGS) { fd_oproj_impl<false, true>(FD_OPROJ_PASS); }
RF_KERNEL void fd_oproj_any(FD_OPROJ_ARGS) { fd_oproj_impl<true, true>(FD_OPROJ_PASS); }
RF_KERNEL void fd_oproj_ls(FD_OPROJ_ARGS) { fd_oproj_impl<false, false>(FD_OPROJ_PASS); }
RF_KERNEL void fd_oproj_any_ls(FD_OPROJ_ARGS) { fd_oproj_impl<true, false>(FD_OPROJ_PASS); }
RF_KERNEL void fd_oproj_m1(FD_OPROJ_ARGS) { fd_oproj_impl<false, true, 1>(FD_OPROJ_PASS); }
RF_KERNEL void fd_oproj_any_m1(FD_OPROJ_ARGS) { fd_oproj_impl<true, true, 1>(FD_OPROJ_PASS); }

// ---- fd_gate_up -------------------------------------------------------------------------------
RF_DEV float fd_swiglu(float g, float u) { return g / (1.0f + expf(-g)) * u; }

// act[32b .. 32b+31] = a32 (block b's SwiGLU outputs, in shared memory) and its quantized 32-block b
// (the down projection's input); after a barrier, every thread of the block calls
RF_DEV void fd_act_store(const float* a32, float* act, int* oh, int* ol, float* os, float* osum) {
    if (threadIdx.x < WARP_SIZE) {
        const bool ok = threadIdx.x < 32;
        const float v = ok ? a32[threadIdx.x] : 0.0f;
        if (ok) act[32 * blockIdx.x + threadIdx.x] = v;
        fd_quant32(v, blockIdx.x, ok, oh, ol, os, osum);
    }
}

// Block b: rows r = 32b .. 32b+31 of act[r] = silu(g) * u, g = W_gate[r] . x, u = W_up[r] . x
// (x = the quantized RMSNorm-ed residual); writes act and its quantized copy (the down input).
template <bool ANY, int WT = 0, int NU = 0>
RF_DEV void fd_gate_up_impl(const rf_u8* __restrict__ arena, const int* __restrict__ state,
                            const float* __restrict__ resid, rf_i64 norm_off, float eps, int d, int tg, rf_i64 offg,
                            rf_i64 rbg, int tu, rf_i64 offu, rf_i64 rbu, int d_ff, float* __restrict__ act, int* oh,
                            int* ol, float* os, float* osum, int lpr) {
    __shared__ float a32[32];
    __shared__ FdXs xsh;
    __shared__ float red[32];
    const int pf = lpr >> 8;  // prefetch flags (FD_PF_FIRST)
    lpr &= 255;
    const int gpb = blockDim.x / lpr, g = threadIdx.x / lpr, gl = threadIdx.x % lpr;
    const int r0 = 32 * blockIdx.x;
    if (g < 32) {
        for (int k = g; k < ((pf & FD_PF_FIRST) ? g + 1 : 32); k += gpb) {  // every row of this group, or its first
            fd_prefetch_rows(arena + offg + (rf_i64)(r0 + k) * rbg, nullptr, rbg, gl, lpr);
            fd_prefetch_rows(arena + offu + (rf_i64)(r0 + k) * rbu, nullptr, rbu, gl, lpr);
        }
    }
    fd_pdl_sync();
    const int done = state[FD_ST_DONE];
    const FdX X = fd_stage_norm(resid, (const float*)(arena + norm_off), d, eps, &xsh, red);
    if (done) return;
    for (int k = g; k < 32; k += gpb) {  // 32 % gpb == 0: warp-uniform
        const rf_u8* rg = arena + offg + (rf_i64)(r0 + k) * rbg;
        const rf_u8* ru = arena + offu + (rf_i64)(r0 + k) * rbu;
        float vg, vu;
        if (NU > 0 && tg == tu) {
            fd_dot_pair_w<WT, NU>(tg, rg, ru, X, d, gl, lpr, &vg, &vu);
        } else if (NU > 0) {
            vg = fd_dot_one_w<WT, NU>(tg, rg, X, d, gl, lpr);
            vu = fd_dot_one_w<WT, NU>(tu, ru, X, d, gl, lpr);
        } else if (tg == tu) {
            fd_dot_pair<ANY>(tg, rg, ru, X, d, gl, lpr, &vg, &vu);
        } else {
            vg = fd_dot_one<ANY>(tg, rg, X, d, gl, lpr);
            vu = fd_dot_one<ANY>(tu, ru, X, d, gl, lpr);
        }
        vg = rf_group_sum(vg, lpr);
        vu = rf_group_sum(vu, lpr);
        if (gl == 0) a32[k] = fd_swiglu(vg, vu);
    }
    __syncthreads();
    fd_act_store(a32, act, oh, ol, os, osum);
}

#define FD_GATE_UP_ARGS                                                                                   \
    const rf_u8 *arena, const int *state, const float *resid, rf_i64 norm_off, float eps, int d, int tg,     \
        rf_i64 offg, rf_i64 rbg, int tu, rf_i64 offu, rf_i64 rbu, int d_ff, float *act, int *oh, int *ol,    \
        float *os, float *osum, int lpr
#define FD_GATE_UP_PASS \
    arena, state, resid, norm_off, eps, d, tg, offg, rbg, tu, offu, rbu, d_ff, act, oh, ol, os, osum, lpr
RF_KERNEL void fd_gate_up(FD_GATE_UP_ARGS) { fd_gate_up_impl<false>(FD_GATE_UP_PASS); }
RF_KERNEL void fd_gate_up_any(FD_GATE_UP_ARGS) { fd_gate_up_impl<true>(FD_GATE_UP_PASS); }
// fd_gate_up capped at 64 registers (CUDA, nvcc sm_90: 70 without the cap), so 2 blocks of 512 threads fit
// a multiprocessor: the Qwen2.5-0.5B shape's 152 blocks (32 row pairs x 16 lanes) in one wave, not two
RF_KERNEL FD_LBT(512, 2) void fd_gate_up_b2(FD_GATE_UP_ARGS) { fd_gate_up_impl<false>(FD_GATE_UP_PASS); }
// the wide engine for Q4_K gate / up rows (N units per row in flight; at most 256 threads)
RF_KERNEL FD_LB(3) void fd_gate_up_w1_q4k(FD_GATE_UP_ARGS) { fd_gate_up_impl<false, RF_T_Q4_K, 1>(FD_GATE_UP_PASS); }

// ---- fd_output --------------------------------------------------------------------------------
RF_DEV void fd_argmax_merge(float& v, int& i, float ov, int oi) {
    if (ov > v || (ov == v && oi < i) || (v != v && ov == ov)) {  // NaN never wins
        v = ov;
        i = oi;
    }
}

// logits[ra] = va and, where ra + 1 < vocab, logits[ra + 1] = vb, merged into this lane's argmax
RF_DEV void fd_logit_pair(float* logits, int vocab, int ra, float va, float vb, float& best, int& besti) {
    logits[ra] = va;
    fd_argmax_merge(best, besti, va, ra);
    if (ra + 1 < vocab) {
        logits[ra + 1] = vb;
        fd_argmax_merge(best, besti, vb, ra + 1);
    }
}

// Block-wide argmax of (v, i) pairs; thread 0 gets the result.
RF_DEV void fd_block_argmax(float& v, int& i, float* sv, int* si) {
#pragma unroll
    for (int m = WARP_SIZE / 2; m > 0; m >>= 1) {
        const float ov = rf_shfl_xor(v, m);
        const int oi = rf_shfl_xor_int(i, m);
        fd_argmax_merge(v, i, ov, oi);
    }
    __syncthreads();
    if (rf_lane() == 0) {
        sv[rf_warp()] = v;
        si[rf_warp()] = i;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        const int nw = (int)(blockDim.x / WARP_SIZE);
        for (int w = 1; w < nw; ++w) fd_argmax_merge(v, i, sv[w], si[w]);
    }
}

// The end of fd_output: block argmax of (best, besti) -> part_v / part_i; the last block (atomic
// counter) reduces the partials, writes the token (tokens_out[pos], state.token, state.done, state.pos)
// and the token's embedding row into resid. Every thread of the block calls.
RF_DEV void fd_output_tail(float best, int besti, int* state, float* resid, int d, int vocab, float* part_v, int* part_i,
                           int* counter, int* tokens_out, const int* stop_ids, int n_stop, int emb_t,
                           const rf_u8* emb, rf_i64 emb_rb, float* sv, int* si) {
    __shared__ int s_last, s_tok;
    fd_block_argmax(best, besti, sv, si);
    if (threadIdx.x == 0) {
        part_v[blockIdx.x] = best;
        part_i[blockIdx.x] = besti;
        fd_fence();
        const int old = atomicAdd(counter, 1);
        s_last = old == (int)gridDim.x - 1;
    }
    __syncthreads();
    if (!s_last) return;
    fd_fence();
    const volatile float* pv = part_v;
    const volatile int* pi = part_i;
    float v = -RF_INF;
    int i = 0x7fffffff;
    for (int b = threadIdx.x; b < (int)gridDim.x; b += blockDim.x) fd_argmax_merge(v, i, pv[b], pi[b]);
    fd_block_argmax(v, i, sv, si);
    if (threadIdx.x == 0) {
        const int tok = (i >= 0 && i < vocab) ? i : 0;
        const int pos = state[FD_ST_POS];
        tokens_out[pos] = tok;
        state[FD_ST_TOK] = tok;
        int stop = 0;
        for (int k = 0; k < n_stop; ++k) stop |= stop_ids[k] == tok;
        state[FD_ST_DONE] = stop;
        state[FD_ST_POS] = pos + 1;
        *counter = 0;
        s_tok = tok;
    }
    __syncthreads();
    fd_embed_row(emb_t, emb + (rf_i64)s_tok * emb_rb, d, resid);
}

// logits[r] = W_out[r] . x (x = RMSNorm(resid) * output_norm, staged per block); argmax over r -> the
// next token: tokens_out[pos] = token, state.token = token, state.done = token in stop_ids,
// state.pos = pos + 1; resid = embedding row `token` (the next step's input; the first layer's qkv
// blocks normalize it). Block partials of the argmax go to part_v / part_i; the last block (atomic
// counter) reduces them.
template <bool ANY, int WT = 0, int NU = 0>
RF_DEV void fd_output_impl(const rf_u8* __restrict__ arena, int* state, float* resid, rf_i64 norm_off, float eps,
                           int d, int t, rf_i64 off, rf_i64 rb, int vocab, float* __restrict__ logits, float* part_v,
                           int* part_i, int* counter, int* tokens_out, const int* stop_ids, int n_stop, int emb_t,
                           rf_i64 emb_off, rf_i64 emb_rb, int lpr) {
    __shared__ float red[32];
    __shared__ float sv[32];
    __shared__ int si[32];
    __shared__ FdXs xsh;
    const int n_tasks = (vocab + 1) / 2;
    const int gpb = blockDim.x / lpr, g = threadIdx.x / lpr, gl = threadIdx.x % lpr;
    const int stride = gridDim.x * gpb;
    {
        const int task = blockIdx.x * gpb + g;
        if (task < n_tasks)
            fd_prefetch_rows(arena + off + (rf_i64)(2 * task) * rb,
                             2 * task + 1 < vocab ? arena + off + (rf_i64)(2 * task + 1) * rb : nullptr, rb, gl, lpr);
    }
    fd_pdl_sync();
    const int done = state[FD_ST_DONE];
    const FdX X = fd_stage_norm(resid, (const float*)(arena + norm_off), d, eps, &xsh, red);
    if (done) return;
    float best = -RF_INF;
    int besti = 0x7fffffff;
    for (int base = blockIdx.x * gpb; base < n_tasks; base += stride) {  // warp-uniform
        const int task = base + g;
        const bool valid = task < n_tasks;
        const int ra = 2 * task, rbw = ra + 1;
        const bool has_b = rbw < vocab;
        float va = 0.0f, vb = 0.0f;
        if (valid) {
            const rf_u8* wa = arena + off + (rf_i64)ra * rb;
            const rf_u8* wb = arena + off + (rf_i64)(has_b ? rbw : ra) * rb;
            if (NU > 0)
                fd_dot_pair_w<WT, NU>(t, wa, wb, X, d, gl, lpr, &va, &vb);
            else
                fd_dot_pair<ANY>(t, wa, wb, X, d, gl, lpr, &va, &vb);
        }
        va = rf_group_sum(va, lpr);
        vb = rf_group_sum(vb, lpr);
        if (valid && gl == 0) fd_logit_pair(logits, vocab, ra, va, vb, best, besti);
    }
    fd_output_tail(best, besti, state, resid, d, vocab, part_v, part_i, counter, tokens_out, stop_ids, n_stop, emb_t,
                   arena + emb_off, emb_rb, sv, si);
}

#define FD_OUTPUT_ARGS                                                                                    \
    const rf_u8 *arena, int *state, float *resid, rf_i64 norm_off, float eps, int d, int t, rf_i64 off,      \
        rf_i64 rb, int vocab, float *logits, float *part_v, int *part_i, int *counter, int *tokens_out,      \
        const int *stop_ids, int n_stop, int emb_t, rf_i64 emb_off, rf_i64 emb_rb, int lpr
#define FD_OUTPUT_PASS                                                                                    \
    arena, state, resid, norm_off, eps, d, t, off, rb, vocab, logits, part_v, part_i, counter, tokens_out,   \
        stop_ids, n_stop, emb_t, emb_off, emb_rb, lpr
RF_KERNEL void fd_output(FD_OUTPUT_ARGS) { fd_output_impl<false>(FD_OUTPUT_PASS); }
RF_KERNEL void fd_output_any(FD_OUTPUT_ARGS) { fd_output_impl<true>(FD_OUTPUT_PASS); }
// the wide engine for Q6_K / Q4_K output rows (N units per row in flight; at most 256 threads)
RF_KERNEL FD_LB(3) void fd_output_w1_q6k(FD_OUTPUT_ARGS) { fd_output_impl<false, RF_T_Q6_K, 1>(FD_OUTPUT_PASS); }
RF_KERNEL FD_LB(3) void fd_output_w1_q4k(FD_OUTPUT_ARGS) { fd_output_impl<false, RF_T_Q4_K, 1>(FD_OUTPUT_PASS); }

// ---- the stream kernels (fd_st_run; Q4_K / Q6_K rows, 16-byte aligned Q4_K rows; see DecodePlan) ----
// fd_gate_up_s_q4k: fd_gate_up's work (block b: rows 32b .. 32b+31 of gate and up, d <= FD_SXS);
// each warp streams 32 / n_warps row pairs (gate[r], up[r]). Same arguments (lpr unused).
template <int S, int SB>
RF_DEV void fd_gate_up_s_impl(const rf_u8* __restrict__ arena, const int* __restrict__ state,
                              const float* __restrict__ resid, rf_i64 norm_off, float eps, int d, rf_i64 offg,
                              rf_i64 rbg, rf_i64 offu, rf_i64 rbu, float* __restrict__ act, int* oh, int* ol, float* os,
                              float* osum) {
    __shared__ float a32[32];
    __shared__ FdXsN<FD_SXS> xsh;
    __shared__ float red[32];
    __shared__ FdRing<2, S, SB> ring;
    const int rpw = 32 / (int)(blockDim.x / WARP_SIZE);  // row pairs per warp
    const int k0 = rf_warp() * rpw, r0 = 32 * blockIdx.x + k0;
    const int nb = d / W4K::QK;
    int nst, C;
    fd_st_shape<W4K, SB>(nb, nst, C);
    const int n_items = rpw * nst;
    auto seg = [&](int k, FdSeg& sg) -> bool {
        if (k >= rpw) return false;
        sg.p[0] = arena + offg + (rf_i64)(r0 + k) * rbg;
        sg.p[1] = arena + offu + (rf_i64)(r0 + k) * rbu;
        sg.b0 = 0;
        sg.b1 = nb;
        return true;
    };
    fd_st_start<W4K>(ring, n_items, nst, C, seg);
    fd_pdl_sync();
    const int done = state[FD_ST_DONE];
    const FdX X = fd_stage_norm(resid, (const float*)(arena + norm_off), d, eps, &xsh, red);
    if (done) {
        fd_cp_wait<0>();
        return;
    }
    fd_st_run<W4K>(ring, n_items, nst, C, seg, X, [&](int k, float vg, float vu) {
        if (rf_lane() == 0) a32[k0 + k] = fd_swiglu(vg, vu);
    });
    __syncthreads();
    fd_act_store(a32, act, oh, ol, os, osum);
}
#define FD_GATE_UP_S_PASS arena, state, resid, norm_off, eps, d, offg, rbg, offu, rbu, act, oh, ol, os, osum
RF_KERNEL void fd_gate_up_s_q4k(FD_GATE_UP_ARGS) {
    (void)tg; (void)tu; (void)d_ff; (void)lpr;
    fd_gate_up_s_impl<FD_SS, FD_SB>(FD_GATE_UP_S_PASS);
}
// _v1: 3 stages of 1024 bytes per row (twice the stages in flight at a time, each half as large)
RF_KERNEL void fd_gate_up_s_q4k_v1(FD_GATE_UP_ARGS) {
    (void)tg; (void)tu; (void)d_ff; (void)lpr;
    fd_gate_up_s_impl<3, 1024>(FD_GATE_UP_S_PASS);
}

// fd_output_s_<q>: fd_output's work (d <= FD_SXS); warp w of the grid's W streams the row pairs
// [w T / W, (w+1) T / W) of the T = ceil(vocab / 2) pairs (one wave of blocks). Same arguments (lpr unused).
template <class D, int S, int SB>
RF_DEV void fd_output_s_impl(const rf_u8* __restrict__ arena, int* state, float* resid, rf_i64 norm_off, float eps,
                             int d, rf_i64 off, rf_i64 rb, int vocab, float* __restrict__ logits, float* part_v,
                             int* part_i, int* counter, int* tokens_out, const int* stop_ids, int n_stop, int emb_t,
                             rf_i64 emb_off, rf_i64 emb_rb) {
    __shared__ float red[32];
    __shared__ float sv[32];
    __shared__ int si[32];
    __shared__ FdXsN<FD_SXS> xsh;
    __shared__ FdRing<2, S, SB> ring;
    const int nw = (int)(blockDim.x / WARP_SIZE);
    const rf_i64 T = (vocab + 1) / 2, W = (rf_i64)gridDim.x * nw, gw = (rf_i64)blockIdx.x * nw + rf_warp();
    const int t0 = (int)(gw * T / W), t1 = (int)((gw + 1) * T / W);
    const int nb = d / D::QK;
    int nst, C;
    fd_st_shape<D, SB>(nb, nst, C);
    const int n_items = (int)((T + W - 1) / W) * nst;
    auto seg = [&](int k, FdSeg& sg) -> bool {
        const int t = t0 + k;
        if (t >= t1) return false;
        sg.p[0] = arena + off + (rf_i64)(2 * t) * rb;
        sg.p[1] = arena + off + (rf_i64)(2 * t + 1 < vocab ? 2 * t + 1 : 2 * t) * rb;
        sg.b0 = 0;
        sg.b1 = nb;
        return true;
    };
    fd_st_start<D>(ring, n_items, nst, C, seg);
    fd_pdl_sync();
    const int done = state[FD_ST_DONE];
    const FdX X = fd_stage_norm(resid, (const float*)(arena + norm_off), d, eps, &xsh, red);
    if (done) {
        fd_cp_wait<0>();
        return;
    }
    float best = -RF_INF;
    int besti = 0x7fffffff;
    fd_st_run<D>(ring, n_items, nst, C, seg, X, [&](int k, float va, float vb) {
        if (rf_lane() == 0) fd_logit_pair(logits, vocab, 2 * (t0 + k), va, vb, best, besti);
    });
    fd_output_tail(best, besti, state, resid, d, vocab, part_v, part_i, counter, tokens_out, stop_ids, n_stop, emb_t,
                   arena + emb_off, emb_rb, sv, si);
}
#define FD_OUTPUT_S_PASS                                                                                  \
    arena, state, resid, norm_off, eps, d, off, rb, vocab, logits, part_v, part_i, counter, tokens_out, stop_ids, \
        n_stop, emb_t, emb_off, emb_rb
RF_KERNEL void fd_output_s_q6k(FD_OUTPUT_ARGS) {
    (void)t; (void)lpr;
    fd_output_s_impl<W6K, FD_SS, FD_SB>(FD_OUTPUT_S_PASS);
}
RF_KERNEL void fd_output_s_q4k(FD_OUTPUT_ARGS) {
    (void)t; (void)lpr;
    fd_output_s_impl<W4K, FD_SS, FD_SB>(FD_OUTPUT_S_PASS);
}
RF_KERNEL void fd_output_s_q6k_v1(FD_OUTPUT_ARGS) {
    (void)t; (void)lpr;
    fd_output_s_impl<W6K, 3, 1024>(FD_OUTPUT_S_PASS);
}
RF_KERNEL void fd_output_s_q4k_v1(FD_OUTPUT_ARGS) {
    (void)t; (void)lpr;
    fd_output_s_impl<W4K, 3, 1024>(FD_OUTPUT_S_PASS);
}

// fd_matvec_s_<q>: y[r] (+)= W[r] . x for the rows r0 .. r0 + rpb - 1 of block b (r0 = b rpb), x the
// quantized vector (xh, xl, xs, xsum; the down projection's input); each row's blocks are split over
// the block's warps (contiguous ranges), whose dots are added in warp order (deterministic).
#define FD_KP 32  // rows per round of the block's partial dots
template <class D, int S, int SB>
RF_DEV void fd_matvec_s_impl(const rf_u8* __restrict__ arena, const int* __restrict__ state, rf_i64 off, rf_i64 rb,
                             int rows, int cols, const int* xh, const int* xl, const float* xs, const float* xsum,
                             float* y, int accumulate, int rpb) {
    __shared__ FdRing<1, S, SB> ring;
    __shared__ float kp[FD_KP][FD_SW];
    const int nw = (int)(blockDim.x / WARP_SIZE), w = rf_warp();
    const int nb = cols / D::QK, wb0 = w * nb / nw, wb1 = (w + 1) * nb / nw;
    int nst, C;
    fd_st_shape<D, SB>((nb + nw - 1) / nw, nst, C);
    const int rbeg = blockIdx.x * rpb, rend = min(rbeg + rpb, rows);
    int r0 = rbeg;
    auto seg = [&](int k, FdSeg& sg) -> bool {
        if (k >= FD_KP || r0 + k >= rend) return false;
        sg.p[0] = sg.p[1] = arena + off + (rf_i64)(r0 + k) * rb;
        sg.b0 = wb0;
        sg.b1 = wb1;
        return true;
    };
    const int n_items = min(rpb, FD_KP) * nst;
    int done = 0;
    if (state != nullptr) done = fd_ld_state(state, FD_ST_DONE);
    fd_st_start<D>(ring, n_items, nst, C, seg);
    fd_pdl_sync();
    if (done) {
        fd_cp_wait<0>();
        return;
    }
    const FdX X = fd_x(xh, xl, xs, xsum);
    for (; r0 < rbeg + rpb; r0 += FD_KP) {  // block-uniform
        if (r0 != rbeg) fd_st_start<D>(ring, n_items, nst, C, seg);
        fd_st_run<D>(ring, n_items, nst, C, seg, X, [&](int k, float va, float) {
            if (rf_lane() == 0) kp[k][w] = va;
        });
        __syncthreads();
        for (int k = (int)threadIdx.x; k < FD_KP && r0 + k < rend; k += (int)blockDim.x) {
            float v = 0.0f;
            for (int q = 0; q < nw; ++q) v += kp[k][q];
            y[r0 + k] = (accumulate ? y[r0 + k] : 0.0f) + v;
        }
        __syncthreads();
    }
}
#define FD_MATVEC_S_ARGS                                                                                   \
    const rf_u8 *arena, const int *state, rf_i64 off, rf_i64 rb, int rows, int cols, const int *xh, const int *xl, \
        const float *xs, const float *xsum, float *y, int accumulate, int rpb
#define FD_MATVEC_S_PASS arena, state, off, rb, rows, cols, xh, xl, xs, xsum, y, accumulate, rpb
RF_KERNEL void fd_matvec_s_q4k(FD_MATVEC_S_ARGS) { fd_matvec_s_impl<W4K, 3, FD_SB>(FD_MATVEC_S_PASS); }
RF_KERNEL void fd_matvec_s_q6k(FD_MATVEC_S_ARGS) { fd_matvec_s_impl<W6K, 3, FD_SB>(FD_MATVEC_S_PASS); }
RF_KERNEL void fd_matvec_s_q4k_v1(FD_MATVEC_S_ARGS) { fd_matvec_s_impl<W4K, 4, 1024>(FD_MATVEC_S_PASS); }
RF_KERNEL void fd_matvec_s_q6k_v1(FD_MATVEC_S_ARGS) { fd_matvec_s_impl<W6K, 4, 1024>(FD_MATVEC_S_PASS); }

// ---- the x-resident matvec (long Q4_K / Q6_K rows: the 7B's down and o-projections) ------------
// y[r] (+)= W[r] . x for the rows r0 .. min(r0 + rpb, rows) - 1 of block b (r0 = b rpb). The block is
// G groups of tpg = ceil(cols / 64 / warp) warps' threads (G = blockDim / tpg, a power of two <=
// FD_XR_R); thread t of a group owns the 64-value unit t of every row (W4K / W6K; the threads past
// the last unit idle): it loads its unit of x into registers once, after the programmatic-launch
// wait, then walks its group's rows (the block's rows g, g + G, ...) RB at a time, each step's loads
// issued before the previous step's math (the first step's before the wait: weights only). So x is
// read once per thread instead of once per row (pair) and lane group as in fd_matvec, and a warp's
// loads of a row are one contiguous run (8 Q4_K blocks: 1,152 bytes). Each warp sums its lanes
// (shuffles) per row into red[row][warp]; every FD_XR_R rows the block adds each row's warps in
// order (deterministic) and writes y. get_x() (after the wait; every thread calls it) returns x, or
// sets `done` to skip the kernel.
#define FD_XR_R 32  // rows per round of the block's partial dots
#define FD_XR_W 32  // most warps per block
#define FD_XR_T 384 // most threads per block (cols <= 64 FD_XR_T: DecodePlan._xr_shape)
template <class D, int RB, class GetX>
RF_DEV void fd_xr_rows(const rf_u8* __restrict__ arena, rf_i64 off, rf_i64 rb, int rows, int cols, float* y,
                       int accumulate, int rpb, GetX get_x) {
    __shared__ float red[FD_XR_R][FD_XR_W];
    const int n_units = cols / 64;
    const int tpg = (n_units + WARP_SIZE - 1) / WARP_SIZE * WARP_SIZE, wpg = tpg / WARP_SIZE;
    const int G = (int)blockDim.x / tpg, g = (int)threadIdx.x / tpg, t = (int)threadIdx.x % tpg, w = rf_warp();
    const bool act = t < n_units && g < G;
    const int blk = t / D::UPB, u = t - blk * D::UPB;
    const rf_u8* wp = arena + off + (rf_i64)blk * D::BS;  // this thread's unit of row 0
    const int rbeg = (int)blockIdx.x * rpb, nrows = min(rpb, rows - rbeg);
    const int nj = nrows > 0 ? (nrows + G - 1) / G : 0;  // steps of every group (block-uniform)
    typename D::W wa[RB], wb[RB];
    auto load = [&](typename D::W* wv, int j) {  // this group's rows j .. j + RB - 1
#pragma unroll
        for (int k = 0; k < RB; ++k) {
            const int i = g + G * (j + k);
            if (act && i < nrows) D::load(wp + (rf_i64)(rbeg + i) * rb, u, wv[k]);
        }
    };
    load(wa, 0);
    fd_pdl_sync();
    bool done = false;
    const FdX X = get_x(done);
    if (done || nj == 0) return;  // block-uniform
    int h[16], l[16];
    float s[D::NR], sum[D::NR];
    if (act) D::ldx(X, blk * D::QK, u, h, l, s, sum);
    int i_round = 0;  // the first row of the round
    auto step = [&](typename D::W* wv, int j) {
#pragma unroll
        for (int k = 0; k < RB; ++k) {
            if (j + k >= nj) break;  // block-uniform
            const int i = g + G * (j + k);
            float v = 0.0f;
            if (act && i < nrows) {
                const rf_u8* p = wp + (rf_i64)(rbeg + i) * rb;  // Q6_K: the block's misalignment in bits
                v = D::dot(wv[k], u, h, l, s, sum, 8 * (int)((unsigned long long)p & 2));
            }
            v = rf_warp_sum(v);
            if (rf_lane() == 0 && g < G) red[i % FD_XR_R][w] = v;
            const int i_next = G * (j + k + 1);  // the first row of the next step
            if (i_next - i_round == FD_XR_R || j + k + 1 == nj) {  // the round is complete (block-uniform)
                const int n = min(i_next, nrows) - i_round;
                __syncthreads();
                for (int q = (int)threadIdx.x; q < n; q += (int)blockDim.x) {
                    const int ir = i_round + q, w0 = (ir % G) * wpg;
                    float v2 = 0.0f;
                    for (int e = 0; e < wpg; ++e) v2 += red[ir % FD_XR_R][w0 + e];
                    y[rbeg + ir] = (accumulate ? y[rbeg + ir] : 0.0f) + v2;
                }
                __syncthreads();
                i_round = i_next;
            }
        }
    };
    for (int j = 0; j < nj; j += 2 * RB) {  // block-uniform
        load(wb, j + RB);
        step(wa, j);
        if (j + RB >= nj) break;
        load(wa, j + 2 * RB);
        step(wb, j + RB);
    }
}

// fd_matvec_xr_<q>: the down projection (x: the quantized SwiGLU output; arguments as fd_matvec_s)
template <class D, int RB>
RF_DEV void fd_matvec_xr_impl(const rf_u8* __restrict__ arena, const int* __restrict__ state, rf_i64 off, rf_i64 rb,
                              int rows, int cols, const int* xh, const int* xl, const float* xs, const float* xsum,
                              float* y, int accumulate, int rpb) {
    const int done0 = state != nullptr ? fd_ld_state(state, FD_ST_DONE) : 0;
    fd_xr_rows<D, RB>(arena, off, rb, rows, cols, y, accumulate, rpb, [&](bool& done) {
        done = done0 != 0;
        return fd_x(xh, xl, xs, xsum);
    });
}
#define FD_XR_KERNEL(name, D, RB) \
    RF_KERNEL FD_LBT(FD_XR_T, 1) void name(FD_MATVEC_S_ARGS) { fd_matvec_xr_impl<D, RB>(FD_MATVEC_S_PASS); }
FD_XR_KERNEL(fd_matvec_xr_q4k, W4K, 2)
FD_XR_KERNEL(fd_matvec_xr_q6k, W6K, 2)
FD_XR_KERNEL(fd_matvec_xr_q4k_r1, W4K, 1)
FD_XR_KERNEL(fd_matvec_xr_q6k_r1, W6K, 1)
FD_XR_KERNEL(fd_matvec_xr_q4k_r4, W4K, 4)
FD_XR_KERNEL(fd_matvec_xr_q6k_r4, W6K, 4)

// fd_oproj_xr_<q>: fd_oproj's work (resid += W_o x; x merged by each block from the attention's split
// partials while nsv * n_head * head_dim <= merge_max, else the vector fd_attn's merge wrote) through
// fd_xr_rows: rows in runs of rpb per block (the arguments of fd_oproj; t, pair, lpr unused, ks = rpb)
template <class D>
RF_DEV void fd_oproj_xr_impl(const rf_u8* __restrict__ arena, const int* __restrict__ state, rf_i64 off, rf_i64 rb,
                             int rows, int cols, const int* xh, const int* xl, const float* xs, const float* xsum,
                             float* y, const float* part_acc, const float* part_ml, int n_head, int hd, int merge_max,
                             int rpb) {
    __shared__ FdXs xsh;
    const int done0 = fd_ld_state(state, FD_ST_DONE), pos = fd_ld_state(state, FD_ST_POS);
    fd_xr_rows<D, 2>(arena, off, rb, rows, cols, y, 1, rpb, [&](bool& done) {
        done = done0 != 0;
        const int nsv = (pos + FD_ATT_KEYS) / FD_ATT_KEYS;
        FdX X;
        if (!done && nsv * n_head * hd <= merge_max) {  // block-uniform
            X = fd_stage_merge<2>(part_acc, part_ml, nsv, n_head, hd, &xsh);
        } else {
            X = fd_x(xh, xl, xs, xsum);
        }
        return X;
    });
}
#define FD_OPROJ_XR_KERNEL(name, D)                                                                       \
    RF_KERNEL FD_LBT(FD_XR_T, 1) void name(FD_OPROJ_ARGS) {                                              \
        (void)t; (void)pair; (void)lpr;                                                                   \
        fd_oproj_xr_impl<D>(arena, state, off, rb, rows, cols, xh, xl, xs, xsum, y, part_acc, part_ml, n_head, hd, \
                            merge_max, ks);                                                               \
    }
FD_OPROJ_XR_KERNEL(fd_oproj_xr_q4k, W4K)
FD_OPROJ_XR_KERNEL(fd_oproj_xr_q6k, W6K)

// fd_gate_up_xr_q4k: fd_gate_up's work for all-Q4_K gate / up rows (d % 256 == 0, d <= FD_SXS) in
// one wave of blocks that loop over the 32-row blocks b = blockIdx.x, + gridDim.x, ...: every block
// stages the normalized x once (not once per 32 rows), then each group of tpg = ceil(d / 64 / warp)
// warps' threads keeps one 64-value unit of x in registers (as fd_matvec_xr) and walks its rows
// g, g + G, ... of each 32-row block (G = blockDim / tpg groups), RB row pairs (gate[r], up[r]) per
// step, the next step's loads issued before this step's math (the first before the wait). Each warp
// sums its lanes into pg / pu[parity][row][warp of the group]; when a 32-row block is complete the
// block syncs and warp 0 adds the group's warps in order, applies SwiGLU and writes act and its
// quantized block (fd_quant32) while the others go on with the next block's rows (the partials of
// consecutive blocks alternate between two buffers). Same arguments as fd_gate_up (lpr unused).
template <int RB>
RF_DEV void fd_gate_up_xr_impl(const rf_u8* __restrict__ arena, const int* __restrict__ state,
                               const float* __restrict__ resid, rf_i64 norm_off, float eps, int d, rf_i64 offg,
                               rf_i64 rbg, rf_i64 offu, rf_i64 rbu, int d_ff, float* __restrict__ act, int* oh, int* ol,
                               float* os, float* osum) {
    __shared__ FdXsN<FD_SXS> xsh;
    __shared__ float red[32];
    __shared__ float pg[2][32][2], pu[2][32][2];  // [parity][row of the 32][warp of the group] (tpg <= 64)
    const int n_units = d / 64;
    const int tpg = (n_units + WARP_SIZE - 1) / WARP_SIZE * WARP_SIZE, wpg = tpg / WARP_SIZE;
    const int G = (int)blockDim.x / tpg, g = (int)threadIdx.x / tpg, t = (int)threadIdx.x % tpg, wig = t / WARP_SIZE;
    const bool act_t = t < n_units && g < G;
    const int blk = t / W4K::UPB, u = t - blk * W4K::UPB;
    const int nrb = d_ff / 32, R = 32 / G, gs = (int)gridDim.x;
    const int nj = (nrb - (int)blockIdx.x + gs - 1) / gs * R;  // this group's rows (block-uniform)
    auto rowof = [&](int j) { return 32 * ((int)blockIdx.x + (j / R) * gs) + g + G * (j % R); };
    const rf_u8* wg0 = arena + offg + (rf_i64)blk * W4K::BS;
    const rf_u8* wu0 = arena + offu + (rf_i64)blk * W4K::BS;
    W4K::W ga[RB], ua[RB], gb[RB], ub[RB];
    auto load = [&](W4K::W* gw, W4K::W* uw, int j) {
#pragma unroll
        for (int k = 0; k < RB; ++k) {
            if (act_t && j + k < nj) {
                const int r = rowof(j + k);
                W4K::load(wg0 + (rf_i64)r * rbg, u, gw[k]);
                W4K::load(wu0 + (rf_i64)r * rbu, u, uw[k]);
            }
        }
    };
    load(ga, ua, 0);
    fd_pdl_sync();
    const int done = state[FD_ST_DONE];
    const FdX X = fd_stage_norm(resid, (const float*)(arena + norm_off), d, eps, &xsh, red);
    if (done || nj == 0) return;  // block-uniform
    int h[16], l[16];
    float s[2], sum[2];
    if (act_t) W4K::ldx(X, blk * W4K::QK, u, h, l, s, sum);
    auto step = [&](W4K::W* gw, W4K::W* uw, int j) {
#pragma unroll
        for (int k = 0; k < RB; ++k) {
            const int jj = j + k;
            if (jj >= nj) break;  // block-uniform
            float vg = 0.0f, vu = 0.0f;
            if (act_t) {
                vg = W4K::dot(gw[k], u, h, l, s, sum, 0);
                vu = W4K::dot(uw[k], u, h, l, s, sum, 0);
            }
            vg = rf_warp_sum(vg);
            vu = rf_warp_sum(vu);
            const int par = (jj / R) & 1, kk = g + G * (jj % R);
            if (rf_lane() == 0 && g < G) {
                pg[par][kk][wig] = vg;
                pu[par][kk][wig] = vu;
            }
            if ((jj + 1) % R == 0) {  // the 32-row block jj / R is complete (block-uniform)
                __syncthreads();
                if (threadIdx.x < WARP_SIZE) {
                    const int k32 = (int)threadIdx.x;
                    const bool ok = k32 < 32;
                    const int rbk = (int)blockIdx.x + (jj / R) * gs;
                    float v = 0.0f;
                    if (ok) {
                        float sg = 0.0f, su = 0.0f;
                        for (int q = 0; q < wpg; ++q) {
                            sg += pg[par][k32][q];
                            su += pu[par][k32][q];
                        }
                        v = fd_swiglu(sg, su);
                        act[32 * rbk + k32] = v;
                    }
                    fd_quant32(v, rbk, ok, oh, ol, os, osum);
                }
            }
        }
    };
    for (int j = 0; j < nj; j += 2 * RB) {  // block-uniform
        load(gb, ub, j + RB);
        step(ga, ua, j);
        if (j + RB >= nj) break;
        load(ga, ua, j + 2 * RB);
        step(gb, ub, j + RB);
    }
}
#define FD_GATE_UP_XR_KERNEL(name, RB)                                                                   \
    RF_KERNEL FD_LBT(256, 1) void name(FD_GATE_UP_ARGS) {                                                \
        (void)tg; (void)tu; (void)lpr;                                                                   \
        fd_gate_up_xr_impl<RB>(arena, state, resid, norm_off, eps, d, offg, rbg, offu, rbu, d_ff, act, oh, ol, os, \
                               osum);                                                                    \
    }
FD_GATE_UP_XR_KERNEL(fd_gate_up_xr_q4k, 2)
FD_GATE_UP_XR_KERNEL(fd_gate_up_xr_q4k_r1, 1)
