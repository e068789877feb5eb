"""Decode fast path: one token = one replay of a captured CUDA/HIP graph of fused kernels.

    from rocmforge_lab.backend.fast_decode import FastDecoder, fast_decoder_for
    fd = fast_decoder_for(session)                 # cached per session (None if not applicable)
    tokens = fd.decode(first_token, 128, stop_ids={eos})   # greedy; appends to session.tokens
    for tok in fd.stream(first_token, 128, stop_ids): ...  # tokens as they arrive (a few behind)

How one decode step runs (kernels/fused_decode.hip): `n_layer * 5 + 1` launches over fixed
buffers -- per layer qkv (RMSNorm + Q/K/V matvecs + bias + RoPE + KV append), attention (split-K
over 64-key blocks), o-proj (+ residual), gate/up + SwiGLU, down (+ residual); then the output kernel
(RMSNorm + output matvec + argmax; its last block writes the next token and that token's embedding
into the residual). No kernel has a serial "last block" phase but the output's argmax:
  * the residual's consumers (qkv, gate/up, output) normalize it themselves: every block reads the
    d_model floats of `resid` from L2, computes the RMSNorm and quantizes it into shared memory
    (16-bit integers per 32-value block, 8 values per thread), so o-proj / down just add their rows;
  * attention (one block per 64-key split, KV head and slice of query heads: `att_hpb`) writes
    per-split partials (max, sum, V accumulation) and, while the valid splits x n_head x head_dim
    stay <= MERGE_MAX (12288 floats: ~1.3k / ~0.8k tokens for SmolLM2 / Qwen2.5-0.5B shapes),
    every o-proj block merges them itself ("late merge"); beyond that the attention's last block per
    KV head and head slice merges (in one pass over the splits, rescaling online) and quantizes that
    slice's output (`DecodePlan.merge_max`, `DecodePlan.att_zmerge`; both kernels decide from the
    position, so one graph serves every position);
  * the SwiGLU output is quantized by the gate/up blocks (32 rows each) for the down projection; a
    512-thread gate/up grid (32 row pairs of 16 lanes: the Qwen2.5-0.5B shape) takes fd_gate_up_b2,
    capped at 64 registers so two blocks fit a multiprocessor and its 152 blocks run in one wave.
Matvecs stream their weights from the GGUF block layout with dp4a on the staged activations; long
rows are split across `ks` 32-lane groups of one block (`DecodePlan.ks_for`: the 7B's down rows).
All-Q4_K gate/up and Q4_K / Q6_K output layers take the "wide" kernels (64-value units, all loads of
a unit before its math: `DecodePlan._wide_name`, tune "wide" / "wide_<kind>"), and the gate/up
prologue prefetches only each lane group's first row pair into L2 (`DecodePlan.pf_flags`). An
all-Q4_K gate/up and an all-Q4_K or all-Q6_K output layer whose d_model is a multiple of 256 (the 7B
shape) take the stream kernels instead where the device has asynchronous copies (`fd_gate_up_s_q4k`,
`fd_output_s_q6k`: each warp's row pairs copied through its own ring of shared-memory stages with
asynchronous copies, the first stages issued before the programmatic-launch wait; the default build
`build_options({})` lets each warp run ahead on its ring, FD_ST_WARP; the down stream kernel is
opt-in: `STREAM_DEFAULTS`, `DecodePlan._stream_name`). The x-resident kernels (tunes "down_xr",
"o_proj_xr", "gate_up_xr", off by default: `XR_DEFAULTS`, `DecodePlan._xr_shape`,
`DecodePlan._gate_up_xr`) give each thread one 64-value unit of x in registers for the whole kernel
and stream the rows past it: Q4_K / Q6_K down and o-projections (x read once per thread instead of
once per row pair and lane group) and an all-Q4_K gate/up in one wave of blocks (the normalized
residual staged once per block instead of once per 32 rows).
Every kernel reads the position, the input token and a "done" flag from a small device `state`
buffer, and the output kernel writes the next token into it (and into `tokens[pos]`), so the
sequence is captured once as a graph (`cupy.cuda.Stream.begin_capture` / `end_capture`) and replayed
with no host work but `graph.launch`: a second graph holds `chunk` steps back to back (one replay per
chunk of tokens; tune "graph_steps" 1: one replay per token). With tune "att_min_splits" m > 0 the
attention grid of a graph covers only the 64-key splits its positions need (m, 2m, 4m, ... splits up
to the context's, a graph pair per size captured on first use: `FastDecoder._splits_for`), so a short
sequence in a long context (the session default is 4,096 tokens) launches no attention blocks past
its position (default m: `ATT_MIN_SPLITS`, 16). On CUDA devices of compute capability >= 9.0 the
kernels are captured with programmatic dependent launch (`_PdlLauncher`: `cuLaunchKernelEx` with
programmatic stream serialization): each kernel prefetches its first weight rows into L2 while the
previous kernel finishes, then waits for it (`fd_pdl_wait`); the o-proj, down and (head_dim <= 64)
attention kernels also read the position and done flag before that wait (`DecodePlan.ls`, tune
"early_state"), so no post-wait chain starts with a state load. Where capture fails (a CuPy build or
platform without graph support) the same launch list runs eagerly; `FastDecoder.mode` says which
("graph" or "eager"), `FastDecoder.pdl` whether the graph uses programmatic launches.

Per token the loop makes no device allocation and no host-device synchronisation: the host
launches replays ahead, and every `chunk` tokens an asynchronous copy of the new token ids into
pinned host memory plus an event; the host reads those a few tokens behind (`stream_tokens`), or at
the end (`decode`). A stop id sets `state.done` on the device, after which queued replays return at
once and the position stops advancing.

The launch sequence is built as data (`DecodePlan`: kernel names, grids, arguments naming
buffers) so the same plan runs on the CPU kernel emulator in tests (tests/gpu/test_emu_fused.py).

Rounding: matvecs accumulate in f32 and dot exact integer products; the activations are rounded
to 16 bits per 32-value block (relative 1.5e-5 of the block maximum); the KV cache is the
session's (f16 by default). Logits differ from the op-by-op path by ~1e-4 relative L2 (tests hold
them to 1e-2). Only greedy decoding (temperature 0, no penalties) is graphed; other samplers use
the step path. Measured speed: benchmarks/RESULTS.md.
"""
from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

KERNEL_FILE = "fused_decode"

# GGML type ids (kernels/quant_blocks.h RF_T_*)
QTYPE_ID = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q2_K": 10, "Q3_K": 11,
            "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "BF16": 30, "MXFP4": 39}
ATT_CHUNK = 64          # keys per attention block
ATT_HEAD_DIMS = (32, 64, 128)
ATT_MAXG = 32
ATT_QMAX = 4096
XS_MAX = 8192         # kernels/fused_decode.hip FD_XS_MAX: largest d_model
STREAM_XS_MAX = 4096  # FD_SXS: largest d_model of the stream kernels that stage x (gate/up, output)
STREAM_THREADS = 128  # FD_SW warps of 32 lanes (2 of 64)
# stream kernels by default per kind (tune "stream" / "stream_<kind>" override). H100, graph+PDL, 7B
# shape (benchmarks/RESULTS.md v8): gate/up 278 -> 290 tok/s; output no change in the graph (277);
# down slower (stream 1: 239, stream 1 without down: 288). v11, with the per-warp ring (st_warp) and
# the one-pass attention merge: output 309 -> 311-313 tok/s (on); down 264 (off).
STREAM_DEFAULTS = {"gate_up": 1, "down": 0, "output": 1}
# tunes "<kind>_xr": the x-resident kernels (DecodePlan._xr_shape, DecodePlan._gate_up_xr); off until
# measured on a GPU (benchmarks/RESULTS.md v14)
XR_DEFAULTS = {"down": 0, "o_proj": 0, "gate_up": 0}
XR_MAX_THREADS = 384    # FD_XR_T: most threads per fd_matvec_xr block (cols <= 64 x 384)
GATE_UP_XR_MAX_THREADS = 256  # fd_gate_up_xr_q4k's launch bound (FD_LBT(256, 1))
ATT_MIN_SPLITS = 16   # smallest attention grid (64-key splits) of a graph, 0: always the context's
                      # (FastDecoder._splits_for; H100, 4,096-token context: +1.7% / +0.8% tok/s
                      # SmolLM2 / 7B shapes, see benchmarks/RESULTS.md v8)
GATE_UP_LPR_SMALL = 16  # lanes per gate/up row pair of small grids (DecodePlan._gate_up_lpr; 0: off)
KS_UNITS = 4            # units per lane before a matvec row is split over more lane groups (ks_for;
                        # H100: 2 gave 1,115 vs 1,156 tok/s on the 0.5B shape, 285 vs 288 on the 7B)
