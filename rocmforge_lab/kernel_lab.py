"""Helpers for notebooks/05_kernels_and_memory.ipynb: GPU kernels and memory, explained on a CPU.

Everything here runs without a GPU; the few GPU helpers (`gpu_matvec`, device timings in
`decode_step_op_times`) are only called where `rocmforge_lab.loader.gpu_available()` is true.

* **Kernel sources** - `kernel_source_excerpt` prints one function or struct of `kernels/*`
  with its line numbers, so the notebook shows the code that actually runs.
* **Q4_K anatomy** - `q4k_block_fields`, `q4k_scale_min` and `q4k_hexdump` take one 144-byte
  block apart byte by byte; `q4k_decode` decodes blocks with the *same float32 operations in the
  same order* as `QQ4_K::load32` in `kernels/quant_blocks.h`.
* **Matvec re-enactment** - `matvec_reenact` replays `matvec_impl` (kernels/matvec.hip) for
  Q4_K rows in NumPy: which 32-value items each lane of a warp reads, what it accumulates, and
  the butterfly (`rf_warp_sum`) that combines the lanes. Because the float32 operations and their
  order are the kernel's, the result is bit-identical to the kernel run by the CPU emulator
  (`emulator_matvec`, tests/gpu/emu) where the compiler does not fuse multiply-adds (x86-64 g++).
* **Memory plan** - `plan_weight_arena` registers a GGUF's tensors exactly as the GPU backend
  does (`CupyBackend.load_weight` into a `memory.WeightArena`, which only assigns offsets until it
  is materialised), so offsets, padding and totals are the ones a GPU run would use;
  `plan_device_memory` sizes the workspace, KV cache and prefill scratch from the config.
* **Timing** - `decode_step_op_times` runs one decode token op by op (host clock around each op;
  on a GPU also CUDA/HIP events on the stream) and `summarize_op_times` aggregates by op kind.
"""
from __future__ import annotations

import importlib.util
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .backend import kernels as K
from .backend import memory as M
from .backend.cupy_backend import PREFILL_SCRATCH_BYTES, CupyBackend

Q4K_BLOCK_BYTES = 144
Q4K_VALUES = 256
ITEM = 32  # values per item: the unit one lane decodes at a time (kernels/quant_blocks.h)


# ------------------------------------------------------------------------------------------
# kernel sources


def kernel_source_excerpt(file: str, start: str, comments: bool = True) -> str:
    """The definition in `kernels/<file>` whose first line matches the regex `start`.

    Includes the `//` comment lines right above it (with `comments`) and runs to the brace that
    closes it. Lines are numbered as in the file.
    """
    path = K.kernels_dir() / file
    lines = path.read_text().splitlines()
    pat = re.compile(start)
    first = next((i for i, ln in enumerate(lines) if pat.search(ln)), None)
    if first is None:
        raise ValueError(f"kernels/{file}: no line matches {start!r}")
    begin = first
    if comments:
        while begin > 0 and lines[begin - 1].lstrip().startswith("//"):
            begin -= 1
    depth, seen, end = 0, False, first
    for end in range(first, len(lines)):
        code = lines[end].split("//", 1)[0]
        depth += code.count("{") - code.count("}")
        seen = seen or "{" in code
        if seen and depth <= 0:
            break
    width = len(str(end + 1))
    body = "\n".join(f"{i + 1:>{width}} | {lines[i]}" for i in range(begin, end + 1))
    return f"// kernels/{file}, lines {begin + 1}-{end + 1}\n{body}"


def kernel_header_comment(file: str) -> str:
    """The leading `//` comment block of `kernels/<file>` (what the file says it does)."""
    lines = (K.kernels_dir() / file).read_text().splitlines()
    n = 0
    while n < len(lines) and lines[n].lstrip().startswith("//"):
        n += 1
    return "\n".join([f"// kernels/{file}, lines 1-{n}"] + [f"{i + 1:>2} | {lines[i]}" for i in range(n)])


# ------------------------------------------------------------------------------------------
# Q4_K: one 144-byte block of 256 weights


