"""The reference backend: float32 NumPy, weights dequantized at load with `gguf.quants`.

Exact and readable: every op is a few lines of array math. It is the oracle that the GPU
backend is tested against.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType, quants

from ..gguf_file import TensorInfo

SUPPORTED_TYPES = {
    GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q5_0,
    GGMLQuantizationType.Q5_1, GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q2_K,
    GGMLQuantizationType.Q3_K, GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K,
    GGMLQuantizationType.Q6_K, GGMLQuantizationType.MXFP4,
}


def dequantize_tensor(tensor: TensorInfo) -> np.ndarray:
    """The tensor's values as float32 in its numpy shape, via gguf.quants (the reference)."""
    if tensor.qtype not in SUPPORTED_TYPES:
        raise ValueError(
            f"tensor '{tensor.name}': quantization type {tensor.qtype.name} is not supported "
            f"(supported: {', '.join(sorted(t.name for t in SUPPORTED_TYPES))})"
        )
    if tensor.qtype == GGMLQuantizationType.F32:
        return np.ascontiguousarray(tensor.raw.view(np.float32).reshape(tensor.shape))
    rows = tensor.raw.reshape(tensor.shape[0] if len(tensor.shape) > 1 else 1, -1)
    values = quants.dequantize(rows, tensor.qtype)
    return np.ascontiguousarray(values.reshape(tensor.shape), dtype=np.float32)


