"""GPU prefill: a prompt through the model with few launches (the untraced generate path).

    from rocmforge_lab.backend.prefill import prefill_for
    pf = prefill_for(model)              # cached per model; None where it does not apply
    logits = pf.run(session, ids)        # numpy [1, vocab] for the last position; appends to the cache

The same math as model.py's program on the GPU backend, arranged for launch count: prefill of a
small model is bound by the host launching kernels, not by the GPU (benchmarks/prefill_profile.py).
Per layer and chunk of up to `CHUNK` tokens:

    rms_norm_f16              x -> f16 normalized input                                 (norm.hip)
    dequant + cuBLAS GEMM     Q|K|V rows of the three weights into one [n, q+k+v] product
    pf_qkv_rope_store         bias, RoPE of Q and K, K/V into the cache              (prefill.hip)
    attn_prefill              tiled online-softmax attention                 (attention_prefill.hip)
    f32_to_f16 + GEMM         o-projection accumulated into the residual (GEMM beta = 1)
    pf_rms_norm_f16, GEMM     gate|up rows of both weights in one [n, 2 ff] product
    pf_swiglu_f16 + GEMM      down projection accumulated into the residual

then the final norm and the output projection of the last position (backend ops). A chunk's
launches read their inputs (token ids, positions, start) from persistent device buffers, so each
chunk length is captured as a CUDA graph (on its second use: capture costs a few eager passes) and
replayed: a small model's prefill is otherwise bound by the host launching ~20 kernels per layer. Chunks are padded to a power of two of at least
16 tokens (`graph_tokens`) so few graphs serve every prompt; the padding rows are computed and their
K/V written past the prompt, where the next token overwrites them before anything reads them
(eager launches where that would run past the context, or where capture fails: `graph_error`).
Weights stay
quantized in the arena and are dequantized to f16 into the backend's scratch buffer per GEMM
(chunks of rows when a group does not fit). Rounding: the GEMM inputs are f16 (as the backend's
prefill GEMMs), accumulation f32; the result matches the op-by-op path within the GPU backend's
tolerance (tests/gpu/test_prefill.py). Hooks, traces and stepping use the op-by-op program.
"""
from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from . import cupy_backend as CB
from . import kernels as K

KERNEL_FILE = "prefill"
CHUNK = 512  # tokens per pass: bounds the activation memory for long prompts
GRAPH_MIN = 16  # the smallest padded chunk a graph is captured for
MAX_GRAPHS = 8  # captured chunk graphs kept per model (least recently used dropped)


def graph_tokens(n: int) -> int:
    """The padded length of an n-token chunk: the next power of two >= 16, at most CHUNK (>= n)."""
    p = GRAPH_MIN
    while p < n:
        p *= 2
    return max(n, min(p, CHUNK))


@dataclass
class _Layer:
    qkv: Any              # _GemmPlan of Q, K, V (rows stacked in this order)
    qkv_bias: Any         # cupy f32 [q+k+v] or None
    o: Any                # _GemmPlan
    gate_up: Any          # _GemmPlan of gate, up
    down: Any             # _GemmPlan
    attn_norm: Any        # cupy f32 [d]
    ffn_norm: Any


@dataclass
class _GemmPlan:
    steps: list           # (dequantization launches, rows m, first output column)
    k: int                # inner dimension (input width)
    scratch_ptr: int      # the f16 weight rows the GEMMs read


class PrefillUnsupported(ValueError):
    """This model or backend cannot use the fused prefill (the reason says why)."""


