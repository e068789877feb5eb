"""The graphed decode fast path (backend/fast_decode.py, kernels/fused_decode.hip) on a GPU.

* every fused kernel against a float64 NumPy reference (matvec for every type, odd shapes,
  every lanes-per-row choice; gate/up + SwiGLU; qkv + RoPE + KV append; attention),
* the fast path's logits == the step path's (CupyBackend op by op) within the GPU tolerance
  (relative L2 < 1e-2; in practice f32 rounding, ~1e-6), on synthetic llama / qwen2 models of
  several types and on 1-2 layer cuts of the full-size Qwen2.5 shapes,
* greedy tokens identical to the step path's for 32 tokens (up to a near-tie),
* zero device allocations and a bounded number of host waits across 32 decoded tokens,
* graph mode on CUDA (the mode is reported), stop ids, eager fallback.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import reference as R

pytestmark = pytest.mark.gpu

QID = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q2_K": 10, "Q3_K": 11,
       "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "BF16": 30, "MXFP4": 39}


def _fn(name, build=None):
    """Kernel `name` of fused_decode.hip, from the decoder's default build (fast_decode.build_options)
    unless `build` (a tuple of compiler options) names another."""
    from rocmforge_lab.backend import kernels as K
    from rocmforge_lab.backend.fast_decode import build_options

    return K.get_function("fused_decode", name, build_options({}) if build is None else build)


def _arena(*raws):
    """Byte tensors packed into one device buffer at aligned offsets: (arena, offsets)."""
    import cupy

    host, offs = R.pack_arena(*raws)
    return cupy.asarray(host), offs


def _i32(v):
    return np.int32(v)


FAST = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"}


def _xbufs(n):
    import cupy

    return (cupy.zeros(n // 4, np.int32), cupy.zeros(n // 4, np.int32), cupy.zeros(n // 32, np.float32),
            cupy.zeros(n // 16, np.float32))


def _quantize(x, arena=None, norm_off=-1, eps=0.0):
    """fd_quantize on the device: x -> its 16-bit staged form (h words, l words, scales, 16-sums)."""
    import cupy

    X = _xbufs(x.size)
    a = arena if arena is not None else cupy.zeros(64, np.uint8)
    _fn("fd_quantize")((1,), (256,), (a, cupy.asarray(x), _i32(x.size), _i64(norm_off), np.float32(eps), *X))
    return X


def _dequant_x(X):
    import cupy

    h, l, s, _ = (cupy.asnumpy(v) for v in X)
    return (256 * h.view(np.int8).astype(np.int64) + l.view(np.int8)) * np.repeat(s.astype(np.float64), 32)


def _i64(v):
    return np.int64(v)


# ------------------------------------------------------------------------------------------------
# kernels vs NumPy references


def _check_matvec(backend, qtype, rows, cols, seed, cases):
    """y (= base when accumulating) += W x + bias for each (lanes per group, accumulate, threads, grid,
    kernel, groups per task) case, against float64 NumPy; pairs of rows unless lpr 16."""
    import cupy

    rng = np.random.default_rng(seed)
    raw = R.random_tensor(qtype, rows, cols, rng)
    ref = R.dequant_ref(raw, qtype, rows, cols).astype(np.float64)
    bias = rng.standard_normal(rows).astype(np.float32)
    arena, (w_off, b_off) = _arena(raw, bias.view(np.uint8))
    x = rng.standard_normal(cols).astype(np.float32)
    base = rng.standard_normal(rows).astype(np.float32)
    # f32 accumulation + the 16-bit staging of x (error <= 0.5/32639 of a 32-block's maximum)
    tol = 1e-5 * (np.abs(ref) @ np.abs(x) + np.abs(bias) + np.abs(base)) + 2e-5 * np.abs(ref).sum(1) * np.abs(x).max()
    X = _quantize(x)
    for lpr, acc, threads, grid, kern, ks in cases:
        lpr = min(lpr, backend.warp_size)
        y = cupy.asarray(base) if acc else cupy.full(rows, np.nan, np.float32)
        _fn(kern)((grid,), (threads,), (arena, None, _i32(QID[qtype]), _i64(w_off), _i64(R.row_bytes(qtype, cols)),
                                        _i32(rows), _i32(cols), *X, _i64(b_off), y, _i32(acc), None, _i64(-1),
                                        np.float32(0), None, None, None, None, _i32(lpr != 16), _i32(lpr), _i32(ks)))
        want = ref @ x + bias + (base if acc else 0.0)
        err = np.abs(cupy.asnumpy(y) - want)
        assert np.all(err <= tol), (kern, qtype, lpr, acc, ks, float(err.max()))


@pytest.mark.parametrize("qtype", R.ALL_QTYPES)
@pytest.mark.parametrize("rows,cols", [(37, 256), (300, 1536), (5, 4608), (3, 18944)])
def test_fused_matvec_vs_numpy(backend, qtype, rows, cols):
    qk, _ = R.block_info(qtype)
    if cols % qk:
        pytest.skip(f"{cols} not a multiple of the {qtype} block")
    kernels = ["fd_matvec", "fd_matvec_any"] if qtype in FAST else ["fd_matvec_any"]
    # (lanes per group, accumulate, threads, grid, kernel, groups per task: split-K inside the block)
    cases = ((8, 0, 64, 1, kernels[-1], 1), (16, 1, 128, 3, kernels[0], 1), (32, 1, 256, 1000, kernels[0], 1),
             (32, 1, 256, 7, kernels[0], 4), (32, 0, 256, 1000, kernels[-1], 8), (8, 1, 64, 2, kernels[0], 2),
             (16, 1, 128, 3, kernels[0] + "_ls", 1))  # _ls: late state read
    _check_matvec(backend, qtype, rows, cols, rows * 7 + cols, cases)


@pytest.mark.parametrize("qtype,kern", [("Q4_K", "fd_matvec_w1_q4k"), ("Q6_K", "fd_matvec_w1_q6k"),
                                        ("Q8_0", "fd_matvec_w1_q6k")])  # another type: the 32-value engine
@pytest.mark.parametrize("rows,cols", [(37, 256), (300, 768), (5, 4608), (3, 18944)])
def test_fused_matvec_wide_vs_numpy(backend, qtype, kern, rows, cols):
    """The wide engine (fd_rows_w: 64-value units loaded before their math). Q6_K rows of an
    odd number of 210-byte blocks start 2 bytes off a word boundary every other row."""
    cases = ((8, 0, 64, 1, kern, 1), (16, 1, 128, 3, kern, 1), (32, 1, 256, 1000, kern, 1),
             (32, 1, 256, 7, kern, 4), (32, 0, 256, 1000, kern, 8), (8, 1, 64, 2, kern, 2))
    _check_matvec(backend, qtype, rows, cols, rows * 11 + cols, cases)


def _check_gate_up(backend, rng, d, ff, tg, tu, kern, threads, pf=0, grid=None):
    """Run fd_gate_up kernel `kern` on random tg / tu gate / up weights and a random residual; check
    act = silu(W_gate n) * (W_up n), n = RMSNorm(x), and its quantized copy, against float64 NumPy."""
    import cupy

    rg, ru = R.random_tensor(tg, ff, d, rng, 0.1), R.random_tensor(tu, ff, d, rng, 0.1)
    wg = R.dequant_ref(rg, tg, ff, d).astype(np.float64)
    wu = R.dequant_ref(ru, tu, ff, d).astype(np.float64)
    nw = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    arena, (og, ou, on) = _arena(rg, ru, nw.view(np.uint8))
    x = rng.standard_normal(d).astype(np.float32)  # the residual: each block normalizes it itself
    state = cupy.asarray(np.array([5, 0, 0, 0], np.int32))
    act = cupy.full(ff, np.nan, np.float32)
    out = _xbufs(ff)
    _fn(kern)((grid or ff // 32,), (threads,), (arena, state, cupy.asarray(x), _i64(on), np.float32(1e-6), _i32(d),
                                        _i32(QID[tg]), _i64(og), _i64(R.row_bytes(tg, d)),
                                        _i32(QID[tu]), _i64(ou), _i64(R.row_bytes(tu, d)), _i32(ff), act, *out,
                                        _i32(min(32, backend.warp_size) | pf << 8)))
    n = R.rms_norm_ref(x, nw, 1e-6)
    g, u = wg @ n, wu @ n
    with np.errstate(over="ignore"):
        want = R.swiglu_ref(g, u)
    eg = 1e-5 * (np.abs(wg) @ np.abs(n)) + 4e-5 * np.abs(wg).sum(1) * np.abs(n).max()
    eu = 1e-5 * (np.abs(wu) @ np.abs(n)) + 4e-5 * np.abs(wu).sum(1) * np.abs(n).max()
    tol = 1.2 * (eg * (np.abs(u) + eu) + eu * np.abs(g)) + 1e-6
    got = cupy.asnumpy(act)
    assert np.all(np.abs(got - want) <= tol), (kern, tg, tu, float(np.abs(got - want).max()))
    assert np.all(np.abs(_dequant_x(out) - got) <= 2e-5 * np.abs(got).max())


def test_fused_gate_up_wide_vs_numpy(backend):
    """fd_gate_up_w1_q4k (the wide engine): Q4_K gate and up (pairs), and a Q4_K / Q6_K mix (one row
    at a time, the Q6_K rows through the 32-value engine) with the prefetch flag FD_PF_FIRST in bits
    8.. of lpr."""
    rng = np.random.default_rng(7)
    for tg, tu, threads, pf in (("Q4_K", "Q4_K", 256, 0), ("Q4_K", "Q6_K", 128, 1)):
        _check_gate_up(backend, rng, 1024, 320, tg, tu, "fd_gate_up_w1_q4k", threads, pf)


@pytest.mark.parametrize("kern", ["fd_gate_up_xr_q4k", "fd_gate_up_xr_q4k_r1"])
def test_fused_gate_up_xr_vs_numpy(backend, kern):
    """fd_gate_up_xr_q4k (one wave of blocks looping over the 32-row blocks, x in registers): d 3584
    (the 7B's rows: 56 units per group) with 132 blocks over 270 row blocks (blocks of 3 and 2 row
    blocks); d 1024 with 7 blocks over 40 row blocks and 8 groups of 32 threads."""
    rng = np.random.default_rng(9)
    _check_gate_up(backend, rng, 3584, 8640, "Q4_K", "Q4_K", kern, 256, grid=132)
    _check_gate_up(backend, rng, 1024, 1280, "Q4_K", "Q4_K", kern, 256, grid=7)


def test_fused_gate_up_stream_vs_numpy(backend):
    """fd_gate_up_s_q4k (the stream engine: each warp's row pairs copied through a ring of shared
    memory stages): d 1024 (4 blocks per row), 3584 (the 7B's 14: one stage), 4096 (two stages)."""
    rng = np.random.default_rng(8)
    for d, ff in ((1024, 320), (3584, 96), (4096, 64)):
        for v in ("", "_v1"):  # _v1: 3 stages of 1 KiB per row
            _check_gate_up(backend, rng, d, ff, "Q4_K", "Q4_K", "fd_gate_up_s_q4k" + v, 128)


def _rows_matvec(kern, threads, qtype, rows, cols, rpb, seed):
    """A matvec kernel with fd_matvec_s's arguments (rows in runs of rpb per block, `threads` per
    block): y (+)= W x against float64 NumPy."""
    import cupy

    rng = np.random.default_rng(seed)
    raw = R.random_tensor(qtype, rows, cols, rng)
    ref = R.dequant_ref(raw, qtype, rows, cols).astype(np.float64)
    arena, (w_off,) = _arena(raw)
    x = rng.standard_normal(cols).astype(np.float32)
    base = rng.standard_normal(rows).astype(np.float32)
    tol = 1e-5 * (np.abs(ref) @ np.abs(x) + np.abs(base)) + 2e-5 * np.abs(ref).sum(1) * np.abs(x).max()
    X = _quantize(x)
    for acc in (0, 1):
        y = cupy.asarray(base) if acc else cupy.full(rows, np.nan, np.float32)
        _fn(kern)((-(-rows // rpb),), (threads,), (arena, None, _i64(w_off), _i64(R.row_bytes(qtype, cols)), _i32(rows),
                                                  _i32(cols), *X, y, _i32(acc), _i32(rpb)))
        err = np.abs(cupy.asnumpy(y) - (ref @ x + (base if acc else 0.0)))
        assert np.all(err <= tol), (kern, rows, cols, rpb, acc, float(err.max()))


@pytest.mark.parametrize("v", ["", "_v1"])  # _v1: 4 stages of 1 KiB
@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("rows,cols,rpb", [(37, 256, 5), (300, 768, 40), (5, 4608, 1), (64, 18944, 7),
                                           (600, 4608, 7)])
def test_fused_matvec_stream_vs_numpy(backend, qtype, rows, cols, rpb, v):
    """fd_matvec_s_<q> (the down projection's stream kernel): rows in runs of rpb per block, each
    row's blocks split over the block's 4 warps (18944 columns: the 7B's down rows, several stages
    per warp); Q6_K rows of an odd number of blocks start 2 bytes off a word boundary."""
    _rows_matvec(f"fd_matvec_s_{qtype.replace('_', '').lower()}{v}", 128, qtype, rows, cols, rpb, rows + cols + rpb)


@pytest.mark.parametrize("rbs", ["", "_r1", "_r4"])  # rows per step: 2 (default), 1, 4
@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("rows,cols,rpb", [(37, 256, 5), (300, 4864, 40), (64, 18944, 7), (900, 18944, 28)])
def test_fused_matvec_xr_vs_numpy(backend, qtype, rows, cols, rpb, rbs):
    """fd_matvec_xr_<q> (the down projection's x-resident kernel): one 64-value unit of x per thread in
    registers, rows in runs of rpb per block (rounds of 32 rows; 18944 columns: the 7B's down rows,
    296 units in 10 warps; rpb 28: the 7B plan's rows per block)."""
    threads = -(-(cols // 64) // backend.warp_size) * backend.warp_size
    _rows_matvec(f"fd_matvec_xr_{qtype.replace('_', '').lower()}{rbs}", threads, qtype, rows, cols, rpb,
                 rows + cols + len(rbs))


@pytest.mark.parametrize("v", ["", "_v1"])
@pytest.mark.parametrize("qtype,d,vocab,grid", [("Q6_K", 3584, 1001, 7), ("Q4_K", 1024, 4097, 132),
                                                ("Q6_K", 4096, 77, 200)])
def test_fused_output_stream_vs_numpy(backend, qtype, d, vocab, grid, v):
    """fd_output_s_<q>: logits of RMSNorm(x) over contiguous row-pair ranges per warp (odd vocab;
    more warps than pairs in the last case), the argmax token, state update and next embedding."""
    import cupy

    rng = np.random.default_rng(vocab)
    raw = R.random_tensor(qtype, vocab, d, rng)
    W = R.dequant_ref(raw, qtype, vocab, d).astype(np.float64)
    emb = rng.standard_normal((vocab, d)).astype(np.float32)
    nw = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    arena, (wo, eo, no) = _arena(raw, emb.view(np.uint8), nw.view(np.uint8))
    x = rng.standard_normal(d).astype(np.float32)
    resid = cupy.asarray(x)
    state = cupy.asarray(np.array([4, 0, 0, 0], np.int32))
    logits = cupy.full(vocab, np.nan, np.float32)
    part_v, part_i, cnt = cupy.zeros(grid, np.float32), cupy.zeros(grid, np.int32), cupy.zeros(1, np.int32)
    tokens, stop = cupy.full(8, -1, np.int32), cupy.full(4, -1, np.int32)
    _fn(f"fd_output_s_{qtype.replace('_', '').lower()}{v}")((grid,), (128,), (
        arena, state, resid, _i64(no), np.float32(1e-5), _i32(d), _i32(QID[qtype]), _i64(wo),
        _i64(R.row_bytes(qtype, d)), _i32(vocab), logits, part_v, part_i, cnt, tokens, stop, _i32(4), _i32(QID["F32"]),
        _i64(eo), _i64(4 * d), _i32(0)))
    n = R.rms_norm_ref(x, nw, 1e-5)
    want = W @ n
    tol = 1e-5 * (np.abs(W) @ np.abs(n)) + 2e-5 * np.abs(W).sum(1) * np.abs(n).max()
    got = cupy.asnumpy(logits)
    assert np.all(np.abs(got - want) <= tol), float(np.abs(got - want).max())
    tok = int(np.argmax(got))
    assert int(tokens[4].get()) == tok and tuple(cupy.asnumpy(state)[:3]) == (5, tok, 0) and int(cnt[0].get()) == 0
    assert np.array_equal(cupy.asnumpy(resid), emb[tok])


def test_fused_gate_up_vs_numpy(backend):
    rng = np.random.default_rng(5)
    for tg, tu in (("Q5_0", "Q5_0"), ("Q8_0", "Q4_1")):
        kern = "fd_gate_up" if tg in FAST and tu in FAST else "fd_gate_up_any"
        _check_gate_up(backend, rng, 896, 320, tg, tu, kern, 256)
    # fd_gate_up_b2 (the same code capped at 64 registers) in 512 threads: 32 row pairs of 16 lanes
    _check_gate_up(backend, rng, 896, 320, "Q5_0", "Q8_0", "fd_gate_up_b2", 512)


@pytest.mark.parametrize("kv", ["f16", "f32"])
@pytest.mark.parametrize("style,hd,nh,nkv,bias,n_ctx", [("normal", 64, 9, 3, False, 300), ("neox", 64, 14, 2, True, 300),
                                                        ("neox", 128, 28, 4, True, 300),
                                                        ("neox", 64, 14, 2, True, 4200),   # > 64 splits: other merge
                                                        ("normal", 64, 40, 2, False, 300)])  # G * hd > 1024
def test_fused_qkv_and_attention_vs_numpy(backend, kv, style, hd, nh, nkv, bias, n_ctx):
    """fd_qkv (norm + Q/K/V + bias + RoPE + KV append at pos) then fd_attn over keys 0..pos."""
    import cupy

    from rocmforge_lab.backend.fast_decode import ATT_MERGE1, ATT_ZMERGE

    rng = np.random.default_rng(hd + nh)
    d, layer, n_layer = 512, 1, 2
    pos = n_ctx - 43
    qt = "Q4_K"
    raws = [R.random_tensor(qt, r, d, rng, 0.5) for r in (nh * hd, nkv * hd, nkv * hd)]
    W = [R.dequant_ref(r, qt, r.shape[0], d).astype(np.float64) for r in raws]
    bs = [(0.1 * rng.standard_normal(r.shape[0])).astype(np.float32) for r in raws]
    nw = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    arena, offs = _arena(*raws, *[b.view(np.uint8) for b in bs], nw.view(np.uint8))
    x = rng.standard_normal(d).astype(np.float32)
    dt = np.float16 if kv == "f16" else np.float32
    kc0 = (0.5 * rng.standard_normal((n_layer, nkv, n_ctx, hd))).astype(dt)
    vc0 = rng.standard_normal((n_layer, nkv, n_ctx, hd)).astype(dt)
    kc, vc = cupy.asarray(kc0), cupy.asarray(vc0)
    state = cupy.asarray(np.array([pos, 0, 0, 0], np.int32))
    q = cupy.full(nh * hd, np.nan, np.float32)
    rb = R.row_bytes(qt, d)
    boffs = offs[3:6] if bias else [-1, -1, -1]
    lpr = min(16, backend.warp_size)
    inv = 10000.0 ** (-2.0 * np.arange(hd // 2) / hd)
    th = np.arange(n_ctx)[:, None] * inv[None, :]
    rope = cupy.asarray(np.stack([np.cos(th), np.sin(th)], -1).astype(np.float32).reshape(-1))
    _fn(f"fd_qkv_{kv}")((11,), (128,), (  # x: the residual, normalized by every block itself
        arena, state, cupy.asarray(x), _i64(offs[6]), np.float32(1e-5), _i32(d),
        _i32(QID[qt]), _i64(offs[0]), _i64(rb), _i32(QID[qt]), _i64(offs[1]), _i64(rb), _i32(QID[qt]), _i64(offs[2]),
        _i64(rb), _i64(boffs[0]), _i64(boffs[1]), _i64(boffs[2]), _i32(nh), _i32(nkv), _i32(hd), _i32(hd),
        _i32(style == "neox"), rope, kc, vc, _i32(layer), _i32(n_ctx), q, _i32(lpr)))
    h = R.rms_norm_ref(x, nw, 1e-5)
    qr, kr, vr = (W[j] @ h + (bs[j] if bias else 0.0) for j in range(3))
    q_ref = R.rope_ref(qr.reshape(1, nh, hd), [pos], hd, 10000.0, style).reshape(-1)
    k_ref = R.rope_ref(kr.reshape(1, nkv, hd), [pos], hd, 10000.0, style).reshape(nkv, hd)
    def mtol(Wm):  # f32 + 16-bit x staging, twice (RoPE mixes two rows)
        return 2 * (2e-5 * (np.abs(Wm) @ np.abs(h)).max() + 5e-5 * np.abs(Wm).sum(1).max() * np.abs(h).max())

    assert np.all(np.abs(cupy.asnumpy(q) - q_ref) <= mtol(W[0])), float(np.abs(cupy.asnumpy(q) - q_ref).max())
    kc1, vc1 = cupy.asnumpy(kc), cupy.asnumpy(vc)
    ktol = mtol(W[1]) + (1e-3 * np.abs(k_ref).max() if kv == "f16" else 0)
    vtol = mtol(W[2]) + (1e-3 * np.abs(vr).max() if kv == "f16" else 0)
    assert np.all(np.abs(kc1[layer, :, pos].astype(np.float64) - k_ref) <= ktol)
    assert np.all(np.abs(vc1[layer, :, pos].astype(np.float64) - vr.reshape(nkv, hd)) <= vtol)
    untouched = np.ones(n_ctx, bool)
    untouched[pos] = False
    assert np.array_equal(kc1[:, :, untouched], kc0[:, :, untouched]) and np.array_equal(kc1[0], kc0[0])
    # attention over keys 0..pos with the cache as written
    n_split = math.ceil(n_ctx / 64)
    part_acc = cupy.zeros(n_split * nh * hd, np.float32)
    part_ml = cupy.zeros(n_split * nh * 2, np.float32)
    G = nh // nkv
    cnt = cupy.zeros(nkv * G, np.int32)  # one per (KV head, head slice) for the per-slice merge
    out = cupy.full(nh * hd, np.nan, np.float32)
    xa = _xbufs(nh * hd)
    # query heads per block, and flags: one merge per head slice (FD_ATT_ZMERGE), the one-pass merge
    # (FD_ATT_MERGE1); the last case repeats the first (the counters must have been reset)
    Z, M1 = ATT_ZMERGE, ATT_MERGE1
    for hpb, zm in ((G, 0), (4, 0), (3, 0), (2, Z), (3, Z), (1, Z), (2, Z | M1), (1, Z | M1), (G, 0)):
        out.fill(np.nan)
        _fn(f"fd_attn_{kv}_hd{hd}")((n_split, nkv, -(-G // hpb)), (128,), (
            state, q, kc, vc, part_acc, part_ml, cnt, out, *xa, _i32(layer), _i32(nh), _i32(nkv), _i32(n_ctx),
            np.float32(1 / math.sqrt(hd)), _i32(0), _i32(hpb | zm)))
        assert int(cnt.sum().get()) == 0
        got = cupy.asnumpy(out).reshape(1, -1)
        want = R.attention_ref(cupy.asnumpy(q).astype(np.float64).reshape(1, nh, hd), kc1.astype(np.float64),
                               vc1.astype(np.float64), layer, pos, pos + 1, 1 / math.sqrt(hd))
        assert np.allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max()), (hpb, float(np.abs(got - want).max()))
    qh = cupy.asnumpy(q).astype(np.float64).reshape(1, nh, hd)
    want = R.attention_ref(qh, kc1.astype(np.float64), vc1.astype(np.float64), layer, pos, pos + 1, 1 / math.sqrt(hd))
    got = cupy.asnumpy(out).reshape(1, -1)
    assert np.allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max()), float(np.abs(got - want).max())
    assert np.all(np.abs(_dequant_x(xa) - got[0]) <= 2e-5 * np.abs(got).max())  # the o-proj input
    # fd_oproj: resid += W_o attention, x from xa (merge_max 0) or merged from the split partials by every
    # o-proj block (late merge: fd_attn skips its merge and writes no output)
    rows_o = 96
    raw_o = R.random_tensor("Q8_0", rows_o, nh * hd, rng)
    wo = R.dequant_ref(raw_o, "Q8_0", rows_o, nh * hd).astype(np.float64)
    arena_o, (wo_off,) = _arena(raw_o)
    ref_out = want[0]
    base = rng.standard_normal(rows_o).astype(np.float32)
    tol = 1e-4 * (np.abs(wo) @ np.abs(ref_out) + np.abs(base)) + 3e-5 * np.abs(wo).sum(1) * np.abs(ref_out).max()
    # _ls: state read after the wait; _m1: the version-1 late merge (fd_stage_merge<1>)
    for merge_max, ls in ((0, ""), (12288, ""), (0, "_ls"), (12288, "_ls"), (12288, "_m1")):
        nsv = pos // 64 + 1
        late = nsv * nh * hd <= merge_max
        if merge_max:
            out.fill(np.nan)
            hpb = min(G, 4)
            _fn(f"fd_attn_{kv}_hd{hd}{ls.replace('_m1', '')}")((n_split, nkv, -(-G // hpb)), (128,), (
                state, q, kc, vc, part_acc, part_ml, cnt, out, *xa, _i32(layer), _i32(nh), _i32(nkv), _i32(n_ctx),
                np.float32(1 / math.sqrt(hd)), _i32(merge_max), _i32(hpb)))
            assert bool(cupy.isnan(out).all()) == late
        y = cupy.asarray(base)
        _fn("fd_oproj" + ls)((5,), (256,), (arena_o, state, _i32(QID["Q8_0"]), _i64(wo_off),
                                       _i64(R.row_bytes("Q8_0", nh * hd)), _i32(rows_o), _i32(nh * hd), *xa, y,
                                       part_acc, part_ml, _i32(nh), _i32(hd), _i32(merge_max), _i32(1),
                                       _i32(min(32, backend.warp_size)), _i32(2)))
        err = np.abs(cupy.asnumpy(y) - (wo @ ref_out + base))
        assert np.all(err <= tol), (merge_max, ls, late, float(err.max()))


# ------------------------------------------------------------------------------------------------
# fast path vs step path


def _synth(tmp_path_factory, arch, qtype, shape="tiny"):
    from rocmforge_lab import synth

    tag = shape if isinstance(shape, str) else "-".join(f"{k}{v}" for k, v in shape.items())
    path = tmp_path_factory.mktemp("fastsynth") / f"{arch}-{qtype}-{tag}.gguf"
    return synth.make_gguf(path, arch=arch, shape=shape, qtype=qtype, seed=2,
                           random_bytes=not (isinstance(shape, str) and shape == "tiny"))


_MODELS: dict = {}


def _model(tmp_path_factory, arch, qtype, shape="tiny"):
    import rocmforge_lab as rf

    key = (arch, qtype, str(shape))
    if key not in _MODELS:
        _MODELS.clear()  # keep at most one model on the device
        _MODELS[key] = rf.load(str(_synth(tmp_path_factory, arch, qtype, shape)), device="gpu", progress=False)
    return _MODELS[key]


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


CASES = [("llama", "q4_1", "tiny"), ("qwen2", "q4_k_m", "tiny"), ("llama", "q5_0", "tiny"), ("qwen2", "q8_0", "tiny"),
         ("llama", "q6_k", "tiny"), ("qwen2", "f16", "tiny"), ("llama", "q4_k", "tiny"), ("qwen2", "q5_k", "tiny"),
         ("llama", "q2_k", "tiny"), ("qwen2", "mxfp4", "tiny"),
         ("llama", "q4_1", {"base": "smollm2-135m", "n_layer": 2}),
         ("qwen2", "q4_k_m", {"base": "qwen2.5-0.5b", "n_layer": 2}),
         ("qwen2", "q4_k_m", {"base": "qwen2.5-7b", "n_layer": 1})]


# first: the 32-value engine for the Q4_K / Q6_K gate/up, down and output (tunes "stream" and "wide"
# 0), the wide engine with the wide down projection, the stream kernels (all three kinds; and all but
# the down) (the 7B cut of CASES' last case stays loaded)
LATE_STATE_CASES = [("qwen2", "q4_k_m", {"base": "qwen2.5-7b", "n_layer": 1}, {"stream": 0, "wide": 0}),
                    ("qwen2", "q4_k_m", {"base": "qwen2.5-7b", "n_layer": 1},
                     {"stream": 0, "pf_first": 0, "wide_down": 1}),
                    ("qwen2", "q4_k_m", {"base": "qwen2.5-7b", "n_layer": 1}, {"stream": 1}),
                    ("qwen2", "q4_k_m", {"base": "qwen2.5-7b", "n_layer": 1}, {"stream": 1, "stream_down": 0}),
                    ("qwen2", "q4_k_m", "tiny", {"stream": 1}),
                    ("llama", "q6_k", "tiny", {"wide_down": 1}),
                    ("llama", "q4_1", "tiny", {"early_state": False}), ("qwen2", "q6_k", "tiny", {"early_state": False}),
                    ("llama", "q4_1", {"base": "smollm2-135m", "n_layer": 2}, {"early_state": False})]
# a build variant of the kernel module (DecodePlan.compile_options: FD_PF_L1); launch-shape tunes
BUILD_CASES = [("qwen2", "q4_k_m", {"base": "qwen2.5-7b", "n_layer": 1}, {"pf_l1": 1}),
               # acquire/release fences and L2 loads in the attention's last-block merge (merge_max 0:
               # that merge at every position), the output's argmax tail and the matvec tail
               ("qwen2", "q4_k_m", {"base": "qwen2.5-7b", "n_layer": 1}, {"fence_ar": 1, "ldcg": 1, "merge_max": 0}),
               # one merge per KV head and head slice (the 7B: 2 slices of 4 / 3 heads per KV head)
               ("qwen2", "q4_k_m", {"base": "qwen2.5-7b", "n_layer": 1}, {"att_zmerge": 1, "merge_max": 0}),
               # the two-pass merge (the default is the one-pass merge, FD_ATT_MERGE1)
               ("qwen2", "q4_k_m", {"base": "qwen2.5-7b", "n_layer": 1}, {"att_merge1": 0, "merge_max": 0}),
               # the stream kernels (gate/up, down, output) with the block barrier per stage (st_warp 0)
               ("qwen2", "q4_k_m", {"base": "qwen2.5-7b", "n_layer": 1}, {"stream": 1, "st_warp": 0}),
               ("qwen2", "q4_k_m", {"base": "qwen2.5-0.5b", "n_layer": 2}, {"gate_up_lpr": 16, "ks_units": 2}),
               # fd_gate_up without the register cap (the 0.5B's 512-thread grid takes fd_gate_up_b2 by default)
               ("qwen2", "q4_k_m", {"base": "qwen2.5-0.5b", "n_layer": 2}, {"gate_up_b2": 0}),
               # the x-resident down projection (fd_matvec_xr_q6k here: the cuts' down layers are Q6_K)
               ("qwen2", "q4_k_m", {"base": "qwen2.5-7b", "n_layer": 1}, {"down_xr": 1}),
               ("qwen2", "q4_k_m", "tiny", {"down_xr": 1, "gate_up_xr": 1, "o_proj_xr": 1}),  # layer 0's down is Q4_K, layer 1's Q6_K
               # the x-resident o-projection: merge_max 0 (the attention's merged vector) and the late merge
               ("qwen2", "q4_k_m", {"base": "qwen2.5-7b", "n_layer": 1}, {"o_proj_xr": 1, "merge_max": 0}),
               ("qwen2", "q4_k_m", {"base": "qwen2.5-7b", "n_layer": 1}, {"o_proj_xr": 1, "merge_max": 12288}),
               ("qwen2", "q4_k_m", {"base": "qwen2.5-7b", "n_layer": 1}, {"gate_up_xr": 1, "xr_gate_up_rb": 1}),
               ("qwen2", "q4_k_m", {"base": "qwen2.5-0.5b", "n_layer": 2}, {"down_xr": 1, "xr_rb": 4,
                                                                            "xr_down_bps": 2})]


@pytest.mark.parametrize("arch,qtype,shape,tune", [c + ({},) for c in CASES] + LATE_STATE_CASES + BUILD_CASES,
                         ids=lambda v: (v if isinstance(v, str) else
                                        v.get("base", ("stream" if v.get("stream") else
                                                       "build" if ("pf_l1" in v or "fence_ar" in v or "att_zmerge" in v or "att_merge1" in v) else "xr" if any(k.endswith("_xr") for k in v) else "shape" if ("gate_up_lpr" in v or "gate_up_b2" in v) else
                                                       "late_state") if v else "")))
def test_fast_logits_equal_step_logits(tmp_path_factory, arch, qtype, shape, tune):
    from rocmforge_lab.backend.fast_decode import FastDecoder

    m = _model(tmp_path_factory, arch, qtype, shape)
    prompt = list(range(3, 3 + 40, 2))
    s_step, s_fast = m.session(n_ctx=128), m.session(n_ctx=128)
    s_step.forward(prompt, last_only=True)
    s_fast.forward(prompt, last_only=True)
    fd = FastDecoder(m, s_fast, tune=tune)
    if not m.backend.is_hip:
        assert fd.mode == "graph", fd.graph_error
        assert fd.pdl == fd._pdl_wanted(), fd.pdl_error  # programmatic dependent launch on sm_90+
    tok = 17
    worst = 0.0
    for step in range(6):
        ref = s_step.forward([tok], last_only=True)[-1]
        got = fd.step_logits(tok)
        worst = max(worst, _rel(got, ref))
        assert s_fast.n_past == s_step.n_past
        tok = int(np.argmax(ref))
    assert worst < 1e-2, worst
    print(f"{arch} {qtype} {shape} {tune}: max relative L2 of logits fast vs step over 6 steps = {worst:.2e} ({fd.mode}, "
          f"pdl {fd.pdl})")


def _step_greedy(session, tok, n):
    out, margins = [], []
    for _ in range(n):
        lg = session.forward([tok], last_only=True)[-1].astype(np.float64)
        top2 = np.sort(lg)[-2:]
        tok = int(np.argmax(lg))
        out.append(tok)
        margins.append(float(top2[1] - top2[0]) / max(1e-30, float(np.abs(lg).max())))
    return out, margins


@pytest.mark.parametrize("arch,qtype", [("llama", "q4_1"), ("qwen2", "q4_k_m")])
@pytest.mark.parametrize("graph", [True, False])
def test_fast_greedy_tokens_equal_step_tokens(tmp_path_factory, arch, qtype, graph):
    from rocmforge_lab.backend.fast_decode import FastDecoder

    m = _model(tmp_path_factory, arch, qtype)
    prompt = [5, 9, 100, 33, 7, 250, 11]
    s_step, s_fast = m.session(n_ctx=96), m.session(n_ctx=96)
    s_step.forward(prompt, last_only=True)
    s_fast.forward(prompt, last_only=True)
    fd = FastDecoder(m, s_fast, graph=graph, chunk=3)
    assert fd.mode == ("graph" if graph and not m.backend.is_hip else fd.mode)
    assert fd.pdl == (graph and fd.mode == "graph" and fd._pdl_wanted()), fd.pdl_error
    # full chunks replay one graph of 3 steps, the rest one step per replay
    assert (fd.graph_chunk is not None) == (fd.mode == "graph")
    ref, margins = _step_greedy(s_step, 42, 32)
    got = fd.decode(42, 32)
    assert len(got) == 32 and s_fast.n_past == s_step.n_past == len(prompt) + 32
    assert s_fast.tokens == prompt + [42] + got[:31]
    for i, (a, b) in enumerate(zip(got, ref)):
        if a != b:
            assert margins[i] < 1e-4, f"token {i}: fast {a} != step {b} with top-2 margin {margins[i]:.3g}"
            break


@pytest.mark.parametrize("arch,qtype", [("llama", "q4_1"), ("qwen2", "q4_k_m")])
def test_fast_decode_short_attention_grids(tmp_path_factory, arch, qtype):
    """A short sequence in a long context: each chunk's graph launches only the attention splits its
    positions need (FastDecoder._splits_for; here from 1 split up, tune att_min_splits 1). Tokens and
    logits must equal those of the full-grid graph bit for bit (the blocks cut only held keys past
    the position)."""
    from rocmforge_lab.backend.fast_decode import FastDecoder

    m = _model(tmp_path_factory, arch, qtype)
    prompt = list(range(3, 43))
    runs = []
    for tune in ({"att_min_splits": 1}, {"att_min_splits": 0}):
        s = m.session(n_ctx=384)
        s.forward(prompt, last_only=True)
        fd = FastDecoder(m, s, chunk=8, tune=tune)
        toks = fd.decode(7, 117)  # positions 40 .. 156, then one step at 157
        runs.append((toks, fd.step_logits(toks[-1]), sorted(fd._graphs), fd.mode))
    (t_cut, lg_cut, g_cut, mode), (t_full, lg_full, g_full, _) = runs
    assert t_cut == t_full
    assert np.array_equal(lg_cut, lg_full)
    if mode == "graph":  # eager launches (no graph support) always take the full grid
        assert g_cut == [1, 2, 4, 6] and g_full == [6], (g_cut, g_full)


def test_fast_decode_allocates_nothing_and_waits_per_chunk(tmp_path_factory):
    from rocmforge_lab.backend.fast_decode import FastDecoder
    from rocmforge_lab.backend.memory import AllocationHook

    m = _model(tmp_path_factory, "qwen2", "q4_k_m")
    s = m.session(n_ctx=256)
    s.forward(list(range(1, 60)), last_only=True)
    fd = FastDecoder(m, s, chunk=8)
    fd.decode(3, 4)  # warm-up
    waits = []
    orig = fd._wait
    fd._wait = lambda ev, what: (waits.append(what), orig(ev, what))[1]
    with AllocationHook() as hook:
        toks = fd.decode(3, 32)
    assert len(toks) == 32
    assert hook.raw == 0 and hook.allocs == 0 and hook.mallocs == 0, (hook.raw, hook.allocs, hook.mallocs)
    # one wait per chunk of 8 tokens plus the final one: no per-token synchronisation
    assert len(waits) <= 32 // 8 + 1, waits
    print(f"fast decode: {fd.mode} mode, {len(fd.plan.launches)} launches per token, "
          f"{len(waits)} host waits for 32 tokens, 0 allocations")


def test_fast_decode_stop_ids_and_resume(tmp_path_factory):
    from rocmforge_lab.backend.fast_decode import FastDecoder

    m = _model(tmp_path_factory, "llama", "q4_1")
    prompt = [8, 6, 4, 2, 99]
    s_step, s_fast = m.session(n_ctx=96), m.session(n_ctx=96)
    s_step.forward(prompt, last_only=True)
    s_fast.forward(prompt, last_only=True)
    ref, _ = _step_greedy(s_step, 13, 12)
    fd = FastDecoder(m, s_fast, chunk=4)
    stop = ref[5]
    k = ref.index(stop)
    got = fd.decode(13, 12, stop_ids={stop})
    assert got == ref[:k + 1], (got, ref)
    assert s_fast.n_past == len(prompt) + k + 1
    # continue: the device state must not have advanced past the stop
    more = fd.decode(got[-1], 12 - (k + 1))
    assert got + more == ref, (got + more, ref)
    # streaming, closed early: session keeps exactly the fed tokens
    s2 = m.session(n_ctx=96)
    s2.forward(prompt, last_only=True)
    fd2 = FastDecoder(m, s2, chunk=2)
    it = fd2.stream_tokens(13, 12)
    first3 = [next(it) for _ in range(3)]
    it.close()
    assert first3 == ref[:3] and s2.n_past == len(prompt) + 3
    assert s2.forward([first3[-1]], last_only=True).shape[-1] == m.config.vocab_size


def test_fast_decoder_for_session_rules(tmp_path_factory):
    from rocmforge_lab.backend import fast_decode as F

    m = _model(tmp_path_factory, "llama", "q4_1")
    s = m.session(n_ctx=64)
    fd = F.fast_decoder_for(s)
    assert fd is not None and F.fast_decoder_for(s) is fd
    s._hooks.append(lambda op, out, st: None)
    assert F.fast_decoder_for(s) is None
    s._hooks.clear()
    F.set_fast(False)
    try:
        assert F.fast_decoder_for(s) is None
    finally:
        F.set_fast(True)
    assert F.fast_decoder_for(s.fork()) is not fd


def test_sampled_generation_takes_the_fast_path(tmp_path_factory):
    """Non-greedy sampling: the graph computes the logits, the host samples. With top_k=1 the
    sampler is greedy, so the tokens must equal the step path's (up to a near-tie), and a seeded
    temperature-1 run must repeat itself and leave the cache as the step path would."""
    import rocmforge_lab.backend.fast_decode as F

    m = _model(tmp_path_factory, "qwen2", "q4_k_m")
    prompt = [5, 9, 100, 33, 7, 250, 11]
    s = m.session(n_ctx=128)
    r = s.generate(prompt, max_tokens=24, temperature=0.7, top_k=1)
    assert r.timings["path"].startswith("gpu fast") and "host sampling" in r.timings["path"]
    ref_s = m.session(n_ctx=128)
    F.set_fast(False)
    try:
        ref = ref_s.generate(prompt, max_tokens=24, temperature=0.7, top_k=1)
    finally:
        F.set_fast(True)
    assert ref.timings["path"] == "cupy step"
    assert r.token_ids[:8] == ref.token_ids[:8]  # synthetic models: no near-ties this early
    assert s.tokens == ref_s.tokens[:len(s.tokens)]
    a = m.session(n_ctx=128).generate(prompt, max_tokens=16, temperature=1.0, seed=3)
    b_s = m.session(n_ctx=128)
    b = b_s.generate(prompt, max_tokens=16, temperature=1.0, seed=3)
    assert a.token_ids == b.token_ids
    # the cache the fast path filled gives the step path's logits for the next token
    nxt = b_s.forward([1], last_only=True)
    fresh = m.session(n_ctx=128)
    F.set_fast(False)
    try:
        want = fresh.forward(list(b_s.tokens), last_only=True)
    finally:
        F.set_fast(True)
    assert _rel(nxt, want) < 1e-2