class NumpyBackend:
    """float32 reference implementation of `backend.base.Backend`."""

    name = "numpy"

    def __init__(self) -> None:
        self._rope_tables: dict[tuple[int, float], np.ndarray] = {}
        self._weights = {"tensors": 0, "bytes": 0, "file_bytes": 0}
        self._kv_bytes: list[int] = []

    # --- weights and memory ---------------------------------------------------------
    @staticmethod
    def _layout(values: np.ndarray) -> np.ndarray:
        """Matrices [out, in] with out >= 2 in (gate/up, the embedding / output) column-major, the
        others (Q/K/V, o- and down projections) row-major: measured on a 2-core machine with cold
        caches, the faster BLAS products for each shape at once in decode (gemv) and prefill (gemm)."""
        if values.ndim != 2:
            return values
        if values.shape[0] >= 2 * values.shape[1]:
            return np.asfortranarray(values)
        return np.ascontiguousarray(values)

    def load_weight(self, tensor: TensorInfo) -> np.ndarray:
        """float32 values in the tensor's shape, matrices in the layout `_layout` picks."""
        values = self._layout(dequantize_tensor(tensor))
        self._weights["tensors"] += 1
        self._weights["bytes"] += values.nbytes
        self._weights["file_bytes"] += tensor.n_bytes
        return values

    def fuse_rows(self, matrices: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Stack matrices [out_i, in] (or vectors [out_i]) into one [sum out_i, in] array stored like
        `load_weight` stores matrices; returns it and a view of each part. One product with the
        stacked matrix streams the same bytes as the separate ones at ~1.3x their speed (decode on
        a 2-core machine: small BLAS calls pay a fixed cost each)."""
        fused = self._layout(np.concatenate(matrices, axis=0))
        views, start = [], 0
        for m in matrices:
            views.append(fused[start:start + m.shape[0]])
            start += m.shape[0]
        return fused, views

    def new_kv_cache(self, n_layer: int, n_head_kv: int, n_ctx: int, head_dim: int):
        shape = (n_layer, n_head_kv, n_ctx, head_dim)
        k, v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        self._kv_bytes.append(k.nbytes + v.nbytes)
        return k, v

    def memory_stats(self) -> dict:
        """Host memory held by the engine: float32 weights (vs their size in the file) and KV caches."""
        return {
            "device": {"name": "cpu (NumPy float32 reference)"},
            "weights": dict(self._weights),
            "kv_cache": {"buffers": len(self._kv_bytes), "bytes": sum(self._kv_bytes), "dtype": "f32"},
        }

    def to_numpy(self, x) -> np.ndarray:
        return np.asarray(x)

    def from_numpy(self, x) -> np.ndarray:
        return np.asarray(x)

    # --- math ---------------------------------------------------------------------
    def embed(self, table: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return table[ids]  # [n, d_model]

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        ms = np.einsum("nd,nd->n", x, x)[:, None] / np.float32(x.shape[-1])  # [n, 1]
        out = x / np.sqrt(ms + np.float32(eps))  # [n, d]
        out *= weight
        return out

    def linear(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
        if x.shape[0] == 1:  # decode: a matrix-vector product (gemv), ~10% faster than gemm with n=1
            y = (weight @ x[0])[None]  # [out, in] @ [in] -> [1, out]
        elif weight.flags.c_contiguous:  # row-major weights: W x^T is the faster gemm (5-20%)
            y = np.ascontiguousarray((weight @ x.T).T)  # ([out, in] @ [in, n]).T -> [n, out]
        else:
            y = x @ weight.T  # [n, in] @ [in, out] -> [n, out]
        if bias is not None:
            y += bias
        return y

    def _rope_table(self, n_rot: int, base: float, max_pos: int) -> np.ndarray:
        """exp(i * pos * base^(-2j/n_rot)) for pos < max_pos: complex64 [max_pos, n_rot/2] (cached)."""
        key = (n_rot, float(base))
        table = self._rope_tables.get(key)
        if table is None or table.shape[0] < max_pos:
            size = max(max_pos, 4096)
            inv_freq = base ** (-np.arange(0, n_rot // 2, dtype=np.float64) * 2.0 / n_rot)
            angles = np.arange(size, dtype=np.float64)[:, None] * inv_freq[None, :]
            table = np.exp(1j * angles).astype(np.complex64)
            self._rope_tables[key] = table
        return table

    def rope(self, x: np.ndarray, positions: np.ndarray, n_rot: int, base: float, style: str) -> np.ndarray:
        """Rotations as complex products: each rotated pair (a, b) is a + ib times exp(i*angle)."""
        # x: [n, heads, head_dim]; rot: [n, 1, n_rot/2] complex
        half = n_rot // 2
        rot = self._rope_table(n_rot, base, int(positions.max()) + 1)[positions][:, None, :]
        if style == "normal" and n_rot == x.shape[-1]:  # every pair rotates: no copy of the rest
            pairs = np.array(x, dtype=np.float32, order="C").view(np.complex64)  # a copy: x stays as it was
            pairs *= rot
            return pairs.view(np.float32)
        out = x.copy()
        if style == "normal":    # pairs (x[2i], x[2i+1]) are adjacent: a complex view of the floats
            pairs = np.ascontiguousarray(x[..., :n_rot]).view(np.complex64)
            out[..., :n_rot] = (pairs * rot).view(np.float32)
        elif style == "neox":    # pairs (x[i], x[i + n_rot/2]) are split halves
            z = (x[..., :half] + 1j * x[..., half:n_rot]) * rot
            out[..., :half] = z.real
            out[..., half:n_rot] = z.imag
        else:
            raise ValueError(f"unknown rope style '{style}' (expected 'normal' or 'neox')")
        return out

    def kv_store(self, k_cache, v_cache, layer: int, k: np.ndarray, v: np.ndarray, start: int) -> None:
        n = k.shape[0]
        k_cache[layer, :, start:start + n, :] = k.transpose(1, 0, 2)  # [n_head_kv, n, head_dim]
        v_cache[layer, :, start:start + n, :] = v.transpose(1, 0, 2)

    def attn_scores(self, q: np.ndarray, k_cache, layer: int, start: int, n_keys: int, scale: float) -> np.ndarray:
        n, n_head, head_dim = q.shape
        n_head_kv = k_cache.shape[1]
        group = n_head // n_head_kv
        qg = q.transpose(1, 0, 2).reshape(n_head_kv, group, n, head_dim)   # [n_kv, group, n, hd]
        keys = k_cache[layer, :, None, :n_keys, :]                         # [n_kv, 1, L, hd] (a view)
        scores = np.matmul(qg, keys.swapaxes(-1, -2))                      # [n_kv, group, n, L]
        scores *= np.float32(scale)
        scores = scores.reshape(n_head, n, n_keys)
        if n > 1:  # a single new token sees every cached key: nothing to mask
            q_pos = start + np.arange(n)[:, None]                           # [n, 1]
            k_pos = np.arange(n_keys)[None, :]                              # [1, L]
            scores += np.where(k_pos > q_pos, np.float32(-np.inf), np.float32(0))  # causal mask [n, L]
        return scores

    def softmax(self, scores: np.ndarray) -> np.ndarray:
        e = scores - scores.max(axis=-1, keepdims=True)  # (methods: np.max adds ~6 us of Python per call)
        np.exp(e, out=e)
        e /= e.sum(axis=-1, keepdims=True)
        return e

    def attn_mix(self, probs: np.ndarray, v_cache, layer: int, n_keys: int) -> np.ndarray:
        n_head, n, _ = probs.shape
        n_head_kv, head_dim = v_cache.shape[1], v_cache.shape[3]
        group = n_head // n_head_kv
        pg = probs.reshape(n_head_kv, group * n, n_keys)                   # [n_kv, group * n, L]
        values = v_cache[layer, :, :n_keys, :]                              # [n_kv, L, hd] (a view)
        out = np.matmul(pg, values)  # [n_kv, group * n, hd]: one product per KV head (2x faster than per head)
        return out.reshape(n_head, n, head_dim).transpose(1, 0, 2).reshape(n, n_head * head_dim)

    def swiglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):  # exp(-gate) -> inf for very negative gate: silu -> 0, correct
            t = np.negative(gate)
            np.exp(t, out=t)
            t += np.float32(1.0)
            np.divide(gate, t, out=t)  # silu(gate) = gate / (1 + exp(-gate))
            t *= up
            return t

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a + b