def q4k_scale_min(scales: np.ndarray, j: int) -> tuple[int, int]:
    """6-bit scale and min of sub-block j (0..7) from the 12 packed bytes (ggml get_scale_min_k4)."""
    q = [int(b) for b in np.asarray(scales, dtype=np.uint8).reshape(-1)[:12]]
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 15) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


def q4k_scale_bytes(j: int) -> tuple[int, ...]:
    """Offsets (inside the block) of the scale bytes that sub-block j's scale and min come from."""
    return (4 + j, 4 + j + 4) if j < 4 else (4 + j + 4, 4 + j - 4, 4 + j)


def q4k_qs_bytes(j: int) -> tuple[int, int, str]:
    """(first, last) byte offsets inside the block of sub-block j's 32 nibbles, and which nibble."""
    first = 16 + (j // 2) * 32
    return first, first + 31, "low" if j % 2 == 0 else "high"


@dataclass
class Q4KBlock:
    """The fields of one Q4_K block."""

    raw: np.ndarray        # uint8 [144]
    d: np.float16          # super-block scale of the 6-bit scales
    dmin: np.float16       # super-block scale of the 6-bit mins
    scales: np.ndarray     # uint8 [12], packed
    sc: list[int]          # 8 unpacked 6-bit scales
    m: list[int]           # 8 unpacked 6-bit mins
    qs: np.ndarray         # uint8 [128] nibbles


def q4k_block_fields(block: np.ndarray) -> Q4KBlock:
    raw = np.ascontiguousarray(block, dtype=np.uint8).reshape(-1)
    if raw.size != Q4K_BLOCK_BYTES:
        raise ValueError(f"a Q4_K block has {Q4K_BLOCK_BYTES} bytes, got {raw.size}")
    d, dmin = raw[0:4].view(np.float16)
    scales = raw[4:16].copy()
    pairs = [q4k_scale_min(scales, j) for j in range(8)]
    return Q4KBlock(raw.copy(), d, dmin, scales, [p[0] for p in pairs], [p[1] for p in pairs], raw[16:].copy())


def _hex(b) -> str:
    return " ".join(f"{int(v):02x}" for v in b)


def q4k_hexdump(block: np.ndarray) -> str:
    """The 144 bytes of a Q4_K block, byte by byte, cut into its fields."""
    f = q4k_block_fields(block)
    raw = f.raw
    out = [
        f"bytes   0-1    d      {_hex(raw[0:2]):<8}  -> f16 {float(f.d):.6g}   (little-endian 0x{int(raw[1]):02x}{int(raw[0]):02x})",
        f"bytes   2-3    dmin   {_hex(raw[2:4]):<8}  -> f16 {float(f.dmin):.6g}   (little-endian 0x{int(raw[3]):02x}{int(raw[2]):02x})",
        f"bytes   4-15   scales {_hex(raw[4:16])}   (8 scales + 8 mins, 6 bits each)",
    ]
    for c in range(4):
        lo = 16 + 32 * c
        out.append(f"bytes {lo:>3}-{lo + 31:<3}  qs[{c}]  {_hex(raw[lo:lo + 16])}")
        out.append(f"{'':20}{_hex(raw[lo + 16:lo + 32])}"
                   f"   (low nibbles: weights {64 * c}-{64 * c + 31}, high: {64 * c + 32}-{64 * c + 63})")
    return "\n".join(out)


def q4k_decode(blocks: np.ndarray) -> np.ndarray:
    """Decode Q4_K blocks to float32 [n_blocks, 256] with QQ4_K::load32's float32 operations.

    Per sub-block s: ds = d * sc_s and ms = dmin * m_s (float32), then value = ds * q - ms.
    """
    b = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1, Q4K_BLOCK_BYTES)
    n = b.shape[0]
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32).reshape(n)
    dmin = b[:, 2:4].copy().view(np.float16).astype(np.float32).reshape(n)
    q = b[:, 4:16].astype(np.int32)
    sc = np.empty((n, 8), np.int32)
    mn = np.empty((n, 8), np.int32)
    sc[:, :4] = q[:, 0:4] & 63
    mn[:, :4] = q[:, 4:8] & 63
    sc[:, 4:] = (q[:, 8:12] & 15) | ((q[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)
    ds = d[:, None] * sc.astype(np.float32)       # [n, 8] float32
    ms = dmin[:, None] * mn.astype(np.float32)
    qs = b[:, 16:].reshape(n, 4, 32)
    nib = np.empty((n, 8, 32), np.float32)
    nib[:, 0::2] = qs & 15                        # sub-blocks 0, 2, 4, 6: low nibbles of chunk s/2
    nib[:, 1::2] = qs >> 4                        # sub-blocks 1, 3, 5, 7: high nibbles
    v = ds[:, :, None] * nib - ms[:, :, None]
    return v.reshape(n, Q4K_VALUES).astype(np.float32, copy=False)


# ------------------------------------------------------------------------------------------
# the matvec kernel, lane by lane


@dataclass
class MatvecTrace:
    """What `matvec_impl` does for each row, replayed in NumPy (see `matvec_reenact`)."""

    y: np.ndarray                 # float32 [rows]: lane 0's value after the reduction
    lane_acc: np.ndarray          # float32 [rows, warp_size]: each lane's sum before the reduction
    butterfly: list[tuple[int, np.ndarray]]  # (xor mask, lane values [rows, warp_size] after that step)
    warp_size: int
    n_items: int
    items_per_block: int
    block_bytes: int

    def lane_items(self, lane: int) -> list[int]:
        """The items lane `lane` reads, in order (it = lane, lane + W, lane + 2W, ...)."""
        return list(range(lane, self.n_items, self.warp_size))

    @property
    def rounds(self) -> int:
        return -(-self.n_items // self.warp_size)


def matvec_reenact(rows_q4k: np.ndarray, x: np.ndarray, warp_size: int = 32) -> MatvecTrace:
    """y = W @ x for Q4_K rows the way kernels/matvec.hip computes it, one warp per row.

    Lane `l` loops over items it = l, l + W, ... (32 values each: sub-block it % 8 of block it / 8),
    decodes the item (`q4k_decode`), and adds 8 partial sums of four products each to its float32
    accumulator. `rf_warp_sum` then adds lane values across xor masks W/2, ..., 1; lane 0 writes y.
    """
    rows = np.ascontiguousarray(rows_q4k, dtype=np.uint8)
    if rows.ndim == 1:
        rows = rows[None]
    n_rows, row_bytes = rows.shape
    if row_bytes % Q4K_BLOCK_BYTES:
        raise ValueError(f"row of {row_bytes} bytes is not a whole number of Q4_K blocks")
    cols = row_bytes // Q4K_BLOCK_BYTES * Q4K_VALUES
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if x.size != cols:
        raise ValueError(f"x has {x.size} values, the rows have {cols}")
    n_items = cols // ITEM
    v = q4k_decode(rows).reshape(n_rows, n_items, 8, 4)   # item, j (rf_f4 index), component
    xv = x.reshape(n_items, 8, 4)
    # acc += v[4j]*t.x + v[4j+1]*t.y + v[4j+2]*t.z + v[4j+3]*t.w   (left to right, then added to acc)
    p = v[..., 0] * xv[..., 0]
    for c in (1, 2, 3):
        p = p + v[..., c] * xv[..., c]
    acc = np.zeros((n_rows, warp_size), np.float32)
    lanes = np.arange(warp_size)
    for r in range(-(-n_items // warp_size)):
        it = r * warp_size + lanes
        live = it < n_items
        for j in range(8):
            acc[:, live] = acc[:, live] + p[:, it[live], j]
    lane_acc = acc.copy()
    steps = []
    m = warp_size // 2
    while m > 0:
        acc = acc + acc[:, lanes ^ m]
        steps.append((m, acc.copy()))
        m //= 2
    return MatvecTrace(acc[:, 0] + np.float32(0.0), lane_acc, steps, warp_size, n_items, 8, Q4K_BLOCK_BYTES)


def warp_rounds_table(tr: MatvecTrace) -> str:
    """Per loop round of the warp: items, blocks, and the span of the row's bytes it reads."""
    out = [f"{'round':>5}  {'items':>9}  {'lanes busy':>10}  {'blocks':>7}  {'row bytes read (qs + headers)':>30}"]
    for r in range(tr.rounds):
        i0 = r * tr.warp_size
        i1 = min(tr.n_items, i0 + tr.warp_size) - 1
        b0, b1 = i0 // tr.items_per_block, i1 // tr.items_per_block
        out.append(f"{r:>5}  {i0:>4}-{i1:<4}  {i1 - i0 + 1:>10}  {b0:>3}-{b1:<3}  "
                   f"{b0 * tr.block_bytes:>14,} - {(b1 + 1) * tr.block_bytes - 1:<,}")
    return "\n".join(out)


def lane_table(tr: MatvecTrace, lanes, row: int = 0) -> str:
    """For some lanes: the items they read, where those bytes are, and their sum before the reduction."""
    out = [f"{'lane':>4}  {'items (block.sub)':<34}  {'first item: bytes in the row':<38}  {'lane sum':>12}"]
    for lane in lanes:
        its = tr.lane_items(lane)
        desc = " ".join(f"{it // 8}.{it % 8}" for it in its)
        it = its[0]
        b, s = divmod(it, 8)
        base = b * tr.block_bytes
        q0, q1, half = q4k_qs_bytes(s)
        where = f"d,dmin {base}-{base + 3}, qs {base + q0}-{base + q1} {half}"
        out.append(f"{lane:>4}  {desc:<34}  {where:<38}  {float(tr.lane_acc[row, lane]):>12.6f}")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------
# running the real kernel: CPU emulator or GPU


def emulator_module_path() -> Path | None:
    """tests/gpu/emu/emu.py of a source checkout (None in an installed package without tests)."""
    p = K.kernels_dir().parent / "tests" / "gpu" / "emu" / "emu.py"
    return p if p.is_file() else None


def emulator_available() -> tuple[bool, str]:
    if emulator_module_path() is None:
        return False, "tests/gpu/emu is not in this installation (needs a source checkout)"
    if shutil.which("g++") is None:
        return False, "g++ not found (the emulator compiles the kernels as plain C++)"
    return True, "g++ and tests/gpu/emu found"


_emu_modules: dict = {}


def _emu(name: str, warp_size: int):
    key = (name, warp_size)
    if key not in _emu_modules:
        path = emulator_module_path()
        if path is None:
            raise RuntimeError(emulator_available()[1])
        mod = importlib.util.module_from_spec(spec := importlib.util.spec_from_file_location("rocmforge_lab_emu", path))
        spec.loader.exec_module(mod)
        _emu_modules[key] = mod.EmuModule(name, warp_size)
    return _emu_modules[key]


def _launch_geometry(rows: int, warp_size: int) -> tuple[tuple[int], tuple[int]]:
    """The matvec launch of CupyBackend._matvec: 256 threads, one warp per row."""
    block = 256
    rpb = block // warp_size
    return ((rows + rpb - 1) // rpb,), (block,)


def _arena_with(rows_bytes: np.ndarray, offset: int) -> np.ndarray:
    raw = np.ascontiguousarray(rows_bytes, dtype=np.uint8).reshape(-1)
    arena = np.zeros(offset + M.align_up(raw.nbytes), np.uint8)
    arena[offset:offset + raw.nbytes] = raw
    return arena


def emulator_matvec(rows_bytes: np.ndarray, x: np.ndarray, qtype: str = "Q4_K", warp_size: int = 32,
                    offset: int = 256) -> np.ndarray:
    """Run kernels/matvec.hip's `matvec_<qtype>` on the CPU emulator (one thread per GPU thread).

    The rows are placed at `offset` in a host "arena", as the weight arena would place them.
    """
    rows_bytes = np.ascontiguousarray(rows_bytes, dtype=np.uint8)
    rows, row_bytes = rows_bytes.shape
    fmt = _format(qtype)
    cols = row_bytes // fmt.type_size * fmt.block_size
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.zeros(rows, np.float32)
    grid, block = _launch_geometry(rows, warp_size)
    _emu("matvec", warp_size).launch(f"matvec_{K.QTYPE_SUFFIX[qtype.upper()]}", grid, block,
                                     _arena_with(rows_bytes, offset), offset, row_bytes, rows, cols, x, None, y)
    return y


def gpu_matvec(rows_bytes: np.ndarray, x: np.ndarray, qtype: str = "Q4_K", offset: int = 256) -> np.ndarray:
    """Run `matvec_<qtype>` on the GPU through CuPy (compiled by backend/kernels.py)."""
    import cupy

    rows_bytes = np.ascontiguousarray(rows_bytes, dtype=np.uint8)
    rows, row_bytes = rows_bytes.shape
    fmt = _format(qtype)
    cols = row_bytes // fmt.type_size * fmt.block_size
    arena = cupy.asarray(_arena_with(rows_bytes, offset))
    xd = cupy.asarray(np.ascontiguousarray(x, dtype=np.float32))
    y = cupy.zeros(rows, dtype=cupy.float32)
    grid, block = _launch_geometry(rows, K.device_warp_size())
    fn = K.get_function("matvec", f"matvec_{K.QTYPE_SUFFIX[qtype.upper()]}")
    fn(grid, block, (arena, np.int64(offset), np.int64(row_bytes), np.int32(rows), np.int32(cols), xd, None, y))
    return cupy.asnumpy(y)


def _format(qtype: str):
    from .quant import get_format

    return get_format(qtype.lower())


# ------------------------------------------------------------------------------------------
# memory plan (no GPU needed)


class _ArenaPlanner:
    """Registers tensors with the GPU backend's own `load_weight` into a host-side WeightArena.

    `WeightArena.add` only records a tensor and assigns its offset; nothing touches a device
    until `finalize`, which the planner never calls.
    """

    name = "arena-plan"

    def __init__(self):
        self.arena = M.WeightArena()

    load_weight = CupyBackend.load_weight  # the GPU backend's registration code, unchanged


def plan_weight_arena(gf) -> M.WeightArena:
    """The weight arena a GPU load of GGUF `gf` builds: same tensors, order, types and offsets."""
    from .loader import validate
    from .model import Transformer

    arch, config = validate(gf)
    planner = _ArenaPlanner()
    for name in Transformer.check_shapes(gf, config, arch):
        planner.load_weight(gf.tensors[name])
    return planner.arena


@dataclass
class ArenaEntry:
    index: int
    name: str
    qtype: str          # type stored in the arena
    source_qtype: str   # type in the file
    shape: tuple
    offset: int
    nbytes: int
    row_bytes: int
    pad: int            # alignment padding after the tensor (to the next 256-byte boundary)


def arena_entries(arena: M.WeightArena) -> list[ArenaEntry]:
    ws = sorted(arena.weights.values(), key=lambda w: (w.segment.index, w.offset))
    out = []
    for i, w in enumerate(ws):
        nxt = ws[i + 1].offset if i + 1 < len(ws) and ws[i + 1].segment is w.segment else M.align_up(w.segment.nbytes)
        out.append(ArenaEntry(i, w.name, w.qtype_name, w.source_qtype_name, w.shape, w.offset, w.nbytes,
                              w.row_bytes, nxt - (w.offset + w.nbytes)))
    return out


def arena_layout_table(entries: list[ArenaEntry], head: int = 12, tail: int = 3) -> str:
    hdr = (f"{'#':>3}  {'tensor':<26} {'type':<9} {'shape':<13} {'offset':>12} {'bytes':>11} "
           f"{'pad':>4}  {'row bytes':>9} {'row align':>9}")
    out = [hdr]
    show = entries if len(entries) <= head + tail else entries[:head] + [None] + entries[-tail:]
    for e in show:
        if e is None:
            out.append(f"{'...':>3}  ({len(entries) - head - tail} more)")
            continue
        t = e.qtype if e.qtype == e.source_qtype else f"{e.source_qtype}>{e.qtype}"
        shape = "x".join(str(s) for s in e.shape)
        out.append(f"{e.index:>3}  {e.name:<26} {t:<9} {shape:<13} {e.offset:>12,} {e.nbytes:>11,} "
                   f"{e.pad:>4}  {e.row_bytes:>9,} {row_alignment(e.offset, e.row_bytes):>9}")
    return "\n".join(out)


def row_alignment(offset: int, row_bytes: int, cap: int = M.ALIGN) -> int:
    """Largest power of two (<= cap) dividing every row start offset + r * row_bytes."""
    a = cap
    while a > 1 and (offset % a or row_bytes % a):
        a //= 2
    return a


def arena_type_summary(entries: list[ArenaEntry], arena: M.WeightArena) -> str:
    by: dict[str, list[ArenaEntry]] = {}
    for e in entries:
        by.setdefault(e.qtype if e.qtype == e.source_qtype else f"{e.source_qtype}>{e.qtype}", []).append(e)
    total = arena.stats()["bytes"]
    out = [f"{'type':<9} {'tensors':>7} {'tensor bytes':>14} {'padding':>8} {'share':>7}  {'min row align':>13}"]
    for t, es in sorted(by.items(), key=lambda kv: -sum(e.nbytes for e in kv[1])):
        nb = sum(e.nbytes for e in es)
        pad = sum(e.pad for e in es)
        out.append(f"{t:<9} {len(es):>7} {nb:>14,} {pad:>8,} {100 * (nb + pad) / total:>6.2f}%  "
                   f"{min(row_alignment(e.offset, e.row_bytes) for e in es):>13}")
    st = arena.stats()
    pad = sum(e.pad for e in entries)
    out.append(f"{'total':<9} {st['tensors']:>7} {st['tensor_bytes']:>14,} {pad:>8,} {100.0:>6.2f}%")
    out.append(f"arena: {st['bytes']:,} bytes in {st['segments']} segment(s) = 1 device allocation; "
               f"padding {pad:,} bytes ({100 * pad / st['bytes']:.3f}%)")
    return "\n".join(out)


def plan_device_memory(config, n_ctx: int | None = None, kv_dtype: str = "f16", max_batch: int = 512) -> dict:
    """Bytes of the other device buffers, from the config, as the GPU backend sizes them.

    n_ctx: the session context (default: min(model context, 4096), like `Model.session()`).
    The workspace uses the loader's sizing (`workspace_bytes_for`, context min(n_ctx_model, 4096))
    rounded up to whole MiB like `memory.Workspace`.
    """
    ctx = int(n_ctx or min(config.n_ctx, 4096))
    ws_req = M.workspace_bytes_for(config.d_model, config.n_head, config.n_head_kv, config.head_dim, config.d_ff,
                                   config.vocab_size, min(config.n_ctx, 4096), max_batch)
    ws = M.align_up(max(ws_req, 1 << 20), 1 << 20)
    item = 2 if kv_dtype == "f16" else 4
    per_tok = 2 * config.n_layer * config.n_head_kv * config.head_dim * item
    return {
        "workspace_requested": ws_req,
        "workspace": ws,
        "kv_per_token": per_tok,
        "kv_n_ctx": ctx,
        "kv_cache": per_tok * ctx,
        "kv_dtype": kv_dtype,
        "prefill_scratch": PREFILL_SCRATCH_BYTES,
    }


# ------------------------------------------------------------------------------------------
# one decode step, op by op


def linear_weight_name(model, op) -> str | None:
    """The weight tensor a `linear` op multiplies with."""
    if op.kind != "linear":
        return None
    if op.name == "logits":
        return "token_embd.weight" if model.config.tied_output else "output.weight"
    return op.name + ".weight"


@dataclass
class OpTime:
    name: str
    kind: str
    layer: int | None
    host_s: float
    device_s: float | None = None


@dataclass
class DecodeTiming:
    device: str                  # "gpu" or "cpu"
    ops: list[OpTime] = field(default_factory=list)
    logits: np.ndarray | None = None
    kernels: dict[str, set[str]] = field(default_factory=dict)  # op kind -> kernels looked up

    @property
    def total_s(self) -> float:
        return sum((o.device_s if o.device_s is not None else o.host_s) for o in self.ops)


def decode_step_op_times(model, session, token_id: int, record_kernels: bool = False) -> DecodeTiming:
    """Run one decode token through `session`, timing each op of the program.

    CPU (NumPy engine): wall clock around each op. GPU: CUDA/HIP events recorded on the stream
    before and after each op (the op's kernels plus any wait for Python to launch them) and the
    host time of issuing the op. With `record_kernels`, the kernels each op kind looks up through
    `backend.kernels.get_function` (i.e. launches, on the GPU backend) are collected in `.kernels`.
    """
    state, ops = session.begin_forward([int(token_id)])
    program = model.transformer.program
    gpu = model.device == "gpu"
    res = DecodeTiming("gpu" if gpu else "cpu")
    current = {"kind": None}
    real_get = K.get_function

    def recording_get(module, kernel, *options):
        res.kernels.setdefault(current["kind"], set()).add(kernel)
        return real_get(module, kernel, *options)

    if gpu:
        import cupy
    events = []
    if record_kernels:
        K.get_function = recording_get
    try:
        with model.threads():
            for idx in range(len(program) + 1):
                current["kind"] = program[idx].kind if idx < len(program) else None
                if gpu:
                    e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
                    e0.record()
                t0 = time.perf_counter()
                try:
                    op, _ = next(ops)
                except StopIteration:
                    break
                t1 = time.perf_counter()
                if gpu:
                    e1.record()
                    events.append((op, t1 - t0, e0, e1))
                else:
                    res.ops.append(OpTime(op.name, op.kind, op.layer, t1 - t0))
            if gpu:
                model.backend.synchronize("decode step (timing)")
    finally:
        K.get_function = real_get
    for op, host, e0, e1 in events:
        res.ops.append(OpTime(op.name, op.kind, op.layer, host, cupy.cuda.get_elapsed_time(e0, e1) / 1e3))
    res.logits = session.finish_forward(state)
    return res


def summarize_op_times(t: DecodeTiming) -> str:
    """Per op kind: count, total, share of the step, mean per op (device time on a GPU)."""
    clock = "GPU events" if t.device == "gpu" else "CPU wall clock (NumPy reference)"
    by: dict[str, list[OpTime]] = {}
    for o in t.ops:
        by.setdefault(o.kind, []).append(o)
    total = t.total_s
    out = [f"one decode step, {len(t.ops)} ops, timed with {clock}",
           f"{'op kind':<12} {'ops':>4} {'total ms':>10} {'share':>7} {'mean us/op':>11}"
           + (f" {'host us/op':>11}" if t.device == "gpu" else "")]
    for kind, os_ in sorted(by.items(), key=lambda kv: -sum(_t(o) for o in kv[1])):
        s = sum(_t(o) for o in os_)
        line = f"{kind:<12} {len(os_):>4} {1e3 * s:>10.3f} {100 * s / total:>6.1f}% {1e6 * s / len(os_):>11.1f}"
        if t.device == "gpu":
            line += f" {1e6 * sum(o.host_s for o in os_) / len(os_):>11.1f}"
        out.append(line)
    out.append(f"{'total':<12} {len(t.ops):>4} {1e3 * total:>10.3f}")
    return "\n".join(out)


def slowest_ops(t: DecodeTiming, n: int = 5) -> str:
    ops = sorted(t.ops, key=_t, reverse=True)[:n]
    return "\n".join(f"{o.name:<20} {o.kind:<12} {1e6 * _t(o):>10.1f} us" for o in ops)


def _t(o: OpTime) -> float:
    return o.device_s if o.device_s is not None else o.host_s


__all__ = [
    "kernel_source_excerpt", "kernel_header_comment", "q4k_scale_min", "q4k_scale_bytes", "q4k_qs_bytes", "q4k_block_fields",
    "q4k_hexdump", "q4k_decode", "MatvecTrace", "matvec_reenact", "warp_rounds_table", "lane_table",
    "emulator_available", "emulator_matvec", "gpu_matvec", "plan_weight_arena", "arena_entries",
    "arena_layout_table", "arena_type_summary", "row_alignment", "plan_device_memory",
    "linear_weight_name", "OpTime", "DecodeTiming", "decode_step_op_times", "summarize_op_times",
    "slowest_ops",
]
