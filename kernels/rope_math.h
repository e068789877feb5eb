// rope_math.h - the rotation of one RoPE pair, shared by rope.hip and prefill.hip.
//
// Pair i < n_rot/2 of a head: normal style (llama.cpp NORMAL, GGUF llama tensors) rotates
// (x[2i], x[2i+1]), neox style (qwen2) rotates (x[i], x[i + n_rot/2]), by
//   theta = pos * base^(-2i / n_rot)
// computed in double precision (positions of 1000+ times inverse frequencies need more than f32
// to stay within 1e-6 rad), then rounded to f32 cos / sin.
#pragma once

// the two indices pair i rotates
RF_DEV void rf_rope_pair_index(int i, int half_rot, int neox, int* a, int* b) {
    *a = neox ? i : 2 * i;
    *b = neox ? i + half_rot : 2 * i + 1;
}

// (x0, x1) rotated by pair i's angle at position pos
RF_DEV void rf_rope_rotate(float* x0, float* x1, int pos, int i, int n_rot, float base) {
    const double inv_freq = pow((double)base, -2.0 * (double)i / (double)n_rot);
    const double theta = (double)pos * inv_freq;
    const float cs = (float)cos(theta), sn = (float)sin(theta);
    const float a = *x0, b = *x1;
    *x0 = a * cs - b * sn;
    *x1 = a * sn + b * cs;
}
