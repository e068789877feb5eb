"""kernels/fused_decode.hip on the CPU emulator (no GPU needed): each fused kernel against a
float64 NumPy reference, and the whole decode-step plan of backend/fast_decode.py (the exact
launch list the GPU graph replays) against the NumPy engine on tiny synthetic models.

Tolerances: matvecs 1e-5 of sum|w||x| (f32 accumulation) + 2e-5 of sum|w| max|x| (the kernels
stage x as 16-bit integers per 32-value block: error <= 0.5 / 32639 of the block maximum);
end-to-end logits relative L2 < 1e-3 with an f32 KV cache (measured ~1e-4) and < 1e-2 with the f16 cache the GPU
uses by default.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import reference as R  # noqa: E402
from rocmforge_lab.backend.fast_decode import ATT_MERGE1, ATT_ZMERGE, QTYPE_ID, STREAM_DEFAULTS  # noqa: E402
from emu import emu as E  # noqa: E402

pytestmark = pytest.mark.skipif(not E.available(), reason="g++ not found: the CPU kernel emulator needs it")

_mods: dict = {}


def mod(ws=32, st_warp=0):
    """The emulated module for warp size ws; st_warp 1: the FD_ST_WARP build (the stream ring's
    barrier per warp, tune "st_warp")."""
    if (ws, st_warp) not in _mods:
        _mods[ws, st_warp] = E.EmuModule("fused_decode", ws, defines={"FD_ST_WARP": "1"} if st_warp else None)
    return _mods[ws, st_warp]


FAST = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"}


def _quantize(m, x, arena=None, norm_off=-1, eps=0.0):
    """fd_quantize: x -> (h words, l words, 32-block scales, 16-value sums)."""
    n = x.size
    X = (np.zeros(n // 4, np.int32), np.zeros(n // 4, np.int32), np.zeros(n // 32, np.float32),
         np.zeros(n // 16, np.float32))
    m.launch("fd_quantize", (1,), (128,), arena if arena is not None else np.zeros(64, np.uint8), x, n, norm_off, eps, *X)
    return X


def _dequant_x(X):
    h, l, s, _ = X
    q = 256 * h.view(np.int8).astype(np.int64) + l.view(np.int8)
    return q * np.repeat(s.astype(np.float64), 32)


@pytest.mark.parametrize("ws", [32, 64])
def test_emu_fused_quantize(ws):
    rng = np.random.default_rng(10)
    n = 320
    x = (rng.standard_normal(n) * np.repeat(rng.uniform(0.01, 10, n // 32), 32)).astype(np.float32)
    x[64:96] = 0.0  # an all-zero block
    X = _quantize(mod(ws), x)
    err = np.abs(_dequant_x(X) - x)
    amax = np.repeat(np.abs(x.reshape(-1, 32)).max(1), 32)
    assert np.all(err <= 0.5 * amax / 32639 * (1 + 1e-5) + 1e-30), float((err / np.maximum(amax, 1e-30)).max())
    assert np.allclose(X[3], x.astype(np.float64).reshape(-1, 16).sum(1), rtol=1e-5, atol=1e-5 * np.abs(x).max())
    # with RMSNorm
    w = (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)
    arena, (wo,) = R.pack_arena(w.view(np.uint8))
    Xn = _quantize(mod(ws), x, arena, wo, 1e-5)
    ref = R.rms_norm_ref(x, w, 1e-5)
    assert np.all(np.abs(_dequant_x(Xn) - ref) <= 2e-5 * np.repeat(np.abs(ref.reshape(-1, 32)).max(1), 32) + 1e-7)


def _check_emu_matvec(qtype, rows, cols, seed, cases):
    """y (= base when accumulating) += W x + bias on the emulator for each (warp size, lanes per
    group, accumulate, kernel, groups per task) case, against float64 NumPy."""
    rng = np.random.default_rng(seed)
    raw = R.random_tensor(qtype, rows, cols, rng)
    ref = R.dequant_ref(raw, qtype, rows, cols).astype(np.float64)
    bias = rng.standard_normal(rows).astype(np.float32)
    arena, (w_off, b_off) = R.pack_arena(raw, bias.view(np.uint8))
    rb = R.row_bytes(qtype, cols)
    x = rng.standard_normal(cols).astype(np.float32)
    base = rng.standard_normal(rows).astype(np.float32)
    tol = 1e-5 * (np.abs(ref) @ np.abs(x) + np.abs(bias) + np.abs(base)) + 2e-5 * np.abs(ref).sum(1) * np.abs(x).max()
    for ws, lpr, acc, kern, ks in cases:
        X = _quantize(mod(ws), x)
        y = base.copy() if acc else np.full(rows, np.nan, np.float32)
        threads = max(64 if ws == 32 else 128, lpr * ks)
        grid = 2  # grid-stride: fewer blocks than tasks
        mod(ws).launch(kern, (grid,), (threads,), arena, None, QTYPE_ID[qtype], w_off, rb, rows, cols, *X, b_off, y, acc,
                       None, -1, 0.0, None, None, None, None, int(lpr != 16), lpr, ks)
        want = ref @ x + bias + (base if acc else 0.0)
        err = np.abs(y - want)
        assert np.all(err <= tol), (qtype, ws, lpr, acc, kern, ks, float(err.max()), float(tol.min()))


@pytest.mark.parametrize("qtype", R.ALL_QTYPES)
def test_emu_fused_matvec(qtype):
    kernels = ["fd_matvec", "fd_matvec_any"] if qtype in FAST else ["fd_matvec_any"]
    # (warp size, lanes per group, accumulate, kernel, groups per task: split-K inside the block)
    cases = [(32, 8, 0, kernels[-1], 1), (32, 16, 1, kernels[0], 1), (32, 32, 1, kernels[-1], 1),
             (32, 32, 1, kernels[0], 2), (32, 8, 1, kernels[-1], 4),
             (32, 16, 1, kernels[0] + "_ls", 2)]  # _ls: the state read after the PDL wait
    if os.environ.get("RF_EMU_FULL") or qtype in ("Q4_K", "Q6_K", "Q4_1"):
        cases += [(64, 32, 1, kernels[0], 1), (64, 32, 0, kernels[0], 4)]
    _check_emu_matvec(qtype, 13, 512, 11, cases)  # odd rows: the last pair task has one row


def test_build_variant_options():
    """DecodePlan.compile_options (fast_decode.build_options): the default build is the FD_ST_WARP
    one; tune pf_l1 adds FD_PF_L1 (a module of its own: kernels.get_function's cache key holds the
    options), st_warp 0 gives the build without options."""
    from rocmforge_lab.backend import fast_decode as F
    from rocmforge_lab.backend import kernels as K

    src = (K.kernels_dir() / "fused_decode.hip").read_text()
    assert "#if defined(RF_CUDA) && defined(FD_PF_L1) && FD_PF_L1" in src
    assert "#if defined(FD_ST_WARP) && FD_ST_WARP && defined(RF_CUDA)" in src
    plan = F.DecodePlan.__new__(F.DecodePlan)  # compile_options reads only the tune
    plan.tune = {}
    assert plan.compile_options == F.build_options({}) == ("-DFD_ST_WARP=1",)
    plan.tune = {"st_warp": 0}
    assert plan.compile_options == ()
    plan.tune = {"pf_l1": 1}
    assert plan.compile_options == ("-DFD_PF_L1=1", "-DFD_ST_WARP=1")
    plan.tune = {"fence_ar": 1, "ldcg": 1, "st_warp": 0}
    assert plan.compile_options == ("-DFD_FENCE_AR=1", "-DFD_LDCG=1")


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_emu_fused_matvec_wide(qtype):
    """The wide engine (fd_matvec_w1_<type>); 3 Q6_K blocks per row: every other row starts 2 bytes
    off a word boundary (the funnel-shifted loads)."""
    kern = f"fd_matvec_w1_{qtype.replace('_', '').lower()}"
    cases = [(32, 8, 0, kern, 1), (32, 16, 1, kern, 1), (32, 32, 1, kern, 2), (64, 32, 1, kern, 1), (64, 16, 0, kern, 2)]
    _check_emu_matvec(qtype, 13, 768, 17, cases)


def test_emu_fused_matvec_tail():
    """The last block quantizes RMSNorm(y) * w into the output vector after every block added its rows."""
    rng = np.random.default_rng(13)
    rows, cols = 96, 256
    raw = R.random_tensor("Q4_K", rows, cols, rng)
    ref = R.dequant_ref(raw, "Q4_K", rows, cols).astype(np.float64)
    w = (1 + 0.1 * rng.standard_normal(rows)).astype(np.float32)
    arena, (w_off, n_off) = R.pack_arena(raw, w.view(np.uint8))
    x = rng.standard_normal(cols).astype(np.float32)
    y = rng.standard_normal(rows).astype(np.float32)
    X = _quantize(mod(), x)
    out = (np.zeros(rows // 4, np.int32), np.zeros(rows // 4, np.int32), np.zeros(rows // 32, np.float32),
           np.zeros(rows // 16, np.float32))
    cnt = np.zeros(1, np.int32)
    y0 = y.copy()
    mod().launch("fd_matvec", (5,), (64,), arena, None, QTYPE_ID["Q4_K"], w_off, R.row_bytes("Q4_K", cols), rows, cols, *X,
                 -1, y, 1, cnt, n_off, 1e-6, *out, 0, 8, 1)
    assert cnt[0] == 0
    want_y = y0 + ref @ x
    assert np.allclose(y, want_y, rtol=1e-4, atol=1e-4 * np.abs(want_y).max())
    n = R.rms_norm_ref(y, w, 1e-6)
    assert np.all(np.abs(_dequant_x(out) - n) <= 2e-5 * np.abs(n).max())


def _check_emu_gate_up(tg, tu, d, ff, kern, threads, lpr, ws=32, seed=12, st_warp=0, grid=None):
    """act = silu(W_gate n) * (W_up n), n = RMSNorm(x) * w, and its quantized copy, on the emulator
    against float64 NumPy; then with the done flag set the kernel writes nothing."""
    rng = np.random.default_rng(seed)
    rg, ru = R.random_tensor(tg, ff, d, rng), R.random_tensor(tu, ff, d, rng)
    wg = R.dequant_ref(rg, tg, ff, d).astype(np.float64)
    wu = R.dequant_ref(ru, tu, ff, d).astype(np.float64)
    nw = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    arena, (og, ou, on) = R.pack_arena(rg, ru, nw.view(np.uint8))
    x = rng.standard_normal(d).astype(np.float32)  # the residual: every block normalizes it itself
    state = np.array([5, 0, 0, 0], np.int32)
    act = np.full(ff, np.nan, np.float32)
    out = (np.zeros(ff // 4, np.int32), np.zeros(ff // 4, np.int32), np.zeros(ff // 32, np.float32),
           np.zeros(ff // 16, np.float32))
    args = (arena, state, x, on, 1e-5, d, QTYPE_ID[tg], og, R.row_bytes(tg, d), QTYPE_ID[tu], ou, R.row_bytes(tu, d), ff)
    grid = grid or ff // 32  # the xr kernels: fewer blocks, each looping over 32-row blocks
    mod(ws, st_warp).launch(kern, (grid,), (threads,), *args, act, *out, lpr)
    n = R.rms_norm_ref(x, nw, 1e-5)
    g, u = wg @ n, wu @ n
    with np.errstate(over="ignore"):  # exp(-g) overflows to inf for very negative g (result 0)
        want = R.swiglu_ref(g, u)
    eg = 1e-5 * (np.abs(wg) @ np.abs(n)) + 4e-5 * np.abs(wg).sum(1) * np.abs(n).max()
    eu = 1e-5 * (np.abs(wu) @ np.abs(n)) + 4e-5 * np.abs(wu).sum(1) * np.abs(n).max()
    tol = 1.2 * (eg * (np.abs(u) + eu) + eu * np.abs(g)) + 1e-6
    assert np.all(np.abs(act - want) <= tol), (kern, float(np.abs(act - want).max()))
    assert np.all(np.abs(_dequant_x(out) - act) <= 2e-5 * np.abs(act).max())  # its quantized copy
    state[2] = 1
    act2 = np.full(ff, 7.0, np.float32)
    mod(ws, st_warp).launch(kern, (grid,), (threads,), *args, act2, *out, lpr)
    assert np.all(act2 == 7.0)


@pytest.mark.parametrize("qpair", [("Q4_K", "Q4_K"), ("Q5_0", "Q8_0"), ("Q6_K", "F16")])
def test_emu_fused_gate_up(qpair):
    tg, tu = qpair
    kern = "fd_gate_up" if tg in FAST and tu in FAST else "fd_gate_up_any"
    _check_emu_gate_up(tg, tu, 256, 64, kern, 64, 8)


@pytest.mark.parametrize("threads,lpr,kern", [(512, 16, "fd_gate_up"), (256, 32, "fd_gate_up"), (512, 16, "fd_gate_up_b2")])
def test_emu_fused_gate_up_qwen05b_rows(threads, lpr, kern):
    """d_model 896 (the Qwen2.5-0.5B shape's 28 units per row): 32 row pairs of a block at once in 512
    threads of 16 lanes (DecodePlan._gate_up_lpr), or in 4 rounds of 8 pairs of 32 lanes; fd_gate_up_b2
    is fd_gate_up capped at 64 registers (CUDA)."""
    _check_emu_gate_up("Q5_0", "Q5_0", 896, 64, kern, threads, lpr)


# The stream engine (fd_st_run): rows copied through a ring of shared-memory stages. d 4096: two
# stages of 8 Q4_K blocks per row pair; 768: one stage of 3; warp size 64: 2 warps of 16 row pairs.
# st_warp 1: the FD_ST_WARP build (each warp runs its own ring, no block barrier per stage).
@pytest.mark.parametrize("d,ff,ws,st_warp", [(768, 64, 32, 0), (4096, 32, 32, 0), (768, 32, 64, 0),
                                             (4096, 32, 32, 1)])
def test_emu_stream_gate_up(d, ff, ws, st_warp):
    _check_emu_gate_up("Q4_K", "Q4_K", d, ff, "fd_gate_up_s_q4k", 128, 0, ws=ws, seed=d + ws, st_warp=st_warp)


# fd_gate_up_xr_q4k: one wave of blocks looping over the 32-row blocks. d 768: 12 units (one warp,
# 20 idle lanes) x 4 / 8 groups; 2560: 40 units (two warps per group at warp 32, one at 64); grid 3
# over 7 / 5 row blocks: blocks with 3 / 2 / 2 (2 / 2 / 1) of them, so both partial buffers alternate
@pytest.mark.parametrize("d,ff,threads,grid,ws,kern", [(768, 224, 128, 3, 32, "fd_gate_up_xr_q4k"),
                                                       (768, 160, 256, 3, 32, "fd_gate_up_xr_q4k_r1"),
                                                       (2560, 224, 256, 3, 32, "fd_gate_up_xr_q4k"),
                                                       (2560, 160, 256, 2, 64, "fd_gate_up_xr_q4k")])
def test_emu_xr_gate_up(d, ff, threads, grid, ws, kern):
    _check_emu_gate_up("Q4_K", "Q4_K", d, ff, kern, threads, 0, ws=ws, seed=d + ff, grid=grid)


def _check_emu_stream_matvec(qtype, rows, cols, rpb, ws, seed, st_warp=0, v=""):
    """fd_matvec_s_<q>: y (+)= W x for rows in runs of rpb per block, each row's blocks split over
    the block's warps, against float64 NumPy (tolerance as _check_emu_matvec's)."""
    _check_emu_rows_matvec(f"fd_matvec_s_{qtype.replace('_', '').lower()}{v}", 128, qtype, rows, cols, rpb, ws, seed,
                           st_warp)


def _check_emu_rows_matvec(kern, threads, qtype, rows, cols, rpb, ws, seed, st_warp=0):
    """A matvec kernel with fd_matvec_s's arguments (rows in runs of rpb per block, `threads` per
    block): y (+)= W x against float64 NumPy (tolerance as _check_emu_matvec's)."""
    rng = np.random.default_rng(seed)
    raw = R.random_tensor(qtype, rows, cols, rng)
    ref = R.dequant_ref(raw, qtype, rows, cols).astype(np.float64)
    arena, (w_off,) = R.pack_arena(raw)
    x = rng.standard_normal(cols).astype(np.float32)
    base = rng.standard_normal(rows).astype(np.float32)
    tol = 1e-5 * (np.abs(ref) @ np.abs(x) + np.abs(base)) + 2e-5 * np.abs(ref).sum(1) * np.abs(x).max()
    X = _quantize(mod(ws), x)
    for acc in (0, 1):
        y = base.copy() if acc else np.full(rows, np.nan, np.float32)
        mod(ws, st_warp).launch(kern, (-(-rows // rpb),), (threads,), arena, None, w_off, R.row_bytes(qtype, cols), rows,
                                cols, *X, y, acc, rpb)
        err = np.abs(y - (ref @ x + (base if acc else 0.0)))
        assert np.all(err <= tol), (kern, qtype, rows, cols, rpb, ws, acc, float(err.max()), float(tol.min()))


# 3 blocks per row: Q6_K rows start 2 bytes off a word boundary every other row, some warps have no
# blocks; 40 blocks: several stages per warp; rpb 40 > 32 rows per round (FD_KP): two rounds
@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("rows,cols,rpb,ws", [(13, 768, 5, 32), (45, 768, 40, 32), (7, 10240, 3, 32),
                                              (9, 10240, 4, 64)])
def test_emu_stream_matvec(qtype, rows, cols, rpb, ws):
    _check_emu_stream_matvec(qtype, rows, cols, rpb, ws, rows + cols)


@pytest.mark.parametrize("qtype,rows,cols,rpb,v", [("Q6_K", 45, 768, 40, ""), ("Q4_K", 7, 10240, 3, "_v1")])
def test_emu_stream_matvec_st_warp(qtype, rows, cols, rpb, v):
    """The FD_ST_WARP build: warps without blocks, several stages per warp and two rounds of rows, each
    warp on its own ring (_v1: 4 stages of 1 KiB)."""
    _check_emu_stream_matvec(qtype, rows, cols, rpb, 32, rows + cols, st_warp=1, v=v)


def _check_emu_xr_matvec(qtype, rows, cols, rpb, ws, seed, rb_suffix="", groups=1):
    """fd_matvec_xr_<q>: y (+)= W x, one 64-value unit of x per thread held in registers, `groups`
    groups of ceil(cols / 64 / ws) warps per block, rows in runs of rpb per block."""
    threads = -(-(cols // 64) // ws) * ws * groups
    _check_emu_rows_matvec(f"fd_matvec_xr_{qtype.replace('_', '').lower()}{rb_suffix}", threads, qtype, rows, cols,
                           rpb, ws, seed)


# 768 columns: 12 units, one warp with 20 idle lanes; 2,560: 40 units, two warps (Q6_K blocks 2 bytes
# off a word boundary every other block, and every other row); rpb 40 / 70: rounds of 32 rows (FD_XR_R)
# and a last step past the block's rows; rpb 3 with RB 2 / 4: a block ending mid-step; warp size 64
@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("rows,cols,rpb,ws,rbs", [(13, 768, 5, 32, ""), (71, 2560, 40, 32, ""),
                                                  (75, 768, 70, 32, "_r4"), (7, 2560, 3, 32, "_r1"),
                                                  (9, 2560, 3, 64, "_r4")])
def test_emu_xr_matvec(qtype, rows, cols, rpb, ws, rbs):
    _check_emu_xr_matvec(qtype, rows, cols, rpb, ws, rows + cols, rbs)


# groups: 768 columns in 4 groups of 32 threads (rpb 70: a round of 32 rows = 8 steps of 4 groups;
# the last step of 70 rows leaves groups 2 and 3 idle), 2560 in 2 groups of 64 (RB 4), wave64: 2 groups
@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("rows,cols,rpb,ws,rbs,groups", [(75, 768, 70, 32, "", 4), (37, 2560, 9, 32, "_r4", 2),
                                                         (37, 2560, 9, 64, "_r1", 2)])
def test_emu_xr_matvec_groups(qtype, rows, cols, rpb, ws, rbs, groups):
    _check_emu_xr_matvec(qtype, rows, cols, rpb, ws, rows + cols, rbs, groups)


@pytest.mark.parametrize("qtype,d,vocab,grid,ws,st_warp,v", [
    ("Q6_K", 768, 37, 3, 32, 0, ""), ("Q4_K", 4096, 21, 2, 32, 0, ""), ("Q6_K", 2560, 45, 2, 64, 0, ""),
    ("Q6_K", 768, 37, 3, 32, 1, ""), ("Q6_K", 2560, 37, 3, 32, 1, "_v1"), ("Q4_K", 4096, 21, 2, 32, 0, "_v1")])
def test_emu_stream_output(qtype, d, vocab, grid, ws, st_warp, v):
    """fd_output_s_<q>: logits = W RMSNorm(x) * w over contiguous row-pair ranges per warp (odd vocab:
    the last pair has one row), the argmax token and state update of the last block, and the token's
    embedding row written into the residual (st_warp 1: the FD_ST_WARP build)."""
    rng = np.random.default_rng(vocab)
    raw = R.random_tensor(qtype, vocab, d, rng)
    W = R.dequant_ref(raw, qtype, vocab, d).astype(np.float64)
    emb = rng.standard_normal((vocab, d)).astype(np.float32)
    nw = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    arena, (wo, eo, no) = R.pack_arena(raw, emb.view(np.uint8), nw.view(np.uint8))
    x = rng.standard_normal(d).astype(np.float32)
    resid = x.copy()
    state = np.array([4, 0, 0, 0], np.int32)
    logits = np.full(vocab, np.nan, np.float32)
    part_v, part_i, cnt = np.zeros(grid, np.float32), np.zeros(grid, np.int32), np.zeros(1, np.int32)
    tokens, stop = np.full(8, -1, np.int32), np.full(4, -1, np.int32)
    kern = f"fd_output_s_{qtype.replace('_', '').lower()}{v}"
    mod(ws, st_warp).launch(kern, (grid,), (128,), arena, state, resid, no, 1e-5, d, QTYPE_ID[qtype], wo, R.row_bytes(qtype, d),
                   vocab, logits, part_v, part_i, cnt, tokens, stop, 4, QTYPE_ID["F32"], eo, 4 * d, 0)
    n = R.rms_norm_ref(x, nw, 1e-5)
    want = W @ n
    tol = 1e-5 * (np.abs(W) @ np.abs(n)) + 2e-5 * np.abs(W).sum(1) * np.abs(n).max()
    assert np.all(np.abs(logits - want) <= tol), float(np.abs(logits - want).max())
    tok = int(np.argmax(logits))
    assert tokens[4] == tok and tuple(state[:3]) == (5, tok, 0) and cnt[0] == 0
    assert np.array_equal(resid, emb[tok])


# _ls: the kernels that read the state after the PDL wait; _m1: fd_oproj_m1, the version-1 late merge
@pytest.mark.parametrize("ls", ["", "_ls", "_m1"])
@pytest.mark.parametrize("ws,merge_max,nh,n_ctx,pos,threads,grid_splits", [
    (32, 12288, 4, 256, 200, 64, None),    # 4 splits, 4 threads per 8-value group share them
    (32, 0, 4, 256, 200, 64, None),        # the attention's own merge
    (64, 12288, 4, 256, 200, 128, None),
    (32, 12288, 16, 640, 600, 32, None),   # 10 splits (two load rounds), more groups than threads
    (32, 0, 4, 1024, 200, 64, 4),          # a grid of the first 4 of 16 splits (FastDecoder._splits_for)
    (64, 12288, 4, 1024, 300, 128, 8),
    (32, -1, 16, 640, 600, 32, None),      # -1: merge_max 0 with one merge per (KV head, head slice)
    (32, -1, 14, 1024, 300, 128, 8),       # (FD_ATT_ZMERGE): slices of 3, 3 and 1 heads of each group of 7
    (64, -1, 4, 256, 200, 128, None),      # (wave64: the emulator needs whole-warp uniform shuffles)
    (32, -2, 16, 640, 600, 32, None),      # -2: -1 with the one-pass merge (FD_ATT_MERGE1; 10 splits:
    (32, -2, 14, 1024, 300, 128, 8)])      # two rounds of 8)
def test_emu_attention_then_oproj(ws, merge_max, nh, n_ctx, pos, threads, grid_splits, ls):
    _attention_then_oproj(ws, merge_max, nh, n_ctx, pos, threads, grid_splits, ls)


# fd_oproj_xr_<q>: 16 heads of 32 (512 columns: 8 units, one warp per group); 4 groups of 32 threads,
# 5 rows per block (the last block 4); late merge (12288) and the attention's merged vector (0); 8
# groups. (Wave64: the grouped rows are covered by test_emu_xr_matvec_groups; the emulator hangs in the
# attention of 16 heads at wave64, whose shuffles it needs whole-warp uniform.)
@pytest.mark.parametrize("wq", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("merge_max,ws,threads", [(12288, 32, 128), (0, 32, 128), (0, 32, 256)])
def test_emu_attention_then_oproj_xr(wq, merge_max, ws, threads):
    _attention_then_oproj(ws, merge_max, 16, 640, 600, threads, None, "", wq=wq, xr_rpb=5)


def _attention_then_oproj(ws, merge_max, nh, n_ctx, pos, threads, grid_splits, ls, wq="Q8_0", xr_rpb=0):
    """fd_attn over several 64-key splits (the last one partial), then fd_oproj: resid += W_o attention.
    merge_max 12288: every o-proj block merges the split partials itself (late merge); 0: fd_attn's
    last block merges into xa; -1: 0 with FD_ATT_ZMERGE (the last block of each KV head and head slice
    merges that slice). grid_splits: the attention grid covers only the context's first
    splits (enough for the position), as the decoder's graphs for a short sequence in a long context."""
    import math

    rng = np.random.default_rng(14)
    nkv, hd, layer = 2, 32, 0
    d = 64
    kc = (0.5 * rng.standard_normal((1, nkv, n_ctx, hd))).astype(np.float32)
    vc = rng.standard_normal((1, nkv, n_ctx, hd)).astype(np.float32)
    q = rng.standard_normal(nh * hd).astype(np.float32)
    raw = R.random_tensor(wq, d, nh * hd, rng)
    wo = R.dequant_ref(raw, wq, d, nh * hd).astype(np.float64)
    arena, (w_off,) = R.pack_arena(raw)
    state = np.array([pos, 0, 0, 0], np.int32)
    n_split = n_ctx // 64
    part_acc = np.zeros(n_split * nh * hd, np.float32)
    part_ml = np.zeros(n_split * nh * 2, np.float32)
    zmerge, merge1 = merge_max < 0, merge_max == -2
    merge_max = max(merge_max, 0)
    G = nh // nkv
    hpb = 3 if G > 3 else G  # query heads per block: the 16-head case spreads each group of 8 over 3 blocks
    cnt = np.zeros(nkv * -(-G // hpb), np.int32)
    out = np.full(nh * hd, np.nan, np.float32)
    xa = (np.zeros(nh * hd // 4, np.int32), np.zeros(nh * hd // 4, np.int32), np.zeros(nh * hd // 32, np.float32),
          np.zeros(nh * hd // 16, np.float32))
    scale = 1 / math.sqrt(hd)
    mod(ws).launch("fd_attn_f32_hd32" + ls.replace("_m1", ""), (grid_splits or n_split, nkv, -(-G // hpb)), (128,), state, q, kc, vc, part_acc, part_ml,
                   cnt, out, *xa, layer, nh, nkv, n_ctx, scale, merge_max, hpb | (ATT_ZMERGE if zmerge else 0) | (ATT_MERGE1 if merge1 else 0))
    assert cnt.sum() == 0
    want = R.attention_ref(q.astype(np.float64).reshape(1, nh, hd), kc.astype(np.float64), vc.astype(np.float64),
                           layer, pos, pos + 1, scale).reshape(-1)
    if merge_max == 0:  # the attention merged
        assert np.allclose(out, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    else:
        assert np.all(np.isnan(out))  # nothing merged here
    base = rng.standard_normal(d).astype(np.float32)
    y = base.copy()
    if xr_rpb:  # the x-resident kernel: rows in runs of xr_rpb per block (its ks argument)
        mod(ws).launch(f"fd_oproj_xr_{wq.replace('_', '').lower()}", (-(-d // xr_rpb),), (threads,), arena, state,
                       QTYPE_ID[wq], w_off, R.row_bytes(wq, nh * hd), d, nh * hd, *xa, y, part_acc, part_ml, nh, hd,
                       merge_max, 0, 32, xr_rpb)
    else:
        mod(ws).launch("fd_oproj" + ls, (3,), (threads,), arena, state, QTYPE_ID[wq], w_off,
                       R.row_bytes(wq, nh * hd), d, nh * hd, *xa, y, part_acc, part_ml, nh, hd, merge_max, 0, 32, 1)
    ref = wo @ want + base
    tol = 1e-4 * (np.abs(wo) @ np.abs(want) + np.abs(base)) + 3e-5 * np.abs(wo).sum(1) * np.abs(want).max()
    assert np.all(np.abs(y - ref) <= tol), float(np.abs(y - ref).max())


@pytest.mark.parametrize("m,n_split,want", [
    (16, 64, {0: 16, 1023: 16, 1024: 32, 2047: 32, 2048: 64, 4095: 64}),
    (1, 6, {0: 1, 63: 1, 64: 2, 127: 2, 128: 4, 255: 4, 256: 6, 383: 6}),
    (16, 11, {0: 11, 700: 11}),    # a context of fewer splits: always its own
    (0, 64, {0: 64, 4095: 64})])   # 0: off, the context's grid
def test_attention_grid_for_positions(m, n_split, want):
    """FastDecoder._splits_for: the graph's attention grid for steps at positions <= pos covers
    keys 0..pos (the grid the emulator test above runs cut), doubling from m, at most the context's."""
    from types import SimpleNamespace

    from rocmforge_lab.backend.fast_decode import ATT_CHUNK, FastDecoder

    fd = SimpleNamespace(plan=SimpleNamespace(n_split=n_split, tune={"att_min_splits": m}))
    got = {pos: FastDecoder._splits_for(fd, pos) for pos in want}
    assert got == want
    assert all(ATT_CHUNK * g > pos for pos, g in got.items())


def test_stream_gate_up_default_needs_async_copies(tmp_path):
    """DecodePlan's default gate/up kernel for an all-Q4_K model with d_model % 256 == 0: the stream
    kernel (STREAM_DEFAULTS) where the device has asynchronous copies (async_copy: CUDA sm_80+), the
    wide kernel elsewhere (HIP); tune "stream_gate_up" overrides either way. The output likewise
    (stream by default with asynchronous copies, tune "stream_output"); down stays off."""
    from rocmforge_lab import synth
    from rocmforge_lab.backend.fast_decode import DecodePlan

    path = synth.make_gguf(tmp_path / "q.gguf", arch="qwen2", shape="tiny", qtype="q4_k_m", seed=3)
    m, refs, _ = _weights_from_gguf(path)
    assert m.config.d_model % 256 == 0

    def kernels(async_copy, **tune):
        plan = DecodePlan(m.config, refs, "f16", 16, n_sm=2, warp_size=32, tune=tune, async_copy=async_copy)
        return {k: {l.kernel for l in plan.launches if l.kind == k} for k in ("gate_up", "down", "output")}

    on, off = kernels(True), kernels(False)
    assert on["gate_up"] == {"fd_gate_up_s_q4k"}, on
    assert off["gate_up"] == {"fd_gate_up_w1_q4k"}, off
    assert on["down"] == off["down"] and not any("_s_q" in k for k in on["down"])
    assert len(on["output"]) == 1 and next(iter(on["output"])).startswith("fd_output_s_q"), on
    assert not any("_s_q" in k for k in off["output"]), off
    assert kernels(True, stream_gate_up=0)["gate_up"] == off["gate_up"]
    assert kernels(False, stream_gate_up=1)["gate_up"] == on["gate_up"]
    assert kernels(True, stream_output=0)["output"] == off["output"]


def test_gate_up_register_cap_choice(tmp_path):
    """A 512-thread fd_gate_up grid (the Qwen2.5-0.5B shape: 32 row pairs x 16 lanes per block) takes
    fd_gate_up_b2, the same code capped at 64 registers so 2 blocks fit a multiprocessor (its 152
    blocks in one wave); tune "gate_up_b2" 0 keeps fd_gate_up; other grids keep it anyway."""
    from rocmforge_lab import synth
    from rocmforge_lab.backend.fast_decode import DecodePlan

    shape = {"base": "qwen2.5-0.5b", "n_layer": 1, "vocab_size": 512}
    path = synth.make_gguf(tmp_path / "q.gguf", arch="qwen2", shape=shape, qtype="q4_k_m", seed=3)
    m, refs, _ = _weights_from_gguf(path)

    def gate_up(**tune):
        plan = DecodePlan(m.config, refs, "f16", 64, n_sm=132, warp_size=32, tune=tune)
        (l,) = [l for l in plan.launches if l.kind == "gate_up"]
        return l.kernel, l.grid, l.block

    assert gate_up() == ("fd_gate_up_b2", (4864 // 32,), (512,)), gate_up()
    assert gate_up(gate_up_b2=0) == ("fd_gate_up", (4864 // 32,), (512,))
    assert gate_up(gate_up_threads=256)[0] == "fd_gate_up"  # 4 rounds of 8 pairs in 256 threads: no cap


def test_xr_launch_shapes(tmp_path):
    """The x-resident tunes on a one-layer cut of the Qwen2.5-7B shape (layer 0's down is Q6_K): off
    by default; down: one group of ceil(296 units / warp) warps, 28 rows per block of the one-wave
    grid; o-projection: 4 groups of 64 threads (56 units); gate/up: one wave of 132 blocks of 4
    groups, at most 256 threads (its launch bound) whatever the tune asks."""
    from rocmforge_lab import synth
    from rocmforge_lab.backend.fast_decode import DecodePlan

    shape = {"base": "qwen2.5-7b", "n_layer": 1, "vocab_size": 512}
    path = synth.make_gguf(tmp_path / "q.gguf", arch="qwen2", shape=shape, qtype="q4_k_m", seed=3, random_bytes=True)
    m, refs, _ = _weights_from_gguf(path)

    def launches(ws=32, **tune):
        plan = DecodePlan(m.config, refs, "f16", 64, n_sm=132, warp_size=ws, tune=tune)
        return {l.kind: (l.kernel, l.grid, l.block, l.args[-1]) for l in plan.launches}

    base = launches()
    assert not any("_xr" in k for k, *_ in base.values()), base
    assert launches(down_xr=1)["down"] == ("fd_matvec_xr_q6k", (128,), (320,), ("i32", 28))
    assert launches(64, down_xr=1, xr_rb=4)["down"] == ("fd_matvec_xr_q6k_r4", (128,), (320,), ("i32", 28))
    assert launches(o_proj_xr=1)["o_proj"] == ("fd_oproj_xr_q4k", (128,), (256,), ("i32", 28))
    assert launches(o_proj_xr=1, xr_o_proj_bps=2)["o_proj"][1:] == ((-(-3584 // 14),), (256,), ("i32", 14))
    gu = launches(gate_up_xr=1)["gate_up"]
    assert gu[:3] == ("fd_gate_up_xr_q4k", (132,), (256,)), gu
    assert launches(gate_up_xr=1, xr_gate_up_threads=1024, xr_gate_up_rb=1)["gate_up"][:3] == (
        "fd_gate_up_xr_q4k_r1", (132,), (256,))
    assert launches(gate_up_xr=1, xr_gate_up_grid=148)["gate_up"][1] == (148,)
    with pytest.raises(ValueError, match="xr_rb"):
        launches(down_xr=1, xr_rb=3)


# ------------------------------------------------------------------------------------------------
# the whole decode step (DecodePlan) on the emulator vs the NumPy engine


def _weights_from_gguf(path):
    """(config, {name: WeightRef}, arena) laid out like the GPU backend's WeightArena."""
    import gguf

    import rocmforge_lab as rf
    from rocmforge_lab.backend.fast_decode import WeightRef
    from rocmforge_lab.gguf_file import open_gguf
    from rocmforge_lab.model import Transformer

    m = rf.load(str(path), device="cpu", progress=False)
    gf = open_gguf(path)
    names = Transformer.check_shapes(gf, m.config, m.transformer.arch)
    raws, metas = [], []
    for name in names:
        t = gf.tensors[name]
        shape = tuple(int(s) for s in t.shape)
        raw = np.asarray(t.raw).reshape(-1).view(np.uint8)
        qn = t.qtype.name
        if len(shape) == 1:
            if qn != "F32":
                raw = gguf.quants.dequantize(raw, t.qtype).astype(np.float32).reshape(-1).view(np.uint8)
            qn = "F32"
            rows, cols = 1, shape[0]
            rb = cols * 4
        else:
            rows, cols = shape[0], shape[1]
            qk, bs = gguf.GGML_QUANT_SIZES[t.qtype]
            rb = cols // qk * bs
        raws.append(raw)
        metas.append((name, qn, rb, rows, cols))
    arena, offs = R.pack_arena(*raws)
    refs = {name: WeightRef(qn, off, rb, rows, cols) for (name, qn, rb, rows, cols), off in zip(metas, offs)}
    return m, refs, arena


class EmuDecoder:
    """Runs a DecodePlan's launches on the emulator over numpy buffers."""

    def __init__(self, cfg, refs, arena, kv, n_ctx, ws=32, tune=None):
        from rocmforge_lab.backend.fast_decode import MAX_STOP, Buf, DecodePlan

        self.plan = DecodePlan(cfg, refs, kv, n_ctx, n_sm=2, warp_size=ws, tune=dict(tune or {}))
        opts = self.plan.compile_options  # a build variant: its -DNAME=VALUE options as defines
        self.mod = (E.EmuModule("fused_decode", ws, defines=dict(o[2:].split("=", 1) for o in opts)) if opts
                    else mod(ws))
        self.bufs = {name: np.zeros(n, dt) for name, (dt, n) in self.plan.buffers.items()}
        for name, host in self.plan.init.items():
            self.bufs[name][:] = host
        shape = (cfg.n_layer, cfg.n_head_kv, n_ctx, cfg.head_dim)
        dt = np.float16 if kv == "f16" else np.float32
        self.bufs["k_cache"] = np.zeros(shape, dt)
        self.bufs["v_cache"] = np.zeros(shape, dt)
        self.bufs["arena"] = arena
        self.bufs["stop"][:] = -1
        self.Buf = Buf
        self.MAX_STOP = MAX_STOP

    def _arg(self, a):
        if a is None:
            return None
        if isinstance(a, self.Buf):
            return self.bufs[a.name]
        return a[1]

    def start(self):
        for l in self.plan.start_launches:
            self.mod.launch(l.kernel, l.grid, l.block, *[self._arg(a) for a in l.args])

    def step(self):
        for l in self.plan.launches:
            self.mod.launch(l.kernel, l.grid, l.block, *[self._arg(a) for a in l.args])


PLAN_CASES = [("llama", "q4_1", "f32", {}), ("qwen2", "q4_k_m", "f16", {"stream": 0}),  # the wide engine
              ("qwen2", "q4_k_m", "f16", {"stream": 1}),  # the stream kernels for the same model
              ("llama", "q4_1", "f16", {"early_state": False}),  # the "_ls" kernels (state read after the wait)
              ("qwen2", "q4_k_m", "f16", {"pf_l1": 1}),  # a build variant (compile_options; on the CPU a define only)
              ("qwen2", "q4_k_m", "f16", {"stream": 1, "st_warp": 1}),  # the stream kernels, one ring per warp
              ("qwen2", "q4_k_m", "f16", {"down_xr": 1, "gate_up_xr": 1, "o_proj_xr": 1})]  # the x-resident kernels
if os.environ.get("RF_EMU_FULL"):
    PLAN_CASES += [("qwen2", "q5_0", "f32", {}), ("llama", "q6_k", "f16", {})]


@pytest.mark.parametrize("arch,qtype,kv,tune", PLAN_CASES)
def test_emu_decode_plan_vs_numpy_engine(tmp_path, arch, qtype, kv, tune):
    from rocmforge_lab import synth

    path = synth.make_gguf(tmp_path / f"{arch}-{qtype}.gguf", arch=arch, shape="tiny", qtype=qtype, seed=3)
    m, refs, arena = _weights_from_gguf(path)
    cfg = m.config
    n_ctx = 16
    dec = EmuDecoder(cfg, refs, arena, kv, n_ctx, tune=tune)
    assert len(dec.plan.launches) == 5 * cfg.n_layer + 1
    n_stream = sum("_s_q" in l.kernel for l in dec.plan.launches)
    want_stream = qtype == "q4_k_m" and any(tune.get(f"stream_{k}", tune.get("stream", on)) != 0
                                            for k, on in STREAM_DEFAULTS.items())
    assert (n_stream > 0) == want_stream, [l.kernel for l in dec.plan.launches]
    n_xr = [l.kernel for l in dec.plan.launches if "_xr_" in l.kernel]
    assert n_xr == (["fd_oproj_xr_q4k", "fd_gate_up_xr_q4k", "fd_matvec_xr_q4k",  # layer 1's down: Q6_K
                     "fd_oproj_xr_q4k", "fd_gate_up_xr_q4k", "fd_matvec_xr_q6k"] if tune.get("down_xr") else []), n_xr
    n_ls = sum(l.kernel.endswith("_ls") for l in dec.plan.launches)  # early state: attention only for head_dim <= 64
    assert n_ls == (3 * cfg.n_layer if not tune.get("early_state", True) else cfg.n_layer * (cfg.head_dim > 64))
    st = dec.bufs["state"]
    s = m.session(n_ctx=n_ctx)
    ids = [5, 77, 300, 12, 9, 401]
    dec.bufs["stop"][0] = 499  # a stop id that greedy decoding is unlikely to hit
    tok = ids[0]
    for pos in range(len(ids) + 2):
        if pos < len(ids):  # a prompt token: its embedding comes from the start kernel
            st[:] = (pos, tok, 0, 0)
            dec.start()
        else:  # the previous step's argmax: fd_output already wrote its embedding into resid
            assert tuple(st[:3]) == (pos, tok, 0)
        dec.step()
        ref = s.forward([tok])[-1].astype(np.float64)
        got = dec.bufs["logits"].astype(np.float64)
        rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert rel < (1e-3 if kv == "f32" else 1e-2), (pos, rel)
        nxt = int(dec.bufs["tokens"][pos])
        assert nxt == int(np.argmax(dec.bufs["logits"])), "device argmax != numpy argmax of the same logits"
        assert st[0] == pos + 1 and st[1] == nxt and st[2] == (nxt == 499)
        assert dec.bufs["att_cnt"].sum() == 0 and dec.bufs["out_cnt"][0] == 0  # counters reset
        tok = ids[pos + 1] if pos + 1 < len(ids) else nxt
    # done flag: a step with done set changes nothing
    st[2] = 1
    before = {k: v.copy() for k, v in dec.bufs.items() if k != "arena"}
    dec.step()
    for k, v in before.items():
        assert np.array_equal(dec.bufs[k], v, equal_nan=True), k