PF_L1_DEFAULT = 0       # tune "pf_l1" (DecodePlan.compile_options)
FENCE_AR_DEFAULT = 0    # tune "fence_ar": last-block fences as fence.acq_rel.gpu (DecodePlan.compile_options)
LDCG_DEFAULT = 0        # tune "ldcg": the attention merge's loads as ld.global.cg (DecodePlan.compile_options)
GATE_UP_B2_DEFAULT = 1  # tune "gate_up_b2": a 512-thread fd_gate_up grid takes fd_gate_up_b2 (<= 64 registers;
                        # H100, Qwen2.5-0.5B shape: 1,235-1,236 vs 1,149-1,154 tok/s, RESULTS.md v12)
ST_WARP_DEFAULT = 1     # tune "st_warp": the stream kernels' ring barrier per warp, not per block (FD_ST_WARP)
ATT_ZMERGE = 0x10000    # FD_ATT_ZMERGE: fd_attn's hpb flag, one merge per (KV head, head slice)
ATT_MERGE1 = 0x20000    # FD_ATT_MERGE1: fd_attn's hpb flag, the one-pass merge (tune "att_merge1")
ATT_MERGE1_DEFAULT = 1  # tune "att_merge1" (H100, 7B shape: 305-306 vs 296-300 tok/s; attention alone, merging
                        # at position 640: 10.6 vs 12.7 us (7B), 8.0 vs 13.6 us (SmolLM2); RESULTS.md v11)
ATT_ZMERGE_DEFAULT = 1  # tune "att_zmerge" (DecodePlan.att_zmerge; H100, 7B shape: 296-298 vs 289-290 tok/s)
MERGE_MAX = 12288     # FD_MERGE_MAX: splits x n_head x head_dim merged by each o-projection block
MAX_STOP = 16           # stop ids the device checks (unused slots hold -1)
# weight types with integer-dot decoders: their kernels need half the registers of the "_any"
# variants, which also handle F32 / F16 / BF16 / Q2_K / Q3_K / MXFP4 (float decoders)
FAST_TYPES = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"}
STATE_POS, STATE_TOK, STATE_DONE = 0, 1, 2


class FastPathUnsupported(ValueError):
    """This model / backend / session cannot use the fused decode path (the reason says why)."""


@dataclass(frozen=True)
class WeightRef:
    """Where one tensor sits in the weight arena (byte offset, GGUF block layout)."""

    qtype: str
    offset: int
    row_bytes: int
    rows: int
    cols: int

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes


@dataclass(frozen=True)
class Buf:
    """A buffer argument, by name (resolved by an executor)."""

    name: str


@dataclass
class Launch:
    kernel: str
    grid: tuple[int, ...]
    block: tuple[int, ...]
    args: tuple
    label: str                 # e.g. "blk.3.qkv", "output"
    kind: str                  # qkv | attn | o_proj | gate_up | down | output
    weight_bytes: int = 0      # weight bytes this launch streams


def _i32(v):
    return ("i32", int(v))


def _i64(v):
    return ("i64", int(v))


def _f32(v):
    return ("f32", float(v))


def attention_splits(pos: int, n_split: int, min_splits: int) -> int:
    """64-key splits of an attention grid for positions <= pos: the smallest of m, 2m, 4m, ... (m =
    min_splits) that covers keys 0..pos, at most n_split (the context's); min_splits <= 0: n_split."""
    if min_splits <= 0:
        return n_split
    b, need = min_splits, pos // ATT_CHUNK + 1
    while b < need:
        b *= 2
    return min(b, n_split)


