// rope.hip - rotary position embedding, llama.cpp NORMAL and NEOX styles.
//
//   rope(x, out, positions, n, heads, head_dim, n_rot, base, neox)
//     x, out: [n, heads, head_dim] f32; positions: [n] int32 (device memory, so a captured
//     decode graph reads the current position). For pair i < n_rot/2 at position p:
//       theta = p * base^(-2i / n_rot)
//       normal: (x[2i], x[2i+1]) rotated;  neox: (x[i], x[i + n_rot/2]) rotated
//     dims >= n_rot are copied unchanged.
//   One thread per (token, head, pair); the angle is computed in double precision (positions
//   of 1000+ times inverse frequencies need more than f32 to stay within 1e-6 rad).
// Reference: float64 numpy in tests/gpu/test_rope.py.
#include "compat.h"
#include "rope_math.h"

RF_KERNEL void rope(const float* __restrict__ x, float* __restrict__ out, const int* __restrict__ positions,
                    int n, int heads, int head_dim, int n_rot, float base, int neox) {
    const int half_rot = n_rot / 2;
    const int pairs_per_head = head_dim / 2;  // pairs beyond half_rot copy through
    const rf_i64 total = (rf_i64)n * heads * pairs_per_head;
    for (rf_i64 t = (rf_i64)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (rf_i64)gridDim.x * blockDim.x) {
        const int i = (int)(t % pairs_per_head);
        const rf_i64 row = t / pairs_per_head;  // token * heads + head
        const int tok = (int)(row / heads);
        const float* xr = x + row * head_dim;
        float* o = out + row * head_dim;
        if (i >= half_rot) {
            // untouched tail: for each pair slot beyond the rotated ones copy two values
            const int c = n_rot + 2 * (i - half_rot);
            o[c] = xr[c];
            if (c + 1 < head_dim) o[c + 1] = xr[c + 1];
            continue;
        }
        int a, b;
        rf_rope_pair_index(i, half_rot, neox, &a, &b);
        float x0 = xr[a], x1 = xr[b];
        rf_rope_rotate(&x0, &x1, positions[tok], i, n_rot, base);
        o[a] = x0;
        o[b] = x1;
    }
}
