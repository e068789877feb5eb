"""Per-kernel GPU time of one decode step (fast path) and per-op GPU time of a step-path forward.

    from rocmforge_lab.backend.profile import profile_decode_step, profile_forward, format_profile
    rows = profile_decode_step(fast_decoder)      # one row per launch: label, kind, kernel, us
    print(format_profile(rows))                   # totals per kind (qkv, attn, o_proj, ...)

Timing: CUDA/HIP events recorded between the launches of one step, run eagerly on the decoder's
stream behind a short busy-wait kernel, so the queue is full before the GPU reaches the first
event and the gaps between events are GPU time, not Python launch time. (Inside a graph replay
the launch gaps are smaller still; the sum here is an upper bound of a replay's kernel time.)
`benchmarks/gpu_decode.py --profile` and `rocmforge-lab bench --profile` print it, with each kind's
resident blocks per multiprocessor and waves (its grid over resident blocks x multiprocessors, from
the kernels' registers and static shared memory: `resident_blocks`), so a grid that spills into a
second wave shows up.
"""
from __future__ import annotations

import math
import statistics
from collections import OrderedDict
from typing import Mapping


def _spin(backend, seconds: float) -> None:
    try:
        backend.spin(seconds)
    except Exception:  # no debug kernel: timings then include launch gaps
        pass


