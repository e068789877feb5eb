// norm.hip - RMSNorm over the last axis.
//
//   rms_norm(x, w, out, n, d, eps)
//     out[i, :] = x[i, :] / sqrt(mean(x[i, :]^2) + eps) * w[:]     x, out: [n, d] f32; w: [d] f32
//   rms_norm_f16: the same, out rounded to f16 (the prefill GEMMs' input, backend/prefill.py)
//   One block per row; block-wide f32 sum of squares (each thread sums a strided slice,
//   then warp shuffles and one shared-memory pass).
// Reference: float64 numpy in tests/gpu/test_norm.py.
#include "compat.h"

template <class O>
RF_DEV void rms_norm_impl(const float* __restrict__ x, const float* __restrict__ w, O* __restrict__ out,
                          int n, int d, float eps) {
    __shared__ float scratch[32];
    const int i = blockIdx.x;
    if (i >= n) return;  // block-uniform
    const float* xr = x + (rf_i64)i * d;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        const float t = xr[c];
        ss += t * t;
    }
    ss = rf_block_sum(ss, scratch);
    const float inv = 1.0f / sqrtf(ss / (float)d + eps);
    O* o = out + (rf_i64)i * d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) rf_store(o + c, xr[c] * inv * w[c]);
}

RF_KERNEL void rms_norm(const float* x, const float* w, float* out, int n, int d, float eps) {
    rms_norm_impl<float>(x, w, out, n, d, eps);
}
RF_KERNEL void rms_norm_f16(const float* x, const float* w, rf_u16* out, int n, int d, float eps) {
    rms_norm_impl<rf_u16>(x, w, out, n, d, eps);
}