class GpuPrefill:
    """The fused prefill of one GPU-loaded model (see the module docstring)."""

    def __init__(self, model):
        import cupy

        be, cfg, tf = model.backend, model.config, model.transformer
        if getattr(be, "name", None) != "cupy":
            raise PrefillUnsupported("the fused prefill runs on the GPU backend only")
        if be.prefill_dtype != "f16" or be._gemm_ex_ok is False:
            raise PrefillUnsupported("the fused prefill needs f16 cuBLAS GEMMs (gemmEx)")
        if cfg.head_dim not in K.PREFILL_HEAD_DIMS:
            raise PrefillUnsupported(f"head_dim {cfg.head_dim} has no fused prefill attention kernel")
        if cfg.head_dim % 2 or cfg.rope_dim % 2 or not 0 < cfg.rope_dim <= cfg.head_dim:
            raise PrefillUnsupported(f"head_dim {cfg.head_dim} / rope_dim {cfg.rope_dim}")
        if cfg.rope_style not in ("normal", "neox"):
            raise PrefillUnsupported(f"rope style {cfg.rope_style}")
        self.model_ref = weakref.ref(model)
        self.be, self.cfg = be, cfg
        W = tf.weights
        be.finalize_weights()
        self._one = np.ones((), np.float32)
        self._zero = np.zeros((), np.float32)
        self._bufs: dict[str, Any] = {}
        self._rows = 0  # tokens the persistent activation buffers hold
        self.layers: list[_Layer] = []
        for i in range(cfg.n_layer):
            p = f"blk.{i}."
            qkv = tuple(W[p + r + ".weight"] for r in ("attn_q", "attn_k", "attn_v"))
            bias = None
            if cfg.qkv_bias:
                bias = cupy.concatenate([W[p + r + ".bias"].as_array(cupy.float32).reshape(-1)
                                         for r in ("attn_q", "attn_k", "attn_v")])
            self.layers.append(_Layer(
                self._plan(qkv), bias, self._plan([W[p + "attn_output.weight"]]),
                self._plan([W[p + "ffn_gate.weight"], W[p + "ffn_up.weight"]]), self._plan([W[p + "ffn_down.weight"]]),
                W[p + "attn_norm.weight"].as_array(cupy.float32), W[p + "ffn_norm.weight"].as_array(cupy.float32)))
        self.embd = W["token_embd.weight"]
        self.output_norm = W["output_norm.weight"]
        self.output = W["token_embd.weight" if cfg.tied_output else "output.weight"]
        self._fn = {name: K.get_function(KERNEL_FILE, name) for name in
                    ("pf_swiglu_f16", "pf_qkv_rope_store_f16", "pf_qkv_rope_store_f32")}
        self._fn["rms_norm_f16"] = K.get_function("norm", "rms_norm_f16")
        self._f32_to_f16 = K.get_function("elementwise", "f32_to_f16")
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self._graphs: OrderedDict = OrderedDict()  # (cache pointers and shape, tokens) -> graph
        self._seen: dict = {}  # keys launched eagerly once (captured when they come again)
        self.use_graphs = not getattr(be, "is_hip", False)
        self.graph_error: str | None = None
        self.graph_replays = 0  # chunks that ran as a graph replay (tests, benchmarks)

    # ------------------------------------------------------------------ GEMM over stacked weights
    def _plan(self, weights: Sequence[Any]) -> _GemmPlan:
        """The launches of `x @ [W_1; W_2; ...].T`: the stacked rows in chunks that fit the backend's
        scratch buffer (a chunk may hold parts of several weights), each chunk = its dequantization
        launches (arguments fixed: weights and scratch do not move) + one GEMM."""
        import cupy

        be = self.be
        k = weights[0].cols
        scratch, per = be._scratch_rows(weights[0], 2)
        if per >= 128:  # chunk starts stay 512-byte aligned in the output (cuBLAS takes its fast
            per -= per % 128  # tensor-core kernels only for 16-byte aligned pointers)
        sh = cupy.ndarray((per, k), dtype=cupy.float16, memptr=scratch.data)
        total = sum(w.rows for w in weights)
        steps, c0 = [], 0
        while c0 < total:
            c1 = min(total, c0 + per)
            launches, s0 = [], 0
            for w in weights:
                a, b = max(c0, s0), min(c1, s0 + w.rows)
                if a < b:
                    fn = K.get_function("dequant", f"dequant_{K.QTYPE_SUFFIX[w.qtype_name]}_f16")
                    launches.append((fn, be._grid((b - a) * (w.cols // 32), 256, 8192),
                                     (w.base, np.int64(w.offset + (a - s0) * w.row_bytes), np.int64(w.row_bytes),
                                      np.int32(w.cols), None, np.int32(b - a), sh[a - c0:])))
                s0 += w.rows
            steps.append((launches, c1 - c0, c0))
            c0 = c1
        return _GemmPlan(steps, k, sh.data.ptr)

    def _gemm(self, gemm_ex, handle, plan: _GemmPlan, x_h, n: int, out, beta) -> None:
        """out[:n, :rows] (= beta * out +) x_h[:n] @ W.T with f32 accumulation. x_h: [*, k] f16,
        out: [*, ldc] f32, both C-contiguous."""
        k, ldc = plan.k, out.shape[1]
        for launches, m, c0 in plan.steps:
            for fn, grid, args in launches:
                fn(grid, (256,), args)
            # column-major view (as CupyBackend._gemm_ex_call): C[m, n] = W_chunk[m, k] @ x[n, k].T
            gemm_ex(handle, CB._CUBLAS_OP_T, CB._CUBLAS_OP_N, m, n, k,
                    self._one.ctypes.data, plan.scratch_ptr, CB._CUDA_R_16F, k,
                    x_h.data.ptr, CB._CUDA_R_16F, k,
                    beta.ctypes.data, out.data.ptr + c0 * 4, CB._CUDA_R_32F, ldc,
                    CB._CUBLAS_COMPUTE_32F, CB._CUBLAS_GEMM_DEFAULT)

    # ------------------------------------------------------------------ the pass
    def run(self, session, ids: Sequence[int]) -> np.ndarray:
        """Process `ids` after the session's cached tokens; returns the last position's logits
        (numpy float32 [1, vocab]) and appends the tokens to the session, like
        `session.forward(ids, last_only=True)`."""
        import cupy

        be = self.be
        ids = session._check_ids(ids)
        be.last_op = "prefill"
        try:
            with cupy.cuda.using_allocator(be._malloc):
                x_last = None
                _follow(self.stream, cupy.cuda.get_current_stream())  # after the work queued so far
                for c0 in range(0, len(ids), CHUNK):
                    x_last = self._chunk(session, ids[c0:c0 + CHUNK], session.n_past + c0)
                _follow(cupy.cuda.get_current_stream(), self.stream)
                h = be.rms_norm(x_last, self.output_norm, self.cfg.rms_eps)
                logits = be.linear(h, self.output)
        except cupy.cuda.memory.OutOfMemoryError as exc:
            free, total = CB.device_mem_info()
            raise CB.DeviceOutOfMemory("activations of the fused prefill", int(getattr(exc, "size", 0) or 0),
                                       free, total) from exc
        except be._errors as exc:
            raise CB.GpuOpError("prefill", f"{type(exc).__name__}: {exc}") from exc
        session.tokens.extend(ids)
        return be.to_numpy(logits)

    def _buffers(self, n: int) -> dict[str, Any]:
        """Persistent activation buffers for chunks of up to max(n, CHUNK) tokens (one device
        allocation, reused by every layer and every prefill; rows beyond the chunk are unused)."""
        import cupy

        from .memory import device_alloc

        if n > self._rows:
            cfg = self.cfg
            rows = max(n, CHUNK)
            d, qd, kvd, ff = cfg.d_model, cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim, cfg.d_ff
            shapes = {"x": ((rows, d), cupy.float32), "ints": ((2 * rows + 1,), cupy.int32),
                      "xn16": ((rows, d), cupy.float16), "qkv": ((rows, qd + 2 * kvd), cupy.float32),
                      "q": ((rows, cfg.n_head, cfg.head_dim), cupy.float32), "att": ((rows, qd), cupy.float32),
                      "at16": ((rows, qd), cupy.float16), "gu": ((rows, 2 * ff), cupy.float32),
                      "act16": ((rows, ff), cupy.float16)}
            sizes = {k: -(-int(np.prod(shape)) * np.dtype(dt).itemsize // 256) * 256
                     for k, (shape, dt) in shapes.items()}
            self._bufs = {}  # release the old allocation first (and the graphs that use it)
            self._graphs.clear()
            mem = device_alloc(sum(sizes.values()), f"prefill activations ({rows} tokens)", "scratch")
            off = 0
            for k, (shape, dt) in shapes.items():
                self._bufs[k] = cupy.ndarray(shape, dtype=dt, memptr=mem + off)
                off += sizes[k]
            self._rows = rows
        return self._bufs

    def _chunk(self, session, ids: list[int], start: int):
        """One chunk of tokens at positions start..; returns the residual of its last token [1, d]
        (valid once the current stream follows self.stream)."""
        n = len(ids)
        n_ctx = session.k_cache.shape[2]
        m = graph_tokens(n)
        graph = self.use_graphs and start + m <= n_ctx
        if not graph:
            m = n
        B = self._buffers(m)
        rows = B["x"].shape[0]
        # inputs: token ids (padding: token 0) | positions | start, in one copy
        ints = np.zeros(2 * rows + 1, np.int32)
        ints[:n] = ids
        ints[rows:rows + m] = np.arange(start, start + m, dtype=np.int32)
        ints[2 * rows] = start
        B["ints"].set(ints, stream=self.stream)
        if graph:
            try:
                if self._replay(session, m):
                    self.graph_replays += 1
                    return B["x"][n - 1:n]
            except Exception as exc:  # no graph capture here (or of cuBLAS): launch eagerly
                self.use_graphs = False
                self.graph_error = f"{type(exc).__name__}: {exc}"
        with self.stream:
            self._layers(session, n)
        return B["x"][n - 1:n]

    def _replay(self, session, m: int) -> bool:
        """Replay the graph of an m-token chunk for this session's cache (captured on the second use
        of the length); False where the caller launches eagerly instead."""
        kc, vc = session.k_cache, session.v_cache
        key = (kc.data.ptr, vc.data.ptr, kc.shape, str(kc.dtype), m)
        g = self._graphs.get(key)
        if g is None and not self._seen.pop(key, False):
            # first chunk of this length: launch eagerly (capturing costs ~3-4x an eager pass),
            # capture on the second (prompts of the same padded length keep coming: benchmarks,
            # chat turns)
            self._seen[key] = True
            while len(self._seen) > 4 * MAX_GRAPHS:
                self._seen.pop(next(iter(self._seen)))
            return False
        if g is None:
            s = self.stream
            with s:
                s.begin_capture()
                try:
                    self._layers(session, m)
                finally:
                    g = s.end_capture()
            self._graphs[key] = g
            while len(self._graphs) > MAX_GRAPHS:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        g.launch(self.stream)
        return True

    def _layers(self, session, n: int) -> None:
        """The launches of one n-token chunk on self.stream: every input from the persistent buffers
        (ids, positions, start), so the same launches serve any start position (graph capture)."""
        import cupy
        from cupy_backends.cuda.libs import cublas

        be, cfg = self.be, self.cfg
        d, nh, nkv, hd, ff = cfg.d_model, cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.d_ff
        kc, vc = session.k_cache, session.v_cache
        n_ctx = kc.shape[2]
        cache = be._cache_suffix(kc)
        i32, f32 = np.int32, np.float32
        eps = f32(cfg.rms_eps)
        B = self._bufs
        rows = B["x"].shape[0]
        ids_dev, pos_dev, start_dev = B["ints"][:n], B["ints"][rows:rows + n], B["ints"][2 * rows:]
        x = B["x"][:n]                                               # [n, d] f32: the residual
        be._dequant_into(self.embd, x, ids_dev, 0, n)
        xn16, qkv, q, att, at16, gu, act16 = (B[k] for k in ("xn16", "qkv", "q", "att", "at16", "gu", "act16"))
        rope_grid = be._grid(n * (nh + 2 * nkv) * (hd // 2), 256, 16384)
        rope_fn = self._fn[f"pf_qkv_rope_store_{cache}"]
        rope_dims = (i32(n), i32(nh), i32(nkv), i32(hd), i32(cfg.rope_dim), f32(cfg.rope_base),
                     i32(cfg.rope_style == "neox"))
        attn_fn = K.get_function("attention_prefill", f"attn_prefill_dev_{cache}_hd{hd}")
        norm_fn, swiglu_fn = self._fn["rms_norm_f16"], self._fn["pf_swiglu_f16"]
        swiglu_grid = be._grid(n * ff, 256, 16384)
        att_grid = be._grid(n * nh * hd, 256, 8192)
        scale = f32(1.0 / math.sqrt(hd))
        handle = cupy.cuda.device.get_cublas_handle()
        mode, stream = cublas.getPointerMode(handle), cublas.getStream(handle)
        host_mode = getattr(cublas, "CUBLAS_POINTER_MODE_HOST", 0)
        if mode != host_mode:
            cublas.setPointerMode(handle, host_mode)
        lib = self._cublas()
        set_stream, gemm_ex = (lib.set_stream, lib.gemm_ex) if lib else (cublas.setStream, cublas.gemmEx)
        set_stream(handle, self.stream.ptr)
        try:
            for i, L in enumerate(self.layers):
                norm_fn((n,), (256,), (x, L.attn_norm, xn16, i32(n), i32(d), eps))
                self._gemm(gemm_ex, handle, L.qkv, xn16, n, qkv, self._zero)
                rope_fn(rope_grid, (256,), (qkv, L.qkv_bias, q, kc, vc, pos_dev, *rope_dims, i32(i), i32(n_ctx)))
                attn_fn(((n + 15) // 16, nh), (128,), (q, kc, vc, att, i32(i), i32(n), i32(nh), i32(nkv),
                                                       i32(n_ctx), start_dev, scale))
                self._f32_to_f16(att_grid, (256,), (att, at16, np.int64(n * nh * hd)))
                self._gemm(gemm_ex, handle, L.o, at16, n, x, self._one)        # x += o-proj
                norm_fn((n,), (256,), (x, L.ffn_norm, xn16, i32(n), i32(d), eps))
                self._gemm(gemm_ex, handle, L.gate_up, xn16, n, gu, self._zero)
                swiglu_fn(swiglu_grid, (256,), (gu, act16, i32(n), i32(ff)))
                self._gemm(gemm_ex, handle, L.down, act16, n, x, self._one)    # x += down-proj
        finally:
            set_stream(handle, stream)
            if mode != host_mode:
                cublas.setPointerMode(handle, mode)


    def _cublas(self):
        """cuBLAS through ctypes on CUDA (CuPy's wrappers refuse a stream that is being captured),
        None on ROCm (no graphs there: CuPy's wrappers)."""
        if not self.use_graphs:
            return None
        if not hasattr(self, "_cublas_lib"):
            try:
                self._cublas_lib = _CublasCalls()
            except (OSError, AttributeError, RuntimeError) as exc:  # no graphs then (CuPy's wrappers)
                self.use_graphs = False
                self.graph_error = f"cuBLAS through ctypes: {type(exc).__name__}: {exc}"
                return None
        return self._cublas_lib


class _CublasCalls:
    """cublasSetStream_v2 / cublasGemmEx of the libcublas CuPy loaded, called through ctypes."""

    def __init__(self):
        import ctypes

        path = next((line.split()[-1] for line in open("/proc/self/maps")
                     if "libcublas.so" in line and "libcublasLt" not in line), None)
        if path is None:
            raise RuntimeError("libcublas is not loaded in this process")
        lib = ctypes.CDLL(path)
        vp, ci = ctypes.c_void_p, ctypes.c_int

        def check(name, fn):
            def call(*args):
                rc = fn(*args)
                if rc != 0:
                    raise RuntimeError(f"{name} failed (cublasStatus {rc})")
            return call
        ss = lib.cublasSetStream_v2
        ss.argtypes, ss.restype = [vp, vp], ci
        gm = lib.cublasGemmEx
        gm.argtypes = [vp, ci, ci, ci, ci, ci, vp, vp, ci, ci, vp, ci, ci, vp, vp, ci, ci, ci, ci]
        gm.restype = ci
        self.set_stream = check("cublasSetStream", ss)
        self.gemm_ex = check("cublasGemmEx", gm)


def _follow(stream, other) -> None:
    """Work queued on `stream` from now on runs after the work queued so far on `other`."""
    import cupy

    ev = cupy.cuda.Event(block=False, disable_timing=True)
    ev.record(other)
    stream.wait_event(ev)


_PREFILLS: "weakref.WeakKeyDictionary[Any, GpuPrefill | None]" = weakref.WeakKeyDictionary()


def prefill_for(model) -> GpuPrefill | None:
    """The model's fused prefill (built once), or None where it does not apply (CPU backend, fast
    paths switched off with `fast_decode.set_fast(False)`, no f16 GEMMs, an unsupported head size
    or RoPE)."""
    from . import fast_decode

    if getattr(model.backend, "name", None) != "cupy" or not fast_decode.FAST_DEFAULT:
        return None  # (set_fast(False) / --no-fast: every pass op by op)
    try:
        return _PREFILLS[model]
    except KeyError:
        pass
    try:
        pf = GpuPrefill(model)
    except PrefillUnsupported:
        pf = None
    _PREFILLS[model] = pf
    return pf