def default_att_hpb(G: int, head_dim: int) -> int:
    """Query heads per attention block for a GQA group of G heads (DecodePlan.att_hpb without its
    tune): 1 at head_dim <= 64, else the group spread evenly over ceil(G / 2) blocks."""
    if head_dim <= 64:
        return 1
    return -(-G // -(-G // 2))


def lanes_per_row(cols: int, warp_size: int = 32) -> int:
    """Lanes cooperating on one row: every type has cols/32 units per row."""
    units = cols // 32
    lpr = 32 if units >= 24 else (16 if units >= 12 else 8)
    return min(lpr, warp_size)


def build_options(tune: dict) -> tuple[str, ...]:
    """Extra compiler options of the kernel module for `tune` (each set is a build of its own:
    kernels.get_function's cache key holds them; `build_options({})` is the default build).
    "pf_l1" 1: the weight prefetches go to L1 as well as L2, FD_PF_L1 (H100, graph+PDL: 1,486 / 1,146
    / 289 tok/s vs 1,508 / 1,150 / 289 for the three benchmark shapes, so off by default); "fence_ar",
    "ldcg": the last-block pattern's fences / loads (FD_FENCE_AR, FD_LDCG; off); "st_warp": the stream
    kernels' ring barrier per warp instead of per block (FD_ST_WARP; CUDA; on: H100, 7B shape, 309 vs
    305-306 tok/s, see benchmarks/RESULTS.md v11)."""
    opts = []
    if int(tune.get("pf_l1", PF_L1_DEFAULT)):
        opts.append("-DFD_PF_L1=1")
    if int(tune.get("fence_ar", FENCE_AR_DEFAULT)):  # fd_fence: fence.acq_rel.gpu, not fence.sc
        opts.append("-DFD_FENCE_AR=1")
    if int(tune.get("ldcg", LDCG_DEFAULT)):  # fd_ld_l2: ld.global.cg, not volatile loads
        opts.append("-DFD_LDCG=1")
    if int(tune.get("st_warp", ST_WARP_DEFAULT)):  # fd_st_bar: each warp runs its own ring
        opts.append("-DFD_ST_WARP=1")
    return tuple(opts)


@dataclass
class DecodePlan:
    """The launch list of one decode step and the buffers it needs (sizes in elements).

    External buffers (supplied by the executor): `arena` (uint8 weight arena), `k_cache`,
    `v_cache` ([n_layer, n_kv, n_ctx, head_dim], f16 or f32).
    """

    cfg: Any
    weights: Mapping[str, WeightRef]
    kv_dtype: str
    n_ctx: int
    n_sm: int
    warp_size: int = 32
    tune: dict = field(default_factory=dict)   # threads, small_threads, blocks_per_sm, lpr_max
    async_copy: bool = True  # the device has cp.async (CUDA sm_80+): the stream kernels' default is on
    buffers: dict[str, tuple[Any, int]] = field(default_factory=dict)
    launches: list[Launch] = field(default_factory=list)        # one decode step (the graph)
    start_launches: list[Launch] = field(default_factory=list)  # once per decode call, before the steps
    init: dict[str, np.ndarray] = field(default_factory=dict)   # buffer contents set at construction

    def __post_init__(self):
        self.check()
        self._build()

    # ------------------------------------------------------------------ validation
    def check(self) -> None:
        cfg = self.cfg
        d, hd = cfg.d_model, cfg.head_dim
        if self.kv_dtype not in ("f16", "f32"):
            raise FastPathUnsupported(f"KV cache dtype {self.kv_dtype} (f16 or f32 only)")
        for what, n in (("d_model", d), ("d_ff", cfg.d_ff), ("n_head * head_dim", cfg.n_head * hd)):
            if n % 32:
                raise FastPathUnsupported(f"{what} {n} (need a multiple of 32)")
        if d > XS_MAX:
            raise FastPathUnsupported(f"d_model {d} (the fused kernels stage at most {XS_MAX} values per block)")
        G = cfg.n_head // cfg.n_head_kv
        if G > ATT_MAXG or G * hd > ATT_QMAX or hd not in ATT_HEAD_DIMS:
            raise FastPathUnsupported(f"GQA group {G} x head_dim {hd} is not supported by the decode attention kernel "
                                      f"(head_dim {ATT_HEAD_DIMS}, group <= {ATT_MAXG})")
        if hd % 2 or cfg.rope_dim % 2 or not 0 < cfg.rope_dim <= hd:
            raise FastPathUnsupported(f"head_dim {hd} / rope_dim {cfg.rope_dim} must be even, rope_dim <= head_dim")
        if cfg.rope_style not in ("normal", "neox"):
            raise FastPathUnsupported(f"rope style {cfg.rope_style}")
        for name, w in self.weights.items():
            if w.qtype not in QTYPE_ID:
                raise FastPathUnsupported(f"tensor '{name}' has type {w.qtype}")

    # ------------------------------------------------------------------ construction
    def _w(self, name: str) -> WeightRef:
        try:
            return self.weights[name]
        except KeyError:
            raise FastPathUnsupported(f"tensor '{name}' missing from the weight table") from None

    def _shape(self, n_tasks: int, lpr: int, min_threads: int = 0,
               per_sm: int | None = None) -> tuple[tuple[int], tuple[int]]:
        """(grid, block) for n_tasks row tasks of lpr lanes: 256 threads (tune: "small_threads" when
        that leaves fewer blocks than multiprocessors), at most `per_sm` (default 8) blocks per
        multiprocessor (grid-stride beyond). Measured on an H200: 256 threads beat 128 and 64."""
        cap = min(per_sm or 8, self.tune.get("blocks_per_sm", 8)) * self.n_sm
        threads = max(self.tune.get("threads", 256), min_threads)
        blocks = -(-n_tasks // (threads // lpr))
        if blocks < self.n_sm:
            threads = max(self.tune.get("small_threads", 256), lpr, self.warp_size, min_threads)
            blocks = -(-n_tasks // (threads // lpr))
        return (max(1, min(blocks, cap)),), (threads,)

    @property
    def out_blocks_max(self) -> int:
        return self.tune.get("blocks_per_sm", 8) * self.n_sm

    def _lpr(self, cols: int, boost: bool = True) -> int:
        """Lanes per row group; tune "lpr_min" raises it (not for gate/up, whose blocks hold 32 rows)."""
        lpr = min(lanes_per_row(cols, self.warp_size), self.tune.get("lpr_max", 32))
        if boost:
            lpr = max(lpr, min(int(self.tune.get("lpr_min", 8)), self.warp_size, 32))
        return lpr

    @property
    def n_split(self) -> int:
        return -(-self.n_ctx // ATT_CHUNK)

    def _build(self) -> None:
        cfg = self.cfg
        d, hd, nh, nkv, ff = cfg.d_model, cfg.head_dim, cfg.n_head, cfg.n_head_kv, cfg.d_ff
        V = cfg.vocab_size
        f32, i32 = np.float32, np.int32
        self.buffers = {
            "state": (i32, 4),
            "resid": (f32, d),
            "q": (f32, nh * hd),
            "attn": (f32, nh * hd),
            "act": (f32, ff),
            "logits": (f32, V),
            "part_acc": (f32, self.n_split * nh * hd),
            "part_ml": (f32, self.n_split * nh * 2),
            "att_cnt": (i32, nkv * -(-(nh // nkv) // self.att_hpb)),  # one counter per (KV head, head slice)
            "out_v": (f32, self.out_blocks_max),
            "out_i": (i32, self.out_blocks_max),
            "out_cnt": (i32, 1),
            "tokens": (i32, self.n_ctx),
            "stop": (i32, MAX_STOP),
            "rope": (f32, self.n_ctx * (cfg.rope_dim // 2) * 2),
        }
        # quantized activation vectors (kernels/fused_decode.hip FdX): xa = attention output,
        # xf = SwiGLU output (the normalized residual is staged by each consumer block itself)
        for x, n in (("xa", nh * hd), ("xf", ff)):
            self.buffers.update({f"{x}_h": (i32, n // 4), f"{x}_l": (i32, n // 4), f"{x}_s": (f32, n // 32),
                                 f"{x}_sum": (f32, n // 16)})
        # cos / sin of pos * base^(-2i / n_rot) in float64, rounded to f32 (as rope.hip computes them)
        half_rot = cfg.rope_dim // 2
        inv = np.float64(cfg.rope_base) ** (-2.0 * np.arange(half_rot, dtype=np.float64) / cfg.rope_dim)
        theta = np.arange(self.n_ctx, dtype=np.float64)[:, None] * inv[None, :]
        cs = np.stack([np.cos(theta), np.sin(theta)], axis=-1).astype(np.float32)
        self.init = {"rope": cs.reshape(-1)}
        c = self.kv_dtype
        emb = self._w("token_embd.weight")
        eps = _f32(cfg.rms_eps)

        def X(x):
            return (Buf(f"{x}_h"), Buf(f"{x}_l"), Buf(f"{x}_s"), Buf(f"{x}_sum"))

        def any_(*ws):
            return "" if all(w.qtype in FAST_TYPES for w in ws) else "_any"

        def norm(name):
            return _i64(self._w(name).offset)
        scale = 1.0 / math.sqrt(hd)
        G = nh // nkv
        L: list[Launch] = []
        for i in range(cfg.n_layer):
            p = f"blk.{i}."
            wq, wk, wv = self._w(p + "attn_q.weight"), self._w(p + "attn_k.weight"), self._w(p + "attn_v.weight")
            for w, rows in ((wq, nh * hd), (wk, nkv * hd), (wv, nkv * hd)):
                if (w.rows, w.cols) != (rows, d):
                    raise FastPathUnsupported(f"layer {i}: Q/K/V shapes {(w.rows, w.cols)} != {(rows, d)}")

            def boff(role):
                return self._w(p + role + ".bias").offset if cfg.qkv_bias else -1

            lpr = min(int(self.tune.get("qkv_lpr", self._lpr(d))), self.warp_size, 32)  # tune: lanes per RoPE pair
            n_tasks = (nh * hd + 2 * nkv * hd) // 2
            grid, block = self._shape(n_tasks, lpr)
            L.append(Launch(
                f"fd_qkv_{c}{any_(wq, wk, wv)}", grid, block,
                (Buf("arena"), Buf("state"), Buf("resid"), norm(p + "attn_norm.weight"), eps, _i32(d),
                 _i32(QTYPE_ID[wq.qtype]), _i64(wq.offset), _i64(wq.row_bytes),
                 _i32(QTYPE_ID[wk.qtype]), _i64(wk.offset), _i64(wk.row_bytes),
                 _i32(QTYPE_ID[wv.qtype]), _i64(wv.offset), _i64(wv.row_bytes),
                 _i64(boff("attn_q")), _i64(boff("attn_k")), _i64(boff("attn_v")),
                 _i32(nh), _i32(nkv), _i32(hd), _i32(cfg.rope_dim), _i32(cfg.rope_style == "neox"), Buf("rope"),
                 Buf("k_cache"), Buf("v_cache"), _i32(i), _i32(self.n_ctx), Buf("q"), _i32(lpr)),
                p + "qkv", "qkv", wq.nbytes + wk.nbytes + wv.nbytes))
            L.append(Launch(
                f"fd_attn_{c}_hd{hd}{self.ls_attn}", (self.n_split, nkv, -(-G // self.att_hpb)), (128,),
                (Buf("state"), Buf("q"), Buf("k_cache"), Buf("v_cache"), Buf("part_acc"), Buf("part_ml"),
                 Buf("att_cnt"), Buf("attn"), *X("xa"), _i32(i), _i32(nh), _i32(nkv), _i32(self.n_ctx), _f32(scale),
                 _i32(self.merge_max), _i32(self.att_hpb | (ATT_ZMERGE if self.att_zmerge else 0)
                                                   | (ATT_MERGE1 if int(self.tune.get("att_merge1", ATT_MERGE1_DEFAULT)) else 0))),
                p + "attn", "attn", 0))
            wo = self._w(p + "attn_output.weight")
            L.append(self._matvec(wo, "xa", p + "o_proj", "o_proj", oproj=True))
            wg, wu = self._w(p + "ffn_gate.weight"), self._w(p + "ffn_up.weight")
            lpr = self._gate_up_lpr(d, ff, any_(wg, wu) != "")
            # one block per 32 rows: all 32 rows in one pass where that takes <= 512 threads and the grid
            # is small (latency), else 256 threads (H200: best for all three benchmark shapes); at 512
            # threads fd_gate_up_b2 (tune "gate_up_b2"), so 2 blocks fit a multiprocessor
            gthreads = self.tune.get("gate_up_threads") or (
                32 * lpr if (lpr <= 16 and ff // 32 < 2 * self.n_sm and not any_(wg, wu)) else 256)
            gxr = self._gate_up_xr(d, ff, wg, wu)
            gstream = "" if gxr else self._stream_name("fd_gate_up", "gate_up", (wg, wu))
            gwide = "" if (gxr or gstream) else self._wide_name("fd_gate_up", "gate_up", (wg, wu), max(gthreads, 64))
            gname = gstream or gwide or f"fd_gate_up{any_(wg, wu)}"
            if gname == "fd_gate_up" and gthreads == 512 and int(self.tune.get("gate_up_b2", GATE_UP_B2_DEFAULT)):
                gname = "fd_gate_up_b2"  # <= 64 registers: 2 blocks of 512 threads per multiprocessor
            ggrid, gblock = (ff // 32,), (STREAM_THREADS if gstream else max(gthreads, 64),)
            if gxr:
                gname, ggrid, gblock = gxr
            L.append(Launch(
                gname, ggrid, gblock,
                (Buf("arena"), Buf("state"), Buf("resid"), norm(p + "ffn_norm.weight"), eps, _i32(d),
                 _i32(QTYPE_ID[wg.qtype]), _i64(wg.offset),
                 _i64(wg.row_bytes), _i32(QTYPE_ID[wu.qtype]), _i64(wu.offset), _i64(wu.row_bytes), _i32(ff),
                 Buf("act"), *X("xf"), _i32(lpr | self.pf_flags(bool(gwide)) << 8)),
                p + "gate_up", "gate_up", wg.nbytes + wu.nbytes))
            wd = self._w(p + "ffn_down.weight")
            L.append(self._matvec(wd, "xf", p + "down", "down"))
        wout = self._w("token_embd.weight" if cfg.tied_output else "output.weight")
        lpr = min(int(self.tune.get("out_lpr", self._lpr(d))), self.warp_size)
        # one wave of blocks that loop over the rows (H200: 3 blocks of 256 threads fit a
        # multiprocessor at ~80 registers): every block stages the normalized x once and the
        # argmax has fewer partials, instead of 2.7 waves of short blocks
        grid, block = self._shape(-(-V // 2), lpr, per_sm=int(self.tune.get("out_blocks_per_sm", 3)))
        ostream = self._stream_name("fd_output", "output", (wout,))
        if ostream:  # one wave of 128-thread blocks, each warp streaming a contiguous range of row pairs
            grid = (min(self.out_blocks_max, int(self.tune.get("out_s_blocks_per_sm", 4)) * self.n_sm),)
            block = (STREAM_THREADS,)
        L.append(Launch(
            ostream or self._wide_name("fd_output", "output", (wout,), block[0]) or f"fd_output{any_(wout)}", grid, block,
            (Buf("arena"), Buf("state"), Buf("resid"), norm("output_norm.weight"), eps, _i32(d),
             _i32(QTYPE_ID[wout.qtype]), _i64(wout.offset), _i64(wout.row_bytes), _i32(V), Buf("logits"), Buf("out_v"),
             Buf("out_i"), Buf("out_cnt"), Buf("tokens"), Buf("stop"), _i32(MAX_STOP), _i32(QTYPE_ID[emb.qtype]),
             _i64(emb.offset), _i64(emb.row_bytes), _i32(lpr)),
            "output", "output", wout.nbytes))
        dup = int(self.tune.get("dup", 0))  # profiling aid: launch one kind twice (its marginal cost in the graph)
        if dup:
            kind = ("qkv", "attn", "o_proj", "gate_up", "down")[dup - 1]
            L = [x for l in L for x in ((l, l) if l.kind == kind else (l,))]
        self.launches = L
        self.start_launches = [Launch(
            "fd_embed", (1,), (256,),
            (Buf("arena"), Buf("state"), _i32(QTYPE_ID[emb.qtype]), _i64(emb.offset), _i64(emb.row_bytes), _i32(d),
             Buf("resid")),
            "embed", "embed", 0)]

    def _gate_up_lpr(self, d: int, ff: int, any_type: bool) -> int:
        """Lanes per gate/up row pair (tune "gate_up_lpr": 8, 16 or 32). A block holds 32 row pairs;
        where the grid is small (ff / 32 < 2 x multiprocessors) and the rows would take 32 lanes
        (d_model >= 768), GATE_UP_LPR_SMALL lanes instead, so the 32 pairs run at once in 512 threads
        instead of 4 rounds of 8 pairs in 256 (the Qwen2.5-0.5B shape, H100, graph+PDL: 1,182-1,189
        tok/s vs 1,155-1,161 with 32 lanes; 8 lanes: 1,173; benchmarks/RESULTS.md v9)."""
        lpr = self._lpr(d, boost=False)
        if "gate_up_lpr" in self.tune:
            lpr = min(int(self.tune["gate_up_lpr"]), self.warp_size, 32)
            if lpr not in (8, 16, 32):
                raise ValueError(f"tune gate_up_lpr {lpr} (8, 16 or 32)")
        elif GATE_UP_LPR_SMALL and lpr > GATE_UP_LPR_SMALL and ff // 32 < 2 * self.n_sm and not any_type:
            lpr = GATE_UP_LPR_SMALL
        return lpr

    @property
    def compile_options(self) -> tuple[str, ...]:
        """Extra compiler options of the kernel module for this plan's tune (`build_options`)."""
        return build_options(self.tune)

    @property
    def att_hpb(self) -> int:
        """Query heads per attention block (tune "att_hpb"): one at head_dim <= 64 (H100, graph+PDL,
        SmolLM2 shape, GQA group 3: 1,496-1,498 tok/s vs 1,477-1,480 with 2 heads, which had beaten
        the whole group by 2.6%; Qwen2.5-0.5B shape, group 7: equal; benchmarks/RESULTS.md v9); else
        a GQA group of more than 2 heads is spread evenly over ceil(G / 2) blocks per split, each slice
        merged by its own last block (`att_zmerge`): the 7B shape, H100, graph+PDL: 300 tok/s vs 296
        with slices of <= 4 heads (v9: 4 heads; 1, 2 or 7 without the per-slice merge were no faster;
        benchmarks/RESULTS.md v10)."""
        G = self.cfg.n_head // self.cfg.n_head_kv
        if "att_hpb" in self.tune:
            return max(1, min(G, int(self.tune["att_hpb"])))
        return default_att_hpb(G, self.cfg.head_dim)

    @property
    def att_zmerge(self) -> bool:
        """Where fd_attn merges its split partials itself (beyond merge_max), the last block of each
        (KV head, head slice) merges that slice's heads, so ceil(G / att_hpb) blocks per KV head merge
        in parallel instead of one block merging the whole group (tune "att_zmerge", default on).
        H100, benchmarks/attn_micro.py, position 640, graph+PDL launches: the 7B shape's attention
        15.6 -> 13.8 us (4 heads per block), 15.1 -> 13.0 (2); the small models' (their merge runs
        beyond ~0.8-1.3k tokens) 19.6 -> 13.9 us (Qwen2.5-0.5B shape), 15.8 -> 13.7 (SmolLM2)."""
        return bool(int(self.tune.get("att_zmerge", ATT_ZMERGE_DEFAULT)))

    @property
    def ls(self) -> str:
        """Kernel-name suffix of the attention / o-proj / down launches: "" (default) reads the
        position and done flag before waiting for the previous kernel ("early state", see
        fd_ld_state); tune "early_state" False: "_ls", the kernels that read them after the wait."""
        return "" if self.tune.get("early_state", True) else "_ls"

    @property
    def ls_attn(self) -> str:
        """The attention's suffix: as `ls` for head_dim <= 64, else "_ls" (tune "early_state_attn"
        forces either). H200, graph+PDL: the early-state attention gave +1.3% / +0.5% tok/s on top of
        the early o-proj / down for SmolLM2 / Qwen2.5-0.5B (head_dim 64), but the head_dim-128 kernel
        took 30 instead of 25 us (Qwen2.5-7B shape: -3.5% tok/s)."""
        early = self.tune.get("early_state", True) and self.cfg.head_dim <= 64
        return "" if self.tune.get("early_state_attn", early) else "_ls"

    @property
    def merge_v_suffix(self) -> str:
        """The o-projection's kernel-name suffix: "" = late merge version 2 (the merge weights of all
        heads in one round, fd_merge_weights); tune "merge_v" 1: "_m1", version 1 (one thread per head
        looping over the splits; early-state kernels only). H200, graph+PDL, two runs, SmolLM2 shape:
        1,420-1,452 vs 1,356-1,370 tok/s (+4..6%); Qwen2.5-0.5B shape: no change (noise); the 7B
        shape has no late merge at position 640."""
        return "_m1" if int(self.tune.get("merge_v", 2)) == 1 and self.ls == "" else ""

    @property
    def merge_max(self) -> int:
        """fd_attn / fd_oproj "late merge" bound: while (splits holding keys 0..pos) x n_head x
        head_dim <= merge_max, every o-projection block merges the attention's split partials itself
        and fd_attn skips its last-block merge (tune "merge_max"; 0: always the attention merge)."""
        if self.cfg.n_head * self.cfg.head_dim > XS_MAX:
            return 0
        return min(int(self.tune.get("merge_max", MERGE_MAX)), MERGE_MAX)

    def _matvec(self, w: WeightRef, x: str, label: str, kind: str, oproj: bool = False) -> Launch:
        """resid += W x (o / down projections; the consumers normalize resid themselves).

        Row pairs share their x loads; a matrix too small to fill the device with pair tasks
        (o/down projections of small models, the 7B's too) takes one row per task instead. Long
        rows are split inside the block (`ks` groups of 32 lanes per task, see `ks_for`)."""
        lpr = self._lpr(w.cols)
        pair = self.tune.get("pair")
        if pair is None:  # H200: pairs win for the 7B's 3584x3584 / 3584x18944, single rows below
            pair = w.rows * w.cols >= (8 << 20)
        n_tasks = -(-w.rows // 2) if pair else w.rows
        ks = self.ks_for(n_tasks, lpr, w.cols)
        grid, block = self._shape(n_tasks * ks, lpr, lpr * ks)
        any_ = "" if w.qtype in FAST_TYPES else "_any"
        if oproj:  # x = the attention output, merged from the split partials by each block (late merge)
            cfg = self.cfg
            xr = self._xr_shape(w, "o_proj", "fd_oproj_xr") if (self.ls == "" and self.merge_v_suffix == "") else None
            if xr is not None:  # the x-resident kernel: rows in runs of rpb per block (its ks argument)
                name, grid, block, rpb = xr
                return Launch(
                    name, grid, block,
                    (Buf("arena"), Buf("state"), _i32(QTYPE_ID[w.qtype]), _i64(w.offset), _i64(w.row_bytes),
                     _i32(w.rows), _i32(w.cols), Buf(f"{x}_h"), Buf(f"{x}_l"), Buf(f"{x}_s"), Buf(f"{x}_sum"),
                     Buf("resid"), Buf("part_acc"), Buf("part_ml"), _i32(cfg.n_head), _i32(cfg.head_dim),
                     _i32(self.merge_max), _i32(0), _i32(0), _i32(rpb)),
                    label, kind, w.nbytes)
            return Launch(
                "fd_oproj" + any_ + self.ls + self.merge_v_suffix, grid, block,
                (Buf("arena"), Buf("state"), _i32(QTYPE_ID[w.qtype]), _i64(w.offset), _i64(w.row_bytes),
                 _i32(w.rows), _i32(w.cols), Buf(f"{x}_h"), Buf(f"{x}_l"), Buf(f"{x}_s"), Buf(f"{x}_sum"),
                 Buf("resid"), Buf("part_acc"), Buf("part_ml"), _i32(cfg.n_head), _i32(cfg.head_dim),
                 _i32(self.merge_max), _i32(bool(pair)), _i32(lpr), _i32(ks)),
                label, kind, w.nbytes)
        xr = self._xr_launch(w, x, label, kind) if self.ls == "" else None
        if xr is not None:
            return xr
        stream = self._stream_name("fd_matvec", kind, (w,)) if self.ls == "" else ""
        if stream:  # rows in runs of rpb per block (one wave of ~4 blocks per multiprocessor), each row's
            # blocks split over the block's warps
            rpb = -(-w.rows // (int(self.tune.get("down_s_blocks_per_sm", 4)) * self.n_sm))
            return Launch(
                stream, (-(-w.rows // rpb),), (STREAM_THREADS,),
                (Buf("arena"), Buf("state"), _i64(w.offset), _i64(w.row_bytes), _i32(w.rows), _i32(w.cols),
                 Buf(f"{x}_h"), Buf(f"{x}_l"), Buf(f"{x}_s"), Buf(f"{x}_sum"), Buf("resid"), _i32(1), _i32(rpb)),
                label, kind, w.nbytes)
        wide = self._wide_name("fd_matvec", kind, (w,), block[0]) if self.ls == "" else ""
        name = wide or "fd_matvec" + any_ + self.ls
        return Launch(
            name, grid, block,
            (Buf("arena"), Buf("state"), _i32(QTYPE_ID[w.qtype]), _i64(w.offset), _i64(w.row_bytes),
             _i32(w.rows), _i32(w.cols), Buf(f"{x}_h"), Buf(f"{x}_l"), Buf(f"{x}_s"), Buf(f"{x}_sum"), _i64(-1),
             Buf("resid"), _i32(1), None, _i64(-1), _f32(self.cfg.rms_eps), None, None, None, None,
             _i32(bool(pair)), _i32(lpr), _i32(ks)),
            label, kind, w.nbytes)

    def _xr_groups(self, cols: int, threads: int, max_threads: int) -> tuple[int, int]:
        """(threads per group, groups) of an x-resident block: a group is ceil(cols / 64 / warp)
        warps (one 64-value unit of x per thread), the groups a power of two (whole groups per round
        of 32 rows) of at most `threads` / `max_threads` threads in all (at least one group)."""
        tpg = -(-(cols // 64) // self.warp_size) * self.warp_size
        groups = max(1, min(32, threads // tpg))
        groups = 1 << (groups.bit_length() - 1)
        while groups > 1 and groups * tpg > max_threads:
            groups //= 2
        return tpg, groups

    def _gate_up_xr(self, d: int, ff: int, wg: WeightRef, wu: WeightRef):
        """(kernel, grid, block) of the x-resident gate/up (fd_gate_up_xr_q4k: one wave of blocks
        looping over the 32-row blocks, every block staging the normalized x once, each thread one
        64-value unit of x in registers) where gate and up are Q4_K (rows 16-byte aligned), d_model %
        256 == 0 and d_model <= STREAM_XS_MAX; else None. Tunes: "gate_up_xr" (on / off; default
        XR_DEFAULTS), "xr_gate_up_bps" (blocks per multiprocessor, default 1; "xr_gate_up_grid":
        blocks), "xr_gate_up_threads" (default 256, at most GATE_UP_XR_MAX_THREADS), "xr_gate_up_rb"
        (row pairs per step, 1 or 2; default 2)."""
        if not int(self.tune.get("gate_up_xr", XR_DEFAULTS["gate_up"])):
            return None
        if (self._k_type("gate_up", (wg, wu)) != "Q4_K" or d % 256 or d > STREAM_XS_MAX
                or any(w.offset % 16 or w.row_bytes % 16 for w in (wg, wu))):
            return None
        tpg, groups = self._xr_groups(d, int(self.tune.get("xr_gate_up_threads", 256)), GATE_UP_XR_MAX_THREADS)
        rb = int(self.tune.get("xr_gate_up_rb", 2))
        if rb not in (1, 2):
            raise ValueError(f"tune xr_gate_up_rb {rb} (1 or 2)")
        grid = int(self.tune.get("xr_gate_up_grid", 0)) or int(self.tune.get("xr_gate_up_bps", 1)) * self.n_sm
        return "fd_gate_up_xr_q4k" + ("" if rb == 2 else "_r1"), (min(ff // 32, grid),), (groups * tpg,)

    def _xr_shape(self, w: WeightRef, kind: str, base: str):
        """(kernel, grid, block, rows per block) of the x-resident matvec `base`_<q> (fd_matvec_xr for
        the down projection, fd_oproj_xr: two rows per step): each thread keeps one 64-value unit of
        x in registers and walks its group's rows, so x is read once per thread. Where the matrix is
        all Q4_K (rows 16-byte aligned) or all Q6_K, cols % 256 == 0 and a group of cols / 64 units
        fits a block (<= XR_MAX_THREADS threads); else None. Tunes per kind ("down" / "o_proj"):
        "<kind>_xr" (on / off; default XR_DEFAULTS), "xr_<kind>_bps" (blocks per multiprocessor of
        the one-wave grid, default 1: ~140-170 registers per thread), "xr_<kind>_threads" (threads
        per block; default one group / 256), "xr_rb" (down only: rows per step, 1, 2 or 4; default 2)."""
        if not int(self.tune.get(f"{kind}_xr", XR_DEFAULTS[kind])):
            return None
        t = self._k_type(kind, (w,))
        if not t or w.cols % 256 or (t == "Q4_K" and (w.offset % 16 or w.row_bytes % 16)):
            return None
        tpg, groups = self._xr_groups(
            w.cols, int(self.tune.get(f"xr_{kind}_threads", 0 if kind == "down" else 256)), XR_MAX_THREADS)
        if tpg > XR_MAX_THREADS:
            return None
        rows_per_block = -(-w.rows // (int(self.tune.get(f"xr_{kind}_bps", 1)) * self.n_sm))
        rb = int(self.tune.get("xr_rb", 2)) if kind == "down" else 2
        if rb not in (1, 2, 4):
            raise ValueError(f"tune xr_rb {rb} (1, 2 or 4)")
        name = f"{base}_{t.replace('_', '').lower()}" + ("" if rb == 2 else f"_r{rb}")
        return name, (-(-w.rows // rows_per_block),), (groups * tpg,), rows_per_block

    def _xr_launch(self, w: WeightRef, x: str, label: str, kind: str) -> Launch | None:
        """The down projection through the x-resident kernel (`_xr_shape`), or None."""
        if kind != "down":
            return None
        xr = self._xr_shape(w, kind, "fd_matvec_xr")
        if xr is None:
            return None
        name, grid, block, rows_per_block = xr
        return Launch(
            name, grid, block,
            (Buf("arena"), Buf("state"), _i64(w.offset), _i64(w.row_bytes), _i32(w.rows), _i32(w.cols),
             Buf(f"{x}_h"), Buf(f"{x}_l"), Buf(f"{x}_s"), Buf(f"{x}_sum"), Buf("resid"), _i32(1), _i32(rows_per_block)),
            label, kind, w.nbytes)

    def pf_flags(self, wide: bool) -> int:
        """fd_gate_up's L2 prefetch flags, passed in bits 8.. of its lpr argument (fused_decode.hip
        FD_PF_FIRST): tune "pf_first": the prologue prefetches each lane group's first row pair only,
        not the block's 32 rows; default on with the wide kernel (H200, 7B shape: 299 vs 287 tok/s,
        +1.4% with the 32-value kernel; not measured for SmolLM2, so off elsewhere)."""
        return 1 if self.tune.get("pf_first", wide) else 0

    def _wide_name(self, base: str, kind: str, ws, threads: int) -> str:
        """The wide-engine kernel for `kind` ("gate_up" / "down" / "output") where all of its
        matrices are Q4_K or all Q6_K (fd_rows_w: 64-value units, all loads of a unit before its
        math), else "" (the 32-value engine). tune "wide" (0: off; default on), "wide_<kind>" per
        kind; default on for gate/up and output, off for down (H200, 7B shape: 299 tok/s vs 291
        with the wide down, 284 with none). Kernels: gate/up Q4_K, output Q4_K / Q6_K, matvec
        Q4_K / Q6_K, <= 256 threads per block."""
        on = int(self.tune.get(f"wide_{kind}", self.tune.get("wide", 0 if kind == "down" else 1)))
        t = self._k_type(kind, ws)
        if on <= 0 or threads > 256 or not t:
            return ""
        return f"{base}_w1_{t.replace('_', '').lower()}"

    @staticmethod
    def _k_type(kind: str, ws) -> str:
        """"Q4_K" or "Q6_K" where the matrices of `kind` are all of that type (gate/up: Q4_K only),
        the types the wide and stream kernels are built for; else ""."""
        qt = {w.qtype for w in ws}
        t = next(iter(qt)) if len(qt) == 1 else ""
        if t not in ("Q4_K", "Q6_K") or (kind == "gate_up" and t != "Q4_K"):
            return ""
        return t

    def _stream_name(self, base: str, kind: str, ws) -> str:
        """The stream-engine kernel for `kind` ("gate_up" / "down" / "output": fd_gate_up_s_q4k,
        fd_matvec_s_q4k / _q6k, fd_output_s_q4k / _q6k) where its matrices are all Q4_K or all Q6_K
        (Q4_K rows 16-byte aligned) with whole 256-value blocks per row, and (gate/up, output) d_model
        <= STREAM_XS_MAX; else "". The stream kernels copy each warp's rows through a ring of
        shared-memory stages with asynchronous copies (fused_decode.hip fd_st_run). On by default for
        the kinds of STREAM_DEFAULTS (gate/up, output) where the device has the asynchronous copies
        (`async_copy`: CUDA sm_80+; on HIP the ring falls back to plain copies, unmeasured); tune
        "stream" (0: off, 1: on) for all kinds, "stream_<kind>" per kind; "stream_v" 1: the "_v1"
        kernels (ring of 3 / 4 stages of 1 KiB per row instead of 2 / 3 of 2 KiB). (Rings of 4 / 6
        stages of 1 KiB, with and without moving each lane's unit to registers before refilling its
        slot, measured slower on the 7B and were removed: benchmarks/RESULTS.md v11.)"""
        default = STREAM_DEFAULTS.get(kind, 0) if self.async_copy else 0
        on = int(self.tune.get(f"stream_{kind}", self.tune.get("stream", default)))
        t = self._k_type(kind, ws)
        if on <= 0 or not t:
            return ""
        if any(w.cols % 256 for w in ws) or (kind != "down" and self.cfg.d_model > STREAM_XS_MAX):
            return ""
        if t == "Q4_K" and any(w.offset % 16 or w.row_bytes % 16 for w in ws):
            return ""
        v = "_v1" if int(self.tune.get("stream_v", 0)) == 1 else ""  # 3-4 stages of 1 KiB per row instead of 2 KiB
        return f"{base}_s_{t.replace('_', '').lower()}{v}"

    def ks_for(self, n_tasks: int, lpr: int, cols: int) -> int:
        """Lane groups per matvec task: the smallest power of two that leaves each lane at most
        `ks_units` (tune, default 4) units of its row(s), without more blocks than the grid cap; only
        with whole-warp groups (lpr = 32). tune "ks" forces a value."""
        if "ks" in self.tune:
            return int(self.tune["ks"])
        if lpr < 32:
            return 1
        units = cols // 32
        per_block = self.tune.get("threads", 256) // lpr
        ks = 1
        while (ks < 8 and units > self.tune.get("ks_units", KS_UNITS) * lpr * ks
               and -(-n_tasks * 2 * ks // per_block) <= self.out_blocks_max):
            ks *= 2
        return ks

    @property
    def weight_bytes(self) -> int:
        """Weight bytes streamed per decoded token (every matrix once, plus the output layer)."""
        return sum(l.weight_bytes for l in self.launches)


def weight_table_from_model(transformer) -> tuple[dict[str, WeightRef], Any]:
    """WeightRefs of a GPU-loaded Transformer and the (single) arena segment array they live in."""
    from .memory import GpuWeight

    refs: dict[str, WeightRef] = {}
    seg = None
    for name, w in transformer.weights.items():
        if not isinstance(w, GpuWeight):
            raise FastPathUnsupported(f"tensor '{name}' is not a GPU weight (backend {transformer.backend.name})")
        if seg is None:
            seg = w.segment
        elif w.segment is not seg:
            raise FastPathUnsupported("weights span more than one arena segment")
        refs[name] = WeightRef(w.qtype_name, int(w.offset), int(w.row_bytes), int(w.rows), int(w.cols))
    if seg is None:
        raise FastPathUnsupported("model has no weights")
    return refs, seg


# ---------------------------------------------------------------------------------------------
# CuPy executor


class _CupyExec:
    """Resolve a plan's buffers on the device (one allocation) and launch it eagerly or as a graph."""

    def __init__(self, plan: DecodePlan, arena, k_cache, v_cache):
        import cupy

        from .memory import device_alloc

        self.plan = plan
        sizes = {}
        total = 0
        for name, (dt, n) in plan.buffers.items():
            nb = int(np.dtype(dt).itemsize * n)
            sizes[name] = (total, dt, n)
            total += (nb + 255) // 256 * 256
        self.nbytes = total
        mp = device_alloc(total, "fast decode buffers", "fast_decode")
        mp.memset_async(0, total)
        self._mem = mp
        self.bufs = {name: cupy.ndarray((n,), dtype=dt, memptr=mp + off) for name, (off, dt, n) in sizes.items()}
        self.bufs["arena"] = arena
        self.bufs["k_cache"] = k_cache
        self.bufs["v_cache"] = v_cache
        for name, host in plan.init.items():
            self.bufs[name].set(np.ascontiguousarray(host, dtype=self.bufs[name].dtype))
        self.calls = [self._call(l) for l in plan.launches]
        self.start_calls = [self._call(l) for l in plan.start_launches]

    def _call(self, l: Launch):
        from . import kernels as K

        fn = K.get_function(KERNEL_FILE, l.kernel, self.plan.compile_options)
        return fn, l.grid, l.block, tuple(self._arg(a) for a in l.args)

    def _arg(self, a):
        if a is None:
            return None
        if isinstance(a, Buf):
            return self.bufs[a.name]
        kind, v = a
        return {"i32": np.int32, "i64": np.int64, "f32": np.float32}[kind](v)

    def calls_with_splits(self, n_split: int) -> list:
        """The step's calls with every attention grid cut to its first `n_split` 64-key splits
        (enough for positions < 64 n_split: the blocks past the position only load and return)."""
        return [(fn, (n_split,) + tuple(grid[1:]) if l.kind == "attn" else grid, block, args)
                for l, (fn, grid, block, args) in zip(self.plan.launches, self.calls)]

    def launch_all(self) -> None:
        for fn, grid, block, args in self.calls:
            fn(grid, block, args)

    def launch_start(self) -> None:
        for fn, grid, block, args in self.start_calls:
            fn(grid, block, args)


class _PdlLauncher:
    """Kernel launches with programmatic dependent launch (CUDA driver `cuLaunchKernelEx` with
    CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, through ctypes: CuPy has no launch
    attributes). Used while capturing the decode graph, so each kernel's prologue (weight prefetches,
    before `fd_pdl_wait` in kernels/fused_decode.hip) overlaps the end of the previous kernel. The
    arguments of each launch are marshalled once (`prepare`)."""

    _ATTR_PSS = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION

    def __init__(self):
        import ctypes

        class Attr(ctypes.Structure):  # CUlaunchAttribute: id, 4 bytes padding, 64-byte value union
            _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]

        class Config(ctypes.Structure):  # CUlaunchConfig
            _fields_ = [("gx", ctypes.c_uint), ("gy", ctypes.c_uint), ("gz", ctypes.c_uint),
                        ("bx", ctypes.c_uint), ("by", ctypes.c_uint), ("bz", ctypes.c_uint),
                        ("smem", ctypes.c_uint), ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(Attr)),
                        ("n_attrs", ctypes.c_uint)]

        self.ct = ctypes
        self.Config = Config
        lib = ctypes.CDLL("libcuda.so.1")
        self._launch = lib.cuLaunchKernelEx
        self._launch.restype = ctypes.c_int
        self._launch.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        self.attr = Attr()
        self.attr.id = self._ATTR_PSS
        self.attr.value[0] = 1

    def prepare(self, fn, grid, block, args):
        """(function pointer, grid, block, void** params, the ctypes values they point to)."""
        import cupy

        ct = self.ct
        vals = []
        for a in args:
            if a is None:
                vals.append(ct.c_void_p(None))
            elif isinstance(a, cupy.ndarray):
                vals.append(ct.c_void_p(a.data.ptr))
            elif isinstance(a, np.int32):
                vals.append(ct.c_int32(int(a)))
            elif isinstance(a, np.int64):
                vals.append(ct.c_int64(int(a)))
            elif isinstance(a, np.float32):
                vals.append(ct.c_float(float(a)))
            else:
                raise TypeError(f"PDL launch: argument of type {type(a).__name__}")
        params = (ct.c_void_p * max(1, len(vals)))(*[ct.cast(ct.pointer(v), ct.c_void_p) for v in vals])
        fptr = getattr(fn, "kernel", fn).ptr
        g = tuple(grid) + (1,) * (3 - len(grid))
        b = tuple(block) + (1,) * (3 - len(block))
        return fptr, g, b, params, vals

    def launch(self, prepared, stream_ptr: int) -> None:
        fptr, g, b, params, _ = prepared
        cfg = self.Config(g[0], g[1], g[2], b[0], b[1], b[2], 0, stream_ptr, self.ct.pointer(self.attr), 1)
        rc = self._launch(self.ct.byref(cfg), self.ct.c_void_p(fptr), params, None)
        if rc != 0:
            raise RuntimeError(f"cuLaunchKernelEx failed (CUresult {rc})")


class FastDecoder:
    """The graphed greedy decode loop of one session (see the module docstring).

    `mode` is "graph" when the step was captured as a CUDA/HIP graph, else "eager" (same kernels,
    launched one by one from Python); `graph_error` says why capture failed. `pdl` is True when the
    graph's kernels were captured with programmatic dependent launch (CUDA, compute capability >=
    9.0, tune "pdl" not False); `pdl_error` says why not where it was tried and failed.
    """

    def __init__(self, model, session, graph: bool = True, chunk: int = 8, window: int = 2,
                 timeout: float | None = None, tune: dict | None = None):
        import cupy

        be = model.backend
        if getattr(be, "name", None) != "cupy":
            raise FastPathUnsupported(f"backend {getattr(be, 'name', be)!r} is not the CuPy GPU backend")
        be.finalize_weights()
        self.model = model
        self.session_ref = weakref.ref(session)
        self.backend = be
        cfg = model.config
        refs, seg = weight_table_from_model(model.transformer)
        kc, vc = session.k_cache, session.v_cache
        kv = "f16" if kc.dtype == cupy.float16 else ("f32" if kc.dtype == cupy.float32 else str(kc.dtype))
        if not (kc.flags.c_contiguous and vc.flags.c_contiguous):
            raise FastPathUnsupported("KV cache is not contiguous")
        self.n_ctx = int(kc.shape[2])
        n_sm = int(cupy.cuda.Device().attributes["MultiProcessorCount"])
        self.plan = DecodePlan(cfg, refs, kv, self.n_ctx, n_sm, be.warp_size, dict(tune or {}),
                               async_copy=self._has_async_copy())
        self._cache_ptrs = (kc.data.ptr, vc.data.ptr)
        self.timeout = float(timeout if timeout is not None else be.timeout)
        self.chunk = max(1, int(chunk))
        # decode steps per graph replay: a chunk (tune "graph_steps" 1: one replay per token)
        self.graph_steps = self.chunk if int(self.plan.tune.get("graph_steps", self.chunk)) > 1 else 1
        self.graph_chunk = None
        self.window = max(1, int(window))
        self.stream = cupy.cuda.Stream(non_blocking=True)
        with self.stream:
            self.exec = _CupyExec(self.plan, seg.require(), kc, vc)
        self.state = self.exec.bufs["state"]
        self.tokens_dev = self.exec.bufs["tokens"]
        # pinned host buffers: state/stop ids in, token ids out
        self._h_in = self._pinned(4 + MAX_STOP, np.int32)
        self._h_tok = self._pinned(self.n_ctx, np.int32)
        self.mode = "eager"
        self.graph_error: str | None = None
        self.graph = None
        # attention grid (splits) -> (one-step graph, chunk graph, what their launches keep alive)
        self._graphs: dict[int, tuple] = {}
        self.pdl = False
        self.pdl_error: str | None = None
        self._warm()
        if graph:
            self._capture()

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _pinned(n: int, dtype):
        import cupy

        mem = cupy.cuda.alloc_pinned_memory(int(n * np.dtype(dtype).itemsize))
        return np.frombuffer(mem, dtype=dtype, count=n)

    def _warm(self) -> None:
        """Compile the module and run one step eagerly with done=1 (every kernel returns at once)."""
        import cupy

        with self.stream:
            self.state[:] = cupy.asarray(np.array([0, 0, 1, 0], np.int32))
            self.exec.launch_start()
            self.exec.launch_all()
        self._sync("fast decode warm-up")

    def _cuda_cc(self) -> int:
        """The CUDA device's compute capability as an integer (90: sm_90); 0 on HIP or if unknown."""
        if getattr(self.backend, "is_hip", False):
            return 0
        try:
            import cupy

            return int(cupy.cuda.Device().compute_capability)
        except Exception:
            return 0

    def _has_async_copy(self) -> bool:
        """cp.async (CUDA sm_80+), which the stream kernels' ring relies on."""
        return self._cuda_cc() >= 80

    def _pdl_wanted(self) -> bool:
        return bool(self.plan.tune.get("pdl", True)) and self._cuda_cc() >= 90

    def _capture(self) -> None:
        """Capture the full-grid graphs (mode "graph"), with programmatic launches where wanted;
        failing that without them; failing that, mode "eager"."""
        self.pdl = False
        self.pdl_error = None
        self._graphs = {}
        if self._pdl_wanted():
            try:
                self._graphs[self.plan.n_split] = self._capture_calls(self.exec.calls, pdl=True)
                self.pdl = True
            except Exception as exc:  # no driver entry point / attribute: plain launches
                self.pdl_error = f"{type(exc).__name__}: {exc}"
        if not self._graphs:
            try:
                self._graphs[self.plan.n_split] = self._capture_calls(self.exec.calls, pdl=False)
            except Exception as exc:  # no graph support: eager launches
                self.mode = "eager"
                self.graph = self.graph_chunk = None
                self.graph_error = f"{type(exc).__name__}: {exc}"
                return
        self.mode = "graph"
        self.graph_error = None
        self.graph, self.graph_chunk = self._graphs[self.plan.n_split][:2]

    def _capture_calls(self, calls: list, pdl: bool) -> tuple:
        """(one-step graph, `chunk`-step graph or None, what the launches keep alive) of `calls`."""
        if pdl:
            pl = _PdlLauncher()
            prepared = [pl.prepare(*c) for c in calls]
            launch, keep = (lambda: [pl.launch(p, self.stream.ptr) for p in prepared]), (pl, prepared)
        else:
            launch, keep = (lambda: [fn(grid, block, args) for fn, grid, block, args in calls]), None
        one = self._capture_one(launch, 1)
        # one replay per chunk of tokens: no host launch between the steps of a chunk, and with
        # programmatic launch the next step's first kernel overlaps the previous step's output
        chunk = self._capture_one(launch, self.chunk) if self.graph_steps > 1 else None
        return one, chunk, keep  # the marshalled arguments outlive the capture

    def _capture_one(self, launch, steps: int):
        """A graph of `steps` consecutive decode steps (each step's kernels read the position and
        token the previous step's fd_output wrote, so steps chain like layers do)."""
        s = self.stream
        with s:
            s.begin_capture()
            try:
                for _ in range(steps):
                    launch()
            except BaseException:
                try:
                    if s.is_capturing():
                        s.end_capture()
                except Exception:
                    pass
                raise
            g = s.end_capture()
        return g

    def _splits_for(self, pos: int) -> int:
        """The attention grid (64-key splits) for steps at positions <= pos: the smallest of m, 2m,
        4m, ... that covers keys 0..pos, at most the context's (m: tune "att_min_splits", default
        ATT_MIN_SPLITS; 0: always the context's), so a short sequence in a long context launches few
        attention blocks past its position (each such block loads its keys before it can read the
        position, then returns)."""
        return attention_splits(pos, self.plan.n_split, int(self.plan.tune.get("att_min_splits", ATT_MIN_SPLITS)))

    def _graphs_for(self, pos: int) -> tuple:
        """(one-step graph, chunk graph) for steps at positions <= pos (captured on first use;
        the full-grid pair where that capture fails); (None, None) in eager mode."""
        if self.mode != "graph":
            return None, None
        b = self._splits_for(pos)
        if b not in self._graphs:
            try:
                self._graphs[b] = self._capture_calls(self.exec.calls_with_splits(b), pdl=self.pdl)
            except Exception:
                b = self.plan.n_split
        return self._graphs[b][:2]

    def valid_for(self, session) -> bool:
        return (self.session_ref() is session and
                (session.k_cache.data.ptr, session.v_cache.data.ptr) == self._cache_ptrs)

    # ------------------------------------------------------------------ running
    def _sync(self, what: str) -> None:
        """Wait for this decoder's stream with a deadline (GpuTimeoutError / GpuOpError naming `what`)."""
        import cupy

        ev = cupy.cuda.Event(block=False, disable_timing=True)
        ev.record(self.stream)
        self._wait(ev, what)

    def _wait(self, ev, what: str) -> None:
        import cupy

        from .cupy_backend import _NOT_READY, GpuOpError, GpuTimeoutError, _status_text

        deadline = time.monotonic() + self.timeout
        pause = 2e-6
        while True:
            st = int(cupy.cuda.runtime.eventQuery(ev.ptr))
            if st == 0:
                return
            if st != _NOT_READY:
                raise GpuOpError(what, _status_text(st))
            if time.monotonic() > deadline:
                raise GpuTimeoutError(what, self.timeout)
            if pause > 1e-5:
                time.sleep(pause)
            pause = min(pause * 2, 1e-3)

    def _launch_step(self, graph=None) -> None:
        if graph is not None:
            graph.launch(self.stream)
        else:
            with self.stream:
                self.exec.launch_all()

    def _start(self, first_token: int, n_past: int, stop_ids: Iterable[int]) -> None:
        import cupy

        stops = [int(t) for t in stop_ids][:MAX_STOP]
        h = self._h_in
        h[:] = -1
        h[:4] = (n_past, int(first_token), 0, 0)
        h[4:4 + len(stops)] = stops
        # the decode stream must see the KV cache written by work queued on the current stream
        ev = cupy.cuda.Event(block=False, disable_timing=True)
        ev.record(cupy.cuda.get_current_stream())
        self.stream.wait_event(ev)
        rt = cupy.cuda.runtime
        rt.memcpyAsync(self.state.data.ptr, h.ctypes.data, 16, rt.memcpyHostToDevice, self.stream.ptr)
        rt.memcpyAsync(self.exec.bufs["stop"].data.ptr, h.ctypes.data + 16, 4 * MAX_STOP, rt.memcpyHostToDevice,
                       self.stream.ptr)
        with self.stream:
            self.exec.launch_start()  # resid = embedding of first_token

    def _copy_tokens(self, p0: int, p1: int):
        import cupy

        rt = cupy.cuda.runtime
        nb = 4 * (p1 - p0)
        rt.memcpyAsync(self._h_tok.ctypes.data + 4 * p0, self.tokens_dev.data.ptr + 4 * p0, nb,
                       rt.memcpyDeviceToHost, self.stream.ptr)
        ev = cupy.cuda.Event(block=False, disable_timing=True)
        ev.record(self.stream)
        return ev

    def stream_tokens(self, first_token: int, n_tokens: int, stop_ids: Iterable[int] = ()) -> Iterator[int]:
        """Feed `first_token`, then yield up to `n_tokens` greedy tokens (the last one yielded may be
        a stop id, after which the iteration ends). The session's token list grows by the tokens fed
        (first_token and every yielded token but the last), when the iteration ends or is closed."""
        session = self.session_ref()
        if session is None or not self.valid_for(session):
            raise RuntimeError("FastDecoder used with a session whose KV cache changed; build a new one")
        vocab = self.model.config.vocab_size
        if not 0 <= int(first_token) < vocab:
            raise ValueError(f"token id {first_token} is out of range for vocabulary size {vocab}")
        n_tokens = int(n_tokens)
        p0 = session.n_past
        if n_tokens <= 0:
            return
        if p0 + n_tokens > self.n_ctx:
            from ..session import ContextOverflowError

            raise ContextOverflowError(
                f"{n_tokens} decode steps after {p0} cached tokens exceed the context of {self.n_ctx} tokens")
        stop = set(int(t) for t in stop_ids)
        # the chunks' step ranges and graphs (any capture happens here, before work is queued)
        chunks = [(c0, min(n_tokens, c0 + self.chunk)) for c0 in range(0, n_tokens, self.chunk)]
        graphs = [self._graphs_for(p0 + c1 - 1) for _, c1 in chunks]
        self._start(first_token, p0, stop)
        out: list[int] = []
        pending: list[tuple[int, int, Any]] = []   # (p_start, p_end, event) copies in flight
        launched = 0  # chunks launched
        clean = False
        try:
            while True:
                # keep up to `window` chunks queued beyond the one being read
                while launched < len(chunks) and len(pending) <= self.window:
                    (c0, c1), (g_one, g_chunk) = chunks[launched], graphs[launched]
                    if c1 - c0 == self.chunk and g_chunk is not None:
                        g_chunk.launch(self.stream)
                    else:
                        for _ in range(c1 - c0):
                            self._launch_step(g_one)
                    launched += 1
                    pending.append((p0 + c0, p0 + c1, self._copy_tokens(p0 + c0, p0 + c1)))
                if not pending:
                    break
                a, b, ev = pending.pop(0)
                self._wait(ev, "fast decode step")
                for tok in self._h_tok[a:b].tolist():
                    out.append(int(tok))
                    last = tok in stop or len(out) == n_tokens
                    yield int(tok)
                    if last:
                        clean = True
                        return
            clean = True
        finally:
            # fed into the KV cache: first_token and every yielded token but the last
            session.tokens.extend(([int(first_token)] + out)[:len(out)])
            try:
                self._sync("fast decode (end)")  # queued replays finish before the step path runs
            except Exception:
                if clean:
                    raise

    def decode(self, first_token: int, n_tokens: int, stop_ids: Iterable[int] = ()) -> list[int]:
        """Greedy tokens after `first_token` (see `stream_tokens`), as a list."""
        return list(self.stream_tokens(first_token, n_tokens, stop_ids))

    def step_logits(self, token: int) -> np.ndarray:
        """One step (feeds `token` at the session's position, appends it) and returns its logits
        [vocab] as float32 numpy (synchronises): sampled generation on the host, and tests."""
        session = self.session_ref()
        toks = self.decode(token, 1)
        assert len(toks) == 1 and session is not None
        return self.last_logits()

    def last_logits(self) -> np.ndarray:
        import cupy

        self._sync("fast decode logits")
        with self.stream:
            return cupy.asnumpy(self.exec.bufs["logits"], stream=self.stream)

    @property
    def weight_bytes_per_token(self) -> int:
        return self.plan.weight_bytes

    def __repr__(self) -> str:
        return (f"FastDecoder(mode={self.mode}, launches/token={len(self.plan.launches)}, "
                f"weights/token={self.plan.weight_bytes / 2**20:.1f} MiB)")


# ---------------------------------------------------------------------------------------------
# per-session cache and the helper session.py calls

_DECODERS: "weakref.WeakKeyDictionary[Any, FastDecoder]" = weakref.WeakKeyDictionary()
FAST_DEFAULT = True  # rocmforge-lab --no-fast / set_fast(False) turn the fast path off


def set_fast(enabled: bool) -> None:
    global FAST_DEFAULT
    FAST_DEFAULT = bool(enabled)


def fast_decoder_for(session, graph: bool = True) -> FastDecoder | None:
    """The session's FastDecoder (built on first use), or None where the fast path does not apply
    (CPU backend, unsupported model, hooks installed, fast path disabled)."""
    if not FAST_DEFAULT:
        return None
    model = session.model
    if getattr(model.backend, "name", None) != "cupy" or getattr(session, "_hooks", None):
        return None
    fd = _DECODERS.get(session)
    if fd is not None and fd.valid_for(session):
        return fd
    try:
        fd = FastDecoder(model, session, graph=graph)
    except FastPathUnsupported:
        return None
    _DECODERS[session] = fd
    return fd


def greedy_params(params) -> bool:
    """True when a SamplingParams is plain greedy (what the device argmax computes)."""
    return (params.temperature == 0.0 and params.repetition_penalty == 1.0 and params.presence_penalty == 0.0
            and params.frequency_penalty == 0.0)