def resident_blocks(regs: int, static_smem: int, threads: int, props: Mapping) -> int:
    """Blocks of one kernel that fit a multiprocessor at once, CUDA's rule: the least of the thread,
    block, register and shared-memory limits; registers are allocated per warp in units of 256 from
    4 partitions of the register file; each block also takes the reserved shared memory. `props`:
    cupy.cuda.runtime.getDeviceProperties (H100 defaults where a key is missing; on ROCm an estimate)."""
    ws = int(props.get("warpSize", 32))
    warps = -(-threads // ws)
    limits = [int(props.get("maxThreadsPerMultiProcessor", 2048)) // max(1, threads),
              int(props.get("maxBlocksPerMultiProcessor", 0)) or 32]
    if regs > 0:
        per_warp = -(-regs * ws // 256) * 256
        warps_by_regs = 4 * ((int(props.get("regsPerMultiprocessor", 65536)) // 4) // per_warp)
        limits.append(warps_by_regs // warps)
    smem = static_smem + int(props.get("reservedSharedMemPerBlock", 0))
    if smem > 0:
        limits.append(int(props.get("sharedMemPerMultiprocessor", 233472)) // smem)
    return max(0, min(limits))


def occupancy(fd, props: Mapping | None = None) -> list[tuple[int, float]]:
    """(resident blocks per multiprocessor, waves) of each launch of the fast decoder `fd`'s step, from
    its kernels' attributes and `props` (default: the current device's); (0, nan) where those are not
    available."""
    try:
        if props is None:
            import cupy

            props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        n_sm = int(props["multiProcessorCount"])
    except Exception:
        return [(0, float("nan"))] * len(fd.exec.calls)
    out = []
    for fn, grid, block, _args in fd.exec.calls:
        try:
            res = resident_blocks(int(fn.num_regs), int(fn.shared_size_bytes), math.prod(block), props)
            out.append((res, math.prod(grid) / (res * n_sm) if res else float("inf")))
        except Exception:
            out.append((0, float("nan")))
    return out


def profile_decode_step(fd, reps: int = 5, spin_s: float = 0.02) -> list[dict]:
    """Median GPU microseconds of each launch of one fast decode step (see module docstring).

    Runs the step at the session's current position without committing tokens (the KV entry at
    that position is overwritten later)."""
    import cupy

    session = fd.session_ref()
    if session is None:
        raise RuntimeError("the decoder's session is gone")
    times: list[list[float]] = [[] for _ in fd.exec.calls]
    pos = min(session.n_past, fd.n_ctx - 1)
    for _ in range(reps):
        fd._start(1, pos, ())
        evs = [cupy.cuda.Event() for _ in range(len(fd.exec.calls) + 1)]
        with fd.stream:
            _spin(fd.backend, spin_s)
            evs[0].record(fd.stream)
            for i, (fn, grid, block, args) in enumerate(fd.exec.calls):
                fn(grid, block, args)
                evs[i + 1].record(fd.stream)
        fd._sync("profile decode step")
        for i in range(len(fd.exec.calls)):
            times[i].append(cupy.cuda.get_elapsed_time(evs[i], evs[i + 1]) * 1e3)
    rows = []
    for l, t, (res, waves) in zip(fd.plan.launches, times, occupancy(fd)):
        rows.append({"label": l.label, "kind": l.kind, "kernel": l.kernel, "grid": l.grid, "block": l.block,
                     "us": statistics.median(t), "weight_bytes": l.weight_bytes, "blocks_per_sm": res,
                     "waves": waves})
    return rows


def profile_forward(session, ids, reps: int = 3, spin_s: float = 0.05) -> list[dict]:
    """Median GPU microseconds of each op of a step-path forward of `ids` (appended, then rewound)."""
    import cupy

    be = session.model.backend
    n0 = session.n_past
    per_op: "OrderedDict[str, list[float]]" = OrderedDict()
    kinds: dict[str, str] = {}
    for _ in range(reps):
        session.truncate(n0)
        state, ops = session.begin_forward(ids, last_only=True)
        _spin(be, spin_s)
        evs = []
        start = cupy.cuda.Event()
        start.record()
        names = []
        for op, _out in ops:
            ev = cupy.cuda.Event()
            ev.record()
            evs.append(ev)
            names.append(op.name)
            kinds[op.name] = op.kind
        session.finish_forward(state)
        be.synchronize("profile forward")
        prev = start
        for name, ev in zip(names, evs):
            per_op.setdefault(name, []).append(cupy.cuda.get_elapsed_time(prev, ev) * 1e3)
            prev = ev
    session.truncate(n0)
    return [{"label": n, "kind": kinds[n], "us": statistics.median(t), "weight_bytes": 0} for n, t in per_op.items()]


def summarize(rows: list[dict]) -> "OrderedDict[str, dict]":
    """Totals per kind: launches, us, weight bytes; with occupancy in the rows, the fewest resident
    blocks per multiprocessor and the most waves of the kind's launches."""
    out: "OrderedDict[str, dict]" = OrderedDict()
    for r in rows:
        k = out.setdefault(r["kind"], {"count": 0, "us": 0.0, "weight_bytes": 0})
        k["count"] += 1
        k["us"] += r["us"]
        k["weight_bytes"] += r.get("weight_bytes", 0)
        if "waves" in r:
            k["blocks_per_sm"] = min(k.get("blocks_per_sm", r["blocks_per_sm"]), r["blocks_per_sm"])
            k["waves"] = max(k.get("waves", r["waves"]), r["waves"])
    return out


def format_profile(rows: list[dict], title: str = "per-kernel GPU time of one decode step") -> str:
    """The table of `summarize(rows)`: one line per kind (GB/s: its weight bytes over its time; blocks/SM
    and waves where the rows carry occupancy: a kind above 1.0 wave runs part of its grid after the rest)."""
    tot = sum(r["us"] for r in rows) or 1.0
    kinds = summarize(rows)
    occ = any("waves" in k for k in kinds.values())
    head = f"{'kind':10s} {'launches':>8s} {'total us':>10s} {'share':>6s} {'us/launch':>10s} {'GB/s':>8s}"
    lines = [title, head + (f" {'blocks/SM':>9s} {'waves':>6s}" if occ else "")]
    for kind, k in kinds.items():
        gbs = k["weight_bytes"] / (k["us"] * 1e-6) / 1e9 if k["weight_bytes"] and k["us"] > 0 else float("nan")
        line = (f"{kind:10s} {k['count']:8d} {k['us']:10.1f} {100 * k['us'] / tot:5.1f}% "
                f"{k['us'] / k['count']:10.2f} {gbs:8.0f}")
        if occ:
            line += f" {k.get('blocks_per_sm', 0):9d} {k.get('waves', float('nan')):6.2f}"
        lines.append(line)
    lines.append(f"{'total':10s} {len(rows):8d} {tot:10.1f}")
    return "\n".join(lines)
